"""Quantized linear cells: the CPU twin of the Ascend kernels, doing the same integer arithmetic exactly.

Each cell holds exactly the tensors the Golden-Stick / vllm-mindspore export contract names
(notes/golden-stick.md §2.1, §3.2; their dtypes and shapes: ``goldstick.quant.schemes``), under the linear's HF
name, so the cell's parameters *are* the checkpoint:

    scheme         tensors                                                        Ascend path
    w8a16          weight int8 [out,in], weight_scale [out], weight_offset [out]  WeightQuantBatchMatmul
    w8a8-static    weight int8, deq_scale f32 [out], quant_bias int32 [out],      QuantV2 + QuantBatchMatmul
                   input_scale [in], input_offset int8 [in], (beta [in])
    w8a8-dynamic   weight int8, weight_scale [out], weight_offset [out]           DynamicQuant + QuantBatchMatmul

Integer products are formed in float32 from int8-valued operands. Every product is an integer of magnitude
<= 128*127 and fp32 holds integers exactly up to 2^24, so the accumulation is exact while
in_features * 128 * 127 < 2^24 (in_features <= 1032) and, beyond that, while the actual partial sums stay
below 2^24 — ``exact_accumulation_bound`` states the guarantee and tests check it against an int64 reference.
Rounding is round-half-to-even (``ops.round`` / ``np.rint``), the Ascend "ROUND" mode for QuantV2/DynamicQuant.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from goldstick.model.network import unflatten
from goldstick.quant.schemes import LABEL_TO_SCHEME, SCHEMES, W8A8_DYNAMIC, W8A8_STATIC, W8A16, quantized_by_label

INT8_MIN, INT8_MAX = -128, 127
FP32_EXACT_INT = 2 ** 24
BF16 = ml_dtypes.bfloat16


def exact_accumulation_bound(in_features: int) -> bool:
    """True when any int8 x int8 dot product of this length is exact in float32."""
    return in_features * 128 * 127 < FP32_EXACT_INT


def _p(array: np.ndarray, name: str) -> Parameter:
    return Parameter(Tensor(np.ascontiguousarray(array)), name=name, requires_grad=False)


class QuantLinearBase(nn.Cell):
    scheme = ""  # a name of goldstick.quant.schemes
    description = ""  # quantization_description.json label: the scheme's
    storage: dict = {}  # local name -> storage dtype where it differs from the scheme registry's

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.matmul = ops.MatMul(transpose_b=True)
        self._weight_f32 = None  # the int8 weight as float32, made once (a cast per call would dominate decoding)
        # False: cast per call instead (the engine's calibration network: big batches make the cast ~2% of the
        # matmul, and a cached copy would hold every weight of a layer in float32, 4x its int8 size)
        self.cache_weight = True

    def weight_as_float(self) -> Tensor:
        if self._weight_f32 is not None:
            return self._weight_f32
        w = Tensor.from_numpy(self._float_weight())
        if self.cache_weight:
            self._weight_f32 = w
        return w

    def _float_weight(self) -> np.ndarray:
        """The matmul operand as a float32 array: the int8 codes (cast by numpy, cheaper than MindSpore's cast)."""
        return self.weight.asnumpy().astype(np.float32)

    def reset_cache(self) -> None:
        self._weight_f32 = None

    def tensors(self) -> dict[str, np.ndarray]:
        """Local name -> stored array, as written to the checkpoint."""
        return {p.name.rsplit(".", 1)[-1]: p.asnumpy() for p in self.get_parameters()}

    def _flat(self, x: Tensor) -> tuple[Tensor, tuple]:
        return x.reshape(-1, self.in_features), x.shape[:-1]


class ScaledWeightLinear(QuantLinearBase):
    """A linear whose int8 weight carries its own per-channel scale (w8a16 and w8a8-dynamic): weight int8
    [out, in], weight_scale [out], weight_offset [out] (zeros: symmetric)."""

    def __init__(self, weight: np.ndarray, weight_scale: np.ndarray):
        super().__init__(weight.shape[1], weight.shape[0])
        self.weight = _p(weight.astype(np.int8), "weight")
        self.weight_scale = _p(weight_scale.astype(np.float32), "weight_scale")
        self.weight_offset = _p(np.zeros(weight.shape[0], np.float32), "weight_offset")

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> ScaledWeightLinear:
        """From the stored tensors (``weight_offset``, zeros, is not read)."""
        return cls(tensors["weight"], np.asarray(tensors["weight_scale"]).astype(np.float32).reshape(-1))


class W8A16Linear(ScaledWeightLinear):
    """Weight-only int8: y = x @ (weight * weight_scale).T (antiquant, then a float matmul)."""

    scheme = W8A16
    description = SCHEMES[W8A16].label

    def _float_weight(self) -> np.ndarray:
        """Antiquantized: (codes + offset) * scale, the same float32 operations as the ops, in numpy."""
        w = super()._float_weight()
        w += self.weight_offset.asnumpy().reshape(-1, 1)
        w *= self.weight_scale.asnumpy().reshape(-1, 1)
        return w

    def construct(self, x: Tensor) -> Tensor:
        flat, lead = self._flat(x)
        return unflatten(self.matmul(flat, self.weight_as_float()), lead)


class StaticW8A8Linear(QuantLinearBase):
    """Static W8A8: x_q = clip(round((x + beta) / input_scale + input_offset));
    y = (x_q @ W_q.T + quant_bias) * deq_scale.

    input_scale is per input channel: the per-tensor activation scale times any smoothing factor that was not
    folded into a norm. quant_bias carries the zero-point correction -offset*sum(W_q) and the OS+ shift term.
    ``beta`` is the OS+ shift for a linear that no norm feeds (zeros otherwise; Ascend adds it before QuantV2).
    """

    scheme = W8A8_STATIC
    description = SCHEMES[W8A8_STATIC].label

    def __init__(self, weight: np.ndarray, deq_scale: np.ndarray, quant_bias: np.ndarray, input_scale: np.ndarray,
                 input_offset: np.ndarray, beta: np.ndarray | None = None):
        super().__init__(weight.shape[1], weight.shape[0])
        self.weight = _p(weight.astype(np.int8), "weight")
        self.deq_scale = _p(deq_scale.astype(np.float32), "deq_scale")
        self.quant_bias = _p(quant_bias.astype(np.int32), "quant_bias")
        self.input_scale = _p(input_scale.astype(np.float32), "input_scale")
        self.input_offset = _p(input_offset.astype(np.int8), "input_offset")
        self.has_beta = beta is not None
        if self.has_beta:
            self.beta = _p(beta.astype(np.float32), "beta")

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> StaticW8A8Linear:
        """From the stored tensors: the integer ones as stored, the scales (and beta, when stored) in float32."""
        def f32(key: str) -> np.ndarray:
            return np.asarray(tensors[key]).astype(np.float32)

        return cls(tensors["weight"], f32("deq_scale"), tensors["quant_bias"], f32("input_scale"),
                   tensors["input_offset"], f32("beta") if "beta" in tensors else None)

    def quantize_input(self, x: Tensor) -> Tensor:
        # numpy on the host: the same float32 operations in the same order (so the same values), faster than a
        # chain of CPU kernel launches, each allocating its own output
        a = x.asnumpy()
        q = a + self.beta.asnumpy() if self.has_beta else a.copy()
        np.divide(q, self.input_scale.asnumpy(), out=q)
        np.add(q, self.input_offset.asnumpy().astype(np.float32), out=q)
        np.rint(q, out=q)
        np.clip(q, INT8_MIN, INT8_MAX, out=q)
        return Tensor.from_numpy(q)

    def construct(self, x: Tensor) -> Tensor:
        flat, lead = self._flat(x)
        y = self.matmul(self.quantize_input(flat), self.weight_as_float()).asnumpy()
        np.add(y, self.quant_bias.asnumpy().astype(np.float32), out=y)  # broadcasts: on the host (see above)
        np.multiply(y, self.deq_scale.asnumpy(), out=y)
        return Tensor.from_numpy(y.reshape(*lead, self.out_features))


def quantv2_multiplier(input_scale) -> np.ndarray:
    """The per-tensor multiplier the ascend layout's runtimes apply: ``bf16(1 / bf16(input_scale))`` as float32.

    MindFormers' ascend mode holds ``input_scale`` in a bf16 parameter and inverts it after loading
    (``A8W8LinearMethod.process_weights_after_loading``: ``1 / input_scale.asnumpy()`` on the bf16 array, kept
    in bf16); QuantV2 with a float offset is aclnnAscendQuant, ``round(x * scale + offset)``. vllm-ascend does
    the same (``aclnn_input_scale = 1 / input_scale`` in the model dtype).
    """
    s = np.asarray(input_scale, np.float32).astype(BF16).astype(np.float32)
    return (np.float32(1.0) / s).astype(BF16).astype(np.float32)


class PerTensorStaticW8A8Linear(StaticW8A8Linear):
    """Static W8A8 in the ascend layout (msModelSlim's; MindFormers' ascend mode, vllm-ascend and MindIE load it):
    x_q = clip(round((x + beta) * m + input_offset)), m = ``quantv2_multiplier(input_scale)``;
    y = (x_q @ W_q.T + quant_bias) * deq_scale.

    ``input_scale`` f32 [1] is the true per-tensor scale (x ~ (x_q - offset) * input_scale), ``input_offset`` f32
    [1] the zero point, ``beta`` [in] the shift added before quantization (zeros when absent: MindFormers creates
    it for every static linear). The runtime holds scale, offset and beta in bf16, so the stored values are
    bf16-exact when goldstick writes them.
    """

    storage = {"input_scale": np.float32, "input_offset": np.float32}

    def __init__(self, weight: np.ndarray, deq_scale: np.ndarray, quant_bias: np.ndarray, input_scale: np.ndarray,
                 input_offset: np.ndarray, beta: np.ndarray | None = None):
        scale = np.asarray(input_scale, np.float32).reshape(-1)
        offset = np.asarray(input_offset, np.float32).reshape(-1)
        if scale.size != 1 or offset.size != 1:
            raise ValueError(f"a per-tensor input_scale / input_offset has one value each, found shapes "
                             f"{np.shape(input_scale)} / {np.shape(input_offset)}")
        QuantLinearBase.__init__(self, weight.shape[1], weight.shape[0])
        self.weight = _p(weight.astype(np.int8), "weight")
        self.deq_scale = _p(np.asarray(deq_scale).astype(np.float32), "deq_scale")
        self.quant_bias = _p(np.asarray(quant_bias).astype(np.int32), "quant_bias")
        self.input_scale = _p(scale, "input_scale")
        self.input_offset = _p(offset, "input_offset")
        self.has_beta = beta is not None
        if self.has_beta:
            self.beta = _p(np.asarray(beta).astype(np.float32), "beta")
        self._multiplier = quantv2_multiplier(scale)
        self._offset = offset.astype(BF16).astype(np.float32)

    def quantize_input(self, x: Tensor) -> Tensor:
        a = x.asnumpy()
        q = a + self.beta.asnumpy().astype(BF16).astype(np.float32) if self.has_beta else a.copy()
        np.multiply(q, self._multiplier, out=q)
        np.add(q, self._offset, out=q)
        np.rint(q, out=q)
        np.clip(q, INT8_MIN, INT8_MAX, out=q)
        return Tensor.from_numpy(q)


class DynamicW8A8Linear(ScaledWeightLinear):
    """Dynamic per-token W8A8: s_t = max|x_t| / 127, x_q = round(x / s_t); y = (x_q @ W_q.T) * s_t * weight_scale."""

    scheme = W8A8_DYNAMIC
    description = SCHEMES[W8A8_DYNAMIC].label

    def construct(self, x: Tensor) -> Tensor:
        flat, lead = self._flat(x)
        # on the host, as in StaticW8A8Linear.quantize_input (same float32 operations and order, faster).
        # An all-zero token gets a tiny scale instead of 0 (its codes are 0 either way); |x / scale| <= 127 holds
        # by construction, so no clip is needed
        a = flat.asnumpy()
        q = np.abs(a)
        token_scale = np.maximum(q.max(axis=-1, keepdims=True), np.float32(1e-30)) / np.float32(127.0)
        np.divide(a, token_scale, out=q)
        np.rint(q, out=q)
        y = self.matmul(Tensor.from_numpy(q), self.weight_as_float()).asnumpy()
        np.multiply(y, token_scale, out=y)
        np.multiply(y, self.weight_scale.asnumpy(), out=y)
        return Tensor.from_numpy(y.reshape(*lead, self.out_features))


def replace_cell(root: nn.Cell, path: str, cell: nn.Cell, full_name: str | None = None) -> None:
    """Put ``cell`` at dotted ``path`` under ``root`` (CellList items by index) and give its parameters the HF
    names ``<full_name>.<local>``; swapping a child otherwise renames parameters (notes/mindspore-cpu.md §5)."""
    parent_path, _, attr = path.rpartition(".")
    parent = root
    for part in parent_path.split(".") if parent_path else []:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    if attr.isdigit():
        parent[int(attr)] = cell
    else:
        setattr(parent, attr, cell)
    prefix = full_name or path
    for p in cell.get_parameters():
        p.name = f"{prefix}.{p.name.rsplit('.', 1)[-1]}"


def cell_from_tensors(label: str, tensors: dict[str, np.ndarray], name: str, backend: str = "cpu") -> nn.Cell:
    """Build the cell for one stored linear from its checkpoint tensors (local names -> arrays).

    ``backend="cpu"``: the exact integer twin of this module. ``backend="ascend"``: the Ascend kernel cells.
    Both are the scheme's (``goldstick.quant.schemes``): ``cpu_cell_class()`` / ``ascend_cell_class()``.
    """
    spec = quantized_by_label(label)
    if spec is None:
        raise ValueError(f"{name}: quantization label {label!r} is not one of {sorted(LABEL_TO_SCHEME)}")
    missing = [k for k in spec.needed_to_load() if k not in tensors]
    if missing:
        raise ValueError(f"{name}: a {label} linear needs {', '.join(f'{name}.{k}' for k in missing)}")
    if tensors["weight"].dtype != np.int8:
        raise ValueError(f"{name}.weight: a {label} weight must be int8, found {tensors['weight'].dtype}")
    if "weight_offset" in tensors and np.any(np.asarray(tensors["weight_offset"], np.float32) != 0):
        raise ValueError(f"{name}.weight_offset: asymmetric weights are not supported (offsets must be zero)")
    if backend == "ascend":
        return spec.ascend_cell_class().from_tensors(tensors, name)
    if spec.static and np.size(tensors["input_scale"]) == 1:
        return PerTensorStaticW8A8Linear.from_tensors(tensors)  # the ascend layout
    return spec.cpu_cell_class().from_tensors(tensors)
