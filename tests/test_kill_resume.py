"""Crash and resume with real kills.

`goldstick quantize` runs as a subprocess on the embedded 4-layer model with a 2 MiB shard cap (9 shards). It is
SIGKILLed at seeded random points of its own progress, and inside two writes forced by the GOLDSTICK_TEST_STALL hook
(goldstick/io/faults.py: the writer stops with a file's header and half its data on disk and waits to be killed): a
shard of the final checkpoint and a layer's work file. The progress points come from a probe (PROBE below: the CLI
run with a few engine, model and writer functions wrapped) that names every step of the run (`layer 2|float
pass|attend#3`: the third attention call of layer 2's float pass) and, asked for one step, stops there and waits to
be killed, as the stall hook does. An uninterrupted run records the steps; each kill draws one of the steps left
(a layer not yet finished, or the assembly), so every kill lands where it was aimed however loaded the machine is.
Every kill is followed by a `--resume` run, which is itself the next one killed; the last one completes. Every file
of the result (shards, index, config, description, recipe, report, manifest) must be byte-identical to an
uninterrupted run: the report holds no timings or dates, so nothing is excluded. Ctrl-C (SIGINT) must give one
message naming the layer to resume from, exit status 130, no traceback, and a state that `--resume` completes into
the same bytes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from folders import digests

from goldstick.engine.pipeline import QuantizeError, quantize
from goldstick.io.rundir import WORK_DIR
from goldstick.testing.make_model import default_model_path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "deepseek-r1-w8a8-dynamic"        # cheap: the kill sequence reruns it many times
CALIBRATED = "deepseek-r1-w8a8-smoothquant"  # statistics, smoothing folded into norms: the Ctrl-C test
ARGS = ["--calib-samples", "4", "--calib-seq-len", "32", "--no-progress", "--max-shard-size", "2"]
PROGRESS_KILLS = 5  # the first inside a layer's float (calibration) pass, the others anywhere in what is left
SEED = 20261127
POLL = 0.01
TIMEOUT = 300

# The probe: runs `goldstick.cli` with some functions of the run wrapped. Each call is a step, named
# "stage|phase|function#n" (the n-th call of that function in that phase of that stage: "layer 2", "assembly"), so a
# step has the same name in a run resumed before its stage. GOLDSTICK_TEST_PROBE_LOG: append every step's name to
# this file. GOLDSTICK_TEST_PROBE_PAUSE: at that step, before the call, write "<pid> <step>\n" to
# GOLDSTICK_TEST_PROBE_MARKER and sleep until killed (like faults.stall). A function that is gone fails the run.
PROBE = r'''
import functools, os, runpy, sys, time
from pathlib import Path

import goldstick.engine.layer as layer
import goldstick.engine.pipeline as engine
import goldstick.io.rundir as rundir
import goldstick.io.writer as writer

LOG = os.environ.get("GOLDSTICK_TEST_PROBE_LOG")
PAUSE = os.environ.get("GOLDSTICK_TEST_PROBE_PAUSE")
MARKER = os.environ.get("GOLDSTICK_TEST_PROBE_MARKER")
where = {"stage": "startup", "phase": "setup"}
calls = {}


def step(name):
    key = (where["stage"], where["phase"], name)
    calls[key] = calls.get(key, 0) + 1
    label = f"{key[0]}|{key[1]}|{name}#{calls[key]}"
    if LOG:
        with open(LOG, "a") as f:
            f.write(label + "\n")
    if label == PAUSE:
        Path(MARKER).write_text(f"{os.getpid()} {label}\n")
        time.sleep(600)  # bounded in case nobody kills


def probe(owner, attr, stage=None, phase=None, detail=None):
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if stage is not None:
            where["stage"] = stage(args) if callable(stage) else stage
        if phase is not None:
            where["phase"] = phase
        step(attr + (f"({detail(args)})" if detail else ""))
        return original(*args, **kwargs)
    setattr(owner, attr, wrapper)


def file_name(args):
    return Path(args[0]).name


model_probed = []


def probe_model():  # goldstick.model.network imports MindSpore: wrapped once the engine has set MindSpore up
    if not model_probed:
        import goldstick.model.network as model
        import goldstick.quant.cells as qlinear
        probe(model.DecoderLayer, "attend")
        probe(model.DecoderLayer, "feed_forward")
        for cell in (model.Attention, model.MLP, model.Router, model.Linear, model.StreamedLinear,
                     qlinear.DynamicW8A8Linear):  # inside the passes: each cell call is a step
            probe(cell, "construct", detail=lambda args, name=cell.__name__: name)
        model_probed.append(True)


LQ = layer.LayerQuantizer
original_init = LQ.__init__


@functools.wraps(original_init)
def init(self, cfg, layer_index, *args, **kwargs):
    probe_model()
    where["stage"], where["phase"] = f"layer {layer_index}", "load"
    step("LayerQuantizer")
    original_init(self, cfg, layer_index, *args, **kwargs)


LQ.__init__ = init
probe(LQ, "observe", phase="float pass")
probe(layer.RunningStats, "update")
probe(LQ, "quantize", phase="quantize")
for name in ("_set_float", "_set_weight_quant", "_set_dynamic_smoothed", "_set_static"):
    probe(LQ, name, detail=lambda args: args[1])
probe(LQ, "measure", phase="quantized pass")
probe(LQ, "tensors", phase="work files")
probe(engine, "write_safetensors", detail=file_name)
probe(engine, "write_json_atomic", detail=file_name)
probe(engine, "_final_logits", stage="assembly", phase="shards")
probe(engine, "_assemble", stage="assembly", phase="shards")
probe(writer.PlannedShardWriter, "open")
probe(writer.PlannedShardWriter, "write", detail=lambda args: args[1])
probe(writer.PlannedShardWriter, "close")
probe(engine, "write_checkpoint_metadata", phase="metadata")
probe(engine, "write_manifest")
probe(rundir, "write_json_atomic", detail=file_name)
runpy.run_module("goldstick.cli", run_name="__main__", alter_sys=True)
'''


def start(recipe: str, out: Path, *extra: str, stall: str | None = None, marker: Path | None = None,
          pause: str | None = None, record: Path | None = None):
    """``stall``: GOLDSTICK_TEST_STALL (a file name pattern); ``pause``: a step of the probe; ``record``: the probe
    logs every step there. Both hooks write ``marker`` once the run waits to be killed."""
    env = dict(os.environ)
    for name in ("GOLDSTICK_TEST_STALL", "GOLDSTICK_TEST_PROBE_LOG", "GOLDSTICK_TEST_PROBE_PAUSE"):
        env.pop(name, None)
    if stall:
        env.update(GOLDSTICK_TEST_STALL=stall, GOLDSTICK_TEST_STALL_MARKER=str(marker))
    if pause:
        env.update(GOLDSTICK_TEST_PROBE_PAUSE=pause, GOLDSTICK_TEST_PROBE_MARKER=str(marker))
    if record:
        env.update(GOLDSTICK_TEST_PROBE_LOG=str(record))
    cli = ["-c", PROBE] if pause or record else ["-m", "goldstick.cli"]
    return subprocess.Popen([sys.executable, *cli, "quantize", recipe, "--model",
                             str(default_model_path()), "--out", str(out), *ARGS, *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    # a shell starts background jobs with SIGINT ignored, and Python then never turns SIGINT into
    # KeyboardInterrupt: give the child the disposition an interactive Ctrl-C would meet
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finished_layer(out: Path) -> int | None:
    try:
        return json.loads((out / WORK_DIR / "state.json").read_text())["finished"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def wait_for(proc: subprocess.Popen, condition, what: str) -> None:
    deadline = time.time() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"quantize exited ({proc.returncode}) before {what}:\n{proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {TIMEOUT}s")
        time.sleep(POLL)


def waiting(marker: Path):
    """The run waits to be killed: its hook wrote the whole marker line."""
    return lambda: marker.exists() and marker.read_text().endswith("\n")


def phase(out: Path) -> str:
    """Where a killed run stood, from what it left on disk."""
    names = sorted(p.name for p in out.iterdir()) if out.exists() else []
    work = sorted(p.name for p in (out / WORK_DIR).iterdir()) if (out / WORK_DIR).exists() else []
    partial = [n for n in names if n.endswith(".partial")]
    shards = [n for n in names if n.startswith("model-")]
    done = finished_layer(out)
    half = [n for n in work if n.startswith(".layer") and n.endswith(".tmp.safetensors")]
    text = f"layers finished: {done}"
    if half:
        text += f"; work-file temporaries {half}"
    if partial or shards:
        text += f"; assembly: {len(partial)} shard temporaries, {len(shards)} final shards"
    if "model.safetensors.index.json" in names:
        text += "; index written"
    if "manifest.json" in names:
        text += "; manifest written"
    return text


def steps_left(steps: list[str], finished: int) -> dict[str, dict[str, list[str]]]:
    """The steps a run resumed after layer ``finished`` goes through: stage -> phase -> steps, in order."""
    left: dict[str, dict[str, list[str]]] = {}
    for label in steps:
        stage, step_phase, _ = label.split("|")
        if stage == "assembly" or (stage.startswith("layer ") and int(stage.split()[1]) > finished):
            left.setdefault(stage, {}).setdefault(step_phase, []).append(label)
    return left


def draw_stages(rng: random.Random, left: dict[str, dict[str, list[str]]], count: int) -> list[str]:
    """The stages of ``count`` kills: seeded random stages of those left, in the run's order (a kill in a stage
    leaves it and the later ones to do); the first a layer (for its float pass)."""
    stages = list(left)
    picks = sorted(rng.choices(range(len(stages)), k=count))
    picks[0] = min(picks[0], len([s for s in stages if s != "assembly"]) - 1)
    return [stages[k] for k in picks]


def draw_step(rng: random.Random, phases: dict[str, list[str]], phase: str | None = None) -> str:
    """A seeded random step of a stage: a phase (phases hold very different numbers of steps: drawn first, each
    gets its share), then a step of it."""
    return rng.choice(phases[phase or rng.choice(list(phases))])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One run per recipe, no kill; for RECIPE also the probe's steps, in order."""
    runs = {}
    for recipe in (RECIPE, CALIBRATED):
        folder = tmp_path_factory.mktemp("whole")
        out, record = folder / recipe, (folder / "steps.txt" if recipe == RECIPE else None)
        proc = start(recipe, out, record=record)
        _, stderr = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, stderr
        files = digests(out)
        assert sum(n.startswith("model-") for n in files) >= 4 and "manifest.json" in files
        steps = record.read_text().splitlines() if record else []
        if record:
            # the last step writes the manifest: at every step the run has none yet
            assert steps[-1] == "assembly|metadata|write_json_atomic(manifest.json)#1", steps[-5:]
            for i in range(4):
                assert {"float pass", "quantize", "quantized pass", "work files"} <= set(steps_left(steps, i - 1)
                                                                                         [f"layer {i}"]), i
                assert f"layer {i}|float pass|attend#1" in steps
        runs[recipe] = (files, steps)
    return runs


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    proc.stdout.close()
    proc.stderr.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_and_mid_writes_then_resume_is_byte_identical(uninterrupted, tmp_path):
    want, steps = uninterrupted[RECIPE]
    rng = random.Random(SEED)
    out = tmp_path / "killed"
    # the kills, in order: inside the write of layer 1's or 2's work file, at PROGRESS_KILLS seeded random steps of
    # what is left of the run (the first in a layer's float pass), inside the write of a random shard of the final
    # checkpoint. Each run is held by its hook at the chosen point until the kill: every kill lands there.
    plan = ["layer-write", "float-pass"] + ["step"] * (PROGRESS_KILLS - 1) + ["shard-write"]
    log, procs, stages = [], [], []
    try:
        for n, kind in enumerate(plan):
            done = finished_layer(out)
            first = -1 if done is None else done
            resume = ["--resume"] if out.exists() else []
            marker = tmp_path / f"stalled-{n}"
            if kind in ("float-pass", "step"):
                left = steps_left(steps, first)
                if not stages:  # after the layer-write kill: where the progress kills go, in order
                    stages = draw_stages(rng, left, PROGRESS_KILLS)
                stage = stages.pop(0)
                assert stage in left, (stage, log)  # the kills before stopped before it
                target = draw_step(rng, left[stage], "float pass" if kind == "float-pass" else None)
                proc = start(RECIPE, out, *resume, pause=target, marker=marker)
                procs.append(proc)
                wait_for(proc, waiting(marker), f"step {target}")
                kill(proc)
                assert proc.returncode == -signal.SIGKILL, log
                assert marker.read_text().split(maxsplit=1)[1] == target + "\n"
                log.append(f"at step {target} (step {steps.index(target) + 1} of {len(steps)}; resumed after "
                           f"layer {first}): {phase(out)}")
            else:
                if kind == "layer-write":
                    layer = rng.randint(1, 2)
                    pattern = f".layer-{layer:05d}.safetensors.tmp.safetensors"
                else:
                    shard = rng.randint(1, 9)
                    pattern = f".goldstick-*-{shard:05d}.safetensors.partial"
                proc = start(RECIPE, out, *resume, stall=pattern, marker=marker)
                procs.append(proc)
                wait_for(proc, waiting(marker), f"a stall in {pattern}")
                stalled = Path(marker.read_text().split()[1])
                kill(proc)
                assert stalled.exists() and stalled.stat().st_size > 8  # a header and half the data: cut mid-write
                if kind == "layer-write":
                    # the cut file is a temporary nobody trusts: its layer is not recorded as finished
                    assert finished_layer(out) < layer, phase(out)
                    assert f"layer-{layer:05d}.safetensors" not in json.loads(
                        (out / WORK_DIR / "state.json").read_text())["files"]
                log.append(f"inside the write of {stalled.name} ({stalled.stat().st_size} bytes on disk): "
                           f"{phase(out)}")
            # killed: never looks finished
            assert not (out / "manifest.json").exists(), log
        proc = start(RECIPE, out, "--resume")
        procs.append(proc)
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read()
        assert digests(out) == want
        assert not (out / WORK_DIR).exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"\nkill points (seed {SEED}):")
    print("\n".join(f"  {k + 1}. {line}" for k, line in enumerate(log)))


