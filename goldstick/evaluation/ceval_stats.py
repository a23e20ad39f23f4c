"""C-Eval accuracy-loss statistics: float against quantized on the same questions, the report dict, the gate.

For each quantized model (``comparisons[label]`` in ``ceval.json``; "delta" is always quantized minus float, in
points, so a loss is negative):

* ``delta_points``: difference of the overall scores (mean over subjects, the official average), with a paired,
  subject-stratified bootstrap confidence interval: questions are resampled with replacement within each subject,
  the same resample for both models, ``bootstrap_samples`` times from ``seed``. The same for every category,
  C-Eval Hard, every subject and the question-weighted score.
* flips: ``flip_rate`` is the fraction of questions whose predicted letter changed; ``flips`` splits the changes
  into correct->wrong, wrong->correct and wrong->other wrong.
* McNemar's test on the discordant pairs (b = correct->wrong, c = wrong->correct): exact two-sided binomial p-value,
  and the continuity-corrected chi-square statistic.
* KL(float || quantized) of the A-D distributions (softmax over the four letter scores), in nats: its mean, median,
  p95 and max over the questions where both models have four finite letter scores (``kl``; none for a served model
  scored by generation, ``None`` then), and its mean over the questions of every subject, category and of C-Eval
  Hard (``kl_mean``). It separates two quantized models whose accuracy does not: on a model at chance, or when no
  answer changes, every delta is 0 but the KL still measures how far the A-D distribution moved.

Gate (``gate_report``), with D = float overall - quantized overall (the drop, points) and [lo, hi] its CI:
  point        fail if D > allowed_drop
  significant  fail if D > allowed_drop, or if the drop is significant (lo > 0) and its CI reaches past the
               allowance (hi > allowed_drop)       <- the default
  strict       fail if hi > allowed_drop (the data must show the drop is within the allowance; needs many questions)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from goldstick.evaluation.ceval_data import CATEGORIES, HARD, LETTERS, SUBJECTS, CEvalData, Request
from goldstick.evaluation.ceval_scoring import ModelRun
from goldstick.quant.numerics import log_softmax

SCHEMA = "goldstick.ceval/1"
GATE_RULES = {
    "point": "fail if the drop D (float minus quantized, mean over subjects, points) > allowed_drop",
    "significant": "fail if D > allowed_drop, or if the drop is significant (CI lower bound > 0) and the CI's "
                   "upper bound > allowed_drop",
    "strict": "fail if the CI's upper bound of D > allowed_drop",
}
WORST_SUBJECTS = 10


# ---- statistics --------------------------------------------------------------------------------------------------
def kl_divergence(p_scores: np.ndarray, q_scores: np.ndarray) -> np.ndarray:
    """Per-row KL(softmax(p) || softmax(q)) in nats."""
    lp, lq = log_softmax(p_scores), log_softmax(q_scores)
    return np.maximum(np.sum(np.exp(lp) * (lp - lq), axis=-1), 0.0)


def mcnemar(b: int, c: int) -> dict:
    """McNemar's test on b (correct->wrong) and c (wrong->correct): exact binomial p and chi-square (cc)."""
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "p_value_chi2": 1.0, "method": "exact binomial"}
    m = min(b, c)
    log_terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)
                 for k in range(m + 1)]
    top = max(log_terms)
    cdf = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    statistic = (abs(b - c) - 1) ** 2 / n if abs(b - c) >= 1 else 0.0
    return {"b": int(b), "c": int(c), "statistic": float(statistic), "p_value": float(min(1.0, 2 * cdf)),
            "p_value_chi2": float(math.erfc(math.sqrt(statistic / 2))), "method": "exact binomial"}


class Bootstrap:
    """Paired, subject-stratified resamples of question indices, shared by every model of a report."""

    def __init__(self, subject_rows: dict[str, np.ndarray], samples: int, seed: int, confidence: float):
        if samples < 1:
            raise ValueError(f"bootstrap samples must be >= 1, got {samples}")
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        rng = np.random.default_rng(seed)
        self.subjects = list(subject_rows)
        self.rows = subject_rows
        self.samples, self.seed, self.confidence = samples, seed, confidence
        self.draws = {s: rows[rng.integers(0, len(rows), size=(samples, len(rows)))]
                      for s, rows in subject_rows.items()}

    def subject_accuracy(self, correct: np.ndarray) -> dict[str, np.ndarray]:
        """subject -> [samples] accuracy in points."""
        return {s: 100.0 * correct[idx].mean(axis=1) for s, idx in self.draws.items()}

    def interval(self, values: np.ndarray) -> list[float]:
        alpha = (1.0 - self.confidence) / 2
        lo, hi = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
        return [float(lo), float(hi)]


