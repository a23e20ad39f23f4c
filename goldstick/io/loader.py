"""``load_model(path)``: a checkpoint directory -> the MindSpore network with its weights.

A float checkpoint (F32/BF16/F16/FP8-block) builds the plain network. A quantized checkpoint (one that holds a
``quantization_description.json``) builds the same network with the quantized linear cells of its schemes
(``goldstick.quant.schemes``: the CPU twins of ``goldstick.quant.cells`` or the Ascend cells) swapped in, loaded
from the stored int8 weights and scales; its logits equal those the engine measured.

MindSpore is imported when a model is built (``setup_mindspore`` first), not when this module is.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from goldstick.errors import UsageError
from goldstick.io.checkpoint import CheckpointError, CheckpointReader, nonfinite_problem
from goldstick.io.export import COMPRESSED_TENSORS, DESCRIPTION_FILE, CompressedTensorsSource, detect_format
from goldstick.io.verification import verify as verify_checkpoint
from goldstick.model.architecture import layer_of
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
    Quantized checkpoints load from either goldstick format: mindspore (``quantization_description.json``) or
    compressed-tensors (converted to the same cells by ``goldstick.io.export``, so the logits are the same).

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

    if detect_format(path) == COMPRESSED_TENSORS:
        net = _load_compressed_tensors(path, backend)
    else:
        reader = CheckpointReader(path)
        net = DeepseekV3ForCausalLM(reader.config)
        description = Path(path) / DESCRIPTION_FILE
        if description.exists():
            _load_quantized(net, reader, description, backend)
        else:
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


def _load_quantized(net, reader: CheckpointReader, description: Path, backend: str) -> None:
    from goldstick.quant.cells import cell_from_tensors, replace_cell

    try:
        labels = json.loads(description.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{description}: not valid JSON ({exc})") from None
    cfg = reader.config
    quantized: dict[str, dict] = defaultdict(dict)
    floats, norm_biases = {}, {}
    for name in reader.names():
        layer = layer_of(name)
        if layer is not None and layer >= cfg.num_hidden_layers:
            continue  # MTP: passed through, not part of the main network
        label = labels.get(name)
        if label is None:
            raise CheckpointError(f"{description.name}: tensor '{name}' (in {reader.file_of(name)}) has no label")
        if label == FLOAT_LABEL:
            if name.endswith("layernorm.bias"):
                norm_biases[name] = reader.read(name)
            else:
                floats[name] = reader.read(name)
        else:
            owner, _, local = name.rpartition(".")
            quantized[owner][local] = reader.read_raw(name)
            quantized[owner]["__label__"] = label
    net.load_weights(floats)
    for owner, tensors in quantized.items():
        label = tensors.pop("__label__")
        try:
            cell = cell_from_tensors(label, tensors, owner, backend=backend)
        except ValueError as exc:
            raise CheckpointError(f"{reader.path.name}: {exc}") from None
        replace_cell(net, owner, cell)
    for name, bias in norm_biases.items():
        norm_path = name.rsplit(".", 1)[0]
        norm = net
        for part in norm_path.split("."):
            norm = norm[int(part)] if part.isdigit() else getattr(norm, part)
        norm.set_bias(bias, name)


def _load_compressed_tensors(path, backend: str):
    """A compressed-tensors checkpoint written by goldstick: converted linear by linear to the mindspore layout
    (goldstick.io.export.CompressedTensorsSource), so it gets the same cells and the same logits."""
    from goldstick.model.network import DeepseekV3ForCausalLM
    from goldstick.quant.cells import cell_from_tensors, replace_cell

    source = CompressedTensorsSource(path)
    net = DeepseekV3ForCausalLM(source.config)
    floats, cells = {}, []
    for name, label, value in source.entries(include_mtp=False):
        if label == FLOAT_LABEL:
            floats[name] = np.asarray(value, dtype=np.float32)
            continue
        try:
            cells.append((name, cell_from_tensors(label, value, name, backend=backend)))
        except ValueError as exc:
            raise CheckpointError(f"{source.path.name}: {exc}") from None
    net.load_weights(floats)
    for name, cell in cells:
        replace_cell(net, name, cell)
    return net
