"""Crash and resume with real kills (issue 7, part 2).

`goldstick quantize` runs as a subprocess on the embedded 4-layer model with a 2 MiB shard cap (9 shards). It is
SIGKILLed at seeded random moments spread over its layer phase, and inside two writes forced by the
GOLDSTICK_TEST_STALL hook (goldstick/faults.py: the writer stops with a file's header and half its data on disk and
waits to be killed): a shard of the final checkpoint and a layer's work file. Every kill is followed by a
`--resume` run, which is itself the next one killed; the last one completes. Every file of the result (shards,
index, config, description, recipe, report, manifest) must be byte-identical to an uninterrupted run: the report
holds no timings or dates, so nothing is excluded. Ctrl-C (SIGINT) must give one message naming the layer to resume
from, exit status 130, no traceback, and a state that `--resume` completes into the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from goldstick.engine import WORK_DIR, QuantizeError, quantize
from goldstick.make_model import default_model_path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "deepseek-r1-w8a8-dynamic"        # cheap: the kill sequence reruns it many times
CALIBRATED = "deepseek-r1-w8a8-smoothquant"  # statistics, smoothing folded into norms: the Ctrl-C test
ARGS = ["--calib-samples", "4", "--calib-seq-len", "32", "--no-progress", "--max-shard-size", "2"]
TIMED_KILLS = 5
SEED = 20261127
POLL = 0.01
TIMEOUT = 300


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def start(recipe: str, out: Path, *extra: str, stall: str | None = None, marker: Path | None = None,
          progress: bool = False):
    env = dict(os.environ)
    env.pop("GOLDSTICK_TEST_STALL", None)
    if stall:
        env.update(GOLDSTICK_TEST_STALL=stall, GOLDSTICK_TEST_STALL_MARKER=str(marker))
    args = [a for a in ARGS if a != "--no-progress" or not progress]
    return subprocess.Popen([sys.executable, "-m", "goldstick.cli", "quantize", recipe, "--model",
                             str(default_model_path()), "--out", str(out), *args, *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    # a shell starts background jobs with SIGINT ignored, and Python then never turns SIGINT into
    # KeyboardInterrupt: give the child the disposition an interactive Ctrl-C would meet
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def layer_phase_started(proc: subprocess.Popen) -> threading.Event:
    """Set when the run's progress bar first appears on stderr: calibration is loaded, the layer loop begins."""
    started = threading.Event()

    def read():
        seen = ""
        try:
            for chunk in iter(lambda: proc.stderr.read(64), ""):
                seen = (seen + chunk)[-256:]
                if "quantize:" in seen:
                    started.set()
        except (ValueError, OSError):  # the pipe was closed after a kill
            pass
    threading.Thread(target=read, daemon=True).start()
    return started


