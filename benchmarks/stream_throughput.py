"""Data-free path at disk speed: `goldstick quantize` (streaming) against a plain copy of the same files.

For each model size: build an R1-width FP8 checkpoint with `goldstick make-model` (hidden 7168, moe_intermediate
2048, R1's MLA dimensions, a few experts and layers, several shards), then alternate, ``--rounds`` times:

    copy       the checkpoint's files to a new folder on the same disk (shutil.copyfile + fsync per file)
    quantize   `goldstick quantize RECIPE --model SRC --out OUT` as a whole process (w8a16 and w8a8-dynamic)

Before every run the previous output is deleted, everything is synced, and the source files are evicted from the
page cache (posix_fadvise DONTNEED, checked with the kernel's mincore count), so every run reads from the disk.
Throughput is source bytes / wall time of the whole process (python start-up and imports included for goldstick;
the copy runs in a fresh python process too). Peak RSS is sampled every 20 ms from /proc over the process tree
(goldstick's driver plus its worker processes): the peak of the sum, and the largest single process.

    python benchmarks/stream_throughput.py [--sizes small,large] [--rounds 2] [--workdir DIR] [--models DIR]

Disk use: both sources + one output (~6 GB); the outputs are always deleted, the models too unless ``--models DIR``
names a folder to keep (and reuse: a model whose make_model.json has the same overrides is not made again).
Linux only (/proc, posix_fadvise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# R1's MLA and expert dimensions; depth, expert count and head count cut down to fit a laptop disk
R1_WIDTH = {"hidden_size": 7168, "moe_intermediate_size": 2048, "intermediate_size": 4096, "q_lora_rank": 1536,
            "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
            "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts_per_tok": 4}
SIZES = {
    "small": {"num_hidden_layers": 3, "n_routed_experts": 4, "n_group": 2, "topk_group": 2},  # ~1.3 GB, 3 shards
    "large": {"num_hidden_layers": 4, "n_routed_experts": 8},    # ~2.3 GB in 5 shards
}
RECIPES = ("deepseek-r1-w8a16", "deepseek-r1-w8a8-dynamic")
SHARD_MB = 500


# ---- measurement helpers ---------------------------------------------------------------------------------------
def tree_rss(pid: int) -> tuple[int, int]:
    """(sum, max) of VmRSS in bytes over pid and its descendants."""
    total, largest, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                rss = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        total += rss
        largest = max(largest, rss)
    return total, largest


def run_measured(cmd: list[str]) -> dict:
    """Run cmd; wall time and peak RSS (sum over the tree, largest process), sampled every 20 ms."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"sum": 0, "max": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            total, largest = tree_rss(proc.pid)
            peak["sum"], peak["max"] = max(peak["sum"], total), max(peak["max"], largest)
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}")
    return {"seconds": seconds, "rss_sum": peak["sum"], "rss_max": peak["max"], "output": output}


def resident_bytes(files: list[Path]) -> int:
    """Bytes of ``files`` in the page cache (mincore through /usr/bin/fincore when present, else -1)."""
    if not shutil.which("fincore"):
        return -1
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          *map(str, files)], capture_output=True, text=True)
    return sum(int(x) for x in out.stdout.split()) if out.returncode == 0 else -1


def evict(files: list[Path]) -> int:
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_bytes(files)


