"""Golden-Stick policies translated into recipes: GS semantics reproduced, and every gap reported."""

from __future__ import annotations

import enum
import textwrap

import pytest
from small_configs import small_config

from goldstick.model.config import ModelConfig
from goldstick.quant.gs_compat import GSConfig, from_golden_stick, gs_cell_names, linear_kind, translate_config
from goldstick.quant.recipe import RecipeError, Scheme, load_recipe

FFN = r".*\.feed_forward\..*"
FFN_DYNAMIC = {"weight_quant_dtype": "int8", "act_quant_dtype": "int8", "outliers_suppression": "NONE",
               "precision_recovery": "NONE", "act_quant_granularity": "PER_TOKEN",
               "weight_quant_granularity": "PER_CHANNEL"}
# notes §1.2: the GS R1 "dsquant" policy (the Feb-2025 W8A8 release)
DSQUANT = {"mode": "QUANTIZE", "backend": "ASCEND",
           "weight_quant_dtype": "int8", "act_quant_dtype": "int8",
           "outliers_suppression": "OUTLIER_SUPPRESSION_PLUS",
           "act_quant_granularity": "PER_TENSOR", "weight_quant_granularity": "PER_CHANNEL",
           "opname_blacklist": ["lkv2kv", "lm_head"],
           "layer_policies": {FFN: FFN_DYNAMIC}}
DSQUANT_YAML = r"""
mode: QUANTIZE
backend: ASCEND
weight_quant_dtype: int8
act_quant_dtype: int8
outliers_suppression: OutliersSuppressionType.OUTLIER_SUPPRESSION_PLUS
act_quant_granularity: QuantGranularity.PER_TENSOR
weight_quant_granularity: PER_CHANNEL
opname_blacklist: [lkv2kv, lm_head]
layer_policies:
  '.*\.feed_forward\..*':
    weight_quant_dtype: int8
    act_quant_dtype: int8
    act_quant_granularity: PER_TOKEN
"""




@pytest.fixture(scope="module")
def small() -> ModelConfig:
    return small_config()


def policy(**changes) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DSQUANT.items()}
    out.update(changes)
    return out


def warnings_about(notes: list[str], *words: str) -> list[str]:
    return [n for n in notes if all(w in n for w in words)]


# ---- the R1 dsquant policy ----------------------------------------------------------------------------------------

def test_dsquant_equals_the_shipped_mixed_recipe_on_r1():
    r1 = ModelConfig()
    recipe, notes = from_golden_stick(DSQUANT, config=r1)
    assert recipe.plan(r1).schemes() == load_recipe("deepseek-r1-w8a8-mixed").plan(r1).schemes()
    assert recipe.default == Scheme("w8a8-static", "osplus")
    assert [r.match for r in recipe.rules] == [
        r"model\.layers\.\d+\.mlp\.gate",
        r"model\.layers\.\d+\.self_attn\.kv_b_proj",
        "lm_head",
        r"model\.layers\.\d+\.mlp\.(?:experts\.\d+\.|shared_experts\.)?(?:gate_proj|up_proj|down_proj)"]
    assert "lkv2kv" in recipe.rules[1].note and FFN in recipe.rules[3].note
    # nothing is lost: the only notes are the rounding difference and the calibration set
    assert len(notes) == 2 and warnings_about(notes, "absmax/127.5") and warnings_about(notes, "calibration")


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_dsquant_equals_the_shipped_mixed_recipe_on_small_configs(q_lora_rank):
    cfg = small_config(q_lora_rank=q_lora_rank)
    recipe, _ = from_golden_stick(DSQUANT, config=cfg)
    assert recipe.plan(cfg).schemes() == load_recipe("deepseek-r1-w8a8-mixed").plan(cfg).schemes()


def test_dsquant_from_yaml_text_and_file(tmp_path, small):
    expected = load_recipe().plan(small).schemes()
    recipe, _ = from_golden_stick(DSQUANT_YAML, config=small)
    assert recipe.plan(small).schemes() == expected
    path = tmp_path / "dsquant.yaml"
    path.write_text(DSQUANT_YAML)
    recipe, _ = from_golden_stick(str(path), config=small)
    assert recipe.plan(small).schemes() == expected and recipe.source == str(path)
    # the translated recipe is an ordinary recipe: it survives YAML
    assert type(recipe).from_yaml_string(recipe.to_yaml()) == recipe


