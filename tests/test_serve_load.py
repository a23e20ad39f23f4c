"""`goldstick serve` under concurrent load, over real HTTP on loopback.

The embedded model is quantized (deepseek-r1-w8a8-dynamic) and served by `goldstick serve` in a subprocess.
benchmarks/serve_load.py asks each of 16 distinct requests (greedy and seeded sampling, prompts of varied lengths)
alone, then sends 96 requests from 4 client threads: those requests again, shuffled, mixed with malformed JSON,
wrong types, NaN, binary bodies, oversize bodies and an unknown model. Every completion must equal its
single-request answer (nothing lost or mixed up), every malformed request must get its 4xx with an OpenAI-style
error body, no 5xx, and the server must be healthy and alive at the end. Throughput, latency and the server's RSS
are printed (the figures are measured, not asserted: the machine is shared).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_load import load_test, quantized_default  # noqa: E402


@pytest.mark.slow
def test_concurrent_clients_get_their_own_answers_and_bad_requests_get_4xx(tmp_path):
    model = quantized_default(tmp_path / "quantized")
    r = load_test(model, tmp_path, requests_total=96, threads=4, distinct=16, max_tokens=2, bad_fraction=1 / 3,
                  seed=7)
    print(f"\n{r['requests']} requests ({r['valid']} completions, {r['malformed']} malformed), {r['threads']} "
          f"threads, {r['seconds']:.1f}s: {r['requests_per_s']:.1f} requests/s; completion latency p50 "
          f"{r['latency_p50_s'] * 1000:.0f} ms, p95 {r['latency_p95_s'] * 1000:.0f} ms; server RSS "
          f"{r['rss_start_mb']:.1f} -> {r['rss_end_mb']:.1f} MB; series {r['rss_series']}")
    problems = r["problems"]
    for kind in ("lost", "5xx", "mismatch", "bad-status"):
        assert not problems[kind], (kind, problems[kind][:3], r["log"][-3000:])
    assert problems["duplicate-ids"] == 0
    # the answers (text and token counts) are distinguishable, so a mix-up would have shown as a mismatch
    assert r["distinct_answers"] >= 0.75 * r["distinct_requests"]
    assert r["valid"] == 64 and r["malformed"] == 32
    assert r["health"] == (200, {"status": "ok"}) and r["alive"]