COPY_SCRIPT = """
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
for name in sorted(os.listdir(src)):
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    fd = os.open(os.path.join(dst, name), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""


# ---- the benchmark ---------------------------------------------------------------------------------------------
def make(size: str, root: Path) -> Path:
    src = root / f"r1width-{size}"
    overrides = {**R1_WIDTH, **SIZES[size]}
    info = src / "make_model.json"
    if info.exists() and json.loads(info.read_text()).get("overrides") == overrides:
        print(f"reusing {src}", flush=True)
        return src
    shutil.rmtree(src, ignore_errors=True)
    sets = [f"--set={k}={v}" for k, v in overrides.items()]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "goldstick.cli", "make-model", "--out", str(src), "--size", "wide",
                    "--fp8", "--shard-size", str(SHARD_MB), *sets], check=True, stdout=subprocess.DEVNULL)
    print(f"made {src.name} in {time.perf_counter() - started:.0f}s", flush=True)
    return src


def bench(size: str, root: Path, models: Path, rounds: int, executors: list[str]) -> list[dict]:
    src = make(size, models)
    tensors = sorted(src.glob("*.safetensors"))
    source_bytes = sum(p.stat().st_size for p in tensors)
    everything = sorted(p for p in src.iterdir() if p.is_file())
    print(f"{size}: {source_bytes / 1e9:.2f} GB of safetensors in {len(tensors)} shards", flush=True)
    rows = []
    variants = {r if len(executors) == 1 else f"{r} ({e})": (r, e) for r in RECIPES for e in executors}
    for r in range(rounds):
        for what in ("copy",) + tuple(variants):
            out = root / "out"
            shutil.rmtree(out, ignore_errors=True)
            cached = evict(everything)
            if what == "copy":
                cmd = [sys.executable, "-c", COPY_SCRIPT, str(src), str(out)]
            else:
                recipe, executor = variants[what]
                cmd = [sys.executable, "-m", "goldstick.cli", "quantize", recipe, "--model", str(src), "--out",
                       str(out), "--no-progress", "--max-shard-size", str(SHARD_MB), "--executor", executor]
            load = os.getloadavg()[0]
            m = run_measured(cmd)
            out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            row = {"size": size, "round": r, "what": what, "source_bytes": source_bytes, "out_bytes": out_bytes,
                   "cached_before": cached, "load": load, **{k: v for k, v in m.items() if k != "output"}}
            row["mb_s"] = source_bytes / 1e6 / m["seconds"]
            rows.append(row)
            print(f"  round {r} {what:26s} {m['seconds']:6.1f}s {row['mb_s']:7.0f} MB/s  peak RSS sum "
                  f"{m['rss_sum'] / 2**20:6.0f} MiB (largest process {m['rss_max'] / 2**20:5.0f} MiB)  "
                  f"page-cached before: {cached / 2**20:.0f} MiB  load avg {load:.1f}", flush=True)
            if what != "copy" and "streaming path" not in m["output"]:
                raise SystemExit(f"{what} did not take the streaming path:\n{m['output']}")
    shutil.rmtree(root / "out", ignore_errors=True)
    return rows


def summarize(rows: list[dict]) -> None:
    print("\n| model | source | run | MB/s (per round) | x copy (same round) | peak RSS sum / largest process |")
    print("|---|---|---|---|---|---|")
    for size in dict.fromkeys(r["size"] for r in rows):
        mine = [r for r in rows if r["size"] == size]
        copy = {r["round"]: r["mb_s"] for r in mine if r["what"] == "copy"}
        for what in dict.fromkeys(r["what"] for r in mine):
            runs = [r for r in mine if r["what"] == what]
            speeds = ", ".join(f"{r['mb_s']:.0f}" for r in runs)
            ratios = ", ".join(f"{r['mb_s'] / copy[r['round']]:.2f}" for r in runs)
            rss = max(r["rss_sum"] for r in runs) / 2**20, max(r["rss_max"] for r in runs) / 2**20
            print(f"| {size} | {runs[0]['source_bytes'] / 1e9:.2f} GB | {what} | {speeds} | "
                  f"{ratios if what != 'copy' else '1'} | {rss[0]:.0f} / {rss[1]:.0f} MiB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="folder on the disk to measure (default: a temporary folder)")
    ap.add_argument("--models", default=None, help="keep the made models in this folder (and reuse them)")
    ap.add_argument("--executors", default="local",
                    help="comma-separated goldstick --executor values to run each recipe with (local, threads)")
    args = ap.parse_args()
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="goldstick-stream-bench-", dir=args.workdir))
    models = Path(args.models) if args.models else root
    models.mkdir(parents=True, exist_ok=True)
    print(f"work folder {root}, models in {models} ({os.cpu_count()} CPUs); page cache evicted before every run",
          flush=True)
    rows = []
    try:
        for size in args.sizes.split(","):
            rows += bench(size, root, models, args.rounds, args.executors.split(","))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summarize(rows)


if __name__ == "__main__":
    main()
