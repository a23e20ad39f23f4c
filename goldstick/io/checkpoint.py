"""Streaming reader of a HF DeepSeek-V3/R1 checkpoint: one ``model.safetensors`` or shards plus an index.

Opening a reader checks the whole checkpoint against ``config.json`` from the safetensors headers alone, so a
bad checkpoint stops at once with one ``CheckpointError``. Tensor data is then read one tensor at a time from
memory-mapped shards and converted to float32 (FP8 weights dequantized with their ``_scale_inv``). Each tensor
is mapped on its own and unmapped once converted, so walking all layers keeps only what the caller holds.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from goldstick.errors import GoldstickError
from goldstick.model.architecture import layer_of
from goldstick.model.config import ConfigError, ModelConfig
from goldstick.quant.fp8 import dequantize_fp8_blocks, scale_grid_shape
from goldstick.quant.numerics import STORED_DTYPES

INDEX_FILE = "model.safetensors.index.json"
MSMODELSLIM_INDEX_FILE = "quant_model_weights.safetensors.index.json"  # msModelSlim's name for the same index
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library refuses larger headers too

# safetensors dtype string -> numpy dtype, for every dtype this reader can read
SCALE_DTYPES = ("F32", "BF16", "F16")


class CheckpointError(GoldstickError, ValueError):
    """A checkpoint that cannot be read; the message names the file and the tensor or key."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file (as named in the index), dtype, shape and absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors_header(path: Path, file: str) -> dict[str, TensorInfo]:
    """Parse the header of ``path / file`` and check every tensor's byte range against the file size."""
    full = path / file
    try:
        size = full.stat().st_size
        with open(full, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: truncated: {size} bytes, too short for the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(f"{file}: truncated or corrupt: the header claims {header_len} bytes "
                                      f"but the file has only {size}")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # deep nesting: RecursionError
        raise CheckpointError(f"{file}: corrupt header, not valid JSON ({_short(exc)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt header, expected a JSON object")

    data_start = 8 + header_len
    data_size = size - data_start
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and _int_list(entry.get("shape"))
                and _int_list(entry.get("data_offsets"), 2)):
            raise CheckpointError(f"{file}: corrupt header entry for tensor '{name}': {_short(entry)} (expected "
                                  '{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]})')
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in STORED_DTYPES:
            raise CheckpointError(f"{file}: tensor '{name}' has dtype {_short(dtype)}, which goldstick cannot read "
                                  f"(readable: {', '.join(STORED_DTYPES)})")
        if end > data_size:
            raise CheckpointError(f"{file}: truncated: tensor '{name}' needs data bytes {begin}..{end} but the "
                                  f"file holds only {data_size}")
        expected_bytes = math.prod(shape) * STORED_DTYPES[dtype].itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != expected_bytes:
            raise CheckpointError(f"{file}: corrupt header: tensor '{name}' ({dtype}, shape {shape}) needs "
                                  f"{expected_bytes} bytes but its data_offsets are [{begin}, {end}]")
        tensors[name] = TensorInfo(file, dtype, shape, data_start + begin, data_start + end)
    _check_no_overlap(file, tensors, data_start)
    return tensors


def _int_list(value, length: int | None = None) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def _short(value, limit: int = 200) -> str:
    """repr of a (possibly huge, hostile) header value, cut to ``limit`` characters for the message."""
    text = value if isinstance(value, BaseException) else repr(value)
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_no_overlap(file: str, tensors: dict[str, TensorInfo], data_start: int) -> None:
    """Two tensors sharing bytes would read each other's data: the header is corrupt."""
    spans = sorted((info.start, info.end, name) for name, info in tensors.items() if info.end > info.start)
    for (_, prev_end, prev), (start, end, name) in zip(spans, spans[1:]):
        if start < prev_end:
            raise CheckpointError(f"{file}: corrupt header: tensors '{prev}' (data bytes ..{prev_end - data_start}) "
                                  f"and '{name}' (data bytes {start - data_start}..{end - data_start}) overlap")


