"""Build small, deterministic DeepSeek-V3-architecture checkpoints in the exact HF/R1 layout.

    make_model(out_dir, size="tiny")                 # float32, exact (parity tests)
    make_model(out_dir, size="tiny", dtype="bf16")   # bfloat16 roundings of the same weights
    make_model(out_dir, size="tiny", fp8=True)       # R1 release format: FP8 blocks + weight_scale_inv, rest bf16
    default_model_path("tiny")                       # the f32 tiny model, built once into a cache folder

A model directory holds ``config.json`` (``ModelConfig.to_dict()`` plus R1's extra keys; ``quantization_config``
for FP8), ``generation_config.json``, the project's own tokenizer (``goldstick.model.tokenizer``), ``make_model.json``
(how it was made and which channels carry the planted outliers) and safetensors shards named like R1's
(``model-00001-of-000006.safetensors``) with ``model.safetensors.index.json``. Every HF tensor name of §1.2 of the
notes is present, including the MTP layer ``model.layers.{num_hidden_layers}.*`` (``embed_tokens``, ``enorm``,
``hnorm``, ``eh_proj``, ``shared_head.norm``, ``shared_head.head`` plus a full attention block and MoE), the router
``mlp.gate.weight`` and the float32 ``mlp.gate.e_score_correction_bias``. With ``fp8=True`` every linear R1 stores
in FP8 (q_a/q_b/kv_a/kv_b/o, dense MLP, routed and shared experts, in all layers including MTP) is float8_e4m3fn with
a float32 ``<name>_scale_inv`` of 128x128 blocks; the router, embeddings, norms, lm_head, eh_proj and shared_head
stay bf16. By default the shards are cut so there are five or six, and one ``weight_scale_inv`` is placed in the
shard after its weight's, as can happen in R1. All three formats of one seed are roundings of the same float32
weights.

Sizes (``SIZES``; vocab = the bundled tokenizer's size rounded up to a multiple of 128):

    size  hidden layers(dense) heads q_lora kv_lora rope/nope/v  inter  moe_inter experts  groups, routing
    tiny     256   4 (1)          4     96      64  16/32/32      512     128       16     4, keep 2, top-4
    wide    1024   6 (1)          8    384     256  32/64/64     2816     512       32     4, keep 2, top-6

Both have 1 shared expert, routed_scaling_factor 2.5, one MTP layer, and YaRN rope scaling shaped like R1's
(factor 4 over 256 original positions, so max_position_embeddings 1024). Some dimensions are deliberately not
multiples of 128 (tiny: kv_a is 64+16 = 80 rows, q_a 96 rows; wide: kv_a 288 rows), so FP8 blocks are ragged.

Weights are random (seeded per tensor name, so any tensor is independent of the others and of generation order),
then shaped to be numerically sane and to behave like a trained LLM where quantization is concerned:

* **Planted activation outliers**, shaped after what trained LLMs show and where:

  - *Massive activations* (Sun et al., 2024, "Massive Activations in Large Language Models"): a few residual
    channels reach 100-1000x the median magnitude, but only on specific tokens (the starting token and delimiters
    such as "." "\n" "。" "，"), where they stay nearly constant and act like biases; other tokens do not carry them.
    We plant them in ``embed_tokens`` (ordinary channels have unit spread): on the rows of bos and of the tokens
    ".", "\n", "。", "，" of the bundled tokenizer (``MASSIVE_TOKENS``, about 12% of the tokens of the held-out
    text) 2 (tiny) / 3 (wide) *massive* channels hold +96, -72 (, +60) (+-3% jitter); on every other token those
    channels are ordinary. o_proj/down_proj rows write almost nothing (x0.01) into them, so they persist unchanged
    through every layer, as in real models. The linears that read the normed residual (q_a, kv_a, router,
    routed/shared experts, dense MLP) have tiny weight columns there (a massive channel contributes like a tenth of
    an ordinary one). After an RMSNorm a massive token is dominated by its massive channels (+-12 against ~0.4 for
    its other channels, ~1 on other tokens), so a static per-tensor scale calibrated over all tokens is set by them.
  - *Non-zero-mean channels* (Wei et al., 2023, "Outlier Suppression+"): 3 (tiny) / 4 (wide) *offset* channels
    have mean +-4 (spread 1) on every token, and persist likewise. OS+'s per-channel shift centres them.
  - *Systematic outlier channels* (Dettmers et al., 2022, LLM.int8(); Xiao et al., 2023, SmoothQuant): a few
    channels of moderate magnitude (~10-20x the median channel) on most tokens, which per-channel smoothing fixes.
    As in DeepSeek-R1 (below), they sit at the attention (MLA) inputs: every ``input_layernorm`` amplifies the
    offset channels by 12, 10, 8 (, 6) (shuffled per layer) and two zero-mean channels by 4 and 3, so the input of
    q_a_proj/kv_a_proj has asymmetric outlier channels at ~+-25..40 against a median channel absmax of ~3;
    ``q_a_layernorm`` amplifies two channels (4, 3) of the q_b_proj input; ``kv_b_proj`` amplifies two value
    channels (6, 4) of the o_proj input (whose channels also inherit non-zero means from the offsets).
  - The FFN inputs (``post_attention_layernorm``, read by the router, the dense MLP and the shared and routed
    experts) get only mild systematic outliers: gains 2 and 1.5 on two channels and 0.5 on the offset channels.
    What remains there is token-wise variation (the massive tokens, and tokens with a large channel of their own).
    This mirrors R1 as Golden-Stick quantizes it: its production mix (``deepseek-r1-w8a8-mixed``) quantizes every
    FFN input per token, dynamically, without smoothing, and keeps CEval within noise, i.e. R1's FFN inputs are
    dominated by token-wise variation, while its MLA inputs need static W8A8 with OS+ outlier suppression.

  The consumers read amplified channels with ordinary weights (outlier features carry signal, as in trained
  models), so int8 per-channel weights stay as accurate as without them. Channels, values, gains and the massive
  token ids are recorded in ``make_model.json``.

  Measured on tiny (``outlier_report``, first layer, statistics tokens; relative error of the fused output of int8
  per-channel weights times each activation scheme): MLA input (q_a+kv_a), per-channel absmax max/median =
  70/3.2 = 22, median per-token absmax 45 (12 on massive tokens): weight-only 0.8%, static per-tensor 4.4%, with
  SmoothQuant (alpha 0.5) 1.2%, with OS+ (shift + searched scale) 0.7%, dynamic per-token 2.9%. FFN input (dense
  gate+up): absmax ratio 13/3.0 = 4.4, median per-token absmax 3.6 (11 on massive tokens): weight-only 0.7%,
  static per-tensor 3.1%, SmoothQuant 1.8%, OS+ 1.3%, dynamic per-token 1.5%.
  Through the whole network (``tests/test_recipe_ordering.py``: the real engine, 32x128 calibration tokens, KL
  of the quantized to the float next-token distributions on 16x128 held-out tokens), tiny seed 0 / seed 1:
  w8a16 0.0029 / 0.0020, deepseek-r1-w8a8-mixed 0.0039 / 0.0033, MLA SmoothQuant + FFN dynamic 0.0050 / 0.0041,
  all-static SmoothQuant 0.0059 / 0.0045, all-dynamic 0.0076 / 0.0056, naive static 0.0154 / 0.0106 (a second
  calibration seed moves these by up to 15%, the order stays).
  On this MoE the KL is dominated by routing flips: a perturbed router input changes a few tokens' experts (~4% of
  the tokens per layer at -35 dB), each flip changes that token a lot, and with the float routing imposed the KL
  is 20-30x smaller; so KL grows about linearly with the error amplitude rather than with its power.
* **Sane numerics.** A float32 statistics pass (a plain numpy forward over corpus tokens, RoPE without YaRN since
  positions stay below 256) rescales, layer by layer, each router so its logits have unit spread (random gates plus a
  small random ``e_score_correction_bias``: every expert receives tokens, the busiest about 2-3x its fair share),
  each q_b_proj so one query's attention logits spread by 4 (std over its keys: attention is peaked, median top
  probability ~0.6, as in trained models, not near-uniform), and each o_proj / down_proj so every sublayer adds
  0.4x the residual's typical magnitude: logits are finite and varied, and the ordinary channels grow about 1.15x
  per layer. Scale factors are rounded to 3 significant digits so that tiny floating-point differences do not
  change them. The MTP layer reads ``eh_proj`` of the normed next-token embedding and the main model's last hidden
  state (before ``model.norm``); ``eh_proj`` passes the planted channels through, so the MTP block sees the same
  outliers.
* **Not pure noise.** ``embed_tokens`` and ``lm_head`` are initialised from the corpus' bigram statistics: a
  low-rank factorisation of the smoothed log P(next | current) lives in 3/8 of the ordinary channels, and the
  unigram log-probability is carried by ``lm_head``'s columns on the planted channels (the offset channels on every
  token, the massive ones on theirs), weighted by a least-squares fit so that together they read ~1 on every token
  (bias-like channels, as in real models). Held-out negative log-likelihood per token of tiny is about 7.3 nats,
  against 8.06 for a uniform guess (and 7.1 for the corpus' unigram model: the random layers add noise to the
  logits), so quantization error shows in meaningful next-token distributions. (The MTP head is a copy of
  ``lm_head``; it is not trained to predict two tokens ahead.)

The CLI (``goldstick make-model``) is wired by ``add_make_model_parser`` / ``run_make_model``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from goldstick.model.config import MLA_NORM_EPS, ModelConfig
from goldstick.quant.fp8 import quantize_fp8_blocks
from goldstick.model.tokenizer import (BOS_TOKEN, CORPUS_PATH, EOS_TOKEN, build_tokenizer, corpus_lines,
                                 train_tokenizer)
from goldstick.io.writer import ShardedWriter, write_json_atomic

CONTENT_VERSION = 2  # bump when the generated weights change on purpose
TOKENIZER_VOCAB = 4096  # cap given to the BPE trainer; the model's vocab_size is the result rounded up to 128

R1_EXTRA = {"aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1, "pretraining_tp": 1, "use_cache": True,
            "initializer_range": 0.02, "attention_dropout": 0.0}
R1_FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                              "weight_block_size": [128, 128]}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
                     "temperature": 0.6, "top_p": 0.95}
DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16}
SIZES = ("tiny", "wide")

# planted outliers (see the module docstring)
MASSIVE_VALUES = (96.0, -72.0, 60.0)  # on the massive-activation tokens, in units of the typical magnitude (1.0)
MASSIVE_TOKENS = (BOS_TOKEN, ".", "\n", "\u3002", "\uff0c")  # the starting token and delimiters: . \n 。 ，
N_MASSIVE, N_OFFSET = (2, 3), (3, 4)  # how many massive / offset channels (tiny, wide)
OFFSET_VALUES = (4.0, -4.0, 4.0, -4.0, 4.0, -4.0, 4.0, -4.0)  # channel means on every token
OFFSET_STD = 1.0  # their spread across tokens
INPUT_GAINS_OFFSET = (12.0, 10.0, 8.0, 6.0)  # input_layernorm gains on the offset channels (MLA inputs)
INPUT_GAINS_PLAIN = (4.0, 3.0)  # input_layernorm gains on zero-mean channels
Q_A_GAINS = (4.0, 3.0)  # q_a_layernorm gains (q_b_proj input)
V_GAINS = (6.0, 4.0)  # o_proj input channels amplified through kv_b_proj's value rows
POST_GAINS = (2.0, 1.5)  # post_attention_layernorm gains (FFN inputs): mild
POST_GAIN_OFFSET = 0.5  # post_attention_layernorm weight on the offset channels
MASSIVE_READ = 0.1  # a massive channel contributes like a tenth of an ordinary channel to the linears reading it
PLANTED_WRITE = 0.01  # o_proj/down_proj rows into the massive and offset channels are damped by this factor


def _yarn() -> dict:
    return {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "mscale": 1.0,
            "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}


def _size_configs(vocab_size: int) -> dict[str, ModelConfig]:
    def common():
        return dict(vocab_size=vocab_size, n_shared_experts=1, routed_scaling_factor=2.5, n_group=4, topk_group=2,
                    first_k_dense_replace=1, max_position_embeddings=1024, rope_scaling=_yarn(),
                    num_nextn_predict_layers=1, torch_dtype="float32", extra=dict(R1_EXTRA))

    return {
        "tiny": ModelConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                            q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                            v_head_dim=32, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16,
                            num_experts_per_tok=4, **common()),
        "wide": ModelConfig(hidden_size=1024, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                            q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64,
                            v_head_dim=64, intermediate_size=2816, moe_intermediate_size=512, n_routed_experts=32,
                            num_experts_per_tok=6, **common()),
    }


@functools.lru_cache(maxsize=None)
def _tokenizer_vocab() -> int:
    n = build_tokenizer(TOKENIZER_VOCAB).get_vocab_size()
    return -(-n // 128) * 128


def size_config(size: str) -> ModelConfig:
    """The ModelConfig of a named size (a fresh copy)."""
    configs = _size_configs(_tokenizer_vocab())
    if size not in configs:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(configs)}")
    return configs[size]


# ---- planted outliers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Planted:
    """Which residual channels carry what, and on which tokens (recorded in make_model.json)."""
    massive: dict[int, float]  # channel -> value on the massive-activation tokens (units of the typical magnitude)
    massive_tokens: dict[int, str]  # token id -> its text: the tokens that carry the massive activations
    offset: dict[int, float]  # channel -> mean on every token in embed_tokens
    input_norm_gain: dict[int, dict[int, float]]  # layer -> channel -> input_layernorm weight
    post_norm_gain: dict[int, dict[int, float]]  # layer -> channel -> post_attention_layernorm weight
    q_a_norm_gain: dict[int, dict[int, float]]  # layer -> q_a_layernorm channel -> weight
    v_gain: dict[int, dict[int, float]]  # layer -> o_proj input channel -> gain of that value channel

    def to_json(self) -> dict:
        def keys(d):
            return {str(k): (keys(v) if isinstance(v, dict) else v) for k, v in d.items()}
        return keys(dataclasses.asdict(self))

    @property
    def special(self) -> list[int]:
        return sorted(set(self.massive) | set(self.offset))


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))


@functools.lru_cache(maxsize=None)
def massive_token_ids() -> dict[int, str]:
    """Ids of the tokens that carry massive activations: bos and the delimiters of ``MASSIVE_TOKENS``."""
    tok = build_tokenizer(TOKENIZER_VOCAB)
    out = {}
    for text in MASSIVE_TOKENS:
        ids = [tok.token_to_id(text)] if text == BOS_TOKEN else tok.encode(text, add_special_tokens=False).ids
        if len(ids) != 1 or ids[0] is None:
            raise ValueError(f"{text!r} is not a single token of the bundled tokenizer")
        out[int(ids[0])] = text
    return out


def plant_outliers(cfg: ModelConfig, seed: int) -> Planted:
    rng = _rng(seed, "planted-outliers")
    h = cfg.hidden_size
    wide = h > 512
    n_massive, n_offset = N_MASSIVE[wide], N_OFFSET[wide]
    chans = [int(c) for c in rng.permutation(h)]
    massive_ch, offset_ch, rest = chans[:n_massive], chans[n_massive:n_massive + n_offset], chans[n_massive + n_offset:]
    massive = {c: float(v) for c, v in zip(massive_ch, MASSIVE_VALUES)}
    offset = {c: float(v) for c, v in zip(offset_ch, OFFSET_VALUES)}
    layers = range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)

    def pick(pool, gains, key):
        r = _rng(seed, key)
        return {int(c): float(g) for c, g in zip(r.choice(pool, size=len(gains), replace=False), gains)}

    def input_gains(i):
        # every offset channel is amplified (gains shuffled per layer), plus a few zero-mean channels
        order = _rng(seed, f"in-offset-gain-{i}").permutation(len(offset_ch))
        gains = {offset_ch[j]: float(g) for j, g in zip(order, INPUT_GAINS_OFFSET)}
        gains.update(pick(rest, INPUT_GAINS_PLAIN, f"in-gain-{i}"))
        return gains

    def post_gains(i):
        gains = {c: POST_GAIN_OFFSET for c in offset_ch}
        gains.update(pick(rest, POST_GAINS, f"post-gain-{i}"))
        return gains

    return Planted(
        massive=massive, massive_tokens=massive_token_ids(), offset=offset,
        input_norm_gain={i: input_gains(i) for i in layers},
        post_norm_gain={i: post_gains(i) for i in layers},
        q_a_norm_gain={i: pick(np.arange(cfg.q_lora_rank), Q_A_GAINS, f"qa-gain-{i}") for i in layers},
        v_gain={i: pick(np.arange(cfg.num_attention_heads * cfg.v_head_dim), V_GAINS, f"v-gain-{i}") for i in layers},
    )


# ---- tensor plan ---------------------------------------------------------------------------------------------
def fp8_linear(name: str) -> bool:
    """True for the linears R1 stores as float8_e4m3fn blocks (not the router, embeddings, heads, eh_proj)."""
    if not name.endswith(".weight") or ".shared_head." in name or name.endswith("eh_proj.weight"):
        return False
    module = name[: -len(".weight")].rsplit(".", 1)[-1]
    return module in {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                      "gate_proj", "up_proj", "down_proj"}


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint (FP8 scales excluded) in writing order: embed, layers, norm, head, MTP."""
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for layer in range(cfg.num_hidden_layers):
        shapes.update(cfg.layer_tensor_shapes(layer))
    shapes["model.norm.weight"] = (cfg.hidden_size,)
    shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for layer in range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        shapes.update(mtp_extra_shapes(cfg, layer))
        shapes.update(cfg.layer_tensor_shapes(layer))
    return shapes


