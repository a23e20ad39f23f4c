"""The data-free streaming path (goldstick.engine.stream) and the executors (goldstick.engine.executors).

The streamed checkpoint must be the layer path's checkpoint bit for bit (shards, index, description, config), on a
multi-shard FP8 model with a weight_scale_inv in another shard than its weight, for the w8a16 and dynamic recipes;
the local-process and Ray executors must give the same bytes as running inline.
"""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from goldstick.engine.executors import ExecutorError, InlineExecutor, LocalExecutor, get_executor
from goldstick.engine.pipeline import QuantizeError, quantize
from goldstick.engine.stream import StreamError, calibration_needed, route, stream_quantize
from goldstick.io.checkpoint import CheckpointError, CheckpointReader
from goldstick.io.writer import PlannedShardWriter, ShardedWriter
from goldstick.quant import algorithms as alg
from goldstick.quant.numerics import bf16_ceil, quantize_weight
from goldstick.testing.make_model import default_model_path

DATA_FREE = ("deepseek-r1-w8a16", "deepseek-r1-w8a8-dynamic")
SHARD = 3_000_000  # several output shards from the ~15 MB tiny FP8 model
CALIB = dict(calib_samples=2, calib_seq_len=16)  # the layer path calibrates even data-free recipes; keep it cheap
PROVENANCE = {"report.json", "report.md", "manifest.json"}  # the layer path's report carries per-layer errors


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    from goldstick.testing.make_model import make_model

    return make_model(tmp_path_factory.mktemp("src") / "fp8", size="tiny", fp8=True)


@pytest.fixture(scope="module")
def layer_outputs(fp8_model, tmp_path_factory):
    """The layer path's checkpoint per (source, data-free recipe), made once."""
    root, made = tmp_path_factory.mktemp("layers"), {}

    def get(recipe, source="fp8"):
        if (recipe, source) not in made:
            model = fp8_model if source == "fp8" else default_model_path()
            made[recipe, source] = quantize(model, recipe, out=root / f"{source}-{recipe}", path="layers",
                                            progress=False, max_shard_bytes=SHARD, **CALIB).out
        return made[recipe, source]
    return get


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def same_bytes(a, b, skip=()):
    assert files(a) == files(b)
    return {n: (a / n).read_bytes() == (b / n).read_bytes() for n in files(a) if n not in skip}


