"""Golden-Stick policies → goldstick recipes, for users who already have a ``PTQConfig`` + ``layer_policies``.

    recipe, notes = from_golden_stick("my_gs_policy.yaml")      # or a dict, or YAML text
    for note in notes: print(note)                              # everything that did not translate exactly

A policy is the ``PTQConfig`` fields at top level (enum values as strings: ``"int8"``, ``"PER_TOKEN"``,
``"OUTLIER_SUPPRESSION_PLUS"``; ``OutliersSuppressionType.SMOOTH`` or enum objects work too) plus
``layer_policies``, an ordered ``{regex: {PTQConfig fields}}`` map::

    weight_quant_dtype: int8
    act_quant_dtype: int8
    outliers_suppression: OUTLIER_SUPPRESSION_PLUS
    act_quant_granularity: PER_TENSOR
    opname_blacklist: [lkv2kv, lm_head]
    layer_policies:
      '.*\\.feed_forward\\..*': {weight_quant_dtype: int8, act_quant_dtype: int8, act_quant_granularity: PER_TOKEN}

Golden-Stick semantics are reproduced exactly, on the cell names of the MindFormers network it quantizes
(``model.layers.3.feed_forward.routed_experts.ffn.w1``; the mcore names ``decoder.layers.3.mlp.experts.linear_fc1``
are understood too), and not guessed from the regex text:
  * a layer policy is chosen with ``re.match`` (a prefix match) on the cell name; GS raises when two match the same
    cell, goldstick keeps the first and says so in the notes;
  * each field a layer policy does not set takes its ``PTQConfig`` default (it does not inherit the network config);
  * ``opname_blacklist`` is a substring test (``"wq" in cell_name``) of the chosen policy's own blacklist;
  * the MoE router is never quantized (GS does not wrap it).
The GS outcome is computed per linear of a DeepSeek model (default: R1) and written back as HF-name regexes
(re.fullmatch, first match wins); the translated recipe is checked to plan exactly that outcome. Features that
goldstick does not have (KV-cache int8, GPTQ/AWQ, OSL weight clipping, W4, per-group scales) are reported in the
notes with what is done instead; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from goldstick.model.architecture import split_layer
from goldstick.model.config import ModelConfig
from goldstick.quant.recipe import LocatedReader, Recipe, compose_yaml
from goldstick.quant.recipe_parts import Options, RecipeError, Rule, Scheme, describe, did_you_mean

# ---- GS vocabulary -------------------------------------------------------------------------------------------------

GRANULARITIES = ("PER_TENSOR", "PER_CHANNEL", "PER_TOKEN", "PER_GROUP")
ENUMS: dict[str, tuple[str, ...]] = {
    "mode": ("QUANTIZE", "DEPLOY"),
    "backend": ("ASCEND",),
    "outliers_suppression": ("NONE", "SMOOTH", "OUTLIER_SUPPRESSION_PLUS", "OUTLIER_SUPPRESSION_LITE", "AWQ"),
    "precision_recovery": ("NONE", "GPTQ"),
    "weight_quant_granularity": GRANULARITIES,
    "act_quant_granularity": GRANULARITIES,
    "kvcache_quant_granularity": GRANULARITIES,
}
DTYPE_FIELDS = ("weight_quant_dtype", "act_quant_dtype", "kvcache_quant_dtype")
DTYPES = ("int8", "qint4x2")


@dataclass(frozen=True)
class GSConfig:
    """One Golden-Stick ``PTQConfig``, normalized (defaults are GS's)."""

    mode: str = "QUANTIZE"
    backend: str = "ASCEND"
    opname_blacklist: tuple[str, ...] = ()
    algo_args: tuple[tuple[str, Any], ...] = ()
    weight_quant_dtype: str | None = "int8"
    act_quant_dtype: str | None = None
    kvcache_quant_dtype: str | None = None
    precision_recovery: str = "NONE"
    outliers_suppression: str = "NONE"
    weight_quant_granularity: str = "PER_CHANNEL"
    kvcache_quant_granularity: str = "PER_CHANNEL"
    act_quant_granularity: str = "PER_TENSOR"
    group_size: int = 0
    weight_clip: bool = False

    @property
    def quantizes(self) -> bool:
        """GS's Quantizer only wraps a cell whose policy quantizes something."""
        return any(getattr(self, f) is not None for f in DTYPE_FIELDS)


PTQ_FIELDS = tuple(f.name for f in dataclasses.fields(GSConfig))

# InnerPTQConfig knobs GS users set through ``ptq._config`` / ``set_ptq_config``: accepted at top level.
INNER_KNOBS: dict[str, str] = {
    "always_use_fp_input_in_processer": "→ options.inputs_from: float",
    "act_symmetric": "static activations are asymmetric in goldstick; symmetric ones have no equivalent",
    "weight_symmetric": "weights are symmetric in goldstick; asymmetric ones have no equivalent",
    "use_inner_osp": "goldstick's osplus is the shift + scale variant (GS's inner OSP); the flag has no effect",
    "algorithm_cache_path": "no algorithm cache: the flag has no effect",
    "skip_offload_in_processing": "goldstick works one layer at a time on its own: the flag has no effect",
    "reflash_inputs_after_each_processor": "no effect (see options.inputs_from)",
    "dump_path": "no GS-style dumper: the flag has no effect",
    "fallback_blacklist": "no fallback mechanism: the flag has no effect",
    "aclnn_quant_list": "kernel selection belongs to the serving stack: the flag has no effect",
    "experimental": "no effect",
    "fake_quant": "no effect",
}

# HF linear kind (name inside model.layers.N, "{e}" = expert index) → the GS cell names that implement it.
# Several names: the unfused cell and the fused one (qkv2l, w_gate_hidden, linear_fc1), or kv_b's runtime split.
RESEARCH_CELL_NAMES: dict[str, tuple[str, ...]] = {
    "self_attn.q_a_proj": ("attention.q2l_proj", "attention.qkv2l"),
    "self_attn.q_b_proj": ("attention.l2q_proj",),
    "self_attn.q_proj": ("attention.q_proj",),
    "self_attn.kv_a_proj_with_mqa": ("attention.kv2l", "attention.qkv2l"),
    "self_attn.kv_b_proj": ("attention.lkv2kv", "attention.lkv2kv_k_nope", "attention.lkv2kv_v"),
    "self_attn.o_proj": ("attention.wo",),
    "mlp.gate_proj": ("feed_forward.w1", "feed_forward.w_gate_hidden"),
    "mlp.up_proj": ("feed_forward.w3", "feed_forward.w_gate_hidden"),
    "mlp.down_proj": ("feed_forward.w2",),
    "mlp.gate": ("feed_forward.routed_experts.router.dense",),
    "mlp.experts.{e}.gate_proj": ("feed_forward.routed_experts.ffn.w1",
                                  "feed_forward.routed_experts.ffn.w_gate_hidden"),
    "mlp.experts.{e}.up_proj": ("feed_forward.routed_experts.ffn.w3",
                                "feed_forward.routed_experts.ffn.w_gate_hidden"),
    "mlp.experts.{e}.down_proj": ("feed_forward.routed_experts.ffn.w2",),
    "mlp.shared_experts.gate_proj": ("feed_forward.shared_experts.w1", "feed_forward.shared_experts.w_gate_hidden"),
    "mlp.shared_experts.up_proj": ("feed_forward.shared_experts.w3", "feed_forward.shared_experts.w_gate_hidden"),
    "mlp.shared_experts.down_proj": ("feed_forward.shared_experts.w2",),
    "lm_head": ("lm_head",),
}
MCORE_CELL_NAMES: dict[str, tuple[str, ...]] = {
    "self_attn.q_a_proj": ("self_attention.linear_q_down_proj", "self_attention.linear_qkv_down_proj"),
    "self_attn.q_b_proj": ("self_attention.linear_q_up_proj",),
    "self_attn.q_proj": ("self_attention.linear_q_proj",),
    "self_attn.kv_a_proj_with_mqa": ("self_attention.linear_kv_down_proj", "self_attention.linear_qkv_down_proj"),
    "self_attn.kv_b_proj": ("self_attention.linear_kv_up_proj",),
    "self_attn.o_proj": ("self_attention.linear_proj",),
    "mlp.gate_proj": ("mlp.linear_fc1",),
    "mlp.up_proj": ("mlp.linear_fc1",),
    "mlp.down_proj": ("mlp.linear_fc2",),
    "mlp.gate": ("mlp.router",),
    "mlp.experts.{e}.gate_proj": ("mlp.experts.linear_fc1",),
    "mlp.experts.{e}.up_proj": ("mlp.experts.linear_fc1",),
    "mlp.experts.{e}.down_proj": ("mlp.experts.linear_fc2",),
    "mlp.shared_experts.gate_proj": ("mlp.shared_experts.linear_fc1",),
    "mlp.shared_experts.up_proj": ("mlp.shared_experts.linear_fc1",),
    "mlp.shared_experts.down_proj": ("mlp.shared_experts.linear_fc2",),
    "lm_head": ("output_layer",),
}
NAMINGS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "research": ("model.layers.{L}.", RESEARCH_CELL_NAMES),   # MindFormers research/deepseek3 (GS <= 1.2 examples)
    "mcore": ("decoder.layers.{L}.", MCORE_CELL_NAMES),       # MindFormers parallel_core (GS 1.3+)
}


