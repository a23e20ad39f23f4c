"""Quantization algorithms for W8A8 int8: pure functions over numpy arrays.

Nothing here imports MindSpore. The exporter writes what these functions compute, and the CPU serving twin
runs what they compute, so each function states its exact arithmetic (dtype of every step, divisor, clip range,
rounding).

Conventions
-----------
* Weights use the HF / ``nn.Linear`` layout ``W[out, in]``, and ``y = x @ W.T``. Activations are ``x[tokens, in]``.
  The linear functions also take ``x[..., in]`` and keep the leading axes.
* Inputs are converted to float32. Outputs are int8 (quantized values), int32 (integer bias / accumulators) or
  float32 (scales, outputs). Scales are computed in float64 and rounded once to float32, because float32 is what
  gets stored and what the runtime multiplies or divides by.
* Rounding is **round-half-to-even** (``np.rint``) everywhere. This is also what Golden-Stick (GS) does: its
  ``quant_tensor_data`` calls ``mindspore.ops.round``, which rounds half to even (checked on MindSpore 2.10:
  ``round([0.5, 1.5, 2.5]) == [0, 2, 2]``). The CANN reference goldens of AscendQuantV2 and DynamicQuant use
  ``np.round`` / ``torch.round``, which also round half to even.
* int8 codes come in two ranges. Weights (default mode) and dynamic activations are symmetric: ±127, so the
  grid is symmetric about 0 and no code is left over. Static asymmetric activations use the full [-128, 127]
  range.

Ascend runtime ops mirrored here (golden-stick notes §2.1, §3.2, §4.2)
------------------------------------------------------------------------
* Static W8A8: ``QuantV2(x, input_scale, input_offset)`` then ``QuantBatchMatmul(x_q, W_q, deq_scale,
  quant_bias)``, i.e. ``y = (x_q @ W_q.T + quant_bias) * deq_scale``. See :func:`static_int_linear`.
* Dynamic W8A8: ``DynamicQuant(x)`` gives ``(x_q, token_scale)``, then
  ``QuantBatchMatmul(x_q, W_q, w_scale, pertoken_scale=token_scale)``. See :func:`dynamic_int_linear`.

Sections: weights · static activations · static integer linear · exact integer matmul · SmoothQuant ·
Outlier-Suppression+ · dynamic per-token · error metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

INT8_MIN = -128
INT8_MAX = 127
INT32_MIN = int(np.iinfo(np.int32).min)
INT32_MAX = int(np.iinfo(np.int32).max)

# Smallest positive scale we ever return. A scale that would underflow float32 is raised to this value, so
# that x / scale stays finite.
_MIN_SCALE = float(np.finfo(np.float32).tiny)

FLOAT32_EXACT_INT = 2**24  # every integer with |n| <= 2^24 is exactly representable in float32
FLOAT64_EXACT_INT = 2**53  # ... and with |n| <= 2^53 in float64
INT8_ABS_MAX = 128  # |-128|: the largest magnitude of an int8 code (used by the exactness bounds)


def _finite_f32(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _check_int32(values: np.ndarray, what: str) -> np.ndarray:
    """int64 array -> int32 array, or raise if any value does not fit in int32."""
    if values.size and (values.min() < INT32_MIN or values.max() > INT32_MAX):
        raise OverflowError(f"{what} does not fit in int32 (range [{values.min()}, {values.max()}])")
    return values.astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# 1. Per-channel symmetric int8 weights
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class WeightQuant:
    """Per-output-channel symmetric int8 weight: ``W ≈ q * scale[:, None]``."""

    q: np.ndarray  # int8 [out, in]
    scale: np.ndarray  # float32 [out]

    def dequantize(self) -> np.ndarray:
        return dequantize_weight(self.q, self.scale)


WEIGHT_MODES = ("absmax127", "gs")


def quantize_weight_per_channel(w, mode: str = "absmax127") -> WeightQuant:
    """Quantize ``W[out, in]`` (or ``W[..., out, in]`` such as ``[E, out, in]``) per output row to int8.

    ``mode="absmax127"`` (default):
        ``scale[n] = float32(max_k |W[n, k]| / 127)``, computed in float64 and rounded once.
        ``q = clip(rint(W / scale), -127, 127)``, with the division done in float64.
        The grid is symmetric, {-127·s, …, 0, …, 127·s}, and -128 is never produced. A code of -128 would
        belong to no symmetric pair: it could only be reached by clipping and never by rounding a value inside
        [-absmax, absmax]. Leaving it out keeps the zero point at exactly 0, so the weights carry no bias in the
        int domain and ``quant_bias`` needs no weight zero-point term. The round-trip error is at most
        ``scale/2`` per element.

    ``mode="gs"``: bit-exact with Golden-Stick for float32 weights. This is the verified formula in
    ``basic_quant_func.py``: ``cal_quantization_params(symmetric=True)`` followed by ``quant_tensor_data``.
        ``scale = float32((absmax - (-absmax)) / (127 - (-128)))``, computed in float64, i.e. absmax/127.5.
        ``q = clip(rint(float32(W / scale)), -128, 127)``, with the division in float32, because GS divides
        by ``Tensor(scale, dtype=W.dtype)``.
        A value of +absmax lands on 127.5 and rint makes it 128, which is clipped to 127. An exact -absmax
        lands on -127.5 and rint makes it -128 (half to even). So this grid is slightly asymmetric.
        GS runs this on the network's own weight dtype. With bf16 weights it divides in bf16, which is not
        emulated here (pass float32 weights).

    Degenerate rows: a row that is all zeros gets ``scale = 1.0`` and ``q = 0``, so it stays finite and
    dequantizes to exact zeros. GS would compute 0/0 = NaN for such a row. GS also returns scale 1 for the
    whole tensor when *every* row is constant (``(max == min).all()``). Neither quirk is reproduced here.
    A row whose scale would underflow float32 gets ``scale = float32 tiny``.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weight quantization mode {mode!r}; expected one of {WEIGHT_MODES}")
    w = _finite_f32(w, "weight")
    if w.ndim < 2:
        raise ValueError(f"weight must be at least 2-D [out, in], got shape {w.shape}")
    absmax = np.max(np.abs(w), axis=-1).astype(np.float64)
    if mode == "absmax127":
        scale = (absmax / 127.0).astype(np.float32)
        qmin = -127
    else:
        scale = ((absmax - (-absmax)) / 255.0).astype(np.float32)
        qmin = INT8_MIN
    scale = np.where(absmax == 0, np.float32(1.0), np.maximum(scale, np.float32(_MIN_SCALE))).astype(np.float32)
    if mode == "absmax127":
        ratio = w.astype(np.float64) / scale[..., None].astype(np.float64)
    else:
        ratio = w / scale[..., None]  # float32 / float32, as GS does
    q = np.clip(np.rint(ratio), qmin, INT8_MAX).astype(np.int8)
    return WeightQuant(q=q, scale=scale)


