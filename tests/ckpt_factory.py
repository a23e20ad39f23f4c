"""Small random DeepSeek-V3 checkpoints on disk for the checkpoint-reader tests.

Shapes are taken from ModelConfig (plus the MTP extras written out here by hand, independently of
goldstick.io.checkpoint). Formats: "f32", "bf16", "f16" store every tensor in that dtype; "fp8" stores the layout of
the released R1 checkpoint: decoder-layer linears in float8_e4m3fn with a float32 ``_scale_inv`` per 128x128
block, the router bias in F32 and everything else in BF16.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from goldstick.model.config import ModelConfig
from goldstick.quant.fp8 import quantize_fp8_blocks

FP8_LINEARS = {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj"}
# an FP8 weight whose scale the factory puts in another shard, as R1's index sometimes does
CROSS_SHARD_WEIGHT = "model.layers.1.self_attn.o_proj.weight"


def small_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=300, hidden_size=64, intermediate_size=160, moe_intermediate_size=48,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1,
                  n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                  q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                  num_nextn_predict_layers=1)
    values.update(overrides)
    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
        values["num_key_value_heads"] = values["num_attention_heads"]
    config = ModelConfig(**values)
    config.validate()
    return config


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model in checkpoint order: embedding, layers (MTP last), norm, lm_head."""
    shapes = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size)}
    h, v = config.hidden_size, config.vocab_size
    for layer in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        shapes.update(config.layer_tensor_shapes(layer))
        if layer >= config.num_hidden_layers:
            p = f"model.layers.{layer}"
            shapes.update({f"{p}.embed_tokens.weight": (v, h), f"{p}.enorm.weight": (h,),
                           f"{p}.hnorm.weight": (h,), f"{p}.eh_proj.weight": (h, 2 * h),
                           f"{p}.shared_head.norm.weight": (h,), f"{p}.shared_head.head.weight": (v, h)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def is_fp8_linear(name: str, shape: tuple[int, ...]) -> bool:
    return name.startswith("model.layers.") and len(shape) == 2 and name.split(".")[-2] in FP8_LINEARS


def random_source(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 values for every tensor: norms near 1, matrices small and centred."""
    rng = np.random.default_rng(seed)
    source = {}
    for name, shape in tensor_shapes(config).items():
        if len(shape) == 1 and "norm" in name:
            source[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            source[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return source


def stored_tensors(source: dict[str, np.ndarray], fmt: str) -> dict[str, np.ndarray]:
    """The arrays to write for ``fmt``; FP8 weights are followed by their ``_scale_inv``."""
    plain = {"f32": np.float32, "bf16": ml_dtypes.bfloat16, "f16": np.float16}
    if fmt in plain:
        return {name: value.astype(plain[fmt]) for name, value in source.items()}
    if fmt != "fp8":
        raise ValueError(f"unknown format {fmt!r}")
    stored = {}
    for name, value in source.items():
        if is_fp8_linear(name, value.shape):
            stored[name], stored[name + "_scale_inv"] = quantize_fp8_blocks(value)
        elif name.endswith("e_score_correction_bias"):
            stored[name] = value
        else:
            stored[name] = value.astype(ml_dtypes.bfloat16)
    return stored


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:06d}.safetensors"


def write_config(directory: Path, config: ModelConfig, fmt: str) -> None:
    if fmt == "fp8":
        config.quantization_config = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}
    config.save(directory)


def write_checkpoint(directory: str | Path, config: ModelConfig, fmt: str = "fp8", shards: int | None = 3,
                     seed: int = 0, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write config.json and the weights (one model.safetensors if ``shards`` is None); return the float32 source.

    Tensors are split in order over ``shards`` files with R1-style names; the scale of CROSS_SHARD_WEIGHT goes
    to a different shard than its weight. ``extra`` tensors are stored as given, in the last shard.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_config(directory, config, fmt)
    source = random_source(config, seed)
    stored = stored_tensors(source, fmt)
    stored.update(extra or {})

    if shards is None:
        save_file(stored, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return source

    cross_scale = CROSS_SHARD_WEIGHT + "_scale_inv"
    names = [name for name in stored if name != cross_scale and name not in (extra or {})]
    groups = [list(chunk) for chunk in np.array_split(np.array(names, dtype=object), shards)]
    groups[-1] += list(extra or {})
    if cross_scale in stored:
        home = next(i for i, group in enumerate(groups) if CROSS_SHARD_WEIGHT in group)
        groups[(home + 1) % shards].append(cross_scale)

    weight_map = {}
    for i, group in enumerate(groups, start=1):
        file = shard_name(i, shards)
        save_file({name: stored[name] for name in group}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in group})
    total_size = sum(array.nbytes for array in stored.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return source
