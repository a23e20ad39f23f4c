"""Float vs quantized, measured through the networks on held-out text.

``compare_models`` runs both networks on the same token windows and reports, over every position:
  * logits SQNR (dB) and max relative error of the quantized logits against the float ones;
  * mean KL(float || quantized) of the next-token distributions (nats);
  * top-1 agreement (the quantized model predicts the float model's argmax);
  * perplexity of each model on the text itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from goldstick.engine.calibration import load_calibration
from goldstick.errors import UsageError
from goldstick.io.export import detect_format
from goldstick.io.loader import load_model
from goldstick.model.tokenizer import load_tokenizer
from goldstick.quant import algorithms as alg
from goldstick.quant.numerics import log_softmax

HELDOUT = "eval/heldout/heldout-zh-en.jsonl"


@dataclass
class Comparison:
    logits_sqnr_db: float
    logits_rel_error: float
    kl_mean: float
    top1_agreement: float
    ppl_float: float
    ppl_quant: float
    tokens: int

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def heldout_batches(model_dir: str | Path, data: str | Path = HELDOUT, samples: int = 16, seq_len: int = 128,
                    seed: int = 1234) -> list[np.ndarray]:
    tok = load_tokenizer(model_dir)
    return load_calibration(data, tok.tokenizer, samples=samples, seq_len=seq_len, seed=seed,
                            bos_id=tok.bos_id).batches


def model_logits(net, batches: list[np.ndarray]) -> list[np.ndarray]:
    from mindspore import Tensor

    return [net(Tensor(ids)).asnumpy() for ids in batches]


def compare_logits(float_logits: list[np.ndarray], quant_logits: list[np.ndarray],
                   batches: list[np.ndarray]) -> Comparison:
    ref = np.concatenate([x.reshape(-1, x.shape[-1]) for x in float_logits])
    got = np.concatenate([x.reshape(-1, x.shape[-1]) for x in quant_logits])
    lp_ref, lp_got = log_softmax(ref), log_softmax(got)
    kl = np.sum(np.exp(lp_ref) * (lp_ref - lp_got), axis=-1)
    # perplexity of the text: position t predicts token t+1 within each window
    nll_ref, nll_got = [], []
    offset = 0
    for ids in batches:
        b, s = ids.shape
        rows = np.arange(offset, offset + b * s).reshape(b, s)[:, :-1].reshape(-1)
        targets = ids[:, 1:].reshape(-1)
        nll_ref.append(-lp_ref[rows, targets])
        nll_got.append(-lp_got[rows, targets])
        offset += b * s
    return Comparison(
        logits_sqnr_db=float(alg.sqnr_db(ref, got)),
        logits_rel_error=float(alg.relative_error(ref, got)),
        kl_mean=float(kl.mean()),
        top1_agreement=float(np.mean(ref.argmax(-1) == got.argmax(-1))),
        ppl_float=float(np.exp(np.concatenate(nll_ref).mean())),
        ppl_quant=float(np.exp(np.concatenate(nll_got).mean())),
        tokens=int(ref.shape[0]),
    )


def compare_models(float_dir: str | Path, quant_dir: str | Path, data: str | Path = HELDOUT, samples: int = 16,
                   seq_len: int = 128, seed: int = 1234, float_logits: list[np.ndarray] | None = None) -> Comparison:
    """Load both checkpoints and compare them on ``samples`` windows of held-out text.

    Refuses a quantized ``float_dir`` (the two folders given the wrong way round), naming which is which.
    """
    float_format = detect_format(float_dir)
    if float_format is not None:
        quant_format = detect_format(quant_dir)
        swapped = (f"; {quant_dir} is not, so the two are swapped: give the float model first, "
                   f"then the quantized one" if quant_format is None else "")
        raise UsageError(f"{float_dir} is a quantized checkpoint ({float_format} format), but the first argument "
                         f"must be the float model{swapped}")

    batches = heldout_batches(float_dir, data, samples, seq_len, seed)
    if float_logits is None:
        float_logits = model_logits(load_model(float_dir), batches)
    quant_logits = model_logits(load_model(quant_dir), batches)
    return compare_logits(float_logits, quant_logits, batches)