def finished_layer(out: Path) -> int | None:
    try:
        return json.loads((out / WORK_DIR / "state.json").read_text())["finished"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def wait_for(proc: subprocess.Popen, condition, what: str, may_finish: bool = False) -> None:
    deadline = time.time() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            if may_finish and proc.returncode == 0:
                return
            pytest.fail(f"quantize exited ({proc.returncode}) before {what}:\n{proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {TIMEOUT}s")
        time.sleep(POLL)


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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One run per recipe, no kill; for RECIPE also the times (from start) at which its phases ended."""
    runs = {}
    for recipe in (RECIPE, CALIBRATED):
        out = tmp_path_factory.mktemp("whole") / recipe
        started = time.time()
        proc = start(recipe, out)
        marks, seen = {}, -2
        while proc.poll() is None:
            if "work" not in marks and (out / WORK_DIR / "state.json").exists():
                marks["work"] = time.time() - started  # calibration loaded, layer 0 begins
            done = finished_layer(out)
            if done is not None and done > seen:
                seen = done
                marks[f"layer {done}"] = time.time() - started
            time.sleep(POLL)
        assert proc.returncode == 0, proc.stderr.read()
        marks["end"] = time.time() - started
        files = digests(out)
        assert sum(n.startswith("model-") for n in files) >= 4 and "manifest.json" in files
        runs[recipe] = (files, marks)
    return runs


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    proc.stdout.close()
    proc.stderr.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_and_mid_writes_then_resume_is_byte_identical(uninterrupted, tmp_path):
    want, marks = uninterrupted[RECIPE]
    startup = marks["work"]
    layer_ends = [marks[f"layer {i}"] for i in range(4)]
    layer_time = [b - a for a, b in zip([startup] + layer_ends, layer_ends)]
    assembly = marks["end"] - layer_ends[-1]
    rng = random.Random(SEED)
    out = tmp_path / "killed"
    # the kills, in order: inside the write of layer 1's or 2's work file, at TIMED_KILLS seeded random moments of
    # what is left of the run, inside the write of a random shard of the final checkpoint
    plan = ["layer-write"] + ["time"] * TIMED_KILLS + ["shard-write"]
    log, landed, procs, retries = [], 0, [], 3
    try:
        while plan:
            kind = plan.pop(0)
            done = finished_layer(out)
            first = -1 if done is None else done
            resume = ["--resume"] if out.exists() else []
            if kind == "time":
                proc = start(RECIPE, out, *resume, progress=True)
                procs.append(proc)
                looping = layer_phase_started(proc)
                # a random moment of the layers left (once none is left: of the assembly's first part), timed from
                # the start of this run's layer loop with the uninterrupted run's phase durations
                left = sum(layer_time[first + 1:])
                at = rng.uniform(0.0, 0.8) * left if left else rng.uniform(0.0, 0.3) * assembly
                wait_for(proc, looping.is_set, "the layer loop", may_finish=True)
                t0 = time.time()
                while time.time() - t0 < at and proc.poll() is None:
                    time.sleep(POLL)
                kill(proc)
                if (out / "manifest.json").exists():  # the moment came after the end (a faster machine): retry
                    assert proc.returncode in (0, -signal.SIGKILL)
                    if (out / WORK_DIR).exists():  # killed while removing the work folder: a resume cleans up
                        resumed = start(RECIPE, out, "--resume")
                        procs.append(resumed)
                        assert resumed.wait(TIMEOUT) == 0, resumed.stderr.read()
                        log.append("the kill landed in the final cleanup; --resume finished it")
                    assert digests(out) == want
                    log.append(f"random moment {at:.2f}s: the run had finished (identical files); starting over")
                    shutil.rmtree(out)
                    assert retries > 0, log
                    retries -= 1
                    plan.insert(0, kind)
                    continue
                assert proc.returncode == -signal.SIGKILL, log
                landed += 1
                log.append(f"random moment {at:.2f}s into the layer loop (from layer {first + 1} of 0..3): "
                           f"{phase(out)}")
            else:
                marker = tmp_path / f"stalled-{len(log)}"
                if kind == "layer-write":
                    layer = rng.randint(1, 2)
                    pattern = f".layer-{layer:05d}.safetensors.tmp.safetensors"
                else:
                    shard = rng.randint(1, 9)
                    pattern = f".goldstick-*-{shard:05d}.safetensors.partial"
                proc = start(RECIPE, out, *resume, stall=pattern, marker=marker)
                procs.append(proc)
                wait_for(proc, marker.exists, f"a stall in {pattern}")
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
        assert landed == TIMED_KILLS, log
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
    print("\nkill points (uninterrupted run: startup %.2fs, layers end at %s s, done at %.2fs):"
          % (startup, [round(t, 2) for t in layer_ends], marks["end"]))
    print("\n".join(f"  {k + 1}. {line}" for k, line in enumerate(log)))


@pytest.mark.slow
def test_ctrl_c_gives_one_message_and_a_resumable_state(uninterrupted, tmp_path):
    want, _ = uninterrupted[CALIBRATED]
    out = tmp_path / "interrupted"
    # Ctrl-C in layer 2, after layer 1 is committed: held in the write of layer 2's work file, so that a fast machine
    # cannot finish the run before the signal lands
    marker = tmp_path / "stalled-layer"
    proc = start(CALIBRATED, out, stall=".layer-00002.safetensors.tmp.safetensors", marker=marker)
    wait_for(proc, marker.exists, "the write of layer 2's work file")
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
    wait_for(proc, marker.exists, "the write of shard 3")
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
             ("hidden.npz", flip, "does not match the sha256"),
             ("layer-00001.json", remove, "is missing")]
    for name, how, message in cases:
        out = damaged(name, how)
        with pytest.raises(QuantizeError, match=f"{name} {message}"):
            quantize(model, RECIPE, out=out, resume=True, **FAST)
        assert not (out / "manifest.json").exists()

    resumed = quantize(model, RECIPE, out=tmp_path / "base", resume=True, **FAST).out
    once = quantize(model, RECIPE, out=tmp_path / "once", **FAST).out
    assert digests(resumed) == digests(once)

    # killed while removing the work folder, after the manifest: --resume finishes the cleanup only
    (resumed / work).mkdir()
    (resumed / work / "layer-00002.json").write_text("{}")
    quantize(model, RECIPE, out=resumed, resume=True, **FAST)
    assert digests(resumed) == digests(once)
    with pytest.raises(QuantizeError, match="finished run"):
        quantize(model, RECIPE, out=resumed, resume=True, **FAST)
