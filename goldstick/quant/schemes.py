"""The quantization schemes, each declared once: what it stores, in which format, and which cells run it.

    scheme         label          activations   calibration   mindspore layout (per linear, [out, in] weight)
    float          FLOAT          -             no            weight bf16 [out,in]
    w8a8-static    W8A8           static        yes           weight int8, deq_scale f32 [out], quant_bias int32
                                                              [out], input_scale bf16 [in], input_offset int8 [in],
                                                              optional beta bf16 [in]
    w8a8-dynamic   W8A8_DYNAMIC   dynamic       no            weight int8, weight_scale bf16 [out], weight_offset
                                                              int32 [out] (zeros)
    w8a16          W8A16          -             no            as w8a8-dynamic

Each ``SchemeSpec`` names: the label ``quantization_description.json`` gives its tensors, the tensors it stores
with their safetensors dtypes and shapes (functions of out/in features), its compressed-tensors config group
(``CompressedTensorsGroup``: format, quantization args, stored tensors), whether it needs calibration data, and
its cells: the CPU twin (``goldstick.quant.cells``), the Ascend cell and the Ascend grouped-experts cell
(``goldstick.quant.ascend``). The cells are named by dotted path and imported only when asked for
(``cpu_cell_class()``...): the registry imports no MindSpore, so the streaming path can read it.

The exporter, the verifier, the loader and the cells read these facts from here; a new scheme is a new entry
(plus its cells and, for compressed-tensors, its conversion in ``goldstick.io.export``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from goldstick.quant.numerics import STORED_DTYPES

# scheme names, as recipes spell them
FLOAT = "float"
W8A8_STATIC = "w8a8-static"
W8A8_DYNAMIC = "w8a8-dynamic"
W8A16 = "w8a16"

FLOAT_LABEL = "FLOAT"  # quantization_description.json label of every float tensor

# compressed-tensors formats (``format`` of a config group)
INT_QUANTIZED = "int-quantized"
PACK_QUANTIZED = "pack-quantized"

Shape = Callable[[int, int], tuple]  # (out_features, in_features) -> shape


@dataclass(frozen=True)
class StoredTensor:
    """One tensor a linear stores: safetensors dtype code (``I8``, ``BF16``...) and shape from (out, in).

    ``optional``: may be absent (``beta``: only an OS+ shift that no norm absorbs). ``zero_if_absent``: always
    written, but a loader builds the cell without it as if it held zeros (``weight_offset``)."""

    dtype: str
    shape: Shape
    optional: bool = False
    zero_if_absent: bool = False

    @property
    def numpy_dtype(self) -> np.dtype:
        return STORED_DTYPES[self.dtype]


@dataclass(frozen=True)
class CompressedTensorsGroup:
    """A scheme as a compressed-tensors config group: ``format``, the ``weights`` and ``input_activations``
    quantization args (as ``ModelCompressor.update_config`` writes them) and the tensors a linear stores."""

    format: str
    weights: dict
    input_activations: dict | None
    tensors: dict[str, StoredTensor]
    vllm: str = ""  # the vLLM scheme that serves it

    def layout(self, out_features: int, in_features: int) -> dict[str, tuple[str, tuple]]:
        """Local name -> (dtype code, shape) of one linear."""
        return {k: (t.dtype, t.shape(out_features, in_features)) for k, t in self.tensors.items()}


@dataclass(frozen=True)
class SchemeSpec:
    name: str
    label: str
    summary: str
    activations: str | None  # "static", "dynamic" or None (float, weight-only)
    needs_calibration: bool  # the scheme itself, before any outlier suppression
    tensors: dict[str, StoredTensor]  # the mindspore layout
    compressed_tensors: CompressedTensorsGroup | None = None
    cpu_cell: str | None = None  # "module.Class", imported by cpu_cell_class()
    ascend_cell: str | None = None
    ascend_grouped_cell: str | None = None

    @property
    def quantized(self) -> bool:
        return self.name != FLOAT

    @property
    def static(self) -> bool:
        """Static activations: a calibrated per-tensor range, stored as input_scale / input_offset."""
        return self.activations == "static"

    def layout(self, out_features: int, in_features: int, optional: bool = False) -> dict[str, tuple[str, tuple]]:
        """Local name -> (dtype code, shape) of one linear in the mindspore layout; ``optional``: those only."""
        return {k: (t.dtype, t.shape(out_features, in_features)) for k, t in self.tensors.items()
                if t.optional == optional}

    def needed_to_load(self) -> tuple[str, ...]:
        """The tensors a cell cannot be built without (neither optional nor zeros when absent), in stored order."""
        return tuple(k for k, t in self.tensors.items() if not (t.optional or t.zero_if_absent))

    def cpu_cell_class(self) -> type:
        return _resolve(self.cpu_cell, self.name, "CPU")

    def ascend_cell_class(self) -> type:
        return _resolve(self.ascend_cell, self.name, "Ascend")

    def ascend_grouped_cell_class(self) -> type:
        return _resolve(self.ascend_grouped_cell, self.name, "Ascend grouped-experts")


def _resolve(dotted: str | None, scheme: str, what: str) -> type:
    if dotted is None:
        raise ValueError(f"no {what} cell for scheme {scheme!r}")
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _weight(dtype: str) -> StoredTensor:
    return StoredTensor(dtype, lambda o, i: (o, i))


def _per_out(dtype: str, **kw) -> StoredTensor:
    return StoredTensor(dtype, lambda o, i: (o,), **kw)


def _per_in(dtype: str, **kw) -> StoredTensor:
    return StoredTensor(dtype, lambda o, i: (i,), **kw)


_SCALED_WEIGHT = {"weight": _weight("I8"), "weight_scale": _per_out("BF16"),
                  "weight_offset": _per_out("I32", zero_if_absent=True)}
_INT8_CHANNEL_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                         "strategy": "channel", "dynamic": False, "observer": "minmax"}
_CT_WEIGHT_SCALE = StoredTensor("BF16", lambda o, i: (o, 1))

# in the order messages list them (the verifier's labels: W8A8, W8A8_DYNAMIC, W8A16)
SCHEMES: dict[str, SchemeSpec] = {s.name: s for s in (
    SchemeSpec(FLOAT, FLOAT_LABEL, "kept in bf16", None, False, {"weight": _weight("BF16")}),
    SchemeSpec(
        W8A8_STATIC, "W8A8", "int8 per-channel weight, int8 per-tensor asymmetric activation (calibrated)",
        "static", True,
        {"weight": _weight("I8"), "deq_scale": _per_out("F32"), "quant_bias": _per_out("I32"),
         "input_scale": _per_in("BF16"), "input_offset": _per_in("I8"), "beta": _per_in("BF16", optional=True)},
        CompressedTensorsGroup(
            INT_QUANTIZED, _INT8_CHANNEL_WEIGHTS,
            {"num_bits": 8, "type": "int", "symmetric": False, "group_size": None, "strategy": "tensor",
             "dynamic": False, "observer": "minmax"},
            {"weight_scale": _CT_WEIGHT_SCALE, "weight": _weight("I8"),
             "input_scale": StoredTensor("BF16", lambda o, i: (1,)),
             "input_zero_point": StoredTensor("I8", lambda o, i: (1,))},
            vllm="CompressedTensorsW8A8Int8(is_static_input_scheme=True, input_symmetric=False)"),
        "goldstick.quant.cells.StaticW8A8Linear", "goldstick.quant.ascend.AscendStaticW8A8Linear",
        "goldstick.quant.ascend.AscendGroupedStaticW8A8Linear"),
    SchemeSpec(
        W8A8_DYNAMIC, "W8A8_DYNAMIC", "int8 per-channel weight, int8 per-token symmetric activation (at run time)",
        "dynamic", False, _SCALED_WEIGHT,
        CompressedTensorsGroup(
            INT_QUANTIZED, _INT8_CHANNEL_WEIGHTS,
            {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
             "dynamic": True, "observer": None},
            {"weight_scale": _CT_WEIGHT_SCALE, "weight": _weight("I8")},
            vllm="CompressedTensorsW8A8Int8(is_static_input_scheme=False); the only int8 scheme its fused MoE takes"),
        "goldstick.quant.cells.DynamicW8A8Linear", "goldstick.quant.ascend.AscendDynamicW8A8Linear",
        "goldstick.quant.ascend.AscendGroupedDynamicW8A8Linear"),
    SchemeSpec(
        W8A16, "W8A16", "int8 per-channel weight, bf16 activation", None, False, _SCALED_WEIGHT,
        CompressedTensorsGroup(
            PACK_QUANTIZED, _INT8_CHANNEL_WEIGHTS, None,
            {"weight_scale": _CT_WEIGHT_SCALE, "weight_packed": StoredTensor("I32", lambda o, i: (o, -(-i // 4))),
             "weight_shape": StoredTensor("I64", lambda o, i: (2,))},
            vllm="CompressedTensorsWNA16 (dense) / CompressedTensorsWNA16(Marlin)MoEMethod"),
        "goldstick.quant.cells.W8A16Linear", "goldstick.quant.ascend.AscendW8A16Linear",
        "goldstick.quant.ascend.AscendGroupedW8A16Linear"),
)}

QUANTIZED = tuple(name for name, s in SCHEMES.items() if s.quantized)
DATA_FREE = tuple(name for name, s in SCHEMES.items() if not s.needs_calibration)
# quantization_description.json label <-> scheme name, quantized schemes only (FLOAT is no linear's scheme label)
LABEL_TO_SCHEME = {SCHEMES[name].label: name for name in QUANTIZED}
SCHEME_TO_LABEL = {name: SCHEMES[name].label for name in QUANTIZED}


def quantized_by_label(label: str) -> SchemeSpec | None:
    """The quantized scheme a description label names (None for FLOAT or an unknown label)."""
    name = LABEL_TO_SCHEME.get(label)
    return None if name is None else SCHEMES[name]


def mindspore_dtypes() -> dict[str, np.dtype]:
    """Local tensor name -> numpy storage dtype, over every quantized scheme (a local name has one dtype in all of
    them: tests/test_export.py checks it)."""
    return {local: t.numpy_dtype for name in QUANTIZED for local, t in SCHEMES[name].tensors.items()}
