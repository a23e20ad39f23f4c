"""The C-Eval runner: the float model and each quantized one on the same prompts, compared, gated and written.

``run_ceval`` loads the questions (``ceval_data``), tokenizes the prompts once (with ``tokenizer``, else the float
model's tokenizer, else the first local quantized model's), scores every model: a checkpoint folder in-process
(``ceval_scoring``), an endpoint URL over HTTP (``endpoint``), checks each quantized model's calibration data
against the questions (``ceval_overlap``), builds the comparison and applies the gate (``ceval_stats``) and writes
the report folder (``ceval_report``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from goldstick.evaluation.ceval_data import (
    LETTERS,
    CEvalError,
    Request,
    build_prompt,
    load_ceval,
    tokenize_requests,
)
from goldstick.evaluation.ceval_overlap import calibration_of, check_overlap, overlap_banner
from goldstick.evaluation.ceval_report import write_report
from goldstick.evaluation.ceval_scoring import evaluate_network
from goldstick.evaluation.ceval_stats import build_report, gate_report
from goldstick.evaluation.endpoint import (
    CACHE_FILE,
    AnswerCache,
    Endpoint,
    EndpointOptions,
    connect,
    endpoint_notes,
    is_endpoint,
    score_endpoint,
)
from goldstick.io.files import sha256_file
from goldstick.io.loader import load_model
from goldstick.model.tokenizer import PAD_TOKEN, load_tokenizer
from goldstick.testing.make_model import default_model_path


def _unique_label(base: str, taken: set[str]) -> str:
    label, n = base, 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    return label


def parse_model_arg(text: str, taken: set[str]) -> tuple[str, str]:
    """``LABEL=DIR``, ``DIR``, ``LABEL=URL`` or ``URL`` -> (label, dir or URL).

    An unlabelled URL is labelled by its ``?model=`` name or its ``HOST:PORT``, an unlabelled folder by its name.
    """
    label, sep, path = text.partition("=")
    if sep and label and "://" not in label and not Path(text).exists():
        if label in taken:
            raise CEvalError(f"model label {label!r} is used twice")
        return label, path
    if is_endpoint(text):
        return _unique_label(Endpoint.parse(text).label, taken), text
    return _unique_label(Path(text).name or "model", taken), text


def resolve_model_dir(path: str | Path | None) -> Path:
    if path is None or str(path) in ("", "default"):
        return default_model_path()
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise CEvalError(f"{p}: not a checkpoint folder (no config.json)")
    return p


def resolve_model(spec: str | Path | Endpoint | None) -> Path | Endpoint:
    """A checkpoint folder, or an ``Endpoint`` for a URL (``[NAME=]http://HOST:PORT/v1[?model=SERVED]``)."""
    if isinstance(spec, Endpoint):
        return spec
    if isinstance(spec, str) and "=" in spec and not Path(spec).exists():
        _, spec = parse_model_arg(spec, set())  # the float model's label is always "float"
    if is_endpoint(spec):
        return Endpoint.parse(spec)
    return resolve_model_dir(spec)


def _tokenizer_digest(model_dir: Path) -> str | None:
    f = model_dir / "tokenizer.json"
    return sha256_file(f) if f.exists() else None


def run_ceval(model: str | Path | None, quantized: Sequence[str | tuple[str, str]] = (),
              data: str | Path = "", split: str = "val", shots: int = 0, subjects=None, limit: int | None = None,
              out: str | Path | None = None, batch_tokens: int = 4096, bootstrap_samples: int = 2000,
              seed: int = 0, confidence: float = 0.95, progress: bool = True, plots: bool = True,
              calibration_overrides: dict[str, dict] | None = None, allowed_drop: float | None = None,
              gate: str = "significant", overlap: str = "warn", extra: dict | None = None,
              log: Callable[[str], None] | None = None, share_prefix: bool = True,
              tokenizer: str | Path | None = None, endpoint_options: EndpointOptions | None = None):
    """Evaluate the float ``model`` and each ``quantized`` model on the same prompts; compare; write reports.

    Models are checkpoint folders (scored in-process) or endpoint URLs (``http://HOST:PORT/v1[?model=NAME]``,
    scored over HTTP as ``endpoint_options`` say; ``endpoint.py``). ``quantized`` items are folders or URLs,
    ``LABEL=`` ones, or ``(label, folder or URL)`` pairs. ``tokenizer``: the folder whose tokenizer builds the
    prompts; endpoints then get token ids (else text). ``calibration_overrides`` maps a label to the calibration
    provenance to check for overlap (default: the checkpoint's ``report.json``). With ``allowed_drop``, each
    comparison is gated (``ceval_stats.gate_report``; the verdict is ``report["gate"]``); ``overlap="fail"`` also
    fails a model whose calibration data overlaps the questions. ``extra`` is merged into the report (job
    details). Returns the report dict (also written as ``out/ceval.json``, ``out/ceval.md``, plots and
    ``out/predictions.jsonl`` when ``out`` is given; answers of endpoints go to ``out/endpoint-answers.jsonl``).
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    started = time.time()
    options = (endpoint_options or EndpointOptions()).check()
    specs: list[tuple[str, Path | Endpoint]] = [("float", resolve_model(model))]
    taken = {"float"}
    for item in quantized:
        label, path = item if isinstance(item, tuple) else parse_model_arg(str(item), taken)
        taken.add(label)
        specs.append((label, resolve_model(path)))
    specs = [(label, connect(spec, options) if isinstance(spec, Endpoint) else spec) for label, spec in specs]
    endpoints = [spec for _, spec in specs if isinstance(spec, Endpoint)]
    local = [spec for _, spec in specs if isinstance(spec, Path)]

    ceval = load_ceval(data, split=split, subjects=subjects, limit=limit, shots=shots)
    questions = ceval.questions()
    if not questions:
        raise CEvalError(f"{data}: no questions selected")
    unlabelled = [q for q in questions if q.answer not in LETTERS]
    if unlabelled:
        raise CEvalError(f"{unlabelled[0].source}: split {split!r} has no answers (C-Eval test labels are not "
                         f"released; evaluate on val)")
    tokenizer_dir = Path(tokenizer).expanduser() if tokenizer else (local[0] if local else None)
    tok = loaded = None
    pad_id, letter_ids, max_len = 0, None, None
    if tokenizer_dir is not None:
        loaded = load_tokenizer(tokenizer_dir)
        tok = loaded.tokenizer
        pad_id = tok.token_to_id(PAD_TOKEN)
        pad_id = loaded.eos_id if pad_id is None else pad_id
        limits = [_max_positions(tokenizer_dir)] + [_max_positions(p) for p in local[:1]]
        limits += [e.max_model_len for e in endpoints]
        limits = [x for x in limits if x]
        max_len = min(limits) if limits else None
        if endpoints and max_len and options.scoring == "logprobs":
            max_len -= 1  # room for the token an endpoint generates (or echoes) after the prompt
        requests, letter_ids = tokenize_requests(tok, questions, ceval.dev, shots, loaded.bos_id, max_len)
    else:  # endpoints only, no tokenizer: text prompts with every shot
        requests = [Request(ids=[], shots=shots, truncated=False) for _ in questions]
    prompts = [build_prompt(q, ceval.dev.get(q.subject, [])[:r.shots] if r.shots else ()) for q, r in
               zip(questions, requests)]
    notes = []
    reference_tok = _tokenizer_digest(tokenizer_dir) if tokenizer_dir is not None else None
    for label, spec in specs[1:]:
        if isinstance(spec, Path) and _tokenizer_digest(spec) not in (None, reference_tok):
            notes.append(f"{label}: its tokenizer.json differs from the one the prompts were tokenized with "
                         f"({tokenizer_dir})")
    token_ids = tokenizer is not None
    letter_forms = [tok.decode([i]) for i in letter_ids] if token_ids and letter_ids else list(LETTERS)
    if endpoints and not token_ids and any(r.truncated for r in requests):
        notes.append("prompts too long for the context were sent whole (as text) to the served models")
    cache = AnswerCache(Path(out) / CACHE_FILE if out is not None else None) if endpoints else None

    say(f"ceval: {len(questions)} questions, {len(ceval.items)} subjects, split {split}, {shots}-shot, "
        f"{len(specs)} model(s)")
    runs = []
    for label, spec in specs:
        if isinstance(spec, Endpoint):
            say(f"ceval: {label}: {spec.url}, served model {spec.model!r}, {options.scoring} scoring, prompts as "
                f"{'token ids' if token_ids else 'text'}, {options.concurrency} request(s) in flight")
            run = score_endpoint(spec, questions, requests, prompts, options, cache, label,
                                 letter_forms=letter_forms, letter_ids=letter_ids, token_ids=token_ids,
                                 progress=progress)
            notes += endpoint_notes(label, run.details)
        else:
            if tok is None:
                raise CEvalError(f"{spec}: no tokenizer to build its prompts")
            net = load_model(spec)
            run = evaluate_network(net, tok, ceval, shots, loaded.bos_id, pad_id=pad_id, max_len=max_len,
                                   label=label, path=str(spec), batch_tokens=batch_tokens, progress=progress,
                                   requests=requests, letter_ids=letter_ids, share_prefix=share_prefix)
            del net
        say(f"ceval: {label}: {run.summary()['overall']:.2f} points (mean over subjects) in {run.seconds:.1f}s")
        runs.append(run)
    if cache is not None:
        cache.close()

    overlaps = {}
    for label, spec in specs[1:]:
        provenance = (calibration_overrides or {}).get(label)
        if provenance is None and isinstance(spec, Path):
            provenance = calibration_of(spec)
        overlaps[label] = check_overlap(provenance, ceval, tokenizer=tok,
                                        base=spec if isinstance(spec, Path) else None)
        if isinstance(spec, Endpoint) and overlaps[label]["status"] == "none":
            overlaps[label]["notes"] = ["a served model: no calibration provenance to check"]
    report = build_report(ceval, runs, requests, shots=shots, limit=limit, max_len=max_len,
                          bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence, overlaps=overlaps,
                          notes=notes, letter_ids=letter_ids)
    report.update(extra or {})
    if allowed_drop is not None:
        gate_report(report, allowed_drop, gate, overlap_fails=overlap == "fail")
    report["settings"]["shared_prefix"] = share_prefix
    report["settings"]["tokenizer"] = str(tokenizer_dir) if tokenizer_dir is not None else None
    if endpoints:
        report["settings"]["endpoint"] = options.as_dict()
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
