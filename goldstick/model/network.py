"""The DeepSeek-V3/R1 network in MindSpore, read top to bottom in the order data flows.

RMSNorm -> rotary helpers (YaRN) -> Linear -> MLA attention -> MLP -> Router -> MoE -> DecoderLayer -> Model
-> DeepseekV3ForCausalLM.

Compute is float32 on CPU (bf16 is storage only there, notes/mindspore-cpu.md §3), in PyNative so that forward
hooks can observe every linear during calibration. Parameter names are exactly the HF checkpoint names
(``model.layers.3.mlp.experts.17.up_proj.weight``), so a quantized cell swapped in for a ``Linear`` keeps them.
The maths follows transformers' ``modeling_deepseek_v3`` (the parity oracle in tests/test_parity.py).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.auto_generate import MatMulExt

from goldstick.model.architecture import route
from goldstick.model.config import MLA_NORM_EPS, ModelConfig

# A finite "minus infinity" for masked scores: a fully-masked row (left padding) then gives a uniform softmax
# instead of NaN, and exp(-1e9 - max) is exactly 0 for every row that has a real key.
MASKED_SCORE = -1e9


def host_broadcast() -> bool:
    """True on CPU, where the elementwise ops with a broadcast operand run on the host (numpy): MindSpore's CPU
    kernels are much slower on a broadcast operand than on equal shapes (RMSNorm, masking the scores). The same
    float32 maths; where numpy reduces
    (RMSNorm's mean, the MoE's sum over experts) the additions run in another order, so values can differ in the
    last bit. On Ascend the device kernels run (a host round trip there would cost far more)."""
    global _HOST_BROADCAST
    if _HOST_BROADCAST is None:
        _HOST_BROADCAST = ms.get_context("device_target") == "CPU"
    return _HOST_BROADCAST


_HOST_BROADCAST = None


_PLACEHOLDERS = False


@contextmanager
def parameter_placeholders():
    """Build cells whose parameters are one-element placeholders, for a caller that sets every parameter from a
    checkpoint right after (goldstick.engine.layer): a layer's parameters are otherwise allocated and filled only to
    be replaced, which doubles the peak memory of loading a DeepSeek layer."""
    global _PLACEHOLDERS
    _PLACEHOLDERS = True
    try:
        yield
    finally:
        _PLACEHOLDERS = False


def _param(shape: tuple[int, ...], name: str, fill: float = 0.0) -> Parameter:
    if _PLACEHOLDERS:
        shape = (1,) * len(shape)
    return Parameter(Tensor(np.full(shape, fill, dtype=np.float32)), name=name)


# ------------------------------------------------------------------------------------------------ norms
class RMSNorm(nn.Cell):
    """x / rms(x) * weight, computed in fp32 (there is no RmsNorm kernel on CPU)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _param((dim,), "weight", 1.0)
        self.has_bias = False

    def set_bias(self, bias: np.ndarray, name: str) -> None:
        """Add a bias after the scale: how an OS+ channel shift is folded into the norm that feeds the linears
        (the vllm-mindspore loader reads e.g. ``input_layernorm.bias`` as that shift)."""
        self.bias = Parameter(Tensor(np.asarray(bias, dtype=np.float32)), name=name, requires_grad=False)
        self.has_bias = True

    def construct(self, x: Tensor) -> Tensor:
        if host_broadcast():  # numpy: faster than the five CPU kernels
            a = x.asnumpy()
            inv_rms = np.square(a).mean(-1, keepdims=True)
            inv_rms += np.float32(self.eps)
            np.sqrt(inv_rms, out=inv_rms)
            np.divide(np.float32(1.0), inv_rms, out=inv_rms)
            y = a * inv_rms
            np.multiply(y, self.weight.asnumpy(), out=y)
            if self.has_bias:
                np.add(y, self.bias.asnumpy(), out=y)
            return Tensor.from_numpy(y)
        variance = ops.mean(x * x, -1, keep_dims=True)
        y = x * ops.rsqrt(variance + self.eps) * self.weight
        return y + self.bias if self.has_bias else y