def _mean_over(per_subject: dict[str, np.ndarray], subjects: Sequence[str]) -> np.ndarray | None:
    chosen = [per_subject[s] for s in subjects if s in per_subject]
    return np.mean(chosen, axis=0) if chosen else None


def _groups(subjects: Sequence[str]) -> dict[str, list[str]]:
    """category -> evaluated subjects in it (non-empty categories only)."""
    out = {}
    for cat in CATEGORIES:
        members = [s for s in subjects if SUBJECTS[s].category == cat]
        if members:
            out[cat] = members
    return out


def _weighted(per_subject: dict[str, np.ndarray], sizes: dict[str, int]) -> np.ndarray:
    total = sum(sizes.values())
    return sum(per_subject[s] * sizes[s] for s in per_subject) / total


def _sig(x, digits: int = 4):
    """``x`` rounded to ``digits`` significant digits (KL values are small: fixed decimals would zero them)."""
    return None if x is None else float(f"{float(x):.{digits}g}")


def _r(x, digits: int = 4):
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [_r(v, digits) for v in x]
    return round(float(x), digits)


# ---- the report --------------------------------------------------------------------------------------------------
def build_report(ceval: CEvalData, runs: Sequence[ModelRun], requests: Sequence[Request], shots: int,
                 limit: int | None, max_len: int | None, bootstrap_samples: int = 2000, seed: int = 0,
                 confidence: float = 0.95, overlaps: dict | None = None, notes: Sequence[str] = (),
                 letter_ids: Sequence[int] | None = None) -> dict:
    """ceval.json content: settings, per model scores, per quantized model the comparison with ``runs[0]``."""
    questions = runs[0].questions
    subject_rows: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        subject_rows.setdefault(q.subject, []).append(i)
    rows = {s: np.asarray(v) for s, v in subject_rows.items()}
    sizes = {s: len(v) for s, v in rows.items()}
    boot = Bootstrap(rows, bootstrap_samples, seed, confidence)
    groups = _groups(list(rows))
    hard = [s for s in rows if s in HARD]

    notes = list(notes)
    missing = [s for s in SUBJECTS if s not in rows]
    if missing:
        notes.append(f"{len(rows)} of the 52 C-Eval subjects were evaluated; 'overall' is the mean over those "
                     f"{len(rows)}, not the official 52-subject average")
    reduced = sum(r.shots < shots for r in requests)
    truncated = sum(r.truncated for r in requests)
    fallback = sum(r.continuations is not None for r in requests)
    if reduced:
        notes.append(f"{reduced} prompt(s) longer than the model's {max_len} positions dropped shots (from the end)")
    if truncated:
        notes.append(f"{truncated} prompt(s) were still too long at 0 shots and kept only their last {max_len} tokens")
    if fallback:
        notes.append(f"{fallback} question(s) scored by continuation log-likelihood (the tokenizer merges the "
                     f"answer letter with the text before it)")

    models, boots, raw = {}, {}, {}
    for run in runs:
        summary = raw[run.label] = run.summary()
        per_subject = boot.subject_accuracy(run.correct)
        boots[run.label] = per_subject
        ci = {"overall": boot.interval(_mean_over(per_subject, list(rows))),
              "overall_question_weighted": boot.interval(_weighted(per_subject, sizes)),
              "categories": {c: boot.interval(_mean_over(per_subject, m)) for c, m in groups.items()}}
        if hard:
            ci["hard"] = boot.interval(_mean_over(per_subject, hard))
        models[run.label] = {
            "path": run.path,
            "scoring": run.scoring,
            "seconds": round(run.seconds, 2),
            "overall": _r(summary["overall"]),
            "overall_question_weighted": _r(summary["overall_question_weighted"]),
            "categories": {k: _r(v) for k, v in summary["categories"].items()},
            "hard": _r(summary["hard"]),
            "subjects": {k: _r(v) for k, v in summary["subjects"].items()},
            "n_subjects": summary["n_subjects"],
            "n_questions": summary["n_questions"],
            "n_correct": summary["n_correct"],
            "ci": {k: (_r(v) if not isinstance(v, dict) else {kk: _r(vv) for kk, vv in v.items()})
                   for k, v in ci.items()},
        }
        if run.details:
            models[run.label]["endpoint"] = run.details

    reference = runs[0]
    comparisons = {}
    for run in runs[1:]:
        comparisons[run.label] = _compare(reference, run, raw, boots, boot, rows, sizes, groups, hard)

    answers = np.array([LETTERS.index(q.answer) for q in questions])
    return {
        "schema": SCHEMA,
        "settings": {
            "data": ceval.source,
            "split": ceval.split,
            "shots": shots,
            "limit_per_subject": limit,
            "subjects": list(rows),
            "questions_per_subject": {k: int(v) for k, v in sizes.items()},
            "n_subjects": len(rows),
            "n_questions": len(questions),
            "prompt": "C-Eval official answer-only prompt, Chinese subject name in the header; "
                      "shots are the dev rows in file order",
            "scoring": "argmax of the next-token logits of A/B/C/D after '答案：'" + (
                "; served models: the same letters' log-probabilities, or the generated answer (see "
                "models.<label>.endpoint)" if any(r.scoring != "logits" for r in runs) else ""),
            "letter_token_ids": list(letter_ids) if letter_ids is not None else None,
            "max_positions": max_len,
            "prompts_with_fewer_shots": int(reduced),
            "prompts_truncated": int(truncated),
            "questions_scored_by_continuation": int(fallback),
            "overall_definition": "mean over the evaluated subjects (the official C-Eval average)",
            "delta_definition": "quantized minus float, in points (a loss is negative)",
            "flip_definition": "flip_rate: fraction of questions whose predicted letter changed",
            "kl_definition": "KL(float || quantized) of the A-D softmax, nats; kl_mean of a subject, category or "
                             "Hard: the mean over its questions",
            "bootstrap": {"samples": bootstrap_samples, "seed": seed, "confidence": confidence,
                          "method": "paired, stratified by subject, percentile interval"},
            "answer_distribution": {L: int((answers == i).sum()) for i, L in enumerate(LETTERS)},
            "files": ceval.files,
        },
        "float": reference.label,
        "models": models,
        "comparisons": comparisons,
        "overlap": overlaps or {},
        "notes": notes,
    }


