"""DeepSeek-V3/R1's structure by tensor name, stated once: which layer a name belongs to, what the attention (MLA)
and MLP linears are called, which norm feeds which linears, which linears serving fuses, which ones R1 stores in
FP8, and how a token picks its routed experts.

Names are the HF checkpoint names: ``model.layers.3.self_attn.q_a_proj.weight``,
``model.layers.3.mlp.experts.17.up_proj`` (a linear, without ``.weight``), ``lm_head``. The tables name a linear
relative to its layer (``self_attn.q_a_proj``); ``{e}`` stands for one routed expert and ``*`` for all routed
experts of the layer together. Entries a layer does not have (``q_proj`` against ``q_a_proj``, dense against MoE)
are skipped. Which tensors a config implies, with their shapes, is ``ModelConfig``'s (``layer_tensor_shapes``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from goldstick.model.config import ModelConfig

# ---- names -------------------------------------------------------------------------------------------------------

LAYER_PREFIX = re.compile(r"^model\.layers\.(\d+)\.")  # decoder layers 0..num_hidden_layers-1, then the MTP layers
ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def layer_prefix(layer: int) -> str:
    """``model.layers.3.``: what every tensor name of layer 3 starts with."""
    return f"model.layers.{layer}."


def layer_of(name: str) -> int | None:
    """The layer index of a tensor or linear name (``model.layers.3.mlp.gate`` → 3); None outside the layers
    (``model.embed_tokens.weight``, ``lm_head``)."""
    m = LAYER_PREFIX.match(name)
    return int(m.group(1)) if m else None


def split_layer(name: str) -> tuple[int | None, str]:
    """``model.layers.3.mlp.gate`` → ``(3, "mlp.gate")``; a name outside the layers → ``(None, name)``."""
    m = LAYER_PREFIX.match(name)
    return (int(m.group(1)), name[m.end():]) if m else (None, name)


def expert_of(name: str) -> int | None:
    """The routed expert of a name (``model.layers.3.mlp.experts.17.up_proj`` → 17); None for every other name."""
    m = ROUTED_EXPERT.search(name)
    return int(m.group(1)) if m else None


def name_template(name: str) -> str:
    """``model.layers.3.mlp.experts.17.up_proj`` → ``model.layers.{L}.mlp.experts.{E}.up_proj``."""
    name = LAYER_PREFIX.sub("model.layers.{L}.", name, count=1)
    return re.sub(r"\.experts\.\d+\.", ".experts.{E}.", name)


# ---- the linears -------------------------------------------------------------------------------------------------

# MLA: q_proj when q_lora_rank is None, else q_a_proj -> q_a_layernorm -> q_b_proj; kv_a_proj_with_mqa ->
# kv_a_layernorm -> kv_b_proj; o_proj. All under ``self_attn.``.
MLA_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
# the MLA linears that read input_layernorm's output directly
NORMED_INPUT_PROJECTIONS = ("q_a_proj", "q_proj", "kv_a_proj_with_mqa")
# the dense MLP, each routed expert and the shared experts: down_proj(silu(gate_proj(x)) * up_proj(x))
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ROUTER = "mlp.gate"  # the MoE router's linear (weight and e_score_correction_bias); R1 keeps it bf16


def fp8_linear(name: str) -> bool:
    """True for the weights R1 stores as float8_e4m3fn 128x128 blocks with a ``_scale_inv``: every MLA and MLP
    projection, in every layer including MTP; not the router, the embeddings, norms, lm_head, eh_proj or
    shared_head."""
    if not name.endswith(".weight") or ".shared_head." in name or name.endswith("eh_proj.weight"):
        return False
    return name[: -len(".weight")].rsplit(".", 1)[-1] in MLA_PROJECTIONS + MLP_PROJECTIONS


# ---- which norm feeds which linears, and what serving fuses ------------------------------------------------------

FEEDING_NORMS: dict[str, tuple[str, ...]] = {
    # x = input_layernorm(h) feeds both MLA down-projections (q_proj when q_lora_rank is None)
    "input_layernorm": tuple(f"self_attn.{p}" for p in NORMED_INPUT_PROJECTIONS),
    "self_attn.q_a_layernorm": ("self_attn.q_b_proj",),
    "self_attn.kv_a_layernorm": ("self_attn.kv_b_proj",),
    # the MoE router reads the same normed input as the experts: smoothing folded into this norm must also
    # rescale the router's weight columns
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj", ROUTER,
                                 "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                                 "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
}
# o_proj (fed by attention) and every down_proj (fed by silu(gate)*up) have no feeding norm.
# o_proj's input is the attention-weighted sum of kv_b_proj's V rows (the softmax weights sum to 1), so a scale
# on o_proj's input channel j can be folded into the V row that produces it: ``value_rows``.
VALUE_PRODUCER, VALUE_CONSUMER = "self_attn.kv_b_proj", "self_attn.o_proj"


def value_rows(config: ModelConfig) -> np.ndarray:
    """Row of kv_b_proj's weight that produces o_proj's input channel j (head h, dim d: h*(nope+v) + nope + d)."""
    h, d = np.divmod(np.arange(config.num_attention_heads * config.v_head_dim), config.v_head_dim)
    return h * (config.qk_nope_head_dim + config.v_head_dim) + config.qk_nope_head_dim + d

FUSED_LINEARS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("fused_qkv_a_proj", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
     "serving fuses q_a_proj and kv_a_proj_with_mqa into one matmul (fused_qkv_a_proj)"),
    ("gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"),
     "serving fuses gate_proj and up_proj into one matmul (gate_up_proj)"),
    ("gate_up_proj", ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
     "serving fuses gate_proj and up_proj into one matmul (gate_up_proj)"),
    # before the per-expert pair below, so that a split inside the experts is reported once, as fused_moe
    ("fused_moe", ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.experts.*.down_proj"),
     "serving runs all routed experts of a layer as one fused MoE kernel with one quantization method"),
    ("gate_up_proj", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"),
     "serving fuses gate_proj and up_proj into one matmul (gate_up_proj)"),
)


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one layer that belong together: ``key`` is the norm (smoothing) or the fused module."""

    key: str
    linears: tuple[str, ...]
    why: str = ""


