"""The layer path's weight quantization as executor work units (goldstick.engine.layer calls ``quantize_weights``).

A layer's weight-only and dynamic linears (for R1: 256 routed experts x 3 projections + the shared expert) are
quantized independently of calibration and of each other. Each is one unit: a ``StoredWeight`` names the tensor in
the checkpoint, the unit reads it where it runs (an FP8 weight goes from its codes straight to int8 with
goldstick.quant.kernels, the values ``numerics.quantize_weight`` gives on the decoded float32 weight) and only the
int8 weight and its scales come back. On the executor (``--workers N`` local processes, or Ray) or in this process,
the bytes are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from goldstick.engine.inputs import read_finite
from goldstick.io.checkpoint import SCALE_SUFFIX, CheckpointReader
from goldstick.quant import kernels
from goldstick.quant.numerics import quantize_weight

PARALLEL_WEIGHT_PARAMS = 1 << 28  # by default, a layer's weight quantization goes to the executor from this size


@dataclass(frozen=True)
class StoredWeight:
    """A weight to quantize named by where it is stored (a picklable unit: the worker reads it itself)."""

    model: str  # checkpoint folder
    name: str  # tensor name
    mode: str  # weight rounding


def quantize_weight_unit(unit: StoredWeight | tuple[np.ndarray, str]) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_weight`` as an executor work unit (a module-level function: picklable): of ``(w, mode)``, or of a
    ``StoredWeight`` read where the unit runs."""
    if isinstance(unit, StoredWeight):
        return quantize_stored(_open_reader(unit.model), unit.name, unit.mode)
    return quantize_weight(*unit)


def quantize_stored(reader: CheckpointReader, name: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_weight(read_finite(reader, name), mode)``; an FP8 weight without its float32 copy."""
    if reader.dtype(name) == "F8_E4M3":
        fused = kernels.quantize_fp8(reader.read_raw(name), reader.read(name + SCALE_SUFFIX), mode)
        if fused is not None:  # None: no numba, or a value that is not finite (read_finite reports it)
            return fused
    return quantize_weight(read_finite(reader, name), mode)


@functools.lru_cache(maxsize=2)
def _open_reader(path: str) -> CheckpointReader:
    """One reader per checkpoint and worker process (opening one reads every shard header)."""
    return CheckpointReader(path)


def quantize_weights(names: list[str], source: Mapping, weight: Callable[[str], np.ndarray], executor,
                     mode: str) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """(int8, scale) of every weight of ``names``, in order. ``source`` a LayerTensors (units name their weight;
    else the float32 ``weight(name)`` travels); on ``executor`` when there is more than one and their parameters
    reach its ``min_params``, else here. None: the caller quantizes that one itself."""
    reader = getattr(source, "reader", None)
    params = sum(int(np.prod(reader.shape(n))) for n in names) if reader is not None else None
    parallel = (executor is not None and len(names) > 1
                and (params is None or params >= getattr(executor, "min_params", 0)))
    if reader is not None:
        units = [StoredWeight(str(reader.path), n, mode) for n in names]
        if parallel:
            return executor.map(quantize_weight_unit, units)
        return [quantize_stored(reader, n, mode) for n in names]
    if parallel:
        return executor.map(quantize_weight_unit, [(weight(n), mode) for n in names])
    return [None] * len(names)
