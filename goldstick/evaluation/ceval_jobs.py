"""C-Eval regression jobs: a YAML file naming what to compare and how much accuracy may be lost.

``goldstick ceval eval/JOB.yaml`` quantizes first when the job names a recipe, evaluates the float model and the
quantized one(s) on the same C-Eval questions, writes the report (``ceval.json``, ``ceval.md``, plots) and exits

    0  every quantized model passes the gate
    3  at least one fails (the drop exceeds ``allowed_drop``, or its confidence interval says so: see ``gate``)
    2  bad input (bad job file, missing data or model; one line naming the file, key or line)

The keys (eval/README.md has the full description; unknown keys are an error):

    name: default-model-w8a8-mixed
    model: default                      # float checkpoint folder, "default" (the embedded tiny model) or a URL
    recipe: deepseek-r1-w8a8-mixed      # quantize first (a name, a YAML path, or a list); and/or
    quantized: path/to/checkpoint       # existing quantized checkpoint(s) or endpoint URLs: a path or URL, a list,
                                        # or {label: path or URL}
    tokenizer: null                     # a folder with tokenizer.json: endpoints get token ids (else text)
    endpoint: {scoring: logprobs, letter_fallback: none, concurrency: 8, timeout: 600, retries: 5}
    calibration: {data: null, samples: 32, seq_len: 128, seed: 0}   # for `recipe`; null = the recipe's own
    data: ${GOLDSTICK_CEVAL_DIR:-../tests/fixtures/ceval}           # ${VAR} and ${VAR:-default} are expanded
    split: val
    shots: 0                            # 0..5
    subjects: all                       # all, or a list / comma string of handles, categories, "hard"
    limit: null                         # first N questions per subject
    allowed_drop: 2.0                   # points, float minus quantized, mean over subjects
    gate: significant                   # point | significant | strict
    overlap: warn                       # warn | fail (fail the job when calibration overlaps the questions)
    bootstrap_samples: 2000
    confidence: 0.95
    seed: 0
    batch_tokens: 4096
    out: out/ceval/default-model-w8a8-mixed

Paths read by the job (model, quantized, recipe files, calibration data, data, tokenizer) are relative to the job
file's folder (endpoint URLs are taken as they are); ``out`` is relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from goldstick.engine.pipeline import quantize
from goldstick.evaluation.ceval_data import CEvalError
from goldstick.evaluation.ceval_report import print_summary
from goldstick.evaluation.ceval_run import parse_model_arg, resolve_model_dir, run_ceval
from goldstick.evaluation.endpoint import Endpoint, EndpointOptions, is_endpoint
from goldstick.quant.recipe import load_recipe

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
GATE_CHOICES = ("point", "significant", "strict")


class JobError(CEvalError):
    pass


@dataclass
class Job:
    name: str
    file: str | None = None
    model: str = "default"
    quantized: dict[str, str] = field(default_factory=dict)
    recipe: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    split: str = "val"
    shots: int = 0
    subjects: Any = "all"
    limit: int | None = None
    allowed_drop: float = 2.0
    gate: str = "significant"
    overlap: str = "warn"
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    seed: int = 0
    batch_tokens: int = 4096
    out: str | None = None
    tokenizer: str | None = None
    endpoint: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, **changes: Any) -> Job:
        if "quantized" in changes and isinstance(changes["quantized"], list):
            taken: set[str] = {"float"}
            pairs = {}
            for text in changes["quantized"]:
                label, path = parse_model_arg(text, taken)
                taken.add(label)
                pairs[label] = path
            changes["quantized"] = pairs
        job = dataclasses.replace(self, **changes)
        _validate(job, self.file or "<overrides>")
        return job

    def endpoint_options(self) -> EndpointOptions:
        return EndpointOptions(**self.endpoint).check()

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"out/ceval/{self.name}")


def expand_env(text: str, where: str) -> str:
    def sub(match: re.Match) -> str:
        var, default = match.group(1), match.group(2)
        value = os.environ.get(var)
        if value:
            return value
        if default is not None:
            return default
        raise JobError(f"{where}: environment variable {var} is not set and has no default (write ${{{var}:-...}})")

    return _ENV.sub(sub, text)


_KEYS = {f.name for f in dataclasses.fields(Job)} - {"file"}
_ENDPOINT_KEYS = tuple(f.name for f in dataclasses.fields(EndpointOptions))


def load_job(path: str | Path) -> Job:
    path = Path(path)
    if not path.exists():
        raise JobError(f"job file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise JobError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise JobError(f"{path}: a job file is a mapping of keys ({', '.join(sorted(_KEYS))})")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise JobError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    base = path.resolve().parent

    def local(value: Any, key: str) -> str:
        text = expand_env(str(value), f"{path}: {key}")
        if (text == "default" and key == "model") or "://" in text:  # the embedded model, or an endpoint URL
            return text
        p = Path(text).expanduser()
        if p.is_absolute() or text.startswith("hub:") or text == "ceval/ceval-exam":
            return text
        return str(base / p)

    job = Job(name=str(raw.get("name") or path.stem), file=str(path))
    if "model" in raw:
        job.model = local(raw["model"], "model") if raw["model"] is not None else "default"
    quantized = raw.get("quantized") or {}
    if isinstance(quantized, (str, Path)):
        quantized = [quantized]
    if isinstance(quantized, list):
        pairs, taken = {}, {"float"}
        for item in quantized:
            resolved = local(item, "quantized")
            base = Endpoint.parse(resolved).label if is_endpoint(resolved) else Path(resolved).name
            label, n = base, 2
            while label in taken:
                label, n = f"{base}-{n}", n + 1
            taken.add(label)
            pairs[label] = resolved
        quantized = pairs
    elif isinstance(quantized, dict):
        quantized = {str(k): local(v, f"quantized.{k}") for k, v in quantized.items()}
    else:
        raise JobError(f"{path}: quantized: a path, a list of paths or a mapping label -> path")
    job.quantized = quantized
    recipes = raw.get("recipe") or []
    recipes = [recipes] if isinstance(recipes, str) else recipes
    if not isinstance(recipes, list):
        raise JobError(f"{path}: recipe: a recipe name or path, or a list of them")
    job.recipe = [str(r) if not str(r).endswith((".yaml", ".yml")) else local(r, "recipe") for r in recipes]
    calibration = raw.get("calibration") or {}
    if not isinstance(calibration, dict) or set(calibration) - {"data", "samples", "seq_len", "seed"}:
        raise JobError(f"{path}: calibration: a mapping with data, samples, seq_len, seed")
    if calibration.get("data"):
        calibration["data"] = local(calibration["data"], "calibration.data")
    job.calibration = calibration
    if raw.get("data") is not None:
        job.data = local(raw["data"], "data")
    if raw.get("tokenizer") is not None:
        job.tokenizer = local(raw["tokenizer"], "tokenizer")
    endpoint = raw.get("endpoint") or {}
    if not isinstance(endpoint, dict):
        raise JobError(f"{path}: endpoint: a mapping of {', '.join(_ENDPOINT_KEYS)}")
    job.endpoint = dict(endpoint)
    for key in ("split", "shots", "subjects", "limit", "allowed_drop", "gate", "overlap", "bootstrap_samples",
                "confidence", "seed", "batch_tokens"):
        if key in raw and raw[key] is not None:
            setattr(job, key, raw[key])
    if raw.get("out") is not None:
        job.out = expand_env(str(raw["out"]), f"{path}: out")
    _validate(job, str(path))
    return job


def _validate(job: Job, where: str) -> None:
    def bad(key: str, why: str) -> JobError:
        return JobError(f"{where}: {key}: {why}")

    if job.split not in ("dev", "val", "test"):
        raise bad("split", f"{job.split!r} is not dev, val or test")
    if not isinstance(job.shots, int) or not 0 <= job.shots <= 5:
        raise bad("shots", f"{job.shots!r} is not an integer from 0 to 5")
    if job.limit is not None and (not isinstance(job.limit, int) or job.limit <= 0):
        raise bad("limit", f"{job.limit!r} is not a positive integer")
    if isinstance(job.allowed_drop, bool) or not isinstance(job.allowed_drop, (int, float)) or job.allowed_drop < 0:
        raise bad("allowed_drop", f"{job.allowed_drop!r} is not a non-negative number of points")
    job.allowed_drop = float(job.allowed_drop)
    if job.gate not in GATE_CHOICES:
        raise bad("gate", f"{job.gate!r} is not one of {', '.join(GATE_CHOICES)}")
    if job.overlap not in ("warn", "fail"):
        raise bad("overlap", f"{job.overlap!r} is not warn or fail")
    if not isinstance(job.bootstrap_samples, int) or job.bootstrap_samples < 1:
        raise bad("bootstrap_samples", f"{job.bootstrap_samples!r} is not a positive integer")
    if not isinstance(job.confidence, (int, float)) or not 0 < job.confidence < 1:
        raise bad("confidence", f"{job.confidence!r} is not in (0, 1)")
    if not isinstance(job.subjects, (str, list)):
        raise bad("subjects", "'all', a comma-separated string or a list")
    if not job.quantized and not job.recipe:
        raise bad("quantized/recipe", "the job names no quantized checkpoint and no recipe to quantize with")
    if job.recipe and is_endpoint(job.model):
        raise bad("recipe", "quantizing needs the float model as a checkpoint folder, not an endpoint URL")
    unknown = sorted(set(job.endpoint) - set(_ENDPOINT_KEYS))
    if unknown:
        raise bad("endpoint", f"unknown key(s) {', '.join(unknown)} (known: {', '.join(_ENDPOINT_KEYS)})")
    try:
        job.endpoint_options()
    except CEvalError as exc:
        raise bad("endpoint", str(exc)) from None


def quantize_for_job(job: Job, recipe: str, progress: bool) -> tuple[str, Path]:
    """Quantize the job's float model with ``recipe`` into ``out/quantized/<recipe name>`` (fresh each run)."""
    rec = load_recipe(recipe)
    target = job.out_dir / "quantized" / rec.name
    if target.exists():
        shutil.rmtree(target)
    cal = job.calibration
    started = time.time()
    print(f"ceval job {job.name}: quantizing with {rec.name} -> {target}", file=sys.stderr)
    quantize(resolve_model_dir(job.model), rec, out=target, calibration=cal.get("data"),
             calib_samples=cal.get("samples"), calib_seq_len=cal.get("seq_len"), calib_seed=cal.get("seed"),
             progress=progress)
    print(f"ceval job {job.name}: quantized in {time.time() - started:.1f}s", file=sys.stderr)
    return rec.name, target


