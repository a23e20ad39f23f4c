"""w8a8-dynamic + SmoothQuant: the vocabulary, the plan's refusals, and the engine end to end (both formats).

A dynamic per-token linear stores no per-channel input scale, so its smoothing scale must be folded into the norm
that feeds it; the plan refuses every linear where that is impossible, naming it. The engine folds the scale, the
exported checkpoint (mindspore and compressed-tensors) loads back to exactly the engine's logits, and smoothing
measurably helps the smoothed linears on the default model (which has planted massive activation channels).
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from small_configs import small_config

import goldstick
from goldstick.engine.pipeline import quantize
from goldstick.io.checkpoint import CheckpointReader
from goldstick.quant.numerics import bf16_round
from goldstick.quant.recipe import Recipe, RecipeError, Rule, Scheme, load_recipe
from goldstick.testing.make_model import default_model_path

RECIPE = "deepseek-w8a8-dynamic-smoothquant"
FAST = dict(calib_samples=8, calib_seq_len=64, progress=False)
DSQ = Scheme("w8a8-dynamic", "smoothquant", 0.8)
SMOOTHED = ("q_a_proj", "kv_a_proj_with_mqa", "q_b_proj")


# ---- vocabulary and plan ---------------------------------------------------------------------------------------
def test_dynamic_accepts_smoothquant_but_not_osplus(tmp_path):
    assert DSQ.label == "w8a8-dynamic+smoothquant(0.8)"
    assert DSQ.to_dict() == {"scheme": "w8a8-dynamic", "outlier_suppression": "smoothquant", "alpha": 0.8}
    with pytest.raises(RecipeError, match="'osplus' applies only to scheme w8a8-static, not w8a8-dynamic"):
        Scheme("w8a8-dynamic", "osplus")
    with pytest.raises(RecipeError, match="'smoothquant' applies only to schemes w8a8-static and w8a8-dynamic, "
                                          "not w8a16"):
        Scheme("w8a16", "smoothquant")
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent("""\
        rules:
          - match: '.*\\.self_attn\\.q_b_proj'
            scheme: w8a8-dynamic
            outlier_suppression: smoothquant
            alpha: 0.6
          - match: '.*'
            scheme: w8a16
            outlier_suppression: smoothquant
        """))
    with pytest.raises(RecipeError) as excinfo:
        Recipe.from_yaml(path)
    assert excinfo.value.problems == [f"{path}:8: rules[1].outlier_suppression: 'smoothquant' applies only to "
                                      f"schemes w8a8-static and w8a8-dynamic, not w8a16"]


def test_shipped_recipe_plan():
    small = small_config()
    plan = load_recipe(RECIPE).plan(small)
    assert plan.errors == () and plan.needs_calibration
    for layer in range(small.num_hidden_layers):
        for name in SMOOTHED:
            assert plan.scheme_of(f"model.layers.{layer}.self_attn.{name}") == DSQ
        assert plan.scheme_of(f"model.layers.{layer}.self_attn.o_proj") == Scheme("w8a8-dynamic")
        assert plan.scheme_of(f"model.layers.{layer}.self_attn.kv_b_proj") == Scheme("float")
    assert plan.counts_by_label() == {"float": 8, "w8a8-dynamic": 88, "w8a8-dynamic+smoothquant(0.8)": 12}
    # no q-LoRA: q_proj shares input_layernorm with kv_a_proj_with_mqa, so it is smoothed too
    plan = load_recipe(RECIPE).plan(small_config(q_lora_rank=None))
    assert plan.scheme_of("model.layers.2.self_attn.q_proj") == DSQ
    # without smoothing the same linears are data-free
    assert not load_recipe("deepseek-r1-w8a8-dynamic").plan(small).needs_calibration


def test_plan_refuses_what_no_norm_can_carry_naming_the_linears():
    small = small_config()
    recipe = Recipe(name="all-smoothed", rules=(
        Rule(r".*\.mlp\.gate|.*\.kv_b_proj|lm_head", "float"),
        Rule(r".*_proj|.*_mqa", DSQ)))
    with pytest.raises(RecipeError) as excinfo:
        recipe.plan(small)
    problems = excinfo.value.problems
    assert len(problems) == 2, problems
    router, no_norm = sorted(problems, key=lambda p: "router" not in p)
    assert "post_attention_layernorm also feeds the MoE router mlp.gate" in router
    assert "model.layers.{1..3}.mlp.experts.{E}.gate_proj" in router
    assert "model.layers.{1..3}.mlp.shared_experts.up_proj" in router
    assert "model.layers.0.mlp" not in router  # the dense layer's norm feeds only gate_proj + up_proj: foldable
    assert "no norm feeds them" in no_norm
    for name in ("model.layers.{0..3}.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                 "model.layers.{1..3}.mlp.experts.{E}.down_proj"):
        assert name in no_norm
    assert "q_a_proj" not in " ".join(problems) and "q_b_proj" not in " ".join(problems)
    # the linears one norm feeds must agree: q_a_proj and kv_a_proj_with_mqa with different alphas
    recipe = Recipe(rules=(Rule(r".*\.q_a_proj", Scheme("w8a8-dynamic", "smoothquant", 0.5)),
                           Rule(r".*\.kv_a_proj_with_mqa", DSQ)))
    problems = recipe.plan(small, strict=False).errors
    assert any("input_layernorm feeds linears with different schemes" in p and "q_a_proj" in p for p in problems)


# ---- the engine -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsq")
    model = default_model_path()
    return {
        "model": model,
        "ms": quantize(model, RECIPE, out=root / "ms", **FAST),
        "ct": quantize(model, RECIPE, out=root / "ct", export_format="compressed-tensors", **FAST),
        "plain": quantize(model, "deepseek-r1-w8a8-dynamic", out=root / "plain", **FAST),
    }


def _first_batch(model):
    from goldstick.engine.calibration import load_calibration
    from goldstick.model.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    return load_calibration("calibration/mixed-zh-en.jsonl", tok.tokenizer, samples=FAST["calib_samples"],
                            seq_len=FAST["calib_seq_len"], bos_id=tok.bos_id).batches[0]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["ms", "ct"])
def test_export_reproduces_the_engine_exactly(runs, fmt):
    from mindspore import Tensor

    result = runs[fmt]
    logits = goldstick.load_model(result.out)(Tensor(_first_batch(runs["model"]))).asnumpy()
    assert np.array_equal(logits, result.final_logits)
    # both formats hold the same model: the same engine logits
    assert np.array_equal(runs["ms"].final_logits, runs["ct"].final_logits)
    config = json.loads((result.out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == ("compressed-tensors" if fmt == "ct" else "ascend")


@pytest.mark.slow
def test_smoothing_is_folded_into_the_norms_and_helps(runs):
    source, out = CheckpointReader(runs["model"]), CheckpointReader(runs["ms"].out)
    layers = runs["ms"].report["layers"]
    plain = runs["plain"].report["layers"]
    for i, layer in enumerate(layers):
        for name in SMOOTHED:
            key = f"model.layers.{i}.self_attn.{name}"
            info = layer["linears"][key]
            norm = "input_layernorm" if name != "q_b_proj" else "self_attn.q_a_layernorm"
            assert info["scheme"] == "w8a8-dynamic+smoothquant(0.8)"
            assert info["transform"]["folded_into"] == f"model.layers.{i}.{norm}"
            assert info["transform"]["alpha"] == 0.8 and "activation" not in info
            # the planted massive channels make the input_layernorm-fed linears gain the most
            gain = 4.0 if name != "q_b_proj" else 0.0
            assert info["sqnr_db"] > plain[i]["linears"][key]["sqnr_db"] + gain, (key, info["sqnr_db"])
        # the norms carry the scale: rescaled weights, no bias; the post-attention norm is untouched
        for norm in ("input_layernorm", "self_attn.q_a_layernorm"):
            name = f"model.layers.{i}.{norm}.weight"
            assert not np.allclose(out.read(name), source.read(name), rtol=1e-2)
            assert not out.has(f"model.layers.{i}.{norm}.bias")
        name = f"model.layers.{i}.post_attention_layernorm.weight"
        assert np.array_equal(out.read(name), bf16_round(source.read(name)))
    # the description labels the smoothed linears as plain dynamic W8A8 (nothing extra is stored on them)
    labels = json.loads((runs["ms"].out / "quant_model_description.json").read_text())  # the default: ascend
    assert labels["model.layers.1.self_attn.q_a_proj.weight"] == "W8A8_DYNAMIC"
    assert "model.layers.1.self_attn.q_a_proj.input_scale" not in labels
