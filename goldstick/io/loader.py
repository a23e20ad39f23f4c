"""``load_model(path)``: a checkpoint directory -> the MindSpore network with its weights.

A float checkpoint (F32/BF16/F16/FP8-block) builds the plain network. A quantized checkpoint (a description file
or a compressed-tensors config: ``goldstick.io.export.detect_format``) builds the same network with the quantized
linear cells of its schemes (``goldstick.quant.schemes``: the CPU twins of ``goldstick.quant.cells`` or the Ascend
cells) swapped in, loaded from the stored int8 weights and scales; its logits equal those the engine measured.

MindSpore is imported when a model is built (``setup_mindspore`` first), not when this module is.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from goldstick.errors import UsageError
from goldstick.io.checkpoint import CheckpointError, CheckpointReader, nonfinite_problem
from goldstick.io.export import detect_format, open_source
from goldstick.io.verification import verify as verify_checkpoint
from goldstick.model.runtime import setup_mindspore
from goldstick.quant.schemes import FLOAT_LABEL

BACKENDS = ("cpu", "ascend")


def load_model(path: str | Path, backend: str = "cpu", progress: bool = False, group_experts: bool = True,
               verify: bool = False):
    """Build ``DeepseekV3ForCausalLM`` from a checkpoint folder, float or quantized.

    ``backend`` chooses the quantized cells: ``cpu`` (the exact integer twin, runs here) or ``ascend`` (the
    Ascend kernels; built and checked structurally here, run on an NPU). Weights are read layer by layer through
    the memory-mapped reader. The MTP layer (index num_hidden_layers) is not part of the main network.
    On ``ascend`` the routed experts of each MoE layer run as one grouped matmul per projection
    (``group_experts=False`` keeps one cell per expert).
    Quantized checkpoints load from every layout goldstick writes (goldstick.io.layouts: ascend, vllm-ascend,
    golden-stick, mindspore, compressed-tensors) and from msModelSlim's (the ascend layout), each with the cells
    that compute what its stack computes.

    Every shard's header is checked before use (byte ranges inside the file and not overlapping, sizes matching
    dtype x shape, shapes matching config.json: ``CheckpointReader``). ``verify=True`` first runs the full
    ``goldstick.verify`` (sha256 of every file against manifest.json, the description, finite positive scales) and
    raises ``VerifyError`` listing every problem; it needs a checkpoint goldstick wrote (one with a manifest).
    A float checkpoint with NaN or Inf weights loads with a warning naming the tensor (``quantize`` refuses it).
    """
    if backend not in BACKENDS:
        raise UsageError(f"backend {backend!r} is not one of {BACKENDS}")
    if verify:
        verify_checkpoint(path).raise_if_failed()
    setup_mindspore()
    from goldstick.model.network import DeepseekV3ForCausalLM

    if detect_format(path) is not None:
        net = _load_quantized(path, backend)
    else:
        reader = CheckpointReader(path)
        net = DeepseekV3ForCausalLM(reader.config)
        net.load_weights(_warn_nonfinite(reader, reader.read_globals()))
        for _, tensors in reader.iter_layers(progress=progress):
            net.load_weights(_warn_nonfinite(reader, tensors))
    if backend == "ascend" and group_experts:
        from goldstick.quant.ascend import group_routed_experts

        group_routed_experts(net)  # one GroupedMatmul per projection instead of the per-expert loop
    net.set_train(False)
    return net


def _warn_nonfinite(reader: CheckpointReader, tensors: dict) -> dict:
    """A float model with NaN/Inf weights still loads (to inspect it), with a warning naming each such tensor."""
    for name, values in tensors.items():
        problem = nonfinite_problem(reader.file_of(name), name, values)
        if problem:
            warnings.warn(f"{problem}; the model's outputs will not be finite", RuntimeWarning, stacklevel=3)
    return tensors


def _load_quantized(path, backend: str):
    """A quantized checkpoint of any layout, read as the engine's stream (goldstick.io.export.open_source: RoPE rows
    back in HF order, per-tensor or per-channel static forms as stored), so it gets the cells of its layout."""
    from goldstick.model.network import DeepseekV3ForCausalLM
    from goldstick.quant.cells import cell_from_tensors, replace_cell

    source = open_source(path)
    net = DeepseekV3ForCausalLM(source.config)
    floats, cells, norm_biases = {}, [], {}
    for name, label, value in source.entries(include_mtp=False):
        if label == FLOAT_LABEL:
            target = norm_biases if name.endswith("layernorm.bias") else floats
            target[name] = np.asarray(value, dtype=np.float32)
            continue
        try:
            cells.append((name, cell_from_tensors(label, value, name, backend=backend)))
        except ValueError as exc:
            raise CheckpointError(f"{source.path.name}: {exc}") from None
    net.load_weights(floats)
    for name, cell in cells:
        replace_cell(net, name, cell)
    for name, bias in norm_biases.items():
        norm = net
        for part in name.rsplit(".", 1)[0].split("."):
            norm = norm[int(part)] if part.isdigit() else getattr(norm, part)
        norm.set_bias(bias, name)
    return net
