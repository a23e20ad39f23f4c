"""What `quantize` tells its user and what it records: the calibration size and its origin before the run, a time
estimate measured on the first layer, progress inside a layer, the layer a resume starts from, the calibration the
run really used in recipe.yaml, and calibration sequences clipped to the model's context."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from folders import digests

from goldstick.engine.calibration import CalibrationSet
from goldstick.engine.feedback import Feedback, calibration_summary
from goldstick.engine.pipeline import QuantizeError, quantize
from goldstick.quant.recipe import Calibration, load_recipe
from goldstick.testing.make_model import default_model_path

SMALL = dict(calib_samples=4, calib_seq_len=64)
DEFAULT_DATA = "calibration/mixed-zh-en.jsonl"


@pytest.fixture(scope="module")
def tiny() -> Path:
    return default_model_path()


# ---- before and during the run --------------------------------------------------------------------------------
def test_a_run_says_its_calibration_work_and_estimate_and_shows_progress_inside_layers(tiny, tmp_path, capsys):
    quantize(tiny, "deepseek-r1-w8a8-mixed", out=tmp_path / "q", progress=True, **SMALL)
    err = capsys.readouterr().err
    assert ("calibration: 4 samples x 64 tokens = 256 tokens (given; the recipe's default: 128 x 2048) from "
            f"{DEFAULT_DATA} (the default), seed 0") in err
    # the work (tokens per layer, OS+ candidates) before the first layer computes, then the measured estimate
    work = next(line for line in err.splitlines() if "work: 4 layers, each " in line)
    assert "256 tokens through the attention (statistics pass)" in work
    assert "through the whole layer (float and quantized passes, 60 OS+ candidates on a 256-token sample)" in work
    assert err.index("work: 4 layers") < err.index("statistics pass:")  # said before the first pass ran
    # measured on the first layer of each kind: dense layer 0 (the MoE layers counted as dense), then MoE layer 1
    dense, moe = [line for line in err.splitlines() if line.startswith("estimate: about ")]
    assert "for the 4 layers left (an estimate: dense layer 0's first passes timed" in dense
    assert "the 3 MoE layers counted as dense ones until layer 1 is timed" in dense
    assert "for the 3 layers left (an estimate: MoE layer 1's first passes timed" in moe
    # a second bar inside each layer: its phases, counted in tokens and in OS+ candidates
    for phase in ("statistics pass:", "float pass on the sample:", "OS+ search:", "quantized pass:"):
        assert phase in err, phase
    assert "/60 [" in err and "candidate/s" in err and "tok/s" in err


def test_no_progress_means_no_output(tiny, tmp_path, capsys):
    quantize(tiny, "deepseek-r1-w8a8-smoothquant", out=tmp_path / "q", progress=False, **SMALL)
    assert capsys.readouterr() == ("", "")


def test_the_recipe_default_size_is_named_as_such():
    recipe = load_recipe("deepseek-r1-w8a8-mixed")
    calib = CalibrationSet(batches=[], source=DEFAULT_DATA, sha256=None, samples=128, seq_len=2048, seed=0,
                           tokens=128 * 2048, pretokenized=False)
    line = calibration_summary(recipe, calib, dict.fromkeys(("samples", "seq_len", "data", "seed"), False),
                               needed=True)
    assert line == ("calibration: 128 samples x 2048 tokens = 262,144 tokens (recipe deepseek-r1-w8a8-mixed's "
                    f"default; --calib-samples / --calib-seq-len change it) from {DEFAULT_DATA} (the default), seed 0")


def test_the_estimate_is_the_measured_rate_times_the_work():
    feedback = Feedback(enabled=False)
    assert feedback.estimate({"statistics": 0, "layer": 100}) is None  # nothing timed: no estimate
    feedback.phase("float pass", 50, "tok", kind="layer")
    feedback.advance(50, "tok")
    feedback.advance(3, "candidate")  # another unit than the phase's: not counted
    feedback.end_phase()
    tokens, seconds = feedback.measured["layer"]
    assert tokens == 50 and seconds > 0
    assert feedback.estimate({"statistics": 0, "layer": 200}) == pytest.approx(4 * seconds)
    assert feedback.estimate({"statistics": 10, "layer": 200}) is None  # the statistics pass was not timed


# ---- resume and what is recorded -------------------------------------------------------------------------------
def test_resume_names_its_layer_and_recipe_yaml_records_the_calibration_used(tiny, tmp_path, capsys):
    recipe = "deepseek-r1-w8a8-smoothquant"
    once = quantize(tiny, recipe, out=tmp_path / "once", progress=False, **SMALL).out
    written = load_recipe(once / "recipe.yaml")
    assert written.calibration == Calibration(data=DEFAULT_DATA, samples=4, seq_len=64, seed=0)
    assert written == load_recipe(recipe).with_calibration(data=DEFAULT_DATA, samples=4, seq_len=64)
    report = json.loads((once / "report.json").read_text())["calibration"]
    assert (report["samples"], report["seq_len"], report["seed"]) == (4, 64, 0)

    with pytest.raises(QuantizeError, match="resume"):
        quantize(tiny, recipe, out=tmp_path / "twice", stop_after_layer=1, progress=False, **SMALL)
    capsys.readouterr()
    quantize(tiny, recipe, out=tmp_path / "twice", resume=True, progress=True, **SMALL)
    assert "resuming from layer 2 of 4 (layers 0-1 finished)" in capsys.readouterr().err
    assert digests(once) == digests(tmp_path / "twice")  # recipe.yaml included

    # a finished run resumes only with the same recipe and calibration
    with pytest.raises(QuantizeError, match="another recipe or calibration"):
        quantize(tiny, recipe, out=once, resume=True, progress=False, calib_samples=5, calib_seq_len=64)
    with pytest.raises(QuantizeError, match="holds a finished run"):
        quantize(tiny, recipe, out=once, resume=True, progress=False, **SMALL)

    # the recorded recipe alone reproduces the run, every byte
    again = quantize(tiny, once / "recipe.yaml", out=tmp_path / "again", progress=False).out
    assert digests(again) == digests(once)


def test_a_data_free_recipe_is_recorded_as_given_on_both_paths(tiny, tmp_path):
    """Its calibration data only measured the layer path's report; the streaming path reads none."""
    recipe = load_recipe("deepseek-r1-w8a16")
    layers = quantize(tiny, recipe, out=tmp_path / "layers", path="layers", progress=False, calib_samples=2,
                      calib_seq_len=16).out
    streamed = quantize(tiny, recipe, out=tmp_path / "stream", progress=False, executor="inline").out
    assert (layers / "recipe.yaml").read_text() == (streamed / "recipe.yaml").read_text() == recipe.to_yaml()


def test_calibration_longer_than_the_context_is_clipped_with_one_warning(tiny, tmp_path, capsys):
    model = tmp_path / "short-context"
    shutil.copytree(tiny, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = 256
    (model / "config.json").write_text(json.dumps(config, indent=2))

    recipe = load_recipe("deepseek-r1-w8a8-smoothquant")
    assert recipe.calibration.seq_len == 2048  # the recipe's default length
    out = quantize(model, recipe, out=tmp_path / "q", progress=False, calib_samples=2).out
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == ["goldstick: warning: calibration seq_len 2048 is longer than the model's context "
                        "(max_position_embeddings 256): calibrating on sequences of 256 tokens"]
    assert load_recipe(out / "recipe.yaml").calibration.seq_len == 256
    report = json.loads((out / "report.json").read_text())["calibration"]
    assert (report["samples"], report["seq_len"], report["tokens"]) == (2, 256, 512)
    assert any("max_position_embeddings 256" in note for note in report["notes"])
    assert "max_position_embeddings 256" in (out / "report.md").read_text()