def linear_kind(hf_name: str) -> tuple[int | None, str]:
    """``model.layers.3.mlp.experts.17.up_proj`` → ``(3, "mlp.experts.{e}.up_proj")``; ``lm_head`` → (None, ...)."""
    layer, inside = split_layer(hf_name)
    if layer is None:
        return None, hf_name
    return layer, re.sub(r"^mlp\.experts\.\d+\.", "mlp.experts.{e}.", inside)


def gs_cell_names(hf_name: str, naming: str = "research") -> tuple[str, ...]:
    """The Golden-Stick cell names of one HF linear (several when GS may fuse or split it)."""
    prefix, table = NAMINGS[naming]
    layer, kind = linear_kind(hf_name)
    if kind not in table:
        raise KeyError(f"{hf_name!r} is not a DeepSeek-V3 linear known to the Golden-Stick name map")
    return tuple((prefix.format(L=layer) if layer is not None else "") + n for n in table[kind])


# ---- reading a policy ----------------------------------------------------------------------------------------------

def _enum_name(value: Any) -> Any:
    """OutliersSuppressionType.SMOOTH / "OutliersSuppressionType.SMOOTH" / "smooth" → "SMOOTH"."""
    if value is None:
        return "NONE"
    if not isinstance(value, str) and hasattr(value, "name"):
        value = value.name
    return value.rsplit(".", 1)[-1].upper() if isinstance(value, str) else value


