"""``goldstick verify DIR``: check a quantized checkpoint written by goldstick before trusting it.

    report = goldstick.verify("out/quantized")     # -> VerifyReport; report.ok, report.problems
    report.raise_if_failed()                        # VerifyError listing every problem

Checks, each problem collected (not just the first):

* files: every file's size and sha256 against ``manifest.json``; files the manifest lists that are missing, and
  files present that it does not list;
* tensors: the index lists every tensor of every shard and nothing else; every shard header is well formed (byte
  ranges inside the file, not overlapping, sizes matching dtype x shape);
* layout: each tensor has the dtype and shape its description implies, from ``config.json``:
  mindspore (``quantization_description.json``) W8A8 ``weight`` int8 [out,in], ``deq_scale`` f32 [out],
  ``quant_bias`` int32 [out], ``input_scale`` bf16 [in], ``input_offset`` int8 [in] (optional ``beta`` bf16 [in]);
  W8A8_DYNAMIC / W8A16 ``weight`` int8 [out,in], ``weight_scale`` bf16 [out], ``weight_offset`` int32 [out];
  FLOAT tensors bf16 (the router's ``e_score_correction_bias`` f32) with the config's shape. compressed-tensors
  (``quantization_config`` in config.json): int-quantized ``weight`` int8 [out,in], ``weight_scale`` bf16 [out,1]
  (+ ``input_scale`` bf16 [1], ``input_zero_point`` int8 [1] when static), pack-quantized ``weight_packed``
  int32 [out,ceil(in/4)], ``weight_shape`` int64 [2], ``weight_scale`` bf16 [out,1];
* the description covers every tensor and describes nothing that is not stored; every linear of config.json is
  there (quantized or float);
* every scale (deq_scale, input_scale, weight_scale) is finite and > 0.

The module is not called ``verify.py``: a submodule of that name would shadow the function ``goldstick.verify``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from goldstick.errors import GoldstickError
from goldstick.io.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    TensorInfo,
    expected_shapes,
    read_safetensors_header,
)
from goldstick.io.export import (
    COMPRESSED_TENSORS,
    DESCRIPTION_FILES,
    DESCRIPTION_METADATA,
    ExportError,
    ct_groups,
    ct_scheme_of,
    detect_format,
)
from goldstick.io.files import sha256_file
from goldstick.io.layouts import linear_layout
from goldstick.model.architecture import layer_of
from goldstick.model.config import ConfigError, ModelConfig
from goldstick.quant.numerics import STORED_DTYPES
from goldstick.quant.schemes import FLOAT, FLOAT_LABEL, LABEL_TO_SCHEME, SCHEMES

MANIFEST = "manifest.json"
_SCALES = ("deq_scale", "input_scale", "weight_scale")


class VerifyError(GoldstickError, ValueError):
    """A checkpoint that fails verification; the message lists every problem found."""


@dataclass
class VerifyReport:
    path: Path
    format: str | None = None
    files: int = 0            # files checked against the manifest
    bytes_hashed: int = 0
    tensors: int = 0          # tensors whose dtype and shape were checked
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (f"{self.path}: {self.format or 'unknown format'}, {self.files} files "
                f"({self.bytes_hashed / 1e6:.1f} MB hashed), {self.tensors} tensors checked")
        if self.ok:
            return f"{head}: OK"
        lines = [f"{head}: {len(self.problems)} problem(s)"]
        return "\n".join(lines + [f"  - {p}" for p in self.problems])

    def raise_if_failed(self) -> VerifyReport:
        if self.problems:
            raise VerifyError(self.summary())
        return self


def verify(path: str | Path, hashes: bool = True) -> VerifyReport:
    """Check a goldstick quantized checkpoint folder; see the module docstring. ``hashes=False`` skips the sha256
    (sizes are still compared), for a quick check of a huge checkpoint."""
    path = Path(path)
    report = VerifyReport(path)
    if not path.is_dir():
        report.problems.append(f"{path}: not a folder")
        return report
    _check_manifest(path, report, hashes)
    tensors = _check_index(path, report)
    try:
        config = ModelConfig.from_file(path)
    except ConfigError as exc:
        report.problems.append(str(exc))
        return report
    raw_config = json.loads((path / "config.json").read_text())
    qc = raw_config.get("quantization_config") or {}
    fmt = detect_format(path)
    if fmt is not None and fmt != COMPRESSED_TENSORS:
        report.format = fmt
        expected = _described_layout(path, config, tensors, report, fmt)
    elif qc.get("quant_method") == COMPRESSED_TENSORS:
        report.format = COMPRESSED_TENSORS
        expected = _compressed_tensors_layout(config, qc, tensors, report)
    else:
        report.problems.append(f"{path}: not a quantized goldstick checkpoint (no "
                               f"{' or '.join(sorted(set(DESCRIPTION_FILES.values())))} and no "
                               "compressed-tensors quantization_config in config.json)")
        return report
    if expected is not None:
        _check_tensors(path, config, tensors, expected, report)
    return report


# ---- files ----------------------------------------------------------------------------------------------------
def _check_manifest(path: Path, report: VerifyReport, hashes: bool) -> None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError
    except FileNotFoundError:
        report.problems.append(f"{MANIFEST}: missing (goldstick writes it last: the run did not finish)")
        return
    except (OSError, ValueError, KeyError, TypeError):
        report.problems.append(f"{MANIFEST}: not a JSON object with a 'files' mapping")
        return
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    for name in sorted(set(listed) - present):
        report.problems.append(f"{name}: listed in {MANIFEST} but missing")
    for name in sorted(present - set(listed)):
        report.problems.append(f"{name}: present but not listed in {MANIFEST}")
    for name in sorted(set(listed) & present):
        entry, file = listed[name], path / name
        want_bytes = entry.get("bytes") if isinstance(entry, dict) else None
        want_sha = entry.get("sha256") if isinstance(entry, dict) else None
        report.files += 1
        size = file.stat().st_size
        if want_bytes is not None and size != want_bytes:
            report.problems.append(f"{name}: {size} bytes, {MANIFEST} says {want_bytes}")
            continue
        if hashes:
            report.bytes_hashed += size
            if sha256_file(file) != want_sha:
                report.problems.append(f"{name}: sha256 differs from {MANIFEST} (the file was changed or damaged)")


# ---- index and headers ----------------------------------------------------------------------------------------
def _check_index(path: Path, report: VerifyReport) -> dict[str, TensorInfo]:
    """name -> TensorInfo of every tensor both the index and its shard's header hold."""
    try:
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise TypeError
    except FileNotFoundError:
        report.problems.append(f"{INDEX_FILE}: missing")
        return {}
    except (OSError, ValueError, KeyError, TypeError):
        report.problems.append(f"{INDEX_FILE}: not a JSON object with a 'weight_map' of tensor -> file")
        return {}
    tensors: dict[str, TensorInfo] = {}
    for file in sorted(set(weight_map.values())):
        if not (path / file).is_file():
            report.problems.append(f"{file}: shard named by {INDEX_FILE} is missing")
            continue
        try:
            header = read_safetensors_header(path, file)
        except CheckpointError as exc:
            report.problems.append(str(exc))
            continue
        for name, info in header.items():
            if weight_map.get(name) != file:
                report.problems.append(f"{file}: tensor '{name}' is in the shard but {INDEX_FILE} "
                                       + (f"places it in {weight_map[name]}" if name in weight_map else "omits it"))
            else:
                tensors[name] = info
        for name in sorted(n for n, f in weight_map.items() if f == file and n not in header):
            report.problems.append(f"{file}: tensor '{name}' is listed in {INDEX_FILE} but absent from the shard")
    return tensors


