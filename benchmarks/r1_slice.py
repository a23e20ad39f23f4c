"""DeepSeek-R1 slices at R1's real widths through both paths: time, phases and peak memory (prints figures).

    python benchmarks/r1_slice.py --experts 16 64 256 --work /tmp/r1slices          # everything
    python benchmarks/r1_slice.py --experts 16 --only layers --osplus-grid 2          # one part, a shorter search

For each number of routed experts E, a slice of 2 layers (1 dense + 1 MoE) plus the MTP layer is made with
``goldstick make-model --size r1 --set num_hidden_layers=2 --set first_k_dense_replace=1 --set n_routed_experts=E``
(every other width R1's: hidden 7168, 128 heads, dense intermediate 18432, experts of 2048, FP8 128x128 blocks,
vocab 129280), then:

* make-model: wall time and peak RSS of the command;
* layer path (``--only layers``): ``goldstick.quantize`` with the default mixed recipe and calibration
  ``--calib-samples x --calib-seq-len`` (default 16 x 512) in this process, each layer's wall time split into read
  (checkpoint tensors -> float32, wherever it happens), float pass (statistics pass and the float layer on the token
  sample), OS+ search, quantized pass, weight quantization and write (work file), the rest as other; and the peak RSS
  of each layer (VmHWM reset at the start of the layer) and of the whole run (this process; and summed with the
  weight units' worker processes, sampled). ``--osplus-grid N`` replaces the
  recipe's grid of 20 (the search's time is linear in it: per-candidate seconds are printed);
* workers: the weight quantization of the MoE layer's experts (the units ``--workers`` spreads) on 1 and 2 local
  processes, with the bytes compared;
* commands (``--only commands``): ``goldstick quantize deepseek-r1-w8a8-mixed --calib-samples x --calib-seq-len``
  and ``goldstick quantize deepseek-r1-w8a8-dynamic`` as a user types them (default format), each verified:
  wall time, peak RSS of the process tree, the MTP tensors kept;
* streaming path (``--only stream``): ``goldstick quantize`` with deepseek-r1-w8a8-dynamic and deepseek-r1-w8a16
  as commands, against a plain copy of the same files (``cp`` of every file, then ``sync``), with the page cache of
  the source dropped before each (posix_fadvise DONTNEED); peak RSS summed over the process tree, sampled every
  50 ms.

Big slices are deleted after their runs unless ``--keep`` (E=256 is ~36 GB on disk).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
GOLDSTICK = [sys.executable, "-m", "goldstick.cli"]


# ---- measuring ---------------------------------------------------------------------------------------------
class TreeRSS:
    """Peak of the summed RSS of a process and its children, sampled every ``every`` seconds."""

    def __init__(self, pid: int, every: float = 0.05):
        self.proc, self.every, self.peak = psutil.Process(pid), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run(cmd: list[str], log: Path) -> dict:
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        rss = TreeRSS(proc.pid)
        code = proc.wait()
    peak = rss.stop()
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}); see {log}")
    return {"seconds": round(time.time() - started, 1), "peak_rss_gb": round(peak / 1e9, 2)}


def drop_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the layer path, phase by phase --------------------------------------------------------------------------
class Phases:
    """Exclusive wall time per phase (a phase inside another, e.g. a read inside the float pass, is taken out of
    the outer one), per layer."""

    def __init__(self):
        self.layer = -1
        self.times: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.peaks: dict[int, int] = {}
        self.walls: dict[int, float] = {}
        self.stack: list[list] = []  # [phase, started, child time]

    def wrap(self, owner, attr: str, phase: str, source=None) -> None:
        """Time ``owner.attr`` as ``phase`` (the original taken from ``source``, default ``owner``: a function
        another module imported by name)."""
        original = getattr(source or owner, attr)

        def timed(*args, **kwargs):
            self.stack.append([phase, time.perf_counter(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                name, started, inner = self.stack.pop()
                spent = time.perf_counter() - started
                self.times[self.layer][name] += spent - inner
                if self.stack:
                    self.stack[-1][2] += spent
        setattr(owner, attr, timed)

    def start_layer(self, index: int) -> None:
        self.end_layer()
        self.layer, self.started = index, time.perf_counter()
        reset_peak()

    def end_layer(self) -> None:
        if self.layer >= 0 and self.layer not in self.walls:
            self.walls[self.layer] = time.perf_counter() - self.started
            self.peaks[self.layer] = vm_hwm()
            # as each layer ends, so that a run that dies later (disk full, killed) keeps its finished layers
            print(json.dumps({"layer": self.layer, **self.figures(self.layer)}), file=sys.stderr, flush=True)

    def figures(self, index: int) -> dict:
        """Wall time, peak RSS and the exclusive split of a finished layer."""
        wall, times = self.walls[index], self.times[index]
        split = {k: round(v, 1) for k, v in times.items()}
        split["other"] = round(wall - sum(v for k, v in times.items() if k != "other"), 1)
        return {"seconds": round(wall, 1), "peak_rss_gb": round(self.peaks[index] / 1e9, 2), "split": split}


def layer_path(model: Path, out: Path, samples: int, seq_len: int, grid: int | None) -> dict:
    import goldstick
    from goldstick.engine import inputs, layer, pipeline, weight_units
    from goldstick.quant.recipe import load_recipe

    recipe = load_recipe("deepseek-r1-w8a8-mixed")
    if grid is not None:
        recipe = dataclasses.replace(recipe, options=dataclasses.replace(recipe.options, osplus_grid=grid))
    phases = Phases()
    phases.wrap(inputs.LayerTensors, "__getitem__", "read")
    phases.wrap(layer.LayerQuantizer, "observe", "float pass")
    phases.wrap(layer.LayerQuantizer, "_search_osplus", "OS+ search")
    phases.wrap(layer.LayerQuantizer, "measure", "quantized pass")
    phases.wrap(pipeline, "write_safetensors", "write")
    phases.wrap(weight_units, "quantize_stored", "weight quantization")
    original_init = layer.LayerQuantizer.__init__

    def init(self, cfg, index, *args, **kwargs):
        phases.start_layer(index)
        phases.stack.append(["other", time.perf_counter(), 0.0])
        try:
            original_init(self, cfg, index, *args, **kwargs)
        finally:
            name, started, inner = phases.stack.pop()
            phases.times[index][name] += time.perf_counter() - started - inner
    layer.LayerQuantizer.__init__ = init
    # executor.map included (units on processes)
    phases.wrap(layer, "quantize_weights", "weight quantization", source=weight_units)
    started = time.time()
    reset_peak()
    tree = TreeRSS(os.getpid())  # this process and the weight units' worker processes
    goldstick.quantize(model, recipe, out=out, calib_samples=samples, calib_seq_len=seq_len, progress=False)
    phases.end_layer()
    total = time.time() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB
    result = {"seconds": round(total, 1), "peak_rss_gb": round(peak / 1e9, 2),
              "peak_tree_rss_gb": round(tree.stop() / 1e9, 2), "layers": {}}
    for index in phases.walls:
        result["layers"][index] = phases.figures(index)
    result["osplus_grid"] = recipe.options.osplus_grid
    return result


def workers_speedup(model: Path, layer_index: int = 1) -> dict:
    """The MoE layer's weight quantization (every expert and the shared expert) on 1 and on 2 local processes."""
    from goldstick.engine.executors import LocalExecutor
    from goldstick.engine.inputs import LayerTensors
    from goldstick.engine.weight_units import quantize_weights
    from goldstick.io.checkpoint import CheckpointReader

    reader = CheckpointReader(model)
    names = [n for n in reader.layer_tensor_names(layer_index)
             if ".mlp." in n and n.endswith("proj.weight") and ".gate." not in n]
    source = LayerTensors(reader, layer_index)
    out = {"tensors": len(names), "parameters_g": round(sum(int(np.prod(reader.shape(n))) for n in names) / 1e9, 2)}
    results = {}
    for label, workers in (("1 worker (in process)", 0), ("2 workers", 2)):
        with LocalExecutor(max(1, workers)) as ex:
            if workers:
                list(ex.map(len, [[0]] * 2))  # start the pool outside the timing
            started = time.perf_counter()
            results[label] = quantize_weights(names, source, None, ex if workers else None, "absmax127")
            out[label] = round(time.perf_counter() - started, 1)
    a, b = results.values()
    out["identical"] = all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    return out


