"""`goldstick serve` under concurrent load: throughput, latency, the server's memory, and correctness.

Starts `goldstick serve DIR` as a subprocess on a free loopback port and measures three things:

1. correctness under load: every distinct request (greedy and seeded-sampling completions, ``logprobs``
   requests with token-id prompts, ``echo`` scoring requests) is asked once alone (the expected answers), then a
   seeded, shuffled mix of those requests and malformed ones (invalid JSON, wrong types, oversize bodies, an
   unknown model) is sent from several client threads. Counted: answers that differ from the single-request
   answer (texts and tokens exactly, log-probabilities within ``LOGPROB_TOLERANCE``: batching moves the last
   float32 bits), 5xx statuses, malformed requests not answered with the expected 4xx; printed: requests/s,
   latency percentiles and the server's resident memory (VmRSS) every 50 requests;
2. requests/s at each ``--concurrency`` level (default 1 and 8): distinct valid requests, sent by that many
   client threads, none malformed;
3. the server's RSS over ``--rss-requests`` requests (default 1000, ``max_tokens`` 1, at the highest concurrency)
   after a warm-up of ``--rss-warmup`` requests on a fresh server, sampled every 100 requests: growth in MB and
   in percent of the RSS after the warm-up.

    python benchmarks/serve_load.py [--model QUANT_DIR] [--requests 300] [--threads 6] [--max-tokens 6]
                                    [--concurrency 1,8] [--rss-requests 1000] [--only load|throughput|rss]
                                    [--shapes repeat|fresh] [--json]

Without --model, the embedded default model is quantized (deepseek-r1-w8a8-dynamic) into a temporary folder.
``--shapes fresh`` gives every valid request a prompt length not seen before (up to the context), to separate
per-shape memory from per-request memory; ``repeat`` (default) cycles through a fixed set of prompts.

Where an eager server's memory went (``--matmul-probe`` measures it): with the same shapes over and over its RSS
grew linearly, so not per-shape state. MindSpore 2.10's PyNative (CPU) copies each non-tensor argument of an op
(a matmul's transpose flags, a softmax's axis) into a memory-pool block it never frees: 1.0-1.4 KB per matmul
launch, any shape; the same op under ``mindspore.jit`` keeps nothing. ``goldstick serve`` runs those ops (the
primitives the network's cells hold) on the host instead (``goldstick/serve/host_ops.py``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from goldstick.testing.serve_process import HOST, ServeProcess

MAX_BODY = 64 * 1024
WORDS = ["北京", "上海", "weather", "because", "我爱", "river", "春天", "model", "量化", "today", "花", "city"]
LOGPROB_TOLERANCE = 1e-4  # a batched answer's log-probabilities against the single request's


# ------------------------------------------------------------------------------------------------ the server
def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 120) -> tuple[int, dict]:
    """One HTTP request on a new connection; (status, JSON body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def start_server(model: str | Path, log_path: Path) -> ServeProcess:
    return ServeProcess(model, log_path, args=("--max-body-bytes", str(MAX_BODY)))


def valid_requests(n: int, max_tokens: int, seed: int, fresh_shapes: bool = False,
                   logprobs: bool = True) -> list[dict]:
    """n distinct completion requests, prompts of varied lengths, in turn: greedy; seeded sampling; with
    ``logprobs``, greedy with ``logprobs: 5`` on a token-id prompt, and a scoring request (``echo``,
    ``max_tokens: 0``, ``logprobs: 1``); without, two more greedy ones.

    With ``fresh_shapes`` prompt i has i + 1 words (every request a new prompt length); else 2..9 words.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = i + 1 if fresh_shapes else rng.randint(2, 9)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words)) + f" {i}"
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        kind = i % 4 if logprobs else i % 2
        if kind == 1:
            body.update(temperature=0.9, top_k=50, seed=1000 + i)  # sampled: seeds make the answers distinct
        elif kind == 2:
            body.update(prompt=[0] + [rng.randrange(10, 1000) for _ in range(words + 1)], logprobs=5)
        elif kind == 3:
            body.update(echo=True, max_tokens=0, logprobs=1)
        out.append(body)
    return out


def answers_match(got, want, tolerance: float = LOGPROB_TOLERANCE) -> bool:
    """Equal, except that floats (log-probabilities) may differ by ``tolerance``; in a ``top_logprobs`` entry a
    token present in only one of the two must be a near-tie at the edge of the list (within ``tolerance`` of its
    smallest value)."""
    if isinstance(got, float) and isinstance(want, float):
        return abs(got - want) <= tolerance
    if isinstance(got, dict) and isinstance(want, dict):
        if set(got) != set(want):
            if not all(isinstance(v, float) for v in [*got.values(), *want.values()]):
                return False
            for a, b in ((got, want), (want, got)):
                if any(abs(a[k] - min(a.values())) > tolerance for k in set(a) - set(b)):
                    return False
        return all(answers_match(got[k], want[k], tolerance) for k in set(got) & set(want))
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(answers_match(a, b, tolerance) for a, b in zip(got, want))
    return got == want


def texts_of(body: dict) -> list:
    """A completion's choices without their log-probabilities: texts, tokens, finish reasons."""
    return [(c.get("text"), (c.get("logprobs") or {}).get("tokens"), c.get("finish_reason"))
            for c in body.get("choices") or []]


def largest_float_difference(got, want) -> float:
    """The largest difference between corresponding floats (log-probabilities) of two answers."""
    if isinstance(got, float) and isinstance(want, float):
        return abs(got - want)
    if isinstance(got, dict) and isinstance(want, dict):
        return max((largest_float_difference(got[k], want[k]) for k in set(got) & set(want)), default=0.0)
    if isinstance(got, list) and isinstance(want, list):
        return max((largest_float_difference(a, b) for a, b in zip(got, want)), default=0.0)
    return 0.0


# (label, body bytes, expected status): malformed requests the server must answer with a 4xx
MALFORMED = [
    ("invalid-json", b'{"prompt": "x", "max_tokens": ', 400),
    ("not-an-object", b'["x", 1]', 400),
    ("empty-body", b"", 400),
    ("prompt-wrong-type", json.dumps({"prompt": 5}).encode(), 400),
    ("max-tokens-string", json.dumps({"prompt": "x", "max_tokens": "5"}).encode(), 400),
    ("temperature-bool", json.dumps({"prompt": "x", "temperature": True}).encode(), 400),
    ("nan", b'{"prompt": "x", "top_p": NaN}', 400),
    ("oversize-body", json.dumps({"prompt": "a" * (2 * MAX_BODY)}).encode(), 413),
    ("oversize-context", json.dumps({"prompt": "北京 " * 3000, "max_tokens": 1}).encode(), 400),
    ("unknown-model", json.dumps({"model": "deepseek-ai/DeepSeek-R1", "prompt": "x"}).encode(), 404),
    ("binary", bytes(range(256)) * 4, 400),
]


def workload(valid: list[dict], total: int, bad_fraction: float, seed: int) -> list[tuple]:
    """``total`` jobs (kind, key, body bytes, expected): every valid request at least once, the rest drawn at
    random; about ``bad_fraction`` malformed ones; shuffled with the seed."""
    rng = random.Random(seed)
    n_bad = int(round(total * bad_fraction))
    n_valid = total - n_bad
    keys = list(range(len(valid))) * (n_valid // len(valid)) + rng.sample(range(len(valid)), n_valid % len(valid))
    jobs = [("valid", k, json.dumps(valid[k]).encode(), 200) for k in keys]
    jobs += [("bad",) + MALFORMED[i % len(MALFORMED)] for i in range(n_bad)]
    rng.shuffle(jobs)
    return jobs


def run(port: int, jobs: list[tuple], threads: int, progress=None) -> list[dict]:
    """Send the jobs from ``threads`` client threads; one record per job (status, body, seconds)."""
    done = [0]
    lock = threading.Lock()

    def one(job):
        kind, key, body, expected = job
        started = time.perf_counter()
        try:
            status, answer = request(port, "POST", "/v1/completions", body)
        except OSError as exc:  # a lost request: connection refused or reset
            status, answer = None, {"exception": repr(exc)}
        record = {"kind": kind, "key": key, "expected": expected, "status": status, "body": answer,
                  "seconds": time.perf_counter() - started}
        with lock:
            done[0] += 1
            if progress is not None:
                progress(done[0])
        return record

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, jobs))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def check(records: list[dict], expected: list[dict]) -> dict:
    """Problems: valid answers that differ from the single-request answer, lost requests, 5xx, wrong 4xx."""
    problems = {"mismatch": [], "lost": [], "5xx": [], "bad-status": []}
    ids, matched = set(), 0
    for r in records:
        if r["status"] is None:
            problems["lost"].append(r)
        elif r["status"] >= 500:
            problems["5xx"].append(r)
        elif r["kind"] == "valid":
            want = expected[r["key"]]
            got = r["body"]
            if r["status"] != 200 or not answers_match(got.get("choices"), want["choices"]) \
                    or got.get("usage") != want["usage"]:
                problems["mismatch"].append(r)
            else:
                matched += 1
                ids.add(got["id"])
        elif not (400 <= r["status"] < 500) or (r["expected"] is not None and r["status"] != r["expected"]) \
                or not isinstance((r["body"] or {}).get("error", {}).get("message"), str):
            problems["bad-status"].append(r)
    problems["duplicate-ids"] = matched - len(ids)  # every answer carries its own completion id
    return problems


