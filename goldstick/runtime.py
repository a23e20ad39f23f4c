"""MindSpore set-up for CPU work: PyNative (so forward hooks work) with synchronous dispatch.

Measured on this class of machine (notes/mindspore-cpu.md §2): the default asynchronous PyNative dispatch
busy-waits a third thread on 2 cores and runs a transformer block ~3.7x slower; ``launch_blocking`` removes it.
"""

from __future__ import annotations

import os

_READY = False


def setup_mindspore() -> None:
    """Idempotent: CPU device, PyNative mode, blocking launch, quiet logs."""
    global _READY
    if _READY:
        return
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logging: errors only
    import mindspore as ms

    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.runtime.launch_blocking()
    _READY = True
