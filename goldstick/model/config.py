"""The DeepSeek-V3/R1 model configuration, read from (and written to) a HF ``config.json``.

Field names are the HF ones so that a real R1 ``config.json`` reads without translation. Only the fields the
network needs are typed here; everything else in the file is kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from goldstick.errors import GoldstickError

# Sub-layer norms of MLA (q_a_layernorm, kv_a_layernorm) use a fixed eps of 1e-6 in both the official
# DeepSeek-V3 inference code and transformers' DeepseekV3Attention; only the block norms read rms_norm_eps.
MLA_NORM_EPS = 1e-6


class ConfigError(GoldstickError, ValueError):
    """A config.json that cannot describe a DeepSeek-V3 network."""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- reading and writing -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known}
        # transformers >= 5 writes rope_parameters instead of rope_theta + rope_scaling
        rope_parameters = extra.pop("rope_parameters", None)
        if rope_parameters:
            values.setdefault("rope_theta", rope_parameters.get("rope_theta", 10000.0))
            rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if rope_type != "default" and "rope_scaling" not in values:
                values["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values.get("num_attention_heads", cls.num_attention_heads)
        try:
            cfg = cls(**values, extra=extra)
        except TypeError as exc:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"{source}: {exc}") from None
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: does not exist")
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no config.json (is this a HF model directory?)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "quantization_config" and value is None:
                continue
            out[f.name] = value
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    def validate(self, source: str = "config.json") -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"{source}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.qk_rope_head_dim % 2:
            raise bad(f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.num_key_value_heads != self.num_attention_heads:
            raise bad("MLA needs num_key_value_heads == num_attention_heads")
        if self.hidden_act != "silu":
            raise bad(f"hidden_act {self.hidden_act!r} is not supported (DeepSeek-V3 uses 'silu')")
        if self.scoring_func != "sigmoid":
            raise bad(f"scoring_func {self.scoring_func!r} is not supported (DeepSeek-V3 uses 'sigmoid')")
        if self.has_moe:
            if self.n_routed_experts % self.n_group:
                raise bad(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise bad(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.n_routed_experts // self.n_group < 2:
                raise bad("each expert group needs at least 2 experts (group score = sum of its top-2)")
            if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                raise bad("num_experts_per_tok exceeds the experts left after group-limited routing")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise bad(f"rope_scaling type {kind!r} is not supported (only 'yarn')")

    # ---- derived quantities --------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return self.num_hidden_layers > self.first_k_dense_replace and self.n_routed_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    @property
    def yarn(self) -> dict | None:
        if not self.rope_scaling:
            return None
        kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
        return self.rope_scaling if kind == "yarn" else None

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (as transformers' yarn_apply_mscale)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn and self.yarn.get("mscale_all_dim"):
            factor = float(self.yarn["factor"])
            if factor > 1:
                m = 0.1 * float(self.yarn["mscale_all_dim"]) * math.log(factor) + 1.0
                scale *= m * m
        return scale

    def layer_linear_names(self, layer: int) -> list[str]:
        """HF names (without ``.weight``) of every linear of one decoder layer, router included."""
        p = f"model.layers.{layer}"
        names = []
        if self.q_lora_rank is None:
            names.append(f"{p}.self_attn.q_proj")
        else:
            names += [f"{p}.self_attn.q_a_proj", f"{p}.self_attn.q_b_proj"]
        names += [f"{p}.self_attn.kv_a_proj_with_mqa", f"{p}.self_attn.kv_b_proj", f"{p}.self_attn.o_proj"]
        if self.is_moe_layer(layer):
            names.append(f"{p}.mlp.gate")
            for e in range(self.n_routed_experts):
                names += [f"{p}.mlp.experts.{e}.{w}" for w in ("gate_proj", "up_proj", "down_proj")]
            if self.n_shared_experts:
                names += [f"{p}.mlp.shared_experts.{w}" for w in ("gate_proj", "up_proj", "down_proj")]
        else:
            names += [f"{p}.mlp.{w}" for w in ("gate_proj", "up_proj", "down_proj")]
        return names

    def linear_names(self) -> list[str]:
        """Every linear of the main network (layers 0..num_hidden_layers-1) plus lm_head, in model order."""
        names = []
        for layer in range(self.num_hidden_layers):
            names += self.layer_linear_names(layer)
        return names + ["lm_head"]

    def layer_tensor_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Expected name -> shape of every tensor of one decoder layer (FP8 scales excluded)."""
        p = f"model.layers.{layer}"
        h, n = self.hidden_size, self.num_attention_heads
        shapes: dict[str, tuple[int, ...]] = {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.kv_a_proj_with_mqa.weight": (self.kv_lora_rank + self.qk_rope_head_dim, h),
            f"{p}.self_attn.kv_a_layernorm.weight": (self.kv_lora_rank,),
            f"{p}.self_attn.kv_b_proj.weight": (n * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank),
            f"{p}.self_attn.o_proj.weight": (h, n * self.v_head_dim),
        }
        if self.q_lora_rank is None:
            shapes[f"{p}.self_attn.q_proj.weight"] = (n * self.qk_head_dim, h)
        else:
            shapes[f"{p}.self_attn.q_a_proj.weight"] = (self.q_lora_rank, h)
            shapes[f"{p}.self_attn.q_a_layernorm.weight"] = (self.q_lora_rank,)
            shapes[f"{p}.self_attn.q_b_proj.weight"] = (n * self.qk_head_dim, self.q_lora_rank)

        def mlp(prefix: str, inter: int) -> None:
            shapes[f"{prefix}.gate_proj.weight"] = (inter, h)
            shapes[f"{prefix}.up_proj.weight"] = (inter, h)
            shapes[f"{prefix}.down_proj.weight"] = (h, inter)

        if self.is_moe_layer(layer):
            shapes[f"{p}.mlp.gate.weight"] = (self.n_routed_experts, h)
            shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (self.n_routed_experts,)
            for e in range(self.n_routed_experts):
                mlp(f"{p}.mlp.experts.{e}", self.moe_intermediate_size)
            if self.n_shared_experts:
                mlp(f"{p}.mlp.shared_experts", self.moe_intermediate_size * self.n_shared_experts)
        else:
            mlp(f"{p}.mlp", self.intermediate_size)
        return shapes

    def mtp_extra_tensor_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Tensors an MTP layer has on top of a decoder layer's (R1 stores its own embedding and head copies)."""
        p, h, v = f"model.layers.{layer}", self.hidden_size, self.vocab_size
        return {
            f"{p}.embed_tokens.weight": (v, h),
            f"{p}.enorm.weight": (h,),
            f"{p}.hnorm.weight": (h,),
            f"{p}.eh_proj.weight": (h, 2 * h),
            f"{p}.shared_head.norm.weight": (h,),
            f"{p}.shared_head.head.weight": (v, h),
        }

    def global_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensors outside the decoder layers."""
        return {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
            "model.norm.weight": (self.hidden_size,),
            "lm_head.weight": (self.vocab_size, self.hidden_size),
        }
