"""The numba kernels behind goldstick.quant.kernels (which says what each computes and gives the numpy fallback).

Importing this module imports numba; goldstick.quant.kernels does so on the first call that needs a kernel, so a
process that never does (the layer path, which stays on numpy) loads neither numba nor its cached code. Compiled
once per machine (``cache=True``: goldstick/quant/__pycache__), single-threaded (``nogil``: the executor already
runs one process or thread per core).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def fp8_row_absmax(codes, scale_inv, lut, out):
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


@numba.njit(cache=True, nogil=True)
def decode_row(row, srow, bits, f):
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


@numba.njit(cache=True, nogil=True)
def quantize_fp8(codes, scale_inv, row_scale, low, out):
    rows, cols = codes.shape
    bits = np.empty(cols, np.uint32)
    f = bits.view(np.float32)
    for r in range(rows):
        decode_row(codes[r], scale_inv[r // 128], bits, f)
        d, q = np.float64(row_scale[r]), out[r]
        for k in range(cols):
            q[k] = np.int8(min(max(np.rint(np.float64(f[k]) / d), low), 127.0))


@numba.njit(cache=True, nogil=True)
def fp8_to_bf16(codes, scale_inv, out):
    """out: the bf16 bits (uint16) of the decoded float32 values, rounded to nearest even as ml_dtypes does
    (the values are finite)."""
    rows, cols = codes.shape
    bits = np.empty(cols, np.uint32)
    f = bits.view(np.float32)
    for r in range(rows):
        decode_row(codes[r], scale_inv[r // 128], bits, f)
        o = out[r]
        for k in range(cols):
            u = bits[k]
            o[k] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@numba.njit(cache=True, nogil=True)
def quantize_rows(w, row_scale, low, out):
    rows, cols = w.shape
    for r in range(rows):
        d, q, row = np.float64(row_scale[r]), out[r], w[r]
        for k in range(cols):
            q[k] = np.int8(min(max(np.rint(np.float64(row[k]) / d), low), 127.0))
