"""Hostile inputs, each on real files made here: one clear error naming the file/tensor/key/line, exit status 2 from
the command line, a typed exception (a GoldstickError) from the Python API, and no output folder that looks complete.

Every case is a row of CASES: ``make(tmp) -> Case`` builds the bad input and says which command to run, which Python
call must raise which error, and which fragments the message must hold. The bad-checkpoint makers of
tests/test_checkpoint.py (which checks CheckpointReader alone) are reused here through the CLI and ``quantize``.
Where a safe default exists (an expert no calibration token reaches) it is taken and reported, never NaN.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from ckpt_factory import shard_name, small_config, write_checkpoint
from test_checkpoint import BREAKERS, INDEX, rewrite_shard, shard_of

import goldstick
from goldstick.cli import main as cli
from goldstick.errors import GoldstickError, TokenizerError
from goldstick.evaluation.ceval_data import CEvalError, load_ceval
from goldstick.evaluation.ceval_run import run_ceval
from goldstick.io.checkpoint import CheckpointError, CheckpointReader
from goldstick.model.config import ConfigError
from goldstick.quant.recipe import RecipeError, load_recipe
from goldstick.serve.generate import Generator
from goldstick.testing.make_model import default_model_path

REPO = Path(__file__).resolve().parents[1]
CEVAL_FIXTURE = REPO / "tests" / "fixtures" / "ceval"
FAST = dict(calib_samples=2, calib_seq_len=16, progress=False)
DYNAMIC = "deepseek-r1-w8a8-dynamic"
STATIC = "deepseek-r1-w8a8-static-naive"


@dataclass
class Case:
    argv: list[str]                      # the goldstick command (exit status 2 expected)
    api: Callable[[], object]            # the Python call that must raise
    error: type | tuple                  # ... this typed exception
    fragments: list[str]                 # what the message must name
    out: Path | None = None              # an output folder the command must not leave looking complete


def looks_complete(out: Path) -> bool:
    """A goldstick output folder is complete once it has its index and its manifest (the manifest is written last)."""
    return (out / "manifest.json").exists() or (out / INDEX).exists() or (out / "ceval.json").exists()


def tiny_copy(tmp: Path, without: tuple[str, ...] = ()) -> Path:
    """A private copy of the embedded default model (real tokenizer, f32 shards) to damage."""
    model = tmp / "model"
    shutil.copytree(default_model_path(), model, ignore=shutil.ignore_patterns(*without))
    return model


def rewrite_header(path: Path, edit) -> None:
    """Let ``edit`` change the parsed safetensors header; the data bytes stay where they were."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


# ---- checkpoint cases (small FP8 checkpoints of ckpt_factory; they fail before any tokenizer is needed) -----------
LN_A = "model.layers.2.input_layernorm.weight"
LN_B = "model.layers.2.post_attention_layernorm.weight"


def header_length_past_end(d: Path) -> list[str]:
    path = d / shard_name(2, 3)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 1000)
    path.write_bytes(bytes(data))
    return [shard_name(2, 3), "the header claims", f"only {len(data)}"]


def offsets_past_end(d: Path) -> list[str]:
    file = shard_of(d, LN_A)
    size = (d / file).stat().st_size

    def move(header):
        header[LN_A]["data_offsets"] = [size, size + 128]
    rewrite_header(d / file, move)
    return [file, LN_A, "needs data bytes", f"{size}..{size + 128}"]


def negative_offset(d: Path) -> list[str]:
    file = shard_of(d, LN_A)

    def move(header):
        begin, end = header[LN_A]["data_offsets"]
        header[LN_A]["data_offsets"] = [-8, end - begin - 8]
    rewrite_header(d / file, move)
    return [file, LN_A, "corrupt header", "data_offsets are [-8,"]


def overlapping_offsets(d: Path) -> list[str]:
    file = shard_of(d, LN_A)
    assert shard_of(d, LN_B) == file

    def alias(header):
        header[LN_B]["data_offsets"] = list(header[LN_A]["data_offsets"])
    rewrite_header(d / file, alias)
    return [file, LN_A, LN_B, "overlap"]


HEADER_BREAKERS = [header_length_past_end, offsets_past_end, negative_offset, overlapping_offsets]