def _expand(config: ModelConfig, layer: int, members: tuple[str, ...], present: set[str]) -> list[tuple[str, ...]]:
    prefix = layer_prefix(layer)
    if any("{e}" in m for m in members):
        groups = [tuple(prefix + m.format(e=e) for m in members) for e in range(config.n_routed_experts)]
    else:
        names = []
        for m in members:
            if "*" in m:
                names += [prefix + m.replace("*", str(e)) for e in range(config.n_routed_experts)]
            else:
                names.append(prefix + m)
        groups = [tuple(names)]
    return [g for g in (tuple(n for n in g if n in present) for g in groups) if g]


def smoothing_groups(config: ModelConfig, layer: int) -> list[LinearGroup]:
    """The norms of one layer with the linears each feeds (``FEEDING_NORMS`` resolved for this layer).

    One smoothing scale per group: the scale folded into the norm divides the input of every linear listed.
    """
    present = set(config.layer_linear_names(layer))
    out = []
    for norm, members in FEEDING_NORMS.items():
        for group in _expand(config, layer, members, present):
            out.append(LinearGroup(layer_prefix(layer) + norm, group))
    return out


def fused_groups(config: ModelConfig, layer: int) -> list[LinearGroup]:
    """Linears of one layer that serving runs as one module and that therefore need one scheme."""
    present = set(config.layer_linear_names(layer))
    out = []
    for kind, members, why in FUSED_LINEARS:
        for group in _expand(config, layer, members, present):
            if len(group) > 1:
                out.append(LinearGroup(kind, group, why))
    return out


# ---- routing -----------------------------------------------------------------------------------------------------

def route(cfg: ModelConfig, scores: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's noaux_tc expert choice for sigmoid router scores [T, E] → (weights [T, k] float32, expert ids
    [T, k] int32), best first; ties go to the lower expert or group index.

    Per token: the n_group groups are ranked by the sum of their two best biased scores (``bias`` is
    e_score_correction_bias), the best topk_group groups are kept, the top num_experts_per_tok biased scores among
    them pick the experts, and their *unbiased* scores, renormalised when norm_topk_prob and times
    routed_scaling_factor, weight the expert outputs.
    """
    t, n_experts = scores.shape
    biased = scores + bias
    per_group = n_experts // cfg.n_group
    grouped = biased.reshape(t, cfg.n_group, per_group)
    group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)  # each group's two best
    kept = np.argsort(-group_scores, axis=-1, kind="stable")[:, : cfg.topk_group]
    allowed = np.zeros((t, cfg.n_group), dtype=bool)
    np.put_along_axis(allowed, kept, True, axis=-1)
    biased = np.where(np.repeat(allowed, per_group, axis=-1), biased, -np.inf)
    ids = np.argsort(-biased, axis=-1, kind="stable")[:, : cfg.num_experts_per_tok]
    weights = np.take_along_axis(scores, ids, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + np.float32(1e-20))
    weights = (weights * np.float32(cfg.routed_scaling_factor)).astype(np.float32)
    return np.ascontiguousarray(weights), np.ascontiguousarray(ids.astype(np.int32))
