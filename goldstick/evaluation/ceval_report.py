"""C-Eval accuracy-loss analysis: float against quantized on the same questions, reports, gate, overlap guard.

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
  p95 and max over all questions (``kl``), and its mean over the questions of every subject, category and of C-Eval
  Hard (``kl_mean``). It separates two quantized models whose accuracy does not: on a model at chance, or when no
  answer changes, every delta is 0 but the KL still measures how far the A-D distribution moved.

Gate (``gate_report``), with D = float overall - quantized overall (the drop, points) and [lo, hi] its CI:
  point        fail if D > allowed_drop
  significant  fail if D > allowed_drop, or if the drop is significant (lo > 0) and its CI reaches past the
               allowance (hi > allowed_drop)       <- the default
  strict       fail if hi > allowed_drop (the data must show the drop is within the allowance; needs many questions)

Overlap guard (``check_overlap``): the calibration data recorded in a quantized checkpoint's ``report.json`` (or a
recipe's) is compared with the evaluated questions: same file (path or sha256), a folder that holds the evaluated
files, or the text of an evaluated question (whitespace-collapsed, at least ``MIN_MATCH_CHARS`` characters) found
in the calibration text. Any hit is written at the top of ``ceval.md``, in ``ceval.json`` and on stderr.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from goldstick.evaluation.ceval import CATEGORIES, HARD, LETTERS, SUBJECTS, CEvalData, ModelRun, Request

SCHEMA = "goldstick.ceval/1"
GATE_RULES = {
    "point": "fail if the drop D (float minus quantized, mean over subjects, points) > allowed_drop",
    "significant": "fail if D > allowed_drop, or if the drop is significant (CI lower bound > 0) and the CI's "
                   "upper bound > allowed_drop",
    "strict": "fail if the CI's upper bound of D > allowed_drop",
}
MIN_MATCH_CHARS = 10
MAX_CALIBRATION_BYTES = 64 << 20
WORST_SUBJECTS = 10


# ---- statistics --------------------------------------------------------------------------------------------------
def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


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
            "scoring": "argmax of the next-token logits of A/B/C/D after '答案：'",
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
    kl = kl_divergence(ref.scores, run.scores)
    n = len(cf)

    subjects = {}
    for s, idx in rows.items():
        subjects[s] = {
            "float": _r(f["subjects"][s]), "quantized": _r(q["subjects"][s]),
            "delta": _r(q["subjects"][s] - f["subjects"][s]), "ci": _r(boot.interval(delta_sub[s])),
            "n": int(len(idx)), "changed": int(changed[idx].sum()), "correct_to_wrong": int(c2w[idx].sum()),
            "wrong_to_correct": int(w2c[idx].sum()), "kl_mean": _sig(kl[idx].mean()),
        }
    categories = {c: {"float": _r(f["categories"][c]), "quantized": _r(q["categories"][c]),
                      "delta": _r(q["categories"][c] - f["categories"][c]),
                      "ci": _r(boot.interval(_mean_over(delta_sub, m))), "subjects": len(m),
                      "kl_mean": _sig(kl[np.concatenate([rows[s] for s in m])].mean())}
                  for c, m in groups.items()}
    hard_block = None
    if hard:
        hard_block = {"float": _r(f["hard"]), "quantized": _r(q["hard"]), "delta": _r(q["hard"] - f["hard"]),
                      "ci": _r(boot.interval(_mean_over(delta_sub, hard))), "subjects": len(hard),
                      "kl_mean": _sig(kl[np.concatenate([rows[s] for s in hard])].mean())}
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
        "kl": {"mean": _sig(kl.mean()), "median": _sig(np.median(kl)), "p95": _sig(np.percentile(kl, 95)),
               "max": _sig(kl.max()), "unit": "nats, KL(float || quantized) of the A-D softmax"},
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


# ---- overlap guard -----------------------------------------------------------------------------------------------
def calibration_of(quant_dir: str | Path) -> dict | None:
    """The calibration provenance in a quantized checkpoint's report.json (None for a float checkpoint)."""
    path = Path(quant_dir) / "report.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("calibration")
    except (OSError, json.JSONDecodeError):
        return None


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _resolve_source(source: str, base: Path | None) -> Path | None:
    from goldstick.engine.calibration import resolve_source

    candidates = [Path(source).expanduser()]
    if base is not None:
        candidates.append(Path(base) / source)
    resolved = resolve_source(source)
    if isinstance(resolved, Path):
        candidates.append(resolved)
    for c in candidates:
        if c.exists():
            return c.resolve()
    return None


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _calibration_text(path: Path, tokenizer) -> tuple[str, list[str]]:
    """The text of a calibration source (capped), and notes."""
    notes: list[str] = []
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if path.is_dir() and not any(p.suffix in (".csv", ".jsonl", ".txt", ".json") for p in files):
        try:
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[next(iter(ds))]
            if "text" in ds.column_names:
                return "\n".join(map(str, ds["text"]))[:MAX_CALIBRATION_BYTES], notes
            if "input_ids" in ds.column_names and tokenizer is not None:
                return "\n".join(tokenizer.decode(list(map(int, r))) for r in ds["input_ids"]), notes
        except Exception as exc:  # noqa: BLE001 - any failure only means "not checked"
            notes.append(f"{path}: could not read the calibration folder ({exc})")
            return "", notes
    parts, size = [], 0
    for f in files:
        if size >= MAX_CALIBRATION_BYTES:
            notes.append(f"calibration text capped at {MAX_CALIBRATION_BYTES >> 20} MiB for the overlap check")
            break
        try:
            raw = f.read_bytes()[:MAX_CALIBRATION_BYTES - size].decode("utf-8", errors="replace")
        except OSError as exc:
            notes.append(f"{f}: unreadable ({exc})")
            continue
        size += len(raw)
        if f.suffix in (".jsonl", ".json"):
            for line in (raw.splitlines() if f.suffix == ".jsonl" else [raw]):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    parts.append(line)
                    continue
                if isinstance(record, dict) and "input_ids" in record and tokenizer is not None:
                    try:
                        parts.append(tokenizer.decode([int(t) for t in record["input_ids"]]))
                    except (TypeError, ValueError):
                        pass
                parts.extend(_strings(record))
        else:
            parts.append(raw)
    return "\n".join(parts).replace("\r\n", "\n").replace("\r", "\n"), notes


