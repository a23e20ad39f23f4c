"""MindSpore set-up for CPU work: PyNative (so forward hooks work) with synchronous dispatch.

The default asynchronous PyNative dispatch busy-waits an extra thread, which on a small CPU slows every block
down (notes/mindspore-cpu.md §2); ``launch_blocking`` removes it.
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
    # MindSpore's import leaves a large number of long-lived objects that every full collection walks, and
    # release_memory collects once or twice per layer. Freezing them makes a collection cheap; frozen objects are
    # still freed by reference counting, only cycles among them would stay.
    import gc

    gc.freeze()
    _READY = True


def keep_ctrl_c() -> None:
    """Give Ctrl-C back to Python's handler (KeyboardInterrupt: goldstick's message and exit status 130). During a
    layer run on CPU, MindSpore's runtime puts a native SIGINT handler in place of Python's, which ends the process
    by SIGTERM (measured with 2.10); installing Python's handler again (the caller's own, a notebook's say, or the
    default) undoes that. A SIGINT that is ignored or left to the system stays so."""
    import signal
    import threading

    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread() and callable(handler):
        signal.signal(signal.SIGINT, handler)


def release_memory(collect: bool = True) -> None:
    """Collect garbage (``collect``; cheap once setup_mindspore has frozen MindSpore's objects) and give freed heap
    memory back to the OS.

    glibc raises its mmap threshold after a big block is freed, so later float32 weights come from the heap and
    stay in the RSS after they are freed (a 16-expert layer: ~700 MB, measured); malloc_trim returns them.
    """
    import ctypes
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
