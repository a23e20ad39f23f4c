"""Writing and reading quantized checkpoints in every target layout (goldstick.io.layouts: which serving stack
loads which; goldstick.io.compressed_tensors: vLLM's).

Everything flows through the engine's stream: the engine produces it, a source reads a checkpoint back into it
(``open_source``: ascend / vllm-ascend / msModelSlim, golden-stick, mindspore, compressed-tensors), and
``CheckpointWriter`` writes it out in one target. A stream item is ``(name, label, value)``: a float tensor
``(name, "FLOAT", array)`` or a quantized linear ``(linear, "W8A8"|..., {local name: array})``, in layer order, one
layer in memory at a time. Static linears come in the per-tensor form (``input_scale`` [1]) when calibrated for an
ascend target, else in the per-channel form (``input_scale`` [in]).

A target refuses what its stack could not apply with one error naming every offending layer and why
(``layouts.REFUSALS``, ``compressed_tensors.CT_REFUSALS``), listing the shipped recipes that do export
(``exportable_recipes``); nothing is left half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from goldstick.errors import GoldstickError
from goldstick.io.checkpoint import CheckpointError, CheckpointReader
from goldstick.io.compressed_tensors import (  # noqa: F401  (re-exported: the compressed-tensors API)
    CT_REFUSALS,
    CT_VERSION,
    ct_group_scheme,
    ct_groups,
    ct_match,
    ct_plan_problems,
    ct_quantization_config,
    ct_scheme_of,
    ct_targets,
    ct_to_mindspore,
    mindspore_to_ct,
    pack_int8,
    unpack_int8,
)
from goldstick.io.files import sha256_file
from goldstick.io.layouts import (  # noqa: F401  (re-exported)
    ASCEND,
    ASCEND_DESCRIPTION_FILE,
    BF16,
    COMPRESSED_TENSORS,
    DESCRIPTION_FILE,
    DESCRIPTION_FILES,
    DESCRIPTION_METADATA,
    FORMATS,
    GOLDEN_STICK,
    MINDSPORE,
    PER_TENSOR_FORMATS,
    QUANT_METHODS,
    REFUSALS,
    STACKS,
    VLLM_ASCEND,
    ExportError,
    float_problems,
    float_rows,
    from_layout,
    layout_plan_problems,
    to_layout,
)
from goldstick.io.rundir import write_manifest  # noqa: F401  (re-exported: one manifest rule for every writer)
from goldstick.io.writer import ShardedWriter, write_json_atomic
from goldstick.model.architecture import fused_groups, layer_of
from goldstick.model.config import ModelConfig
from goldstick.model.names import summarize_names
from goldstick.quant.recipe import RecipeError, load_recipe, shipped_recipes
from goldstick.quant.schemes import FLOAT, FLOAT_LABEL, LABEL_TO_SCHEME, SCHEME_TO_LABEL

# files copied from the source model / checkpoint when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
PROVENANCE_FILES = ("recipe.yaml", "report.json", "report.md")


# ------------------------------------------------------------------------------------------------ small helpers
def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def refusal_message(problems: dict[str, list[str]], what: str, cfg: ModelConfig, fmt: str = COMPRESSED_TENSORS) -> str:
    reasons = CT_REFUSALS if fmt == COMPRESSED_TENSORS else REFUSALS
    lines = [f"{what} cannot be written as {fmt} ({STACKS[fmt]} could not apply it):"]
    for key in reasons:
        if problems.get(key):
            lines.append(f"  - {reasons[key]}: {summarize_names(problems[key])}")
    exportable = exportable_recipes(cfg, fmt)
    lines.append(f"Shipped recipes that export for this model: {', '.join(exportable) or 'none'}; "
                 "or choose another --format.")
    return "\n".join(lines)


def exportable_recipes(cfg: ModelConfig, fmt: str = COMPRESSED_TENSORS) -> list[str]:
    """The shipped recipes whose plan for ``cfg`` the target ``fmt`` can hold (read from the recipes themselves)."""
    names = []
    for name in shipped_recipes():
        try:
            plan = load_recipe(name).plan(cfg)
        except GoldstickError:
            continue  # a recipe whose rules do not fit this model
        if not plan_problems(cfg, plan, fmt):
            names.append(name)
    return names


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_side_files(src: Path, out: Path, names=TOKENIZER_FILES) -> None:
    for name in names:
        if (Path(src) / name).exists():
            copy_atomic(Path(src) / name, Path(out) / name)


# ------------------------------------------------------------------------------------------------ plan-level check
def plan_problems(cfg: ModelConfig, plan, fmt: str = COMPRESSED_TENSORS) -> dict[str, list[str]]:
    """What of ``plan``'s result the target ``fmt`` cannot hold: refusal key -> names (mindspore holds all)."""
    if fmt == MINDSPORE:
        return {}
    if fmt == COMPRESSED_TENSORS:
        return ct_plan_problems(cfg, plan)
    return layout_plan_problems(cfg, plan, fmt)


