"""Sharded safetensors writer: HF/R1 layout, atomic files, bounded memory.

    with ShardedWriter(out_dir, max_shard_bytes=4 << 30) as w:
        for name, array in tensors:
            w.add(name, array)              # numpy arrays of any supported dtype
    # leaving the block calls close(): shards are renamed to their final names and
    # model.safetensors.index.json is written last

Layout written by ``close()``:

* shards ``model-00001-of-000163.safetensors`` (``naming="r1"``: 5-digit index, 6-digit total, as in the
  DeepSeek-R1 release) or ``model-00001-of-00003.safetensors`` (``naming="hf"``); when everything fit in one shard
  and ``single_file=True`` the shard is called ``model.safetensors``;
* ``model.safetensors.index.json`` = ``{"metadata": {"total_size": N, ...}, "weight_map": {name: file}}``, always
  (also for a single file, so readers can always start from the index). ``total_size`` is the sum of the tensors'
  byte sizes, as transformers computes it.

Tensors are buffered in memory until the open shard would exceed ``max_shard_bytes``; the shard is then written
(to a hidden temporary name in ``out_dir``) and the buffer dropped, so memory stays at about one shard. A tensor
larger than the cap gets a shard of its own. Final names need the shard count, so every shard stays under its
temporary name until ``close()`` renames it. Nothing half-written is ever visible under a final name: on an
exception inside the ``with`` block (or an explicit ``abort()``) all temporaries are removed, and the index is
written last, so a directory without an index is an incomplete one.

Placement: by default tensors go into the open shard. A ``placement(name, array) -> int | None`` hook (or
``add(..., shard=k)``) can force a tensor into shard number ``k`` (1-based, in writing order): ``k`` equal to the
open shard adds it there regardless of the cap; a later ``k`` holds the tensor back until shard ``k`` is opened (or,
if the data runs out first, it goes into extra shards created at ``close()``); an earlier ``k`` is an error, that
shard is already on disk. ``writer.shard_number`` is the open shard's number, so a hook can say "the next shard"
(the FP8 test models put a ``weight_scale_inv`` in a different shard from its weight this way, as R1 can).
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from goldstick.errors import GoldstickError
from goldstick.io.faults import stall

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' default "5GB"

# numpy dtype -> safetensors dtype tag
_DTYPE_TAGS: dict[np.dtype, str] = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64",
    np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}

Placement = Callable[[str, np.ndarray], "int | None"]


class WriterError(GoldstickError, RuntimeError):
    """Misuse of a ShardedWriter (duplicate tensor, bad placement, use after close)."""


# by name: a bfloat16 dtype handed out by safetensors compares equal to ml_dtypes' but does not hash the same
_TAGS_BY_NAME = {d.name: tag for d, tag in _DTYPE_TAGS.items()}


def safetensors_dtype(dtype: np.dtype) -> str:
    tag = _TAGS_BY_NAME.get(np.dtype(dtype).newbyteorder("=").name)
    if tag is None:
        raise TypeError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors "
                        f"(supported: {', '.join(sorted(str(d) for d in _DTYPE_TAGS))})")
    return tag


def shard_file_name(index: int, total: int, naming: str = "r1") -> str:
    """1-based shard ``index`` of ``total``: r1 -> model-00001-of-000163.safetensors, hf -> ...-of-00163..."""
    if naming == "r1":
        return f"model-{index:05d}-of-{total:06d}.safetensors"
    if naming == "hf":
        return f"model-{index:05d}-of-{total:05d}.safetensors"
    raise ValueError(f"naming must be 'r1' or 'hf', got {naming!r}")


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file (no temporary name; ShardedWriter handles that).

    Tensors are laid out by decreasing item size (stable otherwise), so every tensor starts at a multiple of its
    item size, the way the safetensors library itself orders data.
    """
    items = [(name, _little_endian(arr)) for name, arr in tensors]
    items.sort(key=lambda item: -item[1].dtype.itemsize)
    blob, _ = safetensors_layout([(name, arr.dtype, arr.shape) for name, arr in items], metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k, (_, arr) in enumerate(items):
            if k == len(items) // 2:  # crash tests stop here: a file with a header and half its data
                f.flush()
                stall(path)
            if arr.nbytes:
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())


def safetensors_layout(specs: list[tuple[str, np.dtype, tuple]], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header of a safetensors file holding ``specs`` (name, dtype, shape) in this order, and where each
    tensor's data will sit: name -> (absolute byte offset in the file, byte count). Callers sort ``specs``."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, spans = 0, {}
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": safetensors_dtype(dtype), "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        spans[name] = (offset, nbytes)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    start = 8 + len(blob)
    return blob, {name: (start + off, n) for name, (off, n) in spans.items()}


def _little_endian(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and np.little_endian is False):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray would make 0-d 1-d)


