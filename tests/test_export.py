"""Checkpoint formats (goldstick.io.export): the mindspore contract, compressed-tensors export, refusals, round trips.

Which shipped recipes each format accepts (the decision these tests pin down):

    recipe                          mindspore   compressed-tensors
    deepseek-r1-w8a8-dynamic        yes         yes (int-quantized, dynamic per-token)
    deepseek-r1-w8a16               yes         yes (pack-quantized, weight-only)
    deepseek-r1-w8a8-static-naive   yes         no: static activations on routed experts
    deepseek-r1-w8a8-smoothquant    yes         no: static activations on routed experts; per-channel input scales
    deepseek-r1-w8a8-mixed          yes         no: OS+ shifts (norm biases, beta, quant_bias terms)

A static recipe compressed-tensors does take (MLA static with SmoothQuant folded into the norms, o_proj plain,
FFN dynamic) covers its static per-tensor asymmetric path.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import goldstick
from goldstick.cli import main as cli
from goldstick.engine.pipeline import quantize
from goldstick.io.checkpoint import CheckpointReader
from goldstick.io.export import (
    COMPRESSED_TENSORS,
    ExportError,
    check_plan,
    ct_targets,
    export_checkpoint,
    open_source,
    pack_int8,
    summarize_names,
    unpack_int8,
)
from goldstick.io.files import sha256_file
from goldstick.model.architecture import layer_of
from goldstick.quant import schemes
from goldstick.quant.recipe import Recipe, Rule, Scheme, load_recipe
from goldstick.testing.make_model import default_model_path

BF16 = np.dtype(ml_dtypes.bfloat16)
FAST = dict(calib_samples=2, calib_seq_len=16, progress=False)
SHIPPED = ["deepseek-r1-w8a8-dynamic", "deepseek-r1-w8a16", "deepseek-r1-w8a8-static-naive",
           "deepseek-r1-w8a8-smoothquant", "deepseek-r1-w8a8-mixed"]
ATTN_STATIC = "attn-static"  # the test recipe below
# compressed-tensors refusals per shipped recipe: REFUSALS keys found in the tensors (None = exported)
CT_REFUSES = {
    "deepseek-r1-w8a8-dynamic": None,
    "deepseek-r1-w8a16": None,
    "deepseek-r1-w8a8-static-naive": {"moe-static"},
    "deepseek-r1-w8a8-smoothquant": {"moe-static", "per-channel-input"},
    "deepseek-r1-w8a8-mixed": {"norm-bias", "beta", "quant-bias", "per-channel-input"},
}
EXPORTABLE = ["deepseek-r1-w8a8-dynamic", "deepseek-r1-w8a16", ATTN_STATIC]


def _recipe(key: str) -> Recipe:
    if key == ATTN_STATIC:
        return Recipe(name="attn-static-ffn-dynamic", rules=(
            Rule(r".*\.mlp\.gate|.*\.self_attn\.kv_b_proj|lm_head", "float"),
            Rule(r".*\.self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa)", Scheme("w8a8-static", "smoothquant")),
            Rule(r".*\.self_attn\.o_proj", "w8a8-static"),
            Rule(r".*\.mlp\..*_proj", "w8a8-dynamic")))
    recipe = load_recipe(key)
    if key == "deepseek-r1-w8a8-mixed":  # the same rules and export structure, a much shorter OS+ search
        recipe = dataclasses.replace(recipe, options=dataclasses.replace(recipe.options, osplus_grid=2,
                                                                         token_sample=16))
    return recipe


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(recipe, format)`` -> a quantized checkpoint folder, made once per module."""
    cache: dict[tuple[str, str], Path] = {}

    def get(key: str, fmt: str = "mindspore") -> Path:
        if (key, fmt) not in cache:
            out = tmp_path_factory.mktemp("quantized") / f"{key}-{fmt}"
            quantize(default_model_path(), _recipe(key), out=out, export_format=fmt, **FAST)
            cache[key, fmt] = out
        return cache[key, fmt]
    return get


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory):
    """``exported(recipe)`` -> the mindspore checkpoint converted to compressed-tensors by ``export_checkpoint``
    (small shards, so the index and the cap are exercised)."""
    cache: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in cache:
            out = tmp_path_factory.mktemp("ct") / key
            cache[key] = export_checkpoint(built(key), out, COMPRESSED_TENSORS, max_shard_bytes=1 << 20)
        return cache[key]
    return get


def tensors_of(folder: Path) -> dict[str, np.ndarray]:
    reader = open_source(folder).reader
    return {name: reader.read_raw(name) for name in reader.names()}


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert ta[name].tobytes() == tb[name].tobytes(), name