def dequantize_weight(q, scale) -> np.ndarray:
    """``float32(q) * scale[..., None]``, done in float32: int8 [..., out, in] and float32 [..., out] give float32."""
    return np.asarray(q).astype(np.float32) * np.asarray(scale, dtype=np.float32)[..., None]


# ----------------------------------------------------------------------------------------------------------
# 2. Static per-tensor asymmetric activations
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActQuantParams:
    """Static per-tensor asymmetric int8 activation quantization: ``q = clip(rint(x/scale + zero_point))``.

    Sign convention: the zero point is the int8 code of the real value 0, and ``x ≈ (q - zero_point) * scale``.
    It is stored as-is, with the same sign, as the Ascend QuantV2 ``input_offset`` (int8, tiled to ``[in]`` by
    GS). QuantV2 computes ``round(x / input_scale + input_offset)`` in GS's divisor convention (golden-stick
    notes §2.1, §4.2). In the ACLNN convention, which multiplies by a stored reciprocal, the offset has the same
    sign. GS's own ``zp = round(qmin - min/scale)`` uses the same sign. The matching integer correction is
    ``quant_bias = -zero_point * sum_k Wq[n, k]`` (see :func:`quant_bias_zero_point`).
    """

    scale: float  # > 0; a value representable in float32
    zero_point: int  # in [-128, 127]

    def __post_init__(self):
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"activation scale must be finite and > 0, got {self.scale}")
        if not (INT8_MIN <= int(self.zero_point) <= INT8_MAX) or int(self.zero_point) != self.zero_point:
            raise ValueError(f"zero_point must be an integer in [-128, 127], got {self.zero_point}")


def activation_params_asymmetric(xmin, xmax) -> ActQuantParams:
    """Static per-tensor int8 parameters from a calibrated range (scalars, or arrays reduced with min/max).

    The range is first widened to contain 0: ``lo = min(xmin, 0)``, ``hi = max(xmax, 0)``. Then
        ``scale = float32((hi - lo) / 255)``, computed in float64,
        ``zero_point = rint(-128 - lo / scale)``, computed in float64 with the float32 scale.
    Because ``lo <= 0 <= hi``, the value ``-lo/scale`` lies in [0, 255], so the zero point is a valid int8
    (clipped for safety). Real 0 maps exactly to the code ``zero_point``. ``lo`` maps to -128 and ``hi`` to 127,
    each within rounding. Widening to 0 matters: GS HEAD's ``cal_quantization_params`` does not widen, so an
    all-positive range such as [1, 2] would give it ``zp = round(-128 - 255) = -383``, which does not fit the
    int8 ``input_offset``.

    Degenerate ranges: ``lo == hi`` (all zeros, or never observed as non-zero) returns ``scale = 1.0`` and
    ``zero_point = 0``, which is finite and symmetric. A positive range that would underflow float32 gets
    the smallest float32 scale.
    """
    lo_in = float(np.min(np.asarray(xmin, dtype=np.float64)))
    hi_in = float(np.max(np.asarray(xmax, dtype=np.float64)))
    if not (np.isfinite(lo_in) and np.isfinite(hi_in)):
        raise ValueError(f"activation range must be finite, got [{lo_in}, {hi_in}]")
    if lo_in > hi_in:
        raise ValueError(f"activation range is inverted: xmin={lo_in} > xmax={hi_in}")
    lo, hi = min(lo_in, 0.0), max(hi_in, 0.0)
    if hi == lo:
        return ActQuantParams(scale=1.0, zero_point=0)
    scale = float(np.float32((hi - lo) / 255.0))
    scale = max(scale, _MIN_SCALE)
    zero_point = int(np.clip(np.rint(-128.0 - lo / scale), INT8_MIN, INT8_MAX))
    return ActQuantParams(scale=scale, zero_point=zero_point)


