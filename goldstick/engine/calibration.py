"""Calibration data: text or pre-tokenized samples -> batches of token ids, with provenance.

Sources, in the order they are recognised:
  * a ``.jsonl`` file of ``{"text": ...}`` or pre-tokenized ``{"input_ids": [...]}`` lines;
  * a local ``datasets`` folder (``save_to_disk``) or a data file ``datasets`` can read (.json/.csv/.parquet/.txt);
  * a ``datasets`` hub name, only where the hub is reachable (it never is on the CI machines).

Text is tokenized with the model's own tokenizer, documents are shuffled with the seed, joined with BOS and cut
into ``samples`` windows of ``seq_len`` tokens (packing: no padding, every token counts). Pre-tokenized samples are
used as given (each truncated to ``seq_len``), so comparisons with other tools can use exactly the same tokens.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from goldstick.errors import GoldstickError
from goldstick.io.files import sha256_file

PACKAGE_CALIBRATION = Path(__file__).resolve().parents[2] / "calibration"
DEFAULT_CALIBRATION = "calibration/mixed-zh-en.jsonl"


class CalibrationError(GoldstickError, ValueError):
    pass


@dataclass
class CalibrationSet:
    batches: list[np.ndarray]  # int32 [batch, seq] each
    source: str
    sha256: str | None
    samples: int
    seq_len: int
    seed: int
    tokens: int
    pretokenized: bool
    notes: list[str] = field(default_factory=list)

    def provenance(self) -> dict:
        info = asdict(self)
        info.pop("batches")
        return info


def resolve_source(data: str | Path) -> Path | str:
    """A path as given, else relative to the project's shipped calibration folder, else a hub name."""
    path = Path(data).expanduser()
    if path.exists():
        return path
    shipped = PACKAGE_CALIBRATION.parent / data
    if shipped.exists():
        return shipped
    return str(data)


def portable_source(source: str | Path) -> str:
    """How a recipe names a calibration source so that ``resolve_source`` finds it again from any folder: a shipped
    file as ``calibration/NAME``, another local path absolute, a hub name as it is."""
    path = Path(source).expanduser()
    if not path.exists():
        return str(source)
    path = path.resolve()
    if path.is_relative_to(PACKAGE_CALIBRATION):
        return str(path.relative_to(PACKAGE_CALIBRATION.parent))
    return str(path)


def _read_jsonl(path: Path) -> tuple[list[str], list[list[int]]]:
    texts, ids = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not ({"text", "input_ids"} & set(record)):
                raise CalibrationError(f"{path}:{number}: expected an object with 'text' or 'input_ids'")
            if "input_ids" in record:
                value = record["input_ids"]
                if not isinstance(value, list) or not all(isinstance(t, int) for t in value) or not value:
                    raise CalibrationError(f"{path}:{number}: 'input_ids' must be a non-empty list of integers")
                ids.append(value)
            else:
                if not isinstance(record["text"], str):
                    raise CalibrationError(f"{path}:{number}: 'text' must be a string")
                texts.append(record["text"])
    if texts and ids:
        raise CalibrationError(f"{path}: mixes 'text' and 'input_ids' lines; use one kind per file")
    if not texts and not ids:
        raise CalibrationError(f"{path}: no samples")
    return texts, ids


def _read_with_datasets(source: Path | str) -> tuple[list[str], list[list[int]]]:
    import datasets

    try:
        if isinstance(source, Path) and source.is_dir():
            ds = datasets.load_from_disk(str(source))
        elif isinstance(source, Path):
            kind = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}.get(source.suffix)
            if kind is None:
                raise CalibrationError(f"{source}: unsupported calibration file type {source.suffix!r}")
            ds = datasets.load_dataset(kind, data_files=str(source), split="train")
        else:
            ds = datasets.load_dataset(source, split="train")
    except CalibrationError:
        raise
    except Exception as exc:  # datasets raises many types; one clear message is what the user needs
        raise CalibrationError(f"calibration data {str(source)!r} could not be loaded: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    if "input_ids" in ds.column_names:
        return [], [list(map(int, row)) for row in ds["input_ids"]]
    if "text" in ds.column_names:
        return [str(t) for t in ds["text"]], []
    raise CalibrationError(f"calibration data {str(source)!r} has no 'text' or 'input_ids' column "
                           f"(columns: {ds.column_names})")


def load_calibration(data: str | Path, tokenizer, samples: int, seq_len: int, seed: int = 0,
                     tokens_per_batch: int = 4096, bos_id: int | None = 0) -> CalibrationSet:
    """Token batches for calibration. ``tokenizer`` is a ``tokenizers.Tokenizer`` (used for text only).

    Samples are grouped into batches of about ``tokens_per_batch`` tokens: on CPU a forward pass costs mostly
    per-op overhead, so fewer, larger batches calibrate faster at the same result.
    """
    batch_size = max(1, tokens_per_batch // seq_len)
    if samples <= 0 or seq_len <= 1:
        raise CalibrationError(f"need samples > 0 and seq_len > 1, got samples={samples}, seq_len={seq_len}")
    source = resolve_source(data)
    notes = []
    if "ceval" in str(source).lower():
        warning = (f"calibrating on CEval data ({source}): CEval accuracy measured on the same questions will be "
                   "optimistic (Golden-Stick's R1 flow makes this mistake); evaluate on a different split")
        warnings.warn(warning, stacklevel=2)
        notes.append(warning)
    if isinstance(source, Path) and source.suffix == ".jsonl":
        texts, ids = _read_jsonl(source)
    else:
        texts, ids = _read_with_datasets(source)
    rng = np.random.RandomState(seed)
    if ids:
        chosen = [ids[i] for i in rng.permutation(len(ids))[:samples]]
        if len(chosen) < samples:
            notes.append(f"only {len(chosen)} pre-tokenized samples available, {samples} requested")
        rows = [np.asarray(row[:seq_len], dtype=np.int32) for row in chosen]
        # same-length rows batch together; others run alone (no padding needed)
        batches = []
        by_length: dict[int, list[np.ndarray]] = {}
        for row in rows:
            by_length.setdefault(len(row), []).append(row)
        for length in sorted(by_length):
            group = by_length[length]
            batches += [np.stack(group[i:i + batch_size]) for i in range(0, len(group), batch_size)]
    else:
        encoded = [enc.ids for enc in tokenizer.encode_batch(texts)]
        needed = samples * seq_len
        stream: list[int] = []
        epochs = 0
        while len(stream) < needed:
            epochs += 1
            for i in rng.permutation(len(encoded)):
                stream += ([bos_id] if bos_id is not None else []) + encoded[i]
            if epochs > 1000:
                raise CalibrationError(f"{source}: the texts hold no tokens")
        if epochs > 1:
            notes.append(f"the data holds fewer than {needed} tokens; documents repeat ({epochs} shuffled passes)")
        flat = np.asarray(stream[:needed], dtype=np.int32).reshape(samples, seq_len)
        batches = [flat[i:i + batch_size] for i in range(0, samples, batch_size)]
    tokens = int(sum(b.size for b in batches))
    digest = sha256_file(source) if isinstance(source, Path) and source.is_file() else None
    return CalibrationSet(batches=batches, source=str(source), sha256=digest, samples=int(sum(len(b) for b in batches)),
                          seq_len=seq_len, seed=seed, tokens=tokens, pretokenized=bool(ids), notes=notes)
