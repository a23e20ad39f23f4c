"""CheckpointReader: formats, layouts, MTP listing, every bad-checkpoint case and flat memory over a layer walk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from ckpt_factory import CROSS_SHARD_WEIGHT, is_fp8_linear, shard_name, small_config, write_checkpoint
from safetensors.numpy import load_file, save_file

from goldstick.io.checkpoint import CheckpointError, CheckpointReader
from goldstick.quant.fp8 import FP8, quantize_fp8_blocks

REPO = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"
LAYOUTS = {"single": None, "sharded": 3}


def reference_dequant(fp8: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """W = fp8 * scale_inv of its 128x128 block, written independently of goldstick.quant.fp8."""
    rows, cols = fp8.shape
    per_element = np.kron(scale_inv, np.ones((128, 128), np.float32))[:rows, :cols]
    return fp8.astype(np.float32) * per_element


def rewrite_shard(path: Path, edit) -> None:
    """Load one safetensors file, let ``edit`` change the dict of arrays, write it back."""
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def edit_index(directory: Path, edit) -> None:
    index = json.loads((directory / INDEX).read_text())
    edit(index["weight_map"])
    (directory / INDEX).write_text(json.dumps(index))


def shard_of(directory: Path, name: str) -> str:
    return json.loads((directory / INDEX).read_text())["weight_map"][name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(format, layout) -> (directory, float32 source), built once for the read-only tests."""
    built = {}
    for fmt in ("f32", "bf16", "f16", "fp8"):
        for layout, shards in LAYOUTS.items():
            directory = tmp_path_factory.mktemp(f"{fmt}-{layout}")
            built[fmt, layout] = directory, write_checkpoint(directory, small_config(), fmt, shards=shards, seed=0)
    return built