@pytest.mark.slow
def test_ctrl_c_gives_one_message_and_a_resumable_state(uninterrupted, tmp_path):
    want, _ = uninterrupted[CALIBRATED]
    out = tmp_path / "interrupted"
    # Ctrl-C in layer 2, after layer 1 is committed: held in the write of layer 2's work file, so that a fast machine
    # cannot finish the run before the signal lands
    marker = tmp_path / "stalled-layer"
    proc = start(CALIBRATED, out, stall=".layer-00002.safetensors.tmp.safetensors", marker=marker)
    wait_for(proc, waiting(marker), "the write of layer 2's work file")
    assert finished_layer(out) == 1
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().count("\n") == 0, stderr
    done = finished_layer(out)
    assert stderr.strip() == f"goldstick: interrupted; rerun with --resume to continue from layer {done + 1} " \
                             f"({3 - done} of 4 layers left)", stderr
    assert not (out / "manifest.json").exists()

    # Ctrl-C during the assembly, inside the write of shard 3: the writer removes its temporaries
    marker = tmp_path / "stalled"
    proc = start(CALIBRATED, out, "--resume", stall=".goldstick-*-00003.safetensors.partial", marker=marker)
    wait_for(proc, waiting(marker), "the write of shard 3")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "goldstick: interrupted; rerun with --resume to finish writing the checkpoint " \
                             "(all 4 layers are quantized)", stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".partial") or p.name.startswith("model")]

    proc = start(CALIBRATED, out, "--resume")
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr
    assert digests(out) == want