def quantize_static(x, scale, zero_point: int) -> np.ndarray:
    """The QuantV2 arithmetic: ``int8 = clip(rint(float32(x / scale) + zero_point), -128, 127)``, all float32.

    ``scale`` is the divisor: a scalar, or an ``[in]`` vector such as GS's folded ``input_scale = s_x * s_j``.
    The zero point is added **before** rounding, as the kernel does (``round(x*scale + offset)``). Compared
    with ``rint(x/scale) + zp`` this differs only when ``x/scale`` is an exact half-integer and ``zp`` is odd,
    or when the float32 addition rounds. The ACLNN path multiplies by a stored reciprocal ``1/scale`` instead.
    That can differ from this division by 1 ulp, and so by one code at near-ties.
    """
    x = _finite_f32(x, "activation")
    s = np.asarray(scale, dtype=np.float32)
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError("activation scale must be finite and > 0")
    v = x / s + np.float32(zero_point)
    return np.clip(np.rint(v), INT8_MIN, INT8_MAX).astype(np.int8)


def quantize_activation_static(x, params: ActQuantParams) -> np.ndarray:
    """float32 [..., in] to int8: ``clip(rint(x/scale + zero_point), -128, 127)`` (see :func:`quantize_static`)."""
    return quantize_static(x, params.scale, params.zero_point)


