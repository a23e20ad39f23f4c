"""`goldstick serve` under concurrent load, over real HTTP on loopback; the server runs in a subprocess.

* Correctness, on the embedded float model: benchmarks/serve_load.py asks each of 16 distinct requests (greedy
  and seeded sampling, ``logprobs`` requests on token-id prompts, ``echo`` scoring requests; prompts of varied
  lengths) alone, then sends 96 requests from 4 client threads: those requests again, shuffled, mixed with
  malformed JSON, wrong types, NaN, binary bodies, oversize bodies and an unknown model. Every completion must
  equal its single-request answer (texts and tokens exactly, log-probabilities within 1e-4: batched prompts can
  move the last float32 bits), every malformed request must get its 4xx with an OpenAI-style error body, no 5xx,
  and the server must be healthy and alive at the end. (On a W8A8-dynamic model such a last bit can move an int8
  code and a log-probability by 1e-3 or more; the benchmark reports it, a test cannot bound it, since which
  requests share a batch depends on timing.)
* Memory, on the embedded model quantized with deepseek-r1-w8a8-dynamic: 1000 requests (``max_tokens`` 1, 8 client
  threads, so batched) after 200 warm-up requests; the server's RSS may grow by at most 10 %.

Throughput, latency and RSS are printed (the speed figures are measured, not asserted: the machine is shared).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_load import load_test, quantized_default, rss_test  # noqa: E402

from goldstick.testing.make_model import default_model_path  # noqa: E402


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return quantized_default(tmp_path_factory.mktemp("serve-load") / "quantized")


@pytest.mark.slow
def test_concurrent_clients_get_their_own_answers_and_bad_requests_get_4xx(tmp_path):
    r = load_test(default_model_path(), tmp_path, requests_total=96, threads=4, distinct=16, max_tokens=2,
                  bad_fraction=1 / 3, seed=7)
    print(f"\n{r['requests']} requests ({r['valid']} completions, {r['malformed']} malformed), {r['threads']} "
          f"threads, {r['seconds']:.1f}s: {r['requests_per_s']:.1f} requests/s; completion latency p50 "
          f"{r['latency_p50_s'] * 1000:.0f} ms, p95 {r['latency_p95_s'] * 1000:.0f} ms; server RSS "
          f"{r['rss_start_mb']:.1f} -> {r['rss_end_mb']:.1f} MB; series {r['rss_series']}; {r['server_stats']}")
    problems = r["problems"]
    for kind in ("lost", "5xx", "mismatch", "bad-status"):
        assert not problems[kind], (kind, problems[kind][:3], r["log"][-3000:])
    assert problems["duplicate-ids"] == 0
    # the answers (text and token counts) are distinguishable, so a mix-up would have shown as a mismatch
    assert r["distinct_answers"] >= 0.75 * r["distinct_requests"]
    assert r["valid"] == 64 and r["malformed"] == 32
    assert r["health"] == (200, {"status": "ok"}) and r["alive"]


@pytest.mark.slow
def test_server_memory_stays_flat_over_1000_requests(quantized, tmp_path):
    m = rss_test(quantized, tmp_path, requests_total=1000, warmup=200, threads=8, max_tokens=1)
    print(f"\nRSS {m['rss_start_mb']:.1f} -> {m['rss_end_mb']:.1f} MB over {m['requests']} requests "
          f"({m['rss_growth_percent']:+.1f} %, {m['requests_per_s']:.1f} requests/s); series {m['rss_series']}; "
          f"{m['server_stats']}")
    assert m["server_stats"]["requests"] == 1200 and m["server_stats"]["batches"] < 1200  # batched
    assert m["rss_growth_percent"] <= 10.0, m["rss_series"]
