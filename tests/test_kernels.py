"""goldstick.quant.kernels: the fused numba kernels give the numpy reference's values exactly.

The reference is the numpy code the streaming path runs without numba:
``numerics.quantize_weight`` (its numpy loop) on ``stream.decode_fp8``'s float32 values, and ``astype(bfloat16)`` of
those values for the float tensors.
"""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from goldstick.engine.stream import decode_fp8
from goldstick.quant import kernels
from goldstick.quant.fp8 import FP8_TO_F32
from goldstick.quant.numerics import quantize_weight

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")

BF16 = ml_dtypes.bfloat16
FINITE_CODES = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)


def numpy_reference(codes, scale_inv, mode, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(kernels, "AVAILABLE", False)
        return quantize_weight(decode_fp8(codes, scale_inv), mode)


def fp8_weight(rng, shape, scale_range=(1e-4, 10.0)):
    """Random FP8 codes (every finite code, both zeros) with edge rows, and random block scales."""
    rows, cols = shape
    codes = rng.choice(FINITE_CODES, size=shape).astype(np.uint8)
    edges = [np.zeros(cols, np.uint8),                          # all +0: scale 1, codes 0
             np.full(cols, 0x80, np.uint8),                     # all -0
             rng.choice([0x00, 0x80, 0x7E, 0xFE], cols).astype(np.uint8),  # +-448 (the largest) and zeros
             rng.choice(np.r_[1:8, 0x81:0x88], cols).astype(np.uint8),    # subnormal codes only
             np.full(cols, 0x01, np.uint8)]                     # one subnormal value, repeated
    for k, row in enumerate(edges[:rows]):
        codes[k] = row
    grid = (-(-rows // 128), -(-cols // 128))
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    scale_inv = np.exp(rng.uniform(lo, hi, grid)).astype(np.float32)
    return codes, scale_inv


SHAPES = [(256, 384), (128, 7168), (200, 300), (130, 129), (5, 1), (1, 2048), (384, 128)]


@pytest.mark.parametrize("mode", ["absmax127", "gs"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fused_fp8_quantize_equals_the_numpy_path(shape, mode, monkeypatch):
    rng = np.random.default_rng(sum(shape))
    for scale_range in [(1e-4, 10.0), (1e-30, 1e-25), (1e30, 7e35)]:  # typical, tiny (subnormal products), huge
        codes, scale_inv = fp8_weight(rng, shape, scale_range)
        fused = kernels.quantize_fp8(codes, scale_inv, mode)
        assert fused is not None
        q, scale = fused
        rq, rscale = numpy_reference(codes, scale_inv, mode, monkeypatch)
        assert q.dtype == np.int8 and scale.dtype == np.float32 and q.shape == shape
        assert np.array_equal(scale, rscale) and np.array_equal(q, rq)
    assert np.array_equal(q[0], np.zeros(shape[1], np.int8)) and scale[0] == 1.0  # all-zero row


@pytest.mark.parametrize("mode", ["absmax127", "gs"])
def test_fused_quantize_hits_ties_and_both_clip_edges_as_the_numpy_path(mode, monkeypatch):
    """Quotients exactly on .5 (rint to even) and on +-absmax, as the float64 division decides them: every row's
    absmax is 1.0 * (127 or 127.5) * 2^j, so its scale is exactly 2^j, and the other blocks' scales are powers of
    two, so LUT[code] * 2^(i-j) lands on many halves."""
    rng = np.random.default_rng(7)
    codes = rng.choice(FINITE_CODES[(FINITE_CODES & 0x7F) <= 0x6F], size=(256, 512)).astype(np.uint8)  # |v| <= 120
    codes[:, :128] &= 0xB7  # block 0: |v| < 1 ...
    codes[:, 0], codes[:, 1] = 0x38, 0xB8  # ... but for +1.0 and -1.0: +-absmax in every row
    j = rng.integers(-10, 10, (2, 1))
    scale_inv = np.ldexp(1.0, j + rng.integers(-3, 1, (2, 4))).astype(np.float32)
    scale_inv[:, :1] = np.ldexp(127.5 if mode == "gs" else 127.0, j)
    q, scale = kernels.quantize_fp8(codes, scale_inv, mode)
    rq, rscale = numpy_reference(codes, scale_inv, mode, monkeypatch)
    assert np.array_equal(q, rq) and np.array_equal(scale, rscale)
    assert np.array_equal(scale, np.ldexp(1.0, np.repeat(j[:, 0], 128)).astype(np.float32))
    ratio = decode_fp8(codes, scale_inv).astype(np.float64) / scale.astype(np.float64)[:, None]
    assert (ratio - np.floor(ratio) == 0.5).sum() > 1000  # exact ties were exercised
    assert (q[:, 0] == 127).all() and (q[:, 1] == (-128 if mode == "gs" else -127)).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fused_fp8_to_bf16_equals_the_numpy_path(shape):
    rng = np.random.default_rng(sum(shape) + 1)
    for scale_range in [(1e-4, 10.0), (1e-42, 1e-38), (7.57e35, 7.59e35)]:  # typical, subnormal, rounding to bf16 inf
        codes, scale_inv = fp8_weight(rng, shape, scale_range)
        fused = kernels.fp8_to_bf16(codes, scale_inv)
        assert fused is not None and fused.dtype == BF16 and fused.shape == shape
        ref = decode_fp8(codes, scale_inv).astype(BF16)
        assert np.array_equal(fused.view(np.uint16), ref.view(np.uint16))


def test_every_fp8_code_decodes_as_the_lookup_table():
    codes = np.tile(FINITE_CODES, (3, 1))  # 254 columns: one ragged block
    scale_inv = np.array([[1.0, 1.0]], np.float32)
    assert np.array_equal(kernels.fp8_to_bf16(codes, scale_inv).view(np.uint16),
                          FP8_TO_F32[codes].astype(BF16).view(np.uint16))
    q, scale = kernels.quantize_fp8(codes, scale_inv, "absmax127")
    lut = FP8_TO_F32[FINITE_CODES].astype(np.float64)
    assert np.array_equal(q[0], np.clip(np.rint(lut / np.float64(scale[0])), -127, 127).astype(np.int8))


@pytest.mark.parametrize("bad", ["nan code 0x7f", "nan code 0xff", "inf scale", "nan scale", "overflow"])
def test_non_finite_values_are_left_to_the_numpy_path(bad):
    """quantize_fp8 / fp8_to_bf16 return None, and the caller's numpy path raises its usual error."""
    rng = np.random.default_rng(3)
    codes, scale_inv = fp8_weight(rng, (256, 256))
    if bad.startswith("nan code"):
        codes[130, 77] = int(bad[-4:], 16)
    elif bad == "inf scale":
        scale_inv[1, 0] = np.inf
    elif bad == "nan scale":
        scale_inv[0, 1] = np.nan
    else:
        codes[3, 3], scale_inv[0, 0] = 0x7E, 1e37  # 448 * 1e37 overflows float32
    assert kernels.quantize_fp8(codes, scale_inv, "absmax127") is None
    assert kernels.fp8_to_bf16(codes, scale_inv) is None
    with np.errstate(invalid="ignore", over="ignore"):
        assert not np.isfinite(decode_fp8(codes, scale_inv)).all()


def test_float32_rows_kernel_equals_the_numpy_loop(monkeypatch):
    rng = np.random.default_rng(5)
    for shape in [(300, 7168), (80, 256), (3, 5), (1, 9), (0, 4)]:
        w = rng.standard_normal(shape, dtype=np.float32) * rng.uniform(1e-4, 30, (shape[0], 1)).astype(np.float32)
        for mode in ("absmax127", "gs"):
            q, s = quantize_weight(w, mode, rows=kernels.quantize_rows)
            with monkeypatch.context() as m:
                m.setattr(kernels, "AVAILABLE", False)
                assert np.array_equal(quantize_weight(w, mode, rows=kernels.quantize_rows)[0], q)  # the fallback
            rq, rs = quantize_weight(w, mode)  # the layer path's numpy loop
            assert np.array_equal(q, rq) and np.array_equal(s, rs)


def test_all_finite(monkeypatch):
    rng = np.random.default_rng(0)
    for chunk in (kernels.FINITE_CHUNK, 7):  # one step, and many (a value in the last, partial one)
        monkeypatch.setattr(kernels, "FINITE_CHUNK", chunk)
        for dtype in (BF16, np.float32):
            a = rng.standard_normal((64, 300)).astype(dtype)
            assert kernels.all_finite(a) and kernels.all_finite(a[:, 1:])  # a strided view too
            assert kernels.all_finite(a[:0])
            for bad in (np.inf, -np.inf, np.nan):
                for where in ((63, 299), (0, 0), (31, 150)):
                    b = a.copy()
                    b[where] = bad
                    assert not kernels.all_finite(b)


def test_numba_is_imported_by_the_first_kernel_only():
    """A process that runs no kernel (the layer path) does not load numba; all_finite is numpy."""
    code = """
import sys
import ml_dtypes
import numpy as np
from goldstick.quant import kernels
assert kernels.AVAILABLE and "numba" not in sys.modules
assert kernels.all_finite(np.ones((300, 7), ml_dtypes.bfloat16)) and "numba" not in sys.modules
q = kernels.quantize_rows(np.ones((2, 3), np.float32), np.ones(2, np.float32), -127)
assert (q == 1).all() and "numba" in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_without_numba_the_numpy_code_runs():
    """numba missing (here: its import fails) -> AVAILABLE False, the fused entry points say so, quantize_weight
    still works."""
    code = """
import sys
sys.modules["numba"] = None  # import numba -> ImportError
import numpy as np
from goldstick.quant import kernels
from goldstick.quant.numerics import quantize_weight
assert not kernels.AVAILABLE
codes = np.ones((128, 128), np.uint8)
assert kernels.quantize_fp8(codes, np.ones((1, 1), np.float32), "absmax127") is None
assert kernels.fp8_to_bf16(codes, np.ones((1, 1), np.float32)) is None
w = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], np.float32)
q, s = quantize_weight(w, "absmax127", rows=kernels.quantize_rows)
assert np.array_equal(q, np.clip(np.rint(w.astype(np.float64) / s[:, None].astype(np.float64)), -127, 127))
assert s[1] == 1.0 and not q[1].any()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
