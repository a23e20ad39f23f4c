"""Property-based fuzzing of the input readers: arbitrary or mutated input gives a result or the reader's own error.

Targets: the safetensors header reader, the FP8 block decoder, the recipe parser, the C-Eval CSV loader. "Never
another exception, a hang or a memory blow-up": each property runs a bounded number of examples with a deadline per
example, derandomized (the same examples on every run, no example database written), so the file is reproducible
and its run time bounded.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from small_configs import small_config

from goldstick.evaluation.ceval_data import CEvalError, read_csv
from goldstick.io.checkpoint import MAX_HEADER_BYTES, CheckpointError, read_safetensors_header
from goldstick.io.writer import write_safetensors
from goldstick.quant.fp8 import FP8, dequantize_fp8_blocks, scale_grid_shape
from goldstick.quant.recipe import Recipe, RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                    "ignore:overflow encountered:RuntimeWarning")
FUZZ = settings(derandomize=True, database=None, deadline=2000, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
WORK = Path(tempfile.mkdtemp(prefix="goldstick-fuzz-"))


def _write(name: str, data: bytes) -> Path:
    path = WORK / name
    path.write_bytes(data)
    return path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- safetensors header reader --------------------------------------------------------------------------------
def _valid_shard() -> bytes:
    path = WORK / "valid.safetensors"
    write_safetensors(path, [("a", np.arange(6, dtype=np.float32).reshape(2, 3)),
                             ("b", np.ones(4, dtype=ml_dtypes.bfloat16)), ("c", np.zeros((0, 3), np.int8))],
                      metadata={"format": "pt"})
    return path.read_bytes()


VALID = _valid_shard()
VALID_HEADER_LEN = struct.unpack("<Q", VALID[:8])[0]
VALID_HEADER = json.loads(VALID[8:8 + VALID_HEADER_LEN])


def _read_header_or_error(data: bytes):
    _write("fuzz.safetensors", data)
    try:
        tensors = read_safetensors_header(WORK, "fuzz.safetensors")
    except CheckpointError as exc:
        assert str(exc).startswith("fuzz.safetensors:"), str(exc)  # names the file
        assert len(str(exc)) < 2000  # a hostile header is not echoed whole
        return None
    for info in tensors.values():  # what the reader accepts is safe to map
        assert 8 <= info.start <= info.end <= len(data)
    spans = sorted((i.start, i.end) for i in tensors.values() if i.end > i.start)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    return tensors


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_as_a_shard(data):
    _read_header_or_error(data)


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1))
def test_arbitrary_header_length(body, header_len):
    _read_header_or_error(struct.pack("<Q", header_len) + body)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4),
                           max_leaves=12)


@FUZZ
@given(st.sampled_from(["a", "b", "c", "__metadata__"]), st.sampled_from(["dtype", "shape", "data_offsets", None]),
       JSON_VALUES)
def test_mutated_header_entries(tensor, key, value):
    header = json.loads(json.dumps(VALID_HEADER))
    if key is None:
        header[tensor] = value
    else:
        header[tensor][key] = value if tensor != "__metadata__" else value
    text = json.dumps(header).encode()
    _read_header_or_error(struct.pack("<Q", len(text)) + text + VALID[8 + VALID_HEADER_LEN:])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_flipped_bytes_in_a_valid_shard(flips):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    _read_header_or_error(bytes(data))


def test_huge_header_length_is_refused_without_allocating(tmp_path):
    """A header length just past the cap on a (sparse) file that big is refused before any read of it."""
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
    os.truncate(path, MAX_HEADER_BYTES + 64)  # sparse: no disk used
    before = _rss_mb()
    with pytest.raises(CheckpointError, match="huge.safetensors: truncated or corrupt: the header claims"):
        read_safetensors_header(tmp_path, "huge.safetensors")
    assert _rss_mb() - before < 50


# ---- FP8 block decoder ----------------------------------------------------------------------------------------
def _reference(fp8_bytes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    rows, cols = fp8_bytes.shape
    values = fp8_bytes.view(FP8).astype(np.float32)
    full = np.kron(scale.astype(np.float32), np.ones((128, 128), np.float32))[:rows, :cols]
    return values * full


SHAPES = st.tuples(st.integers(0, 300), st.integers(0, 300))


@FUZZ
@given(SHAPES.flatmap(lambda s: st.tuples(
    hnp.arrays(np.uint8, s),
    st.one_of(hnp.arrays(np.float32, scale_grid_shape(s)),  # the right grid, any float32 including NaN/Inf
              hnp.arrays(np.float32, st.tuples(st.integers(0, 4), st.integers(0, 4)))))))  # often the wrong one
def test_fp8_decoder(args):
    raw, scale = args
    try:
        out = dequantize_fp8_blocks(raw.view(FP8), scale)
    except ValueError as exc:
        assert tuple(scale.shape) != scale_grid_shape(raw.shape), f"refused a correct grid: {exc}"
        assert "scale_inv has shape" in str(exc)
        return
    assert out.shape == raw.shape and out.dtype == np.float32
    expected = _reference(raw, scale)
    np.testing.assert_array_equal(out, expected)
    # finite wherever the scale is finite, the byte is a number (0x7f/0xff are e4m3fn's NaN) and no overflow
    full = np.kron(scale, np.ones((128, 128), np.float32))[:raw.shape[0], :raw.shape[1]]
    with np.errstate(over="ignore", invalid="ignore"):
        finite_input = np.isfinite(full) & ((raw & 0x7F) != 0x7F) & (np.abs(full.astype(np.float64)) * 448 < 3e38)
    assert np.isfinite(out[finite_input]).all()


@FUZZ
@given(hnp.arrays(np.uint8, st.one_of(st.tuples(st.integers(0, 20)),
                                      st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)))),
       hnp.arrays(np.float32, st.tuples(st.integers(0, 3), st.integers(0, 3))))
def test_fp8_decoder_refuses_other_ranks(raw, scale):
    with pytest.raises(ValueError, match="must be 2-D"):
        dequantize_fp8_blocks(raw.view(FP8), scale)


@FUZZ
@given(hnp.arrays(st.sampled_from([np.float32, np.int32, np.float16]), st.tuples(st.integers(1, 40),
                                                                                  st.integers(1, 40))))
def test_fp8_decoder_refuses_wider_dtypes(weight):
    with pytest.raises(ValueError, match="one byte per element"):
        dequantize_fp8_blocks(weight, np.ones(scale_grid_shape(weight.shape), np.float32))


# ---- recipe parser --------------------------------------------------------------------------------------------
CONFIG = small_config()
SHIPPED_TEXT = (REPO / "recipes" / "deepseek-r1-w8a8-mixed.yaml").read_text()
SHIPPED = yaml.safe_load(SHIPPED_TEXT)


def _parse_or_error(text: str):
    try:
        recipe = Recipe.from_yaml_string(text, source="fuzz.yaml")
    except RecipeError as exc:
        assert str(exc), "an empty error message"
        return None
    try:
        recipe.plan(CONFIG)
    except RecipeError:
        pass
    return recipe


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_as_a_recipe(text):
    _parse_or_error(text)


YAML_SNIPPETS = st.sampled_from([
    "&a [*a]", "a: &x [1, 2]\nb: *x", "!!python/object:os.system ls", "a: !!int 'x'", "a: !!float nope",
    "a: !!binary '%%%'", "a: !!timestamp 2020-13-45", "? [1, 2]\n: 3", "{{{{", "[" * 200, "a: " + "[" * 120,
    "name: !!set {a, b}", "rules: !!omap [a: 1]", "default: !!null ''", "- 1\n- 2", "\x00", "\ufeffname: x",
    "laugh: &l0 [x, x]\nl1: &l1 [*l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0]\nl2: &l2 [*l1, *l1, *l1, *l1, *l1, *l1, "
    "*l1, *l1]\nl3: &l3 [*l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2]\nl4: &l4 [*l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3]\n"
    "l5: &l5 [*l4, *l4, *l4, *l4, *l4, *l4, *l4, *l4]\nl6: [*l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5]",
])


@FUZZ
@given(YAML_SNIPPETS, st.text(max_size=40))
def test_hostile_yaml_constructs(snippet, suffix):
    _parse_or_error(snippet)
    _parse_or_error(snippet + suffix)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


PATHS = list(_paths(SHIPPED))[1:]


@FUZZ
@given(st.sampled_from(PATHS), st.sampled_from(["replace", "delete", "add"]), JSON_VALUES, st.text(max_size=10))
def test_mutated_shipped_recipe(path, action, value, key):
    doc = json.loads(json.dumps(SHIPPED))
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[key] = value
    else:
        parent.insert(last, value)
    _parse_or_error(yaml.safe_dump(doc, allow_unicode=True))
    try:  # the same data through the Python entry point
        Recipe.from_dict(doc).plan(CONFIG)
    except RecipeError:
        pass


def test_shipped_recipe_still_parses():
    recipe = _parse_or_error(SHIPPED_TEXT)
    assert recipe is not None and recipe.rules == load_recipe("deepseek-r1-w8a8-mixed").rules


# ---- C-Eval CSV loader ----------------------------------------------------------------------------------------
VALID_CSV = ("id,question,A,B,C,D,answer\n0,\"1+1=?\",1,2,3,4,B\n1,\"多行\n问题\",甲,乙,丙,丁,D\n").encode()


def _csv_or_error(data: bytes, split: str = "val"):
    path = _write(f"computer_network_{split}.csv", data)
    try:
        rows = read_csv(path, split, "computer_network")
    except CEvalError as exc:
        assert str(path) in str(exc)  # names the file (and the line where there is one)
        return None
    for q in rows:
        assert q.answer in ("A", "B", "C", "D") or (split == "test" and q.answer == "")
        assert len(q.options) == 4
    return rows


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["dev", "val", "test"]))
def test_arbitrary_bytes_as_ceval_csv(data, split):
    _csv_or_error(data, split)


@FUZZ
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_arbitrary_text_as_ceval_csv(text):
    _csv_or_error(text.encode("utf-8"))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_CSV) - 1), st.sampled_from(list(b",\"\n\r\x00ABCDE x\xff"))),
                min_size=1, max_size=6))
def test_mutated_ceval_csv(edits):
    data = bytearray(VALID_CSV)
    for position, value in edits:
        data[position] = value
    _csv_or_error(bytes(data))


def test_valid_ceval_csv_reads():
    rows = _csv_or_error(VALID_CSV)
    assert [q.answer for q in rows] == ["B", "D"] and rows[1].question == "多行\n问题" and rows[1].line == 3


def test_huge_ceval_field_is_a_clean_error():
    """A field past the loader's limit (and the csv module's default one) is CEvalError, not csv.Error."""
    assert _csv_or_error(b"id,question,A,B,C,D,answer\n0,\"" + b"x" * 200_000 + b"\",1,2,3,4,A\n") is None
