"""What the layer loop feeds each layer: the calibration batches cut to bounded forward sizes (with their rotary
tables and masks), and the layer's checkpoint tensors, read one at a time and refused if not finite."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from goldstick.engine.calibration import CalibrationSet
from goldstick.io.checkpoint import CheckpointError, CheckpointReader, nonfinite_problem


def batch_rows(cfg, seq_len: int, score_budget: int = 1 << 21, hidden_budget: int = 1 << 20) -> int:
    """Sequences per forward batch: attention scores [rows, heads, seq, seq] within ``score_budget`` elements and
    hidden states [rows * seq, hidden] within ``hidden_budget`` (8 MB / 4 MB in float32), at least one sequence.
    MindSpore's CPU memory pool keeps its peak for the life of the process, so the biggest batch's temporaries set
    the RSS. Measured on the wide benchmark model (hidden 2048, 16 heads, seq 256): these budgets (4 sequences)
    against twice them, 4 % more time and 100 MB less peak; 16-sequence batches, the same time and 1 GB more."""
    per_scores = cfg.num_attention_heads * seq_len * seq_len
    per_hidden = seq_len * cfg.hidden_size
    return max(1, min(score_budget // per_scores, hidden_budget // per_hidden))


def prepare_batches(cfg, calib: CalibrationSet) -> list:
    """The calibration batches as the layers run them: (ids, cos, sin, mask) per forward batch of ``batch_rows``
    sequences (MindSpore tensors but for the ids)."""
    from mindspore import Tensor

    from goldstick.model.network import RotaryTables, positions_and_mask

    rotary = RotaryTables(cfg)
    prepared = []
    for whole in calib.batches:
        rows = batch_rows(cfg, whole.shape[1])
        for start in range(0, len(whole), rows):
            ids = whole[start:start + rows]
            positions, mask = positions_and_mask(Tensor(ids), None)
            cos, sin = rotary(positions)
            prepared.append((ids, cos, sin, mask))
    return prepared


class LayerTensors(Mapping):
    """A layer's checkpoint tensors, each read (and refused if not finite) when asked for."""

    def __init__(self, reader: CheckpointReader, layer: int):
        self.reader, self.names = reader, reader.layer_tensor_names(layer)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        return read_finite(self.reader, name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def read_finite(reader: CheckpointReader, name: str) -> np.ndarray:
    """``reader.read(name)``, refused if it holds NaN or Inf: they would turn scales and every later layer's
    calibration into NaN and still produce a checkpoint that looks complete."""
    values = reader.read(name)
    problem = nonfinite_problem(reader.file_of(name), name, values)
    if problem:
        raise CheckpointError(f"{problem}; goldstick refuses to quantize a checkpoint with non-finite weights")
    return values
