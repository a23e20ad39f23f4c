"""Text generation with the MindSpore network (float or quantized checkpoints).

``Generator`` decodes one prompt or a batch of prompts of different lengths (left-padded, with the attention
mask), greedily or by sampling, with or without the MLA latent KV cache (``model.KVCache``):

* with the cache, the prompt runs once (prefill) and every later step feeds only the newest token;
* without it, every step reruns the whole sequence (the reference the cache is tested against).

Logit processing follows transformers' ``generate`` exactly, in its order: repetition penalty (on every real
token of prompt and continuation, each distinct token once: ``l / p`` when ``l > 0`` else ``l * p``), then for
sampling temperature, top-k (ties with the k-th value kept), top-p (smallest set whose probability reaches
``top_p``, at least one token). ``temperature == 0`` means greedy (argmax after the penalty). Sampling is
reproducible: each sequence draws from its own ``numpy.random.default_rng(seed)``, so a prompt samples the same
continuation alone or in a batch. The prompts of a batch may each have their own ``SamplingParams``.

Log-probabilities (``SamplingParams.logprobs`` for the generated tokens, ``prompt_logprobs`` for the prompt's) are
the full-vocabulary log-softmax of the raw next-token logits, in float64 on the float32 logits
(``goldstick.quant.numerics.log_softmax``, the in-process C-Eval scoring's): before the repetition penalty and
the sampling filters, as vLLM reports them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from goldstick.errors import UsageError
from goldstick.io.loader import load_model
from goldstick.model.tokenizer import PAD_TOKEN, load_tokenizer
from goldstick.quant.numerics import log_softmax

MAX_LOGPROBS = 20  # most top log-probabilities per token (vLLM's default max_logprobs)


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0                # 1 = off
    top_k: int = 0                    # 0 (or -1) = off
    repetition_penalty: float = 1.0   # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()        # stop strings (not included in the text)
    ignore_eos: bool = False
    logprobs: int | None = None       # per generated token: its log-probability and the top N (None = none)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    def check(self) -> SamplingParams:
        """Raise UsageError (a ValueError) naming the first out-of-range field."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise UsageError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise UsageError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise UsageError(f"top_k must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise UsageError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise UsageError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise UsageError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)   # generated ids (eos included when it ended the text)
    text: str = ""
    finish_reason: str = "length"                          # "stop" (eos or stop string) or "length"
    logits: list[np.ndarray] = field(default_factory=list)  # per step [vocab], raw, when keep_logits
    stopped_by_string: bool = False
    # with params.logprobs: per generated token, its log-probability and the top ones as (id, logprob), best first
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # with params.prompt_logprobs: the same per prompt token, None for the first (nothing precedes it)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)


@dataclass
class Timing:
    prompt_tokens: int
    new_tokens: int
    seconds: float
    prefill_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first one, per second of the steps after the prefill step."""
        rest = self.seconds - self.prefill_seconds
        return (self.new_tokens - 1) / rest if self.new_tokens > 1 and rest > 0 else 0.0


# ------------------------------------------------------------------------------------------------ logits
def apply_repetition_penalty(logits: np.ndarray, history, penalty: float) -> np.ndarray:
    if penalty == 1.0 or len(history) == 0:
        return logits
    ids = np.unique(np.asarray(history, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
    picked = logits[ids]
    logits = logits.copy()
    logits[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def sampling_filter(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, then top-p (transformers' warper order); removed tokens get -inf."""
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if params.top_k > 0 and params.top_k < vocab:
        kth = np.partition(logits, vocab - params.top_k)[vocab - params.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if params.top_p < 1.0:
        order = np.argsort(logits, kind="stable")  # ascending
        sorted_logits = logits[order]
        probs = np.exp(sorted_logits - sorted_logits[-1])
        cumulative = np.cumsum(probs / probs.sum())
        remove = cumulative <= 1.0 - params.top_p
        remove[-1] = False  # keep at least the best token
        logits = logits.copy()
        logits[order[remove]] = -np.inf
    return logits


def choose_token(logits: np.ndarray, history, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """One next token from raw logits [vocab] given the sequence so far (real tokens only)."""
    scores = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), history, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(scores))
    scores = sampling_filter(scores, params)
    probs = np.exp(scores - scores.max())
    cumulative = np.cumsum(probs)
    draw = rng.random() * cumulative[-1]
    return int(min(np.searchsorted(cumulative, draw, side="right"), len(cumulative) - 1))