def mtp_extra_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    p, h, v = f"model.layers.{layer}", cfg.hidden_size, cfg.vocab_size
    return {f"{p}.embed_tokens.weight": (v, h), f"{p}.enorm.weight": (h,), f"{p}.hnorm.weight": (h,),
            f"{p}.eh_proj.weight": (h, 2 * h), f"{p}.shared_head.norm.weight": (h,),
            f"{p}.shared_head.head.weight": (v, h)}


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    shapes = tensor_shapes(cfg)
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    total = sum(int(np.prod(s)) for s in shapes.values())
    mtp_n = sum(int(np.prod(s)) for n, s in shapes.items() if n.startswith(mtp))
    return {"total": total, "main": total - mtp_n, "mtp": mtp_n}


# ---- numpy building blocks (float32 statistics pass only) ----------------------------------------------------
def _rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Plain RoPE on interleaved pairs (2i, 2i+1); x [..., T, d]."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = positions[:, None] * inv[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def _attention(cfg: ModelConfig, w: dict, p: str, x: np.ndarray) -> np.ndarray:
    """MLA on x [B, T, H] -> attention output before o_proj [B, T, n*v]."""
    b, t, _ = x.shape
    scores, v = _attention_scores(cfg, w, p, x)
    scores = scores + np.triu(np.full((t, t), -np.inf, np.float32), 1)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    return (scores @ v).transpose(0, 2, 1, 3).reshape(b, t, cfg.num_attention_heads * cfg.v_head_dim)


