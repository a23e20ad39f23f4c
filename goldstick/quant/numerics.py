"""The numbers every path shares, written once: bf16 storage rounding, per-row weight scales and int8 rows, and the
error measures (SQNR, log-softmax) of the report, the analysis, the held-out comparison and C-Eval."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from goldstick.quant import algorithms as alg
from goldstick.quant.fp8 import FP8

BF16 = ml_dtypes.bfloat16

# safetensors dtype code -> numpy storage dtype, for every code a goldstick checkpoint (or the R1 release) holds
STORED_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(FP8),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
}


def bf16_round(x) -> np.ndarray:
    """Nearest bf16 value, as float32 (what a bf16 tensor holds once loaded)."""
    return np.asarray(x, dtype=np.float32).astype(BF16).astype(np.float32)


def bf16_ceil(x) -> np.ndarray:
    """Smallest bf16 value >= x for positive finite x, as float32: a rounded scale must still cover the range."""
    bits = np.asarray(x, dtype=np.float32).copy().view(np.uint32)
    bits = (bits + np.uint32(0xFFFF)) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def quantize_weight(w: np.ndarray, mode: str, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel int8 weight whose scale is bf16-representable (it is stored in bf16).

    q = clip(rint(float64(w) / float64(scale)), low, 127) row by row. The scale depends on a row's absmax alone,
    so ``alg`` is given the [out, 1] absmax column (same scale, same NaN/inf check, without quantizing the whole
    weight a second time); the division runs over ~512 KB blocks of rows with a reused buffer (``quantize_rows``),
    or in one pass of ``rows`` (the streaming path gives ``kernels.quantize_rows``, numba). Same values either way
    (tests/test_stream.py). The layer path stays on numpy: importing numba and loading its cached code costs more
    than it saves below a few hundred million parameters.
    """
    w = np.asarray(w, dtype=np.float32)
    absmax = np.max(np.abs(w), axis=-1, keepdims=True) if w.shape[-1] else np.zeros((w.shape[0], 1), np.float32)
    scale = weight_row_scales(absmax, mode)
    low = -128 if mode == "gs" else -127
    return (rows or quantize_rows)(w, scale, low), scale


def weight_row_scales(absmax: np.ndarray, mode: str) -> np.ndarray:
    """The bf16-ceiled per-row scale from the [out, 1] absmax column (``alg`` refuses a NaN/inf absmax:
    ValueError "weight contains NaN or inf")."""
    return bf16_ceil(alg.quantize_weight_per_channel(absmax, mode=mode).scale)


def quantize_rows(w: np.ndarray, scale: np.ndarray, low: int) -> np.ndarray:
    """int8 ``clip(rint(float64(w) / float64(scale[:, None])), low, 127)`` for a float32 [out, in] weight, over
    ~512 KB blocks of rows with a reused buffer (faster than one whole-tensor expression, same values)."""
    q = np.empty(w.shape, np.int8)
    s64 = scale.astype(np.float64)[:, None]
    step = max(1, (1 << 16) // max(w.shape[1], 1))
    buf = np.empty((min(step, w.shape[0]), w.shape[1]), np.float64)
    for r in range(0, w.shape[0], step):
        b = buf[: min(step, w.shape[0] - r)]
        np.divide(w[r:r + step], s64[r:r + step], out=b)  # float32 promoted to float64 exactly, then divided
        np.rint(b, out=b)
        np.maximum(b, low, out=b)
        np.minimum(b, 127, out=b)
        q[r:r + step] = b
    return q


def sum_squares(x: np.ndarray, chunk: int = 1 << 18) -> float:
    """sum(x^2) in float64, a chunk at a time (no float64 copy of x)."""
    flat = x.reshape(-1)
    total = 0.0
    for i in range(0, flat.size, chunk):
        c = flat[i:i + chunk].astype(np.float64)
        total += float(c @ c)
    return total


def sqnr_from_sums(signal: float, noise: float) -> float:
    """SQNR in dB from the two float64 sums ``sum ref^2`` and ``sum (ref - approx)^2``: inf for no noise, -inf
    for noise on a zero signal."""
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def log_softmax(z) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
