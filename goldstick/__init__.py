"""goldstick: MindSpore-native post-training quantization for DeepSeek-V3/R1.

The public API is a few verbs and config objects:

    import goldstick
    net = goldstick.load_model("path/to/checkpoint")        # MindSpore nn.Cell, logits = net(ids)
    path = goldstick.make_model("out/")                      # the embedded tiny DeepSeek-V3 model
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module; imported on first use so that `import goldstick` (and the CLI's --help) stays fast
_LAZY = {
    "load_model": "goldstick.loader",
    "ModelConfig": "goldstick.config",
    "CheckpointReader": "goldstick.checkpoint",
    "CheckpointError": "goldstick.checkpoint",
    "make_model": "goldstick.make_model",
    "default_model_path": "goldstick.make_model",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'goldstick' has no attribute {name!r}")
