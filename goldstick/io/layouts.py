"""Checkpoint targets, named after the serving stacks that load them, and each layout's per-linear tensors.

    target          served by                                   static W8A8 activation       shifts
    ascend          MindFormers >= 2.1 ascend (modelslim) mode:  input_scale f32 [1] (true    <norm>.bias of
                    vllm-mindspore >= 0.5 `--quantization          scale, runtime multiplies  input_layernorm /
                    ascend`                                        by bf16(1/scale)),         q_a_layernorm,
                                                                   input_offset f32 [1]       o_proj.beta
    vllm-ascend     vllm-ascend, MindIE (msModelSlim's layout)   as ascend                    norm .bias only
    golden-stick    MindFormers golden-stick mode                input_scale bf16 [in]        none
                                                                   (divisor), input_offset
                                                                   int8 [in]
    compressed-tensors  vLLM on GPUs (goldstick.io.compressed_tensors)
    mindspore       goldstick's earlier layout: golden-stick's tensors in HF RoPE order, with norm biases and
                    ``beta``; read (and written, for the tools that still take it), served by none of the stacks

Per linear, besides ``weight`` int8 [out, in]: static W8A8 ``deq_scale`` f32 [out], ``quant_bias`` int32 [out]
(zero-point correction and every shift's compensation); ascend targets: dynamic and weight-only
``weight_scale`` / ``weight_offset`` f32 [out, 1]; golden-stick and mindspore: ``weight_scale`` bf16 [out],
``weight_offset`` int32 [out]. ascend and vllm-ascend describe every tensor in ``quant_model_description.json``,
golden-stick and mindspore in ``quantization_description.json``; config.json's ``quantization_config.quant_method``
is the stack's mode name (``ascend``, ``golden-stick``).

The engine's stream (goldstick.io.export) carries static linears in one of two forms: per-tensor (``input_scale``
[1], the ascend convention; the engine calibrates it when asked for an ascend target) or per-channel
(``input_scale`` [in] divisor, the golden-stick convention). Both are exact for their stack and neither converts
exactly into the other (a multiplier ``bf16(1/s)`` is not a divisor), so a target refuses the other form
(``convention``) rather than approximate it. Every refusal names the layers (``REFUSALS``).

The golden-stick mode does not convert the RoPE rows of q_b_proj / kv_a_proj_with_mqa at load (MindFormers
``weights_utils.deal_linear_q_up_weight`` / ``deal_linear_kv_down_weight`` with ``rope_transition`` False): the
golden-stick target writes them as ``infer_trans_rope_weight`` leaves them (``rope_permutation``).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from goldstick.errors import GoldstickError
from goldstick.model.architecture import VALUE_CONSUMER, VALUE_PRODUCER, expert_of, layer_of, smoothing_groups
from goldstick.model.config import ModelConfig
from goldstick.quant.schemes import FLOAT, LABEL_TO_SCHEME, SCHEMES, W8A16

BF16 = ml_dtypes.bfloat16

ASCEND = "ascend"
VLLM_ASCEND = "vllm-ascend"
GOLDEN_STICK = "golden-stick"
COMPRESSED_TENSORS = "compressed-tensors"
MINDSPORE = "mindspore"
FORMATS = (ASCEND, VLLM_ASCEND, GOLDEN_STICK, COMPRESSED_TENSORS, MINDSPORE)
PER_TENSOR_FORMATS = (ASCEND, VLLM_ASCEND)  # static activations calibrated in the per-tensor form
DESCRIPTION_FILE = "quantization_description.json"  # golden-stick, mindspore
ASCEND_DESCRIPTION_FILE = "quant_model_description.json"  # ascend, vllm-ascend, msModelSlim
DESCRIPTION_FILES = {ASCEND: ASCEND_DESCRIPTION_FILE, VLLM_ASCEND: ASCEND_DESCRIPTION_FILE,
                     GOLDEN_STICK: DESCRIPTION_FILE, MINDSPORE: DESCRIPTION_FILE}
QUANT_METHODS = {ASCEND: "ascend", VLLM_ASCEND: "ascend", GOLDEN_STICK: "golden-stick", MINDSPORE: "golden-stick"}
STACKS = {
    ASCEND: "MindFormers' ascend mode (vllm-mindspore --quantization ascend)",
    VLLM_ASCEND: "vllm-ascend / MindIE",
    GOLDEN_STICK: "MindFormers' golden-stick mode (vllm-mindspore --quantization golden-stick)",
    COMPRESSED_TENSORS: "vLLM",
    MINDSPORE: "goldstick's earlier layout",
}
# description keys that label no tensor (msModelSlim writes them; goldstick's ascend targets too)
DESCRIPTION_METADATA = ("model_quant_type", "version", "metadata", "group_size", "optional")
# the norms whose bias MindFormers' ascend mode applies, as the beta of the linears they feed
# (modeling_deepseek_v3_infer.py convert_name: input_layernorm.bias, q_layernorm.bias)
ASCEND_NORM_BIASES = ("input_layernorm", "self_attn.q_a_layernorm")

# Why a target cannot hold a model: key -> explanation, in the order messages list them. compressed-tensors'
# own reasons are in goldstick.io.compressed_tensors.CT_REFUSALS.
REFUSALS = {
    "convention": "static activation scales calibrated for another QuantV2 convention (per-tensor true scale "
                  "applied as its bf16 reciprocal vs per-channel divisor): no exact conversion; quantize again "
                  "with this --format",
    "w8a16": "weight-only int8 (W8A16): MindFormers has no W8A16 method (golden_stick/config.py "
             "QUANTIZATION_METHOD_MAPPING)",
    "moe-static": "static int8 activations on routed MoE experts: the Ascend stacks' MoE methods take dynamic "
                  "per-token activations only",
    "per-channel-input": "a per-channel smoothing scale that no norm (and, for o_proj, no float kv_b_proj) "
                         "absorbs: the stack applies one input_scale per tensor",
    "norm-bias": "an OS+ shift folded into a norm bias that the stack does not apply",
    "beta": "an OS+ shift `beta` on the input of a linear that the stack does not apply",
    "fused-mismatch": "linears the stack loads as one fused module (q_a_proj + kv_a_proj_with_mqa, gate_proj + "
                      "up_proj) differ in scheme or static activation parameters: one set would overwrite the other",
    "moe-mixed": "routed experts of one layer with different schemes: the stack applies one method to all experts",
    "o-proj-shift": "an OS+ shift on o_proj's input (o_proj.beta): vllm-ascend / MindIE have no form for it "
                    "(use --format ascend for MindFormers / vllm-mindspore)",
}


class ExportError(GoldstickError, ValueError):
    """A checkpoint that cannot be written in (or read from) the requested format; the message says why."""


def is_bf16(x: np.ndarray) -> bool:
    x = np.asarray(x, np.float32)
    return bool(np.array_equal(x.astype(BF16).astype(np.float32), x))


def is_routed_expert(name: str) -> bool:
    return expert_of(name) is not None


def norm_of_bias(name: str) -> str | None:
    """The norm's local name (``input_layernorm``, ``self_attn.q_a_layernorm``...) of a decoder norm's bias."""
    if not name.endswith(".bias") or "norm" not in name.rpartition(".")[0].rpartition(".")[2]:
        return None
    layer = layer_of(name)
    if layer is None:
        return None
    return name[len(f"model.layers.{layer}."):].rpartition(".")[0]


# ------------------------------------------------------------------------------------------------ RoPE rows
def rope_permutation(cfg: ModelConfig, linear: str) -> np.ndarray | None:
    """Rows of q_b_proj (q_proj) / kv_a_proj_with_mqa in the order MindFormers' ``infer_trans_rope_weight`` puts
    them (each RoPE block: even rows, then odd rows); None for other linears. ``new = old[perm]``."""
    local = linear.rpartition(".")[2]
    r = cfg.qk_rope_head_dim
    block = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])
    if local in ("q_b_proj", "q_proj"):
        head = cfg.qk_nope_head_dim + r
        perm = np.arange(cfg.num_attention_heads * head).reshape(cfg.num_attention_heads, head)
        perm[:, cfg.qk_nope_head_dim:] = perm[:, cfg.qk_nope_head_dim:][:, block]
        return perm.reshape(-1)
    if local == "kv_a_proj_with_mqa":
        perm = np.arange(cfg.kv_lora_rank + r)
        perm[cfg.kv_lora_rank:] = perm[cfg.kv_lora_rank:][block]
        return perm
    return None


def permute_rows(tensors: dict[str, np.ndarray], perm: np.ndarray, inverse: bool = False) -> dict:
    """Every per-output tensor of a linear (weight, deq_scale, quant_bias, weight_scale...) in ``perm``'s order."""
    if inverse:
        perm = np.argsort(perm)
    return {k: (v if k in ("input_scale", "input_offset", "beta") else np.asarray(v)[perm]) for k, v in tensors.items()}