def test_policy_objects_with_enums_and_mindspore_dtypes(small):
    ms = pytest.importorskip("mindspore")
    Granularity = enum.Enum("QuantGranularity", "PER_TENSOR PER_CHANNEL PER_TOKEN PER_GROUP")
    Suppression = enum.Enum("OutliersSuppressionType", "NONE SMOOTH OUTLIER_SUPPRESSION_PLUS")

    class PTQConfig:  # duck-typed stand-in for mindspore_gs.ptq.PTQConfig
        def __init__(self, **kw):
            self.weight_quant_dtype, self.act_quant_dtype = ms.int8, None
            self.act_quant_granularity = Granularity.PER_TENSOR
            self.outliers_suppression = Suppression.NONE
            self.opname_blacklist = []
            self.__dict__.update(kw)

    cfg = PTQConfig(act_quant_dtype=ms.int8, outliers_suppression=Suppression.OUTLIER_SUPPRESSION_PLUS,
                    opname_blacklist=["lkv2kv", "lm_head"],
                    layer_policies={FFN: PTQConfig(act_quant_dtype=ms.int8,
                                                   act_quant_granularity=Granularity.PER_TOKEN)})
    recipe, _ = from_golden_stick(cfg, config=small)
    assert recipe.plan(small).schemes() == load_recipe().plan(small).schemes()


# ---- other GS recipes ----------------------------------------------------------------------------------------------

def test_a16w8_and_a8dynw8_equal_the_shipped_recipes(small):
    a16w8 = {"weight_quant_dtype": "int8", "act_quant_dtype": None, "opname_blacklist": ["lm_head", "lkv2kv"]}
    recipe, _ = from_golden_stick(a16w8, config=small)
    assert recipe.plan(small).schemes() == load_recipe("deepseek-r1-w8a16").plan(small).schemes()
    a8dynw8 = {"weight_quant_dtype": "int8", "act_quant_dtype": "int8", "act_quant_granularity": "PER_TOKEN",
               "opname_blacklist": ["lm_head", "lkv2kv"]}
    recipe, notes = from_golden_stick(a8dynw8, config=small)
    assert recipe.plan(small).schemes() == load_recipe("deepseek-r1-w8a8-dynamic").plan(small).schemes()
    assert not warnings_about(notes, "calibration")


def test_smoothquant_policy_keeps_its_alpha(small):
    recipe, _ = from_golden_stick(policy(outliers_suppression="SMOOTH", algo_args={"alpha": 0.8}), config=small)
    plan = recipe.plan(small)
    assert plan.scheme_of("model.layers.1.self_attn.q_b_proj") == Scheme("w8a8-static", "smoothquant", 0.8)
    recipe, _ = from_golden_stick(policy(outliers_suppression="SMOOTH"), config=small)
    assert recipe.plan(small).scheme_of("model.layers.1.self_attn.o_proj").alpha == 0.5   # GS's default


def test_layer_indices_in_gs_regexes_are_kept(small):
    pol = policy(layer_policies={r"model\.layers\.[12]\.feed_forward\..*": FFN_DYNAMIC,
                                 r"model\.layers\.(0|3)\.feed_forward\..*": {"act_quant_dtype": None}})
    recipe, _ = from_golden_stick(pol, config=small)
    plan = recipe.plan(small)
    assert plan.scheme_of("model.layers.2.mlp.experts.5.down_proj") == Scheme("w8a8-dynamic")
    assert plan.scheme_of("model.layers.3.mlp.experts.5.down_proj") == Scheme("w8a16")
    assert plan.scheme_of("model.layers.0.mlp.up_proj") == Scheme("w8a16")
    assert any(r"model\.layers\.(?:1|2)\." in r.match for r in recipe.rules)


# ---- gaps and GS surprises are reported, never dropped ------------------------------------------------------------