def run_job(job: Job, progress: bool = True, plots: bool = True) -> int:
    """Run a job; returns the exit code (0 pass, 3 gate failed)."""
    data = job.data or os.environ.get("GOLDSTICK_CEVAL_DIR")
    if not data:
        raise JobError(f"{job.file}: no data (set 'data' in the job or GOLDSTICK_CEVAL_DIR)")
    started = time.time()
    candidates = list(job.quantized.items())
    quantize_seconds = {}
    for recipe in job.recipe:
        t0 = time.time()
        label, path = quantize_for_job(job, recipe, progress)
        if label in job.quantized or label == "float":
            label = f"recipe-{label}"
        quantize_seconds[label] = round(time.time() - t0, 1)
        candidates.append((label, str(path)))
    extra = {"job": {"name": job.name, "file": job.file, "model": job.model, "recipes": job.recipe,
                     "tokenizer": job.tokenizer, "endpoint": job.endpoint,
                     "calibration": job.calibration, "quantize_seconds": quantize_seconds}}
    report = run_ceval(job.model, candidates, data=data, split=job.split, shots=job.shots, subjects=job.subjects,
                       limit=job.limit, out=job.out_dir, batch_tokens=job.batch_tokens,
                       bootstrap_samples=job.bootstrap_samples, seed=job.seed, confidence=job.confidence,
                       progress=progress, plots=plots, allowed_drop=job.allowed_drop, gate=job.gate,
                       overlap=job.overlap, extra=extra, tokenizer=job.tokenizer,
                       endpoint_options=job.endpoint_options())
    print_summary(report, job.out_dir)
    print(f"job {job.name}: {time.time() - started:.1f}s", file=sys.stderr)
    return 0 if report["gate"]["passed"] else 3
