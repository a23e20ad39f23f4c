"""compressed-tensors (what llm-compressor writes and vLLM loads on GPUs): per-linear conversion from and to the
engine's stream, the ``quantization_config`` block, and what of a plan it cannot hold (notes/peers-and-formats.md §3).

    dynamic W8A8    int-quantized: weight int8 [out,in], weight_scale [out,1]
    static W8A8     int-quantized: weight, weight_scale, input_scale [1], input_zero_point int8 [1]
                    (per-tensor asymmetric activations)
    W8A16           pack-quantized: weight_packed int32 [out,ceil(in/4)], weight_shape int64 [2],
                    weight_scale [out,1] (vLLM serves int8 weight-only only through its WNA16 path)
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from goldstick.io.layouts import BF16, ExportError, folded_static, is_bf16, is_routed_expert
from goldstick.model.config import ModelConfig
from goldstick.quant.algorithms import deq_scale, quant_bias_zero_point
from goldstick.quant.schemes import (
    FLOAT,
    LABEL_TO_SCHEME,
    PACK_QUANTIZED,
    SCHEMES,
    W8A8_DYNAMIC,
    W8A8_STATIC,
    W8A16,
)

CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this follows (tests validate with it)

# Why a model cannot go to compressed-tensors: key -> explanation (the order of the error message).
CT_REFUSALS = {
    "moe-static": "static int8 activations on routed MoE experts: vLLM's fused MoE int8 method "
                  "(CompressedTensorsW8A8Int8MoEMethod) accepts only dynamic per-token activations",
    "norm-bias": "OS+ shift folded into a norm bias: vLLM's DeepSeek RMSNorm has no bias, so the shift would be lost",
    "beta": "OS+ shift `beta` added to the input before quantization: no compressed-tensors or vLLM parameter "
            "shifts a linear's input",
    "quant-bias": "quant_bias carries more than the zero-point correction -zp*sum(W) (the OS+ shift compensation): "
                  "vLLM derives the correction from the weights (azp_adj) and has nowhere to put the rest",
    "per-channel-input": "per-channel input_scale/input_offset (smoothing factors that no norm absorbed): "
                         "compressed-tensors stores one input_scale/input_zero_point per tensor and vLLM's static "
                         "int8 kernels apply one per tensor",
    "deq-scale": "deq_scale is not input_scale x a bf16 per-channel weight scale, so the weight scale "
                 "compressed-tensors stores cannot be recovered exactly",
    "weight-offset": "non-zero weight_offset (asymmetric weights): vLLM's int8 schemes need symmetric weights",
    "fused-mismatch": "linears that vLLM runs as one fused module (fused_qkv_a_proj, gate_up_proj) differ in scheme "
                      "or static activation range: vLLM would merge them into one range, not what was calibrated",
    "convention": "static activation scales in the ascend (per-tensor reciprocal) convention: quantize again with "
                  "--format compressed-tensors",
    "moe-mixed": "routed experts of one layer with different schemes: vLLM's fused MoE applies one scheme to "
                 "all gate/up/down projections of a layer",
}


# ------------------------------------------------------------------------------------------------ int8 packing
def pack_int8(q: np.ndarray) -> np.ndarray:
    """compressed-tensors' pack-quantized layout for 8 bits: element k of a row goes to bits 8*(k%4).. of int32
    word k//4, stored as q + 128 (unsigned); rows are zero-padded to a multiple of 4 (their packed value 0)."""
    q = np.asarray(q, np.int8)
    out_f, in_f = q.shape
    u = (q.astype(np.int16) + 128).astype(np.uint8)
    padded = np.zeros((out_f, -(-in_f // 4) * 4), np.uint8)
    padded[:, :in_f] = u
    return padded.view("<i4").astype(np.int32)


def unpack_int8(packed: np.ndarray, shape) -> np.ndarray:
    out_f, in_f = (int(s) for s in shape)
    u = np.ascontiguousarray(packed, dtype="<i4").view(np.uint8).reshape(out_f, -1)[:, :in_f]
    return (u.astype(np.int16) - 128).astype(np.int8)


# ------------------------------------------------------------------------------------------------ per-linear conversion
def mindspore_to_ct(name: str, label: str, t: dict[str, np.ndarray]) -> tuple[str, dict, list[str], tuple | None]:
    """One quantized linear, mindspore layout -> compressed-tensors tensors.

    Returns ``(scheme, tensors, problems, static_params)``; ``problems`` are REFUSALS keys (tensors is then empty)
    and ``static_params`` the (input_scale, zero_point) of a static linear, for the fused-module check.
    """
    scheme = LABEL_TO_SCHEME.get(label)
    if scheme is None:
        raise ExportError(f"{name}: quantization label {label!r} is not one of {sorted(LABEL_TO_SCHEME)}")
    q = np.asarray(t["weight"])
    if q.dtype != np.int8 or q.ndim != 2:
        raise ExportError(f"{name}.weight: a {label} weight must be int8 [out, in], found {q.dtype} {q.shape}")
    out_f = q.shape[0]
    problems = []
    spec = SCHEMES[scheme]
    if not spec.static:
        if np.any(np.asarray(t.get("weight_offset", 0)) != 0):
            problems.append("weight-offset")
        scale = np.asarray(t["weight_scale"], np.float32).reshape(out_f, 1)
        if problems:
            return scheme, {}, problems, None
        if spec.compressed_tensors.format == PACK_QUANTIZED:
            return scheme, {"weight_packed": pack_int8(q), "weight_shape": np.array(q.shape, np.int64),
                            "weight_scale": scale.astype(BF16)}, [], None
        return scheme, {"weight": q, "weight_scale": scale.astype(BF16)}, [], None

    # static W8A8. Golden-Stick convention (notes/golden-stick.md §2.1): x_q = clip(round(x / input_scale +
    # input_offset)), acc = x_q @ W.T + quant_bias, y = acc * deq_scale. compressed-tensors: x_q = round(x / s) + zp,
    # y = (x_q - zp) @ W.T * s * weight_scale: the same numbers when input_scale/input_offset are one per tensor,
    # quant_bias = -zp*sum(W) and deq_scale = s * weight_scale.
    if is_routed_expert(name):
        problems.append("moe-static")
    if "beta" in t:
        problems.append("beta")
    input_scale = np.asarray(t["input_scale"], np.float32)
    offset = np.asarray(t["input_offset"]).astype(np.int64)
    if input_scale.size == 1:
        problems.append("convention")
        return scheme, {}, problems, None
    if np.any(input_scale != input_scale[0]) or np.any(offset != offset[0]):
        problems.append("per-channel-input")
        return scheme, {}, problems, None  # no per-tensor scale and zero point to check the rest against
    act, zp = np.float32(input_scale[0]), int(offset[0])
    if np.any(np.asarray(t["quant_bias"]).astype(np.int64) != quant_bias_zero_point(q, zp)):
        problems.append("quant-bias")
    deq = np.asarray(t["deq_scale"], np.float32)
    w_scale = (deq.astype(np.float64) / np.float64(act)).astype(np.float32)
    if not (is_bf16(w_scale) and np.array_equal(deq_scale(act, w_scale), deq)):
        problems.append("deq-scale")
    if problems:
        return scheme, {}, problems, None
    return scheme, {"weight": q, "weight_scale": w_scale.reshape(out_f, 1).astype(BF16),
                    "input_scale": np.array([act], np.float32).astype(BF16),
                    "input_zero_point": np.array([zp], np.int8)}, [], (float(act), zp)


def ct_to_mindspore(name: str, scheme: str, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One quantized linear, compressed-tensors tensors (as written by ``mindspore_to_ct``) -> mindspore layout."""
    if "weight_packed" in t:
        shape = np.asarray(t["weight_shape"]).reshape(-1)
        q = unpack_int8(t["weight_packed"], shape)
    else:
        q = np.asarray(t["weight"])
    if q.dtype != np.int8 or q.ndim != 2:
        raise ExportError(f"{name}: an int8 weight [out, in] is needed, found {q.dtype} {q.shape}")
    if "weight_zero_point" in t:
        raise ExportError(f"{name}.weight_zero_point: asymmetric weights cannot be written in the mindspore layout")
    out_f, in_f = q.shape
    w_scale = np.asarray(t["weight_scale"], np.float32)
    if w_scale.size != out_f:
        raise ExportError(f"{name}.weight_scale: one scale per output channel ({out_f}) is needed, "
                          f"found shape {w_scale.shape}")
    w_scale = w_scale.reshape(out_f)
    if not is_bf16(w_scale):
        raise ExportError(f"{name}.weight_scale: not bf16-representable; the mindspore layout stores it in bf16")
    if not SCHEMES[scheme].static:
        return {"weight": q, "weight_scale": w_scale.astype(BF16), "weight_offset": np.zeros(out_f, np.int32)}
    act = np.asarray(t["input_scale"], np.float32).reshape(-1)
    zp_arr = np.asarray(t.get("input_zero_point", np.zeros(1, np.int8))).reshape(-1)
    if act.size != 1 or zp_arr.size != 1:
        raise ExportError(f"{name}: a per-tensor input_scale/input_zero_point ([1]) is needed, found "
                          f"{act.shape}/{zp_arr.shape}")
    if not is_bf16(act):
        raise ExportError(f"{name}.input_scale: not bf16-representable; the mindspore layout stores it in bf16")
    zp = int(zp_arr[0])
    return {"weight": q, "deq_scale": deq_scale(act[0], w_scale),
            "quant_bias": quant_bias_zero_point(q, zp).astype(np.int32),
            "input_scale": np.full(in_f, act[0], np.float32).astype(BF16),
            "input_offset": np.full(in_f, zp, np.int8)}





def ct_plan_problems(cfg: ModelConfig, plan) -> dict[str, list[str]]:
    """What of ``plan``'s result compressed-tensors cannot hold: ``REFUSALS`` key -> names.

    Static linears whose suppression method is shared by every linear their norm feeds fold it into that norm
    (``folded_static``); the others keep it explicit, per channel.
    """
    problems: dict[str, list[str]] = defaultdict(list)
    entries = {e.name: e.scheme for e in plan}
    for layer in range(cfg.num_hidden_layers):
        folded = folded_static(cfg, entries, layer)
        for name in cfg.layer_linear_names(layer):
            scheme = entries.get(name)
            if scheme is None or not scheme.static:
                continue
            if is_routed_expert(name):
                problems["moe-static"].append(name)
            method = scheme.outlier_suppression
            if method == "osplus":
                if name in folded:
                    problems["norm-bias"].append(folded[name] + ".bias")
                else:
                    problems["beta"].append(name)
                problems["quant-bias"].append(name)
            elif method == "smoothquant" and name not in folded:
                problems["per-channel-input"].append(name)
    return dict(problems)


# -------------------------------------------------------------------------------------------- compressed-tensors config
def _generalize(name: str, level: int) -> str:
    """Regex for ``name`` with its numbers wildcarded: level 0 all, 1 all but the layer index, 2 none."""
    parts = name.split(".")
    out = []
    for i, p in enumerate(parts):
        keep = level == 2 or (level == 1 and i == 2 and parts[0] == "model" and parts[1] == "layers")
        out.append(r"\d+" if p.isdigit() and not keep else re.escape(p))
    return r"^" + r"\.".join(out) + r"$"


def ct_targets(schemes: dict[str, str]) -> dict[str, list[str]]:
    """Targets of each quantized scheme's config group, given every main-model linear's scheme (FLOAT too).

    One quantized scheme: ``["Linear"]`` (the float linears go to ``ignore``), as llm-compressor writes it.
    Several: ``re:`` patterns with layer / expert numbers wildcarded wherever that covers only linears of one
    scheme (float linears may be covered: ``ignore`` wins in both compressed-tensors and vLLM).
    """
    quantized = sorted({s for s in schemes.values() if s != FLOAT})
    if len(quantized) <= 1:
        return {s: ["Linear"] for s in quantized}
    targets: dict[str, set[str]] = defaultdict(set)
    pending = {n: s for n, s in schemes.items() if s != FLOAT}
    for level in (0, 1, 2):
        owners: dict[str, set[str]] = defaultdict(set)
        for n, s in schemes.items():
            if s != FLOAT:
                owners[_generalize(n, level)].add(s)
        for n, s in list(pending.items()):
            pattern = _generalize(n, level)
            if owners[pattern] == {s}:
                targets[s].add("re:" + pattern)
                del pending[n]
    return {s: sorted(targets[s]) for s in quantized}


def ct_quantization_config(schemes: dict[str, str], mtp_layers: list[int]) -> dict:
    """The ``quantization_config`` block compressed-tensors' ``ModelCompressor.update_config`` writes."""
    targets = ct_targets(schemes)
    groups = {}
    for i, scheme in enumerate(sorted(targets)):
        spec = SCHEMES[scheme].compressed_tensors
        groups[f"group_{i}"] = {"targets": targets[scheme], "weights": dict(spec.weights),
                                "input_activations": dict(spec.input_activations) if spec.input_activations
                                else None,
                                "output_activations": None, "format": spec.format}
    formats = {g["format"] for g in groups.values()}
    ignore = [n for n, s in schemes.items() if s == FLOAT]
    # the MTP layer stays bf16; vLLM names its modules model.layers.<N>.mtp_block.*, hence a prefix pattern
    ignore += [f"re:^model\\.layers\\.{layer}\\." for layer in mtp_layers]
    return {
        "quant_method": "compressed-tensors",
        "version": CT_VERSION,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def ct_group_scheme(group_name: str, group: dict) -> str:
    """Our scheme name for one compressed-tensors config group, or ExportError for what goldstick cannot run."""
    w, a = group.get("weights") or {}, group.get("input_activations")

    def fail(why: str):
        raise ExportError(f"compressed-tensors config group {group_name!r}: {why}; goldstick loads int8 per-channel "
                          "symmetric weights with dynamic per-token, static per-tensor or no activation quantization")
    if w.get("num_bits") != 8 or w.get("type", "int") != "int" or not w.get("symmetric", True) \
            or w.get("strategy") != "channel" or w.get("dynamic"):
        fail(f"weights {w} are not int8 per-channel symmetric")
    if a is None:
        return W8A16
    if a.get("num_bits") != 8 or a.get("type", "int") != "int":
        fail(f"input activations {a} are not int8")
    if a.get("dynamic") is True and a.get("strategy") == "token" and a.get("symmetric", True):
        return W8A8_DYNAMIC
    if not a.get("dynamic") and a.get("strategy") == "tensor":
        return W8A8_STATIC
    fail(f"input activations {a} are neither dynamic per-token symmetric nor static per-tensor")


def ct_groups(qc: dict) -> list[tuple[str, list[str]]]:
    """(scheme, targets) of each config group of a compressed-tensors ``quantization_config``, in order."""
    groups = qc.get("config_groups") or {}
    return [(ct_group_scheme(k, g), list(g.get("targets") or [])) for k, g in groups.items()]


def ct_match(name: str, target: str) -> bool:
    """Does a config group / ignore target (``re:<regex>``, a module name or ``Linear``) cover linear ``name``?"""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == "Linear"


def ct_scheme_of(linear: str, groups: list[tuple[str, list[str]]], ignore: list[str]) -> str:
    """A linear's scheme as vLLM decides: ``ignore`` first (where ``Linear`` ignores nothing), then the first
    group with a matching target; FLOAT when none matches."""
    if any(ct_match(linear, t) for t in ignore if t != "Linear"):
        return FLOAT
    return next((s for s, targets in groups if any(ct_match(linear, t) for t in targets)), FLOAT)