def load_test(model: str | Path, workdir: Path, requests_total: int = 300, threads: int = 6, distinct: int = 24,
              max_tokens: int = 6, bad_fraction: float = 0.25, seed: int = 0, fresh_shapes: bool = False,
              logprobs: bool = True) -> dict:
    """The correctness measurement; returns figures, per-50-request RSS, the problems found and the server log."""
    server = start_server(model, workdir / "server.log")
    try:
        valid = valid_requests(distinct, max_tokens, seed, fresh_shapes, logprobs)
        rss_loaded = server.rss_mb()
        single = []
        for body in valid:  # the expected answers, one request at a time
            status, answer = request(server.port, "POST", "/v1/completions", json.dumps(body).encode())
            if status != 200:
                raise RuntimeError(f"single request {body} failed: {status} {answer}")
            single.append(answer)
        rss_start = server.rss_mb()
        series = [(0, rss_start)]

        def sample(n):
            if n % 50 == 0:
                series.append((n, server.rss_mb()))
        jobs = workload(valid, requests_total, bad_fraction, seed)
        started = time.perf_counter()
        records = run(server.port, jobs, threads, sample)
        seconds = time.perf_counter() - started
        rss_end = server.rss_mb()
        health = request(server.port, "GET", "/health")
        stats = request(server.port, "GET", "/stats")[1]
        alive = server.proc.poll() is None
    finally:
        server.stop()
    ok = [r["seconds"] for r in records if r["kind"] == "valid" and r["status"] == 200]
    bad = [r["seconds"] for r in records if r["kind"] == "bad"]
    n_valid = sum(r["kind"] == "valid" for r in records)
    return {
        "requests": len(records), "valid": n_valid, "malformed": len(records) - n_valid, "threads": threads,
        "seconds": seconds, "requests_per_s": len(records) / seconds, "completions_per_s": n_valid / seconds,
        "latency_p50_s": percentile(ok, 50), "latency_p95_s": percentile(ok, 95), "latency_max_s": max(ok),
        "malformed_p50_s": percentile(bad, 50) if bad else None,
        "rss_loaded_mb": rss_loaded, "rss_start_mb": rss_start, "rss_end_mb": rss_end,
        "rss_growth_mb": rss_end - rss_start, "rss_series": series,
        "health": health, "alive": alive, "problems": check(records, single), "log": server.log(),
        "distinct_answers": len({json.dumps([a["choices"], a["usage"]]) for a in single}),
        "distinct_requests": len(single), "server_stats": stats, "expected": single,
    }