def dequantize_activation(q, params: ActQuantParams) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32 (``q - zero_point`` is exact in float32)."""
    return (np.asarray(q).astype(np.float32) - np.float32(params.zero_point)) * np.float32(params.scale)


# ----------------------------------------------------------------------------------------------------------
# 3. Static integer linear: exactly what QuantV2 + QuantBatchMatmul compute
# ----------------------------------------------------------------------------------------------------------

def quant_bias_zero_point(wq, zero_point: int) -> np.ndarray:
    """Zero-point correction folded into the int32 bias: ``-zero_point * sum_k Wq[n, k]`` as int32 [out].

    Since ``sum_k (x_q[k] - zp) * Wq[n, k] = (x_q @ Wq.T)[n] - zp * sum_k Wq[n, k]``, the runtime only needs
    the raw int8 x int8 product plus this bias. This is computed exactly in int64. GS computes it in float
    with a float64 round trip through ``deq_scale`` and gets the same integers.
    """
    wsum = np.asarray(wq).astype(np.int64).sum(axis=-1)
    return _check_int32(-int(zero_point) * wsum, "zero-point quant_bias")


def quant_bias(wq, zero_point: int, extra=None) -> np.ndarray:
    """The int32 ``quant_bias`` [out] the exporter writes.

    It is the zero-point correction plus optional extra int32 terms, e.g. the OS+ shift compensation
    :attr:`OSPlusBias.int_term`.

    For row-parallel layers (o_proj) served with TP, the serving loader zeroes this on ranks != 0. Write the
    full value.
    """
    total = quant_bias_zero_point(wq, zero_point).astype(np.int64)
    if extra is not None:
        total = total + np.asarray(extra).astype(np.int64)
    return _check_int32(total, "quant_bias")


def deq_scale(act_scale, w_scale) -> np.ndarray:
    """``deq_scale[n] = float32(act_scale * w_scale[n])``, computed in float64 and rounded once to float32 [out].

    ``act_scale`` is the per-tensor scale ``s_x`` of the activation *as quantized*. With SmoothQuant that is the
    smoothed ``x/s``. It is not the per-channel folded ``input_scale``.
    """
    a = np.asarray(act_scale, dtype=np.float64)
    return (a * np.asarray(w_scale, dtype=np.float64)).astype(np.float32)


def static_int_accumulate(x_q, wq, quant_bias=None) -> np.ndarray:
    """int32 accumulator ``x_q @ Wq.T + quant_bias``, computed exactly.

    int8 [tokens, in] and int8 [out, in] give int32 [tokens, out]."""
    acc = int_matmul_exact(x_q, np.asarray(wq).T)
    if quant_bias is not None:
        acc = acc + np.asarray(quant_bias).astype(np.int64)
    return _check_int32(acc, "static int accumulator")


def static_int_linear(x, wq, w_scale, act_params: ActQuantParams, quant_bias=None, *, input_scale=None):
    """Static W8A8 linear, as the Ascend kernels compute it.

    1. ``x_q = clip(rint(x / input_scale + zp), -128, 127)``, int8 (QuantV2). ``input_scale`` defaults to
       ``act_params.scale``. Pass the per-channel folded ``s_x * s_j`` to reproduce a smoothed GS export.
    2. ``acc = x_q @ Wq.T + quant_bias``, int32 and exact (QuantBatchMatmul). ``quant_bias=None`` means the
       zero-point correction alone, :func:`quant_bias_zero_point`. An explicit ``quant_bias`` must already
       contain that correction (build it with :func:`quant_bias`).
    3. ``y = float32(acc) * deq_scale``, in float32 with ``deq_scale = float32(act_scale * w_scale)``. The
       cast of y to bf16 is left to the caller.
    """
    wq = np.asarray(wq)
    x = np.asarray(x, dtype=np.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    scale = act_params.scale if input_scale is None else input_scale
    x_q = quantize_static(x2, scale, act_params.zero_point)
    bias = quant_bias_zero_point(wq, act_params.zero_point) if quant_bias is None else quant_bias
    acc = static_int_accumulate(x_q, wq, bias)
    y = acc.astype(np.float32) * deq_scale(act_params.scale, w_scale)[None, :]
    return y.reshape(*lead, wq.shape[0])


# ----------------------------------------------------------------------------------------------------------
# 4. Exact integer matmul
# ----------------------------------------------------------------------------------------------------------
# An int8 x int8 product is at most 128*128 = 2^14 in magnitude. A float matmul of integer-valued inputs is
# exact when every partial sum, in whatever order the BLAS adds, is an integer the format can hold exactly.
# Every partial sum of row i and column j is bounded by sum_k |a_ik| |b_kj|. So:
#   float64: exact whenever K * 2^14 <= 2^53, i.e. K <= 2^39. Always true for int8 inputs.
#   float32: exact whenever sum_k |a_ik| |b_kj| <= 2^24 for all i, j. The worst case K * 2^14 <= 2^24 only
#            guarantees this for K <= 1024. DeepSeek's K = 7168 and 18432 need a check on the actual magnitudes,
#            see float32_matmul_is_exact.

def _int_operand(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got {arr.dtype}")
    return arr


def int_matmul_exact(a, b) -> np.ndarray:
    """Exact integer ``a @ b`` as int64: int [M, K] and int [K, N] give int64 [M, N].

    The product is taken as a float64 matmul, which is exact while ``K * max|a| * max|b| <= 2^53``, and that
    always holds for int8. Wider inputs that break the bound fall back to an int64 matmul, which is slow but
    exact.
    """
    a = _int_operand(a, "a")
    b = _int_operand(b, "b")
    k = a.shape[-1]
    amax = int(np.abs(a.astype(np.int64)).max()) if a.size else 0
    bmax = int(np.abs(b.astype(np.int64)).max()) if b.size else 0
    if k * amax * bmax <= FLOAT64_EXACT_INT:
        return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    return a.astype(np.int64) @ b.astype(np.int64)


def fits_float32_exactly(k: int, a_absmax: int = INT8_ABS_MAX, b_absmax: int = INT8_ABS_MAX) -> bool:
    """Worst-case check: does every length-``k`` dot product of such integers stay within 2^24?

    With full int8 ranges this means ``k * 2^14 <= 2^24``, i.e. ``k <= 1024``.
    """
    return int(k) * int(a_absmax) * int(b_absmax) <= FLOAT32_EXACT_INT


def float32_matmul_bound(a, b) -> float:
    """An upper bound on ``max_{i,j} sum_k |a_ik| |b_kj|`` for integer ``a`` [M, K] and ``b`` [K, N].

    It is the smallest of three valid bounds:
      * ``max_i ||a_i||_1 * max|b|``,
      * ``max|a| * max_j ||b_:j||_1``,
      * ``max_i ||a_i||_2 * max_j ||b_:j||_2`` (Cauchy-Schwarz).
    """
    a = np.abs(_int_operand(a, "a").astype(np.float64))
    b = np.abs(_int_operand(b, "b").astype(np.float64))
    if a.size == 0 or b.size == 0:
        return 0.0
    by_a_rows = a.sum(axis=-1).max() * b.max()
    by_b_cols = a.max() * b.sum(axis=0).max()
    cauchy = np.sqrt((a * a).sum(axis=-1).max()) * np.sqrt((b * b).sum(axis=0).max())
    return float(min(by_a_rows, by_b_cols, cauchy * (1.0 + 1e-12)))  # margin: sqrt may round down


def float32_matmul_is_exact(a, b) -> bool:
    """True when a float32 matmul of these integer arrays is provably exact (bound <= 2^24)."""
    return float32_matmul_bound(a, b) <= FLOAT32_EXACT_INT


def int_matmul_fast(a, b) -> np.ndarray:
    """``a @ b`` as int64, through a float32 matmul when :func:`float32_matmul_is_exact` proves it exact.

    Otherwise it uses the float64 path of :func:`int_matmul_exact`. The result is always exact.
    """
    if float32_matmul_is_exact(a, b):
        return (np.asarray(a).astype(np.float32) @ np.asarray(b).astype(np.float32)).astype(np.int64)
    return int_matmul_exact(a, b)


# ----------------------------------------------------------------------------------------------------------
# 5. SmoothQuant
# ----------------------------------------------------------------------------------------------------------
# Y = X W^T = (X diag(s)^-1) (W diag(s))^T: each input channel j of the activation is divided by s_j, and the
# matching weight column is multiplied by s_j.

def smoothquant_scales(act_absmax, weights, alpha: float = 0.5, min_scale: float = 1e-5) -> np.ndarray:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` as float32 [in].

    ``act_absmax``: per-input-channel ``max_t |X[t, j]|`` over the calibration tokens, shape [in].
    ``weights``: one ``W[out, in]`` or a list of them. ``max|W_j|`` is the max over the output rows of *all*
    given weights. Linears fed by the same activation, e.g. ``q_a_proj`` and ``kv_a_proj_with_mqa`` after
    ``input_layernorm``, must share one ``s``, so pass them together. An expert stack ``[E, out, in]`` is
    reduced over E too.
    Then ``s = max(s, min_scale)`` and ``s_j = 1`` wherever ``max|X_j| == 0`` or ``max|W_j| == 0``.
    The powers are computed in float64.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = _finite_f32(act_absmax, "act_absmax").astype(np.float64)
    if a.ndim != 1:
        raise ValueError(f"act_absmax must be 1-D [in], got shape {a.shape}")
    if (a < 0).any():
        raise ValueError("act_absmax must be non-negative (it is a max of |X|)")
    if isinstance(weights, np.ndarray):
        weights = [weights]
    if not weights:
        raise ValueError("smoothquant_scales needs at least one weight")
    wmax = np.zeros_like(a)
    for w in weights:
        w = _finite_f32(w, "weight")
        if w.shape[-1] != a.shape[0]:
            raise ValueError(f"weight has in={w.shape[-1]}, act_absmax has {a.shape[0]} channels")
        wmax = np.maximum(wmax, np.abs(w).reshape(-1, w.shape[-1]).max(axis=0).astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(a, alpha) / np.power(wmax, 1.0 - alpha)
    s = np.maximum(s, min_scale)
    s = np.where((a == 0) | (wmax == 0) | ~np.isfinite(s), 1.0, s)
    return s.astype(np.float32)


def apply_smoothing(weights, s):
    """Weight side of smoothing: ``W[:, j] * s_j``, returned as new float32 arrays.

    Takes one array or a list, and returns the same kind.
    """
    s = _finite_f32(s, "smooth scale")
    if isinstance(weights, np.ndarray):
        return _finite_f32(weights, "weight") * s
    return [_finite_f32(w, "weight") * s for w in weights]


def smooth_activation(x, s) -> np.ndarray:
    """Activation side of smoothing, applied explicitly: ``x / s`` in float32."""
    return np.asarray(x, dtype=np.float32) / _finite_f32(s, "smooth scale")


def smooth_scale_multiplier(s) -> np.ndarray:
    """The explicit per-channel multiplier ``1/s`` (float32 [in]). GS stores it as ``smooth_scale``.

    The runtime uses it as ``x * smooth_scale``, e.g. DynamicQuant's smooth_scales input or a Mul before QuantV2.
    """
    return (1.0 / _finite_f32(s, "smooth scale").astype(np.float64)).astype(np.float32)


def fold_smoothing_into_norm(norm_weight, s) -> np.ndarray:
    """Fold ``x / s`` into the feeding RMSNorm: ``gamma' = gamma / s`` (float32 [in]).

    This works because ``RMSNorm(h) * gamma / s == (RMSNorm(h) * gamma) / s``. Every linear fed by that norm
    must then use the weights smoothed with the same ``s``.
    """
    return (_finite_f32(norm_weight, "norm weight").astype(np.float64) /
            _finite_f32(s, "smooth scale").astype(np.float64)).astype(np.float32)


def fold_smoothing_into_input_scale(act_scale, s) -> np.ndarray:
    """GS's deploy folding: per-channel QuantV2 divisor ``input_scale[j] = float32(s_x * s_j)``, float32 [in].

    ``s_x`` is the per-tensor scale calibrated on the smoothed ``x / s``.
    """
    return (float(act_scale) * _finite_f32(s, "smooth scale").astype(np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# 6. Outlier-Suppression+ (Wei et al. 2023): channel shift, then channel scale
# ----------------------------------------------------------------------------------------------------------
# x_tilde = (x - z) / s and W' = W diag(s). Then
#     x @ W.T == ((x - z) / s) @ (W diag(s)).T + W @ z
# exactly, in real arithmetic. The constant W @ z is added back through the integer quant_bias
# (osplus_bias_compensation).

def osplus_shift(xmin, xmax) -> np.ndarray:
    """Per-channel shift ``z_j = (max_j + min_j) / 2``, the midpoint of the channel's range, float32 [in].

    After subtracting it, every channel is centred: ``max_j(x - z) = -min_j(x - z) = (max_j - min_j)/2``.
    Computed in float64, so the sum cannot overflow.
    """
    lo = _finite_f32(xmin, "xmin").astype(np.float64)
    hi = _finite_f32(xmax, "xmax").astype(np.float64)
    if lo.shape != hi.shape:
        raise ValueError(f"xmin {lo.shape} and xmax {hi.shape} differ in shape")
    if (lo > hi).any():
        raise ValueError("per-channel range is inverted (xmin > xmax)")
    return ((hi + lo) / 2.0).astype(np.float32)


def osplus_shifted_range(xmin, xmax, z) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel range after the shift: ``(xmin - z, xmax - z)``, computed in float64 and returned as float32."""
    z64 = np.asarray(z, dtype=np.float64)
    return ((np.asarray(xmin, dtype=np.float64) - z64).astype(np.float32),
            (np.asarray(xmax, dtype=np.float64) - z64).astype(np.float32))


