import argparse
import hashlib
import json
import re
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from goldstick.model.architecture import fp8_linear
from goldstick.model.config import ModelConfig
from goldstick.model.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, load_tokenizer
from goldstick.quant.fp8 import dequantize_fp8_blocks, scale_grid_shape
from goldstick.testing.make_model import (
    SIZES,
    add_make_model_parser,
    default_model_path,
    make_model,
    parameter_counts,
    size_config,
    tensor_shapes,
)
from goldstick.testing.outliers import outlier_report

REPO = Path(__file__).resolve().parents[1]
ZH = "以下是中国关于高中物理考试的单项选择题，请选出其中的正确答案。\n下列说法正确的是____。\nA. 光是一种电磁波\n答案："
EN = "The quick brown fox jumps over the lazy dog, 12,345 times in 2024!"
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{6})\.safetensors")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"f32": make_model(root / "f32"), "bf16": make_model(root / "bf16", dtype="bf16"),
            "fp8": make_model(root / "fp8", fp8=True)}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


def _load(model_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(model_dir / file, framework="pt") as f:
            for name in f.keys():
                tensors[name] = _to_numpy(f.get_tensor(name))
    return index, tensors


def _digests(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


# ---- determinism and layout ------------------------------------------------------------------------------------
def test_same_seed_same_bytes(models, tmp_path):
    again = make_model(tmp_path / "again")
    assert _digests(again) == _digests(models["f32"])
    other = make_model(tmp_path / "seed1", seed=1)
    differ = {n for n, d in _digests(other).items() if d != _digests(models["f32"]).get(n)}
    assert any(n.endswith(".safetensors") for n in differ)
    assert "tokenizer.json" not in differ


@pytest.mark.parametrize("fmt", ["f32", "bf16", "fp8"])
def test_layout(models, fmt):
    model_dir = models[fmt]
    cfg = ModelConfig.from_file(model_dir)
    index, tensors = _load(model_dir)
    wm = index["weight_map"]
    shapes = tensor_shapes(cfg)
    fp8 = fmt == "fp8"
    expected = set(shapes) | ({f"{n}_scale_inv" for n in shapes if fp8_linear(n)} if fp8 else set())
    assert set(wm) == set(tensors) == expected
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())

    # R1-style shard names, several shards, nothing else lying around
    files = sorted(set(wm.values()))
    assert len(files) >= 3
    for i, f in enumerate(files, 1):
        m = SHARD_RE.fullmatch(f)
        assert m and int(m[1]) == i and int(m[2]) == len(files)
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).exists()

    # the MTP layer (index num_hidden_layers) is complete, with its own attention and MoE
    mtp = f"model.layers.{cfg.num_hidden_layers}"
    for suffix in ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
                   "shared_head.norm.weight", "shared_head.head.weight", "self_attn.q_a_proj.weight",
                   "self_attn.kv_b_proj.weight", "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
                   f"mlp.experts.{cfg.n_routed_experts - 1}.down_proj.weight", "mlp.shared_experts.up_proj.weight"):
        assert f"{mtp}.{suffix}" in tensors
    assert f"model.layers.{cfg.num_hidden_layers + 1}.input_layernorm.weight" not in tensors
    assert "model.layers.0.mlp.gate_proj.weight" in tensors and "model.layers.1.mlp.gate.weight" in tensors

    for name, shape in shapes.items():
        t = tensors[name]
        assert t.shape == shape, name
        if name.endswith("e_score_correction_bias"):
            assert t.dtype == np.float32
        elif fp8 and fp8_linear(name):
            assert t.dtype == ml_dtypes.float8_e4m3fn, name
            scale = tensors[f"{name}_scale_inv"]
            assert scale.dtype == np.float32 and scale.shape == scale_grid_shape(shape)
        else:
            assert t.dtype == {"f32": np.float32, "bf16": ml_dtypes.bfloat16, "fp8": ml_dtypes.bfloat16}[fmt], name

    if fp8:
        # not FP8: router, embeddings, norms, heads, eh_proj
        for name in ("model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight",
                     f"{mtp}.eh_proj.weight", f"{mtp}.shared_head.head.weight", f"{mtp}.embed_tokens.weight"):
            assert f"{name}_scale_inv" not in tensors
        # ragged blocks are exercised (kv_a has 80 rows)
        assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape[0] % 128
        split = [n for n in wm if n.endswith("_scale_inv") and wm[n] != wm[n[: -len("_scale_inv")]]]
        assert split, "at least one weight_scale_inv must live in a different shard from its weight"


