"""The ``ascend`` backend: each quantized linear as the Ascend kernels that serve it, holding the stored tensors.

The cells take exactly the tensors of the export contract (notes/golden-stick.md §2.1, §3.2; ``goldstick.quant.schemes``
names them per scheme, with this module's cell for each), the same ones the CPU twins of ``goldstick.quant.cells``
hold, under the same names. Where the CPU twins do the integer arithmetic with float ops,
these cells call the ops Golden-Stick's deploy network and MindFormers/vllm-mindspore use on Ascend:

    scheme         cell                         ops
    w8a8-static    AscendStaticW8A8Linear       (Add beta) -> QuantV2 -> QuantBatchMatmul(transpose_x2=True)
    w8a8-dynamic   AscendDynamicW8A8Linear      DynamicQuantExt -> QuantBatchMatmul(..., per-token scale)
    w8a16          AscendW8A16Linear            WeightQuantBatchMatmul(transpose_weight=True)
    routed experts AscendRoutedExperts          three AscendGrouped*Linear: GroupedMatmulV4 over the tokens
                                                sorted by expert, group_list = tokens per expert

``goldstick.load_model(path, backend="ascend")`` swaps in one dense cell per stored linear (routed experts too, run
by the MoE's per-expert loop); ``group_routed_experts(net)`` then replaces each MoE layer's loop by one
``AscendRoutedExperts`` whose parameters are the experts' tensors stacked.

None of these ops has a CPU kernel in MindSpore 2.10 ("The kernel QuantV2 unregistered."), so here the cells are
built and inspected but not run; tests/test_ascend.py checks them and compares them, through a numpy emulation of
each op's documented semantics, with the CPU twins.

Op signatures, read from the installed MindSpore 2.10.0 (``inspect.signature`` and the docstrings in
``mindspore/ops/auto_generate/gen_ops_prim.py`` / ``gen_ops_def.py``; the wheel ships no op yaml):

* ``QuantV2()(x, scale, offset, sqrt_mode=False, rounding_mode='ROUND', dst_type=int8)``. The docstring gives the
  aclnn formula ``y = round(scale * x + offset)`` with ``offset`` in x's dtype (aclnnAscendQuantV3). With an
  **int8** offset the internal (ASD) kernel runs instead and its scale is a *divisor*: ``y = round(x / scale +
  offset)``. Golden-Stick 1.4.1 ``ptq/ptq/hal.py::QuantWithSmoothHighPerformance`` stores ``1/scale`` only when the
  zero point is not int8 ("input_scale need divide 1 for aclnn quant ops"); MindFormers
  ``quantization/golden_stick/a8w8.py`` feeds the GS-format bf16 [ic] scale and int8 [ic] offset as stored and
  inverts only the msModelSlim (1,) scale. The checkpoint's ``input_scale`` is the divisor, so it goes in as stored.
  (That convention comes from those two callers, not from MindSpore's docs; nor do the docs say how "ROUND" breaks
  ties. The CPU twins round half to even.)
* ``QuantBatchMatmul(transpose_x1=False, transpose_x2=False, dtype=float16)(x1, x2, scale, offset=None, bias=None,
  pertokenScaleOptional=None)``: ``(x1 @ x2^T + bias_int32) * scale [* pertoken]``. bf16 output takes an fp32
  ``scale``; fp16 output takes the int64-packed form (``pack_deq_scale_int64``, GS ``_compute_dequant_scale``).
* ``DynamicQuantExt()(x, smooth_scales=None) -> (y int8, scale fp32 of shape x.shape[:-1])`` with
  ``scale = max|x| / 127`` per row and ``y = round(x / scale)``.
* ``WeightQuantBatchMatmul(transpose_x=False, transpose_weight=False, antiquant_group_size=0)(x, weight,
  antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None, bias=None)``:
  ``y = x @ ((weight + antiquant_offset) * antiquant_scale)`` (aclnnWeightQuantBatchMatmulV2). The *graph* offset is
  added, so it is ``-zp``; the checkpoint's ``weight_offset`` is the zero point itself (GS mcore export
  ``w_qparam.zero_point``, dequantized as ``(w - offset) * scale``), hence ``antiquant_offset = -weight_offset``
  (GS ``hal.py::WeightQuantMatmul``: ``w_qparam.zero_point.asnumpy() * -1``).
* ``GroupedMatmulV4()(x, weight, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
  pre_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
  activation_quant_offset=None, split_item=0, group_type=-1, group_list_type=0, act_type=0, output_dtype=None)``:
  TensorList arguments; ``split_item=3, group_type=0`` takes one x [M, K], one weight [E, K, N] and an int64
  ``group_list`` [E]; ``group_list_type=1`` means group sizes (not cumulative ends). Per-token quant: x int8,
  weight int8, scale bf16 [E, N], pre_token_scale fp32 [M] -> bf16. Antiquant: x bf16, weight int8,
  antiquant_scale/offset bf16 [E, N] -> bf16. Static (GS ``AllQuantMatmulHighPerformance``, not in the docstring's
  tables): bias int32 [E, N], scale = deq_scale in **bf16** [E, N], no per-token scale. Calls as in GS
  ``hal.py`` and MindFormers ``golden_stick/a8dynw8.py``.

All cells compute in ``compute_dtype`` (bf16 by default, the dtype the contract's scales are stored in), cast their
input to it and their output back to the input's dtype, so they drop into the float32 network of
``goldstick.model.network``.
"""