def all_tensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(folder / shard, framework="numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


# ---- the quantization maths and the writer --------------------------------------------------------------------
def _whole_tensor_quantize(w, mode):
    """numerics.quantize_weight as one whole-tensor expression (what it was before it went blockwise)."""
    scale = bf16_ceil(alg.quantize_weight_per_channel(w, mode=mode).scale)
    low = -128 if mode == "gs" else -127
    return np.clip(np.rint(w.astype(np.float64) / scale[:, None].astype(np.float64)), low, 127).astype(np.int8), scale


@pytest.mark.parametrize("numba", [True, False], ids=["numba", "numpy"])
@pytest.mark.parametrize("mode", ["absmax127", "gs"])
def test_blockwise_weight_quantization_equals_the_whole_tensor_expression(mode, numba, monkeypatch):
    """numerics.quantize_weight, numpy (the layer path) and fused (goldstick.quant.kernels, the streaming path)."""
    from goldstick.quant import kernels

    if numba and not kernels.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(kernels, "AVAILABLE", numba)
    rng = np.random.default_rng(3)
    for shape in [(300, 7168), (80, 256), (3, 5), (1, 9)]:
        w = rng.standard_normal(shape, dtype=np.float32) * rng.uniform(1e-4, 30, (shape[0], 1)).astype(np.float32)
        w[0] = 0  # an all-zero row: scale 1, codes 0
        if shape[0] > 2:
            w[1, 0], w[2, 0] = np.abs(w[1]).max() * 2, -np.abs(w[2]).max() * 2  # +absmax and -absmax hit the edges
        q, s = quantize_weight(w, mode, rows=kernels.quantize_rows if numba else None)
        rq, rs = _whole_tensor_quantize(w, mode)
        assert q.dtype == np.int8 and s.dtype == np.float32
        assert np.array_equal(q, rq) and np.array_equal(s, rs)
        half = shape[0] // 2  # rows are independent: a unit of rows gives the rows of the whole
        if half:
            rows = kernels.quantize_rows if numba else None
            assert np.array_equal(quantize_weight(w[half:], mode, rows=rows)[0], q[half:])
    bad = np.ones((4, 4), np.float32)
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_weight(bad, "absmax127")


def test_fp8_decode_equals_the_reader_s():
    from goldstick.engine.stream import decode_fp8
    from goldstick.quant.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks

    rng = np.random.default_rng(1)
    for shape in [(256, 384), (128, 128), (200, 384), (256, 300)]:  # whole blocks (one broadcast) and ragged ones
        q, s = quantize_fp8_blocks(rng.standard_normal(shape, dtype=np.float32) * 5)
        assert np.array_equal(decode_fp8(q, s).view(np.uint32), dequantize_fp8_blocks(q, s).view(np.uint32))


def test_planned_writer_writes_the_sharded_writers_bytes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = [("a.weight", rng.standard_normal((64, 48)).astype(ml_dtypes.bfloat16)),
               ("a.scale", rng.standard_normal(64).astype(np.float32)),
               ("b.weight", rng.integers(-127, 128, (100, 40), dtype=np.int8)),
               ("b.offset", np.zeros(100, np.int32)),
               ("c", rng.standard_normal((30, 30)).astype(np.float32))]
    with ShardedWriter(tmp_path / "ref", max_shard_bytes=5000) as ref:
        for name, arr in tensors:
            ref.add(name, arr)
    planned = PlannedShardWriter(tmp_path / "new", max_shard_bytes=5000)
    for name, arr in tensors:
        planned.add(name, arr)
    planned.open()
    assert all(p.name.startswith(".goldstick-") for p in (tmp_path / "new").iterdir())  # nothing final yet
    for name, arr in reversed(tensors):  # any order
        path, offset, nbytes = planned.location(name)
        assert nbytes == arr.nbytes
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(arr.tobytes())
    planned.close({})
    assert files(tmp_path / "ref") == files(tmp_path / "new") and len(files(tmp_path / "ref")) > 3
    assert all(same_bytes(tmp_path / "ref", tmp_path / "new").values())


def test_planned_writer_abort_leaves_nothing(tmp_path):
    w = PlannedShardWriter(tmp_path, max_shard_bytes=100)
    w.add("x", np.zeros(80, np.int8))
    w.add("y", np.zeros(80, np.int8))
    w.open()
    assert len(list(tmp_path.iterdir())) == 2
    w.abort()
    assert list(tmp_path.iterdir()) == []


# ---- which path ----------------------------------------------------------------------------------------------
def test_route_streams_data_free_recipes_only(fp8_model, tmp_path):
    from goldstick.quant.recipe import load_recipe

    for name in DATA_FREE:
        recipe = load_recipe(name)
        assert route(fp8_model, recipe, "auto", "mindspore", False, None, tmp_path / "o", False)[0] == "stream"
        assert route(fp8_model, recipe, "auto", "mindspore", True, None, tmp_path / "o", False)[0] == "layers"
        assert route(fp8_model, recipe, "auto", "compressed-tensors", False, None, tmp_path / "o", False)[0] \
            == "layers"
    mixed = load_recipe("deepseek-r1-w8a8-mixed")
    from goldstick.model.config import ModelConfig

    assert calibration_needed(mixed.plan(ModelConfig.from_file(fp8_model)))
    assert route(fp8_model, mixed, "auto", "mindspore", False, None, tmp_path / "o", False)[0] == "layers"
    with pytest.raises(StreamError, match=r"data-free recipes only: the recipe calibrates .*q_a_proj"):
        stream_quantize(fp8_model, mixed, tmp_path / "o")
    with pytest.raises(StreamError, match="unknown quantization path"):
        quantize(fp8_model, mixed, out=tmp_path / "o", path="fast")


# ---- the streamed checkpoint equals the layer path's ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("recipe,source", [(r, "fp8") for r in DATA_FREE] + [("deepseek-r1-w8a16", "f32")])
def test_stream_equals_the_layer_path_bit_for_bit(recipe, source, fp8_model, layer_outputs, tmp_path, capsys):
    """FP8 (R1 layout, bf16 non-FP8 tensors) for both recipes, and the float32 default model."""
    from mindspore import Tensor

    from goldstick.io.loader import load_model

    layers = layer_outputs(recipe, source)
    model = fp8_model if source == "fp8" else default_model_path()
    result = quantize(model, recipe, out=tmp_path / "s", max_shard_bytes=SHARD, executor="inline")
    assert "streaming path" in capsys.readouterr().out
    streamed = result.out
    assert result.report["path"] == "stream" and result.final_logits is None
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4  # several output shards
    # every tensor bit for bit (and dtype), then every file but the layer path's per-layer report
    a, b = all_tensors(layers), all_tensors(streamed)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name
    assert any(n.endswith(".mlp.experts.3.up_proj.weight") and a[n].dtype == np.int8 for n in a)
    assert any(n.startswith("model.layers.4.") for n in a)  # the MTP layer, passed through
    assert all(same_bytes(layers, streamed, skip=PROVENANCE).values())
    manifest = json.loads((streamed / "manifest.json").read_text())["files"]
    assert set(manifest) == set(files(streamed)) - {"manifest.json"}
    # and the loaded networks agree exactly
    ids = Tensor(np.array([[1, 17, 230, 5, 99, 400, 7, 3]], np.int32))
    assert np.array_equal(load_model(layers)(ids).asnumpy(), load_model(streamed)(ids).asnumpy())


def test_stream_refuses_a_non_empty_folder_and_leaves_nothing_on_bad_weights(fp8_model, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(QuantizeError, match="not empty"):
        stream_quantize(fp8_model, "deepseek-r1-w8a16", tmp_path / "busy", executor="inline", progress=False)
    # a NaN code in one FP8 expert weight: one error naming file and tensor, no shard or temporary file left
    bad = tmp_path / "bad"
    shutil.copytree(fp8_model, bad)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    with CheckpointReader(bad) as reader:
        info, file = reader._info(name), reader.file_of(name)
    with open(bad / file, "r+b") as f:
        f.seek(info.start + 3 * reader.shape(name)[1] + 7)
        f.write(b"\x7f")  # e4m3fn NaN
    with pytest.raises(CheckpointError, match=rf"{file}: tensor '{name}' holds 1 NaN/Inf value\(s\), the first at "
                                              r"index \[3, 7\]"):
        stream_quantize(bad, "deepseek-r1-w8a16", tmp_path / "out", executor="inline", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("numba", [True, False], ids=["numba", "numpy"])
def test_stream_refuses_nan_codes_and_non_finite_scales(fp8_model, tmp_path, numba, monkeypatch):
    """The fused kernels leave non-finite values to the numpy path, which names file, tensor, count and index:
    a negative NaN code (0xff) in a quantized expert, an inf block scale in an FP8 tensor kept float (the MTP
    layer's, 96 columns: a ragged block), a bf16 NaN in a norm weight (bf16 passed through, checked on its bits)."""
    from goldstick.quant import kernels

    if numba and not kernels.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(kernels, "AVAILABLE", numba)
    cases = [("model.layers.1.mlp.experts.2.down_proj.weight", 0xFF, r"holds 1 NaN/Inf value\(s\), the first at "
              r"index \[130, 5\]"),
             ("model.layers.4.self_attn.q_b_proj.weight", np.inf, r"holds \d+ NaN/Inf value\(s\), the first at "
              r"index \[128, 0\]"),
             ("model.layers.2.post_attention_layernorm.weight", "bf16", r"holds 1 NaN/Inf value\(s\), the first at "
              r"index \[9\]")]
    for k, (name, bad, message) in enumerate(cases):
        model = tmp_path / f"bad{k}"
        shutil.copytree(fp8_model, model)
        with CheckpointReader(model) as reader:
            target = name + "_scale_inv" if bad == np.inf else name
            info, file = reader._info(target), reader.file_of(target)
            assert reader.dtype(name) == ("BF16" if bad == "bf16" else "F8_E4M3")
        with open(model / file, "r+b") as f:
            if bad == "bf16":
                f.seek(info.start + 9 * 2)
                f.write(np.array(np.nan, ml_dtypes.bfloat16).tobytes())
            elif bad == 0xFF:
                f.seek(info.start + 130 * reader.shape(name)[1] + 5)
                f.write(b"\xff")
            else:
                f.seek(info.start + 4 * reader.shape(target)[1])  # block (1, 0)
                f.write(np.float32(bad).tobytes())
        with pytest.raises(CheckpointError, match=rf"{reader.file_of(name)}: tensor '{name}' {message}"):
            stream_quantize(model, "deepseek-r1-w8a16", tmp_path / f"out{k}", executor="inline", progress=False)
        assert list((tmp_path / f"out{k}").iterdir()) == []


def test_stream_without_numba_gives_the_same_bytes(fp8_model, tmp_path, monkeypatch):
    """The numpy fallback (numba missing) writes the fused kernels' checkpoint byte for byte."""
    from goldstick.quant import kernels

    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed")
    fused = stream_quantize(fp8_model, "deepseek-r1-w8a16", tmp_path / "numba", executor="inline",
                            progress=False, max_shard_bytes=SHARD).out
    monkeypatch.setattr(kernels, "AVAILABLE", False)
    plain = stream_quantize(fp8_model, "deepseek-r1-w8a16", tmp_path / "numpy", executor="inline",
                            progress=False, max_shard_bytes=SHARD).out
    assert all(same_bytes(fused, plain).values())  # every file, report and manifest included


# ---- executors -----------------------------------------------------------------------------------------------
def _square(x):
    return x * x


def test_executors_map_in_order():
    with InlineExecutor() as ex:
        assert ex.map(_square, range(7)) == [x * x for x in range(7)]
    with LocalExecutor(2) as ex:
        assert ex.map(_square, range(9), max_in_flight=3) == [x * x for x in range(9)]
        assert sorted(ex.imap_unordered(_square, range(5))) == [0, 1, 4, 9, 16]
    with get_executor("threads", workers=3) as ex:
        assert ex.name == "threads" and ex.workers == 3
        assert ex.map(_square, range(9), max_in_flight=2) == [x * x for x in range(9)]
    with pytest.raises(ExecutorError, match="unknown executor 'gpu'"):
        get_executor("gpu")


def test_local_workers_exit_when_their_driver_is_killed():
    """A driver SIGKILLed with its pool open (no close, no atexit) leaves no worker process behind."""
    import signal
    import subprocess
    import sys

    import psutil

    code = ("import os, time\nfrom goldstick.engine.executors import LocalExecutor\n"
            "ex = LocalExecutor(2)\nassert ex.map(abs, [-1, -2, -3]) == [1, 2, 3]\n"
            "print('ready', flush=True)\ntime.sleep(600)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "ready"
        workers = psutil.Process(driver.pid).children(recursive=True)
        assert len([w for w in workers if "spawn_main" in " ".join(w.cmdline())]) == 2
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    _, alive = psutil.wait_procs(workers, timeout=60)  # each worker checks its parent every second
    assert not alive


def test_threads_give_the_inline_bytes(fp8_model, tmp_path):
    """The streaming units on a thread pool (numba kernels, pread and pwrite release the GIL): same files."""
    one = stream_quantize(fp8_model, "deepseek-r1-w8a16", tmp_path / "inline", executor="inline",
                          progress=False, max_shard_bytes=SHARD).out
    two = stream_quantize(fp8_model, "deepseek-r1-w8a16", tmp_path / "threads", executor="threads", workers=2,
                          progress=False, max_shard_bytes=SHARD).out
    assert all(same_bytes(one, two).values())


def test_local_processes_give_the_inline_bytes(fp8_model, tmp_path):
    one = stream_quantize(fp8_model, "deepseek-r1-w8a8-dynamic", tmp_path / "inline", executor="inline",
                          progress=False, max_shard_bytes=SHARD).out
    two = stream_quantize(fp8_model, "deepseek-r1-w8a8-dynamic", tmp_path / "local", executor=LocalExecutor(2),
                          progress=False, max_shard_bytes=SHARD).out
    assert all(same_bytes(one, two).values())  # every file, report and manifest included
    # the shards' sha256 were computed while the run went on (stream.ShardHasher): they are the final files'
    from goldstick.io.files import sha256_file

    manifest = json.loads((two / "manifest.json").read_text())["files"]
    assert set(manifest) == set(files(two)) - {"manifest.json"}
    assert all(manifest[n]["sha256"] == sha256_file(two / n) for n in manifest)


@pytest.mark.slow
def test_layer_path_experts_on_local_processes_give_the_same_bytes(fp8_model, layer_outputs, tmp_path):
    ref = layer_outputs("deepseek-r1-w8a8-dynamic")
    out = quantize(fp8_model, "deepseek-r1-w8a8-dynamic", out=tmp_path / "q", path="layers", progress=False,
                   max_shard_bytes=SHARD, executor="local", workers=2, **CALIB).out
    assert all(same_bytes(ref, out).values())  # report.json included: same per-layer errors


@pytest.mark.parametrize("fmt", ["ascend", "mindspore"])
def test_embeddings_and_heads_written_in_row_chunks_give_the_same_bytes(fmt, fp8_model, layer_outputs, tmp_path,
                                                                         monkeypatch):
    """The layer path writes the embeddings and heads (main and MTP; R1: 1.85 GB of bf16 each) row chunk by row
    chunk from the source, in every layout but compressed-tensors: the same checkpoint as writing them whole."""
    from goldstick.engine import pipeline

    whole = layer_outputs("deepseek-r1-w8a8-dynamic") if fmt == "ascend" else quantize(
        fp8_model, "deepseek-r1-w8a8-dynamic", out=tmp_path / "whole", path="layers", progress=False,
        max_shard_bytes=SHARD, export_format=fmt, **CALIB).out
    chunks = []
    real_row_chunks = pipeline.row_chunks

    def counted(reader, name):
        for start, rows in real_row_chunks(reader, name):
            chunks.append((name, start))
            yield start, rows
    monkeypatch.setattr(pipeline, "CHUNKED_BYTES", 1)
    monkeypatch.setattr(pipeline, "ROW_CHUNK_BYTES", 4096)
    monkeypatch.setattr(pipeline, "row_chunks", counted)
    out = quantize(fp8_model, "deepseek-r1-w8a8-dynamic", out=tmp_path / "chunked", path="layers", progress=False,
                   max_shard_bytes=SHARD, export_format=fmt, **CALIB).out
    written = {name for name, _ in chunks}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= written
    assert any(n.startswith(f"model.layers.{CheckpointReader(fp8_model).config.num_hidden_layers}.") for n in written)
    assert sum(name == "lm_head.weight" for name, _ in chunks) > 1
    assert all(same_bytes(whole, out).values())


@pytest.mark.slow
def test_ray_executor_gives_the_local_executors_bytes(fp8_model, tmp_path):
    """A local Ray instance (2 CPUs, loopback) runs the units as Ray tasks: the same bytes as local processes,
    for the streamed path and for the layer path's expert quantization."""
    ray = pytest.importorskip("ray")
    from goldstick.engine.executors import RayExecutor

    local = stream_quantize(fp8_model, "deepseek-r1-w8a16", tmp_path / "local", executor="local",
                            progress=False, max_shard_bytes=SHARD).out
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayExecutor() as ex:
            assert ex.workers == 2
            streamed = stream_quantize(fp8_model, "deepseek-r1-w8a16", tmp_path / "ray", executor=ex,
                                       progress=False, max_shard_bytes=SHARD).out
            units = [(np.random.default_rng(k).standard_normal((64, 32), dtype=np.float32), "absmax127")
                     for k in range(4)]
            from goldstick.engine.layer import quantize_weight_unit

            for (q, s), (rq, rs) in zip(ex.map(quantize_weight_unit, units), map(quantize_weight_unit, units)):
                assert np.array_equal(q, rq) and np.array_equal(s, rs)
    finally:
        ray.shutdown()
    assert all(same_bytes(local, streamed).values())
    assert (local / "manifest.json").read_bytes() == (streamed / "manifest.json").read_bytes()


# ---- make-model overrides (the benchmark's R1-width models) -------------------------------------------------
def test_make_model_overrides(tmp_path):
    from goldstick.model.config import ConfigError, ModelConfig
    from goldstick.testing.make_model import make_model

    with pytest.raises(ValueError, match="hidden_sise are not DeepSeek-V3 config fields"):
        make_model(tmp_path / "a", size="tiny", overrides={"hidden_sise": 512})
    with pytest.raises(ConfigError, match="num_experts_per_tok exceeds the experts left"):
        make_model(tmp_path / "b", size="tiny", overrides={"n_routed_experts": 4, "n_group": 2, "topk_group": 1})
    assert not (tmp_path / "b").exists()
    made = make_model(tmp_path / "c", size="tiny", fp8=True, overrides={"n_routed_experts": 8, "num_hidden_layers": 2})
    cfg = ModelConfig.from_file(made)
    assert (cfg.n_routed_experts, cfg.num_hidden_layers) == (8, 2)
    assert json.loads((made / "make_model.json").read_text())["overrides"] == {"n_routed_experts": 8,
                                                                              "num_hidden_layers": 2}
    CheckpointReader(made).close()  # a complete, valid checkpoint
