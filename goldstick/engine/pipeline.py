"""The quantization engine: recipe + checkpoint + calibration data -> quantized checkpoint + report.

    plan = recipe.plan(config)                                  every linear -> scheme (first matching rule)
    path = stream or layers                                     a data-free recipe streams (goldstick.engine.stream)
    h    = embed(calibration batches)                           inputs of layer 0 (goldstick.engine.inputs)
    for each decoder layer (read from the checkpoint, one at a time; goldstick.engine.layer):
        float pass   : run the float layer, hooks keep running per-channel min/max of every linear's input
        transform    : SmoothQuant / OS+ per group of linears that share an input
        quantize     : swap each linear for its integer cell; OS+ searches its scale against the layer's output
        quant pass   : run the quantized layer -> next layer's inputs (quantized by default, float as an option),
                       layer and per-linear SQNR
        write        : the layer's tensors to a work file (goldstick.io.rundir: state.json, resume); the layer is
                       freed
    assemble the checkpoint (shards, index, config, description, recipe, report, manifest last)

Peak memory is one decoder layer plus the calibration activations; it does not grow with the number of layers.
Everything the engine computes with is what will be stored (bf16 scales and float weights are rounded before use),
so the exported checkpoint, loaded by ``load_model``, reproduces the engine's quantized logits exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from goldstick.engine.calibration import DEFAULT_CALIBRATION, CalibrationSet, load_calibration, portable_source
from goldstick.engine.executors import Executor, get_executor
from goldstick.engine.feedback import (
    Feedback,
    calibration_summary,
    estimate_summary,
    layer_bar,
    resume_summary,
    work_summary,
)
from goldstick.engine.inputs import LayerTensors, prepare_batches, read_finite
from goldstick.engine.layer import LayerQuantizer, float_tensor, token_count
from goldstick.engine.report import render_report_md, write_checkpoint_metadata
from goldstick.engine.result import QuantizeError, QuantizeInterrupted, QuantizeResult
from goldstick.engine.stream import calibration_needed, route, stream_quantize
from goldstick.engine.weight_units import PARALLEL_WEIGHT_PARAMS
from goldstick.io.checkpoint import CheckpointError, CheckpointReader, read_safetensors_header
from goldstick.io.export import (
    COMPRESSED_TENSORS,
    MINDSPORE,
    PER_TENSOR_FORMATS,
    CheckpointWriter,
    check_plan,
    default_format,
    write_text_atomic,
)
from goldstick.io.rundir import (
    WORK_DIR,
    file_record,
    hidden_name,
    remove_temporaries,
    temporary,
    work_files_problem,
    write_manifest,
)
from goldstick.io.writer import PlacedShards, PlannedShardWriter, pwrite_array, write_json_atomic, write_safetensors
from goldstick.model.config import ModelConfig
from goldstick.model.runtime import keep_ctrl_c, release_memory, setup_mindspore
from goldstick.model.tokenizer import load_tokenizer
from goldstick.quant.kernels import all_finite
from goldstick.quant.numerics import STORED_DTYPES, bf16_round
from goldstick.quant.plan import Plan
from goldstick.quant.recipe import Recipe, load_recipe
from goldstick.testing.make_model import default_model_path

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "WORK_DIR", "LayerQuantizer", "QuantizeError", "QuantizeInterrupted",
           "QuantizeResult", "quantize", "recorded_recipe"]

DEFAULT_MAX_SHARD_BYTES = 4 << 30  # Golden-Stick's own 4 GB shard limit
BF16 = ml_dtypes.bfloat16


def quantize(model: str | Path | None = None, recipe: str | Path | Recipe = "deepseek-r1-w8a8-mixed",
             out: str | Path | None = None, calibration: str | Path | None = None,
             calib_samples: int | None = None, calib_seq_len: int | None = None, calib_seed: int | None = None,
             resume: bool = False, progress: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
             stop_after_layer: int | None = None, export_format: str | None = None, path: str = "auto",
             executor=None, workers: int | None = None) -> QuantizeResult:
    """Quantize a DeepSeek-V3/R1 checkpoint with a recipe; returns the output folder, the plan and the report.

    ``model`` None means the embedded default model. ``calibration`` and ``calib_*`` override the recipe's data.
    ``resume`` continues an interrupted run in ``out`` from its last finished layer (same bytes as one run).
    ``stop_after_layer`` stops after that layer, leaving the run resumable (what a kill does, deterministically).
    ``export_format``: ``ascend`` (MindFormers / vllm-mindspore ascend mode), ``vllm-ascend`` (vllm-ascend,
    MindIE), ``golden-stick`` (MindFormers golden-stick mode), ``compressed-tensors`` (vLLM) or ``mindspore``
    (goldstick's own layout; goldstick.io.layouts); None: ``export.default_format`` (ascend, or vllm-ascend for a
    recipe with W8A16 linears, mindspore for one no Ascend stack serves). A recipe the format cannot hold is refused
    here, before calibrating. The ascend targets calibrate static activations as their runtimes apply them (one
    per-tensor scale).
    ``path``: ``auto`` streams a recipe that needs no calibration (goldstick.engine.stream: shard by shard from the
    source, bit-identical output, no MindSpore) unless calibration data, ``stop_after_layer`` or an interrupted layer
    run ask for the layer path; ``stream`` / ``layers`` force one. ``executor`` (``local`` processes, ``ray``,
    ``inline`` or a goldstick.engine.executors.Executor) and ``workers`` run the independent units: the streamed
    tensors, or the weight quantization of a layer's weight-only/dynamic linears (experts) in the layer path
    (default: local processes on every core; in the layer path only for layers of at least
    ``PARALLEL_WEIGHT_PARAMS`` such parameters, since starting workers costs more than small layers' work).
    """
    if model is None:
        model = default_model_path()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    given = calibration is not None or calib_samples is not None or calib_seq_len is not None or calib_seed is not None
    if export_format is None:
        cfg = ModelConfig.from_file(model)
        export_format = default_format(cfg, recipe.plan(cfg))
        if progress and export_format == MINDSPORE:
            print(f"format: mindspore (goldstick's layout): no Ascend stack serves recipe {recipe.name or '(unnamed)'}"
                  " as planned (goldstick serve and goldstick export do)", flush=True)
    chosen, why = route(model, recipe, path, export_format, given, stop_after_layer, out, resume)
    if chosen == "stream":
        return stream_quantize(model, recipe, out, executor=executor, workers=workers, progress=progress,
                               max_shard_bytes=max_shard_bytes, resume=resume, export_format=export_format)
    if progress:
        print(f"layer path: {why}", flush=True)
    setup_mindspore()
    reader = CheckpointReader(model)
    cfg = reader.config
    plan = recipe.plan(cfg)
    check_plan(cfg, plan, export_format)
    if out is None:
        raise QuantizeError("quantize needs an output folder (out=...)")
    if max_shard_bytes <= 0:
        raise QuantizeError(f"the shard size cap must be positive, got {max_shard_bytes} bytes")
    out = Path(out)
    work = out / WORK_DIR
    if out.exists() and any(out.iterdir()) and not resume:
        raise QuantizeError(f"{out} is not empty; choose a new folder (or --resume an interrupted run there)")
    feedback = Feedback(progress)
    finished = resume and (out / "manifest.json").exists()
    if resume and not finished and not (work / "state.json").exists():
        feedback.say(f"resume: {out} holds no finished layer; starting from layer 0")
        resume = False  # nothing was finished yet: start from the beginning

    tok = load_tokenizer(model)
    cal = recipe.calibration
    seq_len, clipped = _within_context(cfg, calib_seq_len or cal.seq_len)
    calib = load_calibration(calibration or cal.data or DEFAULT_CALIBRATION, tok.tokenizer,
                             samples=calib_samples or cal.samples, seq_len=seq_len,
                             seed=cal.seed if calib_seed is None else calib_seed, bos_id=tok.bos_id)
    if clipped:
        print(f"goldstick: warning: {clipped}", file=sys.stderr, flush=True)
        calib.notes.append(clipped)
    recorded = recorded_recipe(recipe, plan, calib)
    if finished:
        return _finished_run(out, work, plan, recorded)
    given = {"samples": calib_samples is not None, "seq_len": calib_seq_len is not None,
             "data": calibration is not None, "seed": calib_seed is not None}
    feedback.say(calibration_summary(recipe, calib, given, bool(calibration_needed(plan))))
    fingerprint = _fingerprint(reader, recipe, calib)
    batches = prepare_batches(cfg, calib)

    work.mkdir(parents=True, exist_ok=True)
    # state.json says which layers are finished and the size + sha256 of every work file they left; a file is
    # written under a temporary name and renamed before it is recorded, so a kill mid-write leaves nothing trusted
    state = {"fingerprint": fingerprint, "finished": -1, "files": {}}
    if resume:
        state = json.loads((work / "state.json").read_text())
        if state.get("fingerprint") != fingerprint:
            raise QuantizeError(f"{out}: the interrupted run used a different model, recipe or calibration data; "
                                "resume needs the same inputs")
        state.setdefault("files", {})
        problem = work_files_problem(work, state)
        if problem:
            raise QuantizeError(f"{problem}: the interrupted run cannot be resumed from it; delete {out} and "
                                "quantize again without --resume")
        feedback.say(resume_summary(state["finished"], cfg.num_hidden_layers))
    else:
        write_json_atomic(work / "state.json", state)
    if state["finished"] >= 0:
        hidden_file = np.load(work / hidden_name(state["finished"]))
        hidden = [hidden_file[f"b{i}"] for i in range(len(batches))]
    else:  # the embedding rows of the calibration tokens, as exported (R1: 1.85 GB of bf16 never read whole)
        ids = np.unique(np.concatenate([ids.ravel() for ids, *_ in batches]))
        rows = embedding_rows(reader, "model.embed_tokens.weight", ids)
        hidden = [rows[np.searchsorted(ids, batch_ids)] for batch_ids, *_ in batches]
        del rows

    ex = get_executor(executor, workers)  # local processes, every core, by default
    if executor is None and workers is None:
        ex.min_params = PARALLEL_WEIGHT_PARAMS  # by default only big layers' weights (R1's) go to the processes
    try:
        return _run_layers(out, work, state, reader, recipe, plan, calib, batches, hidden, feedback,
                           max_shard_bytes, stop_after_layer, export_format, ex)
    except KeyboardInterrupt:
        try:
            done = json.loads((work / "state.json").read_text())["finished"]  # what a resume will see
        except (OSError, ValueError, KeyError):  # interrupted while the finished run removed its work folder
            done = state["finished"]
        left = cfg.num_hidden_layers - done - 1
        where = (f"continue from layer {done + 1} ({left} of {cfg.num_hidden_layers} layers left)"
                 if left else f"finish writing the checkpoint (all {cfg.num_hidden_layers} layers are quantized)")
        raise QuantizeInterrupted(f"interrupted; rerun with --resume to {where}") from None
    finally:
        feedback.end_phase()
        if ex is not None and not isinstance(executor, Executor):
            ex.close()  # one we made (a passed-in Executor stays the caller's)


def _run_layers(out: Path, work: Path, state: dict, reader: CheckpointReader, recipe: Recipe, plan: Plan,
                calib: CalibrationSet, batches: list, hidden: list, feedback: Feedback, max_shard_bytes: int,
                stop_after_layer: int | None, export_format: str, executor=None) -> QuantizeResult:
    """The layer loop from the first unfinished layer, then the assembly; ``state`` is updated as layers finish."""
    cfg = reader.config
    progress = feedback.enabled
    layers = range(state["finished"] + 1, cfg.num_hidden_layers)
    bar = layer_bar(layers, progress, cfg.num_hidden_layers, state["finished"] + 1)
    per_layer: dict[str, float | None] = {}  # "dense" / "MoE": estimated seconds of one layer, from the first timed
    for i in bar:
        started = time.time()
        keep_ctrl_c()
        lq = LayerQuantizer(cfg, i, LayerTensors(reader, i), plan, recipe, batches, hidden, executor=executor,
                            lean=True, feedback=feedback, per_tensor_static=export_format in PER_TENSOR_FORMATS)
        kind = "MoE" if cfg.is_moe_layer(i) else "dense"
        timing = kind not in per_layer  # the first layer of its kind: its float pass times the estimate
        if timing:
            if not per_layer:
                feedback.say(work_summary(lq.planned_work(), token_count(lq.sample[0]), lq.osplus_candidates(),
                                         len(layers)))
            feedback.measured.clear()
        float_outputs = lq.observe(recipe.options.moe_calibrate_all_experts)
        if timing:
            per_layer[kind] = feedback.estimate(lq.planned_work())
            feedback.say(estimate_summary(per_layer, kind, cfg, i))
        lq.quantize(float_outputs)
        quant_outputs = lq.measure(float_outputs)
        tensors, labels = lq.tensors()
        keep_ctrl_c()  # a Ctrl-C from here on stops the run with its message (and one after the commit resumes)
        write_safetensors(temporary(work / f"layer-{i:05d}.safetensors"), tensors.items())
        os.replace(temporary(work / f"layer-{i:05d}.safetensors"), work / f"layer-{i:05d}.safetensors")
        write_json_atomic(work / f"layer-{i:05d}.json", {"report": lq.report, "labels": labels})
        hidden = quant_outputs if recipe.options.inputs_from == "quantized" else float_outputs
        np.savez(temporary(work / hidden_name(i)), **{f"b{k}": h for k, h in enumerate(hidden)})
        os.replace(temporary(work / hidden_name(i)), work / hidden_name(i))
        for name in (f"layer-{i:05d}.safetensors", f"layer-{i:05d}.json", hidden_name(i)):
            state["files"][name] = file_record(work / name)
        state["files"].pop(hidden_name(i - 1), None)
        write_json_atomic(work / "state.json", {**state, "finished": i})  # the commit point of layer i
        state["finished"] = i
        (work / hidden_name(i - 1)).unlink(missing_ok=True)  # layer i-1's outputs: no resume needs them now
        if progress:
            bar.set_postfix_str(f"layer {i}: SQNR {lq.report['sqnr_db']} dB, {time.time() - started:.1f}s")
        del lq, tensors, float_outputs, quant_outputs
        release_memory()  # hooks and swapped cells form reference cycles; free the layer now, not later
        if stop_after_layer is not None and i >= stop_after_layer and i < cfg.num_hidden_layers - 1:
            raise QuantizeError(f"stopped after layer {i} as asked; continue with resume=True")

    final_logits = _final_logits(reader, hidden[0])
    report = _assemble(out, work, reader, recipe, plan, calib, max_shard_bytes, export_format)
    return QuantizeResult(out=out, plan=plan, report=report, final_logits=final_logits)


def _fingerprint(reader: CheckpointReader, recipe: Recipe, calib: CalibrationSet) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(reader.config.to_dict(), sort_keys=True).encode())
    digest.update(json.dumps({n: [reader.dtype(n), list(reader.shape(n))] for n in reader.names()},
                             sort_keys=True).encode())
    digest.update(recipe.to_yaml().encode())
    for batch in calib.batches:
        digest.update(batch.tobytes())
    return digest.hexdigest()


def _within_context(cfg, seq_len: int) -> tuple[int, str | None]:
    """The calibration sequence length clipped to the model's context, and the warning when it was clipped."""
    context = cfg.max_position_embeddings
    if seq_len <= context:
        return seq_len, None
    return context, (f"calibration seq_len {seq_len} is longer than the model's context (max_position_embeddings "
                     f"{context}): calibrating on sequences of {context} tokens")


def recorded_recipe(recipe: Recipe, plan: Plan, calib: CalibrationSet) -> Recipe:
    """The recipe a checkpoint records (its recipe.yaml): with the calibration the run used (source, samples,
    sequence length after clipping to the context, seed), so that quantizing with it again reproduces the run. A
    recipe that needs no calibration is recorded as given: the data only measured the report's errors, and the
    streaming path, which reads none, writes the same recipe.yaml."""
    if not calibration_needed(plan):
        return recipe
    return recipe.with_calibration(data=portable_source(calib.source), samples=calib.samples,
                                   seq_len=calib.seq_len, seed=calib.seed)


def _finished_run(out: Path, work: Path, plan: Plan, recipe: Recipe) -> QuantizeResult:
    """``resume`` on a folder with a manifest: the run finished (the manifest is written last). ``recipe`` as
    recorded (``recorded_recipe``)."""
    written = out / "recipe.yaml"
    if not written.exists() or written.read_text() != recipe.to_yaml():
        raise QuantizeError(f"{out} holds a finished run of another recipe or calibration (manifest.json): "
                            "nothing to resume")
    if not work.exists():
        raise QuantizeError(f"{out} holds a finished run (manifest.json): nothing to resume")
    shutil.rmtree(work)  # killed while removing its work folder, after the manifest: only the cleanup was left
    return QuantizeResult(out=out, plan=plan, report=json.loads((out / "report.json").read_text()))


def _final_logits(reader: CheckpointReader, hidden: np.ndarray) -> np.ndarray:
    """The quantized model's logits for the first calibration batch: final norm and lm_head as stored (bf16).
    lm_head is applied in row chunks of ``ROW_CHUNK_BYTES`` of its stored bytes (one chunk for small vocabularies;
    R1's 129280 x 7168 head is never held whole)."""
    cfg = reader.config
    norm = bf16_round(read_finite(reader, "model.norm.weight")).astype(np.float64)
    from mindspore import Tensor

    from goldstick.model.network import Linear, RMSNorm, parameter_placeholders  # MindSpore, set up by quantize

    rms = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    rms.weight.set_data(float_tensor(norm))
    x = rms(float_tensor(hidden))
    logits = []
    for _, rows in row_chunks(reader, "lm_head.weight"):
        with parameter_placeholders():
            lm = Linear(cfg.hidden_size, len(rows))
        lm.weight.set_data(Tensor.from_numpy(rows))
        logits.append(lm(x).asnumpy())
        del lm
    return logits[0] if len(logits) == 1 else np.concatenate(logits, axis=-1)


ROW_CHUNK_BYTES = 64 << 20


def row_chunks(reader: CheckpointReader, name: str):
    """(first row, float32 rows rounded to bf16 as exported) of a 2-D float tensor, ``ROW_CHUNK_BYTES`` of its
    stored bytes at a time (pread): R1's embed_tokens and lm_head (1.85 GB of bf16 each) are never read whole. After
    the last chunk, refused if any value was not finite (as ``read_finite``, naming the first)."""
    dtype = reader.dtype(name)
    if dtype not in ("BF16", "F16", "F32"):
        yield 0, bf16_round(read_finite(reader, name))
        return
    info = read_safetensors_header(reader.path, reader.file_of(name))[name]
    stored = STORED_DTYPES[dtype]
    rows, cols = info.shape
    row_bytes = cols * stored.itemsize
    chunk = max(1, ROW_CHUNK_BYTES // row_bytes)
    bad, first = 0, None
    with open(reader.path / info.file, "rb") as handle:
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            raw = os.pread(handle.fileno(), (stop - start) * row_bytes, info.start + start * row_bytes)
            block = np.frombuffer(raw, stored).reshape(stop - start, cols)
            finite = np.isfinite(block)
            if not finite.all():
                bad += block.size - int(np.count_nonzero(finite))
                if first is None:
                    r, c = np.unravel_index(int(np.argmin(finite)), finite.shape)
                    first = [start + int(r), int(c)]
            yield start, bf16_round(block.astype(np.float32))
    if bad:
        raise CheckpointError(f"{info.file}: tensor '{name}' holds {bad} NaN/Inf value(s), the first at index "
                              f"{first}; goldstick refuses to quantize a checkpoint with non-finite weights")


def embedding_rows(reader: CheckpointReader, name: str, ids: np.ndarray) -> np.ndarray:
    """float32 rows ``ids`` (sorted, unique) of a 2-D float tensor as exported (``row_chunks``)."""
    out = np.empty((len(ids), reader.shape(name)[1]), np.float32)
    for start, rows in row_chunks(reader, name):
        lo, hi = np.searchsorted(ids, [start, start + len(rows)])
        out[lo:hi] = rows[ids[lo:hi] - start]
    return out


def _assemble(out: Path, work: Path, reader: CheckpointReader, recipe: Recipe, plan: Plan,
              calib: CalibrationSet, max_shard_bytes: int, export_format: str = "mindspore") -> dict:
    """Write the final checkpoint from the per-layer work files, then the metadata, then the manifest.

    The engine's tensors are in the mindspore layout; ``export.CheckpointWriter`` writes them in ``export_format``,
    one layer at a time.
    """
    cfg = reader.config
    remove_temporaries(out)  # an earlier, killed assembly may have left some
    # every layout but compressed-tensors (buffered shards) stores these under their own names, as they are:
    # written in row chunks
    chunked = chunked_tensors(reader) if export_format != COMPRESSED_TENSORS else frozenset()
    if export_format != COMPRESSED_TENSORS:
        # plan the shards from dtypes and shapes (ShardedWriter's cut, same bytes), then write each tensor into
        # place as it is read: memory is one layer's tensors, not a shard (Golden-Stick's cap: 4 GB)
        planned = PlannedShardWriter(out, max_shard_bytes=max_shard_bytes, overwrite=True)
        _add_checkpoint_tensors(CheckpointWriter(out, export_format, cfg, max_shard_bytes, shards=planned),
                                reader, work, placeholders=True)
        writer = CheckpointWriter(out, export_format, cfg, max_shard_bytes,
                                  shards=RowChunkShards(planned, reader, chunked))
        try:
            planned.open()
        except BaseException:
            writer.abort()
            raise
    else:  # compressed-tensors derives some tensors from values: buffered shards
        writer = CheckpointWriter(out, export_format, cfg, max_shard_bytes)
    try:
        layer_reports = _add_checkpoint_tensors(writer, reader, work, placeholders=False, chunked=chunked)
    except BaseException:
        writer.abort()
        raise
    writer.close(what=f"recipe {recipe.name or '(unnamed)'}")

    write_checkpoint_metadata(writer, cfg, recorded_recipe(recipe, plan, calib), plan, reader.path, out)
    report = {
        "recipe": recipe.name,
        "model": str(reader.path),
        "calibration": calib.provenance(),
        "plan": {"counts": plan.counts_by_label()},
        "layers": layer_reports,
    }
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_report_md(report))
    write_manifest(out)
    shutil.rmtree(work)
    return report


def _add_checkpoint_tensors(writer, reader: CheckpointReader, work: Path, placeholders: bool,
                            chunked: frozenset = frozenset()) -> list[dict]:
    """Add every tensor of the quantized checkpoint to ``writer`` in the writing order: globals, each layer's work
    file (float tensors, then each quantized linear's), MTP. ``placeholders``: zero-stride arrays of the right
    dtype and shape, no data read (to plan shards); ``chunked``: the names given as placeholders anyway (their
    writer, ``RowChunkShards``, writes them from the source itself). Returns the layers' reports."""
    def value(read, dtype, shape, name=None):
        if placeholders or name in chunked:
            return np.broadcast_to(np.zeros((), dtype), tuple(shape))
        return read()

    cfg = reader.config
    reports = []
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        writer.add(name, "FLOAT", value(lambda name=name: _stored_bf16(reader, name), BF16, reader.shape(name), name))
    for i in range(cfg.num_hidden_layers):
        meta = json.loads((work / f"layer-{i:05d}.json").read_text())
        reports.append(meta["report"])
        labels = meta["labels"]
        owners: dict[str, list[str]] = {}
        with safe_open(work / f"layer-{i:05d}.safetensors", framework="numpy") as f:
            def stored(name):
                if placeholders:
                    info = f.get_slice(name)
                    return value(None, STORED_DTYPES[info.get_dtype()], info.get_shape())
                return f.get_tensor(name)
            for name in sorted(f.keys()):
                if labels[name] == "FLOAT":
                    writer.add(name, "FLOAT", stored(name))
                else:
                    owner, _, local = name.rpartition(".")
                    owners.setdefault(owner, []).append(local)
            # one quantized linear's tensors read at a time (R1: a layer's experts are 11.3 GB of int8)
            for owner, local_names in owners.items():
                writer.add(owner, labels[f"{owner}.weight"], {n: stored(f"{owner}.{n}") for n in local_names})
    # MTP passes through unquantized, in bf16 like every float tensor (FP8 dequantized); the router's
    # e_score_correction_bias stays float32 as in the decoder layers
    for name in reader.mtp_tensor_names():
        keep_f32 = name.endswith("e_score_correction_bias") and reader.dtype(name) == "F32"
        writer.add(name, "FLOAT", value(
            lambda name=name, keep_f32=keep_f32: (reader.read_raw(name) if keep_f32
                                                  else _stored_bf16(reader, name, check=True)),
            np.float32 if keep_f32 else BF16, reader.shape(name), name))
    return reports


CHUNKED_BYTES = 256 << 20  # float tensors from this size (R1's embeddings and heads) are written in row chunks


def chunked_tensors(reader: CheckpointReader) -> frozenset:
    """The embeddings and heads (main and MTP) big enough to be written in row chunks: a bf16 copy of each would
    otherwise be held whole (R1: 1.85 GB)."""
    names = ["model.embed_tokens.weight", "lm_head.weight", *reader.mtp_tensor_names()]
    return frozenset(n for n in names if reader.dtype(n) in ("BF16", "F16", "F32") and len(reader.shape(n)) == 2
                     and int(np.prod(reader.shape(n))) * 2 >= CHUNKED_BYTES)


class RowChunkShards(PlacedShards):
    """PlacedShards that writes the ``chunked`` tensors row chunk by row chunk from the source (``row_chunks``:
    the same bf16 bytes, checked finite), whatever array ``add`` is given for them."""

    def __init__(self, planned: PlannedShardWriter, reader: CheckpointReader, chunked: frozenset):
        super().__init__(planned)
        self.reader, self.chunked = reader, chunked

    def add(self, name: str, array: np.ndarray) -> None:
        if name not in self.chunked:
            return super().add(name, array)
        path, offset, nbytes = self.planned.location(name)
        row_bytes = nbytes // self.reader.shape(name)[0]
        for start, rows in row_chunks(self.reader, name):
            pwrite_array(path, offset + start * row_bytes, rows.astype(BF16))


def _stored_bf16(reader: CheckpointReader, name: str, check: bool = False) -> np.ndarray:
    """A float tensor as exported (bf16): a bf16 source as stored (no float32 copy: R1's embeddings and heads are
    1.85 GB each), anything else rounded. ``check``: refused if not finite (as ``read_finite``)."""
    if reader.dtype(name) == "BF16":
        stored = reader.read_raw(name)
        if not check or all_finite(stored):
            return stored
    return (read_finite(reader, name) if check else bf16_round(reader.read(name))).astype(BF16)
