import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from goldstick.io.writer import INDEX_NAME, ShardedWriter, WriterError, shard_file_name, write_safetensors


def _read_all(out_dir):
    """name -> torch tensor, through the index, with the real safetensors library."""
    index = json.loads((out_dir / INDEX_NAME).read_text())
    tensors = {}
    for name, file in index["weight_map"].items():
        with safe_open(out_dir / file, framework="pt") as f:
            tensors[name] = f.get_tensor(name)
    return index, tensors


def _all_dtypes(rng):
    w = rng.standard_normal((5, 7)).astype(np.float32)
    return {
        "f32": w,
        "f64": w.astype(np.float64),
        "f16": w.astype(np.float16),
        "bf16": w.astype(ml_dtypes.bfloat16),
        "fp8": (w * 10).astype(ml_dtypes.float8_e4m3fn),
        "i8": rng.integers(-127, 128, (3, 3), dtype=np.int8),
        "i32": rng.integers(-1000, 1000, (4,), dtype=np.int32),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": np.arange(9, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "big_endian": np.arange(5, dtype=">i4"),
        "strided": w[:, ::2],
    }


def _as_numpy(t, like):
    """torch tensor -> numpy array with the dtype of ``like`` (bit-exact for bf16/fp8)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy().astype(np.asarray(like).dtype.newbyteorder("="))


def test_roundtrip_every_dtype_single_shard(tmp_path):
    arrays = _all_dtypes(np.random.default_rng(0))
    with ShardedWriter(tmp_path, single_file=True) as w:
        for name, arr in arrays.items():
            w.add(name, arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", INDEX_NAME]
    index, tensors = _read_all(tmp_path)
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert index["metadata"]["total_size"] == sum(np.asarray(a).nbytes for a in arrays.values())
    for name, arr in arrays.items():
        got = _as_numpy(tensors[name], arr)
        assert got.shape == np.asarray(arr).shape, name
        assert got.tobytes() == np.ascontiguousarray(arr).astype(got.dtype).tobytes(), name
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_multi_shard_r1_names_and_cap(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {f"t{i:02d}": rng.standard_normal((16, 16)).astype(np.float32) for i in range(10)}  # 1 KiB each
    with ShardedWriter(tmp_path, max_shard_bytes=3 * 1024) as w:
        for name, arr in arrays.items():
            w.add(name, arr)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-000004.safetensors" for i in range(1, 5)]
    index, tensors = _read_all(tmp_path)
    assert [index["weight_map"][f"t{i:02d}"] for i in (0, 3, 9)] == [files[0], files[1], files[3]]
    for name, arr in arrays.items():
        np.testing.assert_array_equal(tensors[name].numpy(), arr)
    for f in files:
        assert (tmp_path / f).stat().st_size < 3 * 1024 + 1024  # data + a small header
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_single_shard_without_single_file_keeps_r1_name(tmp_path):
    with ShardedWriter(tmp_path) as w:
        w.add("a", np.ones(3, np.float32))
    assert (tmp_path / "model-00001-of-000001.safetensors").exists()


def test_hf_naming():
    assert shard_file_name(2, 163) == "model-00002-of-000163.safetensors"
    assert shard_file_name(2, 163, "hf") == "model-00002-of-00163.safetensors"
    with pytest.raises(ValueError):
        shard_file_name(1, 1, "bad")


def test_oversized_tensor_gets_its_own_shard(tmp_path):
    with ShardedWriter(tmp_path, max_shard_bytes=100) as w:
        w.add("small", np.zeros(4, np.float32))
        w.add("big", np.zeros(1000, np.float32))
        w.add("small2", np.zeros(4, np.float32))
    index, _ = _read_all(tmp_path)
    wm = index["weight_map"]
    assert len({wm["small"], wm["big"], wm["small2"]}) == 3


def test_duplicate_name_is_an_error(tmp_path):
    w = ShardedWriter(tmp_path)
    w.add("x", np.zeros(2, np.float32))
    with pytest.raises(WriterError, match="duplicate"):
        w.add("x", np.zeros(2, np.float32))
    w.abort()


def test_unsupported_dtype(tmp_path):
    with pytest.raises(TypeError, match="cannot be stored"):
        with ShardedWriter(tmp_path) as w:
            w.add("c", np.zeros(2, np.complex128))
    assert list(tmp_path.iterdir()) == []


def test_exception_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(tmp_path, max_shard_bytes=64) as w:
            for i in range(10):
                w.add(f"t{i}", np.zeros(16, np.float32))  # each fills a shard: several temporaries on disk
            assert len(list(tmp_path.iterdir())) >= 5
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failure_during_close_leaves_nothing_behind(tmp_path, monkeypatch):
    import goldstick.io.writer as writer_mod

    def broken(*args, **kwargs):
        raise OSError("disk full")

    w = ShardedWriter(tmp_path, max_shard_bytes=64)
    for i in range(4):
        w.add(f"t{i}", np.zeros(16, np.float32))
    monkeypatch.setattr(writer_mod, "write_json_atomic", broken)
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_refuses_existing_checkpoint_unless_overwrite(tmp_path):
    with ShardedWriter(tmp_path, max_shard_bytes=64) as w:
        for i in range(3):
            w.add(f"t{i}", np.zeros(16, np.float32))
    with pytest.raises(FileExistsError):
        ShardedWriter(tmp_path)
    with ShardedWriter(tmp_path, overwrite=True, single_file=True) as w:
        w.add("only", np.ones(2, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", INDEX_NAME]
    _, tensors = _read_all(tmp_path)
    assert list(tensors) == ["only"]


def test_placement_hook_next_shard(tmp_path):
    """A scale forced into the shard after its weight's, as the FP8 generator does."""
    holder = {}

    def place(name, arr):
        if name == "w0_scale_inv":
            return holder["w"].shard_number + 1
        return None

    w = ShardedWriter(tmp_path, max_shard_bytes=2048, placement=place)
    holder["w"] = w
    w.add("w0", np.zeros((16, 16), np.float32))
    w.add("w0_scale_inv", np.ones((1, 1), np.float32))
    for i in range(1, 5):
        w.add(f"w{i}", np.zeros((16, 16), np.float32))
    w.close()
    index, tensors = _read_all(tmp_path)
    wm = index["weight_map"]
    assert wm["w0"] != wm["w0_scale_inv"]
    assert wm["w0_scale_inv"] == shard_file_name(2, len(set(wm.values())))
    assert tensors["w0_scale_inv"].item() == 1.0