def check_overlap(provenance: dict | None, ceval: CEvalData, tokenizer=None, base: str | Path | None = None) -> dict:
    """Does the calibration data (``provenance``: source, sha256) overlap the evaluated questions of ``ceval``?

    status: ``overlap`` (same file, a folder holding the evaluated files, or evaluated question text found in the
    calibration text), ``clean`` (checked, none found), ``unchecked`` (the source could not be read), ``none`` (no
    calibration recorded: a float checkpoint, or a quantized one without report.json).
    """
    info: dict = {"status": "none", "calibration": None, "same_file": [], "question_matches": 0, "examples": [],
                  "shot_matches": 0, "notes": []}
    if not provenance or not provenance.get("source"):
        info["notes"].append("no calibration provenance (no report.json with a 'calibration' entry)")
        return info
    source = str(provenance["source"])
    info["calibration"] = {"source": source, "sha256": provenance.get("sha256")}
    evaluated = {Path(p).resolve(): sha for p, sha in ceval.files.items() if p.endswith(f"_{ceval.split}.csv")}
    path = _resolve_source(source, Path(base) if base else None)
    sha = provenance.get("sha256")
    for p, file_sha in evaluated.items():
        if (sha and sha == file_sha) or (path is not None and path == p):
            info["same_file"].append(str(p))
        elif path is not None and path.is_dir() and path in p.parents:
            info["same_file"].append(f"{p} (inside the calibration folder {path})")
    if path is None:
        if "ceval" in source.lower():
            info["status"] = "overlap"
            info["notes"].append(f"calibration source {source!r} names C-Eval and could not be read here: treat as "
                                 f"overlapping")
            return info
        info["status"] = "overlap" if info["same_file"] else "unchecked"
        info["notes"].append(f"calibration source {source!r} not found here: question text not checked")
        return info
    text, notes = _calibration_text(path, tokenizer)
    info["notes"] += notes
    haystack = _collapse(text)
    matches = []
    for q in ceval.questions():
        needle = _collapse(q.question)
        if len(needle) >= MIN_MATCH_CHARS and needle in haystack:
            matches.append(q.key)
    info["question_matches"] = len(matches)
    info["examples"] = matches[:10]
    shots = [q for rows in ceval.dev.values() for q in rows]
    info["shot_matches"] = sum(len(_collapse(q.question)) >= MIN_MATCH_CHARS and _collapse(q.question) in haystack
                               for q in shots)
    if info["shot_matches"]:
        info["notes"].append(f"{info['shot_matches']} dev row(s) (few-shot examples, not evaluated) appear in the "
                             f"calibration text")
    info["status"] = "overlap" if (matches or info["same_file"]) else "clean"
    return info