# ------------------------------------------------------------------------------------------------ per linear
def static_form(tensors: dict) -> str:
    """``per-tensor`` (input_scale [1]) or ``per-channel`` (input_scale [in])."""
    return "per-tensor" if np.size(tensors["input_scale"]) == 1 else "per-channel"


def to_layout(fmt: str, cfg: ModelConfig, name: str, label: str, t: dict) -> tuple[dict, list[str]]:
    """One quantized linear of the stream -> its tensors in ``fmt`` (ascend, vllm-ascend, golden-stick or
    mindspore), and the REFUSALS keys that stop it (tensors then empty). Dtype and shape conversions only: the
    values are what the engine calibrated."""
    scheme = LABEL_TO_SCHEME.get(label)
    if scheme is None:
        raise ExportError(f"{name}: quantization label {label!r} is not one of {sorted(LABEL_TO_SCHEME)}")
    spec = SCHEMES[scheme]
    problems = []
    if scheme == W8A16 and fmt in (ASCEND, GOLDEN_STICK):
        problems.append("w8a16")
    if spec.static:
        if is_routed_expert(name) and fmt != MINDSPORE:
            problems.append("moe-static")
        per_tensor = static_form(t) == "per-tensor"
        if per_tensor != (fmt in PER_TENSOR_FORMATS):
            problems.append("convention")
        if "beta" in t:
            if fmt == GOLDEN_STICK or (fmt in PER_TENSOR_FORMATS and not name.endswith(VALUE_CONSUMER)):
                problems.append("beta")
            elif fmt == VLLM_ASCEND:
                problems.append("o-proj-shift")
    if problems:
        return {}, problems
    out_f = np.shape(t["weight"])[0]
    if fmt in PER_TENSOR_FORMATS:
        if not spec.static:
            return {"weight": t["weight"],
                    "weight_scale": np.asarray(t["weight_scale"], np.float32).reshape(out_f, 1),
                    "weight_offset": np.asarray(t.get("weight_offset", np.zeros(out_f)), np.float32)
                    .reshape(out_f, 1)}, []
        out = {"weight": t["weight"], "deq_scale": np.asarray(t["deq_scale"], np.float32),
               "quant_bias": np.asarray(t["quant_bias"]).astype(np.int32),
               "input_scale": np.asarray(t["input_scale"], np.float32).reshape(1),
               "input_offset": np.asarray(t["input_offset"], np.float32).reshape(1)}
        if "beta" in t:
            out["beta"] = np.asarray(t["beta"], np.float32).astype(BF16)
        return out, []
    out = dict(t)
    if not spec.static:
        out["weight_scale"] = np.asarray(t["weight_scale"], np.float32).reshape(out_f).astype(BF16)
        out["weight_offset"] = np.asarray(t.get("weight_offset", np.zeros(out_f))).reshape(out_f).astype(np.int32)
    if fmt == GOLDEN_STICK:
        perm = rope_permutation(cfg, name)
        if perm is not None:
            out = permute_rows(out, perm)
    return out, []


