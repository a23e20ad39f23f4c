"""C-Eval scoring: run a network on the tokenized requests and keep its A-D scores (``ModelRun``).

Answer: the argmax over the next-token logits of the tokens ``A``, ``B``, ``C``, ``D`` at the position after ``答案：``
(no space), as the official code does for open models; a request whose letter merges with the prompt's last
token compares the log-likelihoods of the four continuations. Prompts are sorted by length and batched with left
padding to waste little on padding. With a network that has a KV cache (``forward_cached``), the token prefix that
the questions of a subject share (header and shots) runs once per subject, and each question's own tokens run on a
copy of that cache.

Scores: accuracy in points per subject, per category (mean over its subjects), C-Eval Hard (mean over its 8
subjects), overall as the mean over subjects (the official "Average") and, secondary, question-weighted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from goldstick.evaluation.ceval_data import (
    CATEGORIES,
    HARD,
    LETTERS,
    SUBJECTS,
    CEvalData,
    Question,
    Request,
    tokenize_requests,
)
from goldstick.quant.numerics import log_softmax


def _as_numpy(x) -> np.ndarray:
    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


def _batches(lengths: Sequence[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices grouped by similar length (longest first), each batch within ``batch_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups, current, width = [], [], 0
    for i in order:
        w = max(width, lengths[i])
        if current and (w * (len(current) + 1) > batch_tokens or len(current) >= max_batch):
            groups.append(current)
            current, w = [], lengths[i]
        current.append(i)
        width = w
    if current:
        groups.append(current)
    return groups


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def shared_prefixes(requests: Sequence[Request], min_prefix: int = 16) -> dict[str, tuple[list[int], int]]:
    """Group -> (its requests, length of the token prefix they all share), for groups worth a shared prefill.

    The prefix is the longest common run of *token ids* (not of text: a BPE merge across the header/question
    boundary would make a text prefix tokenize differently), leaving every request at least one token of its own.
    """
    members: dict[str, list[int]] = {}
    for r, req in enumerate(requests):
        if req.continuations is None and req.group:
            members.setdefault(req.group, []).append(r)
    plans = {}
    for group, rows in members.items():
        if len(rows) < 2:
            continue
        seqs = [requests[r].ids for r in rows]
        length = min(_common_prefix_length(seqs), min(len(s) for s in seqs) - 1)
        if length >= min_prefix:
            plans[group] = (rows, length)
    return plans


def score_requests(net, requests: Sequence[Request], letter_ids: list[int] | None, pad_id: int = 0,
                   batch_tokens: int = 4096, max_batch: int = 32, progress: bool = True,
                   desc: str = "ceval", share_prefix: bool = True) -> np.ndarray:
    """[N, 4] scores of A-D: next-token logits (or continuation log-likelihoods for fallback requests).

    With ``share_prefix`` (and a network with a KV cache), the prompt header and shots that a subject's questions
    share are run once per subject, and only each question's own tokens per question: five-shot prompts are
    mostly shots, so this does most of the work once instead of once per question.
    """
    from mindspore import Tensor

    scores = np.zeros((len(requests), 4), dtype=np.float64)
    bar = None
    if progress:
        bar = tqdm(total=len(requests), desc=desc, unit="q", file=sys.stderr, leave=False)
    plans = shared_prefixes(requests) if share_prefix and hasattr(net, "forward_cached") else {}
    for rows, length in plans.values():
        _score_shared_prefix(net, requests, rows, length, letter_ids, scores, pad_id, batch_tokens, max_batch, bar)
    done_shared = {r for rows, _ in plans.values() for r in rows}

    # each fallback request becomes 4 sequences; next-token requests one
    seqs: list[list[int]] = []
    owner: list[tuple[int, int]] = []  # (request, letter or -1)
    for r, req in enumerate(requests):
        if r in done_shared:
            continue
        if req.continuations is None:
            seqs.append(req.ids)
            owner.append((r, -1))
        else:
            for j, cont in enumerate(req.continuations):
                seqs.append(req.ids + cont)
                owner.append((r, j))
    groups = _batches([len(s) for s in seqs], batch_tokens, max_batch)
    for group in groups:
        width = max(len(seqs[i]) for i in group)
        ids = np.full((len(group), width), pad_id, dtype=np.int32)
        mask = np.zeros((len(group), width), dtype=np.int32)
        for row, i in enumerate(group):  # left padding: every sequence ends at the last position
            ids[row, width - len(seqs[i]):] = seqs[i]
            mask[row, width - len(seqs[i]):] = 1
        logits = _as_numpy(net(Tensor(ids), Tensor(mask)))
        done = 0
        for row, i in enumerate(group):
            r, j = owner[i]
            if j < 0:
                scores[r] = logits[row, -1, letter_ids].astype(np.float64)
                done += 1
            else:
                cont = requests[r].continuations[j]
                n = len(cont)
                lp = log_softmax(logits[row, width - n - 1:width - 1])
                scores[r, j] = float(lp[np.arange(n), cont].sum())
                done += j == 3
        if bar is not None:
            bar.update(done)
    if bar is not None:
        bar.close()
    return scores


def _score_shared_prefix(net, requests, rows, length, letter_ids, scores, pad_id, batch_tokens, max_batch, bar):
    """Prefill the rows' common prefix once, then run their own tokens in batches on copies of that cache."""
    from mindspore import Tensor

    prefix = requests[rows[0]].ids[:length]
    cache = net.new_cache(1)
    net.forward_cached(Tensor(np.asarray([prefix], dtype=np.int32)), cache, last_only=True)
    suffixes = [requests[r].ids[length:] for r in rows]
    for group in _batches([len(x) for x in suffixes], batch_tokens, max_batch):
        width = max(len(suffixes[i]) for i in group)
        ids = np.full((len(group), width), pad_id, dtype=np.int32)
        mask = np.zeros((len(group), width), dtype=np.int32)
        for row, i in enumerate(group):  # left padding after the prefix: masked, positions continue per row
            ids[row, width - len(suffixes[i]):] = suffixes[i]
            mask[row, width - len(suffixes[i]):] = 1
        logits = _as_numpy(net.forward_cached(Tensor(ids), cache.repeat(len(group)), mask, last_only=True))
        for row, i in enumerate(group):
            scores[rows[i]] = logits[row, -1, letter_ids].astype(np.float64)
        if bar is not None:
            bar.update(len(group))