def overlap_banner(label: str, info: dict) -> str:
    bar = "!" * 100
    what = []
    if info.get("same_file"):
        what.append(f"calibration used the evaluated file(s): {', '.join(info['same_file'][:3])}"
                    + (" ..." if len(info["same_file"]) > 3 else ""))
    if info.get("question_matches"):
        what.append(f"{info['question_matches']} evaluated question(s) appear in the calibration text, e.g. "
                    f"{', '.join(info['examples'][:3])}")
    what += [n for n in info.get("notes", []) if "C-Eval" in n]
    source = (info.get("calibration") or {}).get("source")
    lines = [bar, f"!!! WARNING: CALIBRATION / EVALUATION OVERLAP for '{label}'",
             f"!!! calibration data: {source}"] + [f"!!! {w}" for w in what] + [
        "!!! The quantized model was calibrated on questions it is evaluated on: its C-Eval score is optimistic.",
        bar]
    return "\n".join(lines)


# ---- writing -----------------------------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_report(report: dict, runs: Sequence[ModelRun], out: Path, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = []
    if plots:
        try:
            report["plots"] = write_plots(report, out)
        except ImportError as exc:
            report["notes"].append(f"plots skipped: {exc}")
    write_predictions(runs, out / "predictions.jsonl")
    write_json(out / "ceval.json", report)
    (out / "ceval.md").write_text(render_markdown(report), encoding="utf-8")


