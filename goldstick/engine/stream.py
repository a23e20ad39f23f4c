"""The data-free path: recipes that need no calibration, streamed from the source checkpoint to the output.

A recipe whose every linear is ``float``, ``w8a16`` or ``w8a8-dynamic`` without smoothing needs no activation
statistics: each output tensor is a function of one source tensor. So instead of running the network layer by layer
(goldstick.engine.pipeline), this path

    plans      every output tensor (name, dtype, shape, label) in the order the engine writes them, and the shards
               exactly as the engine's writer cuts them (``PlannedShardWriter``: headers written, files reserved)
    splits     every source tensor into units of rows (whole 128-row FP8 blocks, ~4M elements each)
    runs       the units on an Executor (local processes by default, or Ray): each reads its rows (pread), turns
               FP8 codes straight into int8 rows (or bf16 for a float tensor) with goldstick.quant.kernels' fused numba
               kernels (the values ``numerics.quantize_weight`` computes on the decoded float32 weight, without ever
               making that weight; the numpy code when numba is missing), and writes its bytes in place (pwrite)
               into the shard files, asking the kernel to write them back at once (posix_fadvise DONTNEED); the
               driver asks the kernel to read ahead the units queued next (WILLNEED) while workers compute, and
               hashes each shard for the manifest as soon as its last unit is done, so reads, compute, writes and
               hashing overlap
    finishes   fsync, rename shards, index, config.json + the layout's description file, tokenizer files, recipe,
               report, manifest last

With the fused kernels a run is bound by pread/pwrite, hashing and process start-up rather than arithmetic
(benchmarks/README.md has the figures against a plain copy, with the command).

Memory is bounded by the units in flight (2 per worker, ~4M elements each), whatever the model or shard size. The
output is the layer path's checkpoint bit for bit in the layouts it writes (``STREAM_FORMATS``: the ascend targets,
whose scales are the engine's bf16 scales stored as float32 [out, 1], and mindspore; tests/test_stream.py), MTP
passed through.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from goldstick.engine.executors import Executor, get_executor
from goldstick.engine.report import render_streamed_report_md, write_checkpoint_metadata
from goldstick.engine.result import QuantizeError, QuantizeResult
from goldstick.errors import GoldstickError
from goldstick.io.checkpoint import SCALE_SUFFIX, CheckpointError, CheckpointReader, nonfinite_problem
from goldstick.io.export import CheckpointWriter, check_plan, default_format, write_text_atomic
from goldstick.io.layouts import ASCEND, MINDSPORE, VLLM_ASCEND
from goldstick.io.rundir import WORK_DIR, remove_temporaries, write_manifest
from goldstick.io.writer import PlannedShardWriter, pwrite_array, write_json_atomic
from goldstick.model.architecture import ROUTER
from goldstick.model.config import ModelConfig
from goldstick.model.names import summarize_names
from goldstick.quant.fp8 import BLOCK, FP8, FP8_TO_F32, dequantize_fp8_blocks
from goldstick.quant.numerics import STORED_DTYPES, quantize_weight
from goldstick.quant.plan import Plan
from goldstick.quant.recipe import Recipe, load_recipe
from goldstick.quant.schemes import DATA_FREE, SCHEMES
from goldstick.testing.make_model import default_model_path

BF16 = ml_dtypes.bfloat16
UNIT_ELEMENTS = 1 << 22  # ~4M elements per unit: 16 MB as float32, a few ms to a few tens of ms of work
READ_AHEAD = 256 << 20  # source bytes the driver asks the kernel to read ahead of the units handed out
# data-free quantized schemes -> their description labels (the weight-only and dynamic linears streamed here)
LABELS = {name: SCHEMES[name].label for name in DATA_FREE if SCHEMES[name].quantized}
GLOBALS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")  # as the engine writes them
STREAM_FORMATS = (ASCEND, VLLM_ASCEND, MINDSPORE)  # golden-stick permutes RoPE rows: the layer path writes it


class StreamError(GoldstickError, RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ which path
def calibration_needed(plan: Plan) -> list[str]:
    """The linears whose scheme needs calibration data (static activations or smoothing); empty = data-free."""
    return [e.name for e in plan.entries
            if e.scheme.name not in DATA_FREE or e.scheme.outlier_suppression != "none"]


def choose_path(cfg, recipe: Recipe, path: str = "auto", export_format: str = ASCEND) -> tuple[str, str]:
    """("stream" | "layers", why). ``path``: auto (stream when the recipe needs no calibration), stream, layers."""
    if path not in ("auto", "stream", "layers"):
        raise StreamError(f"unknown quantization path {path!r}; choose auto, stream or layers")
    if path == "layers":
        return "layers", "layer path asked for"
    needing = calibration_needed(recipe.plan(cfg))
    if needing:
        why = f"the recipe calibrates {summarize_names(needing)}"
        if path == "stream":
            raise StreamError(f"the streaming path is for data-free recipes only: {why}")
        return "layers", why
    if export_format not in STREAM_FORMATS:
        if path == "stream":
            raise StreamError(f"the streaming path writes the {', '.join(STREAM_FORMATS)} formats; for "
                              f"{export_format} use the layer path (or stream, then `goldstick export`)")
        return "layers", f"the streaming path does not write the {export_format} format"
    return "stream", "the recipe needs no calibration (every linear float, w8a16 or w8a8-dynamic without smoothing)"


def route(model, recipe: Recipe, path: str, export_format: str, calibration_given: bool,
          stop_after_layer: int | None, out, resume: bool) -> tuple[str, str]:
    """What ``engine.quantize`` runs: ("stream" | "layers", why).

    ``auto`` streams a data-free recipe unless the caller asked for what only the layer path does: calibration data
    passed explicitly (the layer path measures each layer's error on it and records it in the report),
    ``stop_after_layer``, or resuming an interrupted layer run.
    """
    if path not in ("auto", "stream", "layers"):
        raise StreamError(f"unknown quantization path {path!r}; choose auto, stream or layers")
    if path == "layers":
        return "layers", "layer path asked for"
    cfg = ModelConfig.from_file(model)
    chosen, why = choose_path(cfg, recipe, path, export_format)
    if path == "stream" or chosen == "layers":
        return chosen, why
    if calibration_given:
        return "layers", "calibration data given: the layer path measures the per-layer error on it"
    if stop_after_layer is not None:
        return "layers", "stop_after_layer is a layer-path option"
    if resume and out is not None and (Path(out) / WORK_DIR / "state.json").exists():
        return "layers", "resuming an interrupted layer run"
    return chosen, why


# ------------------------------------------------------------------------------------------------ work units
@dataclass(frozen=True)
class Span:
    """A stored tensor: file, safetensors dtype, shape and absolute byte offset of its data."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int


@dataclass(frozen=True)
class Unit:
    """Rows [r0, r1) of one source tensor -> its output tensors' rows, written in place.

    kind ``cast``: one output ``(path, offset, dtype)``; kind ``quant``: weight int8, weight_scale (bf16 [out], or
    float32 [out, 1] in the ascend layouts), weight_offset (zeros: int32 or float32), each ``(path, offset, bytes
    per row)`` of row 0 of that output tensor.
    """

    name: str
    kind: str
    source: Span
    scale: Span | None
    r0: int
    r1: int
    outputs: tuple
    mode: str = "absmax127"
    check_finite: bool = True  # the engine refuses non-finite weights (but for the MTP float32 router bias)

    @property
    def input_bytes(self) -> int:
        row = int(np.prod(self.source.shape[1:], dtype=np.int64)) * STORED_DTYPES[self.source.dtype].itemsize
        return (self.r1 - self.r0) * row


def _pread(path: str, offset: int, nbytes: int, name: str) -> np.ndarray:
    buf = np.empty(nbytes, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        view, done = memoryview(buf), 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise StreamError(f"{path}: tensor '{name}' ends early (file truncated while quantizing?)")
            done += got
    finally:
        os.close(fd)
    return buf


def _pwrite(path: str, offset: int, array: np.ndarray) -> None:
    pwrite_array(path, offset, array, write_back=True)  # the disk writes while the workers compute


def _read_rows(span: Span, r0: int, r1: int, name: str) -> np.ndarray:
    dtype = STORED_DTYPES[span.dtype]
    row_elems = int(np.prod(span.shape[1:], dtype=np.int64))
    raw = _pread(span.file, span.start + r0 * row_elems * dtype.itemsize, (r1 - r0) * row_elems * dtype.itemsize,
                 name)
    return raw.view(dtype).reshape((r1 - r0,) + tuple(span.shape[1:]))


def decode_fp8(stored: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """``fp8.dequantize_fp8_blocks`` (same float32 products), with one broadcast multiply over a [bands, 128,
    blocks, 128] view instead of a loop over bands when the rows and columns are whole blocks (R1's always are)."""
    rows, cols = stored.shape
    if rows % BLOCK or cols % BLOCK or scale_inv.shape != (rows // BLOCK, cols // BLOCK):
        return dequantize_fp8_blocks(stored.view(FP8), scale_inv)
    values = FP8_TO_F32[stored.view(np.uint8)]
    values.reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)[...] *= scale_inv[:, None, :, None]
    return values


def _check_finite(unit: Unit, values: np.ndarray) -> None:
    """Refuse NaN/Inf as the layer path does: its CheckpointError, counted over the whole tensor (read again, only on
    this error path)."""
    if np.isfinite(values).all():
        return
    path = Path(unit.source.file)
    with CheckpointReader(path.parent) as reader:
        problem = nonfinite_problem(path.name, unit.name, reader.read(unit.name))
    raise CheckpointError(f"{problem}; goldstick refuses to quantize a checkpoint with non-finite weights")


def run_unit(unit: Unit) -> tuple[int, tuple]:
    """Do one unit; returns the input bytes it read and the ``(shard path, bytes)`` it wrote. The values are the
    engine's (same functions, same order)."""
    stored = _read_rows(unit.source, unit.r0, unit.r1, unit.name)
    scale = None
    if unit.source.dtype == "F8_E4M3":
        g0, g1 = unit.r0 // BLOCK, -(-unit.r1 // BLOCK)
        scale = _read_rows(unit.scale, g0, g1, unit.name + SCALE_SUFFIX).astype(np.float32)
    if unit.kind == "cast":
        path, offset, dtype = unit.outputs[0]
        row = int(np.prod(unit.source.shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        values = _cast(unit, stored, scale, np.dtype(dtype))
        _pwrite(path, offset + unit.r0 * row, values)
        return unit.input_bytes, ((path, values.nbytes),)
    q, scale = _quantize(unit, stored, scale)
    (wp, wo, _), (sp, so, scale_bytes), (op, oo, offset_bytes) = unit.outputs
    _pwrite(wp, wo + unit.r0 * q.shape[1], q)
    stored_scale = scale.astype(BF16)  # the engine's scales; the ascend layouts store them as float32
    if scale_bytes == 4:
        stored_scale = stored_scale.astype(np.float32)
    _pwrite(sp, so + unit.r0 * scale_bytes, stored_scale)
    zeros = np.zeros((unit.r1 - unit.r0) * offset_bytes, np.uint8)  # int32 and float32 zeros: the same bytes
    _pwrite(op, oo + unit.r0 * offset_bytes, zeros)
    return unit.input_bytes, ((wp, q.nbytes), (sp, stored_scale.nbytes), (op, zeros.nbytes))


def _values(unit: Unit, stored: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """The float32 values the engine computes with (as CheckpointReader.read)."""
    return decode_fp8(stored, scale) if scale is not None else stored.astype(np.float32)


def _cast(unit: Unit, stored: np.ndarray, scale: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
    """A float output's rows: the engine's float32 values cast to ``dtype``, refused if not finite."""
    from goldstick.quant import kernels  # imported by the workers only: the driver process needs no numba

    if scale is not None and dtype == BF16 and unit.check_finite:
        fused = kernels.fp8_to_bf16(stored, scale)  # None: no numba, or a non-finite value to report below
        if fused is not None:
            return fused
    if stored.dtype == dtype and unit.source.dtype in ("BF16", "F32"):
        values = stored  # the engine's float32 round trip of a bf16/f32 value gives the value back
    else:
        values = _values(unit, stored, scale)
    if unit.check_finite and not kernels.all_finite(values):
        _check_finite(unit, values)
    return values.astype(dtype, copy=False)


def _quantize(unit: Unit, stored: np.ndarray, scale: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``numerics.quantize_weight`` of the unit's values: (int8 rows, float32 row scales)."""
    from goldstick.quant import kernels

    if scale is not None:
        fused = kernels.quantize_fp8(stored, scale, unit.mode)  # FP8 codes straight to int8, or None as in _cast
        if fused is not None:
            return fused
    values = _values(unit, stored, scale)
    try:
        # refuses NaN/Inf (a row's absmax is not finite)
        return quantize_weight(values, unit.mode, rows=kernels.quantize_rows)
    except ValueError:
        _check_finite(unit, values)
        raise


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class OutputTensor:
    name: str  # a float tensor's name, or a quantized linear's name
    label: str  # FLOAT | W8A16 | W8A8_DYNAMIC
    source: str  # the source tensor
    dtype: object = None  # storage dtype of a float tensor
    mtp: bool = False


def _placeholder(dtype, shape) -> np.ndarray:
    return np.broadcast_to(np.zeros((), dtype), tuple(shape))  # dtype and shape, no memory


def output_tensors(reader: CheckpointReader, plan: Plan) -> list[OutputTensor]:
    """Every output tensor in the engine's writing order: globals, each layer's float tensors (sorted names) then
    its quantized linears (in order of first appearance), then the MTP tensors as stored."""
    cfg = reader.config
    outs = [OutputTensor(n, "FLOAT", n, BF16) for n in GLOBALS]
    scheme = {e.name: e.scheme.name for e in plan.entries}
    for layer in range(cfg.num_hidden_layers):
        floats, linears, names = [], [], []
        for name in reader.layer_tensor_names(layer):
            owner = name[: -len(".weight")] if name.endswith(".weight") else None
            if owner is not None and scheme.get(owner) in LABELS and not owner.endswith("." + ROUTER):
                names += [f"{owner}.weight", f"{owner}.weight_offset", f"{owner}.weight_scale"]
            else:
                names.append(name)
        seen = set()
        for name in sorted(names):
            owner, _, local = name.rpartition(".")
            if owner in scheme and scheme[owner] in LABELS and not owner.endswith("." + ROUTER) and local.startswith(
                    "weight"):
                if owner not in seen:
                    seen.add(owner)
                    linears.append(OutputTensor(owner, LABELS[scheme[owner]], f"{owner}.weight"))
            else:
                keep_f32 = name.endswith("e_score_correction_bias")
                floats.append(OutputTensor(name, "FLOAT", name, np.float32 if keep_f32 else BF16))
        outs += floats + linears
    for name in reader.mtp_tensor_names():
        keep_f32 = name.endswith("e_score_correction_bias") and reader.dtype(name) == "F32"
        outs.append(OutputTensor(name, "FLOAT", name, np.float32 if keep_f32 else BF16, mtp=True))
    return outs


def _span(reader: CheckpointReader, name: str) -> Span:
    info = reader._info(name)
    return Span(str(reader.path / info.file), info.dtype, info.shape, info.start)


def iter_units(reader: CheckpointReader, outs: list[OutputTensor], writer, mode: str):
    """The units of every output tensor, made as they are consumed (R1 has ~170k: no list of them is kept)."""
    for o in outs:
        src = _span(reader, o.source)
        scale = _span(reader, o.source + SCALE_SUFFIX) if src.dtype == "F8_E4M3" else None
        rows = src.shape[0] if src.shape else 1
        if len(src.shape) < 2:
            step = max(rows, 1)
        else:
            cols = int(np.prod(src.shape[1:], dtype=np.int64))
            step = max(1, UNIT_ELEMENTS // max(cols, 1))
            if scale is not None:
                step = max(BLOCK, step // BLOCK * BLOCK)  # whole FP8 blocks
        if o.label == "FLOAT":
            path, offset, _ = writer.location(o.name)
            outputs = ((str(path), offset, np.dtype(o.dtype).name),)
            kind = "cast"
        else:
            outputs = tuple((str(p), off, nbytes // max(rows, 1)) for p, off, nbytes in
                            (writer.location(f"{o.name}.{k}") for k in ("weight", "weight_scale", "weight_offset")))
            kind = "quant"
        for r0 in range(0, max(rows, 1), step):
            yield Unit(o.name if kind == "cast" else o.source, kind, src, scale, r0, min(rows, r0 + step), outputs,
                       mode, check_finite=not (o.mtp and np.dtype(o.dtype) == np.float32))


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class StreamStats:
    executor: str
    input_bytes: int
    output_bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


def stream_quantize(model, recipe, out, executor=None, workers: int | None = None, progress: bool = True,
                    max_shard_bytes: int = 4 << 30, resume: bool = False, ray_address: str | None = None,
                    export_format: str | None = None):
    """Quantize with a data-free recipe by streaming (see the module docstring); returns a QuantizeResult.
    ``export_format``: one of ``STREAM_FORMATS`` (None: ``export.default_format``)."""
    started = time.time()
    if model is None:
        model = default_model_path()
    reader = CheckpointReader(model)
    cfg = reader.config
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    plan = recipe.plan(cfg)
    export_format = export_format or default_format(cfg, plan)
    choose_path(cfg, recipe, "stream", export_format)
    check_plan(cfg, plan, export_format)
    if out is None:
        raise QuantizeError("quantize needs an output folder (out=...)")
    if max_shard_bytes <= 0:
        raise QuantizeError(f"the shard size cap must be positive, got {max_shard_bytes} bytes")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise QuantizeError(f"{out} is not empty; choose a new folder (or --resume an interrupted run there)")
        if (out / "manifest.json").exists():
            raise QuantizeError(f"{out} holds a finished run (manifest.json): nothing to resume")
        # a streamed run keeps no partial state worth resuming (it costs one read of the source): remove what
        # it left (hidden temporary shards and metadata temporaries) and start again
        remove_temporaries(out)
    out.mkdir(parents=True, exist_ok=True)

    outs = output_tensors(reader, plan)
    shards = PlannedShardWriter(out, max_shard_bytes=max_shard_bytes, overwrite=True)
    writer = CheckpointWriter(out, export_format, cfg, max_shard_bytes, shards=shards)
    for o in outs:
        shape = reader.shape(o.source)
        if o.label == "FLOAT":
            writer.add(o.name, "FLOAT", _placeholder(o.dtype, shape))
        else:
            writer.add(o.name, o.label, {"weight": _placeholder(np.int8, shape),
                                         "weight_offset": _placeholder(np.int32, shape[:1]),
                                         "weight_scale": _placeholder(BF16, shape[:1])})
    owned = not isinstance(executor, Executor)
    ex = get_executor(executor, workers, ray_address)
    hasher = None
    try:
        shards.open()
        units = iter_units(reader, outs, shards, recipe.options.weight_rounding)
        total = sum(reader._info(o.source).end - reader._info(o.source).start for o in outs)
        if progress:
            print(f"data-free recipe: streaming path (no calibration), {len(outs)} tensors "
                  f"({total / 1e9:.2f} GB) on {ex.describe()}", flush=True)
        hasher = ShardHasher(shards.paths)
        done = _run(ex, units, total, progress, hasher)
        temporary = shards.paths
        writer.close(what=f"recipe {recipe.name or '(unnamed)'}")
        known = {name: hasher.result(tmp) for tmp, name in zip(temporary, shards.shard_names)}
    except BaseException:
        writer.abort()
        raise
    finally:
        if hasher is not None:
            hasher.close()
        if owned:
            ex.close()
        reader.close()
    seconds = time.time() - started
    write_checkpoint_metadata(writer, cfg, recipe, plan, reader.path, out)
    report = {
        "recipe": recipe.name,
        "model": str(reader.path),
        "path": "stream",
        "calibration": None,  # data-free: no calibration data was used (ceval's overlap guard reads this)
        "plan": {"counts": plan.counts_by_label()},
        "layers": [],
    }
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_streamed_report_md(report))
    write_manifest(out, known=known)
    stats = StreamStats(ex.describe(), done, shards.total_size, seconds)
    result = QuantizeResult(out=out, plan=plan, report=report)
    result.stream = stats
    return result


def _prefetch(units, handles: dict, ahead: int = READ_AHEAD) -> object:
    """Yield the units, first asking the kernel to read the bytes of the next ``ahead`` bytes' worth of units (so
    reads overlap the workers' start-up and compute; it is page cache, not process memory)."""
    window, queued = deque(), 0
    for unit in units:
        for span, r0, r1 in ((unit.source, unit.r0, unit.r1),) + (
                ((unit.scale, unit.r0 // BLOCK, -(-unit.r1 // BLOCK)),) if unit.scale is not None else ()):
            fd = handles.get(span.file)
            if fd is None:
                fd = handles[span.file] = os.open(span.file, os.O_RDONLY)
            row = int(np.prod(span.shape[1:], dtype=np.int64)) * STORED_DTYPES[span.dtype].itemsize
            os.posix_fadvise(fd, span.start + r0 * row, (r1 - r0) * row, os.POSIX_FADV_WILLNEED)
        window.append(unit)
        queued += unit.input_bytes
        while queued > ahead:
            queued -= window[0].input_bytes
            yield window.popleft()
    yield from window


class ShardHasher:
    """The sha256 of each output shard for the manifest, computed in a driver thread as soon as the shard's last
    byte is written (while the workers go on), instead of reading every shard again after the run."""

    def __init__(self, paths):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="goldstick-hash")
        self.left, self.futures, self.handles = {}, {}, []
        for path in map(str, paths):
            with open(path, "rb") as f:
                header = int.from_bytes(f.read(8), "little")
            self.left[path] = os.path.getsize(path) - 8 - header  # the data bytes still to be written
            self._check(path)

    def _check(self, path: str) -> None:
        if self.left[path] == 0:  # opened now: the file is read even once close() has renamed it
            self.handles.append(open(path, "rb"))
            self.futures[path] = self.pool.submit(_sha256_of, self.handles[-1])

    def wrote(self, path: str, nbytes: int) -> None:
        self.left[path] -= nbytes
        self._check(path)

    def result(self, path) -> str | None:
        future = self.futures.get(str(path))
        return None if future is None else future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for handle in self.handles:  # those of cancelled hashes (the others are closed already)
            handle.close()


def _sha256_of(handle) -> str:
    with handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _run(ex, units, total: int, progress: bool, hasher: ShardHasher) -> int:
    bar = None
    if progress:
        bar = tqdm(total=total, desc="stream", unit="B", unit_scale=True, unit_divisor=1024)
    handles: dict[str, int] = {}
    done = 0
    try:
        for nbytes, written in ex.imap_unordered(run_unit, _prefetch(units, handles)):
            done += nbytes
            for path, count in written:
                hasher.wrote(path, count)
            if bar is not None:
                bar.update(nbytes)
    finally:
        for fd in handles.values():
            os.close(fd)
        if bar is not None:
            bar.close()
    if done != total:
        raise StreamError(f"internal error: {done} of {total} input bytes processed")
    return done