# ------------------------------------------------------------------------------------------------ rotary
def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies for the rope half of each head, and the cos/sin attention factor.

    Without rope_scaling: 1/theta^(2i/d). With YaRN (R1: factor 40 over 4096 original positions): frequencies
    below the beta_slow..beta_fast correction range are interpolated by 1/factor, those above are kept, with a
    linear ramp between (transformers' _compute_yarn_parameters, truncate=True).
    """
    dim = cfg.qk_rope_head_dim
    base = float(cfg.rope_theta)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    yarn = cfg.yarn
    if not yarn:
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    factor = float(yarn["factor"])
    original = float(yarn.get("original_max_position_embeddings", cfg.max_position_embeddings))
    beta_fast = float(yarn.get("beta_fast") or 32)
    beta_slow = float(yarn.get("beta_slow") or 1)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if yarn.get("attention_factor") is not None:
        attention_factor = float(yarn["attention_factor"])
    elif yarn.get("mscale") and yarn.get("mscale_all_dim"):
        attention_factor = mscale(factor, float(yarn["mscale"])) / mscale(factor, float(yarn["mscale_all_dim"]))
    else:
        attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1 = extrapolate (keep the original frequency), 0 = interpolate
    inv_freq = (1.0 / (factor * pos_freqs)) * (1.0 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq.astype(np.float32), attention_factor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool) -> Tensor:
    """Rotate the last dim of x [B, heads, S, r] by per-position angles; cos/sin are [B, 1, S, r/2].

    DeepSeek stores rope dims as interleaved pairs (x0, x1), (x2, x3) ... Like transformers we rotate the even/odd
    slices and concatenate the halves: queries and keys get the same permutation, so q.k is unchanged.
    """
    half = x.shape[-1] // 2
    if host_broadcast():
        x, cos, sin = x.asnumpy(), cos.asnumpy(), sin.asnumpy()
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., :half], x[..., half:]
    if isinstance(x, np.ndarray):
        return Tensor.from_numpy(np.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1))
    return ops.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


# ------------------------------------------------------------------------------------------------ linear
class Linear(nn.Cell):
    """y = x @ weight.T with weight [out, in] as in the HF checkpoint; no bias (DeepSeek-V3 has none)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param((out_features, in_features), "weight")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        if x.ndim == 2:  # expert and router inputs: no reshapes (each is an op launch in PyNative)
            return self.matmul(x, self.weight)
        return unflatten(self.matmul(x.reshape(-1, self.in_features), self.weight), x.shape[:-1])


def unflatten(y: Tensor, lead: tuple) -> Tensor:
    """A linear's [tokens, out] product as [*lead, out]. On CPU the reshape is numpy's (see ``host_broadcast``):
    MindSpore's makes a view, and ``asnumpy()`` of a view (what the host ops, the quantized cells and the engine's
    hooks call on a linear's output) copies it into a new block of the memory pool, which keeps its peak for the
    life of the process: the tiny model's final logits of one calibration batch, [32, 128, 3200], cost 50 MB more.
    The same values either way."""
    if host_broadcast():
        return Tensor.from_numpy(y.asnumpy().reshape(*lead, y.shape[-1]))
    return y.reshape(*lead, y.shape[-1])


def masked_fill(scores: Tensor, mask: Tensor) -> Tensor:
    """``ops.masked_fill(scores, mask, MASKED_SCORE)``; on CPU on the host (see ``host_broadcast``), in place on
    ``scores``, a fresh temporary of the caller's."""
    if not host_broadcast():
        return ops.masked_fill(scores, mask, MASKED_SCORE)
    a = scores.asnumpy()
    if not (a.flags.writeable and a.flags.c_contiguous):
        a = np.array(a)
    np.copyto(a, np.float32(MASKED_SCORE), where=mask.asnumpy())
    return Tensor.from_numpy(a)


class StreamedLinear(nn.Cell):
    """A float linear whose weight [out, in] comes from ``load()`` at each call and is dropped after it: for the
    calibration engine's float pass of routed experts on a token sample, where each expert runs once, so a layer's
    experts are never all held in float32 at once. It has no parameters: the engine replaces it before writing."""

    def __init__(self, in_features: int, out_features: int, load):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.load = load
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> Tensor:
        weight = Tensor.from_numpy(self.load())
        return unflatten(self.matmul(x.reshape(-1, self.in_features), weight), x.shape[:-1])


# ------------------------------------------------------------------------------------------------ attention
class Attention(nn.Cell):
    """Multi-head latent attention (MLA).

    q: x -> q_a_proj -> q_a_layernorm -> q_b_proj (or a plain q_proj without q LoRA) -> [B,S,H,nope+rope]
    kv: x -> kv_a_proj_with_mqa -> [latent (kv_lora_rank) | k_rope (one shared head)]
        latent -> kv_a_layernorm -> kv_b_proj -> [B,S,H,nope+v] -> k_nope, v
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora = cfg.q_lora_rank is not None
        q_out = self.n_heads * cfg.qk_head_dim
        if self.q_lora:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, MLA_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_out)
        else:
            self.q_proj = Linear(cfg.hidden_size, q_out)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, MLA_NORM_EPS)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, self.n_heads * (self.nope + self.v_dim))
        self.o_proj = Linear(self.n_heads * self.v_dim, cfg.hidden_size)
        self.softmax_scale = cfg.softmax_scale
        # BatchMatMul with the key untransposed: on CPU faster than ops.matmul on a transposed view
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)
        self.values_matmul = ops.BatchMatMul()
        # ops.matmul and ops.softmax as primitives the cell holds (the same kernels), which goldstick serve runs on
        # the host: eager, their non-tensor arguments cost memory per launch on CPU (goldstick.serve.host_ops)
        self.matmul = MatMulExt()
        self.softmax = ops.Softmax(-1)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """x [B,S,hidden]; cos/sin [B,1,S,rope/2]; mask [B,1,S,S] bool, True where attention is forbidden."""
        b, s, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.reshape(b, s, self.n_heads, self.nope + self.rope).transpose(0, 2, 1, 3)
        q_nope, q_rope = q[..., : self.nope], q[..., self.nope:]

        compressed = self.kv_a_proj_with_mqa(x)
        latent, k_rope = compressed[..., : self.kv_lora_rank], compressed[..., self.kv_lora_rank:]
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))
        kv = kv.reshape(b, s, self.n_heads, self.nope + self.v_dim).transpose(0, 2, 1, 3)
        k_nope, v = kv[..., : self.nope], kv[..., self.nope:]

        interleave = self.cfg.rope_interleave
        q_rope = apply_rope(q_rope, cos, sin, interleave)
        k_rope = apply_rope(k_rope.reshape(b, 1, s, self.rope), cos, sin, interleave)
        k_rope = ops.broadcast_to(k_rope, (b, self.n_heads, s, self.rope))

        query = ops.cat((q_nope, q_rope), -1)
        key = ops.cat((k_nope, k_rope), -1)
        scores = self.scores_matmul(query, key) * self.softmax_scale
        scores = masked_fill(scores, mask)
        probs = self.softmax(scores)
        out = self.values_matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, s, self.n_heads * self.v_dim)
        return self.o_proj(out)

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache,
                       layer: int) -> Tensor:
        """Attention of S new tokens over the cached ones plus themselves, appending them to ``cache``.

        x [B,S,hidden]; cos/sin [B,1,S,rope/2] at the new tokens' positions; mask [B,1,S,C] bool over the cache's
        C slots (cached + new keys, then unfilled ones), True where attention is forbidden. The cache keeps only
        what R1 serving keeps: the normed latent kv_a_layernorm(c_kv) [B,C,kv_lora_rank] and the roped shared key
        k_pe [B,C,rope].

        With a float kv_b_proj the weight is absorbed (the official demo's and vLLM's MLA): W_UK folds into the
        query (q_nope . W_UK scores directly against the latent) and W_UV is applied after the softmax to the
        attended latent, so no per-head K/V is ever formed. A kv_b_proj quantized with activation quantization
        (W8A8) cannot be folded exactly, so then the cached latent is expanded through the cell every step.
        """
        b, s, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.reshape(b, s, self.n_heads, self.nope + self.rope).transpose(0, 2, 1, 3)
        q_nope, q_rope = q[..., : self.nope], q[..., self.nope:]
        q_rope = apply_rope(q_rope, cos, sin, self.cfg.rope_interleave)

        compressed = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(compressed[..., : self.kv_lora_rank])
        k_rope = apply_rope(compressed[..., self.kv_lora_rank:].reshape(b, 1, s, self.rope), cos, sin,
                            self.cfg.rope_interleave).reshape(b, s, self.rope)
        latent, k_rope = cache.append(layer, latent, k_rope)  # [B,C,r], [B,C,rope]
        t = latent.shape[1]

        rope_scores = self.matmul(q_rope, k_rope.reshape(b, 1, t, self.rope).transpose(0, 1, 3, 2))
        absorbed = cache.absorbed_weights(layer, self) if cache.absorb else None
        if absorbed is not None:
            w_uk, w_uv_t = absorbed  # [H, nope, r], [H, r, v]
            latent_t = latent.reshape(b, 1, t, self.kv_lora_rank)
            scores = self.matmul(self.matmul(q_nope, w_uk), latent_t.transpose(0, 1, 3, 2)) + rope_scores
            scores = masked_fill(scores * self.softmax_scale, mask)
            probs = self.softmax(scores)
            out = self.matmul(self.matmul(probs, latent_t), w_uv_t)  # [B,H,S,r] -> [B,H,S,v]
        else:
            kv = self.kv_b_proj(latent).reshape(b, t, self.n_heads, self.nope + self.v_dim).transpose(0, 2, 1, 3)
            k_nope, v = kv[..., : self.nope], kv[..., self.nope:]
            scores = self.matmul(q_nope, k_nope.transpose(0, 1, 3, 2)) + rope_scores
            scores = masked_fill(scores * self.softmax_scale, mask)
            probs = self.softmax(scores)
            out = self.matmul(probs, v)
        out = out.transpose(0, 2, 1, 3).reshape(b, s, self.n_heads * self.v_dim)
        return self.o_proj(out)


# ------------------------------------------------------------------------------------------------ feed-forward
class MLP(nn.Cell):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)). Used for dense layers, experts and shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def construct(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Cell):
    """Sigmoid scores in fp32, then group-limited top-k as ``architecture.route`` describes
    (e_score_correction_bias only chooses experts).

    The scores are computed on the device; the selection runs on the host (``architecture.route``, numpy, the one
    the synthetic models' statistics pass uses too): the MoE reads the routing on the host anyway to dispatch
    tokens, and a dozen small device ops (each a thread-pool launch on CPU) cost more than the numpy on
    [tokens, experts]. Outputs are Tensors viewing the host arrays, so ``asnumpy`` is free.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = _param((cfg.n_routed_experts, cfg.hidden_size), "weight")
        self.e_score_correction_bias = _param((cfg.n_routed_experts,), "e_score_correction_bias")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, expert ids [T, k] int32)."""
        scores = ops.sigmoid(self.matmul(x, self.weight)).asnumpy()
        weights, ids = route(self.cfg, scores, self.e_score_correction_bias.asnumpy())
        return Tensor.from_numpy(weights), Tensor.from_numpy(ids)


def expert_bucket(rows: int) -> int:
    """Row count an expert runs on: rounded up to an eighth of its power of two (at most +12.5 % work, about a
    hundred distinct shapes in all)."""
    step = max(8, 2 ** (rows.bit_length() - 4))
    return -(-rows // step) * step


def expert_assignments(ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(expert, tokens, pairs) for every expert with tokens, from the routing ids [T, k], sorted by expert once:
    the token rows it serves (in token order) and the flat (token * k + slot) index of each of those pairs."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat)
    assignments, done = [], 0
    for e in np.nonzero(counts)[0]:
        pairs = order[done:done + counts[e]]
        assignments.append((int(e), pairs // k, pairs))
        done += int(counts[e])
    return assignments


def padded_rows(tokens: np.ndarray) -> np.ndarray:
    """An expert's token rows padded to ``expert_bucket`` rows by repeating its last row. PyNative caches per-op
    state for every new shape, and exact per-expert counts would make that cache grow with every layer; a repeated
    real row leaves min/max statistics unchanged and rows are independent, so the kept outputs are exact."""
    n = tokens.size
    return np.concatenate((tokens, np.full(expert_bucket(n) - n, tokens[-1])))


def dispatch_plan(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Token dispatch for the routed experts from the routing ids [T, k], for one gather of every expert's rows.

    Returns ``rows`` (int32): each expert's ``padded_rows``, expert after expert; ``where`` (int32, [T*k]): the
    position in those blocks of each (token, slot) pair's output; ``blocks``: (expert, padded rows) for the experts
    with tokens.
    """
    rows, blocks = [], []
    where = np.empty(ids.size, dtype=np.int32)
    start = 0
    for e, tokens, pairs in expert_assignments(ids):
        mine = padded_rows(tokens)
        rows.append(mine)
        where[pairs] = np.arange(start, start + tokens.size)
        blocks.append((e, mine.size))
        start += mine.size
    return np.concatenate(rows).astype(np.int32), where, blocks


class MoE(nn.Cell):
    """Routed experts (each an MLP with its own HF-named linears) plus shared experts.

    Dispatch reads the routing on the host and runs each expert only on its tokens: on CPU there is no grouped
    matmul, and per-expert calls let calibration hooks see exactly the tokens each expert serves. On CPU the
    dispatch and the weighted sum are numpy (``_experts_on_host``). Elsewhere the tokens are sorted by expert once
    per call (``dispatch_plan``), so the device work outside the experts is a fixed handful of ops (gather, split,
    cat, gather, weighted sum) whatever the number of experts.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = nn.CellList([MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                    for _ in range(cfg.n_routed_experts)])
        self.has_shared = cfg.n_shared_experts > 0
        if self.has_shared:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        # Set by goldstick.quant.ascend.group_routed_experts: ``experts`` is then one grouped-matmul cell (Ascend).
        self.grouped = False

    def construct(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.gate(flat)
        if self.grouped:
            out = self.experts(flat, weights, ids)
            return (out + self.shared_experts(flat) if self.has_shared else out).reshape(shape)
        t = flat.shape[0]
        ids_np, weights_np = ids.asnumpy(), weights.asnumpy()
        if host_broadcast():
            return self._experts_on_host(flat, weights_np, ids_np).reshape(shape)
        k = ids_np.shape[1]
        rows, where, blocks = dispatch_plan(ids_np)
        # one gather of every expert's rows (blocks in expert order), one split, the experts, one gather back to
        # (token, slot) order, and the weighted sum over the k slots
        parts = ops.split(ops.gather(flat, Tensor(rows), 0), [size for _, size in blocks], 0)
        ys = [self.experts[e](part) for (e, _), part in zip(blocks, parts)]
        y = ops.cat(ys, 0) if len(ys) > 1 else ys[0]
        picked = ops.gather(y, Tensor(where), 0).reshape(t, k, shape[-1])
        slot_weights = np.ascontiguousarray(weights_np, dtype=np.float32).reshape(t, k, 1)
        out = (picked * Tensor(slot_weights)).sum(1)
        if self.has_shared:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)

    def _experts_on_host(self, flat: Tensor, weights: np.ndarray, ids: np.ndarray) -> Tensor:
        """The routed experts with the dispatch and the weighted sum on the host (CPU): each expert's rows are
        gathered by numpy and its weighted output added into the token rows it serves, expert after expert. No
        [tokens * k, hidden] temporaries (MindSpore's CPU pool would keep their peak) and no reduction kernel
        (numpy's in-place adds are far cheaper here than MindSpore's sum over the k slots)."""
        x = flat.asnumpy()
        out = np.zeros(x.shape, dtype=np.float32)
        pair_weights = np.asarray(weights, dtype=np.float32).reshape(-1, 1)
        for e, tokens, pairs in expert_assignments(ids):
            y = self.experts[e](Tensor.from_numpy(x[padded_rows(tokens)])).asnumpy()[:tokens.size]
            out[tokens] += y * pair_weights[pairs]
        if self.has_shared:
            out += self.shared_experts(flat).asnumpy()
        return Tensor.from_numpy(out)


# ------------------------------------------------------------------------------------------------ blocks
class DecoderLayer(nn.Cell):
    """Pre-norm residual block: h += attn(input_layernorm(h)); h += mlp(post_attention_layernorm(h))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def construct(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        return self.feed_forward(self.attend(h, cos, sin, mask))

    def attend(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """The attention half: h + attn(input_layernorm(h))."""
        return h + self.self_attn(self.input_layernorm(h), cos, sin, mask)

    def feed_forward(self, h: Tensor) -> Tensor:
        """The MLP half, token by token: h + mlp(post_attention_layernorm(h)); h may be [tokens, hidden], the
        tokens of several batches (bigger expert blocks: goldstick.engine.pipeline)."""
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_cached(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
        h = h + self.self_attn.forward_cached(self.input_layernorm(h), cos, sin, mask, cache, self.layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class Embedding(nn.Cell):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.weight = _param((vocab, hidden), "weight")
        self.gather = ops.Gather()

    def construct(self, ids: Tensor) -> Tensor:
        return self.gather(self.weight, ids, 0)


class RotaryTables:
    """cos/sin for given positions; the inverse frequencies are computed once per model."""

    def __init__(self, cfg: ModelConfig):
        inv_freq, self.attention_factor = rope_inv_freq(cfg)
        self.inv_freq = Tensor(inv_freq)

    def __call__(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions int [B, S] -> cos, sin [B, 1, S, rope/2]."""
        # the cast on the host: an eager Cast keeps memory per launch on CPU (goldstick.serve.host_ops)
        freqs = Tensor.from_numpy(positions.asnumpy().astype(np.float32)).expand_dims(-1) * self.inv_freq
        freqs = freqs.expand_dims(1)
        return ops.cos(freqs) * self.attention_factor, ops.sin(freqs) * self.attention_factor


def positions_and_mask(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Positions [B,S] and the boolean 'forbidden' mask [B,1,S,S] (causal, plus padded keys).

    With a padding mask (1 = real token), positions count real tokens only, so a left-padded sequence gets the
    same positions as when it runs alone.
    """
    b, s = input_ids.shape
    causal = np.triu(np.ones((s, s), dtype=bool), k=1)
    if attention_mask is None:
        positions = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
        forbidden = np.broadcast_to(causal, (b, 1, s, s))
    else:
        real = attention_mask.asnumpy().astype(bool)
        positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
        forbidden = causal[None, None] | ~real[:, None, None, :]
    return Tensor(np.ascontiguousarray(positions)), Tensor(np.ascontiguousarray(forbidden))


class KVCache:
    """The decode cache of MLA's compressed latent, as R1 serving keeps it (not per-head K/V).

    Per layer: ``latent`` [B, C, kv_lora_rank], the normed kv_a_layernorm(c_kv), and ``k_rope`` [B, C, rope], the
    roped shared key, of which the first ``length`` positions are filled. The capacity C grows in blocks of
    ``block`` positions and the unfilled slots are masked: PyNative keeps per-op state for every new shape, so a
    cache that grew one position per step would add a shape (and megabytes) per generated token.
    ``real`` [B, length] (numpy bool) marks real tokens (False = left padding); a row's next position is its
    count of real tokens, so positions continue exactly as in the uncached forward. With ``absorb`` (the default)
    a float kv_b_proj is folded into the query/output per head; the folded weights are taken from the network
    when first needed by this cache, so a cache never sees stale weights from before a weight update.
    """

    def __init__(self, num_layers: int, batch: int, absorb: bool = True, block: int = 64):
        self.absorb = absorb
        self.block = block
        self.latent: list[Tensor | None] = [None] * num_layers
        self.k_rope: list[Tensor | None] = [None] * num_layers
        self.real = np.zeros((batch, 0), dtype=bool)
        self.capacity = 0
        self._write_at = 0
        self._absorbed: dict[int, tuple[Tensor, Tensor] | None] = {}

    @property
    def batch(self) -> int:
        return self.real.shape[0]

    @property
    def length(self) -> int:
        """Cached positions (including left padding)."""
        return self.real.shape[1]

    def append(self, layer: int, latent: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new tokens' entries of one layer (after ``step_inputs``); returns the layer's whole buffers
        [B, capacity, .] (slots past ``length`` are zeros, masked by ``step_inputs``)."""
        start, end = self._write_at, self._write_at + latent.shape[1]
        for store, new in ((self.latent, latent), (self.k_rope, k_rope)):
            buf = store[layer]
            if buf is None or buf.shape[1] < self.capacity:
                # zeros from the host: an eager ops.zeros keeps memory per launch on CPU (goldstick.serve.host_ops)
                grown = Tensor(np.zeros((new.shape[0], self.capacity, new.shape[2]), np.float32), new.dtype)
                if buf is not None:
                    grown[:, : buf.shape[1]] = buf
                store[layer] = buf = grown
            buf[:, start:end] = new
        return self.latent[layer], self.k_rope[layer]

    def step_inputs(self, attention_mask: np.ndarray) -> tuple[Tensor, Tensor]:
        """For S new tokens with padding mask [B, S] (1 = real): their positions [B, S] and the forbidden mask
        [B, 1, S, capacity] over cached plus new keys (padded, future and unfilled slots). Records the tokens."""
        new_real = np.asarray(attention_mask).astype(bool)
        b, s = new_real.shape
        if b != self.batch:
            raise ValueError(f"the cache holds {self.batch} sequences, the step has {b}")
        past = self.length
        positions = self.real.sum(1, keepdims=True) + np.cumsum(new_real, axis=1) - 1
        positions = np.maximum(positions, 0).astype(np.int32)
        self.real = np.concatenate((self.real, new_real), axis=1)
        self._write_at = past
        self.capacity = max(self.capacity, -(-(past + s) // self.block) * self.block)
        keys = np.zeros((b, self.capacity), dtype=bool)
        keys[:, : past + s] = self.real
        future = np.arange(self.capacity)[None, :] > (past + np.arange(s))[:, None]  # [S, C]
        forbidden = future[None, None] | ~keys[:, None, None, :]
        return Tensor(np.ascontiguousarray(positions)), Tensor(np.ascontiguousarray(forbidden))

    def repeat(self, batch: int) -> KVCache:
        """A cache of ``batch`` copies of this one-sequence cache (a shared prompt prefix, computed once, then
        continued by ``batch`` different suffixes). The copy owns its buffers: continuing it leaves this intact."""
        if self.batch != 1:
            raise ValueError(f"repeat() needs a one-sequence cache, this one holds {self.batch}")
        copy = KVCache(len(self.latent), batch, absorb=self.absorb, block=self.block)
        def tile(t):
            return None if t is None else ops.tile(t, (batch, 1, 1))

        copy.latent = [tile(t) for t in self.latent]
        copy.k_rope = [tile(t) for t in self.k_rope]
        copy.real = np.repeat(self.real, batch, axis=0)
        copy.capacity = self.capacity
        copy._write_at = self._write_at
        copy._absorbed = self._absorbed  # folded weights depend on the network only
        return copy

    def absorbed_weights(self, layer: int, attn: Attention) -> tuple[Tensor, Tensor] | None:
        """(W_UK [H, nope, r], W_UV^T [H, r, v]) from a float kv_b_proj; None when it cannot be folded exactly."""
        if layer not in self._absorbed:
            weight = _float_weight(attn.kv_b_proj)
            if weight is None:
                self._absorbed[layer] = None
            else:
                w = weight.reshape(attn.n_heads, attn.nope + attn.v_dim, attn.kv_lora_rank)
                self._absorbed[layer] = (w[:, : attn.nope, :], w[:, attn.nope:, :].transpose(0, 2, 1))
        return self._absorbed[layer]


def _float_weight(cell: nn.Cell) -> Tensor | None:
    """The [out, in] float weight W with cell(x) == x @ W.T exactly, if the cell is linear in x: a float Linear
    or a weight-only (W8A16) cell. Cells that quantize their input are not, so they get None."""
    if isinstance(cell, Linear):
        return cell.weight
    if getattr(cell, "scheme", None) == "w8a16" and hasattr(cell, "weight_as_float"):
        return cell.weight_as_float()
    return None


class Model(nn.Cell):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.CellList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3ForCausalLM(nn.Cell):
    """token ids [B, S] (int) -> float32 logits [B, S, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.rotary = RotaryTables(cfg)
        self.update_parameters_name("")  # HF names: model.layers.0.self_attn.q_a_proj.weight ...

    def construct(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        positions, mask = positions_and_mask(input_ids, attention_mask)
        cos, sin = self.rotary(positions)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask)
        return self.lm_head(self.model.norm(h))

    def new_cache(self, batch: int = 1, absorb: bool = True, block: int = 64) -> KVCache:
        return KVCache(self.config.num_hidden_layers, batch, absorb=absorb, block=block)

    def forward_cached(self, input_ids: Tensor, cache: KVCache, attention_mask: np.ndarray | None = None,
                       last_only: bool = False) -> Tensor:
        """Logits [B, S, vocab] of S new tokens that follow the ones in ``cache`` (which they are added to).

        ``attention_mask`` [B, S] (1 = real, 0 = left padding) covers the new tokens only; the cache remembers
        earlier padding. The first call (empty cache) is the prefill. ``last_only`` runs the final norm and
        lm_head on the last position only ([B, 1, vocab]), which is all a decode step needs.
        """
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = np.ones((b, s), dtype=bool)
        elif isinstance(attention_mask, Tensor):
            attention_mask = attention_mask.asnumpy()
        positions, mask = cache.step_inputs(attention_mask)
        cos, sin = self.rotary(positions)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer.forward_cached(h, cos, sin, mask, cache)
        if last_only:
            h = h[:, -1:, :]
        return self.lm_head(self.model.norm(h))

    # ---- weights -------------------------------------------------------------------------------
    def named_weights(self) -> dict[str, Parameter]:
        return {p.name: p for p in self.get_parameters()}

    def load_weights(self, tensors: dict[str, np.ndarray], strict: bool = True) -> None:
        """Copy float arrays into the parameters of the same HF name."""
        params = self.named_weights()
        for name, array in tensors.items():
            if name not in params:
                if strict:
                    raise KeyError(f"checkpoint tensor {name!r} has no parameter in the network")
                continue
            param = params[name]
            if tuple(array.shape) != tuple(param.shape):
                raise ValueError(f"tensor {name!r}: shape {tuple(array.shape)} does not match the network's "
                                 f"{tuple(param.shape)}")
            param.set_data(Tensor(np.ascontiguousarray(array, dtype=np.float32)))