# ---- results -----------------------------------------------------------------------------------------------------
@dataclass
class ModelRun:
    """One model's answers on the questions of a ``CEvalData`` (same order as ``data.questions()``).

    ``scoring``: ``logits`` (in-process), ``logprobs`` (a served model's log-probabilities: the same A-D softmax)
    or ``generate`` (a served model's generated answer: 0 for the letter found, -inf for the others). A letter
    score may be -inf (a served model's letter absent from its top logprobs); a row without any finite score has
    no answer (prediction -1, never correct, probabilities 0). ``details``: how a served model was asked.
    """

    label: str
    path: str
    scores: np.ndarray  # [N, 4] letter scores (logits, log-probabilities, or continuation log-likelihoods)
    questions: list[Question]
    seconds: float = 0.0
    scoring: str = "logits"
    details: dict = field(default_factory=dict)

    @property
    def answered(self) -> np.ndarray:
        return np.isfinite(self.scores).any(-1)

    @property
    def predictions(self) -> np.ndarray:
        return np.where(self.answered, self.scores.argmax(-1), -1)

    @property
    def probabilities(self) -> np.ndarray:
        out = np.zeros(self.scores.shape, dtype=np.float64)
        rows = self.answered
        out[rows] = np.exp(log_softmax(self.scores[rows]))
        return out

    @property
    def distribution_rows(self) -> np.ndarray:
        """Rows whose four letter scores are finite scores of a distribution (where a KL divergence exists)."""
        return np.isfinite(self.scores).all(-1) & (self.scoring != "generate")

    @property
    def correct(self) -> np.ndarray:
        answers = np.array([LETTERS.index(q.answer) if q.answer in LETTERS else -1 for q in self.questions])
        return (self.predictions == answers) & (answers >= 0)

    def summary(self) -> dict:
        return accuracy_summary(self.questions, self.correct)


def accuracy_summary(questions: Sequence[Question], correct: np.ndarray) -> dict:
    """Accuracy in points: per subject, per category and Hard (means over subjects), overall (mean over subjects,
    the official average) and question-weighted."""
    by_subject: dict[str, list[bool]] = {}
    for q, ok in zip(questions, correct):
        by_subject.setdefault(q.subject, []).append(bool(ok))
    subjects = {s: 100.0 * float(np.mean(v)) for s, v in by_subject.items()}
    categories = {}
    for cat in CATEGORIES:
        vals = [subjects[s] for s in subjects if SUBJECTS[s].category == cat]
        if vals:
            categories[cat] = float(np.mean(vals))
    hard = [subjects[s] for s in subjects if s in HARD]
    return {
        "overall": float(np.mean(list(subjects.values()))) if subjects else float("nan"),
        "overall_question_weighted": 100.0 * float(np.mean(correct)) if len(correct) else float("nan"),
        "categories": categories,
        "hard": float(np.mean(hard)) if hard else None,
        "subjects": subjects,
        "n_subjects": len(subjects),
        "n_questions": int(len(correct)),
        "n_correct": int(np.sum(correct)),
    }


def evaluate_network(net, tokenizer, data: CEvalData, shots: int, bos_id: int | None, pad_id: int = 0,
                     max_len: int | None = None, label: str = "model", path: str = "", batch_tokens: int = 4096,
                     progress: bool = True, requests: list[Request] | None = None,
                     letter_ids: list[int] | None = None, share_prefix: bool = True) -> ModelRun:
    """Score one network on every question of ``data`` (``requests`` may be passed to reuse tokenization)."""
    questions = data.questions()
    if requests is None:
        requests, letter_ids = tokenize_requests(tokenizer, questions, data.dev, shots, bos_id, max_len)
    started = time.time()
    scores = score_requests(net, requests, letter_ids, pad_id=pad_id, batch_tokens=batch_tokens,
                            progress=progress, desc=label, share_prefix=share_prefix)
    return ModelRun(label=label, path=path, scores=scores, questions=questions, seconds=time.time() - started)
