"""C-Eval overlap guard: does a quantized model's calibration data hold the questions it is evaluated on?

``check_overlap``: the calibration data recorded in a quantized checkpoint's ``report.json`` (or a recipe's) is
compared with the evaluated questions: same file (path or sha256), a folder that holds the evaluated files, a source
named like C-Eval that cannot be read here, or the text of an evaluated question (whitespace-collapsed, at least
``MIN_MATCH_CHARS`` characters) found in the calibration text. Any hit is written at the top of ``ceval.md``, in
``ceval.json`` and on stderr (``overlap_banner``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from goldstick.engine.calibration import resolve_source
from goldstick.evaluation.ceval_data import CEvalData

MIN_MATCH_CHARS = 10
MAX_CALIBRATION_BYTES = 64 << 20


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
