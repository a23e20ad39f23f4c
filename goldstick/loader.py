"""``load_model(path)``: a checkpoint directory -> the MindSpore network with its weights."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointReader
from .runtime import setup_mindspore


def load_model(path: str | Path, progress: bool = False):
    """Build ``DeepseekV3ForCausalLM`` from a HF-layout checkpoint (F32/BF16/F16/FP8-block weights).

    Weights are read layer by layer through the memory-mapped reader and upcast to float32. The MTP layer
    (index num_hidden_layers) is not part of the main network and is not loaded here.
    """
    setup_mindspore()
    from .model import DeepseekV3ForCausalLM

    reader = CheckpointReader(path)
    net = DeepseekV3ForCausalLM(reader.config)
    net.load_weights(reader.read_globals())
    for _, tensors in reader.iter_layers(progress=progress):
        net.load_weights(tensors)
    net.set_train(False)
    return net
