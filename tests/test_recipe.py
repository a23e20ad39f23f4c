"""Recipes: YAML and Python forms, validation with file lines, and the rewrite plan on small and full R1 configs."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import time

import pytest
from small_configs import small_config

from goldstick.model.architecture import FEEDING_NORMS, fused_groups, smoothing_groups
from goldstick.model.config import ModelConfig
from goldstick.quant.recipe import (
    DEFAULT_RECIPE,
    Calibration,
    Options,
    Recipe,
    RecipeError,
    Rule,
    Scheme,
    load_recipe,
    shipped_recipes,
)
from goldstick.quant.recipe_parts import SCHEMES

SHIPPED = ["deepseek-r1-w8a16", "deepseek-r1-w8a8-dynamic", "deepseek-r1-w8a8-mixed",
           "deepseek-r1-w8a8-smoothquant", "deepseek-r1-w8a8-static-naive", "deepseek-w8a8-dynamic-smoothquant"]
ALWAYS_FLOAT = ("mlp.gate", "self_attn.kv_b_proj")




@pytest.fixture(scope="module")
def small() -> ModelConfig:
    return small_config()


@pytest.fixture(scope="module")
def r1() -> ModelConfig:
    return ModelConfig()


def write(tmp_path, text: str, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def problems_of(excinfo) -> list[str]:
    return excinfo.value.problems


# ---- shipped recipes -------------------------------------------------------------------------------------------

def test_shipped_recipes_load_and_are_named_after_their_file():
    assert shipped_recipes() == SHIPPED
    assert DEFAULT_RECIPE == "deepseek-r1-w8a8-mixed"
    for name in SHIPPED:
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.description
        assert load_recipe(name + ".yaml") == recipe
    assert load_recipe() == load_recipe(DEFAULT_RECIPE)


def test_shipped_recipes_have_a_header_comment():
    from goldstick.quant.recipe import shipped_recipe_dir
    for name in SHIPPED:
        text = (shipped_recipe_dir() / f"{name}.yaml").read_text()
        assert text.startswith(f"# {name}")
        assert "kv_b_proj" in text.split("\nname:")[0]


# small config: 4 layers (layer 0 dense), 8 experts. Per layer 5 MLA linears (incl. kv_b); dense 3 MLP; MoE layers
# router + 8*3 experts + 3 shared. MLA quantized: 4 per layer (16); float: 4 kv_b + 3 routers + lm_head = 8.
SMALL_COUNTS = {
    "deepseek-r1-w8a8-mixed": {"float": 8, "w8a16": 0, "w8a8-static": 16, "w8a8-dynamic": 84},
    "deepseek-r1-w8a8-smoothquant": {"float": 8, "w8a16": 0, "w8a8-static": 100, "w8a8-dynamic": 0},
    "deepseek-r1-w8a8-dynamic": {"float": 8, "w8a16": 0, "w8a8-static": 0, "w8a8-dynamic": 100},
    "deepseek-r1-w8a16": {"float": 8, "w8a16": 100, "w8a8-static": 0, "w8a8-dynamic": 0},
    "deepseek-r1-w8a8-static-naive": {"float": 8, "w8a16": 0, "w8a8-static": 100, "w8a8-dynamic": 0},
    "deepseek-w8a8-dynamic-smoothquant": {"float": 8, "w8a16": 0, "w8a8-static": 0, "w8a8-dynamic": 100},
}
# R1: 61 layers (3 dense), 256 experts -> 45091 linears. Float: 61 kv_b + 58 routers + lm_head = 120.
R1_COUNTS = {
    "deepseek-r1-w8a8-mixed": {"float": 120, "w8a16": 0, "w8a8-static": 244, "w8a8-dynamic": 44727},
    "deepseek-r1-w8a8-smoothquant": {"float": 120, "w8a16": 0, "w8a8-static": 44971, "w8a8-dynamic": 0},
    "deepseek-r1-w8a8-dynamic": {"float": 120, "w8a16": 0, "w8a8-static": 0, "w8a8-dynamic": 44971},
    "deepseek-r1-w8a16": {"float": 120, "w8a16": 44971, "w8a8-static": 0, "w8a8-dynamic": 0},
    "deepseek-r1-w8a8-static-naive": {"float": 120, "w8a16": 0, "w8a8-static": 44971, "w8a8-dynamic": 0},
    "deepseek-w8a8-dynamic-smoothquant": {"float": 120, "w8a16": 0, "w8a8-static": 0, "w8a8-dynamic": 44971},
}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_plan_counts_small(name, small):
    plan = load_recipe(name).plan(small)
    assert len(plan) == len(small.linear_names()) == 108
    assert plan.counts() == SMALL_COUNTS[name]
    assert plan.overlaps() == [] and plan.errors == ()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_plan_counts_r1_and_fast(name, r1):
    start = time.perf_counter()
    plan = load_recipe(name).plan(r1)
    elapsed = time.perf_counter() - start
    assert len(plan) == 45091
    assert plan.counts() == R1_COUNTS[name]
    assert elapsed < 2.0, f"planning R1 took {elapsed:.2f}s"


@pytest.mark.parametrize("name", SHIPPED)
def test_router_kv_b_and_lm_head_stay_float(name, small, r1):
    for cfg in (small, r1, small_config(q_lora_rank=None)):
        plan = load_recipe(name).plan(cfg)
        for entry in plan:
            if entry.name == "lm_head" or entry.name.endswith(ALWAYS_FLOAT):
                assert entry.scheme == Scheme("float"), entry
            else:
                assert entry.scheme.quantized, entry


def test_mixed_recipe_is_the_golden_stick_mix(small):
    plan = load_recipe("deepseek-r1-w8a8-mixed").plan(small)
    osplus = Scheme("w8a8-static", "osplus")
    for suffix in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
        assert plan.scheme_of(f"model.layers.2.self_attn.{suffix}") == osplus
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj", "model.layers.3.mlp.experts.7.up_proj",
                 "model.layers.1.mlp.shared_experts.down_proj"):
        assert plan.scheme_of(name) == Scheme("w8a8-dynamic")
    assert plan.needs_calibration


def test_smoothquant_alpha_is_resolved_in_the_plan(small):
    plan = load_recipe("deepseek-r1-w8a8-smoothquant").plan(small)
    assert plan.scheme_of("model.layers.1.self_attn.o_proj") == Scheme("w8a8-static", "smoothquant", 0.5)
    recipe = Recipe(rules=[Rule(".*", Scheme("w8a8-static", "smoothquant"))], options=Options(smoothquant_alpha=0.8))
    assert recipe.plan(small).scheme_of("lm_head").alpha == 0.8


def test_data_free_recipes_need_no_calibration(small):
    assert not load_recipe("deepseek-r1-w8a8-dynamic").plan(small).needs_calibration
    assert not load_recipe("deepseek-r1-w8a16").plan(small).needs_calibration


def test_mtp_layer_is_not_planned(r1):
    cfg = dataclasses.replace(r1, num_nextn_predict_layers=1)
    plan = load_recipe().plan(cfg)
    assert not any(e.name.startswith("model.layers.61.") for e in plan)
    assert plan.for_layer(61) == []
    with pytest.raises(KeyError, match="MTP"):
        plan.scheme_of("model.layers.61.self_attn.o_proj")


def test_q_lora_rank_none(small):
    cfg = small_config(q_lora_rank=None)
    plan = load_recipe().plan(cfg)
    assert plan.scheme_of("model.layers.0.self_attn.q_proj") == Scheme("w8a8-static", "osplus")
    assert "model.layers.0.self_attn.q_a_proj" not in plan
    assert plan.counts() == {"float": 8, "w8a16": 0, "w8a8-static": 12, "w8a8-dynamic": 84}
    groups = {g.key: g.linears for g in smoothing_groups(cfg, 0)}
    assert groups["model.layers.0.input_layernorm"] == ("model.layers.0.self_attn.q_proj",
                                                        "model.layers.0.self_attn.kv_a_proj_with_mqa")
    assert "model.layers.0.self_attn.q_a_layernorm" not in groups
    assert all(g.key != "fused_qkv_a_proj" for g in fused_groups(cfg, 0))


def test_all_moe_and_all_dense_models_plan_without_errors():
    for cfg in (small_config(first_k_dense_replace=0), small_config(first_k_dense_replace=4)):
        for name in SHIPPED:
            assert load_recipe(name).plan(cfg).errors == ()


# ---- rules: first match, overlaps, dead rules ----------------------------------------------------------------------

def test_first_match_wins(small):
    recipe = Recipe(rules=[Rule(r"model\.layers\.2\..*", "w8a16"), Rule(r".*", "w8a8-dynamic")])
    plan = recipe.plan(small)
    assert plan.scheme_of("model.layers.2.mlp.experts.3.up_proj") == Scheme("w8a16")
    assert plan["model.layers.2.mlp.experts.3.up_proj"].rule == 0
    assert plan["model.layers.3.mlp.experts.3.up_proj"].rule == 1
    assert plan["model.layers.3.mlp.experts.3.up_proj"].match == ".*"
    assert plan.overlaps()[0].count == len(small.layer_linear_names(2))


def test_overlaps_are_reported(small):
    recipe = Recipe(rules=[Rule(r".*\.self_attn\.kv_b_proj|lm_head", "float"),
                           Rule(r".*\.self_attn\..*", "w8a16"),
                           Rule(r".*\.mlp\..*", "w8a16")])
    plan = recipe.plan(small)
    overlaps = plan.overlaps()
    assert [(o.rule, o.shadowed, o.count) for o in overlaps] == [(0, 1, 4)]
    assert overlaps[0].example == "model.layers.0.self_attn.kv_b_proj"
    assert str(overlaps[0]) == "rule 0 shadows rule 1 on 4 linears (e.g. model.layers.0.self_attn.kv_b_proj)"
    assert "rule 0 shadows rule 1 on 4 linears" in plan.format()
    assert plan.rule_matches == (5, 20, 87) and plan.rule_takes == (5, 16, 87)  # mlp.* includes the routers


def test_rule_matching_nothing_is_an_error(small):
    recipe = Recipe(rules=[Rule(".*", "w8a16"), Rule("q_b_proj", "float")], source="x.yaml")
    with pytest.raises(RecipeError) as excinfo:
        recipe.plan(small)
    (problem,) = problems_of(excinfo)
    assert problem.startswith("x.yaml: rule 1 ('q_b_proj') matches no linear of this model")
    assert "re.fullmatch" in problem  # it would match as a substring: the message says why it does not
    plan = recipe.plan(small, strict=False)
    assert plan.errors and "errors:" in plan.format()


def test_rule_errors_from_yaml_give_the_rule_line(small):
    text = ("name: lines\ndefault: float\nrules:\n  - match: '.*\\.o_proj'\n    scheme: w8a16\n"
            "  - match: 'q_a_proj'\n    scheme: w8a16\n  - match: '.*\\.self_attn\\.o_proj'\n    scheme: w8a16\n")
    recipe = Recipe.from_yaml_string(text, source="lines.yaml")
    assert [r.line for r in recipe.rules] == [4, 6, 8]
    assert recipe.rules[0] == Rule(r".*\.o_proj", "w8a16")  # the line is where it came from, not part of the rule
    with pytest.raises(RecipeError) as excinfo:
        recipe.plan(small)
    unmatched, shadowed = problems_of(excinfo)
    assert unmatched.startswith("lines.yaml: rule 1 ('q_a_proj', line 6) matches no linear of this model")
    assert shadowed.startswith(r"lines.yaml: rule 2 ('.*\.self_attn\.o_proj', line 8) never applies")


def test_rule_with_weight_suffix_gets_a_hint(small):
    with pytest.raises(RecipeError, match=r"no '\.weight' suffix"):
        Recipe(rules=[Rule(r".*\.o_proj\.weight", "w8a16")]).plan(small)


def test_rule_that_never_applies_is_an_error(small):
    recipe = Recipe(rules=[Rule(".*", "w8a16"), Rule(r".*\.kv_b_proj", "float")])
    with pytest.raises(RecipeError, match=r"rule 1 .* never applies: .*rule 0 on 4"):
        recipe.plan(small)


# ---- fused groups --------------------------------------------------------------------------------------------------

def test_split_fused_qkv_a_is_an_error_naming_both(small):
    recipe = Recipe(rules=[Rule(r".*\.q_a_proj", "w8a16")], default="w8a8-dynamic")
    with pytest.raises(RecipeError) as excinfo:
        recipe.plan(small)
    (problem,) = problems_of(excinfo)
    assert "model.layers.0.self_attn.q_a_proj (w8a16, rule 0)" in problem
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa (w8a8-dynamic, default)" in problem
    assert "fused_qkv_a_proj" in problem and "3 more" in problem


def test_split_gate_up_is_an_error(small):
    recipe = Recipe(rules=[Rule(r".*\.mlp\.up_proj|.*\.shared_experts\.up_proj", "w8a16")], default="w8a8-dynamic")
    problems = []
    with pytest.raises(RecipeError) as excinfo:
        recipe.plan(small)
    problems = problems_of(excinfo)
    assert len(problems) == 2
    assert "model.layers.0.mlp.gate_proj (w8a8-dynamic, default) and model.layers.0.mlp.up_proj (w8a16, rule 0)" \
        in problems[0] and "gate_up_proj" in problems[0]
    assert "model.layers.1.mlp.shared_experts.gate_proj" in problems[1] and "2 more" in problems[1]


def test_routed_experts_of_a_layer_share_one_scheme(small):
    recipe = Recipe(rules=[Rule(r".*\.experts\.3\..*", "w8a16")], default="w8a8-dynamic")
    with pytest.raises(RecipeError) as excinfo:
        recipe.plan(small)
    (problem,) = problems_of(excinfo)
    assert "model.layers.1.mlp.experts.0.gate_proj (w8a8-dynamic, default)" in problem
    assert "model.layers.1.mlp.experts.3.gate_proj (w8a16, rule 0)" in problem
    assert "fused MoE kernel" in problem
    # fused members with equal schemes but different outlier suppression are split too
    recipe = Recipe(rules=[Rule(r".*\.kv_a_proj_with_mqa", Scheme("w8a8-static", "smoothquant"))],
                    default="w8a8-static")
    with pytest.raises(RecipeError, match="w8a8-static\\+smoothquant"):
        recipe.plan(small)


def test_feeding_norm_and_fused_tables(small):
    assert FEEDING_NORMS["self_attn.q_a_layernorm"] == ("self_attn.q_b_proj",)
    groups = {g.key: g.linears for g in smoothing_groups(small, 1)}
    assert groups["model.layers.1.input_layernorm"] == ("model.layers.1.self_attn.q_a_proj",
                                                        "model.layers.1.self_attn.kv_a_proj_with_mqa")
    assert groups["model.layers.1.self_attn.kv_a_layernorm"] == ("model.layers.1.self_attn.kv_b_proj",)
    post = groups["model.layers.1.post_attention_layernorm"]
    assert "model.layers.1.mlp.gate" in post and "model.layers.1.mlp.experts.7.up_proj" in post
    assert len(post) == 1 + 2 + 8 * 2 and not any(n.endswith(("down_proj", "o_proj")) for n in post)
    dense = {g.key: g.linears for g in smoothing_groups(small, 0)}
    assert dense["model.layers.0.post_attention_layernorm"] == ("model.layers.0.mlp.gate_proj",
                                                                "model.layers.0.mlp.up_proj")
    kinds = [g.key for g in fused_groups(small, 1)]
    assert kinds.count("fused_qkv_a_proj") == 1 and kinds.count("fused_moe") == 1
    assert kinds.count("gate_up_proj") == 1 + 8   # shared experts + one per routed expert


# ---- plan lookups and output ---------------------------------------------------------------------------------------

def test_plan_lookups(small):
    plan = load_recipe().plan(small)
    layer1 = plan.for_layer(1)
    assert [e.name for e in layer1] == small.layer_linear_names(1)
    assert plan.scheme_of("model.layers.1.self_attn.o_proj.weight") == plan.scheme_of("model.layers.1.self_attn.o_proj")
    entry = plan["model.layers.1.mlp.gate"]
    assert entry.rule == 0 and entry.chosen_by == "rule 0"
    with pytest.raises(KeyError):
        plan.scheme_of("model.embed_tokens")
    assert set(plan.counts()) == set(SCHEMES)


def test_format_collapses_experts_and_shows_every_linear(r1):
    plan = load_recipe().plan(r1)
    text = plan.format()
    rows = plan.rows()
    assert sum(n for _, n, _, _ in rows) == len(plan) == 45091
    assert len(rows) == 16
    assert "model.layers.{3..60}.mlp.experts.{0..255}.gate_proj" in text
    line = next(row for row in text.splitlines() if "experts.{0..255}.gate_proj" in row)
    assert "14848" in line and "w8a8-dynamic" in line and "rule 2" in line
    assert "model.layers.{0..2}.mlp.down_proj" in text
    assert "counts: float 120, w8a8-static+osplus 244, w8a8-dynamic 44727" in text
    assert "overlaps: none" in text


def test_format_keeps_non_contiguous_sets_apart(small):
    recipe = Recipe(rules=[Rule(r"model\.layers\.[13]\..*|lm_head", "w8a16")], default="w8a8-dynamic")
    rows = {r[0]: r for r in recipe.plan(small).rows()}
    assert rows["model.layers.{1,3}.mlp.experts.{0..7}.up_proj"][1:] == (16, "w8a16", "rule 0")
    assert rows["model.layers.2.mlp.experts.{0..7}.up_proj"][1:] == (8, "w8a8-dynamic", "default")


def test_plan_to_json(small):
    data = json.loads(load_recipe("deepseek-r1-w8a8-smoothquant").plan(small).to_json())
    assert data["recipe"] == "deepseek-r1-w8a8-smoothquant"
    assert data["counts"]["w8a8-static"] == 100
    assert data["linears"]["model.layers.0.self_attn.q_a_proj"] == {
        "scheme": "w8a8-static", "outlier_suppression": "smoothquant", "alpha": 0.5, "rule": 1}
    assert data["linears"]["lm_head"] == {"scheme": "float", "rule": 0}
    assert len(data["linears"]) == 108 and data["errors"] == [] and data["needs_calibration"]


# ---- YAML: round trip and validation with file lines -------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_yaml_round_trip_of_shipped(name):
    recipe = load_recipe(name)
    assert Recipe.from_yaml_string(recipe.to_yaml()) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_yaml_round_trip_of_python_recipe(tmp_path):
    recipe = Recipe(name="custom", description="all options",
                    rules=[Rule(r".*\.kv_b_proj|lm_head|.*\.mlp\.gate", "float", note="keep"),
                           Rule(r".*\.self_attn\..*", Scheme("w8a8-static", "smoothquant", alpha=0.75))],
                    default=Scheme("w8a8-static", "osplus"),
                    calibration=Calibration(data="calib.jsonl", samples=7, seq_len=99, seed=3),
                    options=Options(inputs_from="float", moe_calibrate_all_experts=True, weight_rounding="gs",
                                    token_sample=10, osplus_grid=5, smoothquant_alpha=0.25))
    path = write(tmp_path, recipe.to_yaml())
    again = Recipe.from_yaml(path)
    assert again == recipe and again.source == path


def test_readme_python_example_plans():
    recipe = Recipe(name="attn-sq",
                    rules=[Rule(r".*\.mlp\.gate|.*\.kv_b_proj|lm_head", "float"),
                           Rule(r".*\.self_attn\..*", Scheme("w8a8-static", "smoothquant", alpha=0.8)),
                           Rule(r".*\.mlp\..*_proj", "w8a8-dynamic")],
                    calibration=Calibration(data="calib.jsonl"))
    plan = recipe.plan(small_config())
    assert plan.counts()["w8a8-static"] == 16 and [o.shadowed for o in plan.overlaps()] == [1]


def test_unknown_key_names_the_nearest_key_and_line(tmp_path):
    path = write(tmp_path, """
        name: t
        rules:
          - match: '.*'
            shceme: w8a16
        """)
    with pytest.raises(RecipeError) as excinfo:
        Recipe.from_yaml(path)
    assert problems_of(excinfo) == [f"{path}:4: rules[0]: unknown key 'shceme' (did you mean 'scheme'?)"]


def test_unknown_top_level_and_option_keys(tmp_path):
    path = write(tmp_path, """
        rule: []
        options:
          smoothquant_alpah: 0.3
        """)
    with pytest.raises(RecipeError) as excinfo:
        Recipe.from_yaml(path)
    assert problems_of(excinfo) == [
        f"{path}:1: unknown key 'rule' (did you mean 'rules'?)",
        f"{path}:3: options: unknown key 'smoothquant_alpah' (did you mean 'smoothquant_alpha'?)"]


def test_bad_values_list_the_allowed_ones_with_line(tmp_path):
    path = write(tmp_path, """
        default: w8a8
        rules:
          - match: '.*'
            scheme: w8a8-static
            outlier_suppression: smooth
        options:
          inputs_from: fp
          weight_rounding: absmax
        """)
    with pytest.raises(RecipeError) as excinfo:
        Recipe.from_yaml(path)
    assert problems_of(excinfo) == [
        f"{path}:1: default.scheme: bad value 'w8a8' (did you mean one of 'w8a8-static', 'w8a8-dynamic'?); "
        f"allowed: float, w8a16, w8a8-static, w8a8-dynamic",
        f"{path}:5: rules[0].outlier_suppression: bad value 'smooth' (did you mean 'smoothquant'?); "
        f"allowed: none, smoothquant, osplus",
        f"{path}:7: options.inputs_from: bad value 'fp'; allowed: quantized, float",
        f"{path}:8: options.weight_rounding: bad value 'absmax' (did you mean 'absmax127'?); "
        f"allowed: absmax127, gs"]


def test_out_of_range_and_inconsistent_scheme_options(tmp_path):
    path = write(tmp_path, """
        rules:
          - match: '.*'
            scheme: w8a8-static
            outlier_suppression: smoothquant
            alpha: 1.5
          - match: 'lm_head'
            scheme: w8a8-dynamic
            outlier_suppression: osplus
          - match: 'lm_head'
            scheme: w8a8-static
            alpha: 0.5
        """)
    with pytest.raises(RecipeError) as excinfo:
        Recipe.from_yaml(path)
    assert problems_of(excinfo) == [
        f"{path}:5: rules[0].alpha: must be in (0, 1], got 1.5",
        f"{path}:8: rules[1].outlier_suppression: 'osplus' applies only to scheme w8a8-static, not w8a8-dynamic",
        f"{path}:11: rules[2].alpha: alpha is the SmoothQuant strength: set it only with "
        f"outlier_suppression: smoothquant"]


def test_invalid_regex_with_line(tmp_path):
    path = write(tmp_path, """
        rules:
          - match: 'lm_head'
            scheme: float
          - match: '.*(q_a|kv_a'
            scheme: w8a16
        """)
    with pytest.raises(RecipeError) as excinfo:
        Recipe.from_yaml(path)
    (problem,) = problems_of(excinfo)
    assert problem.startswith(f"{path}:4: rules[1].match: invalid regex '.*(q_a|kv_a': missing )")


def test_wrong_types_with_line(tmp_path):
    path = write(tmp_path, """
        name: 3
        rules:
          - match: 42
            scheme: float
          - just a string
        calibration:
          samples: "128"
          seq_len: 1e3
          seed: -1
        options:
          moe_calibrate_all_experts: maybe
          token_sample: true
        """)
    with pytest.raises(RecipeError) as excinfo:
        Recipe.from_yaml(path)
    assert problems_of(excinfo) == [
        f"{path}:1: name: expected a string, got int 3",
        f"{path}:3: rules[0].match: expected a regex string, got int 42",
        f"{path}:5: rules[1]: expected a mapping with keys match, scheme, outlier_suppression, alpha, note; "
        f"got str 'just a string'",
        f"{path}:7: calibration.samples: expected an integer, got str '128'",
        f"{path}:8: calibration.seq_len: expected an integer, got str '1e3'",
        f"{path}:9: calibration.seed: must be >= 0, got -1",
        f"{path}:11: options.moe_calibrate_all_experts: expected true or false, got str 'maybe'",
        f"{path}:12: options.token_sample: expected an integer, got bool True"]


def test_rules_must_be_a_list_and_rules_need_match_and_scheme(tmp_path):
    path = write(tmp_path, "rules:\n  match: '.*'\n  scheme: float\n")
    with pytest.raises(RecipeError, match=r":1: rules: expected a list of rules, got dict"):
        Recipe.from_yaml(path)
    path = write(tmp_path, "rules:\n  - scheme: float\n")
    with pytest.raises(RecipeError, match=r":2: rules\[0\]: missing key 'match'"):
        Recipe.from_yaml(path)


def test_duplicate_keys_and_yaml_syntax_errors_have_lines(tmp_path):
    path = write(tmp_path, "default: float\nname: a\ndefault: w8a16\n")
    with pytest.raises(RecipeError, match=r":3: duplicate key 'default'"):
        Recipe.from_yaml(path)
    path = write(tmp_path, "rules:\n  - match: '.*'\n    scheme: [float\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: not valid YAML"):
        Recipe.from_yaml(path)
    with pytest.raises(RecipeError, match="empty"):
        Recipe.from_yaml(write(tmp_path, "# nothing\n"))


def test_from_dict_reports_locations_without_lines():
    with pytest.raises(RecipeError) as excinfo:
        Recipe.from_dict({"rules": [{"match": ".*", "scheme": "int8"}]}, source="notebook")
    assert problems_of(excinfo) == ["notebook: rules[0].scheme: bad value 'int8'; "
                                    "allowed: float, w8a16, w8a8-static, w8a8-dynamic"]


def test_python_objects_validate_where_they_are_born():
    with pytest.raises(RecipeError, match="Scheme.name: bad value 'w4a16'"):
        Scheme("w4a16")
    with pytest.raises(RecipeError, match="applies only to schemes w8a8-static and w8a8-dynamic"):
        Scheme("w8a16", outlier_suppression="smoothquant")
    with pytest.raises(RecipeError, match="Rule.match: invalid regex"):
        Rule("(", "float")
    with pytest.raises(RecipeError) as excinfo:
        Options(inputs_from="x", token_sample=0)
    assert len(problems_of(excinfo)) == 2
    with pytest.raises(RecipeError, match="Calibration.samples: expected an integer"):
        Calibration(samples=1.5)
    with pytest.raises(RecipeError, match=r"Recipe.rules\[0\]: expected a Rule"):
        Recipe(rules=[".*"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        Scheme("float").name = "w8a16"
    assert Rule(".*", "w8a16").scheme == Scheme("w8a16")
    assert Scheme("w8a8-static", "smoothquant", 0.5).label == "w8a8-static+smoothquant(0.5)"


def test_with_calibration_replaces_fields():
    recipe = load_recipe().with_calibration(data="calib.jsonl", samples=16)
    assert recipe.calibration == Calibration(data="calib.jsonl", samples=16)
    assert recipe.rules == load_recipe().rules
    with pytest.raises(RecipeError, match="Calibration.samples"):
        load_recipe().with_calibration(samples=0)


def test_load_recipe_by_path_and_unknown_name(tmp_path):
    path = write(tmp_path, "name: mine\nrules:\n  - match: '.*'\n    scheme: w8a16\n", name="mine.yaml")
    assert load_recipe(path).name == "mine"
    with pytest.raises(RecipeError, match="did you mean 'deepseek-r1-w8a8-mixed'"):
        load_recipe("deepseek-r1-w8a8-mixd")