def osplus_scales(shifted_min, shifted_max, threshold: float) -> np.ndarray:
    """OS+ scale for clipping threshold t: ``s_j = max(1, max|x_tilde_j| / t)``, float32 [in].

    Only channels whose shifted range exceeds [-t, t] get scaled, and they are scaled down to exactly t.
    """
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be finite and > 0, got {threshold}")
    amax = np.maximum(np.abs(np.asarray(shifted_min, np.float64)), np.abs(np.asarray(shifted_max, np.float64)))
    return np.maximum(1.0, amax / float(threshold)).astype(np.float32)


def osplus_threshold_grid(shifted_min, shifted_max, num: int = 100) -> np.ndarray:
    """The 1-D grid searched by :func:`osplus_search_scale`, float64 and descending.

    It holds ``num`` points, linearly spaced from ``T_max = max_j max|x_tilde_j|`` down to
    ``T_min = min_j max|x_tilde_j|``. Channels whose maximum is 0 are left out of ``T_min``.
      * ``t = T_max`` is the first point: ``s`` is 1 everywhere, i.e. shift only, no scaling.
      * ``t = T_min`` is the last point: every channel is scaled to the same range. Below ``T_min``, ``s``
        only grows by one common factor. That factor cancels in per-tensor activation quantization and
        per-channel weight quantization, so smaller t cannot change the loss beyond float rounding.
    The ModelTC reference instead goes from the overall max down to an absolute 1.0 in ``max(100, amax/0.5)``
    steps. That depends on the activation's units, which this grid does not.
    Duplicate points (all channels equal) are collapsed.
    """
    amax = np.maximum(np.abs(np.asarray(shifted_min, np.float64)), np.abs(np.asarray(shifted_max, np.float64)))
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    nonzero = amax[amax > 0]
    if nonzero.size == 0:
        return np.array([1.0])
    t_max, t_min = float(nonzero.max()), float(nonzero.min())
    grid = np.linspace(t_max, t_min, int(num))
    return np.unique(grid)[::-1] if t_max == t_min else grid