def from_layout(fmt: str, cfg: ModelConfig, name: str, label: str, t: dict) -> dict:
    """One quantized linear as stored in ``fmt`` -> the stream's form (golden-stick's RoPE rows back in HF
    order; ascend scales stay per-tensor, [out, 1] scales as stored: the cells take either)."""
    if fmt == GOLDEN_STICK:
        perm = rope_permutation(cfg, name)
        if perm is not None:
            return permute_rows(t, perm, inverse=True)
    return dict(t)


def float_rows(fmt: str, cfg: ModelConfig, name: str, array: np.ndarray, inverse: bool = False) -> np.ndarray:
    """A float tensor of the main network in ``fmt``'s row order: golden-stick's RoPE rows for the weight of a
    float q_b_proj / kv_a_proj_with_mqa (the MTP layer stays in HF order: MindFormers converts it, its MTP model
    having no quantization config). ``inverse``: back to HF order."""
    layer = layer_of(name)
    if fmt != GOLDEN_STICK or layer is None or layer >= cfg.num_hidden_layers or not name.endswith(".weight"):
        return array
    perm = rope_permutation(cfg, name[: -len(".weight")])
    if perm is None:
        return array
    return np.asarray(array)[np.argsort(perm) if inverse else perm]


def float_problems(fmt: str, name: str) -> list[str]:
    """REFUSALS keys of a float tensor in ``fmt``: a decoder norm's bias that the target's stack would not apply."""
    norm = norm_of_bias(name)
    if norm is None or fmt in (MINDSPORE, COMPRESSED_TENSORS):
        return []
    if fmt == GOLDEN_STICK or norm not in ASCEND_NORM_BIASES:
        return ["norm-bias"]
    return []


