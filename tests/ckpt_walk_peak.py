"""Walk every layer of a checkpoint and print, as JSON, how much the walk raised the peak RSS of this process.

Run by tests/test_checkpoint.py in a fresh interpreter: ``python tests/ckpt_walk_peak.py CHECKPOINT_DIR``.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_kib() -> int:
    # VmHWM, not ru_maxrss: on Linux ru_maxrss of a child also counts the parent's RSS at fork (exec keeps the
    # maximum), so under pytest it reports the test runner's size; VmHWM is this process's own high-water mark.
    return status_kib("VmHWM")


def reset_peak_rss() -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0), so the peak below belongs to the walk alone rather
    # than to the imports and the header validation
    Path("/proc/self/clear_refs").write_text("5")


def main(path: str) -> None:
    from goldstick.io.checkpoint import CheckpointReader

    reader = CheckpointReader(path)
    reset_peak_rss()
    before_kib = status_kib("VmRSS")
    largest_layer = 0
    for _, tensors in reader.iter_layers(progress=False):
        largest_layer = max(largest_layer, sum(t.nbytes for t in tensors.values()))
        del tensors  # hold one layer at a time, as a quantization pass would
    peak_kib = peak_rss_kib()
    print(json.dumps({"layers": reader.config.num_hidden_layers, "before_kib": before_kib, "peak_kib": peak_kib,
                      "growth_kib": peak_kib - before_kib, "largest_layer_f32_bytes": largest_layer,
                      "after_kib": status_kib("VmRSS"),
                      "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1])