def test_placement_beyond_data_and_into_the_past(tmp_path):
    w = ShardedWriter(tmp_path, max_shard_bytes=1 << 20)
    w.add("a", np.zeros(4, np.float32))
    w.add("late", np.ones(4, np.float32), shard=5)  # fewer shards than that: goes into an extra last shard
    w.add("b", np.zeros(4, np.float32), shard=1)
    w.close()
    index, tensors = _read_all(tmp_path)
    wm = index["weight_map"]
    assert wm["a"] == wm["b"] == "model-00001-of-000002.safetensors"
    assert wm["late"] == "model-00002-of-000002.safetensors"
    np.testing.assert_array_equal(tensors["late"].numpy(), np.ones(4))

    w = ShardedWriter(tmp_path / "past", max_shard_bytes=16)
    w.add("a", np.zeros(4, np.float32))
    w.add("b", np.zeros(4, np.float32))  # shard 1 is flushed
    with pytest.raises(WriterError, match="already written"):
        w.add("c", np.zeros(4, np.float32), shard=1)
    w.add("c", np.zeros(4, np.float32))  # the failed add did not register the name
    w.close()


def test_close_metadata_and_use_after_close(tmp_path):
    w = ShardedWriter(tmp_path)
    w.add("a", np.zeros(2, ml_dtypes.bfloat16))
    w.close(metadata={"producer": "goldstick"})
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"] == {"total_size": 4, "producer": "goldstick"}
    with pytest.raises(WriterError):
        w.add("b", np.zeros(2, np.float32))


def test_alignment_of_mixed_dtypes(tmp_path):
    """Odd-sized 1-byte tensors must not misalign later 4-byte ones (data is ordered by item size)."""
    path = tmp_path / "x.safetensors"
    write_safetensors(path, [("b", np.zeros(3, np.int8)), ("f", np.arange(3, dtype=np.float32)),
                             ("h", np.ones(1, ml_dtypes.bfloat16))])
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    assert (8 + header_len) % 8 == 0
    assert header["f"]["data_offsets"][0] % 4 == 0 and header["h"]["data_offsets"][0] % 2 == 0
    with safe_open(path, framework="pt") as f:
        np.testing.assert_array_equal(f.get_tensor("f").numpy(), np.arange(3))