def _dtype_name(value: Any) -> Any:
    """msdtype.int8 / "Int8" / "mstype.int8" / "int4" → "int8" / "qint4x2"; None / "none" → None."""
    if value is None:
        return None
    if not isinstance(value, (str, bool, int, float)):
        value = str(value)  # a MindSpore dtype prints as "Int8"
    if not isinstance(value, str):
        return value
    name = value.rsplit(".", 1)[-1].lower()
    return {"none": None, "null": None, "int4": "qint4x2"}.get(name, name)


def _as_mapping(obj: Any, names: tuple[str, ...]) -> Any:
    """A dict as is; a PTQConfig-like object (GS's own, or any with these attributes) as a dict of them."""
    if isinstance(obj, dict) or obj is None or isinstance(obj, (str, list, int, float, bool)):
        return obj
    return {n: getattr(obj, n) for n in names if hasattr(obj, n)}


class _PolicyReader:
    def __init__(self, source: str, lines: dict):
        self.loc = LocatedReader(source, lines)

    def config(self, raw: Any, path: tuple, top: bool) -> GSConfig | None:
        allowed = PTQ_FIELDS + (("layer_policies",) + tuple(INNER_KNOBS) if top else ())
        raw = self.loc.mapping(_as_mapping(raw, allowed), path, allowed)
        if raw is None:
            return None
        before = len(self.loc.problems)
        values: dict[str, Any] = {}
        for key in PTQ_FIELDS:
            if key not in raw:
                continue
            value, where = raw[key], path + (key,)
            if key in ENUMS:
                name = _enum_name(value)
                if name not in ENUMS[key]:
                    self.loc.add(where, f"bad value {value!r}{did_you_mean(name, ENUMS[key])}; "
                                        f"allowed: {', '.join(ENUMS[key])}")
                values[key] = name
            elif key in DTYPE_FIELDS:
                name = _dtype_name(value)
                if name is not None and name not in DTYPES:
                    self.loc.add(where, f"bad value {value!r}; allowed: int8, qint4x2, null")
                values[key] = name
            elif key == "opname_blacklist":
                if isinstance(value, str):
                    self.loc.add(where, f"expected a list of names, got the string {value!r} (Golden-Stick would "
                                        f"test each of its characters as a substring)")
                elif not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    self.loc.add(where, f"expected a list of names, got {describe(value)}")
                else:
                    values[key] = tuple(value)
            elif key == "algo_args":
                if value is None:
                    value = {}
                elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                    value = dataclasses.asdict(value)   # GPTQQuantConfig, AWQConfig, ...
                elif not isinstance(value, (dict, str, list)) and hasattr(value, "__dict__"):
                    value = dict(vars(value))
                if not isinstance(value, dict):
                    self.loc.add(where, f"expected a mapping, got {describe(value)}")
                else:
                    values[key] = tuple(value.items())
            elif key == "group_size":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    self.loc.add(where, f"expected an integer >= 0, got {describe(value)}")
                values[key] = value
            elif key == "weight_clip":
                if not isinstance(value, bool):
                    self.loc.add(where, f"expected true or false, got {describe(value)}")
                values[key] = value
        return GSConfig(**values) if len(self.loc.problems) == before else None

    def policy(self, raw: Any) -> tuple[GSConfig, list[tuple[str, GSConfig]], dict[str, Any]]:
        raw = _as_mapping(raw, PTQ_FIELDS + ("layer_policies",) + tuple(INNER_KNOBS))
        net = self.config(raw, (), top=True)
        layer_policies: list[tuple[str, GSConfig]] = []
        inner: dict[str, Any] = {}
        if isinstance(raw, dict):
            inner = {k: raw[k] for k in INNER_KNOBS if k in raw}
            lp = raw.get("layer_policies") or {}
            items = list(lp.items()) if isinstance(lp, dict) else lp
            if not isinstance(items, list) or not all(isinstance(i, (list, tuple)) and len(i) == 2 for i in items):
                self.loc.add(("layer_policies",), f"expected an ordered mapping regex → PTQConfig, "
                                                  f"got {describe(lp)}")
                items = []
            for regex, sub in items:
                where = ("layer_policies", regex)
                if not isinstance(regex, str):
                    self.loc.add(where, f"a policy key must be a regex string, got {describe(regex)}")
                    continue
                try:
                    re.compile(regex)
                except re.error as exc:
                    self.loc.add(where, f"invalid regex {regex!r}: {exc}")
                    continue
                cfg = self.config(sub, where, top=False)
                if cfg is not None:
                    layer_policies.append((regex, cfg))
        if self.loc.problems:
            raise self.loc.error()
        return net, layer_policies, inner