from __future__ import annotations

import mindspore as ms
import ml_dtypes
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.auto_generate import (
    DynamicQuantExt,
    GroupedMatmulV4,
    QuantBatchMatmul,
    QuantV2,
    WeightQuantBatchMatmul,
)

from goldstick.model.network import MoE
from goldstick.quant.cells import quantv2_multiplier
from goldstick.quant.schemes import SCHEMES, W8A8_DYNAMIC, W8A8_STATIC, W8A16

BF16 = ms.bfloat16
_NUMPY_DTYPE = {ms.bfloat16: np.dtype(ml_dtypes.bfloat16), ms.float16: np.dtype(np.float16)}
COMPUTE_DTYPES = tuple(_NUMPY_DTYPE)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------ helpers
def pack_deq_scale_int64(deq_scale: np.ndarray) -> np.ndarray:
    """fp32 deq_scale -> the int64 form of the fp16-output kernels: the fp32 bit pattern as uint32, widened to int64
    (GS 1.4.1 ``NumpyQuantOps.trans_fp32_to_i64``; 310P serving converts at load time the same way)."""
    return np.ascontiguousarray(deq_scale, dtype=np.float32).view(np.uint32).astype(np.int64)


def unpack_deq_scale_int64(packed: np.ndarray) -> np.ndarray:
    """Inverse of ``pack_deq_scale_int64``."""
    return (np.asarray(packed, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def _param(array: np.ndarray, name: str) -> Parameter:
    return Parameter(Tensor(np.ascontiguousarray(array)), name=name, requires_grad=False)


def _stored(tensors: dict, key: str, dtype, shape: tuple[int, ...], owner: str) -> np.ndarray:
    """``tensors[key]`` in ``dtype`` with ``shape`` ([oc, 1] scales, msModelSlim's form, are accepted for [oc])."""
    array = np.asarray(tensors[key])
    if array.shape != shape:
        if array.size == int(np.prod(shape)) and [d for d in array.shape if d != 1] == [d for d in shape if d != 1]:
            array = array.reshape(shape)
        else:
            raise ValueError(f"{owner}.{key}: shape {array.shape}, expected {shape}")
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        if array.dtype.kind == "f" and not np.array_equal(array, np.rint(array)):
            raise ValueError(f"{owner}.{key}: {dtype} values expected, found non-integers")
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(f"{owner}.{key}: values outside the {dtype} range")
        return np.ascontiguousarray(array.astype(np.int64).astype(dtype))
    return np.ascontiguousarray(array.astype(np.float32).astype(dtype) if array.dtype != dtype else array)


def _check_compute_dtype(compute_dtype) -> None:
    if compute_dtype not in _NUMPY_DTYPE:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")


def _dense_deq_scale(deq_scale: np.ndarray, compute_dtype) -> np.ndarray:
    """QuantBatchMatmul's scale: fp32 for bf16 output (the stored form), int64-packed for fp16 output."""
    return deq_scale.astype(np.float32) if compute_dtype == BF16 else pack_deq_scale_int64(deq_scale)


def _grouped_deq_scale(deq_scale: np.ndarray, compute_dtype) -> np.ndarray:
    """GroupedMatmulV4's static scale: bf16 for bf16 output, int64-packed for fp16 output
    (GS AllQuantMatmulHighPerformance)."""
    if compute_dtype == BF16:
        return deq_scale.astype(np.float32).astype(ml_dtypes.bfloat16)
    return pack_deq_scale_int64(deq_scale)


def _dynamic_scale_dtype(compute_dtype) -> np.dtype:
    """Per-channel weight scale of the per-token path: bf16 with bf16 output, else fp32 (MindFormers a8dynw8)."""
    return np.dtype(ml_dtypes.bfloat16) if compute_dtype == BF16 else np.dtype(np.float32)


# ------------------------------------------------------------------------------------------------ dense linears
class AscendQuantLinear(nn.Cell):
    """Base: flattens the input to [tokens, in], casts it to the compute dtype, and the output back."""

    scheme = ""  # a name of goldstick.quant.schemes
    description = ""  # quantization_description.json label: the scheme's
    kernels: tuple[str, ...] = ()  # attributes holding the Ascend primitives, in call order

    def __init__(self, in_features: int, out_features: int, compute_dtype):
        super().__init__()
        _check_compute_dtype(compute_dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], name: str, compute_dtype=BF16) -> AscendQuantLinear:
        """The cell of one stored linear; ``tensors`` maps local names to the arrays as stored. A stored tensor the
        scheme does not name is an error rather than silently dropped."""
        unknown = sorted(set(tensors) - set(SCHEMES[cls.scheme].tensors))
        if unknown:
            raise ValueError(f"{name}: a {cls.scheme} linear has no tensor {', '.join(unknown)}")
        return cls._from_known(tensors, name, compute_dtype)

    @classmethod
    def _from_known(cls, tensors: dict[str, np.ndarray], name: str, compute_dtype) -> AscendQuantLinear:
        """w8a16 and dynamic W8A8 store the same three tensors (weight_offset may be absent: zeros)."""
        return cls(tensors["weight"], tensors["weight_scale"], tensors.get("weight_offset"),
                   compute_dtype=compute_dtype, name=name)

    def tensors(self) -> dict[str, np.ndarray]:
        """Local name -> the array this cell holds (the stored tensor, in the op's dtype)."""
        return {p.name.rsplit(".", 1)[-1]: p.asnumpy() for p in self.get_parameters()}

    def construct(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self.forward_2d(x.reshape(-1, self.in_features).astype(self.compute_dtype))
        return y.reshape(*lead, self.out_features).astype(x.dtype)

    def _set_scaled_weight(self, weight, weight_scale, weight_offset, scale_dtype, name: str) -> None:
        """weight int8 [out, in], weight_scale [out] in ``scale_dtype``, weight_offset int32 [out] (zeros if absent),
        each checked against the contract (w8a16 and dynamic W8A8 store the same three tensors)."""
        out_features, in_features = self.out_features, self.in_features
        t = {"weight": weight, "weight_scale": weight_scale,
             "weight_offset": np.zeros(out_features, np.int32) if weight_offset is None else weight_offset}
        self.weight = _param(_stored(t, "weight", np.int8, (out_features, in_features), name), "weight")
        self.weight_scale = _param(_stored(t, "weight_scale", scale_dtype, (out_features,), name), "weight_scale")
        self.weight_offset = _param(_stored(t, "weight_offset", np.int32, (out_features,), name), "weight_offset")

    def forward_2d(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class AscendStaticW8A8Linear(AscendQuantLinear):
    """Static W8A8: qx = QuantV2(x + beta, input_scale, input_offset); y = QuantBatchMatmul(qx, W, deq_scale, bias).

    Parameters (bf16 compute): weight int8 [out, in], deq_scale fp32 [out] (int64-packed with fp16 compute),
    quant_bias int32 [out], input_scale bf16 [in] (a divisor, see the module notes), input_offset int8 [in] and,
    when the checkpoint has one, beta bf16 [in], the OS+ shift added before QuantV2 (MindFormers a8w8.py, modelslim
    branch). The forward is MindFormers' ``A8W8LinearMethod.apply`` without the ms_custom_ops NZ weight.
    """

    scheme = W8A8_STATIC
    description = SCHEMES[W8A8_STATIC].label
    kernels = ("quant", "qbmm")

    def __init__(self, weight: np.ndarray, deq_scale: np.ndarray, quant_bias: np.ndarray, input_scale: np.ndarray,
                 input_offset: np.ndarray, beta: np.ndarray | None = None, compute_dtype=BF16, name: str = ""):
        out_features, in_features = np.shape(weight)
        super().__init__(in_features, out_features, compute_dtype)
        t = {"weight": weight, "deq_scale": deq_scale, "quant_bias": quant_bias, "input_scale": input_scale,
             "input_offset": input_offset}
        cdt = _NUMPY_DTYPE[compute_dtype]
        self.weight = _param(_stored(t, "weight", np.int8, (out_features, in_features), name), "weight")
        deq = _stored(t, "deq_scale", np.float32, (out_features,), name)
        self.deq_scale = _param(_dense_deq_scale(deq, compute_dtype), "deq_scale")
        self.quant_bias = _param(_stored(t, "quant_bias", np.int32, (out_features,), name), "quant_bias")
        # the ascend layout (input_scale [1], a true scale): MindFormers' modelslim branch, inverted in bf16 and a
        # float offset, which makes QuantV2 aclnnAscendQuant's round(x * scale + offset) (a8w8.py:81-90, 112-118)
        self.per_tensor = np.size(input_scale) == 1
        if self.per_tensor:
            self.stored_input_scale = np.asarray(input_scale, np.float32).reshape(1)
            inverse = quantv2_multiplier(self.stored_input_scale)
            self.input_scale = _param(inverse.astype(cdt), "input_scale")
            self.input_offset = _param(_stored(t, "input_offset", cdt, (1,), name), "input_offset")
        else:
            self.input_scale = _param(_stored(t, "input_scale", cdt, (in_features,), name), "input_scale")
            self.input_offset = _param(_stored(t, "input_offset", np.int8, (in_features,), name), "input_offset")
        self.has_beta = beta is not None
        if self.has_beta:
            self.beta = _param(_stored({"beta": beta}, "beta", cdt, (in_features,), name), "beta")
        self.quant = QuantV2()
        self.qbmm = QuantBatchMatmul(transpose_x1=False, transpose_x2=True, dtype=compute_dtype)

    @classmethod
    def _from_known(cls, tensors: dict[str, np.ndarray], name: str, compute_dtype) -> AscendStaticW8A8Linear:
        return cls(tensors["weight"], tensors["deq_scale"], tensors["quant_bias"], tensors["input_scale"],
                   tensors["input_offset"], tensors.get("beta"), compute_dtype=compute_dtype, name=name)

    def tensors(self) -> dict[str, np.ndarray]:
        out = super().tensors()
        if out["deq_scale"].dtype == np.int64:  # fp16 compute: back to the stored fp32
            out["deq_scale"] = unpack_deq_scale_int64(out["deq_scale"])
        if self.per_tensor:  # the op holds its bf16 inverse
            out["input_scale"] = self.stored_input_scale
        return out

    def forward_2d(self, x: Tensor) -> Tensor:
        if self.has_beta:
            x = ops.add(x, self.beta)
        qx = self.quant(x, self.input_scale, self.input_offset, False, "ROUND", ms.int8)
        return self.qbmm(qx, self.weight, self.deq_scale, None, self.quant_bias, None)


class AscendDynamicW8A8Linear(AscendQuantLinear):
    """Dynamic per-token W8A8: (qx, s) = DynamicQuantExt(x); y = QuantBatchMatmul(qx, W, weight_scale, pertoken=s).

    Parameters: weight int8 [out, in], weight_scale bf16 [out] (fp32 with fp16 compute), weight_offset int32 [out]
    (zeros: symmetric weights; held so the cell carries every stored tensor). MindFormers
    ``A8W8DynamicLinearMethod.apply`` (dense branch).
    """

    scheme = W8A8_DYNAMIC
    description = SCHEMES[W8A8_DYNAMIC].label
    kernels = ("dynamic_quant", "qbmm")

    def __init__(self, weight: np.ndarray, weight_scale: np.ndarray, weight_offset: np.ndarray | None = None,
                 compute_dtype=BF16, name: str = ""):
        super().__init__(np.shape(weight)[1], np.shape(weight)[0], compute_dtype)
        self._set_scaled_weight(weight, weight_scale, weight_offset, _dynamic_scale_dtype(compute_dtype), name)
        self.dynamic_quant = DynamicQuantExt()
        self.qbmm = QuantBatchMatmul(transpose_x1=False, transpose_x2=True, dtype=compute_dtype)

    def forward_2d(self, x: Tensor) -> Tensor:
        qx, token_scale = self.dynamic_quant(x, None)
        return self.qbmm(qx, self.weight, self.weight_scale, None, None, token_scale.reshape(-1))


class AscendW8A16Linear(AscendQuantLinear):
    """Weight-only int8: y = WeightQuantBatchMatmul(x, W, weight_scale, -weight_offset) = x @ ((W - zp) * scale)^T.

    Parameters: weight int8 [out, in], weight_scale bf16 [out] (the compute dtype), weight_offset int32 [out] as
    stored (the zero point; the op gets its negation, the graph's antiquant offset). GS ``WeightQuantMatmul``.
    """

    scheme = W8A16
    description = SCHEMES[W8A16].label
    kernels = ("wqbmm",)

    def __init__(self, weight: np.ndarray, weight_scale: np.ndarray, weight_offset: np.ndarray | None = None,
                 compute_dtype=BF16, name: str = ""):
        super().__init__(np.shape(weight)[1], np.shape(weight)[0], compute_dtype)
        self._set_scaled_weight(weight, weight_scale, weight_offset, _NUMPY_DTYPE[compute_dtype], name)
        self.wqbmm = WeightQuantBatchMatmul(transpose_x=False, transpose_weight=True, antiquant_group_size=0)

    def antiquant_offset(self) -> Tensor:
        """-zp in the compute dtype: what WeightQuantBatchMatmul adds to the int8 weight (negated in int32)."""
        return ops.neg(self.weight_offset).astype(self.compute_dtype)

    def forward_2d(self, x: Tensor) -> Tensor:
        return self.wqbmm(x, self.weight, self.weight_scale, self.antiquant_offset(), None, None, None)


def ascend_cell_from_tensors(scheme: str, tensors: dict[str, np.ndarray], name: str,
                             compute_dtype=BF16) -> AscendQuantLinear:
    """The Ascend cell of one stored linear of ``scheme`` (``AscendQuantLinear.from_tensors``)."""
    spec = SCHEMES.get(scheme)
    if spec is None or spec.ascend_cell is None:
        raise ValueError(f"{name}: no Ascend cell for scheme {scheme!r}")
    return spec.ascend_cell_class().from_tensors(tensors, name, compute_dtype)


# ------------------------------------------------------------------------------------------------ grouped experts
def _stack(per_expert: list[dict], key: str, dtype, shape: tuple[int, ...], owner: str,
           default=None) -> np.ndarray:
    rows = []
    for e, tensors in enumerate(per_expert):
        if key not in tensors:
            if default is None:
                raise ValueError(f"{owner}: expert {e} has no {key}")
            tensors = {key: np.full(shape, default)}
        rows.append(_stored(tensors, key, dtype, shape, f"{owner}[expert {e}]"))
    return np.stack(rows)


class AscendGroupedLinear(nn.Cell):
    """One projection of all E routed experts: weight int8 [E, in, out] (GroupedMatmulV4 wants (E, K, N), so each
    stored [out, in] weight is transposed), per-expert vectors stacked to [E, out] / [E, in].

    ``construct(x, group_list)``: x [M, in], the tokens sorted by expert; group_list int64 [E], tokens per expert.
    """

    scheme = ""
    description = ""
    kernels: tuple[str, ...] = ()

    def __init__(self, per_expert: list[dict[str, np.ndarray]], compute_dtype, name: str):
        super().__init__()
        _check_compute_dtype(compute_dtype)
        if not per_expert:
            raise ValueError(f"{name}: no experts")
        out_features, in_features = np.shape(per_expert[0]["weight"])
        self.num_experts = len(per_expert)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        weights = _stack(per_expert, "weight", np.int8, (out_features, in_features), name)
        self.weight = _param(weights.transpose(0, 2, 1), "weight")
        self.gmm = GroupedMatmulV4()

    def tensors(self) -> dict[str, np.ndarray]:
        return {p.name.rsplit(".", 1)[-1]: p.asnumpy() for p in self.get_parameters()}

    def expert_tensors(self, e: int) -> dict[str, np.ndarray]:
        """Expert ``e``'s tensors back in the per-expert stored layout (weight [out, in])."""
        out = {k: v[e] for k, v in self.tensors().items()}
        out["weight"] = np.ascontiguousarray(out["weight"].T)
        return out

    def construct(self, x: Tensor, group_list: Tensor) -> Tensor:
        return self.forward_grouped(x.astype(self.compute_dtype), group_list).astype(x.dtype)

    def _gmm(self, x, bias=None, scale=None, antiquant_scale=None, antiquant_offset=None, per_token_scale=None,
             group_list=None) -> Tensor:
        listed = [None if t is None else [t] for t in (bias, scale, antiquant_scale, antiquant_offset,
                                                           per_token_scale)]
        bias, scale, antiquant_scale, antiquant_offset, per_token_scale = listed
        return self.gmm([x], [self.weight], bias, scale, None, antiquant_scale, antiquant_offset, per_token_scale,
                        group_list, split_item=3, group_type=0, group_list_type=1)[0]


class AscendGroupedStaticW8A8Linear(AscendGroupedLinear):
    """Static W8A8 experts. Each expert keeps its own input_scale / input_offset / beta ([E, in]; goldstick calibrates
    experts separately), so each expert's rows are quantized by their own QuantV2 call; when all experts share them
    (Golden-Stick calibrates the dispatched matrix jointly) one QuantV2 covers the whole matrix. Then one
    GroupedMatmulV4 with bias = quant_bias int32 [E, out] and scale = deq_scale bf16 [E, out] (the op's dtype for bf16
    output: the stored fp32 deq_scale is rounded to bf16, a relative change of at most 2^-9)."""

    scheme = W8A8_STATIC
    description = SCHEMES[W8A8_STATIC].label
    kernels = ("quant", "gmm")

    def __init__(self, per_expert, compute_dtype=BF16, name: str = ""):
        super().__init__(per_expert, compute_dtype, name)
        n, k = self.out_features, self.in_features
        cdt = _NUMPY_DTYPE[compute_dtype]
        deq = _stack(per_expert, "deq_scale", np.float32, (n,), name)
        self.deq_scale = _param(_grouped_deq_scale(deq, compute_dtype), "deq_scale")
        self.quant_bias = _param(_stack(per_expert, "quant_bias", np.int32, (n,), name), "quant_bias")
        scale = _stack(per_expert, "input_scale", cdt, (k,), name)
        offset = _stack(per_expert, "input_offset", np.int8, (k,), name)
        self.input_scale = _param(scale, "input_scale")
        self.input_offset = _param(offset, "input_offset")
        self.has_beta = any("beta" in t for t in per_expert)
        beta = _stack(per_expert, "beta", cdt, (k,), name, default=0.0) if self.has_beta else None
        if self.has_beta:
            self.beta = _param(beta, "beta")
        self.shared_input_quant = bool(
            (scale == scale[0]).all() and (offset == offset[0]).all() and (beta is None or (beta == beta[0]).all()))
        self.quant = QuantV2()

    def _quant_rows(self, x: Tensor, e: int) -> Tensor:
        if self.has_beta:
            x = ops.add(x, self.beta[e])
        return self.quant(x, self.input_scale[e], self.input_offset[e], False, "ROUND", ms.int8)

    def forward_grouped(self, x: Tensor, group_list: Tensor) -> Tensor:
        if self.shared_input_quant:
            qx = self._quant_rows(x, 0)
        else:  # the group sizes are needed on the host to slice the rows of each expert
            pieces, start = [], 0
            for e, count in enumerate(group_list.asnumpy().tolist()):
                if count:
                    pieces.append(self._quant_rows(x[start:start + count], e))
                    start += count
            qx = ops.cat(pieces, 0)
        return self._gmm(qx, bias=self.quant_bias, scale=self.deq_scale, group_list=group_list)


class AscendGroupedDynamicW8A8Linear(AscendGroupedLinear):
    """Dynamic W8A8 experts: DynamicQuantExt on the dispatched matrix, then GroupedMatmulV4 with scale =
    weight_scale bf16 [E, out] and the per-token scale (MindFormers ``A8W8DynamicLinearMethod``, grouped branch)."""

    scheme = W8A8_DYNAMIC
    description = SCHEMES[W8A8_DYNAMIC].label
    kernels = ("dynamic_quant", "gmm")

    def __init__(self, per_expert, compute_dtype=BF16, name: str = ""):
        super().__init__(per_expert, compute_dtype, name)
        n = self.out_features
        self.weight_scale = _param(_stack(per_expert, "weight_scale", _dynamic_scale_dtype(compute_dtype), (n,),
                                          name), "weight_scale")
        self.weight_offset = _param(_stack(per_expert, "weight_offset", np.int32, (n,), name, default=0),
                                    "weight_offset")
        self.dynamic_quant = DynamicQuantExt()

    def forward_grouped(self, x: Tensor, group_list: Tensor) -> Tensor:
        qx, token_scale = self.dynamic_quant(x, None)
        return self._gmm(qx, scale=self.weight_scale, per_token_scale=token_scale.reshape(-1),
                         group_list=group_list)


class AscendGroupedW8A16Linear(AscendGroupedLinear):
    """Weight-only experts: GroupedMatmulV4 antiquant with weight_scale [E, out] and -weight_offset [E, out] in the
    compute dtype (GS ``WeightQuantMatmul``, grouped branch)."""

    scheme = W8A16
    description = SCHEMES[W8A16].label
    kernels = ("gmm",)

    def __init__(self, per_expert, compute_dtype=BF16, name: str = ""):
        super().__init__(per_expert, compute_dtype, name)
        n = self.out_features
        self.weight_scale = _param(_stack(per_expert, "weight_scale", _NUMPY_DTYPE[compute_dtype], (n,), name),
                                   "weight_scale")
        self.weight_offset = _param(_stack(per_expert, "weight_offset", np.int32, (n,), name, default=0),
                                    "weight_offset")

    def forward_grouped(self, x: Tensor, group_list: Tensor) -> Tensor:
        offset = ops.neg(self.weight_offset).astype(self.compute_dtype)
        return self._gmm(x, antiquant_scale=self.weight_scale, antiquant_offset=offset, group_list=group_list)


class AscendRoutedExperts(nn.Cell):
    """The routed experts of one MoE layer in place of the per-expert loop: gate/up/down as grouped matmuls.

    ``construct(x, weights, ids)``: x [T, hidden], the router's weights and expert ids [T, k]. The T*k (token,
    expert) pairs are sorted by expert (argsort), their token rows gathered, group_list = bincount of the ids
    (int64, group_list_type=1), SwiGLU through the three grouped projections, and each row, times its routing
    weight, added back to its token (index_add). Every step is a device op, no host round trip, except the static
    experts' per-expert quantization, which reads the group sizes.
    """

    def __init__(self, gate_proj: AscendGroupedLinear, up_proj: AscendGroupedLinear, down_proj: AscendGroupedLinear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.num_experts = gate_proj.num_experts

    def construct(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        k = ids.shape[-1]
        flat_ids = ids.reshape(-1).astype(ms.int32)
        order = ops.argsort(flat_ids).astype(ms.int32)  # (token, slot) pairs grouped by expert
        tokens = ops.floor_div(order, k)
        group_list = ops.bincount(flat_ids, minlength=self.num_experts).astype(ms.int64)
        xs = ops.gather(x, tokens, 0)
        h = ops.silu(self.gate_proj(xs, group_list)) * self.up_proj(xs, group_list)
        y = self.down_proj(h, group_list) * ops.gather(weights.reshape(-1), order, 0).reshape(-1, 1)
        return ops.index_add(ops.zeros_like(x), tokens, y, 0)


def group_routed_experts(net: nn.Cell) -> list[str]:
    """Replace, in every MoE layer whose routed experts are Ascend cells, the per-expert loop with one
    ``AscendRoutedExperts``; returns the converted ``...mlp`` names.

    The grouped parameters are named ``<layer>.mlp.experts.<proj>.<tensor>`` (the expert index dropped, as
    MindFormers' ``experts\\.\\d+`` -> ``experts`` mapping does), e.g. ``model.layers.3.mlp.experts.up_proj.weight``
    [E, in, out]; ``expert_tensors(e)`` gives expert e's stored tensors back. Layers whose experts are float or
    CPU-twin cells are left as they are.
    """
    targets = [(name, cell) for name, cell in net.cells_and_names() if isinstance(cell, MoE) and not cell.grouped]
    converted = []
    for name, moe in targets:
        projections = {}
        for proj in PROJECTIONS:
            linears = [getattr(expert, proj) for expert in moe.experts]
            if not all(isinstance(lin, AscendQuantLinear) for lin in linears):
                break
            schemes = {lin.scheme for lin in linears}
            dtypes = {lin.compute_dtype for lin in linears}
            if len(schemes) != 1 or len(dtypes) != 1:
                raise ValueError(f"{name}.experts.*.{proj}: experts mix schemes {sorted(schemes)} / compute dtypes; "
                                 f"a grouped matmul needs one")
            cls = SCHEMES[schemes.pop()].ascend_grouped_cell_class()
            projections[proj] = cls([lin.tensors() for lin in linears], compute_dtype=dtypes.pop(),
                                    name=f"{name}.experts.{proj}")
        if len(projections) != len(PROJECTIONS):
            continue
        grouped = AscendRoutedExperts(**projections)
        moe.experts = grouped
        moe.grouped = True
        for local, param in grouped.parameters_and_names():
            param.name = f"{name}.experts.{local}"
        converted.append(name)
    return converted
