"""A small DeepSeek-V3 config shared by the recipe and Golden-Stick translation tests."""

from goldstick.model.config import ModelConfig


def small_config(**overrides) -> ModelConfig:
    cfg = dict(hidden_size=64, num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=8, n_group=2,
               topk_group=1, num_experts_per_tok=2, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
               qk_nope_head_dim=16, v_head_dim=16, vocab_size=300, num_attention_heads=2, num_key_value_heads=2,
               intermediate_size=128, moe_intermediate_size=32)
    cfg.update(overrides)
    return ModelConfig(**cfg)