def checkpoint_case(breaker) -> Callable[[Path], Case]:
    def make(tmp: Path) -> Case:
        model = tmp / "ckpt"
        write_checkpoint(model, small_config(), "fp8", shards=3)
        fragments = breaker(model)
        out = tmp / "out"
        # quantize reads config.json on its own before opening the checkpoint: there it is a ConfigError
        error = (CheckpointError, ConfigError) if breaker.__name__ == "missing_config" else CheckpointError
        return Case(["quantize", DYNAMIC, "--model", str(model), "--out", str(out), "--no-progress"],
                    lambda: goldstick.quantize(model, DYNAMIC, out=out, **FAST), error,
                    [str(f) for f in fragments], out)
    make.__name__ = breaker.__name__
    return make


# ---- weights with NaN / Inf (a copy of the default model: these need its tokenizer and calibration) -------------
def nonfinite_case(name: str, value: float, index: tuple[int, int], stream: bool = False) -> Callable[[Path], Case]:
    """A data-free recipe without calibration options takes the streaming path (goldstick.engine.stream), with
    calibration options the layer path (goldstick.engine.pipeline): both must refuse, with the same error."""
    def make(tmp: Path) -> Case:
        model = tiny_copy(tmp)
        file = shard_of(model, name)

        def poison(tensors):
            tensors[name] = tensors[name].copy()
            tensors[name][index] = value
        rewrite_shard(model / file, poison)
        out = tmp / "out"
        calib = [] if stream else ["--calib-samples", "2", "--calib-seq-len", "16"]
        options = dict(progress=False) if stream else FAST
        return Case(["quantize", DYNAMIC, "--model", str(model), "--out", str(out), "--no-progress", *calib],
                    lambda: goldstick.quantize(model, DYNAMIC, out=out, **options), CheckpointError,
                    [file, f"tensor '{name}'", "1 NaN/Inf value(s)", f"first at index {list(index)}",
                     "refuses to quantize"], out)
    make.__name__ = f"{'nan' if math.isnan(value) else 'inf'}_in_{name.replace('.', '_')}{'_stream' if stream else ''}"
    return make


# ---- recipes ----------------------------------------------------------------------------------------------------
RECIPES = {
    "recipe_unknown_key": ("rules:\n  - match: '.*\\.mlp\\..*_proj'\n    scheme: w8a8-dynamic\n    smoothing: 0.5\n",
                           ["bad.yaml:6", "rules[0]", "unknown key 'smoothing'"]),
    "recipe_bad_regex": ("rules:\n  - match: '.*\\.mlp\\.(gate'\n    scheme: w8a8-dynamic\n",
                         ["bad.yaml:4", "rules[0].match", "invalid regex", "missing )"]),
    "recipe_unknown_scheme": ("rules:\n  - match: '.*\\.mlp\\..*_proj'\n    scheme: w4a8\n",
                              ["bad.yaml:5", "rules[0].scheme", "bad value 'w4a8'", "allowed: float"]),
    "recipe_rule_matches_nothing": ("rules:\n  - match: 'model\\.layers\\.99\\..*'\n    scheme: w8a16\n"
                                    "  - match: '.*\\.mlp\\..*_proj'\n    scheme: w8a8-dynamic\n",
                                    ["bad.yaml", "rule 0", "model\\.layers\\.99", "matches no linear"]),
}


def recipe_case(key: str) -> Callable[[Path], Case]:
    def make(tmp: Path) -> Case:
        text, fragments = RECIPES[key]
        path = tmp / "bad.yaml"
        path.write_text("name: bad\ndefault: float\n" + text)
        out = tmp / "out"

        def api():
            return load_recipe(path).plan(goldstick.ModelConfig.from_file(default_model_path()))
        return Case(["quantize", str(path), "--out", str(out), "--no-progress"], api, RecipeError, fragments, out)
    make.__name__ = key
    return make