# ---- reading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt, stored_dtype, numpy_dtype, rtol, atol", [
    ("f32", "F32", np.float32, 0.0, 0.0),
    ("bf16", "BF16", ml_dtypes.bfloat16, 2.0 ** -8, 0.0),
    ("f16", "F16", np.float16, 2.0 ** -11, 2.0 ** -25),  # half the subnormal step of float16
])
def test_plain_formats_read_as_float32(checkpoints, fmt, layout, stored_dtype, numpy_dtype, rtol, atol):
    directory, source = checkpoints[fmt, layout]
    reader = CheckpointReader(directory)
    assert sorted(reader.names()) == sorted(source)
    for name, value in source.items():
        assert reader.dtype(name) == stored_dtype
        assert reader.shape(name) == value.shape
        got = reader.read(name)
        assert got.dtype == np.float32 and got.shape == value.shape
        np.testing.assert_array_equal(got, value.astype(numpy_dtype).astype(np.float32))
        np.testing.assert_allclose(got, value, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp8_reads_are_exact_dequantizations_close_to_the_source(checkpoints, layout):
    directory, source = checkpoints["fp8", layout]
    reader = CheckpointReader(directory)
    fp8_names = [name for name in reader.names() if reader.dtype(name) == "F8_E4M3"]
    assert sorted(fp8_names) == sorted(name for name in source if is_fp8_linear(name, source[name].shape))
    assert any(max(reader.shape(name + "_scale_inv")) > 1 for name in fp8_names)  # ragged multi-block grids
    for name, value in source.items():
        got = reader.read(name)
        assert got.dtype == np.float32 and got.shape == value.shape
        if name in fp8_names:
            fp8, scale_inv = reader.read_raw(name), reader.read_raw(name + "_scale_inv")
            np.testing.assert_array_equal(got, reference_dequant(fp8, scale_inv))
            # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus half a subnormal step near zero
            step = reference_dequant(np.ones_like(fp8), scale_inv) * 2.0 ** -10
            assert np.all(np.abs(got - value) <= np.abs(value) * 2.0 ** -4 + step), name
        elif reader.dtype(name) == "BF16":
            np.testing.assert_allclose(got, value, rtol=2.0 ** -8, atol=0)
        else:
            assert reader.dtype(name) == "F32" and name.endswith("e_score_correction_bias")
            np.testing.assert_array_equal(got, value)


def test_fp8_scale_in_another_shard_is_resolved_through_the_index(checkpoints):
    directory, source = checkpoints["fp8", "sharded"]
    reader = CheckpointReader(directory)
    scale = CROSS_SHARD_WEIGHT + "_scale_inv"
    assert reader.file_of(CROSS_SHARD_WEIGHT) != reader.file_of(scale)
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    assert reader.file_of(scale) == weight_map[scale]
    expected = reference_dequant(*quantize_fp8_blocks(source[CROSS_SHARD_WEIGHT]))
    np.testing.assert_array_equal(reader.read(CROSS_SHARD_WEIGHT), expected)


def test_read_raw_returns_the_stored_dtype_and_bits(checkpoints):
    directory, source = checkpoints["fp8", "sharded"]
    reader = CheckpointReader(directory)
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    raw = reader.read_raw(name)
    fp8, scale_inv = quantize_fp8_blocks(source[name])
    assert raw.dtype == FP8
    np.testing.assert_array_equal(raw.view(np.uint8), fp8.view(np.uint8))
    np.testing.assert_array_equal(reader.read_raw(name + "_scale_inv"), scale_inv)
    norm = reader.read_raw("model.norm.weight")
    assert norm.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(norm, source["model.norm.weight"].astype(ml_dtypes.bfloat16))
    assert raw.flags.writeable and raw.flags.owndata  # a copy, not a view of the mapped file


# ---- names, layers, MTP -----------------------------------------------------------------------------
def test_layer_and_global_listing(checkpoints):
    directory, source = checkpoints["fp8", "sharded"]
    config = small_config()
    with CheckpointReader(directory) as reader:
        assert not any(name.endswith("_scale_inv") for name in reader.names())
        assert reader.has(CROSS_SHARD_WEIGHT + "_scale_inv")
        assert not reader.has("model.layers.9.mlp.gate.weight")
        assert reader.layer_tensor_names(0) == list(config.layer_tensor_shapes(0))
        assert "model.layers.0.mlp.gate_proj.weight" in reader.layer_tensor_names(0)  # dense
        assert "model.layers.1.mlp.experts.7.up_proj.weight" in reader.layer_tensor_names(1)  # MoE
        assert set(reader.read_globals()) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        walked = list(reader.iter_layers(progress=False))
        assert [layer for layer, _ in walked] == [0, 1, 2, 3]
        for layer, tensors in walked:
            assert list(tensors) == reader.layer_tensor_names(layer)
            assert all(t.dtype == np.float32 and t.shape == source[n].shape for n, t in tensors.items())


def test_read_layer_reads_only_that_layer(checkpoints, monkeypatch):
    directory, _ = checkpoints["fp8", "sharded"]
    reader = CheckpointReader(directory)
    read_names = []
    original = CheckpointReader._convert_stored

    def spy(self, name, convert):
        read_names.append(name)
        return original(self, name, convert)

    monkeypatch.setattr(CheckpointReader, "_convert_stored", spy)
    tensors = reader.read_layer(2)
    assert set(tensors) == set(reader.layer_tensor_names(2))
    assert read_names and all(name.startswith("model.layers.2.") for name in read_names)


def test_opening_validates_from_headers_without_reading_data(checkpoints, monkeypatch):
    directory, _ = checkpoints["fp8", "sharded"]

    def no_data_reads(self, name, convert):
        raise AssertionError(f"validation read the data of {name}")

    monkeypatch.setattr(CheckpointReader, "_convert_stored", no_data_reads)
    reader = CheckpointReader(directory)
    reader.validate()


def test_mtp_and_unknown_tensors_are_listed_not_dropped(tmp_path):
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
             "vision_tower.proj.weight": np.ones((2, 2), np.float32)}
    source = write_checkpoint(tmp_path, small_config(), "fp8", shards=3, extra=extra)
    reader = CheckpointReader(tmp_path)
    mtp_extras = {f"model.layers.4.{n}.weight" for n in
                  ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head")}
    mtp_names = [name for name in source if name.startswith("model.layers.4.")]
    assert reader.mtp_layers() == [4]
    assert sorted(reader.mtp_tensor_names()) == sorted(mtp_names) == sorted(reader.mtp_tensor_names(4))
    assert mtp_extras <= set(mtp_names)
    assert "model.layers.4.self_attn.kv_b_proj.weight" in mtp_names  # attention and MoE named as main layers
    assert "model.layers.4.mlp.experts.5.gate_proj.weight" in mtp_names
    assert reader.mtp_tensor_names(3) == []
    assert sorted(reader.unknown_tensor_names()) == sorted(extra)
    main = {name for layer in range(4) for name in reader.layer_tensor_names(layer)}
    assert main.isdisjoint(mtp_names) and main.isdisjoint(extra)
    layer4 = reader.read_layer(4)
    assert set(layer4) == set(mtp_names)
    np.testing.assert_allclose(layer4["model.layers.4.enorm.weight"], source["model.layers.4.enorm.weight"],
                               rtol=2.0 ** -8)
    assert [layer for layer, _ in reader.iter_layers(progress=False)] == [0, 1, 2, 3]  # MTP not walked

    # with num_nextn_predict_layers=0 in config.json the stored layer 4 is still MTP, not unknown
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    reader = CheckpointReader(tmp_path)
    assert reader.mtp_layers() == [4] and sorted(reader.unknown_tensor_names()) == sorted(extra)


def test_mtp_layer_may_be_absent_as_a_whole(tmp_path):
    """transformers' save_pretrained drops layer num_hidden_layers but keeps num_nextn_predict_layers."""
    write_checkpoint(tmp_path, small_config(), "bf16", shards=2)
    edit_index(tmp_path, lambda wm: [wm.pop(n) for n in list(wm) if n.startswith("model.layers.4.")])
    reader = CheckpointReader(tmp_path)
    assert reader.config.num_nextn_predict_layers == 1
    assert reader.mtp_layers() == [] and reader.mtp_tensor_names() == [] and reader.unknown_tensor_names() == []


# ---- bad checkpoints --------------------------------------------------------------------------------
O_PROJ = "model.layers.2.self_attn.o_proj.weight"   # (64, 128) FP8, grid (1, 1)
Q_B = "model.layers.2.self_attn.q_b_proj.weight"    # (192, 32) FP8, grid (2, 1)


def missing_shard(d):
    (d / shard_name(2, 3)).unlink()
    return [shard_name(2, 3), "does not exist"]


def tensor_absent_from_index(d):
    edit_index(d, lambda wm: wm.pop(O_PROJ))
    return [INDEX, O_PROJ, "absent from the index"]


def mtp_tensor_absent_from_index(d):
    edit_index(d, lambda wm: wm.pop("model.layers.4.enorm.weight"))
    return [INDEX, "model.layers.4.enorm.weight", "MTP layer 4 is stored, but incomplete"]


def tensor_listed_in_wrong_shard(d):
    home = shard_of(d, O_PROJ)
    other = shard_name(3, 3) if home != shard_name(3, 3) else shard_name(1, 3)
    edit_index(d, lambda wm: wm.update({O_PROJ: other}))
    return [other, O_PROJ, "absent from the file"]


def shape_disagrees_with_config(d):
    def narrow(tensors):
        tensors[O_PROJ] = tensors[O_PROJ][:, :32].copy()
    rewrite_shard(d / shard_of(d, O_PROJ), narrow)
    return [shard_of(d, O_PROJ), O_PROJ, "(64, 32)", "(64, 128)"]


def missing_scale_inv(d):
    edit_index(d, lambda wm: wm.pop(Q_B + "_scale_inv"))
    return [shard_of(d, Q_B), Q_B, Q_B + "_scale_inv"]


def wrong_scale_grid(d):
    scale = Q_B + "_scale_inv"

    def shrink(tensors):
        tensors[scale] = tensors[scale][:1].copy()
    rewrite_shard(d / shard_of(d, scale), shrink)
    return [shard_of(d, scale), scale, "(1, 1)", "(2, 1)"]


def truncated_shard(d):
    path = d / shard_name(3, 3)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    last = max((e["data_offsets"][1], n) for n, e in json.loads(path.read_bytes()[8:8 + header_len]).items()
               if n != "__metadata__")[1]
    os.truncate(path, path.stat().st_size - 100)
    return [shard_name(3, 3), "truncated", last]


def truncated_inside_header(d):
    os.truncate(d / shard_name(1, 3), 40)
    return [shard_name(1, 3), "truncated"]


def corrupt_header_json(d):
    path = d / shard_name(2, 3)
    data = bytearray(path.read_bytes())
    data[8:20] = b"#" * 12
    path.write_bytes(bytes(data))
    return [shard_name(2, 3), "not valid JSON"]


def unreadable_dtype(d):
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    path = d / shard_of(d, name)
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header[name]["dtype"] = "U32"  # same size, but not a dtype goldstick reads
    # keep the length so the data offsets still hold
    text = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    assert len(text) == header_len
    path.write_bytes(data[:8] + text + data[8 + header_len:])
    return [shard_of(d, name), name, "U32"]


def bad_index_json(d):
    (d / INDEX).write_text('{"metadata": {}, "weight_map": {"lm_head.weight": ')
    return [INDEX, "JSON"]


def index_without_weight_map(d):
    (d / INDEX).write_text('{"metadata": {"total_size": 1}}')
    return [INDEX, "weight_map"]


def missing_config(d):
    (d / "config.json").unlink()
    return ["config.json"]


BREAKERS = [missing_shard, tensor_absent_from_index, mtp_tensor_absent_from_index, tensor_listed_in_wrong_shard,
            shape_disagrees_with_config, missing_scale_inv, wrong_scale_grid, truncated_shard,
            truncated_inside_header, corrupt_header_json, unreadable_dtype, bad_index_json,
            index_without_weight_map, missing_config]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__)