def send_all(port: int, bodies: list[dict], threads: int, progress=None) -> tuple[float, list[dict]]:
    """Send valid requests from ``threads`` client threads; (seconds, records). A non-200 answer is an error."""
    jobs = [("valid", i, json.dumps(body).encode(), 200) for i, body in enumerate(bodies)]
    started = time.perf_counter()
    records = run(port, jobs, threads, progress)
    seconds = time.perf_counter() - started
    failed = [r for r in records if r["status"] != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(records)} requests failed, e.g. {failed[0]}")
    return seconds, records


def throughput(model: str | Path, workdir: Path, concurrency: tuple[int, ...] = (1, 8), requests_total: int = 64,
               max_tokens: int = 6, seed: int = 0, logprobs: bool = True) -> dict:
    """Requests/s at each concurrency level on one server (after a warm-up round at the highest level):
    ``requests_total`` distinct valid requests per level, sent by that many client threads."""
    server = start_server(model, workdir / "server-throughput.log")
    try:
        warmup = valid_requests(max(concurrency) * 4, max_tokens, seed + 1, logprobs=logprobs)
        send_all(server.port, warmup, max(concurrency))
        levels = {}
        for c in concurrency:
            bodies = valid_requests(requests_total, max_tokens, seed + 2 + c, logprobs=logprobs)
            before = request(server.port, "GET", "/stats")[1]
            seconds, records = send_all(server.port, bodies, c)
            after = request(server.port, "GET", "/stats")[1]
            batches = after.get("batches", 0) - before.get("batches", 0)  # (a server without /stats: 0)
            levels[c] = {"requests": len(records), "seconds": seconds, "requests_per_s": len(records) / seconds,
                         "latency_p50_s": percentile([r["seconds"] for r in records], 50),
                         "mean_batch": (after["prompts"] - before["prompts"]) / batches if batches else None}
    finally:
        server.stop()
    return {"levels": levels, "max_tokens": max_tokens}