def osplus_transform_activation(x, z, s) -> np.ndarray:
    """The activation the quantizer sees: ``x_tilde = (x - z) / s`` in float32.

    When no norm feeds the linear, this is the explicit form: GS adds ``beta = -z`` to x before a QuantV2
    whose divisor has ``s`` folded in.
    """
    return ((np.asarray(x, dtype=np.float32) - _finite_f32(z, "shift")) / _finite_f32(s, "scale"))


def fold_osplus_into_norm(norm_weight, z, s, norm_bias=None) -> tuple[np.ndarray, np.ndarray]:
    """Fold the OS+ shift and scale into the feeding norm.

    Returns ``(gamma / s, (beta - z) / s)`` as float32 [in], each a float64 division rounded once; without a
    norm bias the shift term is ``-z / s`` (so a zero shift gives -0.0, as ``-z / s`` in float32 does).
    For an RMSNorm, ``RMSNorm(h) * gamma' + beta' == (RMSNorm(h) * gamma - z) / s`` with ``beta = 0``.
    DeepSeek's RMSNorms have no bias. The folded ``beta'`` must be exported as ``...layernorm.bias``, which
    the Feb-2025 Ascend loader reads as the QuantV2 shift ``beta``, or the runtime must support a norm bias.
    """
    gamma = _finite_f32(norm_weight, "norm weight").astype(np.float64)
    z64 = _finite_f32(z, "shift").astype(np.float64)
    s64 = _finite_f32(s, "scale").astype(np.float64)
    shifted = -z64 if norm_bias is None else _finite_f32(norm_bias, "norm bias").astype(np.float64) - z64
    return (gamma / s64).astype(np.float32), (shifted / s64).astype(np.float32)


@dataclass(frozen=True, eq=False)
class OSPlusBias:
    """Compensation of the OS+ shift in the output: ``y += W @ z``.

    ``float_term``: the exact constant ``W @ z`` (float32 [out]), to be added to the linear's output.
    ``int_term``: ``rint(float_term / deq_scale)`` (int32 [out]), to be added to ``quant_bias``.
    ``residual``: ``float_term - int_term * deq_scale`` (float32 [out]). This is the error the integer form
    leaves in the output, and it is bounded by ``deq_scale/2`` per channel. The exporter reports it, or adds it
    to a float bias when the runtime has one.
    """

    float_term: np.ndarray
    int_term: np.ndarray
    residual: np.ndarray

    def max_abs_residual(self) -> float:
        return float(np.max(np.abs(self.residual))) if self.residual.size else 0.0


