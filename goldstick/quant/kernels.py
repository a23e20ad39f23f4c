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
    all_finite         a bit test for bf16 arrays (faster than ml_dtypes' isfinite)

The values are the numpy reference's exactly (tests/test_kernels.py). Compiled once per machine (``cache=True``:
goldstick/__pycache__), single-threaded, since the executor already runs one process per core. Without numba (not
installed, or failing to import) ``AVAILABLE`` is False and the numpy code below runs instead, giving the same
values.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from goldstick.quant import numerics
from goldstick.quant.fp8 import BLOCK, FP8_TO_F32

try:
    import numba
except Exception:  # not installed, or a broken llvmlite: the numpy code gives the same values, slower
    numba = None

AVAILABLE = numba is not None


def _jit(fn):
    return numba.njit(cache=True, nogil=True)(fn) if numba is not None else fn


@_jit
def _fp8_row_absmax(codes, scale_inv, lut, out):
    """out[r] = max_k |LUT[codes[r, k]] * scale_inv[r // 128, k // 128]| (float32), NaN if any product is not
    finite (a NaN code, a NaN/inf scale, an overflow)."""
    rows, cols = codes.shape
    for r in range(rows):
        row, srow = codes[r], scale_inv[r // 128]
        best = np.float32(0.0)
        bad = False
        for b in range((cols + 127) // 128):
            block = row[b * 128:b * 128 + 128]  # loops from 0 over slices: numba's indexing then vectorizes
            m = np.uint8(0)
            for k in range(block.shape[0]):
                c = np.uint8(block[k] << np.uint8(1))  # drops the sign bit; a uint8 max vectorizes
                m = c if c > m else m
            v = lut[m >> np.uint8(1)] * abs(srow[b])
            if not np.isfinite(v):
                bad = True
            elif v > best:
                best = v
        out[r] = np.float32(np.nan) if bad else best


@_jit
def _decode_row(row, srow, bits, f):
    """f[k] = LUT[row[k]] * srow[k // 128] as float32, the product fp8.py makes, with no table lookup (a gather
    does not vectorize). ``f`` is ``bits`` viewed as float32. NaN codes must have been ruled out."""
    for k in range(row.shape[0]):  # |value| of a normal code (exponent field e >= 1): 2^(e-7) (1 + m/8)
        bits[k] = ((np.uint32(row[k]) & np.uint32(0x7F)) << np.uint32(20)) + np.uint32(120 << 23)
    for b in range((row.shape[0] + 127) // 128):
        sc, codes, values = srow[b], row[b * 128:b * 128 + 128], f[b * 128:b * 128 + 128]
        for k in range(codes.shape[0]):
            c, m = codes[k], values[k]
            if (c & np.uint8(0x78)) == np.uint8(0):  # e = 0: 2 * 2^-7 (1 + m/8) - 2^-6 = m 2^-9, exactly
                m = m * np.float32(2.0) - np.float32(1.0 / 64)
            values[k] = (-m if c >= np.uint8(128) else m) * sc


@_jit
def _quantize_fp8(codes, scale_inv, row_scale, low, out):
    rows, cols = codes.shape
    bits = np.empty(cols, np.uint32)
    f = bits.view(np.float32)
    for r in range(rows):
        _decode_row(codes[r], scale_inv[r // 128], bits, f)
        d, q = np.float64(row_scale[r]), out[r]
        for k in range(cols):
            q[k] = np.int8(min(max(np.rint(np.float64(f[k]) / d), low), 127.0))


@_jit
def _fp8_to_bf16(codes, scale_inv, out):
    """out: the bf16 bits (uint16) of the decoded float32 values, rounded to nearest even as ml_dtypes does
    (the values are finite)."""
    rows, cols = codes.shape
    bits = np.empty(cols, np.uint32)
    f = bits.view(np.float32)
    for r in range(rows):
        _decode_row(codes[r], scale_inv[r // 128], bits, f)
        o = out[r]
        for k in range(cols):
            u = bits[k]
            o[k] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@_jit
def _quantize_rows(w, row_scale, low, out):
    rows, cols = w.shape
    for r in range(rows):
        d, q, row = np.float64(row_scale[r]), out[r], w[r]
        for k in range(cols):
            q[k] = np.int8(min(max(np.rint(np.float64(row[k]) / d), low), 127.0))


@_jit
def _count_nonfinite_bf16(bits):
    n = 0
    for k in range(bits.shape[0]):
        n += (bits[k] & np.uint16(0x7F80)) == np.uint16(0x7F80)
    return n


def row_scales(absmax: np.ndarray, mode: str) -> np.ndarray:
    """``numerics.weight_row_scales``: the bf16-ceiled per-row scale from the [out, 1] absmax column."""
    return numerics.weight_row_scales(absmax, mode)


def quantize_rows(w: np.ndarray, scale: np.ndarray, low: int) -> np.ndarray:
    """int8 ``clip(rint(float64(w) / float64(scale[:, None])), low, 127)`` for a float32 [out, in] weight, in one
    pass (without numba: ``numerics.quantize_rows``, the same values)."""
    if not AVAILABLE:
        return numerics.quantize_rows(w, scale, low)
    q = np.empty(w.shape, np.int8)
    _quantize_rows(w, scale, float(low), q)
    return q


def _fp8_checked(codes: np.ndarray, scale_inv: np.ndarray):
    """(contiguous uint8 codes, float32 scales, row absmax) when the fused kernels apply and every value is finite,
    else None."""
    rows, cols = codes.shape
    if not AVAILABLE or scale_inv.shape != (-(-rows // BLOCK), -(-cols // BLOCK)) or not cols:
        return None
    codes = np.ascontiguousarray(codes.view(np.uint8))
    scale_inv = np.ascontiguousarray(scale_inv, dtype=np.float32)
    absmax = np.empty(rows, np.float32)
    _fp8_row_absmax(codes, scale_inv, FP8_TO_F32, absmax)
    return (codes, scale_inv, absmax) if np.isfinite(absmax).all() else None


def quantize_fp8(codes: np.ndarray, scale_inv: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``numerics.quantize_weight(decode_fp8(codes, scale_inv), mode)`` without a float32 weight: (int8 q, float32
    scale), or None when numba is missing or a value is not finite (the caller's numpy path then decodes and
    reports it). ``codes``: FP8 bytes [rows, cols] whose row 0 starts a 128-row band; ``scale_inv``: float32
    [ceil(rows/128), ceil(cols/128)]."""
    checked = _fp8_checked(codes, scale_inv)
    if checked is None:
        return None
    codes, scale_inv, absmax = checked
    scale = row_scales(absmax[:, None], mode)
    q = np.empty(codes.shape, np.int8)
    _quantize_fp8(codes, scale_inv, scale, float(-128 if mode == "gs" else -127), q)
    return q, scale


def fp8_to_bf16(codes: np.ndarray, scale_inv: np.ndarray) -> np.ndarray | None:
    """``decode_fp8(codes, scale_inv).astype(bfloat16)`` in one pass, or None as ``quantize_fp8``."""
    checked = _fp8_checked(codes, scale_inv)
    if checked is None:
        return None
    out = np.empty(checked[0].shape, np.uint16)
    _fp8_to_bf16(checked[0], checked[1], out)
    return out.view(ml_dtypes.bfloat16)


def all_finite(values: np.ndarray) -> bool:
    """``np.isfinite(values).all()``; for bfloat16 a bit test (faster than ml_dtypes' isfinite)."""
    if AVAILABLE and values.dtype == ml_dtypes.bfloat16:
        return _count_nonfinite_bf16(np.ascontiguousarray(values).reshape(-1).view(np.uint16)) == 0
    return bool(np.isfinite(values).all())