# ---- C-Eval CSV -------------------------------------------------------------------------------------------------
def ceval_case(edit: Callable[[list[str]], list[str]], fragments: list[str], name: str) -> Callable[[Path], Case]:
    def make(tmp: Path) -> Case:
        data = tmp / "ceval"
        shutil.copytree(CEVAL_FIXTURE, data)
        csv = data / "val" / "computer_network_val.csv"
        csv.write_text("\n".join(edit(csv.read_text(encoding="utf-8").split("\n"))), encoding="utf-8")
        out = tmp / "out"
        return Case(["ceval", "--data", str(data), "--subjects", "computer_network", "--out", str(out),
                     "--no-plots", "--no-progress"],
                    lambda: load_ceval(data, "val", subjects="computer_network"), CEvalError,
                    [str(csv)] + fragments, out)
    make.__name__ = name
    return make


def drop_answer_column(lines: list[str]) -> list[str]:
    return [line.rsplit(",", 1)[0] if line else line for line in lines]


def answer_e_on_line_3(lines: list[str]) -> list[str]:
    lines[2] = lines[2].rsplit(",", 1)[0] + ",E"
    return lines


# ---- missing tokenizer ------------------------------------------------------------------------------------------
def no_tokenizer_quantize(tmp: Path) -> Case:
    """A recipe that calibrates needs the tokenizer (a data-free one, e.g. DYNAMIC without calibration options, does
    not: tests/test_stream.py)."""
    model = tiny_copy(tmp, without=("tokenizer.json",))
    out = tmp / "out"
    return Case(["quantize", STATIC, "--model", str(model), "--out", str(out), "--no-progress"],
                lambda: goldstick.quantize(model, STATIC, out=out, **FAST), TokenizerError,
                [str(model), "no tokenizer.json"], out)


def no_tokenizer_generate(tmp: Path) -> Case:
    model = tiny_copy(tmp, without=("tokenizer.json",))
    return Case(["generate", str(model), "hello", "--max-tokens", "2"], lambda: Generator.from_dir(model),
                TokenizerError, [str(model), "no tokenizer.json"])


def no_tokenizer_ceval(tmp: Path) -> Case:
    model = tiny_copy(tmp, without=("tokenizer.json",))
    out = tmp / "out"
    return Case(["ceval", "--model", str(model), "--data", str(CEVAL_FIXTURE), "--subjects", "computer_network",
                 "--out", str(out), "--no-plots", "--no-progress"],
                lambda: run_ceval(model, [], data=CEVAL_FIXTURE, subjects="computer_network", out=out, plots=False,
                                  progress=False),
                TokenizerError, [str(model), "no tokenizer.json"], out)


CASES = ([checkpoint_case(b) for b in BREAKERS + HEADER_BREAKERS]
         + [nonfinite_case("model.layers.1.mlp.experts.2.up_proj.weight", float("nan"), (3, 5)),
            nonfinite_case("model.embed_tokens.weight", float("inf"), (7, 0)),
            nonfinite_case("model.layers.2.self_attn.kv_a_proj_with_mqa.weight", float("nan"), (1, 2), stream=True)]
         + [recipe_case(key) for key in RECIPES]
         + [ceval_case(drop_answer_column, [":1:", "missing column(s) answer"], "ceval_missing_column"),
            ceval_case(answer_e_on_line_3, [":3:", "answer 'E' is not one of A, B, C, D"], "ceval_answer_not_a_to_d")]
         + [no_tokenizer_quantize, no_tokenizer_generate, no_tokenizer_ceval])


@pytest.mark.parametrize("make", CASES, ids=lambda f: f.__name__)
def test_bad_input_gives_one_clear_error(tmp_path, capsys, make):
    case = make(tmp_path)
    # the command line: status 2, one "goldstick: error:" line naming what is wrong, no traceback
    code = cli(case.argv)
    err = capsys.readouterr().err
    assert code == 2, err
    message = next(line for line in err.splitlines() if line.startswith("goldstick: error: "))
    for fragment in case.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Traceback" not in err
    if case.out is not None:
        assert not case.out.exists() or not looks_complete(case.out), sorted(os.listdir(case.out))
        shutil.rmtree(case.out, ignore_errors=True)
    # the Python API: the typed exception with the same information
    with pytest.raises(case.error) as caught:
        case.api()
    assert isinstance(caught.value, GoldstickError)
    for fragment in case.fragments:
        assert fragment in str(caught.value), f"{fragment!r} not in {caught.value}"
    if case.out is not None:
        assert not case.out.exists() or not looks_complete(case.out)


