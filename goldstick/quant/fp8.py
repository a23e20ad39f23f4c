"""DeepSeek-V3/R1 release format: float8_e4m3fn weights with one float32 ``weight_scale_inv`` per 128x128 block.

The scale grid is ceil(rows/128) x ceil(cols/128); a block on the ragged edge is simply smaller.
Dequantization is ``W[block] = fp8[block] * scale_inv[block]`` (README_WEIGHTS.md of DeepSeek-V3: despite the
name, scale_inv is the dequantization multiplier).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BLOCK = 128
FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(FP8).max)  # 448.0

# safetensors' numpy backend looks the dtype up as np.float8_e4m3fn (absent from numpy 1.x); give it ml_dtypes'.
if not hasattr(np, "float8_e4m3fn"):
    np.float8_e4m3fn = FP8

# fp8 byte -> float32, for a fast lookup-table dequantization (NaN codes map to NaN as they should)
FP8_TO_F32 = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)


def scale_grid_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    rows, cols = shape
    return (-(-rows // block), -(-cols // block))


def _expand(scale_inv: np.ndarray, shape: tuple[int, int], block: int) -> np.ndarray:
    rows, cols = shape
    return np.repeat(np.repeat(scale_inv, block, axis=0)[:rows], block, axis=1)[:, :cols]


def dequantize_fp8_blocks(weight: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """float8_e4m3fn [rows, cols] and float32 scale_inv [ceil(rows/b), ceil(cols/b)] -> float32 [rows, cols]."""
    if weight.ndim != 2:
        raise ValueError(f"FP8 block weights must be 2-D, got shape {weight.shape}")
    if weight.dtype.itemsize != 1:  # the lookup table below reads one byte per element
        raise ValueError(f"FP8 block weights hold one byte per element (float8_e4m3fn), got {weight.dtype}")
    expected = scale_grid_shape(weight.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a weight of "
                         f"shape {tuple(weight.shape)} with {block}x{block} blocks")
    values = FP8_TO_F32[np.ascontiguousarray(weight).view(np.uint8)]
    cols = weight.shape[1]
    # one band of `block` rows at a time: the scale temporary is one row long, not the whole tensor
    for band, scales in enumerate(scale_inv.astype(np.float32)):
        values[band * block:(band + 1) * block] *= np.repeat(scales, block)[:cols]
    return values


def quantize_fp8_blocks(weight: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """float32 [rows, cols] -> (float8_e4m3fn weight, float32 scale_inv), amax/448 per block as DeepSeek does."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"FP8 block weights must be 2-D, got shape {w.shape}")
    gr, gc = scale_grid_shape(w.shape, block)
    padded = np.zeros((gr * block, gc * block), dtype=np.float32)
    padded[: w.shape[0], : w.shape[1]] = np.abs(w)
    amax = padded.reshape(gr, block, gc, block).max(axis=(1, 3))
    scale_inv = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = (w / _expand(scale_inv, w.shape, block)).astype(FP8)
    return q, scale_inv