def _is_file(text: str) -> bool:
    try:
        return "\n" not in text and Path(text).is_file()
    except OSError:  # e.g. a long YAML string is not a valid file name
        return False


def _read(policy: Any) -> tuple[str, Any, dict]:
    """(source, raw data, line map) from a dict, an object, a YAML file path or YAML text."""
    if isinstance(policy, Path) or (isinstance(policy, str) and _is_file(policy)):
        path = Path(policy)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RecipeError(f"{path}: cannot read policy ({exc.strerror or exc})") from None
        raw, lines, problems = compose_yaml(text, str(path))
        if problems:
            raise RecipeError([p for _, p in problems])
        return str(path), raw, lines
    if isinstance(policy, str):
        raw, lines, problems = compose_yaml(policy, "<golden-stick policy>")
        if problems:
            raise RecipeError([p for _, p in problems])
        return "<golden-stick policy>", raw, lines
    return "<golden-stick policy>", policy, {}


# ---- translating one PTQConfig -------------------------------------------------------------------------------------

def translate_config(cfg: GSConfig, where: str = "policy") -> tuple[Scheme, list[str]]:
    """The goldstick scheme closest to one GS PTQConfig, and a note for everything that is not exact."""
    notes: list[str] = []
    if cfg.kvcache_quant_dtype is not None:
        notes.append(f"{where}: kvcache_quant_dtype={cfg.kvcache_quant_dtype} (KV-cache quantization) has no "
                     f"equivalent: the KV cache stays bf16")
    if not cfg.quantizes or (cfg.weight_quant_dtype is None and cfg.act_quant_dtype is None):
        if cfg.outliers_suppression != "NONE":
            notes.append(f"{where}: outliers_suppression={cfg.outliers_suppression} without weight or activation "
                         f"quantization does nothing here: these linears stay float")
        return Scheme("float"), notes
    if cfg.weight_quant_dtype is None:
        raise RecipeError(f"{where}: act_quant_dtype={cfg.act_quant_dtype} without weight quantization is not "
                          f"supported (Golden-Stick rejects it too)")
    if cfg.act_quant_dtype == "qint4x2":
        raise RecipeError(f"{where}: 4-bit activations are not supported (Golden-Stick rejects them too)")
    if cfg.weight_quant_dtype == "qint4x2":
        eight = "w8a16" if cfg.act_quant_dtype is None else "w8a8"
        notes.append(f"{where}: 4-bit weights (qint4x2) have no equivalent: translated to 8-bit weights ({eight})")
    if cfg.precision_recovery == "GPTQ":
        notes.append(f"{where}: precision_recovery=GPTQ has no equivalent: weights are rounded to nearest")
    if cfg.weight_clip:
        notes.append(f"{where}: weight_clip (OSL/AWQ weight clipping) has no equivalent: weight scales use the "
                     f"plain absmax")
    if cfg.weight_quant_granularity == "PER_GROUP":
        notes.append(f"{where}: per-group weight scales (group_size={cfg.group_size}) have no equivalent: "
                     f"per-channel scales instead")
    elif cfg.weight_quant_granularity == "PER_TENSOR":
        notes.append(f"{where}: per-tensor weight scales are translated to per-channel scales (finer)")
    elif cfg.weight_quant_granularity == "PER_TOKEN":
        raise RecipeError(f"{where}: weight_quant_granularity=PER_TOKEN is meaningless for weights")
    algo_args = dict(cfg.algo_args)
    alpha = algo_args.pop("alpha", None)
    for key in algo_args:
        notes.append(f"{where}: algo_args[{key!r}] has no equivalent: ignored")
    suppression = cfg.outliers_suppression

    if cfg.act_quant_dtype is None:
        if suppression != "NONE":
            kind = "AWQ search" if suppression == "AWQ" else f"outliers_suppression={suppression}"
            notes.append(f"{where}: {kind} has no equivalent for weight-only quantization: weights are rounded "
                         f"to nearest without it")
        if alpha is not None:
            notes.append(f"{where}: algo_args['alpha'] is ignored (no smoothing)")
        return Scheme("w8a16"), notes

    if cfg.act_quant_granularity in ("PER_CHANNEL", "PER_GROUP"):
        raise RecipeError(f"{where}: act_quant_granularity={cfg.act_quant_granularity} is not supported "
                          f"(Golden-Stick rejects per-channel activations too); use PER_TENSOR or PER_TOKEN")
    if cfg.act_quant_granularity == "PER_TOKEN":
        if suppression != "NONE":
            notes.append(f"{where}: outliers_suppression={suppression} with per-token activations has no "
                         f"equivalent: dropped (w8a8-dynamic without smoothing)")
        if alpha is not None and suppression != "SMOOTH":
            notes.append(f"{where}: algo_args['alpha'] is ignored (no smoothing)")
        return Scheme("w8a8-dynamic"), notes

    if suppression == "SMOOTH":
        if alpha is not None and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool)
                                  or not 0 < alpha <= 1):
            raise RecipeError(f"{where}: algo_args['alpha'] must be a number in (0, 1], got {alpha!r}")
        return Scheme("w8a8-static", "smoothquant", alpha), notes
    if alpha is not None:
        notes.append(f"{where}: algo_args['alpha'] is ignored (it is the SmoothQuant strength)")
    if suppression == "OUTLIER_SUPPRESSION_PLUS":
        return Scheme("w8a8-static", "osplus"), notes
    if suppression == "OUTLIER_SUPPRESSION_LITE":
        notes.append(f"{where}: OUTLIER_SUPPRESSION_LITE (OSL) has no exact equivalent: translated to osplus, which "
                     f"also searches the smoothing alpha on the layer-output error (with a channel shift, without "
                     f"OSL's weight clipping)")
        return Scheme("w8a8-static", "osplus"), notes
    if suppression == "AWQ":
        notes.append(f"{where}: AWQ has no equivalent (and is weight-only in Golden-Stick): static W8A8 without "
                     f"outlier suppression")
    return Scheme("w8a8-static"), notes