def nonfinite_problem(file: str, name: str, values: np.ndarray) -> str | None:
    """None if every value is finite, else a sentence naming the file, the tensor, the count and the first index."""
    finite = np.isfinite(values)
    if finite.all():
        return None
    first = [int(i) for i in np.unravel_index(int(np.argmin(finite)), values.shape)]
    return (f"{file}: tensor '{name}' holds {values.size - int(np.count_nonzero(finite))} NaN/Inf value(s), the "
            f"first at index {first}")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor config.json implies: globals, main layers, then MTP layers.

    The reader requires an MTP layer's tensors only if that layer is stored at all (see _check_against_config).
    """
    shapes = dict(config.global_tensor_shapes())
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # optional then; the reader checks its shape only if it is stored
    for layer in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        shapes.update(config.layer_tensor_shapes(layer))
        if layer >= config.num_hidden_layers:
            shapes.update(config.mtp_extra_tensor_shapes(layer))
    return shapes


class CheckpointReader:
    """Read a HF DeepSeek-V3/R1 checkpoint directory tensor by tensor or layer by layer, as float32 numpy arrays.

    Usage::

        with CheckpointReader("/models/DeepSeek-R1") as ckpt:
            for layer, tensors in ckpt.iter_layers():
                ...
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.config = ModelConfig.from_file(self.path)
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
        self._expected = expected_shapes(self.config)
        self._files: dict[str, BinaryIO] = {}  # shard file -> open handle, opened on first read
        self.validate()

    # ---- validation (headers only) -----------------------------------------------------------------
    def validate(self) -> None:
        """Check the whole checkpoint from its headers (no tensor data); raise CheckpointError at the first problem."""
        self._tensors = self._scan_files()
        self._check_against_config()

    def _scan_files(self) -> dict[str, TensorInfo]:
        """name -> TensorInfo for every tensor the index (or the single file) lists."""
        index = next((f for f in (INDEX_FILE, MSMODELSLIM_INDEX_FILE) if (self.path / f).exists()), None)
        if index is not None:
            self._listing = index
            weight_map = self._read_index()
        elif (self.path / SINGLE_FILE).exists():
            self._listing = SINGLE_FILE
            return read_safetensors_header(self.path, SINGLE_FILE)
        else:
            raise CheckpointError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

        first_tensor_of: dict[str, str] = {}
        for name, file in weight_map.items():
            first_tensor_of.setdefault(file, name)
        for file, name in first_tensor_of.items():  # all missing shards are reported before any header is read
            if not (self.path / file).is_file():
                raise CheckpointError(f"{file}: shard named by {self._listing} does not exist (it should hold "
                                      f"tensor '{name}')")
        headers = {file: read_safetensors_header(self.path, file) for file in first_tensor_of}
        tensors = {}
        for name, file in weight_map.items():
            if name not in headers[file]:
                raise CheckpointError(f"{file}: tensor '{name}' is listed in {self._listing} but absent from the "
                                      "file")
            tensors[name] = headers[file][name]
        return tensors

    def _read_index(self) -> dict[str, str]:
        try:
            index = json.loads((self.path / self._listing).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self._listing}: not a readable JSON file ({exc})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{self._listing}: no 'weight_map' object mapping tensor names to shard files")
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file:
                raise CheckpointError(f"{self._listing}: 'weight_map' entry for tensor '{name}' is {file!r}, "
                                      "not a file name")
        return weight_map

    def _check_against_config(self) -> None:
        where = "the file" if self._listing == SINGLE_FILE else "the index"
        # An MTP layer may be absent as a whole (transformers' save_pretrained drops it but keeps
        # num_nextn_predict_layers); one that is stored must be complete.
        stored_mtp_layers = set(self.mtp_layers())
        for name, shape in self._expected.items():
            layer = layer_of(name)
            if layer is not None and layer >= self.config.num_hidden_layers and layer not in stored_mtp_layers:
                continue
            if name not in self._tensors:
                hint = (f"; MTP layer {layer} is stored, but incomplete" if layer is not None
                        and layer >= self.config.num_hidden_layers else "")
                raise CheckpointError(f"{self._listing}: tensor '{name}' (implied by config.json) is absent from "
                                      f"{where}{hint}")
            self._check_shape(name, shape)
        if self.config.tie_word_embeddings and "lm_head.weight" in self._tensors:
            self._check_shape("lm_head.weight", self.config.global_tensor_shapes()["lm_head.weight"])

        for name, info in self._tensors.items():
            if info.dtype == "F8_E4M3":
                self._check_fp8_scale(name, info)

    def _check_shape(self, name: str, expected: tuple[int, ...]) -> None:
        info = self._tensors[name]
        if info.shape != tuple(expected):
            raise CheckpointError(f"{info.file}: tensor '{name}' has shape {info.shape} but config.json implies "
                                  f"{tuple(expected)}")

    def _check_fp8_scale(self, name: str, info: TensorInfo) -> None:
        scale_name = name + SCALE_SUFFIX
        if len(info.shape) != 2:
            raise CheckpointError(f"{info.file}: FP8 tensor '{name}' has shape {info.shape}; block-scaled FP8 "
                                  "weights must be 2-D")
        scale = self._tensors.get(scale_name)
        if scale is None:
            raise CheckpointError(f"{info.file}: FP8 tensor '{name}' has no '{scale_name}' in the checkpoint, "
                                  "so it cannot be dequantized")
        if scale.dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{scale.file}: scale '{scale_name}' has dtype {scale.dtype}, expected F32 "
                                  "(or BF16/F16)")
        grid = scale_grid_shape(info.shape)
        if scale.shape != grid:
            raise CheckpointError(f"{scale.file}: scale '{scale_name}' has shape {scale.shape} but its FP8 weight "
                                  f"of shape {info.shape} needs {grid} (one per 128x128 block)")

    # ---- names and metadata ------------------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo:
        info = self._tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor '{name}' in this checkpoint")
        return info

    def names(self) -> list[str]:
        """Every tensor name, without the FP8 ``*_scale_inv`` companions."""
        return [n for n in self._tensors if not n.endswith(SCALE_SUFFIX)]

    def has(self, name: str) -> bool:
        """Whether the checkpoint stores ``name`` (``_scale_inv`` names included)."""
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype string as stored: F32, BF16, F16, F8_E4M3, I8, ..."""
        return self._info(name).dtype

    def file_of(self, name: str) -> str:
        """The file holding ``name``, as named in the index."""
        return self._info(name).file

    def layer_tensor_names(self, layer: int) -> list[str]:
        """Names of one decoder layer's tensors (config order), or of one MTP layer (stored order)."""
        if 0 <= layer < self.config.num_hidden_layers:
            return list(self.config.layer_tensor_shapes(layer))
        names = self.mtp_tensor_names(layer)
        if not names:
            raise CheckpointError(f"{self.path}: no tensors for layer {layer} (config.json has "
                                  f"{self.config.num_hidden_layers} layers, MTP layers stored: {self.mtp_layers()})")
        return names

    def global_tensor_names(self) -> list[str]:
        """embed_tokens, norm and lm_head (lm_head only if stored, as with tied embeddings it may not be)."""
        return [n for n in self.config.global_tensor_shapes() if n in self._tensors]

    def mtp_layers(self) -> list[int]:
        """Indices of the stored layers past the main network (R1: [61])."""
        return sorted({layer for layer in map(layer_of, self.names())
                       if layer is not None and layer >= self.config.num_hidden_layers})

    def mtp_tensor_names(self, layer: int | None = None) -> list[str]:
        """Tensors of the MTP layers (layer index >= num_hidden_layers), or of one MTP layer."""
        main = self.config.num_hidden_layers
        return [n for n in self.names()
                if (index := layer_of(n)) is not None and index >= main and (layer is None or index == layer)]

    def unknown_tensor_names(self) -> list[str]:
        """Stored tensors that are no global, main-layer, MTP or scale tensor config.json knows of."""
        known = set(self._expected) | set(self.config.global_tensor_shapes()) | set(self.mtp_tensor_names())
        return [n for n in self.names() if n not in known]

    # ---- reading data ------------------------------------------------------------------------------
    def _open_file(self, file: str) -> BinaryIO:
        handle = self._files.get(file)
        if handle is None:
            try:
                handle = open(self.path / file, "rb")
            except OSError as exc:
                raise CheckpointError(f"{file}: cannot open ({exc.strerror})") from None
            self._files[file] = handle
        return handle

    def _convert_stored(self, name: str, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Map just this tensor's bytes, apply ``convert`` (which must copy), then unmap.

        One mapping per tensor, rather than one per shard, is what keeps RSS flat: the kernel maps neighbouring
        pages on a fault ("fault-around"), and with a whole-shard mapping those pages of other tensors stay
        counted in our RSS until the shard is unmapped. A per-tensor mapping cannot reach past its own bytes.
        """
        info = self._info(name)
        dtype = STORED_DTYPES[info.dtype]
        if info.end == info.start:  # mmap cannot map zero bytes
            return convert(np.empty(info.shape, dtype))
        handle = self._open_file(info.file)
        offset = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(handle.fileno(), info.end - offset, offset=offset, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{info.file}: cannot map tensor '{name}' (bytes {info.start}..{info.end}; "
                                  f"truncated since it was opened?): {exc}") from None
        stored = np.frombuffer(mapped, dtype=dtype, count=math.prod(info.shape), offset=info.start - offset)
        try:
            return convert(stored.reshape(info.shape))
        finally:
            del stored
            try:
                mapped.close()
            except BufferError:  # a view survived (e.g. held by a traceback); unmapped when it is freed
                pass

    def read_raw(self, name: str) -> np.ndarray:
        """The stored array in its stored dtype (ml_dtypes bfloat16 / float8_e4m3fn, ...), as an in-memory copy."""
        return self._convert_stored(name, np.array)

    def read(self, name: str) -> np.ndarray:
        """float32 values: floats upcast, F8_E4M3 dequantized with its ``_scale_inv`` (integers cast as they are)."""
        if self._info(name).dtype == "F8_E4M3":
            scale_inv = self.read(name + SCALE_SUFFIX)
            return self._convert_stored(name, lambda fp8: dequantize_fp8_blocks(fp8, scale_inv))
        return self._convert_stored(name, lambda stored: stored.astype(np.float32))

    def read_layer(self, layer: int) -> dict[str, np.ndarray]:
        """float32 tensors of one decoder (or MTP) layer; nothing of the other layers is touched."""
        return {name: self.read(name) for name in self.layer_tensor_names(layer)}

    def read_globals(self) -> dict[str, np.ndarray]:
        """float32 embed_tokens, final norm and lm_head."""
        return {name: self.read(name) for name in self.global_tensor_names()}

    def iter_layers(self, progress: bool = True) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield ``(layer, read_layer(layer))`` for the main layers 0..num_hidden_layers-1, one at a time."""
        layers = range(self.config.num_hidden_layers)
        for layer in tqdm(layers, desc=f"reading {self.path.name}", unit="layer", disable=not progress):
            yield layer, self.read_layer(layer)

    # ---- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the shard files; they are opened again if the reader is used afterwards."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        files = len({info.file for info in self._tensors.values()})
        return f"CheckpointReader({str(self.path)!r}, {len(self._tensors)} tensors in {files} file(s))"