def rss_test(model: str | Path, workdir: Path, requests_total: int = 1000, warmup: int = 200, threads: int = 8,
             max_tokens: int = 1, distinct: int = 48, seed: int = 0, logprobs: bool = True) -> dict:
    """The server's RSS over ``requests_total`` valid requests after ``warmup`` of them, on a fresh server;
    sampled every 100 requests."""
    server = start_server(model, workdir / "server-rss.log")
    try:
        valid = valid_requests(distinct, max_tokens, seed, logprobs=logprobs)
        rng = random.Random(seed)
        rss_loaded = server.rss_mb()
        send_all(server.port, [rng.choice(valid) for _ in range(warmup)], threads)
        rss_start = server.rss_mb()
        series = [(0, rss_start)]

        def sample(n):
            if n % 100 == 0:
                series.append((n, server.rss_mb()))
        seconds, _ = send_all(server.port, [rng.choice(valid) for _ in range(requests_total)], threads, sample)
        rss_end = server.rss_mb()
        stats = request(server.port, "GET", "/stats")[1]
    finally:
        server.stop()
    return {"requests": requests_total, "warmup": warmup, "threads": threads, "max_tokens": max_tokens,
            "seconds": seconds, "requests_per_s": requests_total / seconds, "rss_loaded_mb": rss_loaded,
            "rss_start_mb": rss_start, "rss_end_mb": rss_end, "rss_growth_mb": rss_end - rss_start,
            "rss_growth_percent": 100.0 * (rss_end - rss_start) / rss_start, "rss_series": series,
            "server_stats": stats}


MATMUL_PROBE = r'''
import gc, sys
from pathlib import Path
import numpy as np
from goldstick.model.runtime import setup_mindspore
setup_mindspore()
import mindspore as ms
from mindspore import Tensor, nn, ops
def rss():
    return int([l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS")][0].split()[1])
class MatMul(nn.Cell):
    def construct(self, x, w):
        return ops.matmul(x, w)
cell = MatMul()
jitted = ms.jit(cell.construct)
x, w = Tensor(np.ones((8, 256), np.float32)), Tensor(np.ones((256, 256), np.float32))
for name, fn in (("pynative", lambda: cell(x, w)), ("jit", lambda: jitted(x, w))):
    for _ in range(100):
        fn()
    gc.collect()
    before = rss()
    for _ in range(5000):
        fn()
    gc.collect()
    print(f"{name}: {(rss() - before) / 5000:.2f} KB kept per matmul call (8x256 @ 256x256, 5000 calls)")
'''


def matmul_probe() -> None:
    with tempfile.TemporaryDirectory() as tmp:  # mindspore.jit reads the source: a file, not ``python -c``
        script = Path(tmp) / "matmul_probe.py"
        script.write_text(MATMUL_PROBE)
        subprocess.run([sys.executable, str(script)], check=True, cwd=tmp)  # (jit may leave rank_0/ in the cwd)


