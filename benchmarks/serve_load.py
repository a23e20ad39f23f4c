"""`goldstick serve` under concurrent load: throughput, latency, the server's memory, and correctness.

Starts `goldstick serve DIR` as a subprocess on a free loopback port, asks every distinct request once alone (the
expected answers), then sends a seeded, shuffled mix of those requests and malformed ones (invalid JSON, wrong
types, oversize bodies, an unknown model) from several client threads. Prints requests/s, latency percentiles, the
server's resident memory (VmRSS) before and after the load and every 50 requests, and counts: answers that differ
from the single-request answer, 5xx statuses, malformed requests not answered with the expected 4xx.

    python benchmarks/serve_load.py [--model QUANT_DIR] [--requests 300] [--threads 6] [--max-tokens 6]
                                    [--shapes repeat|fresh] [--json]

Without --model, the embedded default model is quantized (deepseek-r1-w8a8-dynamic) into a temporary folder.
``--shapes fresh`` gives every valid request a prompt length not seen before (up to the context), to separate
per-shape memory from per-request memory; ``repeat`` (default) cycles through a fixed set of prompts.

Where the server's memory goes (``--matmul-probe`` measures it): with the same shapes over and over the RSS still
grows linearly, so it is not per-shape state. MindSpore 2.10's PyNative (CPU) keeps about 1.1-1.4 KB per matmul
launch (ops.matmul, mint.matmul, the MatMul primitive, bmm; with or without launch_blocking; with or without
Parameters; any shape), which malloc_trim does not return; the same matmul under ``mindspore.jit`` keeps nothing.
A decode step of the tiny model runs a few hundred matmuls, hence ~0.1-0.4 MB per forward.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOST = "127.0.0.1"
MAX_BODY = 64 * 1024
WORDS = ["北京", "上海", "weather", "because", "我爱", "river", "春天", "model", "量化", "today", "花", "city"]


# ------------------------------------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


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


class Server:
    """`goldstick serve MODEL` in a subprocess; ``stop()`` always ends it."""

    def __init__(self, model: str | Path, log_path: Path, max_body: int = MAX_BODY, startup: float = 180):
        self.port = free_port()
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "goldstick.cli", "serve", str(model), "--host", HOST,
                                          "--port", str(self.port), "--max-body-bytes", str(max_body),
                                          "--log-level", "warning"],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + startup
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if request(self.port, "GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server not healthy after {startup}s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


# ------------------------------------------------------------------------------------------------ the requests
def valid_requests(n: int, max_tokens: int, seed: int, fresh_shapes: bool = False) -> list[dict]:
    """n distinct completion requests: greedy and seeded-sampling ones, prompts of varied lengths.

    With ``fresh_shapes`` prompt i has i + 1 words (every request a new prompt length); else 2..9 words.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = i + 1 if fresh_shapes else rng.randint(2, 9)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words)) + f" {i}"
        body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
        if i % 2:
            body.update(temperature=0.9, top_k=50, seed=1000 + i)  # sampled: seeds make the answers distinct
        else:
            body.update(temperature=0)
        out.append(body)
    return out


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
            if r["status"] != 200 or got.get("choices") != want["choices"] or got.get("usage") != want["usage"]:
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
              max_tokens: int = 6, bad_fraction: float = 0.25, seed: int = 0, fresh_shapes: bool = False) -> dict:
    """The whole measurement; returns figures, per-50-request RSS, the problems found and the server log."""
    server = Server(model, workdir / "server.log")
    try:
        valid = valid_requests(distinct, max_tokens, seed, fresh_shapes)
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
        "distinct_requests": len(single),
    }


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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="quantized checkpoint (default: the embedded model, quantized now)")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--threads", type=int, default=6)
    p.add_argument("--distinct", type=int, default=24, help="distinct valid requests")
    p.add_argument("--max-tokens", type=int, default=6)
    p.add_argument("--bad-fraction", type=float, default=0.25)
    p.add_argument("--shapes", choices=("repeat", "fresh"), default="repeat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--matmul-probe", action="store_true", help="only measure the memory MindSpore keeps per "
                                                               "matmul call, PyNative vs jit")
    args = p.parse_args(argv)
    if args.matmul_probe:
        matmul_probe()
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else quantized_default(Path(tmp) / "quantized")
        fresh = args.shapes == "fresh"
        distinct = args.requests if fresh else args.distinct
        r = load_test(model, Path(tmp), args.requests, args.threads, distinct, args.max_tokens,
                      0.0 if fresh else args.bad_fraction, args.seed, fresh)
    problems = {k: (len(v) if isinstance(v, list) else v) for k, v in r["problems"].items()}
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k not in ("log", "problems")} | {"problems": problems}))
        return r
    print(f"model: {model}")
    print(f"{r['requests']} requests ({r['valid']} completions of {args.max_tokens} tokens, {r['malformed']} "
          f"malformed) from {r['threads']} threads in {r['seconds']:.1f}s: {r['requests_per_s']:.1f} requests/s, "
          f"{r['completions_per_s']:.1f} completions/s")
    print(f"completion latency: p50 {r['latency_p50_s'] * 1000:.0f} ms, p95 {r['latency_p95_s'] * 1000:.0f} ms, "
          f"max {r['latency_max_s'] * 1000:.0f} ms; malformed p50 "
          f"{(r['malformed_p50_s'] or 0) * 1000:.0f} ms")
    print(f"server RSS: {r['rss_loaded_mb']:.1f} MB loaded, {r['rss_start_mb']:.1f} MB after the single requests, "
          f"{r['rss_end_mb']:.1f} MB after the load ({r['rss_growth_mb']:+.1f} MB, "
          f"{r['rss_growth_mb'] / r['requests'] * 1024:+.1f} KB/request)")
    print("RSS every 50 requests: " + ", ".join(f"{n}: {mb:.1f}" for n, mb in r["rss_series"]))
    print(f"problems: {problems}; health {r['health']}; server alive: {r['alive']}")
    return r


if __name__ == "__main__":
    main()
