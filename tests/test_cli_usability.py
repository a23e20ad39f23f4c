"""What a new user meets first: every --help, --version, one `goldstick: error:` line (exit 2) for each mistake that
is easy to make (a busy port, swapped folders, a missing folder, an occupied output), and no silent no-op."""

import argparse
import json
import shutil
import socket
import subprocess
import sys

import pytest

from goldstick import cli
from goldstick.errors import EXIT_INPUT_ERROR
from goldstick.io.export import COMPRESSED_TENSORS, ExportError, check_plan, exportable_recipes
from goldstick.model.config import ModelConfig
from goldstick.quant.recipe import load_recipe, shipped_recipes
from goldstick.testing.make_model import default_model_path


def _subcommands() -> list[str]:
    """The subcommands as the parser defines them (a new one is covered without editing this test)."""
    parser = argparse.ArgumentParser(prog="goldstick")
    sub = parser.add_subparsers(dest="command")
    captured = []
    real = sub.add_parser

    def add_parser(name, **kwargs):
        captured.append(name)
        return real(name, **kwargs)

    sub.add_parser = add_parser
    for adder in (cli.add_run_parser, cli.add_quantize_parser, cli.add_export_parser, cli.add_compare_parser,
                  cli.add_generate_parser, cli.add_serve_parser, cli.add_analyze_parser):
        adder(sub)
    return captured


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "goldstick.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("goldstick: error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_every_subcommand_help_works(capsys):
    with pytest.raises(SystemExit) as top:
        cli.main(["--help"])
    assert top.value.code == 0
    usage = capsys.readouterr().out
    names = usage.split("{", 1)[1].split("}", 1)[0].split(",")
    assert {"analyze", "ceval", "make-model", "verify", "serve"} <= set(names)
    assert set(_subcommands()) <= set(names)
    assert "``" not in usage  # the top-level description is plain text
    for name in names:
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0, name
        assert "usage: goldstick " + name in capsys.readouterr().out


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"goldstick {version('goldstick')}"


def test_serve_on_a_busy_port_is_one_error_line_before_loading():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        default_model_path()  # built (cached) outside the measured command
        done = _run("serve", "--port", str(port), "--host", "127.0.0.1")
    finally:
        busy.close()
    assert done.returncode == EXIT_INPUT_ERROR
    line = _one_error_line(done.stderr)
    assert f"127.0.0.1:{port}" in line and "--port" in line
    assert "loaded" not in done.stdout  # refused before the model was loaded


def test_missing_model_folder_says_it_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert cli.main(["quantize", "deepseek-r1-w8a16", "--model", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"{missing}: does not exist" in _one_error_line(capsys.readouterr().err)
    with pytest.raises(ValueError, match="does not exist"):
        ModelConfig.from_file(missing)


def test_make_model_onto_a_full_folder_names_the_cli_flag(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert cli.main(["make-model", "--out", str(tmp_path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--overwrite" in line and "overwrite=True" not in line
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_ceval_without_data_has_the_error_prefix(monkeypatch, capsys):
    monkeypatch.delenv("GOLDSTICK_CEVAL_DIR", raising=False)
    assert cli.main(["ceval"]) == 2
    assert "--data is required" in _one_error_line(capsys.readouterr().err)


def test_compare_with_the_folders_swapped_says_which_is_which(tmp_path, capsys):
    model = default_model_path()
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    shutil.copy(model / "config.json", quantized / "config.json")
    (quantized / "quantization_description.json").write_text(json.dumps({"lm_head.weight": "FLOAT"}))
    assert cli.main(["compare", str(quantized), str(model)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{quantized} is a quantized checkpoint" in line and "swapped" in line and "float model first" in line


def test_compressed_tensors_refusal_lists_the_recipes_that_export():
    cfg = ModelConfig.from_file(default_model_path())
    exportable = exportable_recipes(cfg)
    assert "deepseek-w8a8-dynamic-smoothquant" in exportable and "deepseek-r1-w8a16" in exportable
    assert "deepseek-r1-w8a8-mixed" not in exportable
    for name in shipped_recipes():  # the list is what check_plan accepts, recipe by recipe
        plan = load_recipe(name).plan(cfg)
        if name in exportable:
            check_plan(cfg, plan, COMPRESSED_TENSORS)
        else:
            with pytest.raises(ExportError) as exc:
                check_plan(cfg, plan, COMPRESSED_TENSORS)
            assert f"export for this model: {', '.join(exportable)};" in str(exc.value)


@pytest.mark.slow
def test_analyze_propose_that_moves_nothing_writes_no_copy(tmp_path, capsys):
    out = tmp_path / "analysis"
    # every linear of the dynamic recipe is already as safe as --safer dynamic: nothing can move
    assert cli.main(["analyze", "--recipe", "deepseek-r1-w8a8-dynamic", "--out", str(out), "--propose",
                     "--calib-samples", "2", "--calib-seq-len", "32", "--plots", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "proposal: none written" in printed and "already at least as safe" in printed
    assert not (out / "proposed-recipe.yaml").exists()
    report = json.loads((out / "analysis.json").read_text())
    assert report["proposal"]["steps"] == [] and report["proposal"]["recipe_file"] is None
    assert "already at least as safe" in (out / "analysis.md").read_text()


def test_generate_on_a_synthetic_model_says_its_text_means_nothing(capsys):
    assert cli.main(["generate", "--max-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("random weights") == 1 and "means nothing" in err