def test_features_without_equivalent_are_reported(small):
    pol = policy(kvcache_quant_dtype="int8", precision_recovery="GPTQ", weight_clip=True,
                 outliers_suppression="OUTLIER_SUPPRESSION_LITE", algo_args={"weight_clip_ratio": 0.9},
                 layer_policies={FFN: dict(FFN_DYNAMIC, weight_quant_dtype="qint4x2",
                                           weight_quant_granularity="PER_GROUP", group_size=128)})
    recipe, notes = from_golden_stick(pol, config=small)
    assert warnings_about(notes, "policy:", "KV-cache", "no equivalent")
    assert warnings_about(notes, "policy:", "GPTQ", "no equivalent")
    assert warnings_about(notes, "policy:", "weight_clip", "no equivalent")
    assert warnings_about(notes, "policy:", "OUTLIER_SUPPRESSION_LITE", "osplus")
    assert warnings_about(notes, "policy:", "weight_clip_ratio", "ignored")
    assert warnings_about(notes, f"layer_policies['{FFN}']", "4-bit", "8-bit")
    assert warnings_about(notes, f"layer_policies['{FFN}']", "group_size=128", "per-channel")
    plan = recipe.plan(small)
    assert plan.scheme_of("model.layers.0.self_attn.o_proj") == Scheme("w8a8-static", "osplus")
    assert plan.scheme_of("model.layers.1.mlp.experts.0.up_proj") == Scheme("w8a8-dynamic")


def test_inner_knobs(small):
    recipe, notes = from_golden_stick(policy(always_use_fp_input_in_processer=True, use_inner_osp=True),
                                      config=small)
    assert recipe.options.inputs_from == "float"
    assert warnings_about(notes, "use_inner_osp")


def test_overlapping_layer_policies_keep_the_first(small):
    pol = policy(layer_policies={FFN: FFN_DYNAMIC, r".*routed_experts.*": {"act_quant_dtype": None}})
    recipe, notes = from_golden_stick(pol, config=small)
    assert recipe.plan(small).scheme_of("model.layers.1.mlp.experts.0.up_proj") == Scheme("w8a8-dynamic")
    (note,) = warnings_about(notes, "Golden-Stick raises")
    assert "model.layers.1.feed_forward.routed_experts.ffn.w1" in note and "keeps the first" in note
    assert warnings_about(notes, "'.*routed_experts.*'", "never applies")


def test_blacklist_is_a_substring_test(small):
    recipe, notes = from_golden_stick(policy(opname_blacklist=["lkv", "lm_head"]), config=small)
    assert recipe.plan(small).scheme_of("model.layers.0.self_attn.kv_b_proj") == Scheme("float")
    (note,) = warnings_about(notes, "substring")
    assert "'lkv'" in note and "model.layers.0.attention.lkv2kv" in note and "3 more" in note


def test_network_blacklist_does_not_protect_cells_a_layer_policy_selects(small):
    recipe, notes = from_golden_stick(policy(opname_blacklist=["lkv2kv", "lm_head", "w2"]), config=small)
    assert recipe.plan(small).scheme_of("model.layers.0.mlp.down_proj") == Scheme("w8a8-dynamic")
    (note,) = warnings_about(notes, "'w2'", "does not protect")
    assert "model.layers.0.feed_forward.w2" in note


def test_things_that_match_nothing_are_reported(small):
    pol = policy(opname_blacklist=["lkv2kv", "lm_head", "wq_a"], layer_policies={r".*\.mlp\..*": FFN_DYNAMIC})
    recipe, notes = from_golden_stick(pol, config=small, names="research")
    assert warnings_about(notes, r"'.*\.mlp\..*'", "no effect")
    assert warnings_about(notes, "'wq_a'", "no effect")
    # every FFN linear falls back to the network config (static W8A8 + OS+)
    assert recipe.plan(small).scheme_of("model.layers.1.mlp.experts.0.up_proj") == Scheme("w8a8-static", "osplus")


def test_blacklisting_one_half_of_a_fused_pair_is_an_error(small):
    with pytest.raises(RecipeError, match="q_a_proj .*kv_a_proj_with_mqa.* must share a scheme"):
        from_golden_stick(policy(opname_blacklist=["lkv2kv", "lm_head", "q2l_proj"]), config=small)


