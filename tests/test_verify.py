"""goldstick verify: good checkpoints of both formats pass; each kind of damage fails, named, with exit status 2.

The good checkpoints are made once per module from the embedded default model: static W8A8 (layer path), W8A16 and
dynamic W8A8 (data-free streaming path), and the compressed-tensors exports of the last two. Each damage is done to
a copy; where the damage is not to the bytes themselves, the manifest is rewritten so that the check under test (not
the hash) is what catches it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from test_checkpoint import INDEX, rewrite_shard, shard_of

import goldstick
from goldstick.cli import main as cli
from goldstick.io.export import export_checkpoint, write_manifest
from goldstick.io.verification import VerifyError, verify
from goldstick.quant.recipe import load_recipe
from goldstick.testing.make_model import default_model_path

FAST = dict(calib_samples=2, calib_seq_len=16, progress=False)
DESCRIPTION = "quantization_description.json"
STATIC_LINEAR = "model.layers.1.self_attn.q_a_proj"
BF16 = ml_dtypes.bfloat16


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    model = default_model_path()
    built = {"static": goldstick.quantize(model, "deepseek-r1-w8a8-static-naive", out=root / "static", **FAST).out,
             # the mindspore layout, whose dtypes the damage tests below name
             "w8a16": goldstick.quantize(model, "deepseek-r1-w8a16", out=root / "w8a16", progress=False,
                                         export_format="mindspore").out,
             "dynamic": goldstick.quantize(model, "deepseek-r1-w8a8-dynamic", out=root / "dynamic",
                                           progress=False, export_format="mindspore").out}
    built["ct-w8a16"] = export_checkpoint(built["w8a16"], root / "ct-w8a16", "compressed-tensors")
    built["ct-dynamic"] = export_checkpoint(built["dynamic"], root / "ct-dynamic", "compressed-tensors")
    return built


def damaged(good, key: str, tmp_path: Path) -> Path:
    copy = tmp_path / key
    shutil.copytree(good[key], copy)
    return copy


def assert_fails(path: Path, *fragments: str, capsys=None) -> list[str]:
    report = verify(path)
    assert not report.ok
    hits = [p for p in report.problems if all(f in p for f in fragments)]
    assert hits, f"no problem names {fragments}: {report.problems}"
    if capsys is not None:
        capsys.readouterr()
        assert cli(["verify", str(path)]) == 2
        err = capsys.readouterr().err
        assert all(f in err for f in fragments) and "problem(s)" in err
    return report.problems


@pytest.mark.parametrize("key", ["static", "w8a16", "dynamic", "ct-w8a16", "ct-dynamic"])
def test_good_checkpoints_pass(good, key, capsys):
    report = verify(good[key])
    assert report.ok, report.problems
    assert report.format == ("compressed-tensors" if key.startswith("ct-") else "mindspore")
    manifest = json.loads((good[key] / "manifest.json").read_text())
    assert report.files == len(manifest["files"]) and report.bytes_hashed == sum(
        f["bytes"] for f in manifest["files"].values())
    index = json.loads((good[key] / INDEX).read_text())["weight_map"]
    assert report.tensors == len(index)  # every stored tensor had its dtype and shape checked
    assert cli(["verify", str(good[key])]) == 0
    assert ": OK" in capsys.readouterr().out


# ---- damage to files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["static", "ct-dynamic"])
def test_flipped_byte(good, key, tmp_path, capsys):
    d = damaged(good, key, tmp_path)
    shard = d / "model-00001-of-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = assert_fails(d, shard.name, "sha256 differs", capsys=capsys)
    assert len(problems) == 1
    assert verify(d, hashes=False).ok  # sizes alone cannot see it: that is what the hashing is for


def test_deleted_and_extra_files(good, tmp_path, capsys):
    d = damaged(good, "static", tmp_path)
    (d / "tokenizer_config.json").unlink()
    (d / "notes.txt").write_text("not from goldstick")
    assert_fails(d, "tokenizer_config.json", "listed in manifest.json but missing", capsys=capsys)
    assert_fails(d, "notes.txt", "present but not listed in manifest.json")


def test_missing_manifest(good, tmp_path):
    d = damaged(good, "dynamic", tmp_path)
    (d / "manifest.json").unlink()
    assert_fails(d, "manifest.json", "missing")


def test_truncated_shard(good, tmp_path):
    d = damaged(good, "dynamic", tmp_path)
    shard = d / "model-00001-of-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    assert_fails(d, shard.name, "bytes, manifest.json says")
    assert_fails(d, shard.name, "truncated")


# ---- damage to tensors and the description (manifest rewritten) ----------------------------------------------
def rewrite(d: Path, name: str, edit) -> None:
    rewrite_shard(d / shard_of(d, name), edit)
    write_manifest(d)


def test_extra_tensor(good, tmp_path, capsys):
    d = damaged(good, "static", tmp_path)
    extra = f"{STATIC_LINEAR}.smooth_scale"
    file = shard_of(d, f"{STATIC_LINEAR}.weight")
    rewrite_shard(d / file, lambda t: t.__setitem__(extra, np.ones(64, np.float32)))
    index = json.loads((d / INDEX).read_text())
    index["weight_map"][extra] = file
    (d / INDEX).write_text(json.dumps(index))
    write_manifest(d)
    assert_fails(d, DESCRIPTION, "no entry", extra, capsys=capsys)


def test_tensor_in_shard_but_not_in_index(good, tmp_path):
    d = damaged(good, "dynamic", tmp_path)
    rewrite(d, "model.norm.weight", lambda t: t.__setitem__("stowaway", np.zeros(3, np.float32)))
    assert_fails(d, "stowaway", f"{INDEX} omits it")


def test_missing_description_entry(good, tmp_path, capsys):
    d = damaged(good, "static", tmp_path)
    labels = json.loads((d / DESCRIPTION).read_text())
    del labels[f"{STATIC_LINEAR}.deq_scale"]
    (d / DESCRIPTION).write_text(json.dumps(labels))
    write_manifest(d)
    assert_fails(d, DESCRIPTION, "no entry", f"{STATIC_LINEAR}.deq_scale", capsys=capsys)
    assert_fails(d, f"{STATIC_LINEAR}.deq_scale", "missing; a W8A8 linear needs")


def test_description_of_a_tensor_no_shard_holds(good, tmp_path):
    d = damaged(good, "dynamic", tmp_path)
    labels = json.loads((d / DESCRIPTION).read_text())
    labels["model.layers.0.mlp.up_proj.ghost"] = "W8A8_DYNAMIC"
    (d / DESCRIPTION).write_text(json.dumps(labels))
    write_manifest(d)
    assert_fails(d, DESCRIPTION, "model.layers.0.mlp.up_proj.ghost", "which no shard holds")


def test_wrong_dtype(good, tmp_path, capsys):
    d = damaged(good, "static", tmp_path)
    name = f"{STATIC_LINEAR}.deq_scale"
    rewrite(d, name, lambda t: t.__setitem__(name, t[name].astype(BF16)))
    assert_fails(d, name, "is BF16", "implies F32", capsys=capsys)


def test_wrong_shape(good, tmp_path):
    d = damaged(good, "dynamic", tmp_path)
    name = "model.layers.0.mlp.down_proj.weight_scale"
    rewrite(d, name, lambda t: t.__setitem__(name, t[name][:-1].copy()))
    assert_fails(d, name, "[255]", "implies BF16 [256]")


@pytest.mark.parametrize("key, name, value", [
    ("static", f"{STATIC_LINEAR}.deq_scale", 0.0),
    ("static", f"{STATIC_LINEAR}.input_scale", np.nan),
    ("dynamic", "model.layers.2.mlp.experts.5.up_proj.weight_scale", -1.0),
    ("ct-w8a16", "model.layers.0.mlp.gate_proj.weight_scale", np.inf),
])
def test_bad_scale(good, tmp_path, capsys, key, name, value):
    d = damaged(good, key, tmp_path)

    def spoil(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name].reshape(-1)[3] = value
    rewrite(d, name, spoil)
    problems = assert_fails(d, f"scale '{name}'", "1 value(s) that are not finite and > 0", "at 3", capsys=capsys)
    assert len(problems) == 1


def test_every_problem_is_listed(good, tmp_path):
    d = damaged(good, "static", tmp_path)
    (d / "recipe.yaml").unlink()
    name = f"{STATIC_LINEAR}.deq_scale"
    rewrite_shard(d / shard_of(d, name), lambda t: t.__setitem__(name, np.zeros_like(t[name])))
    report = verify(d)
    assert len(report.problems) == 3, report.problems  # the missing file, the shard's hash, the zero scale
    with pytest.raises(VerifyError) as caught:
        report.raise_if_failed()
    assert "3 problem(s)" in str(caught.value) and "recipe.yaml" in str(caught.value)


def test_ct_linear_missing_its_scale(good, tmp_path):
    d = damaged(good, "ct-dynamic", tmp_path)
    name = "model.layers.3.self_attn.o_proj.weight_scale"
    rewrite(d, name, lambda t: t.pop(name))
    index = json.loads((d / INDEX).read_text())
    del index["weight_map"][name]
    (d / INDEX).write_text(json.dumps(index))
    write_manifest(d)
    assert_fails(d, name, "missing")


# ---- on load ------------------------------------------------------------------------------------------------
def test_load_model_and_generate_verify_on_demand(good, tmp_path, capsys):
    d = damaged(good, "dynamic", tmp_path)
    shard = d / "model-00001-of-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside tensor data: the header check on load cannot see it
    shard.write_bytes(bytes(data))
    goldstick.load_model(d)  # loads: headers and sizes are fine
    with pytest.raises(VerifyError, match="sha256 differs"):
        goldstick.load_model(d, verify=True)
    assert cli(["generate", str(d), "hi", "--max-tokens", "1", "--verify"]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    assert cli(["generate", str(good["dynamic"]), "hi", "--max-tokens", "1", "--verify"]) == 0


def test_loader_checks_headers_before_use(good, tmp_path):
    d = damaged(good, "dynamic", tmp_path)
    shard = d / "model-00001-of-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(goldstick.CheckpointError, match="truncated"):
        goldstick.load_model(d)


@pytest.mark.slow
def test_mixed_recipe_checkpoint_passes(tmp_path):
    """OS+ leaves norm biases and ``beta`` tensors; they are described and checked too."""
    recipe = load_recipe("deepseek-r1-w8a8-mixed")
    recipe = dataclasses.replace(recipe, options=dataclasses.replace(recipe.options, osplus_grid=2, token_sample=16))
    out = goldstick.quantize(default_model_path(), recipe, out=tmp_path / "mixed", export_format="mindspore",
                             **FAST).out
    report = verify(out)
    assert report.ok, report.problems
    labels = json.loads((out / DESCRIPTION).read_text())
    assert any(n.endswith("layernorm.bias") for n in labels) and any(n.endswith(".beta") for n in labels)
    beta = next(n for n in labels if n.endswith(".beta"))
    rewrite(out, beta, lambda t: t.__setitem__(beta, t[beta][:-2].copy()))
    assert_fails(out, beta, "its description implies BF16")


@pytest.mark.parametrize("recipe, fmt", [("deepseek-r1-w8a8-mixed", "ascend"), ("deepseek-r1-w8a8-dynamic", "ascend"),
                                         ("deepseek-r1-w8a16", "vllm-ascend")])
def test_quantize_default_targets_pass(tmp_path, recipe, fmt):
    """What quantize writes without --format (an ascend target) verifies, and a damaged scale is named."""
    loaded = load_recipe(recipe)
    if loaded.options.osplus_grid:
        loaded = dataclasses.replace(loaded, options=dataclasses.replace(loaded.options, osplus_grid=2,
                                                                         token_sample=16))
    out = goldstick.quantize(default_model_path(), loaded, out=tmp_path / "q",
                             **(FAST if recipe.endswith("mixed") else {"progress": False})).out
    report = verify(out)
    assert report.ok, report.problems
    assert report.format == fmt
    name = "model.layers.0.mlp.down_proj.weight_scale"
    rewrite(out, name, lambda t: t.__setitem__(name, t[name][:-1].copy()))
    report = verify(out, hashes=False)
    assert not report.ok and any(name in p for p in report.problems)