# ---- GS semantics over the model's linears -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Decision:
    source: tuple          # ("router",) | ("blacklist", entry) | ("policy", index) | ("default",)
    scheme: Scheme


def _pick_naming(names: str, config: ModelConfig, net: GSConfig, policies: list[tuple[str, GSConfig]]) -> str:
    if names != "auto":
        if names not in NAMINGS:
            raise RecipeError(f"names={names!r}: allowed: auto, {', '.join(NAMINGS)}")
        return names
    probes = [("policy", r) for r, _ in policies] + [("black", b) for b in net.opname_blacklist]
    probes += [("black", b) for _, c in policies for b in c.opname_blacklist]
    scores = {}
    for naming in NAMINGS:
        cells = [c for layer, kind in _kinds(config) for c in _cells(naming, kind, layer)]
        scores[naming] = sum(1 for how, p in probes
                             if any((re.match(p, c) if how == "policy" else p in c) for c in cells))
    return "mcore" if scores["mcore"] > scores["research"] else "research"


def _kinds(config: ModelConfig) -> list[tuple[int | None, str]]:
    """(first layer that has it, kind) for every kind of linear of the model."""
    seen: dict[str, tuple[int | None, str]] = {}
    for name in config.linear_names():
        layer, kind = linear_kind(name)
        seen.setdefault(kind, (layer, kind))
    return list(seen.values())