def assert_complete_folder(folder: Path) -> None:
    """Manifest last and complete, index consistent, no temporaries, tokenizer copied."""
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert not [f for f in files if Path(f).name.startswith(".") or "tmp" in f or "partial" in f], files
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == files - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(folder / name) and entry["bytes"] == (folder / name).stat().st_size
    assert max((folder / f).stat().st_mtime_ns for f in files) == (folder / "manifest.json").stat().st_mtime_ns
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = {f for f in files if f.endswith(".safetensors")}
    assert set(index["weight_map"].values()) == shards
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "recipe.yaml",
                  "report.json", "report.md", "config.json"):
        assert extra in files, extra
    src = default_model_path()
    assert (folder / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def logits(folder: Path) -> np.ndarray:
    from mindspore import Tensor

    ids = np.random.default_rng(0).integers(2, 3000, size=(2, 24)).astype(np.int32)
    return goldstick.load_model(folder)(Tensor(ids)).asnumpy()


# ------------------------------------------------------------------------------------------------ 1. mindspore contract
# Per-linear tensors, notes/golden-stick.md §2.1 (Golden-Stick 1.4.1 *McoreLinearInferCell) and §3.2
# (MindFormers A8W8LinearMethod / A8W8DynamicLinearMethod): name -> (dtype, shape as a function of [out, in]).
MS_CONTRACT = {
    "W8A8": {"weight": (np.int8, lambda o, i: (o, i)),          # round(W / s_w), symmetric, [-128, 127]
             "deq_scale": (np.float32, lambda o, i: (o,)),       # fp32 when the compute dtype is bf16 (dense)
             "quant_bias": (np.int32, lambda o, i: (o,)),        # -zp * sum_k Wq[n, k] (+ the OS+ term)
             "input_scale": (BF16, lambda o, i: (i,)),           # per input channel, a divisor (QuantV2)
             "input_offset": (np.int8, lambda o, i: (i,)),       # the activation zero point, tiled to [in]
             "beta": (BF16, lambda o, i: (i,))},                 # OS+ shift (msModelSlim-style), optional
    "W8A8_DYNAMIC": {"weight": (np.int8, lambda o, i: (o, i)), "weight_scale": (BF16, lambda o, i: (o,)),
                     "weight_offset": (np.int32, lambda o, i: (o,))},
    "W8A16": {"weight": (np.int8, lambda o, i: (o, i)), "weight_scale": (BF16, lambda o, i: (o,)),
              "weight_offset": (np.int32, lambda o, i: (o,))},
}


def _exact_act_scale(input_scale: np.ndarray, reported: float) -> np.float32:
    """The per-tensor activation scale s_x: input_scale itself when no smoothing stayed explicit, else the bf16
    value the report (8 decimals) names; both are bf16, the engine rounds s_x up to bf16 before use."""
    if np.all(input_scale == input_scale[0]):
        assert input_scale[0] == pytest.approx(reported, rel=1e-5, abs=1e-8)
        return np.float32(input_scale[0])
    act = np.float32(np.float32(reported).astype(BF16))
    assert act == pytest.approx(reported, rel=1e-5, abs=1e-8)
    return act


@pytest.mark.slow
@pytest.mark.parametrize("recipe", SHIPPED)
def test_mindspore_contract(built, recipe):
    folder = built(recipe)
    reader = CheckpointReader(folder)
    source = CheckpointReader(default_model_path())
    cfg = reader.config
    labels = json.loads((folder / "quantization_description.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    plan = _recipe(recipe).plan(cfg)

    # quantization_description.json (§2.2, §3.2): one of the four labels for every tensor, and nothing else
    assert set(labels) == set(reader.names())
    assert set(labels.values()) <= {"W8A8", "W8A8_DYNAMIC", "W8A16", "FLOAT"}

    # config.json: R1's FP8 block config is gone, ours names the format; weights are bf16
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "golden-stick" and qc["format"] == "mindspore"
    assert "weight_block_size" not in qc and "fmt" not in qc and "activation_scheme" not in qc
    assert config["torch_dtype"] == "bfloat16"

    owners: dict[str, dict[str, np.ndarray]] = {}
    for name in reader.names():
        owner, _, local = name.rpartition(".")
        if labels[name] == "FLOAT":
            # float tensors are bf16 (the router's e_score_correction_bias stays fp32, as in R1)
            want = np.float32 if name.endswith("e_score_correction_bias") else BF16
            assert reader.read_raw(name).dtype == want, name
            if local == "bias":  # an OS+ shift folded into the norm (§2.3: input_layernorm / q_a_layernorm.bias)
                assert recipe == "deepseek-r1-w8a8-mixed" and owner.endswith(("input_layernorm", "q_a_layernorm"))
            continue
        owners.setdefault(owner, {})[local] = reader.read_raw(name)

    # every planned linear is stored under its scheme's label; MTP is passed through unquantized
    for entry in plan:
        want = {"float": "FLOAT", "w8a16": "W8A16", "w8a8-dynamic": "W8A8_DYNAMIC",
                "w8a8-static": "W8A8"}[entry.scheme.name]
        assert labels[f"{entry.name}.weight"] == want, entry.name
    for name in reader.mtp_tensor_names():
        assert labels[name] == "FLOAT"
        raw = reader.read_raw(name)
        expected = source.read(name)
        if raw.dtype == BF16:
            expected = expected.astype(BF16)
        assert np.array_equal(raw.astype(np.float32), expected.astype(np.float32)), name

    layer_reports = {layer["layer"]: layer for layer in report["layers"]}
    for owner, t in owners.items():
        label = labels[f"{owner}.weight"]
        q = t["weight"]
        out_f, in_f = q.shape
        contract = MS_CONTRACT[label]
        assert set(t) <= set(contract) and set(t) >= set(contract) - {"beta"}, (owner, sorted(t))
        for local, array in t.items():
            dtype, shape = contract[local]
            assert array.dtype == np.dtype(dtype) and array.shape == shape(out_f, in_f), (owner, local)
        # weights: per output channel, symmetric, the largest |code| of a non-zero row near 127 (scale = absmax/127
        # rounded up to bf16, or absmax/127.5 with the gs rounding, where -128 may appear)
        row_max = np.abs(q.astype(np.int16)).max(axis=1)
        assert np.all((row_max == 0) | ((row_max >= 125) & (row_max <= 128))), owner
        if label != "W8A8":
            assert not t["weight_offset"].any(), owner  # zeros: symmetric weights (GS stores -zp)
            assert np.all(t["weight_scale"].astype(np.float32) > 0), owner
            continue

        # static W8A8. QuantV2 convention (§2.1, §3.2): x_q = clip(round(x / input_scale + input_offset)), so the
        # offset is the zero point with the sign it has in x/s + zp; the zero point is one per tensor, tiled
        offset = t["input_offset"].astype(np.int64)
        assert np.all(offset == offset[0]), owner
        zp = int(offset[0])
        input_scale = t["input_scale"].astype(np.float32)
        assert np.all(input_scale > 0)
        act = _exact_act_scale(input_scale, layer_reports[_layer(owner)]["linears"][owner]["activation"]["scale"])
        assert layer_reports[_layer(owner)]["linears"][owner]["activation"]["zero_point"] == zp
        # deq_scale = s_x * s_w[n] (§2.1): s_w is a positive bf16 per-channel scale, the product exact in fp32
        deq = t["deq_scale"]
        w_scale = (deq.astype(np.float64) / np.float64(act)).astype(np.float32)
        assert np.all(w_scale > 0)
        assert np.array_equal(w_scale.astype(BF16).astype(np.float32), w_scale), owner
        assert np.array_equal((np.float64(act) * w_scale.astype(np.float64)).astype(np.float32), deq), owner
        # quant_bias (int32) = -zp * sum_k Wq[n, k]  +  round((W @ shift)[n] / deq_scale[n]) for an OS+ shift
        zp_term = -zp * q.astype(np.int64).sum(axis=1)
        shift = _osplus_shift(reader, source, owner, t)
        extra = t["quant_bias"].astype(np.int64) - zp_term
        if shift is None:
            assert not extra.any(), owner
        else:
            w = source.read(f"{owner}.weight").astype(np.float64)
            term = (w @ shift.astype(np.float64)) / deq.astype(np.float64)
            assert np.abs(extra - term).max() <= 0.5 + 1e-3 * max(1.0, np.abs(term).max()), owner
            assert np.mean(extra == np.rint(term)) > 0.99, owner


def _layer(name: str) -> int:
    return int(re.match(r"model\.layers\.(\d+)\.", name).group(1))


def _osplus_shift(reader: CheckpointReader, source: CheckpointReader, owner: str, t: dict) -> np.ndarray | None:
    """The OS+ shift z of a static linear's input (x_quantized = (x - z) / s), from where the export keeps it:
    ``beta = -z`` of the linear, or the bias of the norm feeding it (bias = -z / s, with s = gamma / gamma')."""
    if "beta" in t:
        return -t["beta"].astype(np.float32)
    prefix = owner.rsplit(".", 2)[0]  # model.layers.N
    norm = {"q_a_proj": "input_layernorm", "kv_a_proj_with_mqa": "input_layernorm", "q_proj": "input_layernorm",
            "q_b_proj": "self_attn.q_a_layernorm"}.get(owner.rsplit(".", 1)[1])
    if norm is None or not reader.has(f"{prefix}.{norm}.bias"):
        return None
    gamma = source.read(f"{prefix}.{norm}.weight")
    stored_gamma = reader.read(f"{prefix}.{norm}.weight")
    scale = np.where(stored_gamma != 0, gamma / np.where(stored_gamma != 0, stored_gamma, 1), 1).astype(np.float32)
    return (-reader.read(f"{prefix}.{norm}.bias") * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------------ 2. refusals
@pytest.mark.parametrize("recipe", SHIPPED)
def test_plan_check_before_calibrating(recipe, tmp_path):
    """quantize(..., export_format="compressed-tensors") refuses a recipe before any calibration work."""
    cfg = CheckpointReader(default_model_path()).config
    plan = _recipe(recipe).plan(cfg)
    check_plan(cfg, plan, "mindspore")  # the mindspore layout holds every recipe
    expected = {"deepseek-r1-w8a8-static-naive": ["moe-static"],
                "deepseek-r1-w8a8-smoothquant": ["moe-static", "per-channel-input"],
                "deepseek-r1-w8a8-mixed": ["norm-bias", "beta", "quant-bias"]}.get(recipe)
    if expected is None:
        check_plan(cfg, plan, COMPRESSED_TENSORS)
        return
    with pytest.raises(ExportError) as err:
        quantize(default_model_path(), _recipe(recipe), out=tmp_path / "out", export_format=COMPRESSED_TENSORS,
                 **FAST)
    assert not (tmp_path / "out").exists()
    _assert_refusal(str(err.value), expected)


def _assert_refusal(message: str, keys) -> None:
    from goldstick.io.export import CT_REFUSALS as REFUSALS

    assert "cannot be written as compressed-tensors" in message
    for key, text in REFUSALS.items():
        assert (text in message) == (key in keys), (key, message)
    if "moe-static" in keys:
        assert "model.layers.{1-3}.mlp.experts.{0-15}.{down_proj,gate_proj,up_proj} (144)" in message
    if "norm-bias" in keys:
        assert "model.layers.{0-3}.input_layernorm.bias (4)" in message
        assert "model.layers.{0-3}.self_attn.q_a_layernorm.bias (4)" in message
    if "beta" in keys:
        assert "model.layers.{0-3}.self_attn.o_proj (4)" in message


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [r for r in SHIPPED if CT_REFUSES[r]])
def test_export_refuses_from_tensors(built, recipe, tmp_path):
    """The tensors themselves, not the recipe, decide: every offending layer is named, nothing is left behind."""
    with pytest.raises(ExportError) as err:
        export_checkpoint(built(recipe), tmp_path / "ct", COMPRESSED_TENSORS)
    _assert_refusal(str(err.value), CT_REFUSES[recipe])
    assert not (tmp_path / "ct").exists()


def test_export_rejects_wrong_inputs(tmp_path):
    with pytest.raises(ExportError, match="not a quantized goldstick checkpoint"):
        export_checkpoint(default_model_path(), tmp_path / "x", COMPRESSED_TENSORS)
    with pytest.raises(ExportError, match="unknown checkpoint format"):
        export_checkpoint(default_model_path(), tmp_path / "x", "gguf")


# ---------------------------------------------------------------------------------------------- 3-4. compressed-tensors
@pytest.mark.slow
@pytest.mark.parametrize("recipe", EXPORTABLE)
def test_compressed_tensors_layout_and_round_trip(built, exported, recipe, tmp_path):
    ms_dir, ct_dir = built(recipe), exported(recipe)
    assert_complete_folder(ms_dir)
    assert_complete_folder(ct_dir)
    assert len(list(ct_dir.glob("model-*.safetensors"))) > 1  # the 1 MB cap split it
    config = json.loads((ct_dir / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert "weight_block_size" not in qc and config["torch_dtype"] == "bfloat16"
    assert not (ct_dir / "quantization_description.json").exists()
    # ignore: exactly the float linears of the main network (as compressed-tensors lists them) + the MTP layer
    cfg = CheckpointReader(ms_dir).config
    plan = _recipe(recipe).plan(cfg)
    floats = [e.name for e in plan if not e.scheme.quantized]
    assert qc["ignore"] == [n for n in cfg.linear_names() if n in floats] + [r"re:^model\.layers\.4\."]
    schemes = {e.scheme.name for e in plan if e.scheme.quantized}
    groups = list(qc["config_groups"].values())
    assert len(groups) == len(schemes)
    assert qc["format"] == ({"w8a16": "pack-quantized"}.get(next(iter(schemes)), "int-quantized")
                            if len(schemes) == 1 else "int-quantized")
    if len(groups) == 1:
        assert groups[0]["targets"] == ["Linear"]

    # tensors per linear, as compressed-tensors' int-quantized / pack-quantized compressors write them
    reader = open_source(ct_dir).reader
    for entry in plan:
        name, kind = entry.name, entry.scheme.name
        stored = {n.rsplit(".", 1)[1]: n for n in reader.names() if n.rsplit(".", 1)[0] == name}
        out_f, in_f = CheckpointReader(ms_dir).shape(f"{name}.weight")
        if kind == "float":
            assert reader.dtype(f"{name}.weight") == "BF16"
            continue
        if kind == "w8a16":
            assert set(stored) == {"weight_packed", "weight_shape", "weight_scale"}
            assert (reader.dtype(f"{name}.weight_packed"), reader.shape(f"{name}.weight_packed")) == \
                ("I32", (out_f, -(-in_f // 4)))
            assert reader.read_raw(f"{name}.weight_shape").tolist() == [out_f, in_f]
        else:
            assert (reader.dtype(f"{name}.weight"), reader.shape(f"{name}.weight")) == ("I8", (out_f, in_f))
        assert (reader.dtype(f"{name}.weight_scale"), reader.shape(f"{name}.weight_scale")) == ("BF16", (out_f, 1))
        if kind == "w8a8-dynamic":
            assert set(stored) == {"weight", "weight_scale"}  # no activation tensors, no symmetric zero points
        if kind == "w8a8-static":
            assert set(stored) == {"weight", "weight_scale", "input_scale", "input_zero_point"}
            assert (reader.dtype(f"{name}.input_scale"), reader.shape(f"{name}.input_scale")) == ("BF16", (1,))
            assert (reader.dtype(f"{name}.input_zero_point"),
                    reader.shape(f"{name}.input_zero_point")) == ("I8", (1,))

    # the same logits as the mindspore-format load (the same integer cells)
    ref, got = logits(ms_dir), logits(ct_dir)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    # and back: compressed-tensors -> mindspore gives the original tensors bit for bit, and the same config
    back = export_checkpoint(ct_dir, tmp_path / "back", "mindspore", max_shard_bytes=1 << 30)
    assert_same_tensors(ms_dir, back)
    assert json.loads((back / "quantization_description.json").read_text()) == \
        json.loads((ms_dir / "quantization_description.json").read_text())
    assert json.loads((back / "config.json").read_text()) == json.loads((ms_dir / "config.json").read_text())
    assert_complete_folder(back)


@pytest.mark.slow
def test_quantize_writes_compressed_tensors_directly(built, exported):
    """quantize(..., export_format="compressed-tensors") = quantize to mindspore, then export: the same tensors."""
    direct = built(ATTN_STATIC, COMPRESSED_TENSORS)
    assert_complete_folder(direct)
    assert_same_tensors(direct, exported(ATTN_STATIC))
    ours = json.loads((direct / "config.json").read_text())["quantization_config"]
    assert ours == json.loads((exported(ATTN_STATIC) / "config.json").read_text())["quantization_config"]


# ------------------------------------------------------------------------------------------------ 5. the library itself
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["deepseek-r1-w8a16", ATTN_STATIC])  # pack-quantized; int-quantized x 2 groups
def test_compressed_tensors_library_reads_it(exported, recipe):
    """compressed-tensors' own config classes parse our config, its matching attaches each scheme to the right
    linear, its compressor expects exactly our tensor names/dtypes/shapes, and its decompression gives back
    weight x weight_scale."""
    pytest.importorskip("compressed_tensors")
    torch = pytest.importorskip("torch")
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file

    folder = exported(recipe)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    qconfig = QuantizationConfig.model_validate(qc)
    assert qconfig.quantization_status == "compressed" and qconfig.format == qc["format"]
    from transformers import CompressedTensorsConfig  # what transformers / vLLM hand to ModelCompressor
    assert ModelCompressor.from_compression_config(CompressedTensorsConfig(**qc)).quantization_config == qconfig

    state = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        state.update(load_file(shard))
    cfg = CheckpointReader(default_model_path()).config
    plan = _recipe(recipe).plan(cfg)
    # a bf16 skeleton of the main network's linears, named as in the checkpoint
    root = torch.nn.Module()
    for name in cfg.linear_names():
        out_f, in_f = (tuple(state[f"{name}.weight_shape"].tolist()) if f"{name}.weight_packed" in state
                       else tuple(state[f"{name}.weight"].shape))
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16))
    apply_quantization_config(root, qconfig)
    for entry in plan:
        scheme = getattr(root.get_submodule(entry.name), "quantization_scheme", None)
        if not entry.scheme.quantized:
            assert scheme is None, entry.name
            continue
        want = schemes.SCHEMES[entry.scheme.name].compressed_tensors
        acts = scheme.input_activations
        assert scheme.format == want.format, entry.name
        assert (acts is None) == (want.input_activations is None), entry.name
        if acts is not None:
            assert acts.strategy == want.input_activations["strategy"] and acts.dynamic == \
                want.input_activations["dynamic"] and acts.symmetric == want.input_activations["symmetric"]
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(root)
    expected = root.state_dict()
    ours = {k: v for k, v in state.items() if k in expected or (k.rpartition(".")[0] in set(cfg.linear_names())
                                                                 and not k.endswith("e_score_correction_bias"))}
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert (ours[key].dtype, tuple(ours[key].shape)) == (value.dtype, tuple(value.shape)), key
    root.load_state_dict(ours, strict=True)
    compressor.decompress_model(root)

    reference = {name: value for name, label, value in open_source(folder).entries(include_mtp=False)
                 if label != "FLOAT"}
    assert len(reference) == sum(e.scheme.quantized for e in plan)
    for name, t in reference.items():
        scale = (t["weight_scale"] if "weight_scale" in t
                 else (t["deq_scale"].astype(np.float64) / t["input_scale"].astype(np.float64)[0]))
        ours_f32 = t["weight"].astype(np.float32) * np.asarray(scale, np.float32)[:, None]
        # in the bf16 model: the bf16 rounding of the exact product
        got = root.get_submodule(name).weight.detach().float().numpy()
        assert np.array_equal(got, ours_f32.astype(BF16).astype(np.float32)), name
        # with a float32 scale (as vLLM holds it): exactly our float32 dequantized weight
        group = root.get_submodule(name).quantization_scheme
        local = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == name}
        local["weight_scale"] = local["weight_scale"].float()
        decompressed = BaseCompressor.get_value_from_registry(group.format).decompress(local, group)
        assert np.array_equal(decompressed["weight"].numpy(), ours_f32), name


@pytest.mark.slow
def test_fp8_source_leaves_no_fp8_config(tmp_path):
    """From an R1-format FP8 source: R1's FP8 block quantization_config is replaced in both formats, and the MTP
    layer (FP8 in R1) is passed through dequantized to bf16."""
    from goldstick.testing.make_model import make_model

    fp8 = make_model(tmp_path / "fp8", fp8=True)
    assert json.loads((fp8 / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    ct = tmp_path / "ct"
    quantize(fp8, "deepseek-r1-w8a8-dynamic", out=ct, export_format=COMPRESSED_TENSORS, **FAST)
    ms = export_checkpoint(ct, tmp_path / "ms", "mindspore")
    source = CheckpointReader(fp8)
    for folder, method in ((ct, "compressed-tensors"), (ms, "golden-stick")):
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == method
        assert not {"weight_block_size", "fmt", "activation_scheme"} & set(qc)
        reader = CheckpointReader(folder)
        assert not [n for n in reader.names() if n.endswith("_scale_inv")]
        for name in reader.mtp_tensor_names():
            raw = reader.read_raw(name)
            assert raw.dtype == (np.float32 if name.endswith("e_score_correction_bias") else BF16), name
            assert np.array_equal(raw.astype(np.float32),
                                  source.read(name).astype(raw.dtype).astype(np.float32)), name
    assert np.abs(logits(ct) - logits(ms)).max() == 0


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_cli_export_and_refusal(built, tmp_path, capsys):
    assert cli(["export", str(built("deepseek-r1-w8a8-dynamic")), "--format", "compressed-tensors",
                "--out", str(tmp_path / "ct")]) == 0
    assert "exported" in capsys.readouterr().out
    assert_complete_folder(tmp_path / "ct")
    assert cli(["export", str(tmp_path / "ct"), "--format", "compressed-tensors", "--out", str(tmp_path / "y")]) == 2
    assert "already in the compressed-tensors format" in capsys.readouterr().err
    assert cli(["export", str(built("deepseek-r1-w8a8-static-naive")), "--format", "compressed-tensors",
                "--out", str(tmp_path / "z")]) == 2
    assert "static int8 activations on routed MoE experts" in capsys.readouterr().err
    assert cli(["export", str(tmp_path / "ct"), "--format", "mindspore", "--out", str(tmp_path / "ct")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_quantize_format_refusal(tmp_path, capsys):
    assert cli(["quantize", "deepseek-r1-w8a8-mixed", "--format", "compressed-tensors", "--out",
                str(tmp_path / "q"), "--no-progress"]) == 2
    assert "OS+ shift folded into a norm bias" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------------------------ helpers
def test_pack_int8_matches_layout():
    q = np.random.default_rng(1).integers(-128, 128, size=(5, 10)).astype(np.int8)  # 10: padded to 12
    packed = pack_int8(q)
    assert packed.dtype == np.int32 and packed.shape == (5, 3)
    # element k of a row sits in bits 8*(k%4).. of word k//4, stored unsigned (q + 128)
    assert (int(packed[2, 1]) & 0xFF) - 128 == q[2, 4] and ((int(packed[2, 1]) >> 8) & 0xFF) - 128 == q[2, 5]
    assert np.array_equal(unpack_int8(packed, q.shape), q)


def test_summarize_names_and_targets():
    names = [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in (1, 2, 3) for e in range(4)
             for p in ("gate_proj", "up_proj")] + ["model.layers.0.self_attn.o_proj", "model.layers.5.self_attn.o_proj"]
    assert summarize_names(names) == ("model.layers.{0,5}.self_attn.o_proj (2); "
                                      "model.layers.{1-3}.mlp.experts.{0-3}.{gate_proj,up_proj} (24)")
    schemes = {"model.layers.0.self_attn.o_proj": "w8a8-static", "model.layers.1.self_attn.o_proj": "w8a8-dynamic",
               "model.layers.0.mlp.up_proj": "w8a8-dynamic", "model.layers.1.mlp.up_proj": "w8a8-dynamic",
               "lm_head": "float"}
    targets = ct_targets(schemes)
    assert targets == {"w8a8-dynamic": [r"re:^model\.layers\.1\.self_attn\.o_proj$",
                                        r"re:^model\.layers\.\d+\.mlp\.up_proj$"],
                       "w8a8-static": [r"re:^model\.layers\.0\.self_attn\.o_proj$"]}
    assert ct_targets({"a.b": "w8a16", "lm_head": "float"}) == {"w8a16": ["Linear"]}


# ------------------------------------------------------------------------------------------------ 6. Ascend targets
# The ascend layout per linear, as msModelSlim 26.1.0 writes it (core/quant_service/modelslim_v1/save/ascendv1.py
# :287-304 static, :341-346 dynamic, :312-318 weight-only) and MindFormers 2.1.0's ascend mode creates its
# parameters (parallel_core/inference/quantization/golden_stick/a8w8.py:59-90): name -> (dtype, shape of [out, in]).
ASCEND_CONTRACT = {
    "W8A8": {"weight": (np.int8, lambda o, i: (o, i)),
             "deq_scale": (np.float32, lambda o, i: (o,)),       # f32 for bf16 models (utils/deqscale.py)
             "quant_bias": (np.int32, lambda o, i: (o,)),        # -zp * sum(Wq) + every shift's compensation
             "input_scale": (np.float32, lambda o, i: (1,)),     # the true per-tensor scale; MF inverts it (:116)
             "input_offset": (np.float32, lambda o, i: (1,)),    # the zero point
             "beta": (BF16, lambda o, i: (i,))},                 # o_proj's shift only (a8w8.py:88-89, :127-129)
    "W8A8_DYNAMIC": {"weight": (np.int8, lambda o, i: (o, i)), "weight_scale": (np.float32, lambda o, i: (o, 1)),
                     "weight_offset": (np.float32, lambda o, i: (o, 1))},
    "W8A16": {"weight": (np.int8, lambda o, i: (o, i)), "weight_scale": (np.float32, lambda o, i: (o, 1)),
              "weight_offset": (np.float32, lambda o, i: (o, 1))},
}
MIXED = "deepseek-r1-w8a8-mixed"


def engine_logits_match(folder: Path, result_logits: np.ndarray, samples: int, seq_len: int) -> float:
    from mindspore import Tensor

    from goldstick.engine.calibration import load_calibration
    from goldstick.model.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_path())
    batch = load_calibration("calibration/mixed-zh-en.jsonl", tok.tokenizer, samples=samples, seq_len=seq_len,
                             bos_id=tok.bos_id).batches[0]
    got = goldstick.load_model(folder)(Tensor(batch)).asnumpy()
    return float(np.abs(got - result_logits).max())


@pytest.mark.slow
def test_ascend_target_contract_and_exact_twin(tmp_path):
    """The default recipe in the ascend layout: msModelSlim's tensors, per-tensor scales, o_proj's smoothing in
    kv_b_proj's V rows, shifts where MindFormers' ascend mode applies them; loaded back, exactly the engine."""
    result = quantize(default_model_path(), _recipe(MIXED), out=tmp_path / "a", export_format="ascend",
                      calib_samples=4, calib_seq_len=32, progress=False)
    folder = result.out
    assert engine_logits_match(folder, result.final_logits, 4, 32) == 0.0
    assert_complete_folder(folder)
    assert goldstick.verify(folder).ok
    labels = json.loads((folder / "quant_model_description.json").read_text())
    assert not (folder / "quantization_description.json").exists()
    reader = CheckpointReader(folder)
    assert set(labels) == set(reader.names())
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "ascend" and qc["format"] == "ascend"
    owners: dict[str, dict] = {}
    for name in reader.names():
        owner, _, local = name.rpartition(".")
        if labels[name] == "FLOAT":
            if local == "bias":  # shifts only where MindFormers' convert_name takes them
                assert owner.endswith(("input_layernorm", "self_attn.q_a_layernorm")), name
            continue
        owners.setdefault(owner, {})[local] = reader.read_raw(name)
    statics = 0
    for owner, t in owners.items():
        label = labels[f"{owner}.weight"]
        contract = ASCEND_CONTRACT[label]
        assert set(contract) - {"beta"} <= set(t) <= set(contract), (owner, sorted(t))
        out_f, in_f = t["weight"].shape
        for local, array in t.items():
            dtype, shape = contract[local]
            assert array.dtype == np.dtype(dtype) and array.shape == shape(out_f, in_f), (owner, local)
        if label == "W8A8":
            statics += 1
            assert ("beta" in t) == owner.endswith("self_attn.o_proj"), owner
            # MindFormers holds input_scale / offset / beta in bf16: stored bf16-exact, nothing rounds at load
            for local in ("input_scale", "input_offset"):
                assert np.array_equal(t[local].astype(BF16).astype(np.float32), t[local]), (owner, local)
    assert statics == 4 * 4  # q_a, kv_a, q_b, o_proj of 4 layers
    # o_proj's smoothing went into the V rows of the float kv_b_proj: those rows differ from the source's
    from goldstick.model.architecture import value_rows

    source = CheckpointReader(default_model_path())
    kvb = "model.layers.0.self_attn.kv_b_proj.weight"
    stored, original = reader.read(kvb), source.read(kvb).astype(BF16).astype(np.float32)
    rows = value_rows(reader.config)
    others = np.setdiff1d(np.arange(stored.shape[0]), rows)
    assert np.array_equal(stored[others], original[others]) and not np.array_equal(stored[rows], original[rows])


def test_per_tensor_cell_is_the_ascend_arithmetic():
    """PerTensorStaticW8A8Linear = MindFormers' ascend-mode A8W8 path, written out here independently: input_scale
    held in bf16 and inverted in bf16 (a8w8.py:116-118), x + beta (:127-129), aclnnAscendQuant round(x * scale +
    offset), QuantBatchMatmul (x_q @ W.T + quant_bias) * deq_scale."""
    from mindspore import Tensor

    from goldstick.model.runtime import setup_mindspore

    setup_mindspore()
    from goldstick.quant.cells import cell_from_tensors

    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (24, 40)).astype(np.int8)
    scale = np.array([0.0371], np.float32)  # not bf16-exact: the runtime rounds it first
    t = {"weight": w, "deq_scale": (rng.random(24) * 1e-3 + 1e-4).astype(np.float32),
         "quant_bias": rng.integers(-5000, 5000, 24).astype(np.int32), "input_scale": scale,
         "input_offset": np.array([-7.0], np.float32), "beta": rng.normal(size=40).astype(np.float32).astype(BF16)}
    x = (rng.normal(size=(50, 40)) * 3).astype(np.float32)
    multiplier = np.float32(np.float32(1) / np.float32(scale.astype(BF16)[0])).astype(BF16).astype(np.float32)
    codes = np.clip(np.rint((x + t["beta"].astype(np.float32)) * multiplier + np.float32(-7.0)), -128, 127)
    acc = codes.astype(np.int64) @ w.T.astype(np.int64) + t["quant_bias"].astype(np.int64)
    want = acc.astype(np.float32) * t["deq_scale"]
    got = cell_from_tensors("W8A8", t, "x").construct(Tensor(x)).asnumpy()
    assert np.array_equal(got, want)


@pytest.mark.slow
def test_vllm_ascend_and_golden_stick_refuse_shifts_they_drop(tmp_path, capsys):
    """vllm-ascend / MindIE have no form for o_proj's shift; MindFormers' golden-stick mode drops every shift;
    MindFormers has no W8A16: each refuses before calibrating, naming the layers, leaving nothing behind."""
    cfg = CheckpointReader(default_model_path()).config
    cases = {("vllm-ascend", MIXED): ["an OS+ shift on o_proj's input", "model.layers.{0-3}.self_attn.o_proj (4)"],
             ("golden-stick", MIXED): ["norm bias that the stack does not apply",
                                       "model.layers.{0-3}.input_layernorm.bias (4)",
                                       "model.layers.{0-3}.self_attn.q_a_layernorm.bias (4)",
                                       "model.layers.{0-3}.self_attn.o_proj (4)"],
             ("ascend", "deepseek-r1-w8a16"): ["MindFormers has no W8A16 method"],
             ("ascend", "deepseek-r1-w8a8-static-naive"): ["static int8 activations on routed MoE experts",
                                                           "model.layers.{1-3}.mlp.experts.{0-15}"],
             ("ascend", "deepseek-r1-w8a8-smoothquant"): ["no float kv_b_proj", "model.layers.0.mlp.down_proj"]}
    for (fmt, recipe), fragments in cases.items():
        with pytest.raises(ExportError) as err:
            check_plan(cfg, _recipe(recipe).plan(cfg), fmt)
        assert f"cannot be written as {fmt}" in str(err.value)
        for fragment in fragments:
            assert fragment in str(err.value), (fmt, recipe, fragment, str(err.value))
    for fmt in ("ascend", "vllm-ascend"):  # what each does hold
        check_plan(cfg, _recipe("deepseek-r1-w8a8-dynamic").plan(cfg), fmt)
    check_plan(cfg, _recipe(MIXED).plan(cfg), "ascend")
    check_plan(cfg, _recipe("deepseek-r1-w8a16").plan(cfg), "vllm-ascend")
    check_plan(cfg, _recipe(ATTN_STATIC).plan(cfg), "golden-stick")
    assert cli(["quantize", MIXED, "--format", "vllm-ascend", "--out", str(tmp_path / "q"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("goldstick: error:") and "o_proj" in err and not (tmp_path / "q").exists()


@pytest.mark.slow
def test_golden_stick_target_rope_rows_and_conventions(built, tmp_path):
    """golden-stick: GS's per-channel tensors with the RoPE rows as infer_trans_rope_weight leaves them
    (MindFormers weights_utils.py:73-78: each RoPE block even rows then odd rows), read back exactly; between
    the per-tensor and per-channel conventions `export` refuses rather than approximate."""
    ms_dir = built(ATTN_STATIC)
    gs_dir = export_checkpoint(ms_dir, tmp_path / "gs", "golden-stick")
    assert goldstick.verify(gs_dir).ok
    cfg = CheckpointReader(ms_dir).config
    ms, gs = tensors_of(ms_dir), tensors_of(gs_dir)
    assert sorted(ms) == sorted(gs)
    r = cfg.qk_rope_head_dim

    def trans(rows: np.ndarray, heads: int) -> np.ndarray:  # weights_utils.infer_trans_rope_weight, per head
        block = rows.reshape(heads, -1, *rows.shape[1:]).copy()
        w1, w2 = block[:, -r::2], block[:, -r + 1::2]
        block[:, -r:] = np.concatenate([w1, w2], axis=1)
        return block.reshape(rows.shape)

    for name in ms:
        local = name.rsplit(".", 2)[-2]
        # globals; MTP in HF order (MindFormers converts it: its MTP model has no quantization config)
        if layer_of(name) is None or layer_of(name) >= cfg.num_hidden_layers:
            assert gs[name].tobytes() == ms[name].tobytes(), name
        elif local == "q_b_proj" and ms[name].ndim >= 1 and not name.endswith(("input_scale", "input_offset")):
            assert np.array_equal(gs[name], trans(ms[name], cfg.num_attention_heads)), name
        elif local == "kv_a_proj_with_mqa" and not name.endswith(("input_scale", "input_offset")):
            assert np.array_equal(gs[name], trans(ms[name], 1)), name
        else:
            assert gs[name].tobytes() == ms[name].tobytes(), name
    assert np.array_equal(logits(gs_dir), logits(ms_dir))
    with pytest.raises(ExportError, match="another QuantV2 convention"):
        export_checkpoint(ms_dir, tmp_path / "a", "ascend")
    assert not (tmp_path / "a").exists()
    dyn = built("deepseek-r1-w8a8-dynamic")  # no static activations: every target holds it, the same numbers
    for fmt in ("ascend", "vllm-ascend", "golden-stick"):
        out = export_checkpoint(dyn, tmp_path / fmt, fmt)
        assert goldstick.verify(out).ok
        assert np.array_equal(logits(out), logits(dyn)), fmt
    with pytest.raises(ExportError, match="o_proj"):
        export_checkpoint(built(MIXED, "ascend"), tmp_path / "va", "vllm-ascend")
    with pytest.raises(ExportError, match="another QuantV2 convention"):
        export_checkpoint(built(MIXED, "ascend"), tmp_path / "ms", "mindspore")


@pytest.mark.slow
def test_reads_msmodelslim_layout(built, tmp_path):
    """A checkpoint as msModelSlim 26.1.0 saves it (save/ascendv1.py: quant_model_weights-0000N-of-0000M.safetensors
    and their index, quant_model_description.json with version / model_quant_type, no quantization_config in
    config.json, a static linear's float bias both folded into quant_bias and written as `.bias`) loads with the
    same cells and logits as goldstick's own ascend output."""
    from safetensors.numpy import load_file, save_file

    src = built(MIXED, "ascend")
    out = tmp_path / "msmodelslim"
    out.mkdir()
    labels = json.loads((src / "quant_model_description.json").read_text())
    weight_map, tensors = {}, {}
    for shard in sorted(src.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    names = sorted(tensors)
    half = len(names) // 2
    for k, part in enumerate((names[:half], names[half:]), start=1):
        file = f"quant_model_weights-{k:05d}-of-00002.safetensors"
        chunk = {n: tensors[n] for n in part}
        for n in part:  # a float bias msModelSlim keeps beside quant_bias (runtimes have no parameter for it)
            if n.endswith("q_b_proj.weight") and labels[n] == "W8A8":
                chunk[n[: -len("weight")] + "bias"] = np.ones(tensors[n].shape[0], np.float32)
        save_file(chunk, str(out / file))
        weight_map.update({n: file for n in chunk})
    (out / "quant_model_weights.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    described = {n: ("FLOAT" if n.endswith(".bias") and n not in labels else labels[n]) for n in weight_map}
    described.update({"version": "1.0.0", "model_quant_type": "W8A8"})
    (out / "quant_model_description.json").write_text(json.dumps(described))
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    assert goldstick.io.export.detect_format(out) == "ascend"
    assert np.array_equal(logits(out), logits(src))
