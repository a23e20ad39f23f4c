"""Fused per-element kernels (numba) of the streaming path
(and of ``numerics.quantize_weight(rows=kernels.quantize_rows)``).

The numpy reference makes many full passes over a float32 copy of a weight: FP8 lookup, block-scale multiply,
|w|, row max, then float64 divide, rint, clip and cast. Here each pass reads the weight once:

    fp8_row_absmax     over the FP8 codes only: |an e4m3fn value| grows with ``code & 0x7f`` (0x7f is NaN) and a
                       float32 product by a fixed scale is monotonic in the other factor, so a row's absmax is
                       ``LUT[max(code & 0x7f)] * |block scale|``, maxed over the row's blocks: no float32 copy
    quantize_fp8       code -> ``LUT[code] * block scale`` (the float32 product fp8.py makes, decoded from the
                       code's bits: a table gather does not vectorize) -> float64 divide by the row scale -> rint ->
                       clip -> int8, in one pass
    fp8_to_bf16        code -> the same float32 product -> bf16 (round to nearest even), for FP8 tensors kept float
    quantize_rows      the divide -> int8 pass alone, for a float32 weight (BF16/F32 sources)

The values are the numpy reference's exactly (tests/test_kernels.py). The kernels themselves are
goldstick.quant.numba_kernels, imported on the first call that needs one: importing numba and loading its cached
code costs over 100 MB of RSS, which a process that never runs a kernel (the layer path on a float checkpoint) does
not pay. ``AVAILABLE`` says numba is installed; without it (or when it fails to import, a broken llvmlite: found on
first use, which sets ``AVAILABLE`` False) the numpy code below runs instead, giving the same values.
``all_finite`` is a numpy bit test, no kernel.
"""

from __future__ import annotations

import importlib.util

import ml_dtypes
import numpy as np

from goldstick.quant import numerics
from goldstick.quant.fp8 import BLOCK, FP8_TO_F32

AVAILABLE = importlib.util.find_spec("numba") is not None  # installed; imported by _kernels() on first use


def _kernels():
    """goldstick.quant.numba_kernels (numba imported, on the first call), or None: numba is not installed or
    fails to import (then ``AVAILABLE`` becomes False), and the caller runs the numpy code."""
    global AVAILABLE
    if not AVAILABLE:
        return None
    try:
        from goldstick.quant import numba_kernels
    except Exception:  # a broken llvmlite: the numpy code gives the same values, slower
        AVAILABLE = False
        return None
    return numba_kernels


def row_scales(absmax: np.ndarray, mode: str) -> np.ndarray:
    """``numerics.weight_row_scales``: the bf16-ceiled per-row scale from the [out, 1] absmax column."""
    return numerics.weight_row_scales(absmax, mode)


def quantize_rows(w: np.ndarray, scale: np.ndarray, low: int) -> np.ndarray:
    """int8 ``clip(rint(float64(w) / float64(scale[:, None])), low, 127)`` for a float32 [out, in] weight, in one
    pass (without numba: ``numerics.quantize_rows``, the same values)."""
    kernels = _kernels()
    if kernels is None:
        return numerics.quantize_rows(w, scale, low)
    q = np.empty(w.shape, np.int8)
    kernels.quantize_rows(w, scale, float(low), q)
    return q


def _fp8_checked(codes: np.ndarray, scale_inv: np.ndarray):
    """(kernels, contiguous uint8 codes, float32 scales, row absmax) when the fused kernels apply and every value is
    finite, else None."""
    rows, cols = codes.shape
    if scale_inv.shape != (-(-rows // BLOCK), -(-cols // BLOCK)) or not cols:
        return None
    kernels = _kernels()
    if kernels is None:
        return None
    codes = np.ascontiguousarray(codes.view(np.uint8))
    scale_inv = np.ascontiguousarray(scale_inv, dtype=np.float32)
    absmax = np.empty(rows, np.float32)
    kernels.fp8_row_absmax(codes, scale_inv, FP8_TO_F32, absmax)
    return (kernels, codes, scale_inv, absmax) if np.isfinite(absmax).all() else None


def quantize_fp8(codes: np.ndarray, scale_inv: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``numerics.quantize_weight(decode_fp8(codes, scale_inv), mode)`` without a float32 weight: (int8 q, float32
    scale), or None when numba is missing or a value is not finite (the caller's numpy path then decodes and
    reports it). ``codes``: FP8 bytes [rows, cols] whose row 0 starts a 128-row band; ``scale_inv``: float32
    [ceil(rows/128), ceil(cols/128)]."""
    checked = _fp8_checked(codes, scale_inv)
    if checked is None:
        return None
    kernels, codes, scale_inv, absmax = checked
    scale = row_scales(absmax[:, None], mode)
    q = np.empty(codes.shape, np.int8)
    kernels.quantize_fp8(codes, scale_inv, scale, float(-128 if mode == "gs" else -127), q)
    return q, scale


def fp8_to_bf16(codes: np.ndarray, scale_inv: np.ndarray) -> np.ndarray | None:
    """``decode_fp8(codes, scale_inv).astype(bfloat16)`` in one pass, or None as ``quantize_fp8``."""
    checked = _fp8_checked(codes, scale_inv)
    if checked is None:
        return None
    kernels, codes, scale_inv, _ = checked
    out = np.empty(codes.shape, np.uint16)
    kernels.fp8_to_bf16(codes, scale_inv, out)
    return out.view(ml_dtypes.bfloat16)


FINITE_CHUNK = 1 << 20  # values per step of all_finite's bit test (a 2 MB buffer)


def all_finite(values: np.ndarray) -> bool:
    """``np.isfinite(values).all()``; for bfloat16 a test of the exponent bits, ``FINITE_CHUNK`` values at a time
    (several times faster than ml_dtypes' isfinite, and no bool array of the whole tensor)."""
    if values.dtype != ml_dtypes.bfloat16:
        return bool(np.isfinite(values).all())
    bits = np.ascontiguousarray(values).reshape(-1).view(np.uint16)
    buf = np.empty(min(FINITE_CHUNK, bits.size), np.uint16)
    for start in range(0, bits.size, FINITE_CHUNK):
        part = buf[:min(FINITE_CHUNK, bits.size - start)]
        np.bitwise_and(bits[start:start + len(part)], 0x7F80, out=part)
        if (part == 0x7F80).any():
            return False
    return True
