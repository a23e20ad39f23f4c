"""Checkpoint formats: the Golden-Stick / vllm-mindspore layout and compressed-tensors (vLLM on GPUs).

    mindspore            what Golden-Stick 1.4.1 writes and vllm-mindspore / MindFormers load (golden-stick.md §2-3):
                         per linear ``weight`` int8 [out,in] plus, by type,
                           W8A8 (static)   deq_scale f32 [out], quant_bias int32 [out], input_scale bf16 [in],
                                           input_offset int8 [in], optional beta bf16 [in] (OS+ shift, no norm feeds)
                           W8A8_DYNAMIC    weight_scale bf16 [out], weight_offset int32 [out] (zeros)
                           W8A16           weight_scale bf16 [out], weight_offset int32 [out] (zeros)
                         an OS+ shift folded into a norm is that norm's ``bias``; ``quantization_description.json``
                         labels every tensor W8A8 / W8A8_DYNAMIC / W8A16 / FLOAT.
    compressed-tensors   what llm-compressor writes and vLLM loads (notes/peers-and-formats.md §3):
                           dynamic W8A8    int-quantized: weight int8 [out,in], weight_scale [out,1]
                           static W8A8     int-quantized: weight, weight_scale, input_scale [1],
                                           input_zero_point int8 [1] (per-tensor asymmetric activations)
                           W8A16           pack-quantized: weight_packed int32 [out,ceil(in/4)], weight_shape
                                           int64 [2], weight_scale [out,1] (vLLM serves int8 weight-only only
                                           through its WNA16 path, which needs this format)
                         described by ``quantization_config`` in config.json (config_groups, ignore, ...).

Everything flows through the mindspore layout: the engine produces it, ``MindSporeSource`` reads it back,
``CompressedTensorsSource`` converts a compressed-tensors checkpoint into it, and ``CheckpointWriter`` writes it
out in either format. A stream item is ``(name, label, value)``: a float tensor ``(name, "FLOAT", array)`` or a
quantized linear ``(linear, "W8A8"|..., {local name: array})``, in layer order, one layer in memory at a time.

compressed-tensors cannot express everything the mindspore layout can, and vLLM refuses some of what it can
express. The exporter refuses such a model with one error naming every offending layer and why
(``REFUSALS``); the refusal lists the shipped recipes that do export (``exportable_recipes``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from goldstick.errors import GoldstickError
from goldstick.io.checkpoint import CheckpointError, CheckpointReader
from goldstick.io.files import sha256_file
from goldstick.io.rundir import write_manifest  # re-exported: one manifest rule for every writer
from goldstick.io.writer import ShardedWriter, write_json_atomic
from goldstick.model.architecture import expert_of, fused_groups, layer_of, smoothing_groups
from goldstick.model.config import ModelConfig
from goldstick.model.names import summarize_names
from goldstick.quant.algorithms import deq_scale, quant_bias_zero_point
from goldstick.quant.recipe import RecipeError, load_recipe, shipped_recipes
from goldstick.quant.schemes import (
    FLOAT,
    FLOAT_LABEL,
    LABEL_TO_SCHEME,
    PACK_QUANTIZED,
    SCHEME_TO_LABEL,
    SCHEMES,
    W8A8_DYNAMIC,
    W8A8_STATIC,
    W8A16,
)

MINDSPORE = "mindspore"
COMPRESSED_TENSORS = "compressed-tensors"
FORMATS = (MINDSPORE, COMPRESSED_TENSORS)
DESCRIPTION_FILE = "quantization_description.json"
BF16 = ml_dtypes.bfloat16
CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this follows (tests validate with it)
# files copied from the source model / checkpoint when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
PROVENANCE_FILES = ("recipe.yaml", "report.json", "report.md")

# Description labels, scheme names and each scheme's compressed-tensors config group: goldstick.quant.schemes.

# Why a model cannot go to compressed-tensors: key -> explanation (the order of the error message).
REFUSALS = {
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
    "moe-mixed": "routed experts of one layer with different schemes: vLLM's fused MoE applies one scheme to "
                 "all gate/up/down projections of a layer",
}


class ExportError(GoldstickError, ValueError):
    """A checkpoint that cannot be written in (or read from) the requested format; the message says why."""


# ------------------------------------------------------------------------------------------------ small helpers
def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def _is_bf16(x: np.ndarray) -> bool:
    x = np.asarray(x, np.float32)
    return bool(np.array_equal(x.astype(BF16).astype(np.float32), x))


def _is_routed_expert(name: str) -> bool:
    return expert_of(name) is not None


def refusal_message(problems: dict[str, list[str]], what: str, cfg: ModelConfig) -> str:
    lines = [f"{what} cannot be written as compressed-tensors (vLLM could not serve it as quantized):"]
    for key in REFUSALS:
        if problems.get(key):
            lines.append(f"  - {REFUSALS[key]}: {summarize_names(problems[key])}")
    exportable = exportable_recipes(cfg)
    lines.append(f"Shipped recipes that export for this model: {', '.join(exportable) or 'none'}; "
                 "or keep --format mindspore.")
    return "\n".join(lines)


def exportable_recipes(cfg: ModelConfig) -> list[str]:
    """The shipped recipes whose plan for ``cfg`` compressed-tensors can hold (read from the recipes themselves)."""
    names = []
    for name in shipped_recipes():
        try:
            plan = load_recipe(name).plan(cfg)
        except GoldstickError:
            continue  # a recipe whose rules do not fit this model
        if not plan_problems(cfg, plan):
            names.append(name)
    return names


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_side_files(src: Path, out: Path, names=TOKENIZER_FILES) -> None:
    for name in names:
        if (Path(src) / name).exists():
            copy_atomic(Path(src) / name, Path(out) / name)


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
    if _is_routed_expert(name):
        problems.append("moe-static")
    if "beta" in t:
        problems.append("beta")
    input_scale = np.asarray(t["input_scale"], np.float32)
    offset = np.asarray(t["input_offset"]).astype(np.int64)
    if np.any(input_scale != input_scale[0]) or np.any(offset != offset[0]):
        problems.append("per-channel-input")
        return scheme, {}, problems, None  # no per-tensor scale and zero point to check the rest against
    act, zp = np.float32(input_scale[0]), int(offset[0])
    if np.any(np.asarray(t["quant_bias"]).astype(np.int64) != quant_bias_zero_point(q, zp)):
        problems.append("quant-bias")
    deq = np.asarray(t["deq_scale"], np.float32)
    w_scale = (deq.astype(np.float64) / np.float64(act)).astype(np.float32)
    if not (_is_bf16(w_scale) and np.array_equal(deq_scale(act, w_scale), deq)):
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
    if not _is_bf16(w_scale):
        raise ExportError(f"{name}.weight_scale: not bf16-representable; the mindspore layout stores it in bf16")
    if not SCHEMES[scheme].static:
        return {"weight": q, "weight_scale": w_scale.astype(BF16), "weight_offset": np.zeros(out_f, np.int32)}
    act = np.asarray(t["input_scale"], np.float32).reshape(-1)
    zp_arr = np.asarray(t.get("input_zero_point", np.zeros(1, np.int8))).reshape(-1)
    if act.size != 1 or zp_arr.size != 1:
        raise ExportError(f"{name}: a per-tensor input_scale/input_zero_point ([1]) is needed, found "
                          f"{act.shape}/{zp_arr.shape}")
    if not _is_bf16(act):
        raise ExportError(f"{name}.input_scale: not bf16-representable; the mindspore layout stores it in bf16")
    zp = int(zp_arr[0])
    return {"weight": q, "deq_scale": deq_scale(act[0], w_scale),
            "quant_bias": quant_bias_zero_point(q, zp).astype(np.int32),
            "input_scale": np.full(in_f, act[0], np.float32).astype(BF16),
            "input_offset": np.full(in_f, zp, np.int8)}


# ------------------------------------------------------------------------------------------------ plan-level check
def check_plan(cfg: ModelConfig, plan, fmt: str) -> None:
    """Before calibrating: refuse a plan whose result ``fmt`` could not hold (compressed-tensors only)."""
    if check_format(fmt) != COMPRESSED_TENSORS:
        return
    problems = plan_problems(cfg, plan)
    if problems:
        raise ExportError(refusal_message(problems, f"recipe {plan.recipe.name or '(unnamed)'}", cfg))


def plan_problems(cfg: ModelConfig, plan) -> dict[str, list[str]]:
    """What of ``plan``'s result compressed-tensors cannot hold: ``REFUSALS`` key -> names.

    Static linears whose suppression method is shared by every linear their norm feeds fold it into that norm
    (``LayerQuantizer._static_groups``); the others keep it explicit, per channel.
    """
    problems: dict[str, list[str]] = defaultdict(list)
    entries = {e.name: e.scheme for e in plan}
    for layer in range(cfg.num_hidden_layers):
        folded = {}
        for group in smoothing_groups(cfg, layer):
            members = [m for m in group.linears if m in entries]
            methods = {entries[m].outlier_suppression for m in members}
            if members and all(entries[m].static for m in members) and len(methods) == 1 and methods != {"none"}:
                folded.update({m: group.key for m in members})
        for name in cfg.layer_linear_names(layer):
            scheme = entries.get(name)
            if scheme is None or not scheme.static:
                continue
            if _is_routed_expert(name):
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


# ------------------------------------------------------------------------------------------------ sources
def detect_format(path: str | Path) -> str | None:
    """``mindspore``, ``compressed-tensors`` or None (a float checkpoint)."""
    path = Path(path)
    if (path / DESCRIPTION_FILE).exists():
        return MINDSPORE
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return None
    return COMPRESSED_TENSORS if qc.get("quant_method") == COMPRESSED_TENSORS else None


class MindSporeSource:
    """A goldstick checkpoint in the mindspore layout, as a stream of (name, label, value)."""

    format = MINDSPORE

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = CheckpointReader(self.path)
        self.config = self.reader.config
        try:
            self.labels = json.loads((self.path / DESCRIPTION_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path / DESCRIPTION_FILE}: not a readable JSON file ({exc})") from None

    def entries(self, include_mtp: bool = True) -> Iterator[tuple[str, str, object]]:
        main = self.config.num_hidden_layers
        for _, names in _by_layer(self.reader.names(), main, include_mtp):
            owners: dict[str, dict] = defaultdict(dict)
            labels: dict[str, str] = {}
            for name in names:
                label = self.labels.get(name)
                if label is None:
                    raise CheckpointError(f"{DESCRIPTION_FILE}: tensor '{name}' (in {self.reader.file_of(name)}) "
                                          "has no label")
                if label == FLOAT_LABEL:
                    yield name, FLOAT_LABEL, self.reader.read_raw(name)
                else:
                    owner, _, local = name.rpartition(".")
                    owners[owner][local] = name
                    if labels.setdefault(owner, label) != label:
                        raise CheckpointError(f"{DESCRIPTION_FILE}: tensors of linear '{owner}' carry different "
                                              f"labels ({labels[owner]}, {label})")
            for owner, locals_ in owners.items():
                yield owner, labels[owner], {k: self.reader.read_raw(v) for k, v in locals_.items()}


def _by_layer(names, main_layers: int, include_mtp: bool) -> Iterator[tuple[int | None, list[str]]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for name in names:
        layer = layer_of(name)
        if layer is not None and layer >= main_layers and not include_mtp:
            continue
        groups[-1 if layer is None else layer].append(name)
    for layer in sorted(groups):
        yield (None if layer < 0 else layer), sorted(groups[layer])


class _PackedAwareReader(CheckpointReader):
    """CheckpointReader that accepts pack-quantized linears (``weight_packed`` + ``weight_shape`` for ``weight``)."""

    def _check_against_config(self) -> None:
        full = self._expected
        packed = {n: s for n, s in full.items()
                  if n.endswith(".weight") and n not in self._tensors and f"{n}_packed" in self._tensors}
        self._expected = {n: s for n, s in full.items() if n not in packed}
        try:
            super()._check_against_config()
        finally:
            self._expected = full
        for name, (out_f, in_f) in packed.items():
            info, shape_info = self._tensors[f"{name}_packed"], self._tensors.get(f"{name}_shape")
            if info.dtype != "I32" or info.shape != (out_f, -(-in_f // 4)):
                raise CheckpointError(f"{info.file}: '{name}_packed' is {info.dtype} {info.shape}; 8-bit packing of "
                                      f"a [{out_f}, {in_f}] weight needs I32 {(out_f, -(-in_f // 4))}")
            if shape_info is None or shape_info.shape != (2,):
                raise CheckpointError(f"{info.file}: '{name}_packed' has no '{name}_shape' of shape (2,)")


class CompressedTensorsSource:
    """A compressed-tensors checkpoint written by goldstick, as a stream in the mindspore layout."""

    format = COMPRESSED_TENSORS

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = _PackedAwareReader(self.path)
        self.config = self.reader.config
        qc = self.config.quantization_config or {}
        if qc.get("quant_method") != COMPRESSED_TENSORS:
            raise ExportError(f"{self.path}: config.json has no compressed-tensors quantization_config")
        if qc.get("quantization_status", "compressed") != "compressed":
            raise ExportError(f"{self.path}: quantization_status is {qc.get('quantization_status')!r}; only "
                              "compressed checkpoints hold integer weights")
        self.groups = ct_groups(qc)
        self.ignore = list(qc.get("ignore") or [])
        self.linears = set(self.config.linear_names())

    def scheme_of(self, linear: str) -> str:
        """The scheme of a main-model linear: as vLLM decides, ignore first, then the first matching group."""
        return ct_scheme_of(linear, self.groups, self.ignore)

    def entries(self, include_mtp: bool = True) -> Iterator[tuple[str, str, object]]:
        main = self.config.num_hidden_layers
        for _, names in _by_layer(self.reader.names(), main, include_mtp):
            owners: dict[str, dict] = defaultdict(dict)
            for name in names:
                owner, _, local = name.rpartition(".")
                if owner in self.linears and self.scheme_of(owner) != FLOAT:
                    owners[owner][local] = name
                    continue
                if self.reader.dtype(name).startswith(("I", "U")):
                    raise ExportError(f"{name}: an integer tensor outside the quantized linears of the "
                                      "quantization_config (ignored, or in the MTP layer goldstick keeps float)")
                yield name, FLOAT_LABEL, self.reader.read_raw(name)
            for owner, locals_ in owners.items():
                scheme = self.scheme_of(owner)
                tensors = {k: self.reader.read_raw(v) for k, v in locals_.items()}
                yield owner, SCHEME_TO_LABEL[scheme], ct_to_mindspore(owner, scheme, tensors)


def open_source(path: str | Path):
    fmt = detect_format(path)
    if fmt == MINDSPORE:
        return MindSporeSource(path)
    if fmt == COMPRESSED_TENSORS:
        return CompressedTensorsSource(path)
    raise ExportError(f"{path}: not a quantized goldstick checkpoint (no {DESCRIPTION_FILE} and no "
                      "compressed-tensors quantization_config in config.json)")


# ------------------------------------------------------------------------------------------------ the writer
class CheckpointWriter:
    """Writes the mindspore-layout stream in one format: shards + index, then ``write_config`` the metadata.

        w = CheckpointWriter(out, "compressed-tensors", cfg, max_shard_bytes)
        for name, label, value in stream: w.add(name, label, value)
        w.close()                       # shards and index; raises ExportError listing every refusal
        w.write_config(config_dict, recipe_name, counts)   # config.json (+ quantization_description.json)

    For compressed-tensors, the first refusal stops the writing of tensors (the stream is still read to the end
    so that the error names every offending layer) and ``close`` removes the temporary shards.
    """

    def __init__(self, out: str | Path, fmt: str, cfg: ModelConfig, max_shard_bytes: int, shards=None):
        self.out, self.fmt, self.cfg = Path(out), check_format(fmt), cfg
        # ``shards``: another writer with ShardedWriter's add/close/abort (the streaming path's PlannedShardWriter)
        self.shards = shards if shards is not None else ShardedWriter(self.out, max_shard_bytes=max_shard_bytes,
                                                                      overwrite=True)
        self.labels: dict[str, str] = {}
        self.linears = set(cfg.linear_names())
        self.schemes: dict[str, str] = {}  # main-model linear -> scheme (FLOAT included)
        self.static: dict[str, tuple] = {}  # static linear -> (input_scale, zero_point), compressed-tensors
        self.problems: dict[str, list[str]] = defaultdict(list)
        self.mtp_layers: set[int] = set()

    def add(self, name: str, label: str, value) -> None:
        if label == FLOAT_LABEL:
            self._add_float(name, np.asarray(value))
        else:
            self._add_linear(name, label, value)

    def _put(self, name: str, array: np.ndarray, label: str) -> None:
        if not self.problems:
            self.shards.add(name, array)
        self.labels[name] = label

    def _add_float(self, name: str, array: np.ndarray) -> None:
        layer = layer_of(name)
        if layer is not None and layer >= self.cfg.num_hidden_layers:
            self.mtp_layers.add(layer)
        owner = name.rpartition(".")[0]
        if name.endswith(".weight") and owner in self.linears:
            self.schemes[owner] = FLOAT
        if self.fmt == COMPRESSED_TENSORS and name.endswith(".bias") and "norm" in owner.rpartition(".")[2] \
                and (layer is None or layer < self.cfg.num_hidden_layers):
            self.problems["norm-bias"].append(name)
        self._put(name, array, FLOAT_LABEL)

    def _add_linear(self, owner: str, label: str, tensors: dict) -> None:
        scheme = LABEL_TO_SCHEME.get(label)
        if scheme is None:
            raise ExportError(f"{owner}: quantization label {label!r} is not one of {sorted(LABEL_TO_SCHEME)}")
        if owner not in self.linears:
            raise ExportError(f"{owner}: quantized ({label}) but not a linear of the main network")
        self.schemes[owner] = scheme
        if self.fmt == MINDSPORE:
            for local in sorted(tensors):
                self._put(f"{owner}.{local}", tensors[local], label)
            return
        scheme, converted, problems, static = mindspore_to_ct(owner, label, tensors)
        for key in problems:
            self.problems[key].append(owner)
        if static is not None:
            self.static[owner] = static
        for local in sorted(converted):
            self._put(f"{owner}.{local}", converted[local], label)

    def _check_fused(self) -> None:
        for layer in range(self.cfg.num_hidden_layers):
            for group in fused_groups(self.cfg, layer):
                kinds = {self.schemes.get(m) for m in group.linears}
                if group.key == "fused_moe":
                    if len(kinds) > 1:
                        self.problems["moe-mixed"] += list(group.linears)
                elif len(kinds) > 1 or len({self.static.get(m) for m in group.linears}) > 1:
                    self.problems["fused-mismatch"] += list(group.linears)

    def close(self, what: str = "this model") -> None:
        try:
            if self.fmt == COMPRESSED_TENSORS:
                self._check_fused()
            if self.problems:
                raise ExportError(refusal_message(self.problems, what, self.cfg))
            missing = self.linears - set(self.schemes)
            if self.cfg.tie_word_embeddings:
                missing.discard("lm_head")
            if missing:
                raise ExportError(f"linears absent from the stream: {summarize_names(missing)}")
            self.shards.close(metadata={"quantized_by": "goldstick", "format": self.fmt})
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.shards.abort()  # removes the temporary shards; harmless once closed

    def quantization_config(self, recipe_name: str | None, counts: dict) -> dict:
        if self.fmt == MINDSPORE:
            return {"quant_method": "golden-stick", "format": MINDSPORE, "producer": "goldstick",
                    "description_file": DESCRIPTION_FILE, "recipe": recipe_name, "schemes": counts, "version": 1}
        ordered = {n: self.schemes[n] for n in self.cfg.linear_names() if n in self.schemes}
        return ct_quantization_config(ordered, sorted(self.mtp_layers))

    def write_config(self, base: dict, recipe_name: str | None, counts: dict) -> None:
        """config.json (R1's FP8 block config replaced) and, for mindspore, quantization_description.json."""
        config = dict(base)
        config.pop("quantization_config", None)  # R1's FP8 block config no longer describes these weights
        config["torch_dtype"] = "bfloat16"
        config["quantization_config"] = self.quantization_config(recipe_name, counts)
        write_json_atomic(self.out / "config.json", config)
        if self.fmt == MINDSPORE:
            write_json_atomic(self.out / DESCRIPTION_FILE, dict(sorted(self.labels.items())))


def scheme_counts(schemes: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for s in schemes.values():
        counts[s] += 1
    return dict(counts)


# ------------------------------------------------------------------------------------------------ export command
def export_checkpoint(src: str | Path, out: str | Path, fmt: str,
                      max_shard_bytes: int = 4 << 30) -> Path:
    """Convert a goldstick checkpoint to the other format, tensor by tensor, without re-calibrating.

    The output folder must be new or empty. Refuses (ExportError) what the target format cannot hold.
    """
    src, out = Path(src), Path(out)
    check_format(fmt)
    source = open_source(src)
    if source.format == fmt:
        raise ExportError(f"{src} is already in the {fmt} format")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; choose a new folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    cfg = source.config
    writer = CheckpointWriter(out, fmt, cfg, max_shard_bytes)
    try:
        for name, label, value in source.entries():
            writer.add(name, label, value)
        writer.close(what=str(src))
    except BaseException:
        writer.abort()
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    recipe_name, counts = _recipe_counts(src / "recipe.yaml", cfg)
    writer.write_config(cfg.to_dict(), recipe_name, counts or scheme_counts(writer.schemes))
    copy_side_files(src, out, TOKENIZER_FILES + PROVENANCE_FILES)
    write_json_atomic(out / "export.json", {
        "source": str(src), "source_format": source.format, "format": fmt,
        "source_manifest_sha256": sha256_file(src / "manifest.json") if (src / "manifest.json").exists() else None,
    })
    write_manifest(out)
    return out


def _recipe_counts(path: Path, cfg: ModelConfig) -> tuple[str | None, dict | None]:
    """The recipe name and plan counts of a checkpoint's recipe.yaml (None, None when absent or unreadable)."""
    if not path.is_file():
        return None, None
    try:
        recipe = load_recipe(path)
        return recipe.name, recipe.plan(cfg).counts_by_label()
    except (RecipeError, OSError, ValueError):
        return None, None