def stream_path(model: Path, work: Path) -> dict:
    out: dict = {"source_gb": round(folder_bytes(model) / 1e9, 2)}
    runs = [("copy", work / "copy", lambda o: ["sh", "-c", f"mkdir -p {o} && cp {model}/* {o}/ && sync"])]
    for recipe in ("deepseek-r1-w8a8-dynamic", "deepseek-r1-w8a16"):
        runs.append((recipe, work / recipe, lambda o, r=recipe: [*GOLDSTICK, "quantize", r, "--model", str(model),
                                                                 "--out", str(o), "--no-progress"]))
    for label, folder, cmd in runs:
        shutil.rmtree(folder, ignore_errors=True)
        drop_cache(model)
        figures = run(cmd(folder), work / f"{label}.log")
        figures["gb_per_s"] = round(out["source_gb"] / figures["seconds"], 3)
        if label != "copy":
            figures["vs_copy"] = round(out["copy"]["seconds"] / figures["seconds"], 2)
            verify = subprocess.run([*GOLDSTICK, "verify", str(folder), "--no-hash"], capture_output=True, text=True)
            figures["verify"] = (verify.stdout or verify.stderr).strip().splitlines()[-1]
        out[label] = figures
        shutil.rmtree(folder, ignore_errors=True)
    return out


