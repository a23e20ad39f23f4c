"""How strong the planted outliers of a synthetic model are, measured at its first decoder layer in numpy: the
per-channel and per-token ranges of the attention (MLA) and FFN inputs, and the relative output error of int8
per-channel weights times each activation scheme (``outlier_report``).

Measured on tiny (first layer, statistics tokens; relative error of the fused output of each group): MLA input
(q_a+kv_a), per-channel absmax max/median = 70/3.2 = 22, median per-token absmax 45 (12 on massive tokens):
weight-only 0.8%, static per-tensor 4.4%, with SmoothQuant (alpha 0.5) 1.2%, with OS+ (shift + searched scale)
0.7%, dynamic per-token 2.9%. FFN input (dense gate+up): absmax ratio 13/3.0 = 4.4, median per-token absmax 3.6
(11 on massive tokens): weight-only 0.7%, static per-tensor 3.1%, SmoothQuant 1.8%, OS+ 1.3%, dynamic per-token 1.5%.
Through the whole network (``tests/test_recipe_ordering.py``: the real engine, 32x128 calibration tokens, KL
of the quantized to the float next-token distributions on 16x128 held-out tokens), tiny seed 0 / seed 1:
w8a16 0.0029 / 0.0020, deepseek-r1-w8a8-mixed 0.0039 / 0.0033, MLA SmoothQuant + FFN dynamic 0.0050 / 0.0041,
all-static SmoothQuant 0.0059 / 0.0045, all-dynamic 0.0076 / 0.0056, naive static 0.0154 / 0.0106 (a second
calibration seed moves these by up to 15%, the order stays).
On this MoE the KL is dominated by routing flips: a perturbed router input changes a few tokens' experts (~4% of
the tokens per layer at -35 dB), each flip changes that token a lot, and with the float routing imposed the KL
is 20-30x smaller; so KL grows about linearly with the error amplitude rather than with its power.
"""

from __future__ import annotations

import numpy as np

from goldstick.model.tokenizer import build_tokenizer
from goldstick.testing.synthetic import TOKENIZER_VOCAB, WeightBuilder, attention, rmsnorm, size_config


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
    b = WeightBuilder(cfg, seed)
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
        x = rmsnorm(h, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
        h = h + attention(cfg, w, f"{p}.self_attn", x) @ w[f"{p}.self_attn.o_proj.weight"].T
        xs.append(x.reshape(-1, b.h))
        fs.append(rmsnorm(h, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps).reshape(-1, b.h))
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