def osplus_bias_compensation(w_smoothed, z, deq_scale, s=None) -> OSPlusBias:
    """The constant ``W @ z`` that the shift removed, in float and int32 form (see :class:`OSPlusBias`).

    ``w_smoothed`` is the weight *as exported*, ``W diag(s)``, and ``s`` is the OS+/smooth scale. The term is
    computed as ``W diag(s) @ (z / s)``, which equals ``W @ z``. With ``s=None`` the weight is taken as
    unscaled. The arithmetic is float64. This is GS's inner-OSP export, ``round((-beta . W) / deq_scale)``, with
    ``beta = -z``.
    """
    w = _finite_f32(w_smoothed, "weight").astype(np.float64)
    z64 = _finite_f32(z, "shift").astype(np.float64)
    if s is not None:
        z64 = z64 / _finite_f32(s, "scale").astype(np.float64)
    term = w @ z64
    dq = np.asarray(deq_scale, dtype=np.float32).astype(np.float64)
    if not (np.isfinite(dq).all() and (dq > 0).all()):
        raise ValueError("deq_scale must be finite and > 0")
    as_int = np.rint(term / dq)
    int_term = _check_int32(as_int.astype(np.int64), "OS+ bias compensation")
    residual = term - int_term.astype(np.float64) * dq
    return OSPlusBias(float_term=term.astype(np.float32), int_term=int_term, residual=residual.astype(np.float32))


# loss_fn(x_sample, shift, scale) -> float: the error of the *layer's* output when the linear's input is
# transformed with this (shift, scale) and quantized. The caller supplies it, closing over the decoder layer and
# its float reference outputs.
OSPlusLoss = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


@dataclass(frozen=True, eq=False)
class OSPlusSearch:
    """Result of :func:`osplus_search_scale`: the chosen threshold and scale, plus the whole loss curve."""

    threshold: float
    scale: np.ndarray  # float32 [in]
    grid: np.ndarray  # float64, the thresholds tried, in order
    losses: np.ndarray  # float64, loss at each grid point (inf where the loss was not finite)
    best_index: int


def bounded_token_sample(x, max_tokens: int) -> np.ndarray:
    """At most ``max_tokens`` rows of ``x[tokens, in]``, taken evenly spaced (deterministic, no RNG)."""
    x = np.asarray(x, dtype=np.float32)
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[0]
    if n <= max_tokens:
        return x
    idx = np.linspace(0, n, int(max_tokens), endpoint=False).astype(np.int64)  # stride > 1: distinct rows
    return x[idx]


def osplus_search_scale(shift, shifted_min, shifted_max, x_sample, loss_fn: OSPlusLoss, *, num_grid: int = 100,
                        max_tokens: int = 512, grid=None) -> OSPlusSearch:
    """Grid-search the OS+ clipping threshold t against a caller-supplied loss.

    ``shift``: z [in], from :func:`osplus_shift`. ``shifted_min`` and ``shifted_max``: the per-channel range
    of ``x - z`` over all calibration tokens. ``x_sample``: calibration inputs of the linear, *unshifted*.
    At most ``max_tokens`` evenly spaced rows are passed to the loss.
    ``loss_fn(x_sample, z, s)`` must return the error of the **layer's output**, e.g. the decoder-layer output
    MSE against the float model, for the candidate ``(z, s)``. It is a parameter because the search cannot know
    what follows the linear. :func:`make_linear_output_loss` builds a linear-output loss for tests only.

    Grid: :func:`osplus_threshold_grid` with ``num_grid`` points, unless ``grid`` (descending thresholds) is
    given. For each t: ``s = osplus_scales(shifted_min, shifted_max, t)`` and ``loss = loss_fn(x_sample, z, s)``.
    The first (largest-t, least-scaled) minimum wins. A non-finite loss counts as +inf.
    """
    z = _finite_f32(shift, "shift")
    xs = bounded_token_sample(x_sample, max_tokens)
    thresholds = osplus_threshold_grid(shifted_min, shifted_max, num_grid) if grid is None \
        else np.asarray(grid, dtype=np.float64)
    if thresholds.size == 0:
        raise ValueError("empty threshold grid")
    losses = np.full(thresholds.shape, np.inf)
    for i, t in enumerate(thresholds):
        value = float(loss_fn(xs, z, osplus_scales(shifted_min, shifted_max, float(t))))
        losses[i] = value if np.isfinite(value) else np.inf
    if not np.isfinite(losses).any():
        raise ValueError("OS+ search: the loss was not finite at any grid point")
    best = int(np.argmin(losses))
    return OSPlusSearch(threshold=float(thresholds[best]),
                        scale=osplus_scales(shifted_min, shifted_max, float(thresholds[best])),
                        grid=thresholds, losses=losses, best_index=best)


def make_linear_output_loss(weight) -> OSPlusLoss:
    """FOR TESTS AND DEMOS ONLY: a loss on one linear's output, not on the layer's.

    The returned ``loss(x, z, s)`` builds the full static W8A8 path:
      * ``x_tilde = (x - z)/s``, with per-tensor asymmetric params from x_tilde's own min/max;
      * ``W diag(s)``, quantized per channel with absmax/127;
      * the shift compensated through the int32 ``quant_bias``.
    It returns ``mean_tokens sum_out (y_ref - y_q)^2`` with ``y_ref = x @ W.T`` (float64).
    """
    w = _finite_f32(weight, "weight")

    def loss(x: np.ndarray, z: np.ndarray, s: np.ndarray) -> float:
        xt = osplus_transform_activation(x, z, s)
        params = activation_params_asymmetric(xt.min(), xt.max())
        wq = quantize_weight_per_channel(apply_smoothing(w, s))
        dq = deq_scale(params.scale, wq.scale)
        comp = osplus_bias_compensation(apply_smoothing(w, s), z, dq, s)
        qb = quant_bias(wq.q, params.zero_point, comp.int_term)
        y_q = static_int_linear(xt, wq.q, wq.scale, params, qb).astype(np.float64)
        y_ref = x.astype(np.float64) @ w.astype(np.float64).T
        return float(np.mean(np.sum((y_ref - y_q) ** 2, axis=-1)))

    return loss


