"""A server's network without MindSpore's per-launch memory: the primitives its cells hold run on the host.

On CPU, MindSpore 2.10's eager (PyNative) execution copies every non-tensor argument of an op (MatMul's transpose
flags, Softmax's axis, Gather's axis, a Cast's dtype, ...) into a block of its memory pool that is never freed:
about 0.5 KB per such argument per launch, 1.0-1.4 KB per matmul, whatever the shapes, returned neither by a
garbage collection, ``mindspore.runtime.empty_cache`` nor ``malloc_trim``. A forward launches hundreds of matmuls
(every linear, expert and attention product), so an eager server grew by a few hundred KB per request
(``benchmarks/serve_load.py --matmul-probe`` shows the per-launch memory). The network's ops that take such
arguments are all primitives its cells hold (the linears' and the router's matmul, the quantized cells' matmul,
attention's matmul and softmax, the embedding's gather); its other device ops take tensors only (elementwise ops,
reshapes, slices) and keep nothing, and the rest already runs on the host.

``host_primitives(net)`` replaces each of those primitives by its numpy equivalent (``HostPrimitive``), as
``goldstick.model.network`` already runs the broadcasting elementwise ops on CPU: the same float32 maths on
zero-copy views of the tensors, no launch, nothing kept per call or per input shape, and cheaper than a kernel
launch for a decode step's small products. A product of integer-valued operands (the int8 twin's W8A8 matmuls) is
exact either way, so it gives the eager bits; a float product can differ from MindSpore's kernel in the last bit
(another summation order), as padding and batching move it too.

Running the primitives compiled instead (``mindspore.jit``, one dynamic-shape graph each) also keeps nothing per
call and gives the eager bits, but costs more per call than an eager launch and keeps far more per new input shape
(several MB per new prompt length for the network), which a server meets all the time.
"""

from __future__ import annotations

import numpy as np

from goldstick.model.runtime import setup_mindspore


def _matmul(transpose_a: bool, transpose_b: bool):
    def run(a, b):
        x, y = a.asnumpy(), b.asnumpy()
        return np.matmul(np.swapaxes(x, -1, -2) if transpose_a else x, np.swapaxes(y, -1, -2) if transpose_b else y)
    return run


def _softmax(axis: int):
    def run(x):
        a = x.asnumpy()
        e = np.exp(a - a.max(axis, keepdims=True))
        e /= e.sum(axis, keepdims=True)
        return e
    return run


def _gather(params, indices, axis: int):
    return np.take(params.asnumpy(), indices.asnumpy(), axis=axis)


def host_function(primitive):
    """The numpy function computing ``primitive(*tensors)`` (returning an array), or None for one it lacks."""
    kind, attrs = type(primitive).__name__, primitive.attrs
    if kind in ("MatMul", "BatchMatMul"):
        return _matmul(bool(attrs.get("transpose_a")), bool(attrs.get("transpose_b")))
    if kind == "MatMulExt":  # ops.matmul: broadcasting batch dimensions, as np.matmul
        return _matmul(False, False)
    if kind == "Softmax" and len(tuple(attrs.get("axis", ()))) == 1:
        return _softmax(int(tuple(attrs["axis"])[0]))
    if kind == "Gather" and not attrs.get("batch_dims"):
        return _gather
    return None


class HostPrimitive:
    """A primitive computed by numpy on the host: tensors in, a tensor viewing the result out."""

    def __init__(self, primitive, function):
        self.primitive, self.function = primitive, function

    def __call__(self, *args):
        from mindspore import Tensor

        return Tensor.from_numpy(np.ascontiguousarray(self.function(*args)))

    def __repr__(self) -> str:
        return f"HostPrimitive({self.primitive!r})"


def host_primitives(net) -> tuple[int, list[str]]:
    """On CPU, make every primitive held by a cell of ``net`` that has a numpy equivalent a ``HostPrimitive``
    (elsewhere nothing changes). Returns how many were replaced and the kinds of those left as they were."""
    setup_mindspore()
    import mindspore as ms
    from mindspore.ops import Primitive

    if ms.get_context("device_target") != "CPU":
        return 0, []
    replaced, kept = 0, set()
    for _, cell in net.cells_and_names():
        for name, value in list(vars(cell).items()):
            if not isinstance(value, Primitive):
                continue
            function = host_function(value)
            if function is None:
                kept.add(type(value).__name__)
                continue
            setattr(cell, name, HostPrimitive(value, function))
            replaced += 1
    return replaced, sorted(kept)