def _compare(ref: ModelRun, run: ModelRun, summaries: dict, boots: dict, boot: Bootstrap, rows: dict,
             sizes: dict, groups: dict, hard: list) -> dict:
    f, q = summaries[ref.label], summaries[run.label]  # unrounded
    bf, bq = boots[ref.label], boots[run.label]
    delta_sub = {s: bq[s] - bf[s] for s in rows}
    cf, cq = ref.correct, run.correct
    pf, pq = ref.predictions, run.predictions
    changed = pf != pq
    c2w, w2c = cf & ~cq, ~cf & cq
    w2w = changed & ~cf & ~cq
    kl_rows = ref.distribution_rows & run.distribution_rows  # KL only where both have four finite logprobs
    kl = np.full(len(cf), np.nan)
    if kl_rows.any():
        kl[kl_rows] = kl_divergence(ref.scores[kl_rows], run.scores[kl_rows])
    n = len(cf)

    def kl_mean(idx) -> float | None:
        values = kl[idx]
        values = values[~np.isnan(values)]
        return _sig(values.mean()) if values.size else None

    measured = kl[kl_rows]

    subjects = {}
    for s, idx in rows.items():
        subjects[s] = {
            "float": _r(f["subjects"][s]), "quantized": _r(q["subjects"][s]),
            "delta": _r(q["subjects"][s] - f["subjects"][s]), "ci": _r(boot.interval(delta_sub[s])),
            "n": int(len(idx)), "changed": int(changed[idx].sum()), "correct_to_wrong": int(c2w[idx].sum()),
            "wrong_to_correct": int(w2c[idx].sum()), "kl_mean": kl_mean(idx),
        }
    categories = {c: {"float": _r(f["categories"][c]), "quantized": _r(q["categories"][c]),
                      "delta": _r(q["categories"][c] - f["categories"][c]),
                      "ci": _r(boot.interval(_mean_over(delta_sub, m))), "subjects": len(m),
                      "kl_mean": kl_mean(np.concatenate([rows[s] for s in m]))}
                  for c, m in groups.items()}
    hard_block = None
    if hard:
        hard_block = {"float": _r(f["hard"]), "quantized": _r(q["hard"]), "delta": _r(q["hard"] - f["hard"]),
                      "ci": _r(boot.interval(_mean_over(delta_sub, hard))), "subjects": len(hard),
                      "kl_mean": kl_mean(np.concatenate([rows[s] for s in hard]))}
    worst = sorted(subjects, key=lambda s: (subjects[s]["delta"], -subjects[s]["changed"], s))[:WORST_SUBJECTS]
    return {
        "float": ref.label,
        "delta_points": _r(q["overall"] - f["overall"]),
        "delta_ci": _r(boot.interval(_mean_over(delta_sub, list(rows)))),
        "delta_question_weighted": _r(q["overall_question_weighted"] - f["overall_question_weighted"]),
        "delta_question_weighted_ci": _r(boot.interval(_weighted(delta_sub, sizes))),
        "flip_rate": _r(changed.mean(), 6),
        "agreement": _r(1.0 - changed.mean(), 6),
        "flips": {"changed": int(changed.sum()), "correct_to_wrong": int(c2w.sum()),
                  "wrong_to_correct": int(w2c.sum()), "wrong_to_other_wrong": int(w2w.sum()),
                  "correct_to_wrong_rate": _r(c2w.sum() / n, 6), "wrong_to_correct_rate": _r(w2c.sum() / n, 6)},
        "mcnemar": {k: (_r(v, 6) if isinstance(v, float) else v) for k, v in mcnemar(int(c2w.sum()),
                                                                                       int(w2c.sum())).items()},
        "kl": {"mean": _sig(measured.mean()) if measured.size else None,
               "median": _sig(np.median(measured)) if measured.size else None,
               "p95": _sig(np.percentile(measured, 95)) if measured.size else None,
               "max": _sig(measured.max()) if measured.size else None, "questions": int(measured.size),
               "unit": "nats, KL(float || quantized) of the A-D softmax, over the questions where both models "
                       "have four finite letter log-probabilities"},
        "categories": categories,
        "hard": hard_block,
        "subjects": subjects,
        "most_damaged": worst,
    }