def _cells(naming: str, kind: str, layer: int | None) -> tuple[str, ...]:
    prefix, table = NAMINGS[naming]
    return tuple((prefix.format(L=layer) if layer is not None else "") + n for n in table[kind])


def from_golden_stick(policy: Any, layer_policies: Any = None, *, config: ModelConfig | None = None,
                      names: str = "auto", name: str = "from-golden-stick") -> tuple[Recipe, list[str]]:
    """Translate a Golden-Stick policy (dict, PTQConfig object, YAML path or YAML text) into a Recipe.

    ``layer_policies``: GS's ``PTQ(config, layer_policies)`` second argument, an ordered ``{regex: PTQConfig}``
    (for a ``mindspore_gs.ptq.PTQConfig`` ``policy``, which has no such field; a dict or YAML policy carries them).
    ``config`` is the model the GS semantics are evaluated on (default: DeepSeek-R1); ``names`` is which
    MindFormers cell names the policy's regexes and blacklist were written for: research, mcore or auto.
    Returns the recipe and the notes (every feature without an exact equivalent, and every GS surprise).
    """
    source, raw, lines = _read(policy)
    if layer_policies is not None:
        raw = dict(_as_mapping(raw, PTQ_FIELDS + tuple(INNER_KNOBS)) or {})
        if "layer_policies" in raw:
            raise RecipeError(f"{source}: layer_policies given twice (in the policy and as an argument)")
        raw["layer_policies"] = layer_policies
    net, policies, inner = _PolicyReader(source, lines).policy(raw)
    config = config or ModelConfig()
    naming = _pick_naming(names, config, net, policies)
    notes: list[str] = []

    net_scheme, net_notes = translate_config(net, "policy")
    notes += net_notes
    schemes = []
    for regex, cfg in policies:
        scheme, sub_notes = translate_config(cfg, f"layer_policies['{regex}']")
        schemes.append(scheme)
        notes += sub_notes
        if cfg.mode != "QUANTIZE" or cfg.backend != "ASCEND":
            notes.append(f"layer_policies['{regex}']: mode/backend are taken from the network config in "
                         f"Golden-Stick; ignored here")
    if net.mode == "DEPLOY":
        notes.append("policy: mode=DEPLOY only builds a network for loading in Golden-Stick; goldstick always "
                     "quantizes (ignored)")

    options = {}
    for knob, value in inner.items():
        if knob == "always_use_fp_input_in_processer":
            if not isinstance(value, bool):
                raise RecipeError(f"{source}: always_use_fp_input_in_processer: expected true or false, "
                                  f"got {describe(value)}")
            options["inputs_from"] = "float" if value else "quantized"
        else:
            notes.append(f"policy: {knob}={value!r}: {INNER_KNOBS[knob]}")

    # GS semantics, decided once per (kind, layer): every routed expert of a layer shares one GS cell
    decisions: dict[tuple[int | None, str], _Decision] = {}
    used_policy, matched_policy, used_black = set(), set(), set()
    surprises: dict[tuple, list] = {}   # (kind of surprise, detail) -> [count, example cell]

    def surprise(key: tuple, cell: str) -> None:
        surprises.setdefault(key, [0, cell])[0] += 1

    for hf in config.linear_names():
        layer, kind = linear_kind(hf)
        if (layer, kind) in decisions:
            continue
        cells = _cells(naming, kind, layer)
        if kind == "mlp.gate":
            decisions[(layer, kind)] = _Decision(("router",), Scheme("float"))
            continue
        hits = [i for i, (regex, _) in enumerate(policies) if any(re.match(regex, c) for c in cells)]
        if len(hits) > 1:
            surprise(("overlap", tuple(hits)), cells[0])
        matched_policy.update(hits)
        chosen = hits[0] if hits else None
        cfg = policies[chosen][1] if chosen is not None else net
        if chosen is not None:
            used_policy.add(chosen)
            lost = [b for b in net.opname_blacklist if b not in cfg.opname_blacklist and any(b in c for c in cells)]
            if lost:
                surprise(("lost", lost[0], chosen), cells[0])
        black = next((b for b in cfg.opname_blacklist if any(b in c for c in cells)), None)
        if black is not None:
            used_black.add(black)
            if not any(black in c.split(".") for c in cells):
                surprise(("substring", black), cells[0])
            decisions[(layer, kind)] = _Decision(("blacklist", black), Scheme("float"))
        elif chosen is not None:
            decisions[(layer, kind)] = _Decision(("policy", chosen), schemes[chosen])
        else:
            decisions[(layer, kind)] = _Decision(("default",), net_scheme)

    for (what, *detail), (count, cell) in surprises.items():
        more = f" and {count - 1} more" if count > 1 else ""
        if what == "overlap":
            regexes = ", ".join(f"'{policies[i][0]}'" for i in detail[0])
            notes.append(f"layer_policies {regexes} all match {cell}{more}: Golden-Stick raises on overlapping "
                         f"policies; goldstick keeps the first")
        elif what == "lost":
            notes.append(f"opname_blacklist entry {detail[0]!r} of the network config does not protect {cell}{more}: "
                         f"Golden-Stick only checks the blacklist of the policy that selected the cell "
                         f"(layer_policies['{policies[detail[1]][0]}']), so it is quantized")
        else:
            notes.append(f"opname_blacklist entry {detail[0]!r} is a substring test in Golden-Stick: it also keeps "
                         f"{cell}{more} float")

    for i, (regex, _) in enumerate(policies):
        if i in matched_policy and i not in used_policy:
            notes.append(f"layer_policies['{regex}'] never applies: an earlier policy takes every cell it matches")
        elif i not in used_policy:
            notes.append(f"layer_policies['{regex}'] matches no {naming} cell name of this model (re.match; cell "
                         f"names look like {_cells(naming, 'self_attn.o_proj', 0)[0]}): it has no effect")
    for b in dict.fromkeys(net.opname_blacklist + tuple(x for _, c in policies for x in c.opname_blacklist)):
        if b not in used_black:
            notes.append(f"opname_blacklist entry {b!r} matches no {naming} cell name of this model: no effect")

    # write the outcome back as HF-name rules: router, blacklist entries, layer policies (disjoint sets)
    selected: dict[tuple, dict[str, set]] = {}
    scheme_of: dict[tuple, Scheme] = {}
    layers_of_kind: dict[str, set] = {}
    for (layer, kind), d in decisions.items():
        layers_of_kind.setdefault(kind, set()).add(layer)
        if d.source != ("default",):
            selected.setdefault(d.source, {}).setdefault(kind, set()).add(layer)
            scheme_of[d.source] = d.scheme

    def why(src: tuple) -> str:
        if src[0] == "router":
            return "MoE router: Golden-Stick never quantizes it"
        if src[0] == "blacklist":
            return f"Golden-Stick opname_blacklist {src[1]!r}"
        return f"Golden-Stick layer_policies['{policies[src[1]][0]}']"

    order = sorted(selected, key=lambda src: (("router", "blacklist", "policy").index(src[0]),
                                              src[1] if src[0] == "policy" else 0))
    rules = [Rule(_hf_regex(selected[src], layers_of_kind), scheme_of[src], why(src)) for src in order]

    if any(d.scheme.quantized for d in decisions.values()):
        notes.append("Golden-Stick's int8 weight scale is absmax/127.5; the recipe uses absmax/127 (set "
                     "options.weight_rounding: gs for Golden-Stick-identical weights)")
    if any(d.scheme.static for d in decisions.values()):
        notes.append("calibration data is not part of a Golden-Stick policy: set calibration.data in the recipe or "
                     "at run time (Golden-Stick's DeepSeek example used 200 CEval prompts)")
    recipe = Recipe(rules=rules, default=net_scheme,
                    options=Options(**options), name=name,
                    description=f"Translated from a Golden-Stick policy ({source}, {naming} cell names)",
                    source=source)

    # the recipe must plan exactly the GS outcome on this model
    plan = recipe.plan(config)
    for entry in plan:
        expected = decisions[linear_kind(entry.name)].scheme
        if entry.scheme != recipe.resolve(expected):
            raise AssertionError(f"goldstick bug: translated rule gives {entry.name} {entry.scheme.label}, "
                                 f"Golden-Stick gives {expected.label}")
    return recipe, list(dict.fromkeys(notes))