class ShardedWriter:
    """Write named numpy arrays into size-capped safetensors shards plus an index (see the module docstring).

    Args:
        out_dir: directory to write into (created if missing).
        max_shard_bytes: start a new shard when adding a tensor would push the open one past this many bytes.
        naming: ``"r1"`` (model-00001-of-000163) or ``"hf"`` (model-00001-of-00163).
        single_file: call a lone shard ``model.safetensors`` instead of ``model-00001-of-000001.safetensors``.
        placement: optional hook ``(name, array) -> shard number or None`` (see the module docstring).
        shard_metadata: the ``__metadata__`` header of every shard (transformers expects ``format: pt``).
        overwrite: allow an ``out_dir`` that already holds ``model*.safetensors*`` files; stale shards that are
            not part of the new set are deleted after the new index is in place.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, naming: str = "r1",
                 single_file: bool = False, placement: Placement | None = None,
                 shard_metadata: dict[str, str] | None = None, overwrite: bool = False):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        shard_file_name(1, 1, naming)  # validates naming
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(p.name for p in self.out_dir.glob("model*.safetensors*") if not p.name.startswith("."))
        if existing and not overwrite:
            raise FileExistsError(f"{self.out_dir} already holds {existing[0]} (pass overwrite=True to replace)")
        self._stale = existing
        self.max_shard_bytes = int(max_shard_bytes)
        self.naming = naming
        self.single_file = single_file
        self.placement = placement
        self.shard_metadata = {"format": "pt"} if shard_metadata is None else dict(shard_metadata)
        self._tag = f".goldstick-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._open: list[tuple[str, np.ndarray]] = []  # tensors of the open shard
        self._open_bytes = 0
        self._held: dict[int, list[tuple[str, np.ndarray]]] = {}  # shard number -> tensors waiting for it
        self._written: list[Path] = []  # temporary files of finished shards, in order
        self._shard_of: dict[str, int] = {}  # tensor name -> shard number
        self._names: set[str] = set()
        self.total_size = 0
        self._state = "open"

    # ---- adding tensors --------------------------------------------------------------------------
    @property
    def shard_number(self) -> int:
        """1-based number of the shard currently being filled."""
        return len(self._written) + 1

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def add(self, name: str, array: np.ndarray, shard: int | None = None) -> None:
        """Queue one tensor; ``shard`` (or the placement hook) forces its shard number.

        The array is referenced, not copied, until its shard is written: do not modify it in place meanwhile.
        """
        self._check_open()
        if not isinstance(name, str) or not name:
            raise WriterError(f"tensor names must be non-empty strings, got {name!r}")
        if name in self._names:
            raise WriterError(f"duplicate tensor name {name!r}: it was already added to this checkpoint")
        arr = _little_endian(array)
        safetensors_dtype(arr.dtype)  # fail now, not at flush time
        if shard is None and self.placement is not None:
            shard = self.placement(name, arr)
        self._names.add(name)
        self.total_size += arr.nbytes
        if shard is None:
            if self._open and self._open_bytes + arr.nbytes > self.max_shard_bytes:
                self._flush()
            self._append(name, arr)
            return
        shard = int(shard)
        if shard < self.shard_number:
            self._names.discard(name)
            self.total_size -= arr.nbytes
            raise WriterError(f"cannot place {name!r} in shard {shard}: shards 1..{self.shard_number - 1} "
                              f"are already written")
        if shard == self.shard_number:
            self._append(name, arr)
        else:
            self._held.setdefault(shard, []).append((name, arr))

    def _append(self, name: str, arr: np.ndarray) -> None:
        self._open.append((name, arr))
        self._open_bytes += arr.nbytes
        self._shard_of[name] = self.shard_number

    def _flush(self) -> None:
        """Write the open shard under a temporary name and open the next one (pulling in held tensors)."""
        tmp = self.out_dir / f"{self._tag}-{self.shard_number:05d}.safetensors.partial"
        self._written.append(tmp)  # recorded first so abort() removes a half-written file too
        write_safetensors(tmp, self._open, self.shard_metadata)
        self._open, self._open_bytes = [], 0
        for name, arr in self._held.pop(self.shard_number, []):
            self._append(name, arr)

    # ---- finishing -------------------------------------------------------------------------------
    def close(self, metadata: dict | None = None) -> Path:
        """Write the last shard(s), rename all shards to their final names, write the index; returns its path.

        ``metadata`` entries are added to the index's ``metadata`` next to ``total_size`` (JSON values).
        """
        self._check_open()
        self._state = "closing"
        final: list[Path] = []
        try:
            if self._open or not self._written:
                self._flush()
            while self._held:  # data ran out before the shards some tensors were held for
                if not self._open:
                    self._renumber_held()
                self._flush()
            if self._open:
                self._flush()
            n = len(self._written)
            if n == 1 and self.single_file:
                names = [SINGLE_NAME]
            else:
                names = [shard_file_name(i, n, self.naming) for i in range(1, n + 1)]
            for tmp, name in zip(self._written, names):
                os.replace(tmp, self.out_dir / name)
                final.append(self.out_dir / name)
            self._written = []
            weight_map = {k: names[s - 1] for k, s in sorted(self._shard_of.items())}
            index_meta = {"total_size": self.total_size}
            index_meta.update(metadata or {})
            index_path = self.out_dir / INDEX_NAME
            write_json_atomic(index_path, {"metadata": index_meta, "weight_map": weight_map})
        except BaseException:
            for path in final:
                path.unlink(missing_ok=True)
            self._state = "open"
            self.abort()
            raise
        for stale in self._stale:
            if stale not in names and stale != INDEX_NAME:
                (self.out_dir / stale).unlink(missing_ok=True)
        self._state = "closed"
        self.shard_names = names
        return index_path

    def _renumber_held(self) -> None:
        # the open shard is empty: the lowest held number becomes the open shard
        lowest = min(self._held)
        for name, arr in self._held.pop(lowest):
            self._append(name, arr)

    def abort(self) -> None:
        """Remove every temporary file and drop the buffers; the writer cannot be used afterwards."""
        for tmp in self._written:
            tmp.unlink(missing_ok=True)
        for leftover in self.out_dir.glob(f"{self._tag}*"):
            leftover.unlink(missing_ok=True)
        self._written, self._open, self._held = [], [], {}
        self._state = "aborted"

    def _check_open(self) -> None:
        if self._state != "open":
            raise WriterError(f"this ShardedWriter is {self._state}")

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._state == "open":
                self.abort()
            return
        if self._state == "open":
            self.close()


def write_json_atomic(path: str | Path, obj: object) -> Path:
    """Write JSON to a temporary file in the same directory, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class PlannedShardWriter:
    """Shards whose tensors are known (name, dtype, shape) before any data exists, written in place.

    The streaming path (goldstick.engine.stream) knows every output tensor from the plan, so instead of buffering a
    shard in memory this writer lays the shards out up front, exactly as ``ShardedWriter`` would cut them for the same
    ``add`` order (same shard boundaries, headers and data offsets, hence the same bytes), writes each header and
    reserves the file's full size under a temporary name; the data is then written into place (``pwrite``) by
    whoever computes it, in any order, from any process. Memory is the plan, not a shard.

        w = PlannedShardWriter(out, max_shard_bytes)
        w.add(name, spec)              # spec: anything with .dtype and .shape (e.g. a zero-stride placeholder)
        w.open()                       # headers written, files reserved
        path, offset, nbytes = w.location(name)   # where name's bytes go
        w.close(metadata)              # fsync, rename to final names, index last (as ShardedWriter.close)
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, naming: str = "r1",
                 shard_metadata: dict[str, str] | None = None, overwrite: bool = False):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        shard_file_name(1, 1, naming)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(p.name for p in self.out_dir.glob("model*.safetensors*") if not p.name.startswith("."))
        if existing and not overwrite:
            raise FileExistsError(f"{self.out_dir} already holds {existing[0]} (pass overwrite=True to replace)")
        self.max_shard_bytes, self.naming = int(max_shard_bytes), naming
        self.shard_metadata = {"format": "pt"} if shard_metadata is None else dict(shard_metadata)
        self._tag = f".goldstick-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._shards: list[list[tuple[str, np.dtype, tuple]]] = [[]]
        self._open_bytes = 0
        self._names: set[str] = set()
        self._where: dict[str, tuple[Path, int, int]] = {}
        self._half: dict[Path, int] = {}
        self._paths: list[Path] = []
        self.total_size = 0
        self._state = "planning"

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def add(self, name: str, spec) -> None:
        """Plan one tensor (the ShardedWriter rule: a new shard when this one would pass the cap)."""
        if self._state != "planning":
            raise WriterError(f"this PlannedShardWriter is {self._state}; tensors are planned before open()")
        if name in self._names:
            raise WriterError(f"duplicate tensor name {name!r}: it was already added to this checkpoint")
        dtype, shape = np.dtype(spec.dtype), tuple(int(d) for d in spec.shape)
        safetensors_dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self._shards[-1] and self._open_bytes + nbytes > self.max_shard_bytes:
            self._shards.append([])
            self._open_bytes = 0
        self._shards[-1].append((name, dtype, shape))
        self._open_bytes += nbytes
        self._names.add(name)
        self.total_size += nbytes

    def open(self) -> None:
        """Write every shard's header and reserve its size (temporary names); then ``location`` works."""
        if self._state != "planning":
            raise WriterError(f"this PlannedShardWriter is {self._state}")
        self._state = "open"
        try:
            for number, specs in enumerate(self._shards, start=1):
                specs = sorted(specs, key=lambda s: -s[1].itemsize)  # as write_safetensors orders data
                blob, spans = safetensors_layout(specs, self.shard_metadata)
                tmp = self.out_dir / f"{self._tag}-{number:05d}.safetensors.partial"
                self._paths.append(tmp)  # recorded first so abort() removes a half-made file too
                size = 8 + len(blob) + sum(n for _, n in spans.values())
                with open(tmp, "wb") as f:
                    f.write(struct.pack("<Q", len(blob)))
                    f.write(blob)
                    f.truncate(size)
                    if size > 8 + len(blob):  # reserve the blocks now: a full disk fails here, not midway
                        os.posix_fallocate(f.fileno(), 8 + len(blob), size - 8 - len(blob))
                for name, (offset, nbytes) in spans.items():
                    self._where[name] = (tmp, offset, nbytes)
                self._half[tmp] = (8 + len(blob) + size) // 2  # the crash tests' stall point (faults.stall)
        except BaseException:
            self.abort()
            raise

    def location(self, name: str) -> tuple[Path, int, int]:
        """(temporary shard path, absolute byte offset, byte count) of a planned tensor's data."""
        if self._state != "open":
            raise WriterError(f"this PlannedShardWriter is {self._state}; call open() first")
        return self._where[name]

    @property
    def paths(self) -> list[Path]:
        return list(self._paths)

    def write(self, name: str, array: np.ndarray) -> None:
        """Write a planned tensor's bytes into its place now (pwrite: any order, nothing buffered)."""
        path, offset, nbytes = self.location(name)
        data = _little_endian(np.asarray(array))
        if data.nbytes != nbytes:
            raise WriterError(f"tensor {name!r}: {data.nbytes} bytes given, {nbytes} planned "
                              f"(dtype {data.dtype}, shape {data.shape})")
        pwrite_array(path, offset, data)
        if offset + nbytes >= self._half[path]:
            stall(path)

    def close(self, metadata: dict | None = None) -> Path:
        """fsync every shard, rename them to their final names, write the index last; returns its path."""
        if self._state != "open":
            raise WriterError(f"this PlannedShardWriter is {self._state}")
        n = len(self._paths)
        names = [shard_file_name(i, n, self.naming) for i in range(1, n + 1)]
        final: list[Path] = []
        try:
            for tmp in self._paths:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for tmp, name in zip(self._paths, names):
                os.replace(tmp, self.out_dir / name)
                final.append(self.out_dir / name)
            weight_map = {name: names[k] for k, specs in enumerate(self._shards) for name, _, _ in specs}
            index_meta = {"total_size": self.total_size}
            index_meta.update(metadata or {})
            index_path = write_json_atomic(self.out_dir / INDEX_NAME,
                                           {"metadata": index_meta, "weight_map": dict(sorted(weight_map.items()))})
        except BaseException:
            for path in final:
                path.unlink(missing_ok=True)
            self.abort()
            raise
        self._state = "closed"
        self.shard_names = names
        return index_path

    def abort(self) -> None:
        """Remove every temporary shard; the writer cannot be used afterwards."""
        for tmp in self._paths:
            tmp.unlink(missing_ok=True)
        self._paths, self._where = [], {}
        self._state = "aborted"


def pwrite_array(path: str | Path, offset: int, array: np.ndarray, write_back: bool = False) -> None:
    """Write an array's bytes at ``offset`` of an existing file (pwrite, looping over short writes). ``write_back``:
    start writing these pages to disk now (DONTNEED on dirty pages queues their writeback and drops only clean
    ones), so the disk writes while the caller computes and a final fsync finds little left to do."""
    data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        if write_back:
            os.posix_fadvise(fd, offset, len(data), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class PlacedShards:
    """The ``add``/``close``/``abort`` face of ShardedWriter over an opened PlannedShardWriter: ``add`` writes the
    array into its planned place at once. Plan by adding placeholders in the same order (same bytes as
    ShardedWriter), then add the real arrays through this: a shard is never held in memory."""

    def __init__(self, planned: PlannedShardWriter):
        self.planned = planned

    def add(self, name: str, array: np.ndarray) -> None:
        self.planned.write(name, array)

    def close(self, metadata: dict | None = None) -> Path:
        return self.planned.close(metadata)

    def abort(self) -> None:
        self.planned.abort()
