"""Per-layer quantization-loss analysis of a recipe, a sensitivity ranking, and a proposed mixed recipe.

    goldstick analyze --model DIR --recipe RECIPE [--calib PATH --calib-samples N --calib-seq-len L] --out DIR
                      [--propose --budget X --safer dynamic|w8a16|float] [--verify]

``analyze`` drives the quantization engine (``LayerQuantizer``) layer by layer on the calibration data,
exactly as ``goldstick quantize`` does (same calibration, same transforms, same integer cells, the next layer fed
with the quantized outputs when ``options.inputs_from`` is ``quantized``), writes nothing but the analysis, and adds
a few hooks of its own:

* **per linear**, on the float pass: the per-channel statistics of the linear's input (count, mean, std, min, max,
  and quantiles of a bounded token sample for the box plots); on the quantized pass: the linear's output against
  the float linear on the *same* input (the engine's reference weights, so folded smoothing is accounted for):
  SQNR and cosine similarity.
* **per decoder layer**: SQNR and cosine of the quantized layer's output against the float layer on the same input
  (the layer's own error), the engine's ``delta_sqnr_db`` (SQNR of the residual branch alone), and the
  *cumulative* SQNR/cosine against a float chain run alongside (the error accumulated up to this layer).
* **outlier statistics** of each linear's input, before and after the recipe's smoothing / shift
  (``x~ = (x - shift) / scale`` per input channel, the engine's effective transform). Per channel c:
  ``absmax_c`` = max|x_c|, ``std_c``, ``peak_over_std`` = absmax_c / std_c (the channel's own max|x| over its std:
  spiky or offset channels), and the **outlier score** ``absmax_c / median_j std_j`` (max|x| over the typical
  channel's std: what a per-tensor activation range has to cover, in units of an ordinary channel's spread).
  Per linear: ``range_ratio`` = max_c absmax_c / median_c absmax_c and the worst channels by outlier score.
* **box plots** (PNG) of the input channels of the worst linears (distinct inputs), before and after smoothing.

Sensitivity and the loss estimate
---------------------------------
A *slot* is one linear, except that the routed experts of a layer count as one slot per projection (their outputs
are summed into one MoE output): ``model.layers.2.mlp.experts.*.down_proj`` pools noise and signal over the
experts. The slot's **noise-to-signal ratio** is ``NSR = sum (y_quant - y_float)^2 / sum y_float^2`` over the
calibration tokens (= 10^(-SQNR/10)). The **estimated loss** of a recipe is

    L = sum over slots of NSR                    (dimensionless; also shown as 10 log10(1 / L) dB)

i.e. the noise powers of all linears relative to their signals, added as if independent. The ranking sorts slots
by NSR (lowest SQNR first).

A *unit* is what a recipe can move on its own: the linears serving fuses (``recipe.FUSED_LINEARS``: q_a_proj with
kv_a_proj_with_mqa, gate_proj with up_proj, all routed experts of a layer together), every other linear alone. A
second engine pass on the same inputs measures every candidate unit (quantized less safely than ``safer``) in the
safer scheme; a unit's **gain** is its NSR now minus its NSR in the safer scheme.

``propose``: starting from the recipe, move the unit with the largest positive gain to the safer scheme, one unit
per step, until ``L <= budget``. The **budget** is in the unit of L (e.g. ``0.02``), or a percentage of the
recipe's own L (``"50%"``). Safety order: w8a8-static < w8a8-dynamic < w8a16 < float; a unit already at least as
safe is not a candidate, and a unit whose measured gain is not positive is never moved (per-token dynamic
activations are *not* always better than smoothed static ones). The proposal is the recipe with one rule per moved
unit kind prepended (the first match wins, so the specific rules come first); rules of the recipe that then take
no linear are dropped. ``verify`` re-analyses the proposal and reports its measured L.

Outputs in ``out``: ``analysis.json`` (everything above), ``analysis.md`` (readable), ``boxplot-*.png``,
``channel-stats.npz`` (per input channel of every linear but the routed experts: ``<linear>/absmax``, ``/std``,
``/mean`` of the float-pass input and, for a smoothed/shifted linear, its ``/scale`` and ``/shift``) and, with
``propose``, ``proposed-recipe.yaml`` (accepted by ``goldstick quantize``). ``analysis.md`` and the box plots
are drawn by ``analyze_report``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from goldstick.engine.calibration import DEFAULT_CALIBRATION, load_calibration
from goldstick.engine.inputs import prepare_batches
from goldstick.engine.layer import LayerQuantizer
from goldstick.errors import GoldstickError
from goldstick.evaluation.analyze_report import render_md, write_boxplots
from goldstick.io.checkpoint import CheckpointReader
from goldstick.model.architecture import fused_groups, smoothing_groups
from goldstick.model.runtime import setup_mindspore
from goldstick.model.tokenizer import load_tokenizer
from goldstick.quant.numerics import bf16_round, sqnr_from_sums, sum_squares
from goldstick.quant.recipe import Recipe, Rule, Scheme, load_recipe
from goldstick.testing.make_model import default_model_path

SCHEMA = "goldstick.analyze/1"
SAFER = {"dynamic": "w8a8-dynamic", "w8a16": "w8a16", "float": "float"}
SAFETY = {"w8a8-static": 0, "w8a8-dynamic": 1, "w8a16": 2, "float": 3}
DEFAULT_BUDGET = "50%"
SAMPLE_TOKENS = 2048     # tokens kept per distinct input for the box-plot quantiles
WORST_CHANNELS = 8       # worst channels listed per linear input
QUANTILES = (0.0, 1.0, 25.0, 50.0, 75.0, 99.0, 100.0)

_ROUTED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)\d+\.(\w+)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
DEFINITIONS = {
    "nsr": "noise-to-signal power ratio of a linear's output, sum (y_quant - y_float)^2 / sum y_float^2 over the "
           "calibration tokens, y_float = the float linear on the same input (= 10^(-SQNR/10))",
    "slot": "one linear; the routed experts of a layer count as one slot per projection (noise and signal pooled)",
    "estimate": "L = sum over slots of NSR (dimensionless); shown also as 10*log10(1/L) dB",
    "budget": "in the unit of L, or a percentage of the analysed recipe's L",
    "unit": "what a recipe moves on its own: fused linears together (q_a+kv_a, gate+up, all routed experts of a "
            "layer), every other linear alone",
    "gain": "a unit's NSR in the recipe minus its NSR in the safer scheme (measured by a second engine pass)",
    "outlier_score": "max|x_c| / median over channels of std_j (in units of an ordinary channel's spread)",
    "peak_over_std": "max|x_c| / std_c (the channel's own max over its std)",
    "range_ratio": "max_c max|x_c| / median_c max|x_c|",
    "after_smoothing": "x~ = (x - shift) / scale with the engine's effective per-channel transform of the linear",
    "layer_sqnr": "quantized decoder layer vs the float layer on the same input (the layer's own error); "
                  "delta_*: the same for the residual branch alone (output minus input)",
    "cumulative_sqnr": "quantized chain vs a float chain from the embeddings (error accumulated up to the layer)",
}


class AnalyzeError(GoldstickError, ValueError):
    pass


# ------------------------------------------------------------------------------------------------ statistics
@dataclass
class ChannelStats:
    """Exact per-channel count/sum/sum of squares/min/max of one linear's input, plus a bounded token sample."""

    count: int = 0
    total: np.ndarray | None = None
    squares: np.ndarray | None = None
    minimum: np.ndarray | None = None
    maximum: np.ndarray | None = None
    sample: list = field(default_factory=list)
    sample_rows: int = 0

    def update(self, x: np.ndarray, keep: int) -> None:
        x64 = x.astype(np.float64)
        if self.total is None:
            c = x.shape[1]
            self.total, self.squares = np.zeros(c), np.zeros(c)
            self.minimum, self.maximum = np.full(c, np.inf), np.full(c, -np.inf)
        self.count += x.shape[0]
        self.total += x64.sum(0)
        self.squares += (x64 * x64).sum(0)
        np.minimum(self.minimum, x64.min(0), out=self.minimum)
        np.maximum(self.maximum, x64.max(0), out=self.maximum)
        if self.sample_rows < keep:
            rows = x[: keep - self.sample_rows].astype(np.float32)
            self.sample.append(rows)
            self.sample_rows += rows.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.squares / max(self.count, 1) - self.mean ** 2, 0.0))

    def quantiles(self) -> np.ndarray | None:
        """[len(QUANTILES), channels] of the token sample, or None without one."""
        if not self.sample:
            return None
        return np.percentile(np.concatenate(self.sample), QUANTILES, axis=0).astype(np.float32)