# ---- expected layout ------------------------------------------------------------------------------------------
def _float_dtype(name: str) -> str:
    return "F32" if name.endswith("e_score_correction_bias") else "BF16"


def _float_shapes(config: ModelConfig, tensors: dict[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    """Shapes of the float tensors config.json implies, MTP layers only when stored (goldstick passes them on)."""
    stored_layers = {layer_of(n) for n in tensors} - {None}
    shapes = {}
    for name, shape in expected_shapes(config).items():
        layer = layer_of(name)
        if layer is not None and layer >= config.num_hidden_layers and layer not in stored_layers:
            continue
        shapes[name] = shape
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def _linear_dims(config: ModelConfig, shapes: dict, owner: str) -> tuple[int, int] | None:
    shape = shapes.get(f"{owner}.weight")
    return (shape[0], shape[1]) if shape is not None and len(shape) == 2 else None


def _described_layout(path: Path, config: ModelConfig, tensors: dict[str, TensorInfo],
                      report: VerifyReport, fmt: str) -> dict[str, tuple[str, tuple]] | None:
    """name -> (dtype, shape) each described tensor must have; description/index mismatches go to the report."""
    desc = DESCRIPTION_FILES[fmt]  # the description file, named in messages
    try:
        labels = json.loads((path / desc).read_text())
        if not isinstance(labels, dict):
            raise TypeError
        labels = {k: v for k, v in labels.items() if k not in DESCRIPTION_METADATA}
        if not all(isinstance(v, str) for v in labels.values()):
            raise TypeError
    except (OSError, ValueError, TypeError):
        report.problems.append(f"{desc}: not a JSON object of tensor name -> label")
        return None
    for name in sorted(set(tensors) - set(labels)):
        report.problems.append(f"{desc}: no entry for tensor '{name}' (in {tensors[name].file})")
    for name in sorted(set(labels) - set(tensors)):
        report.problems.append(f"{desc}: describes '{name}', which no shard holds")
    shapes = _float_shapes(config, tensors)
    expected: dict[str, tuple[str, tuple]] = {}
    owners: dict[str, str] = {}
    for name, label in labels.items():
        if name not in tensors:
            continue  # reported above
        if label == FLOAT_LABEL:
            if name in shapes:
                expected[name] = (_float_dtype(name), shapes[name])
            elif name.endswith("layernorm.bias") and name[:-4] + "weight" in shapes:  # an OS+ shift, folded
                expected[name] = ("BF16", shapes[name[:-4] + "weight"])
            else:
                report.problems.append(f"{desc}: '{name}' (FLOAT) is no tensor config.json implies")
            continue
        if label not in LABEL_TO_SCHEME:
            report.problems.append(f"{desc}: '{name}' has label {label!r}, not one of {FLOAT_LABEL}, "
                                   f"{', '.join(LABEL_TO_SCHEME)}")
            continue
        owner = name.rpartition(".")[0]
        if owners.setdefault(owner, label) != label:
            report.problems.append(f"{desc}: the tensors of '{owner}' carry different labels "
                                   f"({owners[owner]}, {label})")
    for owner, label in sorted(owners.items()):
        dims = _linear_dims(config, shapes, owner)
        if dims is None or owner not in set(config.linear_names()):
            report.problems.append(f"{desc}: '{owner}' is labelled {label} but is no linear of the "
                                   "main network in config.json")
            continue
        required, optional = linear_layout(fmt, label, *dims)
        described = {n.rpartition(".")[2] for n in labels if n.rpartition(".")[0] == owner}
        for local in sorted(set(required) - described):
            report.problems.append(f"'{owner}.{local}': missing; a {label} linear needs "
                                   f"{', '.join(sorted(required))}")
        for local in sorted(described - set(required) - set(optional)):
            report.problems.append(f"'{owner}.{local}': a {label} linear has no such tensor")
        for local, spec in {**required, **optional}.items():
            if local in described and f"{owner}.{local}" in tensors:
                expected[f"{owner}.{local}"] = spec
    _check_linears_covered(config, {n for n in expected}, report, desc)
    return expected


def _compressed_tensors_layout(config: ModelConfig, qc: dict, tensors: dict[str, TensorInfo],
                               report: VerifyReport) -> dict[str, tuple[str, tuple]] | None:
    try:
        groups = ct_groups(qc)
    except (ExportError, AttributeError, TypeError) as exc:
        report.problems.append(f"config.json: quantization_config: {exc}")
        return None
    ignore = list(qc.get("ignore") or [])
    linears = set(config.linear_names())
    shapes = _float_shapes(config, tensors)
    expected: dict[str, tuple[str, tuple]] = {}
    for name, shape in shapes.items():
        owner = name[: -len(".weight")] if name.endswith(".weight") else None
        scheme = ct_scheme_of(owner, groups, ignore) if owner in linears else FLOAT
        if scheme == FLOAT:
            expected[name] = (_float_dtype(name), shape)
            continue
        locals_ = SCHEMES[scheme].compressed_tensors.layout(*shape)
        expected.update({f"{owner}.{k}": v for k, v in locals_.items()})
    for name in sorted(set(tensors) - set(expected)):
        report.problems.append(f"{tensors[name].file}: tensor '{name}' is not described by config.json's "
                               "quantization_config and model shape")
    return expected


def _check_linears_covered(config: ModelConfig, expected: set[str], report: VerifyReport,
                           description_file: str) -> None:
    for owner in config.linear_names():
        if owner == "lm_head" and config.tie_word_embeddings:
            continue
        if f"{owner}.weight" not in expected:
            report.problems.append(f"{description_file}: linear '{owner}' of config.json has no weight")


# ---- tensors --------------------------------------------------------------------------------------------------
def _check_tensors(path: Path, config: ModelConfig, tensors: dict[str, TensorInfo],
                   expected: dict[str, tuple[str, tuple]], report: VerifyReport) -> None:
    for name, (dtype, shape) in expected.items():
        info = tensors.get(name)
        if info is None:
            report.problems.append(f"tensor '{name}': missing (config.json and the quantization_config imply it)")
            continue
        report.tensors += 1
        if info.dtype != dtype or info.shape != tuple(shape):
            report.problems.append(f"{info.file}: tensor '{name}' is {info.dtype} {list(info.shape)}, its description "
                                   f"implies {dtype} {list(shape)}")
            continue
        if name.rpartition(".")[2] in _SCALES:
            problem = _scale_problem(path, info, name)
            if problem:
                report.problems.append(problem)


def _scale_problem(path: Path, info: TensorInfo, name: str) -> str | None:
    dtype = STORED_DTYPES[info.dtype]
    with open(path / info.file, "rb") as f:
        f.seek(info.start)
        values = np.frombuffer(f.read(info.end - info.start), dtype=dtype).astype(np.float32)
    bad = ~(np.isfinite(values) & (values > 0))
    if not bad.any():
        return None
    first = int(np.argmax(bad))
    return (f"{info.file}: scale '{name}' has {int(bad.sum())} value(s) that are not finite and > 0 "
            f"(the first, at {first}, is {values[first]!r})")


# ---- command line ---------------------------------------------------------------------------------------------
def add_verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="check a quantized checkpoint: hashes, tensors, description, scales",
                       description="Check a quantized goldstick checkpoint (mindspore or compressed-tensors): every "
                                   "file's sha256 against manifest.json, every tensor's dtype and shape against "
                                   "its description and config.json, the description covering every tensor, "
                                   "every scale finite and positive. Exit 0 when it passes, 2 listing every "
                                   "problem otherwise.")
    p.add_argument("path", help="quantized checkpoint folder")
    p.add_argument("--no-hash", action="store_true", help="compare file sizes only, skip the sha256")
    p.set_defaults(func=run_verify)


def run_verify(args) -> int:
    report = verify(args.path, hashes=not args.no_hash)
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 2
