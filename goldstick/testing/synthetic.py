"""The weights of the synthetic DeepSeek-V3 models (``goldstick.testing.make_model`` writes them): the named sizes,
the planted activation outliers, and a float32 numpy forward (the statistics pass) that scales each tensor as it is
generated.

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
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from goldstick.model.architecture import route
from goldstick.model.config import MLA_NORM_EPS, ModelConfig
from goldstick.model.tokenizer import BOS_TOKEN, EOS_TOKEN, build_tokenizer, corpus_lines

TOKENIZER_VOCAB = 4096  # cap given to the BPE trainer; the model's vocab_size is the result rounded up to 128

R1_EXTRA = {"aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1, "pretraining_tp": 1, "use_cache": True,
            "initializer_range": 0.02, "attention_dropout": 0.0}
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


R1_FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                              "weight_block_size": [128, 128]}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
                     "temperature": 0.6, "top_p": 0.95}


# ---- tensor plan ---------------------------------------------------------------------------------------------
def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint (FP8 scales excluded) in writing order: embed, layers, norm, head, MTP."""
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for layer in range(cfg.num_hidden_layers):
        shapes.update(cfg.layer_tensor_shapes(layer))
    shapes["model.norm.weight"] = (cfg.hidden_size,)
    shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    for layer in range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        shapes.update(cfg.mtp_extra_tensor_shapes(layer))
        shapes.update(cfg.layer_tensor_shapes(layer))
    return shapes


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    shapes = tensor_shapes(cfg)
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    total = sum(int(np.prod(s)) for s in shapes.values())
    mtp_n = sum(int(np.prod(s)) for n, s in shapes.items() if n.startswith(mtp))
    return {"total": total, "main": total - mtp_n, "mtp": mtp_n}


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


@functools.cache
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


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))


@functools.cache
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
    rng = tensor_rng(seed, "planted-outliers")
    h = cfg.hidden_size
    wide = h > 512
    n_massive, n_offset = N_MASSIVE[wide], N_OFFSET[wide]
    chans = [int(c) for c in rng.permutation(h)]
    massive_ch, offset_ch, rest = chans[:n_massive], chans[n_massive:n_massive + n_offset], chans[n_massive + n_offset:]
    massive = {c: float(v) for c, v in zip(massive_ch, MASSIVE_VALUES)}
    offset = {c: float(v) for c, v in zip(offset_ch, OFFSET_VALUES)}
    layers = range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)

    def pick(pool, gains, key):
        r = tensor_rng(seed, key)
        return {int(c): float(g) for c, g in zip(r.choice(pool, size=len(gains), replace=False), gains)}

    def input_gains(i):
        # every offset channel is amplified (gains shuffled per layer), plus a few zero-mean channels
        order = tensor_rng(seed, f"in-offset-gain-{i}").permutation(len(offset_ch))
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



# ---- numpy building blocks (the float32 statistics pass) ----------------------------------------------------
def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
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


def attention(cfg: ModelConfig, w: dict, p: str, x: np.ndarray) -> np.ndarray:
    """MLA on x [B, T, H] -> attention output before o_proj [B, T, n*v]."""
    b, t, _ = x.shape
    scores, v = attention_scores(cfg, w, p, x)
    scores = scores + np.triu(np.full((t, t), -np.inf, np.float32), 1)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    return (scores @ v).transpose(0, 2, 1, 3).reshape(b, t, cfg.num_attention_heads * cfg.v_head_dim)