FAST = dict(calib_samples=4, calib_seq_len=32, progress=False, max_shard_bytes=2 << 20)


@pytest.mark.slow
def test_damaged_work_files_are_not_trusted(tmp_path):
    """A work file that is cut, altered or missing makes --resume refuse, naming the file; an intact copy of the
    same state resumes into the same bytes as one run; a run killed after its manifest only needs its cleanup."""
    model = default_model_path()
    with pytest.raises(QuantizeError, match="stopped after layer 1"):
        quantize(model, RECIPE, out=tmp_path / "base", stop_after_layer=1, **FAST)
    work = WORK_DIR

    def damaged(name: str, how) -> Path:
        out = tmp_path / f"{name}-{how.__name__}"
        shutil.copytree(tmp_path / "base", out)
        how(out / work / name)
        return out

    def cut(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))

    def remove(path: Path) -> None:
        path.unlink()

    cases = [("layer-00001.safetensors", cut, "has .* bytes, state.json recorded"),
             ("layer-00000.safetensors", flip, "does not match the sha256"),
             ("hidden-00001.npz", flip, "does not match the sha256"),
             ("layer-00001.json", remove, "is missing")]
    for name, how, message in cases:
        out = damaged(name, how)
        with pytest.raises(QuantizeError, match=f"{name} {message}"):
            quantize(model, RECIPE, out=out, resume=True, **FAST)
        assert not (out / "manifest.json").exists()

    # killed after the next layer's work files were renamed into place, before its commit in state.json: the
    # committed layer's files are untouched, and the uncommitted ones are simply written again
    out = tmp_path / "uncommitted"
    shutil.copytree(tmp_path / "base", out)
    for name in ("layer-00001.safetensors", "layer-00001.json", "hidden-00001.npz"):
        shutil.copy(out / work / name, out / work / name.replace("00001", "00002"))
    assert digests(quantize(model, RECIPE, out=out, resume=True, **FAST).out) == \
        digests(quantize(model, RECIPE, out=tmp_path / "reference", **FAST).out)
    assert not (tmp_path / "base" / work / "hidden-00000.npz").exists()  # only the committed layer's inputs stay

    resumed = quantize(model, RECIPE, out=tmp_path / "base", resume=True, **FAST).out
    once = tmp_path / "reference"
    assert digests(resumed) == digests(once)

    # killed while removing the work folder, after the manifest: --resume finishes the cleanup only
    (resumed / work).mkdir()
    (resumed / work / "layer-00002.json").write_text("{}")
    quantize(model, RECIPE, out=resumed, resume=True, **FAST)
    assert digests(resumed) == digests(once)
    with pytest.raises(QuantizeError, match="finished run"):
        quantize(model, RECIPE, out=resumed, resume=True, **FAST)