def test_mcore_cell_names_are_recognised(small):
    pol = policy(opname_blacklist=["linear_kv_up_proj", "output_layer"],
                 layer_policies={r".*\.mlp\.(experts|shared_experts|linear_fc).*": FFN_DYNAMIC})
    recipe, _ = from_golden_stick(pol, config=small)
    assert "mcore" in recipe.description
    assert recipe.plan(small).schemes() == load_recipe().plan(small).schemes()


# ---- invalid policies ---------------------------------------------------------------------------------------------

def test_invalid_policy_values_are_errors_with_lines():
    text = textwrap.dedent("""
        weight_quant_dtype: int8
        act_quant_dtype: int8
        outliers_suppression: SMOOTHQUANT
        opname_blacklsit: [lm_head]
        layer_policies:
          '.*\\.feed_forward\\..*':
            act_quant_granularity: PER_TOKENS
            act_quant_dtype: fp8
        """).lstrip("\n")
    with pytest.raises(RecipeError) as excinfo:
        from_golden_stick(text)
    src = "<golden-stick policy>"
    assert excinfo.value.problems == [
        f"{src}:3: outliers_suppression: bad value 'SMOOTHQUANT' (did you mean 'SMOOTH'?); allowed: NONE, SMOOTH, "
        f"OUTLIER_SUPPRESSION_PLUS, OUTLIER_SUPPRESSION_LITE, AWQ",
        f"{src}:4: unknown key 'opname_blacklsit' (did you mean 'opname_blacklist'?)",
        f"{src}:7: layer_policies['.*\\.feed_forward\\..*'].act_quant_granularity: bad value 'PER_TOKENS' "
        f"(did you mean 'PER_TOKEN'?); allowed: PER_TENSOR, PER_CHANNEL, PER_TOKEN, PER_GROUP",
        f"{src}:8: layer_policies['.*\\.feed_forward\\..*'].act_quant_dtype: bad value 'fp8'; "
        f"allowed: int8, qint4x2, null"]


def test_string_blacklist_and_bad_regex_are_errors():
    with pytest.raises(RecipeError, match="each of its characters"):
        from_golden_stick(policy(opname_blacklist="lm_head"))
    with pytest.raises(RecipeError, match="invalid regex"):
        from_golden_stick(policy(layer_policies={"(": FFN_DYNAMIC}))
    with pytest.raises(RecipeError, match="per-channel activations"):
        from_golden_stick(policy(act_quant_granularity="PER_CHANNEL"))
    with pytest.raises(RecipeError, match="without weight quantization"):
        from_golden_stick(policy(weight_quant_dtype=None))


def test_translate_config_and_name_maps():
    assert translate_config(GSConfig())[0] == Scheme("w8a16")                  # GS defaults: weight-only int8
    assert translate_config(GSConfig(weight_quant_dtype=None))[0] == Scheme("float")
    assert linear_kind("model.layers.3.mlp.experts.17.up_proj") == (3, "mlp.experts.{e}.up_proj")
    assert gs_cell_names("model.layers.3.mlp.experts.17.up_proj") == (
        "model.layers.3.feed_forward.routed_experts.ffn.w3",
        "model.layers.3.feed_forward.routed_experts.ffn.w_gate_hidden")
    assert gs_cell_names("model.layers.0.self_attn.kv_b_proj", "mcore") == (
        "decoder.layers.0.self_attention.linear_kv_up_proj",)
    assert gs_cell_names("lm_head") == ("lm_head",)


def test_algo_args_objects_are_read_and_unused_keys_reported(small):
    import dataclasses

    @dataclasses.dataclass
    class GPTQQuantConfig:   # the shape of mindspore_gs.ptq.GPTQQuantConfig
        block_size: int = 128
        desc_act: bool = False

    pol = policy(act_quant_dtype=None, outliers_suppression="NONE", precision_recovery="GPTQ",
                 algo_args=GPTQQuantConfig(), layer_policies={})
    recipe, notes = from_golden_stick(pol, config=small)
    assert warnings_about(notes, "algo_args['block_size']", "ignored")
    assert warnings_about(notes, "algo_args['desc_act']", "ignored")
    assert recipe.plan(small).counts()["w8a16"] == 100