def quantized_default(out: Path) -> Path:
    from goldstick.testing.make_model import default_model_path

    subprocess.run([sys.executable, "-m", "goldstick.cli", "quantize", "deepseek-r1-w8a8-dynamic", "--model",
                    str(default_model_path()), "--out", str(out), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def print_load(r: dict, max_tokens: int) -> None:
    problems = {k: (len(v) if isinstance(v, list) else v) for k, v in r["problems"].items()}
    print(f"{r['requests']} requests ({r['valid']} completions of {max_tokens} tokens, {r['malformed']} "
          f"malformed) from {r['threads']} threads in {r['seconds']:.1f}s: {r['requests_per_s']:.1f} requests/s, "
          f"{r['completions_per_s']:.1f} completions/s")
    print(f"completion latency: p50 {r['latency_p50_s'] * 1000:.0f} ms, p95 {r['latency_p95_s'] * 1000:.0f} ms, "
          f"max {r['latency_max_s'] * 1000:.0f} ms; malformed p50 "
          f"{(r['malformed_p50_s'] or 0) * 1000:.0f} ms")
    print(f"server RSS: {r['rss_loaded_mb']:.1f} MB loaded, {r['rss_start_mb']:.1f} MB after the single requests, "
          f"{r['rss_end_mb']:.1f} MB after the load ({r['rss_growth_mb']:+.1f} MB, "
          f"{r['rss_growth_mb'] / r['requests'] * 1024:+.1f} KB/request)")
    print("RSS every 50 requests: " + ", ".join(f"{n}: {mb:.1f}" for n, mb in r["rss_series"]))
    print(f"problems: {problems}; health {r['health']}; server alive: {r['alive']}; batches: {r['server_stats']}")
    for m in r["problems"]["mismatch"]:
        got, want = m["body"] or {}, r["expected"][m["key"]]
        same_text = texts_of(got) == texts_of(want)
        print(f"  mismatch (status {m['status']}): texts and tokens {'equal' if same_text else 'DIFFER'}, largest "
              f"log-probability difference {largest_float_difference(got.get('choices'), want['choices']):.2e}")


def print_throughput(t: dict) -> None:
    for c, level in t["levels"].items():
        print(f"concurrency {c}: {level['requests_per_s']:.2f} requests/s ({level['requests']} requests of "
              f"max_tokens {t['max_tokens']} in {level['seconds']:.1f}s; latency p50 "
              f"{level['latency_p50_s'] * 1000:.0f} ms"
              + (f"; mean batch {level['mean_batch']:.1f} prompts)" if level["mean_batch"] else ")"))


def print_rss(m: dict) -> None:
    print(f"RSS over {m['requests']} requests (max_tokens {m['max_tokens']}, {m['threads']} threads, after "
          f"{m['warmup']} warm-up requests; {m['requests_per_s']:.1f} requests/s): {m['rss_start_mb']:.1f} -> "
          f"{m['rss_end_mb']:.1f} MB ({m['rss_growth_mb']:+.1f} MB, {m['rss_growth_percent']:+.1f} %, "
          f"{m['rss_growth_mb'] / m['requests'] * 1024:+.1f} KB/request; {m['rss_loaded_mb']:.1f} MB when loaded)")
    print("RSS every 100 requests: " + ", ".join(f"{n}: {mb:.1f}" for n, mb in m["rss_series"]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="quantized checkpoint (default: the embedded model, quantized now)")
    p.add_argument("--only", choices=("load", "throughput", "rss"), help="run one of the three measurements")
    p.add_argument("--requests", type=int, default=300, help="requests of the correctness load")
    p.add_argument("--threads", type=int, default=6, help="client threads of the correctness load")
    p.add_argument("--distinct", type=int, default=24, help="distinct valid requests")
    p.add_argument("--max-tokens", type=int, default=6)
    p.add_argument("--bad-fraction", type=float, default=0.25)
    p.add_argument("--shapes", choices=("repeat", "fresh"), default="repeat")
    p.add_argument("--concurrency", default="1,8", help="client threads of the throughput runs (default 1,8)")
    p.add_argument("--throughput-requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--rss-requests", type=int, default=1000)
    p.add_argument("--rss-warmup", type=int, default=200)
    p.add_argument("--no-logprobs", action="store_true",
                   help="plain completions only (for a server without logprobs and echo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--matmul-probe", action="store_true", help="only measure the memory MindSpore keeps per "
                                                               "matmul call, PyNative vs jit")
    args = p.parse_args(argv)
    if args.matmul_probe:
        matmul_probe()
        return {}
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    logprobs = not args.no_logprobs
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else quantized_default(Path(tmp) / "quantized")
        if not args.json:
            print(f"model: {model}", flush=True)
        if args.only in (None, "load"):
            fresh = args.shapes == "fresh"
            distinct = args.requests if fresh else args.distinct
            out["load"] = load_test(model, Path(tmp), args.requests, args.threads, distinct, args.max_tokens,
                                    0.0 if fresh else args.bad_fraction, args.seed, fresh, logprobs)
            if not args.json:
                print_load(out["load"], args.max_tokens)
        if args.only in (None, "throughput"):
            out["throughput"] = throughput(model, Path(tmp), concurrency, args.throughput_requests,
                                           args.max_tokens, args.seed, logprobs)
            if not args.json:
                print_throughput(out["throughput"])
        if args.only in (None, "rss"):
            out["rss"] = rss_test(model, Path(tmp), args.rss_requests, args.rss_warmup, max(concurrency),
                                  seed=args.seed, logprobs=logprobs)
            if not args.json:
                print_rss(out["rss"])
    if args.json:
        if "load" in out:
            out["load"] = {k: v for k, v in out["load"].items() if k not in ("log", "problems", "expected")} | {
                "problems": {k: (len(v) if isinstance(v, list) else v) for k, v in out["load"]["problems"].items()}}
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