def test_real_process_exit_status(tmp_path):
    """The status a shell sees, from a real ``goldstick`` process (not cli.main in this one)."""
    model = tmp_path / "ckpt"
    write_checkpoint(model, small_config(), "fp8", shards=3)
    fragments = overlapping_offsets(model)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "goldstick.cli", "quantize", DYNAMIC, "--model", str(model),
                             "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("goldstick: error: ") == 1 and "Traceback" not in result.stderr
    assert all(f in result.stderr for f in fragments) and not out.exists()


def test_inf_in_lm_head_is_refused_before_the_checkpoint_is_written(tmp_path):
    """lm_head is read after the layers: the run stops there, before anything final is written."""
    model = tiny_copy(tmp_path)
    name = "lm_head.weight"

    def poison(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name][0, 11] = -np.inf
    rewrite_shard(model / shard_of(model, name), poison)
    with pytest.raises(CheckpointError, match=r"tensor 'lm_head\.weight' holds 1 NaN/Inf value\(s\), the first at "
                                              r"index \[0, 11\]"):
        goldstick.quantize(model, DYNAMIC, out=tmp_path / "out", **FAST)
    assert not looks_complete(tmp_path / "out")


def test_float_model_with_nan_loads_with_a_warning(tmp_path):
    """load_model of a float checkpoint warns (naming the tensor) instead of refusing: the model can be inspected."""
    model = tiny_copy(tmp_path)
    name = "model.layers.2.self_attn.o_proj.weight"

    def poison(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name][0, 0] = np.nan
    rewrite_shard(model / shard_of(model, name), poison)
    with pytest.warns(RuntimeWarning, match=rf"tensor '{name}' holds 1 NaN/Inf"):
        goldstick.load_model(model)


# ---- the safe default: an expert no calibration token reaches ----------------------------------------------------
def test_unreached_expert_gets_a_safe_default_and_is_reported(tmp_path):
    """Expert 3 of layer 1 is never chosen (its routing bias is -1e4). With static expert activations and experts
    observed on their routed tokens only, its activation range comes from the layer's MoE input sample; the report
    says so, and every stored number is finite."""
    model = tiny_copy(tmp_path)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"

    def bar(tensors):
        tensors[bias] = tensors[bias].copy()
        tensors[bias][3] = -1e4
    rewrite_shard(model / shard_of(model, bias), bar)
    out = tmp_path / "out"
    recipe = load_recipe("deepseek-r1-w8a8-static-naive")
    recipe = dataclasses.replace(recipe, options=dataclasses.replace(recipe.options, moe_calibrate_all_experts=False))
    result = goldstick.quantize(model, recipe, out=out, **FAST)
    layer = result.report["layers"][1]
    assert layer["expert_tokens"][3] == 0 and 3 in layer["experts_without_tokens"]
    assert sum(layer["expert_tokens"]) > 0
    assert "experts with no token" in (out / "report.md").read_text()
    expert = "model.layers.1.mlp.experts.3."
    with CheckpointReader(out) as reader:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for local in ("input_scale", "deq_scale"):
                values = reader.read(f"{expert}{proj}.{local}")
                assert np.isfinite(values).all() and (values > 0).all(), (proj, local)
            assert np.abs(reader.read_raw(f"{expert}{proj}.weight").astype(np.int32)).max() > 0
    assert goldstick.verify(out).ok
    assert np.isfinite(result.final_logits).all()


def test_every_project_error_is_a_goldstick_error():
    names = ["CheckpointError", "ConfigError", "RecipeError", "CalibrationError", "QuantizeError", "WriterError",
             "ExportError", "CEvalError", "JobError", "AnalyzeError", "VerifyError", "UsageError", "TokenizerError"]
    for name in names:
        cls = getattr(goldstick, name)
        assert issubclass(cls, GoldstickError), name
        assert issubclass(cls, (ValueError, RuntimeError)), name  # the builtin base old callers catch
    assert issubclass(goldstick.QuantizeError, RuntimeError) and issubclass(goldstick.RecipeError, ValueError)