# ---- gate --------------------------------------------------------------------------------------------------------
def gate_report(report: dict, allowed_drop: float = 2.0, rule: str = "significant",
                overlap_fails: bool = False) -> dict:
    """Decide pass/fail for every comparison; stores and returns ``report["gate"]``.

    ``overlap_fails``: a model whose calibration data overlaps the evaluated questions fails too.
    """
    if rule not in GATE_RULES:
        raise ValueError(f"unknown gate rule {rule!r} (choose from {', '.join(GATE_RULES)})")
    eps = 1e-9
    verdicts = {}
    for label, comp in report["comparisons"].items():
        drop = 0.0 - comp["delta_points"] + 0.0  # + 0.0: no "-0.00"
        lo, hi = 0.0 - comp["delta_ci"][1] + 0.0, 0.0 - comp["delta_ci"][0] + 0.0
        reasons = []
        if rule in ("point", "significant") and drop > allowed_drop + eps:
            reasons.append(f"drop {drop:.2f} > allowed {allowed_drop:.2f}")
        if rule == "significant" and lo > eps and hi > allowed_drop + eps and not reasons:
            reasons.append(f"significant drop (CI [{lo:.2f}, {hi:.2f}] excludes 0) whose CI reaches past the "
                           f"allowed {allowed_drop:.2f}")
        if rule == "strict" and hi > allowed_drop + eps:
            reasons.append(f"CI upper bound {hi:.2f} > allowed {allowed_drop:.2f}")
        if overlap_fails and report.get("overlap", {}).get(label, {}).get("status") == "overlap":
            reasons.append("calibration data overlaps the evaluated questions (overlap: fail)")
        verdicts[label] = {"drop_points": _r(drop), "drop_ci": _r([lo, hi]), "passed": not reasons,
                           "reason": "; ".join(reasons) or "within the allowance"}
    gate = {"allowed_drop": allowed_drop, "rule": rule, "rule_text": GATE_RULES[rule], "overlap_fails": overlap_fails,
            "passed": all(v["passed"] for v in verdicts.values()), "candidates": verdicts}
    if not verdicts:
        gate["note"] = "no quantized model to compare: nothing to gate"
    report["gate"] = gate
    return gate