def top_logprobs(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The ``n`` most likely tokens of a log-probability row [vocab] as (id, logprob), best first; equal values in
    id order (so the choice among ties at the n-th place does not depend on anything else)."""
    vocab = logprobs.shape[-1]
    n = min(n, vocab)
    if n <= 0:
        return []
    kth = np.partition(logprobs, vocab - n)[vocab - n]
    better = np.flatnonzero(logprobs > kth)
    ids = np.concatenate((better, np.flatnonzero(logprobs == kth)[: n - better.size]))
    ids = ids[np.lexsort((ids, -logprobs[ids]))]
    return [(int(i), float(logprobs[i])) for i in ids]


# ------------------------------------------------------------------------------------------------ generator
class Generator:
    """Decoding loop around a loaded network and its tokenizer; not thread-safe (serialize calls)."""

    def __init__(self, net, tokenizer):
        self.net = net
        self.tokenizer = tokenizer  # goldstick.model.tokenizer.LoadedTokenizer
        self.max_positions = int(net.config.max_position_embeddings)
        pad = tokenizer.tokenizer.token_to_id(PAD_TOKEN)
        self.pad_id = pad if pad is not None else tokenizer.eos_id

    @classmethod
    def from_dir(cls, model_dir: str | Path, net=None) -> Generator:
        tokenizer = load_tokenizer(model_dir)  # first: a missing tokenizer fails before the model is loaded
        return cls(net if net is not None else load_model(model_dir), tokenizer)

    def encode(self, prompt: str) -> list[int]:
        """bos + the prompt's tokens (the tokenizer's own bos template is not applied twice)."""
        return [self.tokenizer.bos_id] + self.tokenizer.tokenizer.encode(prompt, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        vocab = self.tokenizer.tokenizer.get_vocab_size()
        return self.tokenizer.tokenizer.decode([i for i in ids if 0 <= i < vocab], skip_special_tokens=True)

    def text_offsets(self, ids: list[int]) -> list[int]:
        """Each token's character offset in the text of ``ids``: the length of the text of the tokens before it.

        Linear: the text is decoded in runs that end on a whole character (a run whose text does not end in an
        incomplete UTF-8 sequence, shown as U+FFFD), and each offset is the length up to its run plus its run's."""
        offsets, done, start = [], 0, 0
        for i in range(len(ids)):
            offsets.append(done + len(self.decode(ids[start:i])))
            run = self.decode(ids[start:i + 1])
            if not run.endswith("\ufffd"):
                done, start = done + len(run), i + 1
        return offsets

    def token_text(self, token: int) -> str:
        """One token's own text, special tokens included (an id the tokenizer does not know: "")."""
        return self.tokenizer.tokenizer.decode([token], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Rows of the model's logits (ids a prompt may use)."""
        return int(self.net.config.vocab_size)

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_positions:
            raise UsageError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {self.max_positions} positions")

    def generate(self, prompts: str | list[str], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_cache: bool = True, absorb: bool = True,
                 keep_logits: bool = False) -> tuple[list[Completion], Timing]:
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.generate_ids([self.encode(p) for p in prompts], params, use_cache, absorb, keep_logits)

    def generate_ids(self, prompts: list[list[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                     use_cache: bool = True, absorb: bool = True,
                     keep_logits: bool = False) -> tuple[list[Completion], Timing]:
        """Continue each token-id prompt; returns one Completion per prompt and the loop's timing.

        ``params``: one ``SamplingParams`` for every prompt, or one per prompt. The prompts run as one batch,
        left-padded to the longest. A prompt with ``max_tokens == 0`` generates nothing; with ``prompt_logprobs``
        it is still run, to score its tokens.
        """
        from mindspore import Tensor

        if not prompts or any(len(p) == 0 for p in prompts):
            raise UsageError("every prompt needs at least one token")
        rows = self._row_params(params, len(prompts))
        for p, row_params in zip(prompts, rows):
            self.check_length(len(p), row_params.max_tokens)
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = np.full((b, width), self.pad_id, dtype=np.int32)
        mask = np.zeros((b, width), dtype=np.int32)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = p
            mask[row, width - len(p):] = 1
        padded = not mask.all()
        out = [Completion(prompt_ids=list(p)) for p in prompts]
        rngs = [None if p.greedy else np.random.default_rng(p.seed) for p in rows]
        done = [p.max_tokens == 0 for p in rows]
        scored = [row for row, p in enumerate(rows) if p.prompt_logprobs is not None]

        started = time.perf_counter()
        prefill_seconds = 0.0
        cache = self.net.new_cache(b, absorb=absorb) if use_cache else None
        step_ids, step_mask = ids, mask
        first = True
        while (first and scored) or not all(done):
            every_position = first and bool(scored)  # the prompt's tokens are scored: logits at every position
            if use_cache:
                logits = self.net.forward_cached(Tensor(step_ids), cache, step_mask, last_only=not every_position)
            else:
                logits = self.net(Tensor(ids), Tensor(mask) if padded else None)
            logits = logits.asnumpy()
            if every_position:
                for row in scored:
                    self._score_prompt(out[row], logits[row, :width], rows[row].prompt_logprobs)
            logits = logits[:, -1]
            if first:
                prefill_seconds = time.perf_counter() - started
                first = False
            next_ids = np.full((b, 1), self.pad_id, dtype=np.int32)
            for row, c in enumerate(out):
                if done[row]:
                    continue
                row_params = rows[row]
                if keep_logits:
                    c.logits.append(logits[row].copy())
                token = choose_token(logits[row], c.prompt_ids + c.token_ids, row_params, rngs[row])
                if row_params.logprobs is not None:
                    lp = log_softmax(logits[row])
                    c.logprobs.append(float(lp[token]))
                    c.top_logprobs.append(top_logprobs(lp, row_params.logprobs))
                c.token_ids.append(token)
                next_ids[row, 0] = token
                done[row] = self._finished(c, token, None if row_params.ignore_eos else self.tokenizer.eos_id,
                                           row_params)
            if all(done):
                break
            step_ids, step_mask = next_ids, np.ones((b, 1), dtype=np.int32)
            if not use_cache:
                ids = np.concatenate((ids, next_ids), 1)
                mask = np.concatenate((mask, step_mask), 1)
        seconds = time.perf_counter() - started

        for c in out:
            if not c.stopped_by_string:  # otherwise _finished has set the text, cut before the stop string
                c.text = self.decode(c.token_ids)
        timing = Timing(prompt_tokens=sum(len(p) for p in prompts), new_tokens=sum(len(c.token_ids) for c in out),
                        seconds=seconds, prefill_seconds=prefill_seconds)
        return out, timing

    @staticmethod
    def _row_params(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [(params or SamplingParams()).check()] * n
        rows = list(params)
        if len(rows) != n:
            raise UsageError(f"{len(rows)} SamplingParams for {n} prompts")
        return [p.check() for p in rows]

    @staticmethod
    def _score_prompt(c: Completion, logits: np.ndarray, top: int) -> None:
        """Prompt log-probabilities from the prefill's logits [width, vocab] of a left-padded row."""
        n = len(c.prompt_ids)
        lp = log_softmax(logits[logits.shape[0] - n:-1])  # row j predicts prompt token j + 1
        c.prompt_logprobs = [None] + [float(lp[j, c.prompt_ids[j + 1]]) for j in range(n - 1)]
        c.prompt_top_logprobs = [None] + [top_logprobs(lp[j], top) for j in range(n - 1)]

    def _finished(self, c: Completion, token: int, eos: int | None, params: SamplingParams) -> bool:
        if eos is not None and token == eos:
            c.finish_reason = "stop"
            return True
        if params.stop:
            text = self.decode(c.token_ids)
            cuts = [text.find(s) for s in params.stop if s and s in text]
            if cuts:
                c.text, c.finish_reason, c.stopped_by_string = text[: min(cuts)], "stop", True
                return True
        if len(c.token_ids) >= params.max_tokens:
            c.finish_reason = "length"
            return True
        return False


def greedy_generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 32, net=None) -> tuple[str, dict]:
    """Greedy continuation (kept for callers of the first version): prompt + continuation, and timing figures."""
    generator = Generator.from_dir(model_dir, net=net)
    (completion,), timing = generator.generate(prompt, SamplingParams(max_tokens=max_new_tokens))
    return prompt + completion.text, {"new_tokens": timing.new_tokens, "seconds": timing.seconds,
                                      "tokens_per_second": timing.tokens_per_second}