# ----------------------------------------------------------------------------------------------------------
# 7. Dynamic per-token symmetric activations (Ascend DynamicQuant)
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class TokenQuant:
    """Per-token symmetric int8 activation: ``x[t] ≈ q[t] * scale[t]``."""

    q: np.ndarray  # int8 [tokens, in]
    scale: np.ndarray  # float32 [tokens]


def dynamic_quantize_per_token(x, smooth_scale=None) -> TokenQuant:
    """Ascend DynamicQuant: ``scale[t] = max_k |x[t, k]| / 127`` and ``q = clip(rint(x / scale), -128, 127)``.

    All of it is float32. This follows the CANN op's formula and its reference goldens:
      * ``scaleOut = row_max(abs(x)) / 127``, ``y = round(x / scaleOut)``, rounding half to even;
      * with ``smooth_scale``, the row is first multiplied by it: ``x * smooth_scales``;
      * the golden clamps to [-128, 127]. Since ``|x/scale| <= 127`` up to one float32 rounding, -128 never
        actually occurs, so the effective range is symmetric ±127.
    An all-zero row gets ``scale = 1.0`` and ``q = 0``, as the CANN golden does.
    """
    x = _finite_f32(x, "activation")
    x = x.reshape(-1, x.shape[-1])
    if smooth_scale is not None:
        x = x * _finite_f32(smooth_scale, "smooth_scale")
    amax = np.max(np.abs(x), axis=-1) if x.shape[-1] else np.zeros(x.shape[0], np.float32)
    scale = amax / np.float32(127.0)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, None]), INT8_MIN, INT8_MAX).astype(np.int8)
    return TokenQuant(q=q, scale=scale)


def dynamic_int_linear(x, wq, w_scale, smooth_scale=None) -> np.ndarray:
    """Dynamic W8A8 linear: ``y = float32(x_q @ Wq.T) * token_scale[:, None] * w_scale[None, :]``.

    ``x_q @ Wq.T`` is exact, and the two scalings are applied in float32, in that order.
    x [..., in] gives float32 [..., out].
    """
    wq = np.asarray(wq)
    x = np.asarray(x, dtype=np.float32)
    lead = x.shape[:-1]
    tq = dynamic_quantize_per_token(x, smooth_scale)
    acc = _check_int32(int_matmul_exact(tq.q, wq.T), "dynamic int accumulator")
    y = acc.astype(np.float32) * tq.scale[:, None] * np.asarray(w_scale, dtype=np.float32)[None, :]
    return y.reshape(*lead, wq.shape[0])


# ----------------------------------------------------------------------------------------------------------
# 8. Error metrics
# ----------------------------------------------------------------------------------------------------------

def sqnr_db(reference, approx) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - approx)^2)``.

    Computed in float64. Returns ``inf`` when the arrays are equal. When ``reference`` is all zeros and
    ``approx`` is not, it returns ``-inf``.
    """
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(approx, dtype=np.float64)
    noise = float(np.sum(err * err))
    signal = float(np.sum(ref * ref))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def relative_error(reference, approx) -> float:
    """``max|ref - approx| / max|ref|``, computed in float64.

    Returns 0 when the arrays are equal, and ``inf`` when ref is all zeros but approx is not.
    """
    ref = np.asarray(reference, dtype=np.float64)
    diff = float(np.max(np.abs(ref - np.asarray(approx, dtype=np.float64)))) if ref.size else 0.0
    if diff == 0.0:
        return 0.0
    scale = float(np.max(np.abs(ref)))
    return diff / scale if scale > 0 else float("inf")


__all__ = [
    "WeightQuant", "quantize_weight_per_channel", "dequantize_weight",
    "ActQuantParams", "activation_params_asymmetric", "quantize_static", "quantize_activation_static",
    "dequantize_activation",
    "quant_bias_zero_point", "quant_bias", "deq_scale", "static_int_accumulate", "static_int_linear",
    "int_matmul_exact", "int_matmul_fast", "fits_float32_exactly", "float32_matmul_bound",
    "float32_matmul_is_exact",
    "smoothquant_scales", "apply_smoothing", "smooth_activation", "smooth_scale_multiplier",
    "fold_smoothing_into_norm", "fold_smoothing_into_input_scale",
    "osplus_shift", "osplus_shifted_range", "osplus_scales", "osplus_threshold_grid", "osplus_transform_activation",
    "fold_osplus_into_norm", "OSPlusBias", "osplus_bias_compensation", "OSPlusSearch", "osplus_search_scale",
    "bounded_token_sample", "make_linear_output_loss",
    "TokenQuant", "dynamic_quantize_per_token", "dynamic_int_linear",
    "sqnr_db", "relative_error",
]