def commands(model: Path, work: Path, samples: int, seq_len: int) -> dict:
    """The commands a user types on the slice: ``goldstick quantize`` with the default mixed recipe (calibrated: the
    layer path) and with deepseek-r1-w8a8-dynamic (streamed), default format, each then ``goldstick verify``-ed;
    whole command, peak RSS of the process tree, and the MTP tensors the output carries."""
    out = {}
    for recipe, extra in (("deepseek-r1-w8a8-mixed", ["--calib-samples", str(samples), "--calib-seq-len",
                                                      str(seq_len)]),
                          ("deepseek-r1-w8a8-dynamic", [])):
        folder = work / recipe
        shutil.rmtree(folder, ignore_errors=True)
        figures = run([*GOLDSTICK, "quantize", recipe, "--model", str(model), "--out", str(folder), *extra],
                      work / f"{recipe}.log")
        verify = subprocess.run([*GOLDSTICK, "verify", str(folder)], capture_output=True, text=True)
        figures["verify"] = f"exit {verify.returncode}: " + (verify.stdout or verify.stderr).strip().splitlines()[-1]
        config = json.loads((folder / "config.json").read_text())
        mtp = f"model.layers.{config['num_hidden_layers']}."
        names = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        figures["format"] = config.get("quantization_config", {}).get("quant_method")
        figures["mtp_tensors"] = sum(n.startswith(mtp) for n in names)
        out[recipe] = figures
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--work", type=Path, default=Path("/tmp/r1slices"))
    ap.add_argument("--only", choices=("make", "layers", "workers", "stream", "commands"), nargs="+",
                    default=["make", "layers", "workers", "stream", "commands"])
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--osplus-grid", type=int, default=None, help="replace the recipe's OS+ grid (20)")
    ap.add_argument("--mtp", type=int, default=1, help="num_nextn_predict_layers of the slices (0: no MTP layer, "
                    "for disk space: the MTP layer is a second MoE layer)")
    ap.add_argument("--keep", action="store_true", help="keep the slices")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    figures = {}
    for experts in args.experts:
        work = args.work / f"e{experts}"
        work.mkdir(parents=True, exist_ok=True)
        model = work / "model"
        row: dict = {}
        if not (model / "config.json").exists():
            row["make-model"] = run([*GOLDSTICK, "make-model", "--size", "r1", "--out", str(model), "--overwrite",
                                     "--set", "num_hidden_layers=2", "--set", "first_k_dense_replace=1", "--set",
                                     f"n_routed_experts={experts}", "--set", f"num_nextn_predict_layers={args.mtp}"],
                                    work / "make-model.log")
            row["make-model"]["gb"] = round(folder_bytes(model) / 1e9, 2)
        if "layers" in args.only:
            out = work / "mixed"
            shutil.rmtree(out, ignore_errors=True)
            row["layer path"] = layer_path(model, out, args.calib_samples, args.calib_seq_len, args.osplus_grid)
            shutil.rmtree(out, ignore_errors=True)
        if "workers" in args.only:
            row["workers"] = workers_speedup(model)
        if "stream" in args.only:
            row["stream path"] = stream_path(model, work)
        if "commands" in args.only:
            row["commands"] = commands(model, work, args.calib_samples, args.calib_seq_len)
        figures[experts] = row
        print(json.dumps({experts: row}, indent=1), flush=True)
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