def outlier_summary(absmax: np.ndarray, std: np.ndarray, mean: np.ndarray, k: int = WORST_CHANNELS) -> dict:
    """Outlier statistics of one input (see the module docstring); ``worst_channels`` sorted by outlier score."""
    typical = float(np.median(std))
    typical = typical if typical > 0 else float(np.mean(std)) or 1.0
    score = absmax / typical
    peak = absmax / np.maximum(std, 1e-12)
    median_absmax = float(np.median(absmax))
    worst = np.argsort(-score, kind="stable")[:k]
    return {
        "channels": int(absmax.size),
        "absmax_max": _r(float(absmax.max())),
        "absmax_median": _r(median_absmax),
        "std_median": _r(typical),
        "range_ratio": _r(float(absmax.max()) / median_absmax if median_absmax > 0 else float("inf")),
        "max_outlier_score": _r(float(score.max())),
        "max_peak_over_std": _r(float(peak.max())),
        "worst_channels": [{"channel": int(c), "absmax": _r(float(absmax[c])), "mean": _r(float(mean[c])),
                            "std": _r(float(std[c])), "peak_over_std": _r(float(peak[c])),
                            "outlier_score": _r(float(score[c]))} for c in worst],
    }


def _r(value: float, digits: int = 4):
    if not np.isfinite(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return 0.0
    return float(f"{value:.{digits}g}") if abs(value) < 1e4 else round(float(value), 1)


def _sqnr_db(signal: float, noise: float):
    """SQNR in dB from ``sum ref^2`` and ``sum (ref - got)^2``, rounded for the report ("inf" without noise)."""
    return _r(sqnr_from_sums(signal, noise))


def _nsr_db(nsr: float):
    return "inf" if nsr <= 0 else _r(-10 * math.log10(nsr))


# ------------------------------------------------------------------------------------------------ units and slots
def slot_of(name: str) -> str:
    """The slot of a linear: itself, or ``model.layers.N.mlp.experts.*.<proj>`` for a routed expert."""
    m = _ROUTED.match(name)
    return f"{m.group(1)}*.{m.group(2)}" if m else name


def layer_units(config, layer: int, names: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(unit name, linears) of one layer: fused groups merged (union of overlapping groups), others alone."""
    present = [n for n in names]
    owner: dict[str, int] = {}
    groups: list[set[str]] = []
    kinds: list[str] = []
    for g in fused_groups(config, layer):
        members = {n for n in g.linears if n in present}
        hit = {owner[n] for n in members if n in owner}
        if hit:
            keep = min(hit)
            for other in sorted(hit - {keep}, reverse=True):
                members |= groups[other]
            groups[keep] |= members
            if g.key == "fused_moe":
                kinds[keep] = "fused_moe"
            for n in groups[keep]:
                owner[n] = keep
            for other in hit - {keep}:
                groups[other] = set()
        else:
            groups.append(set(members))
            kinds.append(g.key)
            for n in members:
                owner[n] = len(groups) - 1
    units = []
    prefix = f"model.layers.{layer}."
    for kind, members in zip(kinds, groups):
        if not members:
            continue
        ordered = tuple(n for n in present if n in members)
        if kind == "fused_moe":
            unit = f"{prefix}mlp.experts.*"
        elif kind == "fused_qkv_a_proj":
            unit = f"{prefix}self_attn.fused_qkv_a_proj"
        else:
            unit = ordered[0].rsplit(".", 1)[0] + f".{kind}"
        units.append((unit, ordered))
    units += [(n, (n,)) for n in present if n not in owner]
    order = {n: i for i, n in enumerate(present)}
    return sorted(units, key=lambda u: order[u[1][0]])


def _unit_pattern(members: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """(parent template relative to the layer, leaves): the shape of a unit's rule, the same across layers."""
    parents, leaves = set(), []
    for n in members:
        rest = _LAYER.match(n).group(2)
        parent, leaf = rest.rsplit(".", 1)
        parents.add(re.sub(r"^mlp\.experts\.\d+$", "mlp.experts.{E}", parent))
        if leaf not in leaves:
            leaves.append(leaf)
    if len(parents) != 1:
        raise AnalyzeError(f"cannot write one rule for the unit {members}")
    return parents.pop(), tuple(leaves)


def _rule_regex(layers: list[int], parent: str, leaves: tuple[str, ...]) -> str:
    layer = str(layers[0]) if len(layers) == 1 else "(" + "|".join(str(x) for x in sorted(layers)) + ")"
    parent_rx = re.escape(parent).replace(re.escape("{E}"), r"\d+")
    leaf = leaves[0] if len(leaves) == 1 else "(" + "|".join(leaves) + ")"
    return rf"model\.layers\.{layer}\.{parent_rx}\.{leaf}"


def recipe_with_moves(recipe: Recipe, config, moves: list[tuple[str, tuple[str, ...], Scheme]], name: str = "",
                      description: str = "", notes: dict[str, str] | None = None) -> Recipe:
    """``recipe`` with the linears of each moved unit in its new scheme: one rule per (unit shape, scheme), placed
    before the recipe's rules in the order of the moves; rules that then take no linear are dropped."""
    notes = notes or {}
    shaped: dict[tuple, list] = {}
    for unit, members, scheme in moves:
        layer = int(_LAYER.match(members[0]).group(1))
        parent, leaves = _unit_pattern(members)
        entry = shaped.setdefault((parent, leaves, scheme), [[], []])
        entry[0].append(layer)
        if notes.get(unit):
            entry[1].append(notes[unit])
    rules = [Rule(_rule_regex(layers, parent, leaves), scheme,
                  "goldstick analyze: " + ("; ".join(texts) if texts else f"moved to {scheme.label}"))
             for (parent, leaves, scheme), (layers, texts) in shaped.items()]
    candidate = dataclasses.replace(recipe, rules=tuple(rules) + recipe.rules, name=name or recipe.name,
                                    description=description or recipe.description, source=None)
    plan = candidate.plan(config, strict=False)
    keep = [r for i, r in enumerate(candidate.rules) if i < len(rules) or plan.rule_takes[i] > 0]
    result = dataclasses.replace(candidate, rules=tuple(keep))
    plan = result.plan(config)  # strict: raises on anything left inconsistent
    wanted = {m: s for _, members, s in moves for m in members}
    wrong = [n for n, s in wanted.items() if plan.scheme_of(n) != result.resolve(s)]
    if wrong:
        raise AnalyzeError(f"the proposed rules do not give {wrong[0]} its new scheme")
    return result


# ------------------------------------------------------------------------------------------------ one engine pass
@dataclass
class LinearResult:
    scheme: str
    chosen_by: str
    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    got: float = 0.0
    tokens: int = 0
    engine_sqnr_db: object = None
    input: dict | None = None
    transform: dict | None = None


@dataclass
class PassResult:
    linears: dict = field(default_factory=dict)    # name -> LinearResult
    layers: list = field(default_factory=list)      # per-layer dicts
    boxes: dict = field(default_factory=dict)       # input key -> quantiles [Q, C]
    transforms: dict = field(default_factory=dict)  # name -> (scale, shift) of non-routed static linears
    input_key: dict = field(default_factory=dict)   # name -> input key (linears reading the same tensor)
    channels: dict = field(default_factory=dict)    # name -> per-channel arrays of a non-routed linear's input


def _input_keys(config, layer: int) -> dict[str, str]:
    keys = {}
    for group in smoothing_groups(config, layer):
        for n in group.linears:
            keys[n] = group.key
    return keys


def _measure_hooks(lq, into: dict) -> list:
    """Forward hooks on the quantized cells: signal, noise, <ref, got>, |got|^2 against the engine's reference."""
    handles = []
    for name, cell in lq.linears.items():
        ref_w, ref_c = lq.reference[name]
        acc = into.setdefault(name, [0.0, 0.0, 0.0, 0.0])

        def hook(cell, inputs, output, ref_w=ref_w, ref_c=ref_c, acc=acc):
            x = inputs[0].asnumpy().reshape(-1, ref_w.shape[1]).astype(np.float64)
            ref = x @ ref_w.T.astype(np.float64)
            if ref_c is not None:
                ref += ref_c
            got = output.asnumpy().reshape(ref.shape).astype(np.float64)
            acc[0] += float(np.sum(ref * ref))
            acc[1] += float(np.sum((ref - got) ** 2))
            acc[2] += float(np.sum(ref * got))
            acc[3] += float(np.sum(got * got))
        handles.append(cell.register_forward_hook(hook))
    return handles


def _cosine(ref: list, got: list) -> float:
    """Cosine similarity of two lists of arrays, taken as one vector each."""
    dot = aa = bb = 0.0
    for r, g in zip(ref, got):
        r, g = r.reshape(-1).astype(np.float64), g.reshape(-1).astype(np.float64)
        dot, aa, bb = dot + float(r @ g), aa + float(r @ r), bb + float(g @ g)
    den = math.sqrt(aa * bb)
    return dot / den if den > 0 else 1.0


def _sqnr(ref: list, got: list) -> object:
    """Rounded SQNR (dB) of two lists of arrays, taken as one vector each."""
    signal = sum(sum_squares(r) for r in ref)
    noise = sum(sum_squares(r.astype(np.float64) - g) for r, g in zip(ref, got))
    return _sqnr_db(signal, noise)


def engine_pass(reader, batches, recipe: Recipe, safe_recipe: Recipe | None = None, inputs: bool = True,
                sample_tokens: int = SAMPLE_TOKENS, progress: bool = False, desc: str = "analyze"):
    """Run the engine layer by layer with ``recipe`` (and, on the same inputs, ``safe_recipe``).

    Returns (PassResult of the recipe, PassResult of the safe recipe or None).
    """
    cfg = reader.config
    plan = recipe.plan(cfg)
    safe_plan = safe_recipe.plan(cfg) if safe_recipe is not None else None
    main, safe = PassResult(), (PassResult() if safe_recipe is not None else None)
    embed = bf16_round(reader.read("model.embed_tokens.weight"))
    hidden = [embed[ids] for ids, *_ in batches]
    float_hidden = list(hidden)
    del embed
    layers = range(cfg.num_hidden_layers)
    if progress:
        layers = tqdm(layers, desc=desc, unit="layer")
    for i in layers:
        tensors = reader.read_layer(i)
        lq = LayerQuantizer(cfg, i, tensors, plan, recipe, batches, hidden)
        keys = _input_keys(cfg, i)
        stats: dict[str, ChannelStats] = {}
        handles = []
        if inputs:
            sampled: dict[str, str] = {}
            for name, cell in lq.linears.items():
                key = keys.get(name, name)
                main.input_key[name] = key
                routed = _ROUTED.match(name) is not None
                keep = 0
                if not routed and sampled.setdefault(key, name) == name:
                    keep = sample_tokens
                st = stats.setdefault(name, ChannelStats())

                def pre_hook(cell, args, st=st, keep=keep):
                    st.update(args[0].asnumpy().reshape(-1, cell.in_features), keep)
                handles.append(cell.register_forward_pre_hook(pre_hook))
        try:
            float_out = lq.observe(recipe.options.moe_calibrate_all_experts)
        finally:
            for h in handles:
                h.remove()
        if recipe.options.inputs_from == "quantized":
            float_chain = lq.run(float_hidden)
        else:
            float_chain = float_out
        lq.quantize(float_out)
        sums: dict[str, list] = {}
        handles = _measure_hooks(lq, sums)
        try:
            quant_out = lq.measure(float_out)
        finally:
            for h in handles:
                h.remove()
        worst = None
        for name, entry in lq.entries.items():
            if name not in lq.linears:
                continue
            s = sums.get(name, [0.0] * 4)
            info = lq.report["linears"].get(name, {})
            res = LinearResult(entry.scheme.label, entry.chosen_by, *s, tokens=int(info.get("tokens", 0)),
                               engine_sqnr_db=info.get("sqnr_db"))
            if inputs and name in stats and stats[name].count:
                st = stats[name]
                absmax = np.maximum(np.abs(st.minimum), np.abs(st.maximum))
                res.input = outlier_summary(absmax, st.std, st.mean)
                routed = _ROUTED.match(name) is not None
                if not routed:
                    main.channels[name] = {"absmax": absmax, "std": st.std, "mean": st.mean}
                t = lq.transforms.get(name)
                if t is not None and (np.any(t.scale != 1) or np.any(t.shift != 0)):
                    lo = (st.minimum - t.shift) / t.scale
                    hi = (st.maximum - t.shift) / t.scale
                    res.input["after"] = outlier_summary(np.maximum(np.abs(lo), np.abs(hi)), st.std / t.scale,
                                                         (st.mean - t.shift) / t.scale)
                    res.transform = {"folded_into": t.folded_into, "scale_max": _r(float(t.scale.max())),
                                     "scale_min": _r(float(t.scale.min())),
                                     "shift_absmax": _r(float(np.abs(t.shift).max()))}
                    if not routed:
                        main.transforms[name] = (t.scale.astype(np.float32), t.shift.astype(np.float32))
                        main.channels[name].update({"scale": t.scale, "shift": t.shift})
                if st.sample:
                    main.boxes[main.input_key[name]] = st.quantiles()
            main.linears[name] = res
            if s[0] > 0 and (worst is None or s[1] / s[0] > worst[0]):
                worst = (s[1] / s[0], name)
        main.layers.append({
            "layer": i,
            "sqnr_db": _sqnr(float_out, quant_out),
            "cosine": _r(_cosine(float_out, quant_out), 7),
            "delta_sqnr_db": lq.report.get("delta_sqnr_db"),
            "delta_cosine": _r(_cosine([f - h for f, h in zip(float_out, hidden)],
                                       [q - h for q, h in zip(quant_out, hidden)]), 7),
            "cumulative_sqnr_db": _sqnr(float_chain, quant_out),
            "cumulative_cosine": _r(_cosine(float_chain, quant_out), 7),
            "worst_linear": worst[1] if worst else None,
            "worst_linear_sqnr_db": _nsr_db(worst[0]) if worst else None,
        })
        if safe is not None:
            lqs = LayerQuantizer(cfg, i, tensors, safe_plan, safe_recipe, batches, hidden)
            safe_float = lqs.observe(safe_recipe.options.moe_calibrate_all_experts)
            lqs.quantize(safe_float)
            sums_s: dict[str, list] = {}
            handles = _measure_hooks(lqs, sums_s)
            try:
                lqs.measure(safe_float)
            finally:
                for h in handles:
                    h.remove()
            for name, entry in lqs.entries.items():
                if name in lqs.linears:
                    safe.linears[name] = LinearResult(entry.scheme.label, entry.chosen_by,
                                                      *sums_s.get(name, [0.0] * 4))
            del lqs, safe_float
        hidden = quant_out if recipe.options.inputs_from == "quantized" else float_out
        float_hidden = float_chain
        del lq, tensors, float_out, stats
        gc.collect()
    return main, safe


# ------------------------------------------------------------------------------------------------ aggregation
def slot_table(linears: dict) -> dict[str, dict]:
    """slot -> pooled signal/noise/dot/got, scheme(s), members."""
    slots: dict[str, dict] = {}
    for name, r in linears.items():
        s = slots.setdefault(slot_of(name), {"signal": 0.0, "noise": 0.0, "dot": 0.0, "got": 0.0,
                                             "schemes": set(), "members": 0})
        s["signal"] += r.signal
        s["noise"] += r.noise
        s["dot"] += r.dot
        s["got"] += r.got
        s["schemes"].add(r.scheme)
        s["members"] += 1
    for s in slots.values():
        s["nsr"] = s["noise"] / s["signal"] if s["signal"] > 0 else 0.0
        den = math.sqrt(s["signal"] * s["got"])
        s["cosine"] = s["dot"] / den if den > 0 else 1.0
    return slots


def estimate(linears: dict) -> float:
    """L = sum over slots of NSR."""
    return float(sum(s["nsr"] for s in slot_table(linears).values()))


def parse_budget(budget: str | float, start: float) -> float:
    """An absolute budget in the unit of L, or ``"P%"`` of the recipe's own estimate ``start``."""
    text = str(budget).strip()
    try:
        value = float(text[:-1]) * start / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise AnalyzeError(f"--budget {budget!r}: expected a number (sum of NSR) or a percentage like 50%") from None
    if not value >= 0:
        raise AnalyzeError(f"--budget {budget!r} must not be negative")
    return value


def safer_scheme(safer: str) -> Scheme:
    if safer not in SAFER:
        raise AnalyzeError(f"--safer {safer!r}: choose from {', '.join(SAFER)}")
    return Scheme(SAFER[safer])


def candidate_units(config, plan, safer: Scheme) -> list[tuple[str, tuple[str, ...], str]]:
    """(unit, members, current scheme label) of every unit the engine quantizes less safely than ``safer``."""
    out = []
    for layer in range(config.num_hidden_layers):
        names = [e.name for e in plan.for_layer(layer)]
        for unit, members in layer_units(config, layer, names):
            schemes = {plan.scheme_of(m) for m in members}
            if len(schemes) != 1 or members[0].endswith(".mlp.gate"):
                continue  # a split fused group is refused by the plan; the router is never a quantized cell
            scheme = schemes.pop()
            if SAFETY[scheme.name] >= SAFETY[safer.name]:
                continue
            out.append((unit, members, scheme.label))
    return out


# ------------------------------------------------------------------------------------------------ the analysis
@dataclass
class AnalysisResult:
    out: Path
    report: dict
    proposal: Recipe | None = None
    proposal_path: Path | None = None


def analyze(model=None, recipe: str | Path | Recipe = "deepseek-r1-w8a8-mixed", out: str | Path | None = None,
            calibration: str | Path | None = None, calib_samples: int | None = None,
            calib_seq_len: int | None = None, calib_seed: int | None = None, propose: bool = False,
            budget: str | float = DEFAULT_BUDGET, safer: str = "dynamic", top: int = 10, plots: int = 4,
            verify: bool = False, progress: bool = False, sample_tokens: int = SAMPLE_TOKENS) -> AnalysisResult:
    """Analyse ``recipe`` on ``model`` (None: the embedded default model); see the module docstring."""
    started = time.time()
    setup_mindspore()
    if model is None:
        model = default_model_path()
    if out is None:
        raise AnalyzeError("analyze needs an output folder (out=...)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    safe_scheme = safer_scheme(safer)
    reader = CheckpointReader(model)
    cfg = reader.config
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    plan = recipe.plan(cfg)
    tok = load_tokenizer(model)
    cal = recipe.calibration
    calib = load_calibration(calibration or cal.data or DEFAULT_CALIBRATION, tok.tokenizer,
                             samples=calib_samples or cal.samples, seq_len=calib_seq_len or cal.seq_len,
                             seed=cal.seed if calib_seed is None else calib_seed, bos_id=tok.bos_id)
    batches = prepare_batches(cfg, calib)

    candidates = candidate_units(cfg, plan, safe_scheme)
    safe_recipe = None
    if candidates:
        safe_recipe = recipe_with_moves(recipe, cfg, [(u, m, safe_scheme) for u, m, _ in candidates],
                                        name=f"{recipe.name or 'recipe'}-all-{safer}")
    main, safe = engine_pass(reader, batches, recipe, safe_recipe, inputs=True, sample_tokens=sample_tokens,
                             progress=progress, desc="analyze")

    slots = slot_table(main.linears)
    safe_slots = slot_table(safe.linears) if safe is not None else {}
    total = float(sum(s["nsr"] for s in slots.values()))
    ranking = sorted(slots, key=lambda k: (-slots[k]["nsr"], k))
    units = []
    for unit, members, label in candidates:
        mine = sorted({slot_of(m) for m in members})
        now = sum(slots[s]["nsr"] for s in mine)
        then = sum(safe_slots[s]["nsr"] for s in mine)
        units.append({"unit": unit, "layer": int(_LAYER.match(members[0]).group(1)), "members": list(members),
                      "scheme": label, "nsr": now, "safer_nsr": then, "gain": now - then})
    units.sort(key=lambda u: (-u["gain"], u["unit"]))

    report = {
        "schema": SCHEMA,
        "model": str(reader.path),
        "recipe": recipe.name or str(recipe.source),
        "calibration": calib.provenance(),
        "safer": safe_scheme.name,
        "definitions": DEFINITIONS,
        "estimate": {"recipe": _r(total, 6), "recipe_db": _nsr_db(total),
                     "all_safer": _r(float(sum(safe_slots.get(s, slots[s])["nsr"] for s in slots)), 6)
                     if safe is not None else _r(total, 6)},
        "layers": main.layers,
        "ranking": [_slot_row(k, slots[k], safe_slots.get(k)) for k in ranking],
        "units": [{**u, "nsr": _r(u["nsr"], 6), "safer_nsr": _r(u["safer_nsr"], 6), "gain": _r(u["gain"], 6)}
                  for u in units],
        "linears": {n: _linear_row(n, r, safe.linears.get(n) if safe else None) for n, r in main.linears.items()},
        "proposal": None,
        "plots": [],
    }
    if report["estimate"]["all_safer"] is not None and safe is not None:
        report["estimate"]["all_safer_db"] = _nsr_db(float(report["estimate"]["all_safer"]))

    proposal = proposal_path = None
    if propose:
        limit = parse_budget(budget, total)
        current, steps, moves = total, [], []
        for u in units:
            if current <= limit:
                break
            if u["gain"] <= 0:
                break
            current -= u["gain"]
            moves.append(u)
            steps.append({"step": len(steps) + 1, "unit": u["unit"], "from": u["scheme"], "to": safe_scheme.label,
                          "gain": _r(u["gain"], 6), "estimate_after": _r(current, 6)})
        report["proposal"] = {
            "budget": str(budget), "budget_value": _r(limit, 6), "start": _r(total, 6),
            "estimate": _r(current, 6), "estimate_db": _nsr_db(current), "fits": bool(current <= limit),
            "steps": steps, "recipe_file": None, "recipe_yaml": None,
        }
        if not moves:
            # nothing to write: a copy of the input recipe is not a proposal
            report["proposal"]["note"] = (
                f"the recipe already meets the budget ({_r(total, 4)} <= {_r(limit, 4)}): no change proposed"
                if total <= limit else
                f"every unit is already at least as safe as {safe_scheme.label}: no recipe proposed; try --safer "
                "w8a16 or float" if not units else
                f"no unit gains from moving to {safe_scheme.label} (no positive gain), so the budget "
                f"{_r(limit, 4)} cannot be approached this way: no recipe proposed; try --safer w8a16 or float")
        else:
            name = f"{recipe.name or 'recipe'}-proposed"
            description = (f"goldstick analyze: {recipe.name or 'recipe'} with its {len(moves)} most sensitive "
                           f"unit(s) moved to {safe_scheme.label}; estimated loss {_r(total, 4)} -> "
                           f"{_r(current, 4)} (budget {_r(limit, 4)}, sum of output NSR over linears)")
            notes = {u["unit"]: f"{u['unit']} NSR {_r(u['nsr'], 3)} -> {_r(u['safer_nsr'], 3)}" for u in moves}
            proposal = recipe_with_moves(recipe, cfg, [(u["unit"], tuple(u["members"]), safe_scheme) for u in moves],
                                         name=name, description=description, notes=notes)
            proposal_path = out / "proposed-recipe.yaml"
            proposal_path.write_text(proposal.to_yaml(), encoding="utf-8")
            report["proposal"].update(recipe_file=proposal_path.name, recipe_yaml=proposal.to_yaml())
            if not report["proposal"]["fits"]:
                report["proposal"]["note"] = ("the budget is not reached: every unit with a positive gain was "
                                              "moved; try a safer scheme (--safer w8a16 or float) or a larger "
                                              "budget")
        if verify and proposal is not None:
            checked, _ = engine_pass(reader, batches, proposal, None, inputs=False, progress=progress,
                                     desc="verify")
            measured = estimate(checked.linears)
            report["proposal"]["measured_estimate"] = _r(measured, 6)
            report["proposal"]["measured_estimate_db"] = _nsr_db(measured)

    report["plots"] = write_boxplots(report, main, out, plots)
    np.savez(out / "channel-stats.npz", **{f"{name}/{key}": np.asarray(v, np.float32)
                                           for name, arrays in main.channels.items() for key, v in arrays.items()})
    report["seconds"] = round(time.time() - started, 1)
    (out / "analysis.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "analysis.md").write_text(render_md(report, top), encoding="utf-8")
    return AnalysisResult(out=out, report=report, proposal=proposal, proposal_path=proposal_path)


def _slot_row(slot: str, s: dict, safe: dict | None) -> dict:
    row = {"slot": slot, "scheme": "/".join(sorted(s["schemes"])), "members": s["members"],
           "nsr": _r(s["nsr"], 6), "sqnr_db": _nsr_db(s["nsr"]), "cosine": _r(s["cosine"], 7)}
    if safe is not None and safe["schemes"] != s["schemes"]:
        row["safer_sqnr_db"] = _nsr_db(safe["nsr"])
    return row


def _linear_row(name: str, r: LinearResult, safe: LinearResult | None) -> dict:
    nsr = r.noise / r.signal if r.signal > 0 else 0.0
    den = math.sqrt(r.signal * r.got)
    row = {"scheme": r.scheme, "chosen_by": r.chosen_by, "sqnr_db": _sqnr_db(r.signal, r.noise),
           "engine_sqnr_db": r.engine_sqnr_db, "cosine": _r(r.dot / den if den > 0 else 1.0, 7),
           "nsr": _r(nsr, 6), "tokens": r.tokens}
    if safe is not None and safe.scheme != r.scheme:
        row["safer"] = {"scheme": safe.scheme, "sqnr_db": _sqnr_db(safe.signal, safe.noise)}
    if r.transform:
        row["transform"] = r.transform
    if r.input:
        row["input"] = r.input
    return row


# ------------------------------------------------------------------------------------------------ CLI
def add_analyze_parser(sub) -> None:
    p = sub.add_parser("analyze", help="per-layer quantization-loss analysis of a recipe; --propose a mixed recipe",
                       description="Per linear and per decoder layer: output SQNR and cosine of quantized vs float "
                                   "on calibration data, input outlier statistics before/after smoothing, box "
                                   "plots, a sensitivity ranking, and (--propose) a mixed recipe that fits a loss "
                                   "budget. Writes analysis.json, analysis.md and PNGs to --out.")
    p.add_argument("--model", help="HF checkpoint folder (default: the embedded tiny model)")
    p.add_argument("--recipe", required=True, help="recipe name (see `goldstick recipes`) or YAML path")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--calib", help="calibration data: .jsonl, datasets folder/file or hub name")
    p.add_argument("--calib-samples", type=int, help="number of calibration sequences")
    p.add_argument("--calib-seq-len", type=int, help="tokens per calibration sequence")
    p.add_argument("--propose", action="store_true", help="write proposed-recipe.yaml that fits --budget")
    p.add_argument("--budget", default=DEFAULT_BUDGET,
                   help="allowed estimated loss: sum over linears of output noise/signal power (e.g. 0.02), or a "
                        "percentage of the recipe's own estimate (e.g. 50%%); "
                        f"default {DEFAULT_BUDGET.replace('%', '%%')}")
    p.add_argument("--safer", choices=tuple(SAFER), default="dynamic",
                   help="the scheme sensitive linears move to (default dynamic = w8a8-dynamic)")
    p.add_argument("--verify", action="store_true", help="re-analyse the proposal and report its measured estimate")
    p.add_argument("--top", type=int, default=10, help="rows of the ranking in the report (default 10)")
    p.add_argument("--plots", type=int, default=4, help="box plots of the N worst distinct inputs (default 4)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_analyze)


def run_analyze(args) -> int:
    model = args.model
    if not model:
        model = default_model_path()
        print(f"model: the embedded default ({model})")
    result = analyze(model, args.recipe, out=args.out, calibration=args.calib, calib_samples=args.calib_samples,
                     calib_seq_len=args.calib_seq_len, propose=args.propose, budget=args.budget, safer=args.safer,
                     top=args.top, plots=args.plots, verify=args.verify, progress=not args.no_progress)
    r = result.report
    print(f"estimated loss L = {r['estimate']['recipe']} ({r['estimate']['recipe_db']} dB) "
          f"[sum over linears of output noise/signal power]")
    print("most sensitive linears (lowest SQNR first):")
    for i, row in enumerate(r["ranking"][: args.top], 1):
        print(f"  {i:2d}. {row['slot']:<55} {row['scheme']:<14} SQNR {row['sqnr_db']} dB  cos {row['cosine']}")
    prop = r["proposal"]
    if result.proposal is not None:
        print(f"proposal: {len(prop['steps'])} unit(s) -> {r['safer']}; estimate {prop['start']} -> "
              f"{prop['estimate']} (budget {prop['budget_value']}{'' if prop['fits'] else ', NOT reached'})")
        print(f"--- {result.proposal_path}")
        print(prop["recipe_yaml"], end="")
    elif prop is not None:
        print(f"proposal: none written: {prop['note']}")
    print(f"report: {result.out / 'analysis.md'}  ({result.out / 'analysis.json'})")
    return 0

