"""The C-Eval runner: the float model and each quantized one on the same prompts, compared, gated and written.

``run_ceval`` loads the questions (``ceval_data``), tokenizes the prompts once with the float model's tokenizer,
scores every model (``ceval_scoring``), checks each quantized model's calibration data against the questions
(``ceval_overlap``), builds the comparison and applies the gate (``ceval_stats``) and writes the report folder
(``ceval_report``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from goldstick.evaluation.ceval_data import LETTERS, CEvalError, load_ceval, tokenize_requests
from goldstick.evaluation.ceval_overlap import calibration_of, check_overlap, overlap_banner
from goldstick.evaluation.ceval_report import write_report
from goldstick.evaluation.ceval_scoring import evaluate_network
from goldstick.evaluation.ceval_stats import build_report, gate_report
from goldstick.io.files import sha256_file
from goldstick.io.loader import load_model
from goldstick.model.tokenizer import PAD_TOKEN, load_tokenizer
from goldstick.testing.make_model import default_model_path


def _model_label(path: str, taken: set[str]) -> str:
    base = Path(path).name or "model"
    label, n = base, 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    return label


def parse_model_arg(text: str, taken: set[str]) -> tuple[str, str]:
    """``LABEL=DIR`` or ``DIR`` -> (label, dir)."""
    label, sep, path = text.partition("=")
    if sep and label and not Path(text).exists():
        if label in taken:
            raise CEvalError(f"model label {label!r} is used twice")
        return label, path
    return _model_label(text, taken), text


def resolve_model_dir(path: str | Path | None) -> Path:
    if path is None or str(path) in ("", "default"):
        return default_model_path()
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise CEvalError(f"{p}: not a checkpoint folder (no config.json)")
    return p


def _tokenizer_digest(model_dir: Path) -> str | None:
    f = model_dir / "tokenizer.json"
    return sha256_file(f) if f.exists() else None


def run_ceval(model: str | Path | None, quantized: Sequence[str | tuple[str, str]] = (),
              data: str | Path = "", split: str = "val", shots: int = 0, subjects=None, limit: int | None = None,
              out: str | Path | None = None, batch_tokens: int = 4096, bootstrap_samples: int = 2000,
              seed: int = 0, confidence: float = 0.95, progress: bool = True, plots: bool = True,
              calibration_overrides: dict[str, dict] | None = None, allowed_drop: float | None = None,
              gate: str = "significant", overlap: str = "warn", extra: dict | None = None,
              log: Callable[[str], None] | None = None, share_prefix: bool = True):
    """Evaluate the float ``model`` and each ``quantized`` checkpoint on the same prompts; compare; write reports.

    ``quantized`` items are directories or ``(label, directory)`` pairs. ``calibration_overrides`` maps a label to the
    calibration provenance to check for overlap (default: the checkpoint's ``report.json``). With ``allowed_drop``,
    each comparison is gated (``ceval_stats.gate_report``; the verdict is ``report["gate"]``); ``overlap="fail"``
    also fails a model whose calibration data overlaps the questions. ``extra`` is merged into the report (job
    details). Returns the report
    dict (also written as ``out/ceval.json``, ``out/ceval.md``, plots and ``out/predictions.jsonl`` when ``out`` is
    given).
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    started = time.time()
    float_dir = resolve_model_dir(model)
    candidates: list[tuple[str, Path]] = []
    taken = {"float"}
    for item in quantized:
        label, path = item if isinstance(item, tuple) else parse_model_arg(str(item), taken)
        taken.add(label)
        candidates.append((label, resolve_model_dir(path)))

    ceval = load_ceval(data, split=split, subjects=subjects, limit=limit, shots=shots)
    questions = ceval.questions()
    if not questions:
        raise CEvalError(f"{data}: no questions selected")
    unlabelled = [q for q in questions if q.answer not in LETTERS]
    if unlabelled:
        raise CEvalError(f"{unlabelled[0].source}: split {split!r} has no answers (C-Eval test labels are not "
                         f"released; evaluate on val)")
    loaded = load_tokenizer(float_dir)
    tok = loaded.tokenizer
    pad_id = tok.token_to_id(PAD_TOKEN)
    pad_id = loaded.eos_id if pad_id is None else pad_id
    max_len = _max_positions(float_dir)
    requests, letter_ids = tokenize_requests(tok, questions, ceval.dev, shots, loaded.bos_id, max_len)
    notes = []
    reference_tok = _tokenizer_digest(float_dir)
    for label, path in candidates:
        if _tokenizer_digest(path) not in (None, reference_tok):
            notes.append(f"{label}: its tokenizer.json differs from the float model's; prompts were tokenized with "
                         f"the float model's tokenizer for every model")

    say(f"ceval: {len(questions)} questions, {len(ceval.items)} subjects, split {split}, {shots}-shot, "
        f"{1 + len(candidates)} model(s)")
    runs = []
    for label, path in [("float", float_dir)] + candidates:
        net = load_model(path)
        run = evaluate_network(net, tok, ceval, shots, loaded.bos_id, pad_id=pad_id, max_len=max_len, label=label,
                               path=str(path), batch_tokens=batch_tokens, progress=progress, requests=requests,
                               letter_ids=letter_ids, share_prefix=share_prefix)
        del net
        say(f"ceval: {label}: {run.summary()['overall']:.2f} points (mean over subjects) in {run.seconds:.1f}s")
        runs.append(run)

    overlaps = {}
    for label, path in candidates:
        provenance = (calibration_overrides or {}).get(label) or calibration_of(path)
        overlaps[label] = check_overlap(provenance, ceval, tokenizer=tok, base=path)
    report = build_report(ceval, runs, requests, shots=shots, limit=limit, max_len=max_len,
                          bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence, overlaps=overlaps,
                          notes=notes, letter_ids=letter_ids)
    report.update(extra or {})
    if allowed_drop is not None:
        gate_report(report, allowed_drop, gate, overlap_fails=overlap == "fail")
    report["settings"]["shared_prefix"] = share_prefix
    report["settings"]["seconds_total"] = round(time.time() - started, 1)
    for label, info in overlaps.items():
        if info["status"] == "overlap":
            print(overlap_banner(label, info), file=sys.stderr)
    if out is not None:
        write_report(report, runs, Path(out), plots=plots)
    return report


def _max_positions(model_dir: Path) -> int | None:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = cfg.get("max_position_embeddings")
    return int(value) if value else None