# ------------------------------------------------------------------------------------------------ plan level
def folded_static(cfg: ModelConfig, entries: dict, layer: int) -> dict[str, str]:
    """Static linears of ``layer`` whose suppression folds into their feeding norm: linear -> norm (the engine's
    ``LayerQuantizer._static_groups``: every linear the norm feeds is static with one method, not ``none``).
    ``entries``: linear name -> plan scheme."""
    folded = {}
    for group in smoothing_groups(cfg, layer):
        members = [m for m in group.linears if m in entries]
        methods = {entries[m].outlier_suppression for m in members}
        if members and all(entries[m].static for m in members) and len(methods) == 1 and methods != {"none"}:
            folded.update({m: group.key for m in members})
    return folded


def layout_plan_problems(cfg: ModelConfig, plan, fmt: str) -> dict[str, list[str]]:
    """What of ``plan``'s result the Ascend target ``fmt`` cannot hold: ``REFUSALS`` key -> names."""
    problems: dict[str, list[str]] = {}
    entries = {e.name: e.scheme for e in plan}

    def add(key: str, name: str) -> None:
        problems.setdefault(key, []).append(name)

    for layer in range(cfg.num_hidden_layers):
        folded = folded_static(cfg, entries, layer)
        prefix = f"model.layers.{layer}."
        for name in cfg.layer_linear_names(layer):
            scheme = entries.get(name)
            if scheme is None:
                continue
            if scheme.name == W8A16 and fmt in (ASCEND, GOLDEN_STICK):
                add("w8a16", name)
            if not scheme.static:
                continue
            if is_routed_expert(name):
                add("moe-static", name)
            method = scheme.outlier_suppression
            if method == "none":
                continue
            if name in folded:
                norm = folded[name]
                if method == "osplus" and (fmt == GOLDEN_STICK or norm[len(prefix):] not in ASCEND_NORM_BIASES):
                    if f"{norm}.bias" not in problems.get("norm-bias", []):
                        add("norm-bias", f"{norm}.bias")
                continue
            if fmt == GOLDEN_STICK:
                if method == "osplus":
                    add("beta", name)
                continue
            producer = entries.get(prefix + VALUE_PRODUCER)
            if name != prefix + VALUE_CONSUMER or producer is None or producer.name != FLOAT:
                add("per-channel-input", name)
            elif method == "osplus" and fmt == VLLM_ASCEND:
                add("o-proj-shift", name)
    return problems


def linear_layout(fmt: str, label: str, out_features: int, in_features: int) -> tuple[dict, dict]:
    """(required, optional) local name -> (dtype code, shape) of one quantized linear stored in ``fmt``."""
    spec = SCHEMES[LABEL_TO_SCHEME[label]]
    if fmt not in PER_TENSOR_FORMATS:
        return spec.layout(out_features, in_features), spec.layout(out_features, in_features, optional=True)
    o, i = out_features, in_features
    if spec.static:
        return ({"weight": ("I8", (o, i)), "deq_scale": ("F32", (o,)), "quant_bias": ("I32", (o,)),
                 "input_scale": ("F32", (1,)), "input_offset": ("F32", (1,))}, {"beta": ("BF16", (i,))})
    return {"weight": ("I8", (o, i)), "weight_scale": ("F32", (o, 1)), "weight_offset": ("F32", (o, 1))}, {}