def default_format(cfg: ModelConfig, plan) -> str:
    """The target ``goldstick quantize`` writes when none is named: ``ascend`` (MindFormers / vllm-mindspore, the
    stack that applies every OS+ shift) when it can hold the plan, else ``vllm-ascend`` (which also serves W8A16),
    else ``mindspore``, goldstick's own layout (for recipes no Ascend stack serves, such as static int8 experts)."""
    for fmt in (ASCEND, VLLM_ASCEND):
        if not plan_problems(cfg, plan, fmt):
            return fmt
    return MINDSPORE


def check_plan(cfg: ModelConfig, plan, fmt: str) -> None:
    """Before calibrating: refuse a plan whose result ``fmt`` could not hold, naming the layers."""
    problems = plan_problems(cfg, plan, check_format(fmt))
    if problems:
        raise ExportError(refusal_message(problems, f"recipe {plan.recipe.name or '(unnamed)'}", cfg, fmt))


# ------------------------------------------------------------------------------------------------ sources
def quantization_config_of(path: str | Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def detect_format(path: str | Path) -> str | None:
    """The layout of a quantized checkpoint (goldstick.io.layouts), or None (a float checkpoint). A folder with
    ``quant_model_description.json`` is ascend (msModelSlim's output too) unless config.json says vllm-ascend; one
    with ``quantization_description.json`` is golden-stick when config.json says so, else goldstick's earlier
    mindspore layout."""
    path = Path(path)
    qc = quantization_config_of(path)
    if (path / ASCEND_DESCRIPTION_FILE).exists():
        return VLLM_ASCEND if qc.get("format") == VLLM_ASCEND else ASCEND
    if (path / DESCRIPTION_FILE).exists():
        return GOLDEN_STICK if qc.get("format") == GOLDEN_STICK else MINDSPORE
    return COMPRESSED_TENSORS if qc.get("quant_method") == COMPRESSED_TENSORS else None


def read_description(path: Path, fmt: str) -> dict[str, str]:
    """Tensor name -> label of a described checkpoint (msModelSlim's metadata keys left out)."""
    file = Path(path) / DESCRIPTION_FILES[fmt]
    try:
        labels = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not a readable JSON file ({exc})") from None
    if not isinstance(labels, dict):
        raise CheckpointError(f"{file}: not a JSON object of tensor name -> label")
    return {k: v for k, v in labels.items() if k not in DESCRIPTION_METADATA}


class DescribedSource:
    """A checkpoint whose description file labels every tensor (ascend, vllm-ascend, golden-stick, mindspore), as
    a stream of (name, label, value) in the engine's form (``layouts.from_layout``)."""

    def __init__(self, path: str | Path, fmt: str | None = None):
        self.path = Path(path)
        self.format = fmt or detect_format(self.path)
        self.reader = CheckpointReader(self.path)
        self.config = self.reader.config
        self.labels = read_description(self.path, self.format)
        self.description_file = DESCRIPTION_FILES[self.format]

    def entries(self, include_mtp: bool = True) -> Iterator[tuple[str, str, object]]:
        main = self.config.num_hidden_layers
        for _, names in _by_layer(self.reader.names(), main, include_mtp):
            owners: dict[str, dict] = defaultdict(dict)
            labels: dict[str, str] = {}
            for name in names:
                label = self.labels.get(name)
                if label is None:
                    raise CheckpointError(f"{self.description_file}: tensor '{name}' (in "
                                          f"{self.reader.file_of(name)}) has no label")
                linear_label = self.labels.get(name[: -len("bias")] + "weight", FLOAT_LABEL)
                if label == FLOAT_LABEL and name.endswith(".bias") and linear_label != FLOAT_LABEL:
                    if linear_label == "W8A8":
                        continue  # msModelSlim's copy of a float bias it folded into quant_bias (ascendv1.py:298-306)
                    raise ExportError(f"{name}: a float bias on a {linear_label} linear; goldstick's cells have none")
                if label == FLOAT_LABEL:
                    yield name, FLOAT_LABEL, float_rows(self.format, self.config, name, self.reader.read_raw(name),
                                                        inverse=True)
                else:
                    owner, _, local = name.rpartition(".")
                    owners[owner][local] = name
                    if labels.setdefault(owner, label) != label:
                        raise CheckpointError(f"{self.description_file}: tensors of linear '{owner}' carry different "
                                              f"labels ({labels[owner]}, {label})")
            for owner, locals_ in owners.items():
                tensors = {k: self.reader.read_raw(v) for k, v in locals_.items()}
                yield owner, labels[owner], from_layout(self.format, self.config, owner, labels[owner], tensors)


MindSporeSource = DescribedSource  # the earlier name


def _by_layer(names, main_layers: int, include_mtp: bool) -> Iterator[tuple[int | None, list[str]]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for name in names:
        layer = layer_of(name)
        if layer is not None and layer >= main_layers and not include_mtp:
            continue
        groups[-1 if layer is None else layer].append(name)
    for layer in sorted(groups):
        yield (None if layer < 0 else layer), sorted(groups[layer])


class _PackedAwareReader(CheckpointReader):
    """CheckpointReader that accepts pack-quantized linears (``weight_packed`` + ``weight_shape`` for ``weight``)."""

    def _check_against_config(self) -> None:
        full = self._expected
        packed = {n: s for n, s in full.items()
                  if n.endswith(".weight") and n not in self._tensors and f"{n}_packed" in self._tensors}
        self._expected = {n: s for n, s in full.items() if n not in packed}
        try:
            super()._check_against_config()
        finally:
            self._expected = full
        for name, (out_f, in_f) in packed.items():
            info, shape_info = self._tensors[f"{name}_packed"], self._tensors.get(f"{name}_shape")
            if info.dtype != "I32" or info.shape != (out_f, -(-in_f // 4)):
                raise CheckpointError(f"{info.file}: '{name}_packed' is {info.dtype} {info.shape}; 8-bit packing of "
                                      f"a [{out_f}, {in_f}] weight needs I32 {(out_f, -(-in_f // 4))}")
            if shape_info is None or shape_info.shape != (2,):
                raise CheckpointError(f"{info.file}: '{name}_packed' has no '{name}_shape' of shape (2,)")


class CompressedTensorsSource:
    """A compressed-tensors checkpoint written by goldstick, as a stream in the mindspore layout."""

    format = COMPRESSED_TENSORS

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = _PackedAwareReader(self.path)
        self.config = self.reader.config
        qc = self.config.quantization_config or {}
        if qc.get("quant_method") != COMPRESSED_TENSORS:
            raise ExportError(f"{self.path}: config.json has no compressed-tensors quantization_config")
        if qc.get("quantization_status", "compressed") != "compressed":
            raise ExportError(f"{self.path}: quantization_status is {qc.get('quantization_status')!r}; only "
                              "compressed checkpoints hold integer weights")
        self.groups = ct_groups(qc)
        self.ignore = list(qc.get("ignore") or [])
        self.linears = set(self.config.linear_names())

    def scheme_of(self, linear: str) -> str:
        """The scheme of a main-model linear: as vLLM decides, ignore first, then the first matching group."""
        return ct_scheme_of(linear, self.groups, self.ignore)

    def entries(self, include_mtp: bool = True) -> Iterator[tuple[str, str, object]]:
        main = self.config.num_hidden_layers
        for _, names in _by_layer(self.reader.names(), main, include_mtp):
            owners: dict[str, dict] = defaultdict(dict)
            for name in names:
                owner, _, local = name.rpartition(".")
                if owner in self.linears and self.scheme_of(owner) != FLOAT:
                    owners[owner][local] = name
                    continue
                if self.reader.dtype(name).startswith(("I", "U")):
                    raise ExportError(f"{name}: an integer tensor outside the quantized linears of the "
                                      "quantization_config (ignored, or in the MTP layer goldstick keeps float)")
                yield name, FLOAT_LABEL, self.reader.read_raw(name)
            for owner, locals_ in owners.items():
                scheme = self.scheme_of(owner)
                tensors = {k: self.reader.read_raw(v) for k, v in locals_.items()}
                yield owner, SCHEME_TO_LABEL[scheme], ct_to_mindspore(owner, scheme, tensors)


def open_source(path: str | Path):
    fmt = detect_format(path)
    if fmt == COMPRESSED_TENSORS:
        return CompressedTensorsSource(path)
    if fmt is not None:
        return DescribedSource(path, fmt)
    raise ExportError(f"{path}: not a quantized goldstick checkpoint (no {ASCEND_DESCRIPTION_FILE}, no "
                      f"{DESCRIPTION_FILE} and no compressed-tensors quantization_config in config.json)")


# ------------------------------------------------------------------------------------------------ the writer
class CheckpointWriter:
    """Writes the engine's stream in one target layout: shards + index, then ``write_config`` the metadata.

        w = CheckpointWriter(out, "ascend", cfg, max_shard_bytes)
        for name, label, value in stream: w.add(name, label, value)
        w.close()                       # shards and index; raises ExportError listing every refusal
        w.write_config(config_dict, recipe_name, counts)   # config.json (+ the description file)

    The first refusal stops the writing of tensors (the stream is still read to the end so that the error names
    every offending layer) and ``close`` removes the temporary shards.
    """

    def __init__(self, out: str | Path, fmt: str, cfg: ModelConfig, max_shard_bytes: int, shards=None):
        self.out, self.fmt, self.cfg = Path(out), check_format(fmt), cfg
        # ``shards``: another writer with ShardedWriter's add/close/abort (the streaming path's PlannedShardWriter)
        self.shards = shards if shards is not None else ShardedWriter(self.out, max_shard_bytes=max_shard_bytes,
                                                                      overwrite=True)
        self.labels: dict[str, str] = {}
        self.linears = set(cfg.linear_names())
        self.schemes: dict[str, str] = {}  # main-model linear -> scheme (FLOAT included)
        self.static: dict[str, tuple] = {}  # static linear -> its activation parameters (fused-module check)
        self.problems: dict[str, list[str]] = defaultdict(list)
        self.mtp_layers: set[int] = set()

    def add(self, name: str, label: str, value) -> None:
        if label == FLOAT_LABEL:
            self._add_float(name, np.asarray(value))
        else:
            self._add_linear(name, label, value)

    def _put(self, name: str, array: np.ndarray, label: str) -> None:
        if not self.problems:
            self.shards.add(name, array)
        self.labels[name] = label

    def _add_float(self, name: str, array: np.ndarray) -> None:
        layer = layer_of(name)
        main = layer is None or layer < self.cfg.num_hidden_layers
        if not main:
            self.mtp_layers.add(layer)
        owner = name.rpartition(".")[0]
        if name.endswith(".weight") and owner in self.linears:
            self.schemes[owner] = FLOAT
        if main and self.fmt == COMPRESSED_TENSORS and name.endswith(".bias") and "norm" in owner.rpartition(".")[2]:
            self.problems["norm-bias"].append(name)
        elif main:
            for key in float_problems(self.fmt, name):
                self.problems[key].append(name)
            array = float_rows(self.fmt, self.cfg, name, array)
        self._put(name, array, FLOAT_LABEL)

    def _add_linear(self, owner: str, label: str, tensors: dict) -> None:
        scheme = LABEL_TO_SCHEME.get(label)
        if scheme is None:
            raise ExportError(f"{owner}: quantization label {label!r} is not one of {sorted(LABEL_TO_SCHEME)}")
        if owner not in self.linears:
            raise ExportError(f"{owner}: quantized ({label}) but not a linear of the main network")
        self.schemes[owner] = scheme
        if self.fmt == COMPRESSED_TENSORS:
            scheme, converted, problems, static = mindspore_to_ct(owner, label, tensors)
        else:
            converted, problems = to_layout(self.fmt, self.cfg, owner, label, tensors)
            static = tuple(np.asarray(converted[k]).tobytes() for k in ("input_scale", "input_offset", "beta")
                           if k in converted) or None
        for key in problems:
            self.problems[key].append(owner)
        if static is not None:
            self.static[owner] = static
        for local in sorted(converted):
            self._put(f"{owner}.{local}", converted[local], label)

    def _check_fused(self) -> None:
        for layer in range(self.cfg.num_hidden_layers):
            for group in fused_groups(self.cfg, layer):
                kinds = {self.schemes.get(m) for m in group.linears}
                if group.key == "fused_moe":
                    if len(kinds) > 1:
                        self.problems["moe-mixed"] += list(group.linears)
                elif len(kinds) > 1 or len({self.static.get(m) for m in group.linears}) > 1:
                    self.problems["fused-mismatch"] += list(group.linears)

    def close(self, what: str = "this model") -> None:
        try:
            if self.fmt != MINDSPORE:
                self._check_fused()
            if self.problems:
                raise ExportError(refusal_message(self.problems, what, self.cfg, self.fmt))
            missing = self.linears - set(self.schemes)
            if self.cfg.tie_word_embeddings:
                missing.discard("lm_head")
            if missing:
                raise ExportError(f"linears absent from the stream: {summarize_names(missing)}")
            self.shards.close(metadata={"quantized_by": "goldstick", "format": self.fmt})
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.shards.abort()  # removes the temporary shards; harmless once closed

    def quantization_config(self, recipe_name: str | None, counts: dict) -> dict:
        if self.fmt == COMPRESSED_TENSORS:
            ordered = {n: self.schemes[n] for n in self.cfg.linear_names() if n in self.schemes}
            return ct_quantization_config(ordered, sorted(self.mtp_layers))
        return {"quant_method": QUANT_METHODS[self.fmt], "format": self.fmt, "producer": "goldstick",
                "description_file": DESCRIPTION_FILES[self.fmt], "recipe": recipe_name, "schemes": counts,
                "version": 1}

    def write_config(self, base: dict, recipe_name: str | None, counts: dict) -> None:
        """config.json (R1's FP8 block config replaced) and, but for compressed-tensors, the description file."""
        config = dict(base)
        config.pop("quantization_config", None)  # R1's FP8 block config no longer describes these weights
        config["torch_dtype"] = "bfloat16"
        config["quantization_config"] = self.quantization_config(recipe_name, counts)
        write_json_atomic(self.out / "config.json", config)
        if self.fmt != COMPRESSED_TENSORS:
            write_json_atomic(self.out / DESCRIPTION_FILES[self.fmt], dict(sorted(self.labels.items())))


def scheme_counts(schemes: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for s in schemes.values():
        counts[s] += 1
    return dict(counts)


# ------------------------------------------------------------------------------------------------ export command
def export_checkpoint(src: str | Path, out: str | Path, fmt: str,
                      max_shard_bytes: int = 4 << 30) -> Path:
    """Convert a goldstick checkpoint to the other format, tensor by tensor, without re-calibrating.

    The output folder must be new or empty. Refuses (ExportError) what the target format cannot hold.
    """
    src, out = Path(src), Path(out)
    check_format(fmt)
    source = open_source(src)
    if source.format == fmt:
        raise ExportError(f"{src} is already in the {fmt} format")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; choose a new folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    cfg = source.config
    writer = CheckpointWriter(out, fmt, cfg, max_shard_bytes)
    try:
        for name, label, value in source.entries():
            writer.add(name, label, value)
        writer.close(what=str(src))
    except BaseException:
        writer.abort()
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    recipe_name, counts = _recipe_counts(src / "recipe.yaml", cfg)
    writer.write_config(cfg.to_dict(), recipe_name, counts or scheme_counts(writer.schemes))
    copy_side_files(src, out, TOKENIZER_FILES + PROVENANCE_FILES)
    write_json_atomic(out / "export.json", {
        "source": str(src), "source_format": source.format, "format": fmt,
        "source_manifest_sha256": sha256_file(src / "manifest.json") if (src / "manifest.json").exists() else None,
    })
    write_manifest(out)
    return out


def _recipe_counts(path: Path, cfg: ModelConfig) -> tuple[str | None, dict | None]:
    """The recipe name and plan counts of a checkpoint's recipe.yaml (None, None when absent or unreadable)."""
    if not path.is_file():
        return None, None
    try:
        recipe = load_recipe(path)
        return recipe.name, recipe.plan(cfg).counts_by_label()
    except (RecipeError, OSError, ValueError):
        return None, None