def _score_spread(scores: np.ndarray) -> float:
    """Typical spread of one query's attention logits over the keys it sees (causal), averaged over queries."""
    t = scores.shape[-1]
    causal = np.tril(np.ones((t, t), bool))
    n = causal.sum(-1)
    mean = np.where(causal, scores, 0).sum(-1) / n
    var = np.where(causal, (scores - mean[..., None]) ** 2, 0).sum(-1) / n
    return float(np.mean(np.sqrt(var[..., t // 4:])))


def _attention_scores(cfg: ModelConfig, w: dict, p: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MLA attention logits [B, n, T, T] (scaled, unmasked) and values [B, n, T, v] for x [B, T, H]."""
    b, t, _ = x.shape
    n, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = _rmsnorm(x @ w[f"{p}.q_a_proj.weight"].T, w[f"{p}.q_a_layernorm.weight"], MLA_NORM_EPS)
    q = (q @ w[f"{p}.q_b_proj.weight"].T).reshape(b, t, n, dn + dr).transpose(0, 2, 1, 3)
    kv = x @ w[f"{p}.kv_a_proj_with_mqa.weight"].T
    c, k_rope = kv[..., : cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
    c = _rmsnorm(c, w[f"{p}.kv_a_layernorm.weight"], MLA_NORM_EPS)
    kvb = (c @ w[f"{p}.kv_b_proj.weight"].T).reshape(b, t, n, dn + dv).transpose(0, 2, 1, 3)
    k_nope, v = kvb[..., :dn], kvb[..., dn:]
    pos = np.arange(t, dtype=np.float64)
    q_rope = _rope(q[..., dn:], pos, cfg.rope_theta)
    k_rope = _rope(k_rope[:, None], pos, cfg.rope_theta)
    scores = (q[..., :dn] @ k_nope.transpose(0, 1, 3, 2) + q_rope @ k_rope.transpose(0, 1, 3, 2))
    return scores * np.float32(cfg.softmax_scale), v


def _mlp_hidden(w: dict, p: str, x: np.ndarray) -> np.ndarray:
    return _silu(x @ w[f"{p}.gate_proj.weight"].T) * (x @ w[f"{p}.up_proj.weight"].T)


def _route(cfg: ModelConfig, logits: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3 noaux_tc routing of router logits [N, E] -> (expert ids [N, k], weights [N, k])."""
    scores = 1.0 / (1.0 + np.exp(-logits))
    choice = scores + bias
    n, e = choice.shape
    grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)
    group_score = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
    keep = np.argsort(-group_score, axis=-1, kind="stable")[:, : cfg.topk_group]
    mask = np.zeros((n, cfg.n_group), bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    choice = np.where(np.repeat(mask, e // cfg.n_group, axis=-1), choice, -np.inf)
    ids = np.argsort(-choice, axis=-1, kind="stable")[:, : cfg.num_experts_per_tok]
    weights = np.take_along_axis(scores, ids, axis=-1)
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
    return ids, weights


def _moe_parts(cfg: ModelConfig, w: dict, p: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(routed output, shared output, expert ids) for x [N, H], down_proj included."""
    ids, weights = _route(cfg, x @ w[f"{p}.mlp.gate.weight"].T, w[f"{p}.mlp.gate.e_score_correction_bias"])
    routed = np.zeros_like(x)
    for e in range(cfg.n_routed_experts):
        tok, slot = np.nonzero(ids == e)
        if tok.size:
            ep = f"{p}.mlp.experts.{e}"
            y = _mlp_hidden(w, ep, x[tok]) @ w[f"{ep}.down_proj.weight"].T
            np.add.at(routed, tok, y * weights[tok, slot, None])
    shared = _mlp_hidden(w, f"{p}.mlp.shared_experts", x) @ w[f"{p}.mlp.shared_experts.down_proj.weight"].T
    return routed, shared, ids


# ---- weight generation -----------------------------------------------------------------------------------------
SUBLAYER_SCALE = 0.4  # each sublayer adds about this fraction of the residual's typical magnitude
ATTENTION_SPREAD = 4.0  # typical spread (std over the keys) of one query's attention logits
ROUTER_LOGIT_STD = 1.0
BIGRAM_FRACTION = 0.375  # share of the hidden channels carrying the bigram factors (96 of 256, 384 of 1024)


def _round3(x: float) -> float:
    return float(f"{x:.3g}")


class _Builder:
    """Generates the float32 tensors of one (size, seed) in writing order, running the statistics pass."""

    def __init__(self, cfg: ModelConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.planted = plant_outliers(cfg, seed)
        self.h = cfg.hidden_size
        self.ordinary = np.array([c for c in range(self.h) if c not in set(self.planted.special)])
        self.tokens = self._stats_tokens()
        self.positions_ids = self.tokens  # the token whose embedding each position's planted channels come from
        self.report: dict = {"layers": {}}

    # -- random helpers
    def normal(self, name: str, shape, std: float = 1.0) -> np.ndarray:
        return _rng(self.seed, name).standard_normal(shape, dtype=np.float32) * np.float32(std)

    def norm_weight(self, name: str, size: int, gains: dict[int, float] | None = None) -> np.ndarray:
        w = 1.0 + self.normal(name, (size,), 0.05)
        for c, g in (gains or {}).items():
            w[c] = g
        return w.astype(np.float32)

    def linear(self, name: str, out_f: int, in_f: int) -> np.ndarray:
        return self.normal(name, (out_f, in_f), in_f ** -0.5)

    def reads_residual(self, w: np.ndarray) -> np.ndarray:
        """Columns of a linear that reads the normed residual: tiny on the massive channels (a bias-like input).

        Amplified channels are read with ordinary weights: outlier features carry signal, as in trained models
        (so weight-only int8 stays as accurate relative to the output as without them)."""
        for c, a in self.planted.massive.items():
            w[:, c] *= MASSIVE_READ / abs(a)
        return w

    def writes_residual(self, w: np.ndarray) -> np.ndarray:
        """Rows of o_proj/down_proj: almost nothing into the massive and offset channels, so they persist."""
        for c in self.planted.special:
            w[c, :] *= PLANTED_WRITE
        return w

    # -- calibration-like tokens for the statistics pass
    def _stats_tokens(self, n_seq: int = 8, length: int = 48) -> np.ndarray:
        tok = build_tokenizer(TOKENIZER_VOCAB)
        stream: list[int] = []
        for line in corpus_lines():
            stream += tok.encode(line, add_special_tokens=False).ids + [tok.token_to_id(EOS_TOKEN)]
        bos = tok.token_to_id(BOS_TOKEN)
        step = (len(stream) - length) // n_seq
        return np.array([[bos] + stream[i * step: i * step + length - 1] for i in range(n_seq)], dtype=np.int64)

    # -- embeddings from bigram statistics
    def embeddings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(embed_tokens [V,H], bigram factors Y [V,r] for lm_head, unigram log-prob [V])."""
        cfg = self.cfg
        tok = build_tokenizer(TOKENIZER_VOCAB)
        n_tok = tok.get_vocab_size()
        counts = np.zeros((n_tok, n_tok), np.float64)
        eos, bos = tok.token_to_id(EOS_TOKEN), tok.token_to_id(BOS_TOKEN)
        for line in corpus_lines():
            ids = [bos] + tok.encode(line, add_special_tokens=False).ids + [eos]
            np.add.at(counts, (ids[:-1], ids[1:]), 1.0)
        uni = counts.sum(0) + 0.5
        uni /= uni.sum()
        row = counts.sum(1, keepdims=True)
        # Witten-Bell-style interpolation with the unigram (weight 2x the number of distinct followers)
        k = np.maximum(2.0 * (counts > 0).sum(1, keepdims=True), 1.0)
        logp = np.log((counts + k * uni[None, :]) / (row + k))
        logp -= logp.mean(1, keepdims=True)
        unigram = logp.mean(0)
        resid = logp - unigram[None, :]
        r = int(round(BIGRAM_FRACTION * self.h))
        u, s, vt = _truncated_svd(resid, r, _rng(self.seed, "bigram-svd"))
        x = u * np.sqrt(s)
        y = vt.T * np.sqrt(s)
        cx = np.sqrt(np.mean(x[row[:, 0] > 0] ** 2))  # unit rms over tokens that occur
        x, y = x / cx, y * cx
        emb = self.normal("model.embed_tokens.weight", (cfg.vocab_size, self.h), 1.0)
        self.bigram_channels = self.ordinary[:r]
        emb[:n_tok, self.bigram_channels] = x.astype(np.float32)
        jitter = self.normal("embed-massive-jitter", (cfg.vocab_size, len(self.planted.massive)), 0.03)
        rows = np.array(sorted(self.planted.massive_tokens))
        for j, (c, a) in enumerate(self.planted.massive.items()):
            emb[rows, c] = a * (1.0 + jitter[rows, j])  # other tokens keep an ordinary value there
        spread = self.normal("embed-offset-spread", (cfg.vocab_size, len(self.planted.offset)), OFFSET_STD)
        for j, (c, m) in enumerate(self.planted.offset.items()):
            emb[:, c] = m + spread[:, j]
        y_full = np.zeros((cfg.vocab_size, r), np.float32)
        y_full[:n_tok] = y
        uni_full = np.full(cfg.vocab_size, -30.0, np.float32)  # rows past the tokenizer: never predicted
        uni_full[:n_tok] = unigram
        self.report["bigram"] = {"rank": r, "singular_value_share": float((s ** 2).sum() / (resid ** 2).sum())}
        return emb, y_full, uni_full

    # -- one decoder layer
    def layer(self, layer: int, hidden: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        cfg, pl = self.cfg, self.planted
        p = f"model.layers.{layer}"
        a = f"{p}.self_attn"
        w: dict[str, np.ndarray] = {}
        in_gain, post_gain, qa_gain = pl.input_norm_gain[layer], pl.post_norm_gain[layer], pl.q_a_norm_gain[layer]
        w[f"{p}.input_layernorm.weight"] = self.norm_weight(f"{p}.input_layernorm.weight", self.h, in_gain)
        w[f"{a}.q_a_proj.weight"] = self.reads_residual(self.linear(f"{a}.q_a_proj.weight", cfg.q_lora_rank, self.h))
        w[f"{a}.q_a_layernorm.weight"] = self.norm_weight(f"{a}.q_a_layernorm.weight", cfg.q_lora_rank, qa_gain)
        w[f"{a}.q_b_proj.weight"] = self.linear(f"{a}.q_b_proj.weight", cfg.num_attention_heads * cfg.qk_head_dim,
                                                cfg.q_lora_rank)
        w[f"{a}.kv_a_proj_with_mqa.weight"] = self.reads_residual(
            self.linear(f"{a}.kv_a_proj_with_mqa.weight", cfg.kv_lora_rank + cfg.qk_rope_head_dim, self.h))
        w[f"{a}.kv_a_layernorm.weight"] = self.norm_weight(f"{a}.kv_a_layernorm.weight", cfg.kv_lora_rank)
        kv_b = self.linear(f"{a}.kv_b_proj.weight", cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                           cfg.kv_lora_rank)
        o = self.writes_residual(self.linear(f"{a}.o_proj.weight", self.h, cfg.num_attention_heads * cfg.v_head_dim))
        for c, g in pl.v_gain[layer].items():  # value channel c (of head c // v_head_dim) amplified
            head, d = divmod(c, cfg.v_head_dim)
            kv_b[head * (cfg.qk_nope_head_dim + cfg.v_head_dim) + cfg.qk_nope_head_dim + d] *= np.float32(g)
        w[f"{a}.kv_b_proj.weight"] = kv_b
        w[f"{a}.o_proj.weight"] = o

        stats: dict = {}
        target = SUBLAYER_SCALE * self._typical(hidden)
        x = _rmsnorm(hidden, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
        if ATTENTION_SPREAD:  # queries scaled so attention is as peaked as in a trained model
            f = _round3(ATTENTION_SPREAD / _score_spread(_attention_scores(cfg, w, a, x)[0]))
            w[f"{a}.q_b_proj.weight"] *= np.float32(f)
            stats["attention_spread"] = round(_score_spread(_attention_scores(cfg, w, a, x)[0]), 3)
        attn = _attention(cfg, w, a, x) @ w[f"{a}.o_proj.weight"].T
        f = _round3(target / self._typical(attn))
        w[f"{a}.o_proj.weight"] *= np.float32(f)
        hidden = hidden + attn * np.float32(f)

        w[f"{p}.post_attention_layernorm.weight"] = self.norm_weight(
            f"{p}.post_attention_layernorm.weight", self.h, post_gain)
        x = _rmsnorm(hidden, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
        flat = x.reshape(-1, self.h)
        if cfg.is_moe_layer(layer):
            m = f"{p}.mlp"
            gate = self.reads_residual(self.linear(f"{m}.gate.weight", cfg.n_routed_experts, self.h))
            gate *= np.float32(_round3(ROUTER_LOGIT_STD / float(np.std(flat @ gate.T))))
            w[f"{m}.gate.weight"] = gate
            w[f"{m}.gate.e_score_correction_bias"] = self.normal(f"{m}.gate.e_score_correction_bias",
                                                                 (cfg.n_routed_experts,), 0.02)
            inter = cfg.moe_intermediate_size
            for e in range(cfg.n_routed_experts):
                self._mlp_weights(w, f"{m}.experts.{e}", inter)
            self._mlp_weights(w, f"{m}.shared_experts", inter * cfg.n_shared_experts)
            routed, shared, ids = _moe_parts(cfg, w, p, flat)
            out = (routed + shared).reshape(hidden.shape)
            load = np.bincount(ids.ravel(), minlength=cfg.n_routed_experts) / ids.size
            stats["experts_used"] = int((load > 0).sum())
            stats["expert_load_max"] = round(float(load.max()), 4)
            downs = [f"{m}.experts.{e}.down_proj.weight" for e in range(cfg.n_routed_experts)]
            downs.append(f"{m}.shared_experts.down_proj.weight")
        else:
            self._mlp_weights(w, f"{p}.mlp", cfg.intermediate_size)
            out = _mlp_hidden(w, f"{p}.mlp", flat) @ w[f"{p}.mlp.down_proj.weight"].T
            out = out.reshape(hidden.shape)
            downs = [f"{p}.mlp.down_proj.weight"]
        f = _round3(target / self._typical(out))
        for name in downs:
            w[name] *= np.float32(f)
        hidden = hidden + out * np.float32(f)
        stats["residual_typical"] = round(self._typical(hidden), 4)
        on = np.isin(self.positions_ids, list(self.planted.massive_tokens))
        stats["residual_massive"] = [round(float(np.mean(hidden[..., c][on])), 2) for c in self.planted.massive]
        stats["residual_offset"] = [round(float(np.mean(hidden[..., c])), 2) for c in self.planted.offset]
        self.report["layers"][layer] = stats
        return w, hidden

    def _mlp_weights(self, w: dict, prefix: str, inter: int) -> None:
        w[f"{prefix}.gate_proj.weight"] = self.reads_residual(self.linear(f"{prefix}.gate_proj.weight", inter, self.h))
        w[f"{prefix}.up_proj.weight"] = self.reads_residual(self.linear(f"{prefix}.up_proj.weight", inter, self.h))
        w[f"{prefix}.down_proj.weight"] = self.writes_residual(self.linear(f"{prefix}.down_proj.weight", self.h,
                                                                           inter))

    def _typical(self, x: np.ndarray) -> float:
        """rms over the ordinary (non-planted) channels."""
        return float(np.sqrt(np.mean(x[..., self.ordinary] ** 2)))

    # -- the whole model, in writing order
    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        cfg = self.cfg
        emb, y, unigram = self.embeddings()
        yield "model.embed_tokens.weight", emb
        hidden = emb[self.tokens]
        for layer in range(cfg.num_hidden_layers):
            w, hidden = self.layer(layer, hidden)
            yield from w.items()
        final_norm = self.norm_weight("model.norm.weight", self.h)
        head = self.head(hidden, final_norm, y, unigram, "lm_head.weight")
        yield "model.norm.weight", final_norm
        yield "lm_head.weight", head
        for layer in range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
            yield from self.mtp_layer(layer, emb, hidden, head, final_norm)

    def head(self, hidden, final_norm, y, unigram, name) -> np.ndarray:
        """lm_head: bigram factors on the bigram channels; the unigram log-probability on the planted channels.

        The offset channels (every token) and the massive channels (bos, delimiters) are nearly constant: the
        head reads them as a bias, with weights fitted (least squares over the statistics tokens) so that their
        combination is 1 on every token.
        """
        x = _rmsnorm(hidden, final_norm, self.cfg.rms_norm_eps).reshape(-1, self.h)
        rms = np.sqrt(np.mean(hidden ** 2, axis=-1))
        head = self.normal(name, (self.cfg.vocab_size, self.h), 0.02 / np.sqrt(self.h))
        bc = self.bigram_channels
        head[:, bc] = y * (float(np.median(rms)) / final_norm[bc])[None, :]
        sc = np.array(self.planted.special)
        xs = x[:, sc].astype(np.float64)
        coef = np.linalg.lstsq(xs, np.ones(len(xs)), rcond=None)[0]
        coef = np.array([_round3(c) for c in coef])
        head[:, sc] = (unigram[:, None] * coef[None, :]).astype(np.float32)
        fit = xs @ coef
        self.report["unigram_carrier"] = {"mean": round(float(fit.mean()), 4), "std": round(float(fit.std()), 4)}
        return head

    def mtp_layer(self, layer, emb, hidden, head, final_norm) -> Iterator[tuple[str, np.ndarray]]:
        cfg, p = self.cfg, f"model.layers.{layer}"
        enorm = self.norm_weight(f"{p}.enorm.weight", self.h)
        hnorm = self.norm_weight(f"{p}.hnorm.weight", self.h)
        nxt = np.concatenate([self.tokens[:, 1:], self.tokens[:, -1:]], axis=1)  # the token after each position
        self.positions_ids = nxt
        e_in = _rmsnorm(emb[nxt], enorm, cfg.rms_norm_eps)
        h_in = _rmsnorm(hidden, hnorm, cfg.rms_norm_eps)
        both = np.concatenate([e_in, h_in], axis=-1)
        eh = self.normal(f"{p}.eh_proj.weight", (self.h, 2 * self.h), (2 * self.h) ** -0.5)
        for c in self.planted.special:  # planted channels pass through from the embedding half
            eh[:, c] *= 0.01
            eh[:, self.h + c] *= 0.01
            eh[c, :] = 0.0
        out = both @ eh.T
        eh[self.ordinary] *= np.float32(_round3(1.0 / self._typical(out)))
        for c in self.planted.special:
            eh[c, c] = np.float32(_round3(float(np.mean(emb[nxt][..., c])) / float(np.mean(e_in[..., c]))))
        x = both @ eh.T
        yield f"{p}.embed_tokens.weight", emb
        yield f"{p}.enorm.weight", enorm
        yield f"{p}.hnorm.weight", hnorm
        yield f"{p}.eh_proj.weight", eh
        w, x = self.layer(layer, x)
        yield from w.items()
        yield f"{p}.shared_head.norm.weight", final_norm.copy()
        yield f"{p}.shared_head.head.weight", head


def _truncated_svd(a: np.ndarray, rank: int, rng: np.random.Generator, iters: int = 3):
    """Randomized SVD (range finder with power iterations): a ~ u @ diag(s) @ vt."""
    omega = rng.standard_normal((a.shape[1], rank + 16))
    q, _ = np.linalg.qr(a @ omega)
    for _ in range(iters):
        q, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ q)
    u_small, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u_small)[:, :rank], s[:rank], vt[:rank]


# ---- outlier measurement -----------------------------------------------------------------------------------------
def _fake_int8(x: np.ndarray, scale) -> np.ndarray:
    return np.clip(np.round(x / scale), -127, 127) * scale


def _int8_rows(w: np.ndarray) -> np.ndarray:
    return _fake_int8(w, np.maximum(np.abs(w).max(1, keepdims=True), 1e-12) / 127)


def _fake_uint8_tensor(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Static per-tensor asymmetric int8 on the calibrated range [lo, hi] (which covers 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255
    zp = np.round(-128 - lo / scale)
    return (np.clip(np.round(x / scale) + zp, -128, 127) - zp) * scale


def _quant_errors(x: np.ndarray, w: np.ndarray, osplus_grid: int = 20) -> dict:
    """Relative output error ||y_q - y|| / ||y|| of one linear group (y = x w^T) under each activation scheme.

    Weights are int8 per output channel throughout. Activations: none (weight-only); static per-tensor asymmetric
    int8 on the calibrated range, as is ("per_tensor"), after SmoothQuant (alpha 0.5), after OS+ (per-channel shift
    to the range's midpoint, then channels above a threshold scaled down to it; the threshold searched on this
    output error over a 20-point grid); dynamic per-token symmetric int8 (absmax / 127, no smoothing).
    """
    x = x.astype(np.float64)
    ref = x @ w.T

    def rel(y):
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))

    def static(xt, wt, shift=None):
        yq = _fake_uint8_tensor(xt, float(xt.min()), float(xt.max())) @ _int8_rows(wt).T
        return yq if shift is None else yq + w @ shift  # the shift is added back exactly (through the bias)

    amax = np.abs(x).max(0)
    s = np.sqrt(amax) / np.sqrt(np.maximum(np.abs(w).max(0), 1e-5))
    s = np.where(amax > 0, s, 1.0)
    z = (x.max(0) + x.min(0)) / 2
    half = (x.max(0) - x.min(0)) / 2
    best = np.inf
    for t in np.linspace(half.max(), half[half > 0].min(), osplus_grid):
        so = np.maximum(1.0, half / t)
        best = min(best, rel(static((x - z) / so, w * so, z)))
    dyn = np.maximum(np.abs(x).max(1, keepdims=True), 1e-12) / 127
    return {
        "weight_only": rel(x @ _int8_rows(w).T),
        "per_tensor": rel(static(x, w)),
        "smoothquant": rel(static(x / s, w * s)),
        "osplus": best,
        "dynamic": rel(_fake_int8(x, dyn) @ _int8_rows(w).T),
    }


def outlier_report(size: str = "tiny", seed: int = 0, texts: list[str] | None = None) -> dict:
    """Measure the planted outliers at the first decoder layer, in numpy, without writing a checkpoint.

    The attention (MLA) input ``input_layernorm(embeddings)``, read by q_a_proj + kv_a_proj_with_mqa, and the FFN
    input ``post_attention_layernorm(...)`` of the same layer, read by the dense MLP's gate_proj + up_proj, are
    taken over ``texts`` (by default the tokenizer corpus), summarised per channel and per token, and the relative
    error of each group's output is computed under each activation scheme (see ``_quant_errors``).
    """
    cfg = size_config(size)
    b = _Builder(cfg, seed)
    emb, _, _ = b.embeddings()
    if texts is not None:
        tok = build_tokenizer(TOKENIZER_VOCAB)
        ids = np.array([tok.encode(t).ids for t in texts], dtype=object)
        seqs = [np.asarray(s, np.int64)[None] for s in ids]
    else:
        seqs = [b.tokens]
    w, _ = b.layer(0, emb[b.tokens])
    p = "model.layers.0"
    xs, fs = [], []
    for s in seqs:
        h = emb[s]
        x = _rmsnorm(h, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
        h = h + _attention(cfg, w, f"{p}.self_attn", x) @ w[f"{p}.self_attn.o_proj.weight"].T
        xs.append(x.reshape(-1, b.h))
        fs.append(_rmsnorm(h, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps).reshape(-1, b.h))
    x, f = np.concatenate(xs), np.concatenate(fs)
    ids = np.concatenate([s.ravel() for s in seqs])
    on = np.isin(ids, list(b.planted.massive_tokens))
    w_mla = np.concatenate([w[f"{p}.self_attn.q_a_proj.weight"], w[f"{p}.self_attn.kv_a_proj_with_mqa.weight"]])
    w_ffn = np.concatenate([w[f"{p}.mlp.gate_proj.weight"], w[f"{p}.mlp.up_proj.weight"]])
    planted = b.planted

    def summary(a):
        amax = np.abs(a).max(0)
        tok_max = np.abs(a).max(1)
        return {"absmax_max": float(amax.max()), "absmax_median": float(np.median(amax)),
                "absmax_ratio": float(amax.max() / np.median(amax)),
                "top_channels": [int(c) for c in np.argsort(-amax)[:8]],
                "token_absmax_median": float(np.median(tok_max[~on])),
                "token_absmax_massive_tokens": float(np.median(tok_max[on])) if on.any() else None}

    mla, ffn = summary(x), summary(f)
    mla.update({f"rel_err_{k}": v for k, v in _quant_errors(x, w_mla).items()})
    ffn.update({f"rel_err_{k}": v for k, v in _quant_errors(f, w_ffn).items()})
    return {
        "tokens": int(len(ids)), "massive_tokens": int(on.sum()),
        **{k: mla[k] for k in ("absmax_max", "absmax_median", "absmax_ratio", "top_channels")},
        "massive_channels": {int(c): [float(np.mean(x[on, c])), float(np.mean(np.abs(x[~on, c])))]
                             for c in planted.massive},
        "offset_channels": {int(c): [float(np.mean(x[~on, c])), float(np.std(x[~on, c]))] for c in planted.offset},
        "ordinary_std": float(np.std(x[~on][:, b.ordinary])),
        "rel_err_weight_only": mla["rel_err_weight_only"], "rel_err_per_tensor": mla["rel_err_per_tensor"],
        "rel_err_smoothquant": mla["rel_err_smoothquant"],
        "mla": mla, "ffn": ffn,
    }


# ---- writing ---------------------------------------------------------------------------------------------------
def _stored(name: str, w: np.ndarray, fp8: bool, dtype) -> list[tuple[str, np.ndarray]]:
    if name.endswith("e_score_correction_bias"):
        return [(name, w.astype(np.float32))]
    if fp8 and fp8_linear(name):
        q, scale_inv = quantize_fp8_blocks(w)
        return [(name, q), (f"{name}_scale_inv", scale_inv)]
    return [(name, w.astype(dtype))]


def _stored_bytes(cfg: ModelConfig, fp8: bool, dtype) -> int:
    total = 0
    for name, shape in tensor_shapes(cfg).items():
        n = int(np.prod(shape))
        if name.endswith("e_score_correction_bias"):
            total += 4 * n
        elif fp8 and fp8_linear(name):
            total += n + 4 * int(np.prod([-(-d // 128) for d in shape]))
        else:
            total += n * np.dtype(dtype).itemsize
    return total


def make_model(out_dir: str | Path, size: str = "tiny", fp8: bool = False, max_shard_bytes: int | None = None,
               seed: int = 0, dtype: str | None = None, overwrite: bool = False,
               overrides: dict | None = None) -> Path:
    """Write a deterministic DeepSeek-V3-architecture checkpoint of ``size`` into ``out_dir``; returns the path.

    ``overrides`` replaces config fields of the size (e.g. ``{"hidden_size": 7168, "moe_intermediate_size": 2048}``
    for R1-width layers in benchmarks); they are recorded in make_model.json.

    ``dtype`` is the storage type of the non-FP8 tensors: ``"f32"`` (default without ``fp8``) or ``"bf16"``
    (default with ``fp8``, as in R1). ``max_shard_bytes`` defaults to about a fifth of the checkpoint. The
    directory is built next to ``out_dir`` and renamed into place when complete; ``out_dir`` must not exist or be
    empty (or pass ``overwrite=True``).
    """
    dtype = dtype or ("bf16" if fp8 else "f32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    np_dtype = DTYPES[dtype]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    cfg = size_config(size)
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cfg)})
        if unknown:
            raise ValueError(f"make_model overrides: {', '.join(unknown)} are not DeepSeek-V3 config fields")
        cfg = dataclasses.replace(cfg, **overrides)
        cfg.validate(source=f"make_model overrides {overrides}")  # refuse now, not after writing gigabytes
    cfg.torch_dtype = "float32" if dtype == "f32" and not fp8 else "bfloat16"
    if fp8:
        cfg.quantization_config = dict(R1_FP8_QUANTIZATION_CONFIG)
    if max_shard_bytes is None:
        max_shard_bytes = _stored_bytes(cfg, fp8, np_dtype) // 5 + 1

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        builder = _Builder(cfg, seed)
        cross_shard = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
        holder: dict[str, ShardedWriter] = {}

        def placement(name, _arr):
            return holder["w"].shard_number + 1 if name == cross_shard else None

        with ShardedWriter(tmp, max_shard_bytes=max_shard_bytes, placement=placement) as writer:
            holder["w"] = writer
            for name, w in builder.tensors():
                for stored_name, arr in _stored(name, w, fp8, np_dtype):
                    writer.add(stored_name, arr)
        cfg.save(tmp)
        write_json_atomic(tmp / "generation_config.json", GENERATION_CONFIG)
        train_tokenizer(TOKENIZER_VOCAB, tmp, model_max_length=cfg.max_position_embeddings)
        write_json_atomic(tmp / "make_model.json", {
            "size": size, "seed": seed, "fp8": fp8, "dtype": dtype, "content_version": CONTENT_VERSION,
            **({"overrides": dict(overrides)} if overrides else {}),
            "parameters": parameter_counts(cfg), "planted": builder.planted.to_json(),
            "bigram_channels": [int(c) for c in builder.bigram_channels], "statistics": builder.report})
        if out_dir.exists():
            if overwrite:
                shutil.rmtree(out_dir)
            else:
                out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---- the cached default model -----------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("GOLDSTICK_CACHE") or Path.home() / ".cache" / "goldstick")


def _content_key() -> str:
    digest = hashlib.sha256()
    for path in (Path(__file__), Path(__file__).parents[1] / "model" / "tokenizer.py", CORPUS_PATH):
        digest.update(path.read_bytes())
    return f"v{CONTENT_VERSION}-{digest.hexdigest()[:10]}"


def default_model_path(size: str = "tiny") -> Path:
    """The f32 model of ``size`` (seed 0), made once under ``cache_dir()/models/``; safe under concurrency."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {list(SIZES)}")
    root = cache_dir() / "models"
    final = root / f"{size}-{_content_key()}"
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    made = make_model(staging, size=size)
    try:
        os.rename(made, final)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(made, ignore_errors=True)
        if not (final / "config.json").exists():
            raise
    return final


# ---- CLI hook --------------------------------------------------------------------------------------------------
def add_make_model_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("make-model", help="write a small deterministic DeepSeek-V3-architecture checkpoint",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--fp8", action="store_true", help="R1 release format: FP8 block weights + weight_scale_inv")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="storage of the non-FP8 tensors (default f32, or bf16 with --fp8)")
    p.add_argument("--shard-size", type=float, default=None, metavar="MB", help="maximum shard size in MB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=INT", dest="overrides",
                   help="override an integer config field of the size, e.g. --set hidden_size=7168 (repeatable)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_make_model)
    return p


def run_make_model(args: argparse.Namespace) -> int:
    shard = None if args.shard_size is None else int(args.shard_size * 1_000_000)
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: expected KEY=INTEGER, e.g. hidden_size=7168") from None
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty (add --overwrite to replace it)")
    path = make_model(args.out, size=args.size, fp8=args.fp8, max_shard_bytes=shard, seed=args.seed,
                      dtype=args.dtype, overwrite=args.overwrite, overrides=overrides or None)
    info = json.loads((path / "make_model.json").read_text())
    print(f"wrote {path} ({args.size}, {info['parameters']['total']:,} parameters)")
    return 0