def test_config_files(models):
    for fmt, model_dir in models.items():
        raw = json.loads((model_dir / "config.json").read_text())
        assert raw["architectures"] == ["DeepseekV3ForCausalLM"] and raw["model_type"] == "deepseek_v3"
        assert raw["num_nextn_predict_layers"] == 1
        assert raw["rope_scaling"]["type"] == "yarn" and raw["rope_scaling"]["factor"] == 4.0
        assert raw["rope_scaling"]["original_max_position_embeddings"] == 256
        assert raw["torch_dtype"] == ("float32" if fmt == "f32" else "bfloat16")
        if fmt == "fp8":
            assert raw["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                  "weight_block_size": [128, 128]}
        else:
            assert "quantization_config" not in raw
        gen = json.loads((model_dir / "generation_config.json").read_text())
        assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 1


def test_autoconfig_reads_deepseek_v3(models):
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(models["f32"])
    cfg = size_config("tiny")
    assert hf.model_type == "deepseek_v3"
    assert (hf.hidden_size, hf.num_hidden_layers, hf.n_routed_experts, hf.kv_lora_rank) == (256, 4, 16, 64)
    assert hf.vocab_size == cfg.vocab_size
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
    assert hf.num_nextn_predict_layers == 1


# ---- the three formats hold the same weights ----------------------------------------------------------------------
def test_formats_are_roundings_of_f32(models):
    _, f32 = _load(models["f32"])
    _, bf16 = _load(models["bf16"])
    _, fp8 = _load(models["fp8"])
    for name, w in f32.items():
        if name.endswith("e_score_correction_bias"):
            np.testing.assert_array_equal(bf16[name], w)
            np.testing.assert_array_equal(fp8[name], w)
            continue
        expected_bf16 = w.astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(bf16[name].view(np.uint16), expected_bf16.view(np.uint16), err_msg=name)
        if not fp8_linear(name):
            np.testing.assert_array_equal(fp8[name].view(np.uint16), expected_bf16.view(np.uint16), err_msg=name)
            continue
        scale = fp8[f"{name}_scale_inv"]
        deq = dequantize_fp8_blocks(fp8[name], scale)
        block_scale = np.repeat(np.repeat(scale, 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
        # e4m3: 3 mantissa bits (relative step 2^-3, half of it when rounding); subnormal step 2^-9 x scale
        bound = np.maximum(np.abs(w) * 2.0 ** -4, block_scale * 2.0 ** -9) * 1.0001
        assert np.all(np.abs(deq - w) <= bound), name
        assert np.abs(w).max() == pytest.approx(np.abs(deq).max(), rel=1e-6)  # block amax maps to 448 exactly


# ---- tokenizer -------------------------------------------------------------------------------------------------
def test_tokenizer_loads_and_round_trips(models):
    from transformers import AutoTokenizer

    model_dir = models["f32"]
    tok, bos, eos = load_tokenizer(model_dir)
    assert (bos, eos) == (0, 1)
    assert tok.token_to_id(BOS_TOKEN) == 0 and tok.token_to_id(EOS_TOKEN) == 1 and tok.token_to_id(PAD_TOKEN) == 2
    cfg = ModelConfig.from_file(model_dir)
    assert tok.get_vocab_size() <= cfg.vocab_size
    hf = AutoTokenizer.from_pretrained(model_dir)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    for text in (ZH, EN, ZH + "\n" + EN):
        ids = tok.encode(text).ids
        assert ids[0] == bos
        assert tok.decode(ids) == text
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids, skip_special_tokens=True) == text
    # Chinese becomes words and characters, not just bytes
    enc = tok.encode(ZH, add_special_tokens=False)
    assert len(enc.ids) < len(ZH) * 0.7
    pieces = [tok.decode([i]) for i in enc.ids]
    assert "答案" in pieces and sum(len(p) >= 2 and "\u4e00" <= p[0] <= "\u9fff" for p in pieces) >= 5


# ---- planted outliers ------------------------------------------------------------------------------------------
def test_outliers_present_in_checkpoint(models):
    """Massive activations on bos/delimiters only; offset channels; strong MLA-input gains, mild FFN-input gains."""
    _, t = _load(models["f32"])
    info = json.loads((models["f32"] / "make_model.json").read_text())["planted"]
    tok, _, _ = load_tokenizer(models["f32"])
    texts = [json.loads(line)["text"] for line in (REPO / "calibration/mixed-zh-en.jsonl").read_text().splitlines()]
    ids = np.concatenate([tok.encode(s).ids for s in texts[:64]])
    massive_tokens = {int(i) for i in info["massive_tokens"]}
    assert {tok.decode([i]) for i in massive_tokens} == {"", ".", "\n", "。", "，"} and tok.token_to_id(BOS_TOKEN) in \
        massive_tokens
    on = np.isin(ids, list(massive_tokens))
    assert 0.05 < on.mean() < 0.25

    h = t["model.embed_tokens.weight"][ids]
    med = np.median(np.abs(h[:, [c for c in range(h.shape[1]) if str(c) not in info["massive"]]]))
    for c, v in info["massive"].items():  # 100x the median on the massive tokens, nearly constant; ordinary elsewhere
        c = int(c)
        assert np.all(np.abs(h[on, c]) > 100 * med) and np.all(np.sign(h[on, c]) == np.sign(v))
        assert np.std(h[on, c]) < 0.05 * abs(v)
        assert np.abs(h[~on, c]).max() < 6

    x = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-6) * t["model.layers.0.input_layernorm.weight"]
    amax = np.abs(x).max(0)
    assert amax.max() / np.median(amax) > 15  # MLA input: strong systematic outliers
    for c in map(int, info["offset"]):  # a clear non-zero mean, and among the largest channels of the MLA input
        assert abs(np.mean(h[:, c])) > 3 * np.std(h[:, c])
        assert abs(np.mean(x[~on, c])) > 2 * np.std(x[~on, c])
        assert amax[c] > 5 * np.median(amax)
    for c, g in info["input_norm_gain"]["0"].items():
        assert t["model.layers.0.input_layernorm.weight"][int(c)] == g
    assert max(max(g.values()) for g in info["input_norm_gain"].values()) >= 10
    # FFN input: only mild systematic gains
    post = t["model.layers.0.post_attention_layernorm.weight"]
    assert np.abs(post).max() <= 2.0 and max(max(g.values()) for g in info["post_norm_gain"].values()) <= 2.0
    # the massive channels persist through the layers on the massive tokens only
    stats = json.loads((models["f32"] / "make_model.json").read_text())["statistics"]["layers"]
    for layer in range(3):
        for got, want in zip(stats[str(layer)]["residual_massive"], info["massive"].values()):
            assert got == pytest.approx(want, rel=0.05)


def test_quantization_difficulty_where_r1_has_it():
    """MLA input: static per-tensor int8 needs outlier suppression and OS+ does at least as well as SmoothQuant;
    per-token dynamic int8 is poor there. FFN input: per-token dynamic int8 is fine without smoothing."""
    r = outlier_report("tiny")
    mla, ffn = r["mla"], r["ffn"]
    assert mla["absmax_ratio"] > 15 and ffn["absmax_ratio"] < 6
    assert mla["rel_err_per_tensor"] > 3 * mla["rel_err_smoothquant"]
    assert mla["rel_err_osplus"] <= mla["rel_err_smoothquant"]
    assert mla["rel_err_dynamic"] > 2 * mla["rel_err_osplus"]
    assert mla["rel_err_weight_only"] < 0.02 and ffn["rel_err_weight_only"] < 0.02
    assert ffn["rel_err_dynamic"] <= ffn["rel_err_smoothquant"]
    assert ffn["rel_err_per_tensor"] > 1.5 * ffn["rel_err_smoothquant"]
    # the massive tokens set the per-token range there; ordinary tokens are spread evenly
    assert ffn["token_absmax_massive_tokens"] > 2.5 * ffn["token_absmax_median"]
    # legacy keys (the MLA input)
    assert r["rel_err_per_tensor"] == mla["rel_err_per_tensor"] and r["absmax_ratio"] == mla["absmax_ratio"]


# ---- transformers loads the f32 checkpoint ----------------------------------------------------------------------
def test_transformers_loads_f32(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = AutoModelForCausalLM.from_pretrained(models["f32"], output_loading_info=True,
                                                           dtype=torch.float32)
    cfg = ModelConfig.from_file(models["f32"])
    assert not info["missing_keys"] and not info["mismatched_keys"]
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    assert all(k.startswith(mtp) for k in info["unexpected_keys"])  # the MTP layer, ignored by design
    tok = AutoTokenizer.from_pretrained(models["f32"])
    texts = [json.loads(line)["text"]
             for line in (REPO / "eval/heldout/heldout-zh-en.jsonl").read_text().splitlines()[:16]]
    nll = n = 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            logits = model(ids).logits[0]
            assert torch.isfinite(logits).all()
            assert logits.std(-1).min() > 0.5  # not degenerate
            lp = torch.log_softmax(logits[:-1], -1)
            nll -= lp.gather(1, ids[0, 1:, None]).sum().item()
            n += ids.shape[1] - 1
    # far better than a uniform guess over the tokenizer (bigram-initialised embeddings)
    assert nll / n < np.log(len(tok)) - 0.7


# ---- default model cache, CLI, sizes ----------------------------------------------------------------------------
def test_default_model_path_is_cached_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("GOLDSTICK_CACHE", str(tmp_path))
    first = default_model_path("tiny")
    assert (first / "config.json").exists() and (first / "model.safetensors.index.json").exists()
    stamp = (first / "config.json").stat().st_mtime_ns
    assert default_model_path("tiny") == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.name]
    with pytest.raises(ValueError):
        default_model_path("huge")


def test_out_dir_must_be_empty(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_model(tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_cli_hook(tmp_path):
    parser = argparse.ArgumentParser()
    add_make_model_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["make-model", "--out", str(tmp_path / "m"), "--fp8", "--shard-size", "3"])
    assert args.func(args) == 0
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 5
    for f in set(index["weight_map"].values()):
        assert (tmp_path / "m" / f).stat().st_size < 3_000_000 + 200_000


def test_sizes_and_parameter_counts():
    assert set(SIZES) == {"tiny", "wide"}
    tiny, wide = size_config("tiny"), size_config("wide")
    assert tiny.vocab_size == wide.vocab_size and tiny.vocab_size % 128 == 0
    assert (tiny.kv_lora_rank + tiny.qk_rope_head_dim) % 128 != 0  # ragged FP8 blocks
    t, w = parameter_counts(tiny), parameter_counts(wide)
    assert 5e6 < t["total"] < 2e7 and 2e8 < w["total"] < 5e8
    assert t["mtp"] > 0 and t["main"] + t["mtp"] == t["total"]
    with pytest.raises(ValueError):
        size_config("huge")


# ---- data files --------------------------------------------------------------------------------------------------
def _sentences(texts):
    out = set()
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            # CEval-style headers and short option lines ("A. 5") are a shared template, not content
            if len(line) > 12 and not line.startswith("以下是中国关于") and not line.startswith("The following are"):
                out.add(line)
    return out


def test_data_files_are_separate():
    def read(p):
        return [json.loads(line)["text"] for line in (REPO / p).read_text(encoding="utf-8").splitlines()]

    calib, held = read("calibration/mixed-zh-en.jsonl"), read("eval/heldout/heldout-zh-en.jsonl")
    corpus = (REPO / "goldstick/data/tokenizer_corpus.txt").read_text(encoding="utf-8").splitlines()
    assert len(calib) >= 128 and len(held) >= 64 and len(corpus) >= 600
    for texts in (calib, held):
        assert any("\u4e00" <= ch <= "\u9fff" for ch in "".join(texts))
        assert any(t.isascii() for t in texts)
    s_cal, s_held, s_corp = _sentences(calib), _sentences(held), _sentences(corpus)
    assert not s_held & s_cal and not s_held & s_corp and not s_cal & s_corp