def write_predictions(runs: Sequence[ModelRun], path: Path) -> None:
    probs = {r.label: r.probabilities for r in runs}
    preds = {r.label: r.predictions for r in runs}
    with open(path, "w", encoding="utf-8") as handle:
        for i, q in enumerate(runs[0].questions):
            record = {"subject": q.subject, "id": q.id, "answer": q.answer,
                      "predictions": {k: LETTERS[int(v[i])] for k, v in preds.items()},
                      "probabilities": {k: [round(float(x), 5) for x in v[i]] for k, v in probs.items()}}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _fmt(x, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ci(ci) -> str:
    return "—" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _kl(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def no_loss_note(comparison: dict) -> str | None:
    """The sentence that replaces the "most damaged subjects" list when no subject lost accuracy (else None)."""
    deltas = [v["delta"] for v in comparison["subjects"].values()]
    if any(d < 0 for d in deltas):
        return None
    gained = sum(d > 0 for d in deltas)
    if not gained:
        return f"No subject lost accuracy: Δ = 0 in all {len(deltas)} subjects"
    return f"No subject lost accuracy: Δ ≥ 0 in all {len(deltas)} subjects ({gained} gained)"


PLOT_CAPTIONS = {
    "categories.png": "accuracy per category, Hard and overall (95% bootstrap CI), and Δ per group (paired CI)",
    "subjects.png": "the most damaged subjects (Δ < 0) with their paired CIs",
    "kl.png": "KL(float‖quantized) of the A–D distribution per category and per subject (mean over questions): "
              "it moves even when no answer changes",
}


def render_markdown(report: dict) -> str:
    st = report["settings"]
    labels = list(report["models"])
    lines = ["# C-Eval accuracy report", ""]
    for label, info in report.get("overlap", {}).items():
        if info.get("status") == "overlap":
            lines += ["> **WARNING: CALIBRATION / EVALUATION OVERLAP** for `" + label + "`: "
                      + "; ".join(filter(None, [
                          f"calibration used the evaluated file(s) {', '.join(info['same_file'][:3])}"
                          if info.get("same_file") else "",
                          f"{info['question_matches']} evaluated question(s) appear in the calibration text "
                          f"(e.g. {', '.join(info['examples'][:3])})" if info.get("question_matches") else "",
                          *[n for n in info.get("notes", []) if "C-Eval" in n]]))
                      + ". Its score is optimistic.", ""]
    gate = report.get("gate")
    if gate:
        verdict = "PASSED" if gate["passed"] else "FAILED"
        lines += [f"**Gate: {verdict}** (allowed drop {gate['allowed_drop']} points, rule `{gate['rule']}`: "
                  f"{gate['rule_text']})", ""]
        for label, v in gate["candidates"].items():
            lines.append(f"- `{label}`: drop {_fmt(v['drop_points'])} points, CI {_ci(v['drop_ci'])}: "
                         f"{'pass' if v['passed'] else 'FAIL'} ({v['reason']})")
        lines.append("")
    lines += [f"Data `{st['data']}`, split `{st['split']}`, {st['shots']}-shot, {st['n_subjects']} subjects, "
              f"{st['n_questions']} questions"
              + (f" (first {st['limit_per_subject']} per subject)" if st.get("limit_per_subject") else "") + ".  ",
              f"Prompt: {st['prompt']}. Scoring: {st['scoring']}.  ",
              f"Overall = {st['overall_definition']}; Δ = {st['delta_definition']}. Confidence intervals: "
              f"{int(st['bootstrap']['confidence'] * 100)}% {st['bootstrap']['method']}, "
              f"{st['bootstrap']['samples']} resamples, seed {st['bootstrap']['seed']}.", ""]
    lines += ["## Accuracy (points)", "", "| model | overall | question-weighted | "
              + " | ".join(CATEGORIES) + " | Hard | seconds |", "|---" * (5 + len(CATEGORIES)) + "|"]
    for label in labels:
        m = report["models"][label]
        cats = " | ".join(_fmt(m["categories"].get(c)) for c in CATEGORIES)
        lines.append(f"| `{label}` | **{_fmt(m['overall'])}** | {_fmt(m['overall_question_weighted'])} | {cats} | "
                     f"{_fmt(m['hard'])} | {m['seconds']} |")
    lines.append("")
    for label, c in report["comparisons"].items():
        fl, mc, kl = c["flips"], c["mcnemar"], c["kl"]
        lines += [f"## `{label}` against `{c['float']}`", "",
                  f"- Δ overall: **{c['delta_points']:+.2f}** points, CI {_ci(c['delta_ci'])}; question-weighted "
                  f"{c['delta_question_weighted']:+.2f}, CI {_ci(c['delta_question_weighted_ci'])}",
                  f"- answers changed: {fl['changed']} of {st['n_questions']} (flip rate {c['flip_rate']:.4f}): "
                  f"correct→wrong {fl['correct_to_wrong']}, wrong→correct {fl['wrong_to_correct']}, "
                  f"wrong→other wrong {fl['wrong_to_other_wrong']}",
                  f"- McNemar (b={mc['b']}, c={mc['c']}): exact p = {mc['p_value']:.4g}, χ² (cc) = "
                  f"{mc['statistic']:.3f}",
                  f"- KL(float‖quantized) of the A–D distribution: mean {kl['mean']:.3g}, median {kl['median']:.3g}, "
                  f"p95 {kl['p95']:.3g}, max {kl['max']:.3g} nats", "",
                  "| group | float | quantized | Δ | CI | KL mean (nats) |", "|---|---|---|---|---|---|"]
        for cat, v in c["categories"].items():
            lines.append(f"| {cat} ({v['subjects']}) | {_fmt(v['float'])} | {_fmt(v['quantized'])} | "
                         f"{v['delta']:+.2f} | {_ci(v['ci'])} | {_kl(v.get('kl_mean'))} |")
        if c["hard"]:
            v = c["hard"]
            lines.append(f"| Hard ({v['subjects']}) | {_fmt(v['float'])} | {_fmt(v['quantized'])} | "
                         f"{v['delta']:+.2f} | {_ci(v['ci'])} | {_kl(v.get('kl_mean'))} |")
        note = no_loss_note(c)
        if note:
            lines += ["", f"Most damaged subjects: none. {note}."]
        else:
            damaged = [s for s in c["most_damaged"] if c["subjects"][s]["delta"] < 0][:5]
            lines += ["", "Most damaged subjects: " + ", ".join(
                f"`{s}` ({c['subjects'][s]['delta']:+.1f})" for s in damaged)]
        by_kl = sorted(c["subjects"], key=lambda s: (-(c["subjects"][s].get("kl_mean") or 0.0), s))[:5]
        lines += ["", "Largest A–D KL (subjects, nats): " + ", ".join(
            f"`{s}` ({_kl(c['subjects'][s].get('kl_mean'))})" for s in by_kl)
            + ("; see `kl.png`" if "kl.png" in report.get("plots", []) else ""), ""]
    if report["comparisons"]:
        lines += ["## Per subject", "", "| subject | category | n | " + " | ".join(f"`{x}`" for x in labels)
                  + " | " + " | ".join(f"Δ `{x}` (CI)" for x in report["comparisons"])
                  + " | " + " | ".join(f"KL `{x}`" for x in report["comparisons"]) + " |",
                  "|---" * (3 + len(labels) + 2 * len(report["comparisons"])) + "|"]
    else:
        lines += ["## Per subject", "", "| subject | category | n | " + " | ".join(f"`{x}`" for x in labels) + " |",
                  "|---" * (3 + len(labels)) + "|"]
    for s in st["subjects"]:
        n = st["questions_per_subject"][s]
        accs = " | ".join(_fmt(report["models"][x]["subjects"][s]) for x in labels)
        deltas = "".join(f" | {c['subjects'][s]['delta']:+.1f} {_ci(c['subjects'][s]['ci'])}"
                         for c in report["comparisons"].values())
        deltas += "".join(f" | {_kl(c['subjects'][s].get('kl_mean'))}" for c in report["comparisons"].values())
        hard = " (Hard)" if s in HARD else ""
        lines.append(f"| {s}{hard} | {SUBJECTS[s].category} | {n} | {accs}{deltas} |")
    lines.append("")
    overlap = report.get("overlap", {})
    if overlap:
        lines += ["## Calibration overlap check", ""]
        for label, info in overlap.items():
            src = (info.get("calibration") or {}).get("source")
            lines.append(f"- `{label}`: **{info['status']}** (calibration `{src}`; same file: "
                         f"{len(info.get('same_file', []))}, evaluated questions found: {info.get('question_matches', 0)})"
                         + ("; " + "; ".join(info["notes"]) if info.get("notes") else ""))
        lines.append("")
    if report.get("plots"):
        lines += ["## Plots", ""]
        for p in report["plots"]:
            lines += [f"![{p}]({p})", "", f"`{p}`: {PLOT_CAPTIONS.get(p, p)}.", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def _model_colors(report: dict) -> dict[str, str]:
    """One colour per model, the same in every plot (a comparison takes its quantized model's colour)."""
    return {label: f"C{i % 10}" for i, label in enumerate(report["models"])}


def _group_names(report: dict) -> list[str]:
    first = report["models"][next(iter(report["models"]))]
    groups = [c for c in CATEGORIES if c in first["categories"]]
    return groups + (["Hard"] if first["hard"] is not None else []) + ["Overall"]


def _note(ax, text: str) -> None:
    """Write ``text`` in the middle of an empty axes (no bars, no ticks)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10, wrap=True,
            bbox={"boxstyle": "round", "facecolor": "whitesmoke", "edgecolor": "grey"})
    ax.set_xticks([])
    ax.set_yticks([])


def plot_categories(report: dict):
    """Accuracy per category / Hard / overall with CIs and, with comparisons, Δ per group: a matplotlib Figure.

    The legend sits above both panels (outside the axes), so it never covers a bar.
    """
    from matplotlib.figure import Figure

    labels = list(report["models"])
    colors = _model_colors(report)
    names = _group_names(report)
    comps = report["comparisons"]

    def acc(m, g):
        return m["overall"] if g == "Overall" else m["hard"] if g == "Hard" else m["categories"][g]

    def acc_ci(m, g):
        ci = m["ci"]
        return ci["overall"] if g == "Overall" else ci.get("hard") if g == "Hard" else ci["categories"][g]

    fig = Figure(figsize=(13 if comps else 7, 5), layout="constrained")
    axes = fig.subplots(1, 2 if comps else 1, squeeze=False)[0]
    ax = axes[0]
    width = 0.8 / len(labels)
    x = np.arange(len(names))
    for i, label in enumerate(labels):
        m = report["models"][label]
        vals = np.array([acc(m, g) for g in names])
        cis = np.array([acc_ci(m, g) for g in names])
        err = np.abs(np.stack([vals - cis[:, 0], cis[:, 1] - vals]))
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=label,
               color=colors[label])
    ax.axhline(25, color="grey", lw=0.8, ls="--", label="chance (25)")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("accuracy (points)")
    ax.set_title("C-Eval accuracy (95% bootstrap CI)")
    if comps:
        ax = axes[1]
        width = 0.8 / len(comps)
        all_zero = True
        for i, (label, c) in enumerate(comps.items()):
            blocks = [c["categories"][g] if g in c["categories"] else c["hard"] for g in names[:-1]]
            vals = np.array([b["delta"] for b in blocks] + [c["delta_points"]])
            cis = np.array([b["ci"] for b in blocks] + [c["delta_ci"]])
            all_zero &= bool(np.all(vals == 0) and np.all(cis == 0))
            err = np.abs(np.stack([vals - cis[:, 0], cis[:, 1] - vals]))
            ax.bar(x + (i - (len(comps) - 1) / 2) * width, vals, width, yerr=err, capsize=3,
                   color=colors.get(label))
        gate = report.get("gate")
        if gate:
            ax.axhline(-gate["allowed_drop"], color="red", lw=0.8, ls="--", label="allowed drop")
        ax.axhline(0, color="black", lw=0.8)
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, -1.0), max(high, 1.0))
        ax.set_xticks(x, names, rotation=20)
        ax.set_ylabel("Δ points (quantized − float)")
        ax.set_title("Accuracy change per group (paired bootstrap CI)")
        if all_zero:
            moved = any(c["kl"]["mean"] > 0 for c in comps.values())
            text = "Δ = 0 in every group, CI [0, 0]\n" + (
                "the A–D distributions still moved: see the KL divergence in kl.png" if moved
                else "and KL = 0: the A–D distributions are identical")
            ax.text(0.5, 0.35, text, transform=ax.transAxes, ha="center", va="center", fontsize=9,
                    bbox={"boxstyle": "round", "facecolor": "whitesmoke", "edgecolor": "grey"})
    handles = {}
    for a in axes:
        for h, t in zip(*a.get_legend_handles_labels()):
            handles.setdefault(t, h)
    handles = {t: handles[t] for t in sorted(handles, key=lambda t: t not in colors)}  # the models first
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=min(len(handles), 6),
               fontsize=9, frameon=False)
    return fig


def plot_subjects(report: dict):
    """The most damaged subjects (Δ < 0 only) per comparison; a note instead of bars when none lost accuracy."""
    from matplotlib.figure import Figure

    comps = report["comparisons"]
    colors = _model_colors(report)
    damaged = {label: [s for s in c["most_damaged"] if c["subjects"][s]["delta"] < 0][::-1]
               for label, c in comps.items()}
    rows = max([len(v) for v in damaged.values()] + [3])
    fig = Figure(figsize=(7 * len(comps), 0.45 * rows + 1.8), layout="constrained")
    axes = fig.subplots(1, len(comps), squeeze=False)[0]
    for ax, (label, c) in zip(axes, comps.items()):
        ax.set_title(f"Most damaged subjects: {label}")
        worst = damaged[label]
        if not worst:
            _note(ax, no_loss_note(c) or "No subject lost accuracy")
            continue
        vals = np.array([c["subjects"][s]["delta"] for s in worst])
        cis = np.array([c["subjects"][s]["ci"] for s in worst])
        err = np.abs(np.stack([vals - cis[:, 0], cis[:, 1] - vals]))
        ax.barh(np.arange(len(worst)), vals, xerr=err, capsize=3, color=colors.get(label, "tab:red"))
        ax.set_yticks(np.arange(len(worst)), [f"{s} (n={c['subjects'][s]['n']}, "
                                              f"changed {c['subjects'][s]['changed']})" for s in worst],
                      fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        low, high = ax.get_xlim()
        ax.set_xlim(min(low, -1.0), max(high, 1.0))
        lost = sum(v["delta"] < 0 for v in c["subjects"].values())
        kept = len(c["subjects"]) - lost
        ax.set_xlabel("Δ points (quantized − float)"
                      + (f"; {lost - len(worst)} more subject(s) lost accuracy" if lost > len(worst) else "")
                      + (f"; {kept} subject(s) did not" if kept else ""))
    return fig


def _kl_axis(ax, values: np.ndarray, horizontal: bool) -> bool:
    """Log scale for positive KL values (symlog when some are 0); False when every value is 0 (nothing to draw)."""
    positive = values[values > 0]
    if not positive.size:
        return False
    if positive.size == values.size:
        (ax.set_xscale if horizontal else ax.set_yscale)("log")
    else:
        (ax.set_xscale if horizontal else ax.set_yscale)("symlog", linthresh=float(positive.min()))
    return True


def _kl_floor(ax, values: np.ndarray, horizontal: bool) -> None:
    """On a log axis, start a decade below the smallest value (call after drawing), so that its bar shows."""
    positive = values[values > 0]
    if positive.size == values.size and positive.size:
        low = 10 ** (np.floor(np.log10(positive.min())) - 1)
        (ax.set_xlim if horizontal else ax.set_ylim)(low, None)


def plot_kl(report: dict):
    """KL(float || quantized) of the A-D distribution per category / Hard / overall and per subject: a Figure.

    Per-subject bars are sorted by KL (largest at the top). Every value is the mean over the group's questions.
    """
    from matplotlib.figure import Figure

    comps = report["comparisons"]
    colors = _model_colors(report)
    names = _group_names(report)
    first = next(iter(comps.values()))
    subjects = sorted(first["subjects"], key=lambda s: (-max((c["subjects"][s].get("kl_mean") or 0.0)
                                                              for c in comps.values()), s))[::-1]
    n_bars = len(subjects) * max(1, len(comps))
    fig = Figure(figsize=(11, 3.8 + 0.22 * n_bars + 1.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3.8, 0.22 * n_bars + 1.0])
    width = 0.8 / len(comps)

    def group_kl(c, g):
        if g == "Overall":
            return c["kl"]["mean"]
        block = c["hard"] if g == "Hard" else c["categories"].get(g)
        return (block or {}).get("kl_mean")

    x = np.arange(len(names))
    vals = np.array([[group_kl(c, g) or 0.0 for g in names] for c in comps.values()], dtype=float)
    top.set_title("KL(float‖quantized) of the A–D distribution per group (mean over questions)")
    if _kl_axis(top, vals, horizontal=False):
        for i, label in enumerate(comps):
            pos = x + (i - (len(comps) - 1) / 2) * width
            top.bar(pos, vals[i], width, label=label, color=colors.get(label))
            for px, v in zip(pos, vals[i]):
                top.annotate(f"{v:.2g}", (px, v), ha="center", va="bottom", fontsize=7,
                             xytext=(0, 2), textcoords="offset points")
        top.set_xticks(x, names, rotation=20)
        top.set_ylabel("KL (nats)")
        top.set_ylim(None, top.get_ylim()[1] * 2)  # room for the value labels
        _kl_floor(top, vals, horizontal=False)
    else:
        _note(top, "KL = 0 in every group: the A–D distributions are identical")

    y = np.arange(len(subjects))
    height = 0.8 / len(comps)
    svals = np.array([[c["subjects"][s].get("kl_mean") or 0.0 for s in subjects] for c in comps.values()],
                     dtype=float)
    bottom.set_title("KL(float‖quantized) of the A–D distribution per subject (mean over questions)")
    if _kl_axis(bottom, svals, horizontal=True):
        for i, label in enumerate(comps):
            pos = y + ((len(comps) - 1) / 2 - i) * height  # the first comparison on top, as in the legend
            bottom.barh(pos, svals[i], height, label=label, color=colors.get(label))
            for py, v in zip(pos, svals[i]):
                bottom.annotate(f"{v:.2g}", (v, py), ha="left", va="center", fontsize=7,
                                xytext=(2, 0), textcoords="offset points")
        bottom.set_yticks(y, [f"{s} ({SUBJECTS[s].category})" for s in subjects], fontsize=8)
        bottom.set_ylim(-0.6, len(subjects) - 0.4)
        bottom.set_xlabel("KL (nats)")
        bottom.set_xlim(None, bottom.get_xlim()[1] * 2)
        _kl_floor(bottom, svals, horizontal=True)
    else:
        _note(bottom, "KL = 0 in every subject: the A–D distributions are identical")
    handles = {}
    for a in (top, bottom):
        for h, t in zip(*a.get_legend_handles_labels()):
            handles.setdefault(t, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside upper center",
                   ncols=min(len(handles), 6), fontsize=9, frameon=False)
    return fig


def plot_figures(report: dict) -> dict:
    """file name -> matplotlib Figure, for every plot of the report (KL and subjects only with a comparison)."""
    figures = {"categories.png": plot_categories(report)}
    if report["comparisons"]:
        figures["subjects.png"] = plot_subjects(report)
        figures["kl.png"] = plot_kl(report)
    return figures


def write_plots(report: dict, out: Path) -> list[str]:
    written = []
    for name, fig in plot_figures(report).items():
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        written.append(name)
    return written


def print_summary(report: dict, out: str | Path | None = None) -> None:
    for label, m in report["models"].items():
        print(f"{label}: overall {m['overall']:.2f} (question-weighted {m['overall_question_weighted']:.2f}) "
              f"over {m['n_subjects']} subjects / {m['n_questions']} questions, {m['seconds']}s")
    for label, c in report["comparisons"].items():
        print(f"{label} vs {c['float']}: delta {c['delta_points']:+.2f} points, CI {_ci(c['delta_ci'])}, "
              f"flip rate {c['flip_rate']:.4f} (correct->wrong {c['flips']['correct_to_wrong']}, wrong->correct "
              f"{c['flips']['wrong_to_correct']}), McNemar p {c['mcnemar']['p_value']:.4g}, KL mean "
              f"{c['kl']['mean']:.3g}")
    for label, info in report.get("overlap", {}).items():
        if info.get("status") == "overlap":
            print(f"WARNING: {label}: calibration data overlaps the evaluated questions (see ceval.md)")
    gate = report.get("gate")
    if gate:
        print(f"gate ({gate['rule']}, allowed drop {gate['allowed_drop']}): "
              f"{'PASSED' if gate['passed'] else 'FAILED'}")
        for label, v in gate["candidates"].items():
            print(f"  {label}: {v['reason']}")
    if out:
        print(f"report: {Path(out) / 'ceval.md'}  ({Path(out) / 'ceval.json'})")
