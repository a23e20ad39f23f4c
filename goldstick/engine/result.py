"""What ``quantize`` returns or raises, on either path (layers or stream)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from goldstick.errors import GoldstickError
from goldstick.quant.plan import Plan


class QuantizeError(GoldstickError, RuntimeError):
    """A quantization run that cannot go on (its output folder, its options, what it reads)."""


class QuantizeInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``quantize``; the message says how to continue (the work folder is left resumable)."""


@dataclass
class QuantizeResult:
    """The output folder, the plan and the report (the streaming path adds ``stream``: its StreamStats)."""

    out: Path
    plan: Plan
    report: dict
    final_logits: np.ndarray | None = None  # quantized logits of the first calibration batch, from the engine