# ---- HF regexes from a set of (kind, layers) ----------------------------------------------------------------------

def _container_and_leaf(kind: str) -> tuple[str, str]:
    container, _, leaf = kind.rpartition(".")
    return container, leaf


def _container_regex(containers: list[str]) -> str:
    """["mlp", "mlp.experts.{e}", "mlp.shared_experts"] → ``mlp\\.(?:experts\\.\\d+\\.|shared_experts\\.)?``."""
    def rx(part: str) -> str:
        return re.escape(part).replace(r"\{e\}", r"\d+") + r"\."

    split = [c.split(".") for c in containers]
    common = 0
    while all(len(parts) > common for parts in split) and len({parts[common] for parts in split}) == 1:
        common += 1
    head = ".".join(split[0][:common])
    tails = [".".join(parts[common:]) for parts in split]
    out = rx(head) if head else ""
    options = [rx(t) for t in tails if t]
    if not options:
        return out
    group = "(?:" + "|".join(options) + ")"
    if "" in tails:
        return out + group + "?"
    return out + (options[0] if len(options) == 1 else group)


def _hf_regex(selected: dict[str, set], layers_of_kind: dict[str, set]) -> str:
    """A fullmatch regex for exactly these kinds on these layers (``\\d+`` when a kind is taken on every layer)."""
    by_layers: dict[str, list[str]] = {}
    for kind, layers in selected.items():
        if layers == {None}:
            pattern = ""
        elif layers == layers_of_kind[kind]:
            pattern = r"\d+"
        else:
            nums = sorted(layers)
            pattern = str(nums[0]) if len(nums) == 1 else "(?:" + "|".join(map(str, nums)) + ")"
        by_layers.setdefault(pattern, []).append(kind)
    alternatives = []
    for pattern, kinds in by_layers.items():
        if pattern == "":
            alternatives += [re.escape(k) for k in kinds]
            continue
        by_leaves: dict[tuple[str, ...], list[str]] = {}
        containers: dict[str, list[str]] = {}
        for kind in kinds:
            container, leaf = _container_and_leaf(kind)
            containers.setdefault(container, []).append(leaf)
        for container, leaves in containers.items():
            by_leaves.setdefault(tuple(leaves), []).append(container)
        for leaves, conts in by_leaves.items():
            leaf_rx = re.escape(leaves[0]) if len(leaves) == 1 else "(?:" + "|".join(map(re.escape, leaves)) + ")"
            alternatives.append(rf"model\.layers\.{pattern}\." + _container_regex(conts) + leaf_rx)
    return "|".join(alternatives)
