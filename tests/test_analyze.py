"""goldstick analyze: per-linear/per-layer loss analysis, sensitivity ranking, proposed mixed recipe.

Done-when checks on the embedded default model with the all-static naive recipe: the linears that read the norms
with planted outliers (read from make_model.json, never hard-coded) rank as the most sensitive, and the proposed
recipe beats the all-static one on agreement with float (held-out KL here; C-Eval-val on the fixture, slow).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from goldstick.cli import main as cli
from goldstick.evaluation.analyze import (
    AnalyzeError,
    candidate_units,
    layer_units,
    parse_budget,
    recipe_with_moves,
    safer_scheme,
    slot_of,
)
from goldstick.model.architecture import fused_groups, smoothing_groups
from goldstick.model.config import ModelConfig
from goldstick.quant.recipe import Scheme, load_recipe
from goldstick.testing.make_model import default_model_path

NAIVE = "deepseek-r1-w8a8-static-naive"
FAST = dict(calib_samples=8, calib_seq_len=64, progress=False)
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ceval"
# the norms make_model plants amplified channels in, with their key in make_model.json
PLANTED_NORMS = {"input_layernorm": "input_norm_gain", "post_attention_layernorm": "post_norm_gain",
                 "self_attn.q_a_layernorm": "q_a_norm_gain"}


@pytest.fixture(scope="module")
def tiny() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def cfg(tiny) -> ModelConfig:
    return ModelConfig.from_file(tiny)


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """`goldstick analyze` on the default model with the all-static naive recipe, proposing a mix (50% budget)."""
    out = tmp_path_factory.mktemp("analysis")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli(["analyze", "--model", str(tiny), "--recipe", NAIVE, "--out", str(out), "--calib-samples", "8",
                    "--calib-seq-len", "64", "--propose", "--budget", "50%", "--safer", "dynamic", "--plots", "1",
                    "--no-progress"])
    assert code == 0
    report = json.loads((out / "analysis.json").read_text())
    return out, report, printed.getvalue()


@pytest.fixture(scope="module")
def planted(tiny) -> dict:
    return json.loads((tiny / "make_model.json").read_text())["planted"]


def feeding_norm(cfg, name: str) -> str | None:
    layer = int(re.match(r"model\.layers\.(\d+)\.", name).group(1))
    for group in smoothing_groups(cfg, layer):
        if any(slot_of(n) == name for n in group.linears):
            return group.key.split(f"model.layers.{layer}.", 1)[1]
    return None


def planted_channels(planted: dict, name: str, norm: str) -> set[int]:
    layer = re.match(r"model\.layers\.(\d+)\.", name).group(1)
    gains = planted[PLANTED_NORMS[norm]].get(layer, {})
    special = set(planted["massive"]) | set(planted["offset"]) if norm != "self_attn.q_a_layernorm" else set()
    return {int(c) for c in set(gains) | special}


# ---- the done-when check: ranking ---------------------------------------------------------------------------------
def test_planted_outlier_readers_rank_most_sensitive(run, cfg, planted):
    _, report, _ = run
    ranking = [row["slot"] for row in report["ranking"]]
    # the norm make_model amplifies most; its readers must lead the ranking
    amplified = max(("input_layernorm", "self_attn.q_a_layernorm", "post_attention_layernorm"),
                    key=lambda n: max(max(g.values()) for g in planted[PLANTED_NORMS[n]].values()))
    readers = [i for i, s in enumerate(ranking) if feeding_norm(cfg, s) == amplified]
    plain = [i for i, row in enumerate(report["ranking"])
             if feeding_norm(cfg, row["slot"]) not in PLANTED_NORMS and row["scheme"] != "float"]
    assert readers and plain
    assert max(readers) < min(plain), f"{ranking[min(plain)]} (no planted input) outranks a reader of {amplified}"
    for name in ranking[:len(readers)]:
        norm = feeding_norm(cfg, name)
        assert norm in PLANTED_NORMS, f"{name} (rank {ranking.index(name) + 1}) reads no planted-outlier norm"
        layer = re.match(r"model\.layers\.(\d+)\.", name).group(1)
        assert planted[PLANTED_NORMS[norm]].get(layer), f"{name}: make_model.json plants nothing in its norm"
        # and the analysis names planted channels as the worst ones of that linear's input
        worst = [w["channel"] for w in report["linears"][name]["input"]["worst_channels"][:2]]
        assert set(worst) <= planted_channels(planted, name, norm), (name, worst)


def test_outlier_statistics_find_planted_channels(run, cfg, planted):
    _, report, _ = run
    for layer in range(cfg.num_hidden_layers):
        for linear, key in (("q_a_proj", "input_norm_gain"), ("q_b_proj", "q_a_norm_gain")):
            info = report["linears"][f"model.layers.{layer}.self_attn.{linear}"]["input"]
            gains = {int(c): g for c, g in planted[key][str(layer)].items()}
            worst = [w["channel"] for w in info["worst_channels"]]
            assert worst[0] in gains, (linear, layer, worst, gains)
            assert len(set(worst) & set(gains)) >= (len(gains) + 1) // 2, (linear, layer, worst, gains)
            assert "after" not in info  # the naive recipe smooths nothing
        assert report["linears"][f"model.layers.{layer}.self_attn.q_a_proj"]["input"]["range_ratio"] > 5


def test_report_contents(run, cfg):
    out, report, printed = run
    assert report["schema"] == "goldstick.analyze/1"
    assert len(report["layers"]) == cfg.num_hidden_layers
    first = report["layers"][0]
    assert first["sqnr_db"] == first["cumulative_sqnr_db"]  # layer 0 sees the embeddings in both chains
    for layer in report["layers"]:
        assert 0.9 < layer["cosine"] <= 1 and 0.9 < layer["cumulative_cosine"] <= 1
        assert layer["delta_cosine"] < layer["cosine"]  # the residual branch alone carries the error
        assert layer["worst_linear"] in report["linears"]
    for name, row in report["linears"].items():
        if isinstance(row["engine_sqnr_db"], float):  # our hooks measure what the engine reports
            assert abs(row["sqnr_db"] - row["engine_sqnr_db"]) < 0.01, name
        assert 0.9 < row["cosine"] <= 1
    # one slot per projection for the routed experts of a layer; the ranking is ordered by NSR
    assert any(r["slot"].endswith("mlp.experts.*.down_proj") and r["members"] == cfg.n_routed_experts
               for r in report["ranking"])
    nsr = [r["nsr"] for r in report["ranking"]]
    assert nsr == sorted(nsr, reverse=True)
    assert abs(sum(nsr) - report["estimate"]["recipe"]) < 1e-4 * report["estimate"]["recipe"]
    assert report["estimate"]["all_safer"] < report["estimate"]["recipe"]
    assert len(report["plots"]) == 1 and all((out / p).stat().st_size > 1000 for p in report["plots"])
    md = (out / "analysis.md").read_text()
    assert "## Most sensitive linears" in md and "## Proposed recipe" in md and report["plots"][0] in md
    assert "most sensitive linears" in printed and "name: deepseek-r1-w8a8-static-naive-proposed" in printed


def test_smoothing_is_reported_before_and_after(tiny, tmp_path):
    from goldstick.evaluation.analyze import analyze

    result = analyze(tiny, "deepseek-r1-w8a8-smoothquant", out=tmp_path, plots=1, calib_samples=4,
                     calib_seq_len=32, progress=False)
    info = result.report["linears"]["model.layers.0.self_attn.q_a_proj"]
    assert info["transform"]["folded_into"] == "model.layers.0.input_layernorm"
    # SmoothQuant moves the outliers into the weights: the activation range shrinks
    assert info["input"]["after"]["range_ratio"] < info["input"]["range_ratio"] / 2
    assert result.report["plots"] and result.proposal is None
    import numpy as np

    arrays = np.load(tmp_path / "channel-stats.npz")
    name = "model.layers.0.self_attn.q_a_proj"
    absmax, scale = arrays[f"{name}/absmax"], arrays[f"{name}/scale"]
    assert absmax.shape == scale.shape == (info["input"]["channels"],)
    assert float((absmax / scale).max()) == pytest.approx(info["input"]["after"]["absmax_max"], rel=1e-3)


# ---- the proposal ---------------------------------------------------------------------------------------------------
def test_proposal_is_a_valid_recipe_that_respects_fused_groups(run, cfg):
    out, report, _ = run
    prop = report["proposal"]
    assert prop["budget_value"] == pytest.approx(prop["start"] / 2, rel=1e-4)
    assert prop["fits"] and prop["estimate"] <= prop["budget_value"]
    gains = [s["gain"] for s in prop["steps"]]
    assert gains == sorted(gains, reverse=True) and all(g > 0 for g in gains)
    recipe = load_recipe(out / "proposed-recipe.yaml")  # what `goldstick quantize` reads
    plan = recipe.plan(cfg)  # strict: fused groups share a scheme, every rule takes something
    naive = load_recipe(NAIVE).plan(cfg)
    moved = {m for u in report["units"] for m in u["members"] if u["unit"] in {s["unit"] for s in prop["steps"]}}
    assert moved
    for e in plan:
        expected = "w8a8-dynamic" if e.name in moved else naive.scheme_of(e.name).name
        assert e.scheme.name == expected, e.name
    for layer in range(cfg.num_hidden_layers):
        for group in fused_groups(cfg, layer):
            assert len({plan.scheme_of(n) for n in group.linears}) == 1
    # the new, specific rules come first; the recipe's rules follow in their order
    assert all(r.note.startswith("goldstick analyze") for r in recipe.rules[:len(recipe.rules) - 3])
    assert [r.match for r in recipe.rules[-3:]] == [r.match for r in load_recipe(NAIVE).rules]


def test_proposal_beats_all_static_on_heldout_kl(run, quantized, tiny):
    from goldstick.evaluation.compare import compare_models, heldout_batches, model_logits
    from goldstick.io.loader import load_model

    held = dict(samples=8, seq_len=128)
    float_logits = model_logits(load_model(tiny), heldout_batches(tiny, **held))
    static = compare_models(tiny, quantized["static"], float_logits=float_logits, **held)
    proposed = compare_models(tiny, quantized["proposed"], float_logits=float_logits, **held)
    assert proposed.kl_mean < 0.8 * static.kl_mean
    assert proposed.top1_agreement > static.top1_agreement


@pytest.fixture(scope="module")
def quantized(run, tiny, tmp_path_factory):
    from goldstick.engine.pipeline import quantize

    out, _, _ = run
    root = tmp_path_factory.mktemp("quantized")
    quantize(tiny, NAIVE, out=root / "static", **FAST)
    quantize(tiny, out / "proposed-recipe.yaml", out=root / "proposed", **FAST)
    return {"static": root / "static", "proposed": root / "proposed"}


@pytest.mark.slow
def test_proposal_beats_all_static_on_ceval_agreement(quantized, tiny, tmp_path):
    from goldstick.evaluation.ceval_run import run_ceval

    report = run_ceval(tiny, [("static", str(quantized["static"])), ("proposed", str(quantized["proposed"]))],
                       data=FIXTURE, split="val", shots=0, progress=False, plots=False, bootstrap_samples=200,
                       log=lambda _: None)
    static, proposed = report["comparisons"]["static"], report["comparisons"]["proposed"]
    # the fixture is small (30 questions): fewer (or as few) flipped answers, and A-D distributions closer to float
    assert proposed["flip_rate"] <= static["flip_rate"]
    assert proposed["kl"]["mean"] < static["kl"]["mean"]


# ---- pieces -------------------------------------------------------------------------------------------------------
def test_units_follow_fused_groups(cfg):
    moe = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    units = dict(layer_units(cfg, moe, cfg.layer_linear_names(moe)))
    experts = units[f"model.layers.{moe}.mlp.experts.*"]
    assert len(experts) == 3 * cfg.n_routed_experts
    assert units[f"model.layers.{moe}.self_attn.fused_qkv_a_proj"] == (
        f"model.layers.{moe}.self_attn.q_a_proj", f"model.layers.{moe}.self_attn.kv_a_proj_with_mqa")
    assert len(units[f"model.layers.{moe}.mlp.shared_experts.gate_up_proj"]) == 2
    assert units[f"model.layers.{moe}.self_attn.o_proj"] == (f"model.layers.{moe}.self_attn.o_proj",)
    names = [n for members in units.values() for n in members]
    assert sorted(names) == sorted(cfg.layer_linear_names(moe))  # a partition
    assert slot_of(f"model.layers.{moe}.mlp.experts.7.up_proj") == f"model.layers.{moe}.mlp.experts.*.up_proj"


def test_recipe_with_moves_writes_first_match_rules(cfg):
    naive = load_recipe(NAIVE)
    plan = naive.plan(cfg)
    units = candidate_units(cfg, plan, safer_scheme("w8a16"))
    assert not any(m.endswith("kv_b_proj") for _, members, _ in units for m in members)  # already float
    chosen = [u for u in units if u[0].endswith(("fused_qkv_a_proj", "mlp.experts.*"))][:3]
    moves = [(u, m, Scheme("w8a16")) for u, m, _ in chosen]
    mixed = recipe_with_moves(naive, cfg, moves, name="mix")
    new = mixed.plan(cfg)
    moved = {m for _, members, _ in moves for m in members}
    assert all(new.scheme_of(n).name == ("w8a16" if n in moved else plan.scheme_of(n).name) for n in plan.schemes())
    # moving everything the naive recipe quantizes drops its now-useless rules instead of failing
    everything = recipe_with_moves(naive, cfg, [(u, m, Scheme("float")) for u, m, _ in
                                                candidate_units(cfg, plan, safer_scheme("float"))])
    assert set(e.scheme.name for e in everything.plan(cfg)) == {"float"}
    assert everything.rules[-1].match == naive.rules[0].match  # the router/kv_b/lm_head rule still takes them


def test_budget_parsing():
    assert parse_budget("0.02", 1.0) == 0.02
    assert parse_budget("25%", 0.08) == pytest.approx(0.02)
    with pytest.raises(AnalyzeError):
        parse_budget("lots", 1.0)
    with pytest.raises(AnalyzeError):
        safer_scheme("int4")