def score_spread(scores: np.ndarray) -> float:
    """Typical spread of one query's attention logits over the keys it sees (causal), averaged over queries."""
    t = scores.shape[-1]
    causal = np.tril(np.ones((t, t), bool))
    n = causal.sum(-1)
    mean = np.where(causal, scores, 0).sum(-1) / n
    var = np.where(causal, (scores - mean[..., None]) ** 2, 0).sum(-1) / n
    return float(np.mean(np.sqrt(var[..., t // 4:])))


def attention_scores(cfg: ModelConfig, w: dict, p: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MLA attention logits [B, n, T, T] (scaled, unmasked) and values [B, n, T, v] for x [B, T, H]."""
    b, t, _ = x.shape
    n, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = rmsnorm(x @ w[f"{p}.q_a_proj.weight"].T, w[f"{p}.q_a_layernorm.weight"], MLA_NORM_EPS)
    q = (q @ w[f"{p}.q_b_proj.weight"].T).reshape(b, t, n, dn + dr).transpose(0, 2, 1, 3)
    kv = x @ w[f"{p}.kv_a_proj_with_mqa.weight"].T
    c, k_rope = kv[..., : cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
    c = rmsnorm(c, w[f"{p}.kv_a_layernorm.weight"], MLA_NORM_EPS)
    kvb = (c @ w[f"{p}.kv_b_proj.weight"].T).reshape(b, t, n, dn + dv).transpose(0, 2, 1, 3)
    k_nope, v = kvb[..., :dn], kvb[..., dn:]
    pos = np.arange(t, dtype=np.float64)
    q_rope = _rope(q[..., dn:], pos, cfg.rope_theta)
    k_rope = _rope(k_rope[:, None], pos, cfg.rope_theta)
    scores = (q[..., :dn] @ k_nope.transpose(0, 1, 3, 2) + q_rope @ k_rope.transpose(0, 1, 3, 2))
    return scores * np.float32(cfg.softmax_scale), v


def mlp_hidden(w: dict, p: str, x: np.ndarray) -> np.ndarray:
    return _silu(x @ w[f"{p}.gate_proj.weight"].T) * (x @ w[f"{p}.up_proj.weight"].T)




def _moe_parts(cfg: ModelConfig, w: dict, p: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(routed output, shared output, expert ids) for x [N, H], down_proj included; tokens pick their experts by
    the network's own rule (``architecture.route``)."""
    logits = x @ w[f"{p}.mlp.gate.weight"].T
    weights, ids = route(cfg, 1.0 / (1.0 + np.exp(-logits)), w[f"{p}.mlp.gate.e_score_correction_bias"])
    routed = np.zeros_like(x)
    for e in range(cfg.n_routed_experts):
        tok, slot = np.nonzero(ids == e)
        if tok.size:
            ep = f"{p}.mlp.experts.{e}"
            y = mlp_hidden(w, ep, x[tok]) @ w[f"{ep}.down_proj.weight"].T
            np.add.at(routed, tok, y * weights[tok, slot, None])
    shared = mlp_hidden(w, f"{p}.mlp.shared_experts", x) @ w[f"{p}.mlp.shared_experts.down_proj.weight"].T
    return routed, shared, ids


# ---- weight generation -----------------------------------------------------------------------------------------
SUBLAYER_SCALE = 0.4  # each sublayer adds about this fraction of the residual's typical magnitude
ATTENTION_SPREAD = 4.0  # typical spread (std over the keys) of one query's attention logits
ROUTER_LOGIT_STD = 1.0
BIGRAM_FRACTION = 0.375  # share of the hidden channels carrying the bigram factors (96 of 256, 384 of 1024)


def round3(x: float) -> float:
    return float(f"{x:.3g}")


class WeightBuilder:
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
        return tensor_rng(self.seed, name).standard_normal(shape, dtype=np.float32) * np.float32(std)

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
    def bigram_factors(self, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The corpus' smoothed bigram log-probabilities factored at ``rank``: (X [n,r] for embed_tokens, Y [n,r] for
        lm_head, unigram log-prob [n], which tokens occur [n]) over the tokenizer's n tokens."""
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
        u, s, vt = truncated_svd(resid, rank, tensor_rng(self.seed, "bigram-svd"))
        x = u * np.sqrt(s)
        y = vt.T * np.sqrt(s)
        cx = np.sqrt(np.mean(x[row[:, 0] > 0] ** 2))  # unit rms over tokens that occur
        self.report["bigram"] = {"rank": rank, "singular_value_share": float((s ** 2).sum() / (resid ** 2).sum())}
        return x / cx, y * cx, unigram, row[:, 0] > 0

    def embeddings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(embed_tokens [V,H], bigram factors Y [V,r] for lm_head, unigram log-prob [V])."""
        cfg = self.cfg
        n_tok = build_tokenizer(TOKENIZER_VOCAB).get_vocab_size()
        r = int(round(BIGRAM_FRACTION * self.h))
        x, y, unigram, _ = self.bigram_factors(r)
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
        x = rmsnorm(hidden, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
        if ATTENTION_SPREAD:  # queries scaled so attention is as peaked as in a trained model
            f = round3(ATTENTION_SPREAD / score_spread(attention_scores(cfg, w, a, x)[0]))
            w[f"{a}.q_b_proj.weight"] *= np.float32(f)
            stats["attention_spread"] = round(score_spread(attention_scores(cfg, w, a, x)[0]), 3)
        attn = attention(cfg, w, a, x) @ w[f"{a}.o_proj.weight"].T
        f = round3(target / self._typical(attn))
        w[f"{a}.o_proj.weight"] *= np.float32(f)
        hidden = hidden + attn * np.float32(f)

        w[f"{p}.post_attention_layernorm.weight"] = self.norm_weight(
            f"{p}.post_attention_layernorm.weight", self.h, post_gain)
        x = rmsnorm(hidden, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
        flat = x.reshape(-1, self.h)
        if cfg.is_moe_layer(layer):
            m = f"{p}.mlp"
            gate = self.reads_residual(self.linear(f"{m}.gate.weight", cfg.n_routed_experts, self.h))
            gate *= np.float32(round3(ROUTER_LOGIT_STD / float(np.std(flat @ gate.T))))
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
            out = mlp_hidden(w, f"{p}.mlp", flat) @ w[f"{p}.mlp.down_proj.weight"].T
            out = out.reshape(hidden.shape)
            downs = [f"{p}.mlp.down_proj.weight"]
        f = round3(target / self._typical(out))
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
        head = self.normal(name, (self.cfg.vocab_size, self.h), 0.02 / np.sqrt(self.h))
        gain, coef = self.head_fit(hidden, final_norm)
        head[:, self.bigram_channels] = y * gain[None, :]
        head[:, self.planted.special] = (unigram[:, None] * coef[None, :]).astype(np.float32)
        return head

    def head_fit(self, hidden, final_norm) -> tuple[np.ndarray, np.ndarray]:
        """lm_head's gains on the bigram channels [r] and its least-squares weights on the planted channels."""
        x = rmsnorm(hidden, final_norm, self.cfg.rms_norm_eps).reshape(-1, self.h)
        rms = np.sqrt(np.mean(hidden ** 2, axis=-1))
        gain = float(np.median(rms)) / final_norm[self.bigram_channels]
        xs = x[:, np.array(self.planted.special)].astype(np.float64)
        coef = np.linalg.lstsq(xs, np.ones(len(xs)), rcond=None)[0]
        coef = np.array([round3(c) for c in coef])
        fit = xs @ coef
        self.report["unigram_carrier"] = {"mean": round(float(fit.mean()), 4), "std": round(float(fit.std()), 4)}
        return gain, coef

    def mtp_layer(self, layer, emb, hidden, head, final_norm) -> Iterator[tuple[str, np.ndarray]]:
        cfg, p = self.cfg, f"model.layers.{layer}"
        enorm = self.norm_weight(f"{p}.enorm.weight", self.h)
        hnorm = self.norm_weight(f"{p}.hnorm.weight", self.h)
        nxt = np.concatenate([self.tokens[:, 1:], self.tokens[:, -1:]], axis=1)  # the token after each position
        self.positions_ids = nxt
        e_in = rmsnorm(emb[nxt], enorm, cfg.rms_norm_eps)
        h_in = rmsnorm(hidden, hnorm, cfg.rms_norm_eps)
        both = np.concatenate([e_in, h_in], axis=-1)
        eh = self.normal(f"{p}.eh_proj.weight", (self.h, 2 * self.h), (2 * self.h) ** -0.5)
        for c in self.planted.special:  # planted channels pass through from the embedding half
            eh[:, c] *= 0.01
            eh[:, self.h + c] *= 0.01
            eh[c, :] = 0.0
        out = both @ eh.T
        eh[self.ordinary] *= np.float32(round3(1.0 / self._typical(out)))
        for c in self.planted.special:
            eh[c, c] = np.float32(round3(float(np.mean(emb[nxt][..., c])) / float(np.mean(e_in[..., c]))))
        x = both @ eh.T
        yield f"{p}.embed_tokens.weight", emb
        yield f"{p}.enorm.weight", enorm
        yield f"{p}.hnorm.weight", hnorm
        yield f"{p}.eh_proj.weight", eh
        w, x = self.layer(layer, x)
        yield from w.items()
        yield f"{p}.shared_head.norm.weight", final_norm.copy()
        yield f"{p}.shared_head.head.weight", head


def truncated_svd(a: np.ndarray, rank: int, rng: np.random.Generator, iters: int = 3):
    """Randomized SVD (range finder with power iterations): a ~ u @ diag(s) @ vt."""
    omega = rng.standard_normal((a.shape[1], rank + 16))
    q, _ = np.linalg.qr(a @ omega)
    for _ in range(iters):
        q, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ q)
    u_small, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u_small)[:, :rank], s[:rank], vt[:rank]