def test_bad_checkpoint_raises_one_clear_error(tmp_path, breaker):
    write_checkpoint(tmp_path, small_config(), "fp8", shards=3)
    weight_map = json.loads((tmp_path / INDEX).read_text())["weight_map"]
    expected_fragments = breaker(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        CheckpointReader(tmp_path)
    message = str(caught.value)
    for fragment in expected_fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if breaker is missing_shard:  # names one tensor the missing shard should hold
        held = re.search(r"tensor '([^']+)'", message).group(1)
        assert weight_map[held] == shard_name(2, 3)


def test_tensor_absent_from_single_file(tmp_path):
    write_checkpoint(tmp_path, small_config(), "bf16", shards=None)
    rewrite_shard(tmp_path / "model.safetensors", lambda tensors: tensors.pop(O_PROJ))
    with pytest.raises(CheckpointError, match=rf"^model\.safetensors: tensor '{re.escape(O_PROJ)}'.*absent"):
        CheckpointReader(tmp_path)


def test_unknown_name_is_a_checkpoint_error(checkpoints):
    reader = CheckpointReader(checkpoints["f32", "single"][0])
    with pytest.raises(CheckpointError, match="model.layers.99.mlp.gate.weight"):
        reader.read("model.layers.99.mlp.gate.weight")
    with pytest.raises(CheckpointError, match="layer 7"):
        reader.read_layer(7)


# ---- memory -----------------------------------------------------------------------------------------
def walk_config(layers: int):
    """Layers of ~3.7 MB in FP8 (~15 MB as float32): 8 experts of 256x512 plus a shared one and MLA."""
    return small_config(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_attention_heads=4,
                        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                        num_hidden_layers=layers, num_nextn_predict_layers=0)


def walk_peak(directory: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / "tests" / "ckpt_walk_peak.py"), str(directory)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux /proc")
def test_walk_peak_memory_does_not_grow_with_layer_count(tmp_path):
    few, many = 3, 12
    write_checkpoint(tmp_path / "few", walk_config(few), "fp8", shards=few, seed=0)
    write_checkpoint(tmp_path / "many", walk_config(many), "fp8", shards=many, seed=0)
    small, large = walk_peak(tmp_path / "few"), walk_peak(tmp_path / "many")
    layer_kib = large["largest_layer_f32_bytes"] / 1024
    assert layer_kib > 10 * 1024  # big enough that keeping layers (or their mapped pages) would show
    print(f"\npeak RSS growth: {few} layers {small['growth_kib'] / 1024:.1f} MiB, {many} layers "
          f"{large['growth_kib'] / 1024:.1f} MiB; one layer {layer_kib / 1024:.1f} MiB float32")
    assert large["growth_kib"] <= small["growth_kib"] + max(4 * 1024, 0.25 * layer_kib)
    assert large["growth_kib"] < 2 * layer_kib  # vs 12 layers = 12x this if layers were kept
