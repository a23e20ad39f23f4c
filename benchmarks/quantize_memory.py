"""Peak memory of `goldstick quantize` against the number of decoder layers.

Builds the embedded tiny model (4 layers) and a copy with twice the decoder layers (MoE layers repeated), quantizes
each in a fresh process and prints the peak resident memory of the quantize call itself (VmHWM after resetting it
with /proc/self/clear_refs once everything is imported). Layer-wise calibration keeps one decoder layer plus the
calibration activations in memory, and the writer holds at most one shard, so the peak must not grow with depth.

    python benchmarks/quantize_memory.py [--recipe deepseek-r1-w8a8-mixed] [--samples 16] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
import goldstick.engine.pipeline as q
from goldstick.model.runtime import setup_mindspore
setup_mindspore()
def vm(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = vm("VmRSS")
Path("/proc/self/clear_refs").write_text("5")   # reset the high-water mark
started = time.time()
q.quantize(sys.argv[1], sys.argv[2], out=sys.argv[3], calib_samples=int(sys.argv[4]), calib_seq_len=int(sys.argv[5]),
           progress=False, max_shard_bytes=int(sys.argv[6]))
print(json.dumps({"rss_before": before, "peak": vm("VmHWM"), "seconds": time.time() - started}))
"""


def doubled_model(src: Path, dst: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_quantize import copy_checkpoint  # the same copier the tests use

    from goldstick.model.config import ModelConfig

    n = ModelConfig.from_file(src).num_hidden_layers
    dense = ModelConfig.from_file(src).first_k_dense_replace
    moe_layers = list(range(dense, n))
    layer_map = {i: i for i in range(n)}
    layer_map.update({n + k: moe_layers[k % len(moe_layers)] for k in range(n)})
    return copy_checkpoint(src, dst, layer_map=layer_map)


def measure(model: Path, recipe: str, samples: int, seq_len: int, shard_bytes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, str(model), recipe, str(Path(tmp) / "q"), str(samples),
                              str(seq_len), str(shard_bytes)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="deepseek-r1-w8a8-mixed")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shard-mb", type=float, default=4.0, help="output shard cap (the writer holds one shard)")
    args = parser.parse_args(argv)
    from goldstick.model.config import ModelConfig
    from goldstick.testing.make_model import default_model_path

    base = default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        deep = doubled_model(base, Path(tmp) / "deep")
        rows = {}
        for label, model in (("1x", base), ("2x", deep)):
            layers = ModelConfig.from_file(model).num_hidden_layers
            rows[label] = dict(layers=layers, **measure(model, args.recipe, args.samples, args.seq_len,
                                                        int(args.shard_mb * 1e6)))
    mb = 1 / 2 ** 20
    print(f"recipe {args.recipe}, calibration {args.samples} x {args.seq_len} tokens, shard cap {args.shard_mb} MB")
    print(f"{'model':6} {'layers':>6} {'RSS before':>11} {'peak':>9} {'growth':>9} {'seconds':>8}")
    for label, r in rows.items():
        print(f"{label:6} {r['layers']:>6} {r['rss_before'] * mb:>9.0f}MB {r['peak'] * mb:>7.0f}MB "
              f"{(r['peak'] - r['rss_before']) * mb:>7.0f}MB {r['seconds']:>8.1f}")
    ratio = (rows["2x"]["peak"] - rows["2x"]["rss_before"]) / max(1, rows["1x"]["peak"] - rows["1x"]["rss_before"])
    print(f"growth ratio 2x/1x: {ratio:.2f}")
    return rows


if __name__ == "__main__":
    main()
