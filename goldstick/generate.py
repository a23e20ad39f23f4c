"""Text generation with the MindSpore network (float or quantized checkpoints)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def greedy_generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 32, net=None) -> tuple[str, dict]:
    """Greedy continuation: returns the decoded text and timing figures (tokens/s of the decode loop)."""
    from mindspore import Tensor

    from .loader import load_model
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    net = net or load_model(model_dir)
    ids = [tok.bos_id] + tok.tokenizer.encode(prompt).ids
    prompt_len = len(ids)
    started = time.time()
    for _ in range(max_new_tokens):
        logits = net(Tensor(np.asarray([ids], dtype=np.int32))).asnumpy()
        next_id = int(logits[0, -1].argmax())
        ids.append(next_id)
        if next_id == tok.eos_id:
            break
    seconds = time.time() - started
    new = len(ids) - prompt_len
    text = prompt + tok.tokenizer.decode(ids[prompt_len:])
    return text, {"new_tokens": new, "seconds": seconds, "tokens_per_second": new / seconds if seconds else 0.0}
