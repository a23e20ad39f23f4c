"""The ``goldstick`` command.

    goldstick run [--out DIR]                         the main job on the embedded default model:
                                                      quantize with the default recipe, compare with float
    goldstick quantize RECIPE [--model DIR] --out DIR [--dry-run] [--resume] [--calib PATH ...]
    goldstick compare FLOAT_DIR QUANT_DIR             float vs quantized on held-out text
    goldstick generate DIR "prompt"                   greedy continuation, with tokens/s
    goldstick make-model --out DIR [--size tiny|wide] [--fp8]
    goldstick recipes                                 the shipped recipes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _model_or_default(model: str | None) -> Path:
    if model:
        return Path(model)
    from .make_model import default_model_path

    path = default_model_path()
    print(f"model: the embedded default ({path})")
    return path


# ---- quantize ----------------------------------------------------------------------------------------------------
def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint with a recipe",
                       description="Quantize a DeepSeek-V3/R1 checkpoint with a recipe (a shipped name or a YAML "
                                   "path). Without --model, the embedded default model.")
    p.add_argument("recipe", help="recipe name (see `goldstick recipes`) or path to a recipe YAML")
    p.add_argument("--model", help="HF checkpoint folder (default: the embedded tiny model)")
    p.add_argument("--out", help="output folder (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (every linear, its scheme, the rule "
                                                          "that chose it) and stop, computing nothing")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--calib", help="calibration data: .jsonl, datasets folder/file or hub name")
    p.add_argument("--calib-samples", type=int, help="number of calibration sequences")
    p.add_argument("--calib-seq-len", type=int, help="tokens per calibration sequence")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> int:
    from .recipe import load_recipe

    model = _model_or_default(args.model)
    recipe = load_recipe(args.recipe)
    if args.dry_run:
        from .config import ModelConfig

        plan = recipe.plan(ModelConfig.from_file(model))
        print(plan.format())
        return 0
    if not args.out:
        print("goldstick quantize: --out is required (or use --dry-run)", file=sys.stderr)
        return 2
    from .quantize import quantize

    started = time.time()
    result = quantize(model, recipe, out=args.out, calibration=args.calib, calib_samples=args.calib_samples,
                      calib_seq_len=args.calib_seq_len, resume=args.resume, progress=not args.no_progress)
    print(f"quantized in {time.time() - started:.1f}s -> {result.out}")
    print(f"report: {result.out / 'report.md'}")
    return 0


# ---- compare -----------------------------------------------------------------------------------------------------
def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="float vs quantized logits on held-out text")
    p.add_argument("float_dir")
    p.add_argument("quant_dir")
    p.add_argument("--data", default=None, help="held-out .jsonl (default: the shipped held-out set)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.set_defaults(func=run_compare)


def run_compare(args) -> int:
    from .evaluate import HELDOUT, compare_models

    result = compare_models(args.float_dir, args.quant_dir, data=args.data or HELDOUT, samples=args.samples,
                            seq_len=args.seq_len)
    print(json.dumps(result.as_dict(), indent=2))
    return 0


# ---- generate ----------------------------------------------------------------------------------------------------
def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="greedy continuation of a prompt")
    p.add_argument("model", nargs="?", help="checkpoint folder, float or quantized (default: embedded model)")
    p.add_argument("prompt", nargs="?", default="I love Beijing, because")
    p.add_argument("--max-tokens", type=int, default=32)
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from .generate import greedy_generate

    model = _model_or_default(args.model)
    text, stats = greedy_generate(model, args.prompt, args.max_tokens)
    print(text)
    print(f"[{stats['new_tokens']} tokens in {stats['seconds']:.2f}s: {stats['tokens_per_second']:.1f} tokens/s]")
    return 0


# ---- run: the main job -------------------------------------------------------------------------------------------
def add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="the main job on the embedded default model: quantize with the default "
                                   "recipe and compare with float on held-out text")
    p.add_argument("--out", default="out", help="results folder (default: ./out)")
    p.add_argument("--recipe", default=None, help="recipe (default: deepseek-r1-w8a8-mixed)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.set_defaults(func=run_main_job)


def run_main_job(args) -> int:
    from .evaluate import compare_models
    from .quantize import quantize
    from .recipe import DEFAULT_RECIPE

    model = _model_or_default(None)
    out = Path(args.out)
    quant_dir = out / "quantized"
    if quant_dir.exists():
        import shutil

        shutil.rmtree(quant_dir)
    recipe = args.recipe or DEFAULT_RECIPE
    started = time.time()
    result = quantize(model, recipe, out=quant_dir, calib_samples=args.calib_samples,
                      calib_seq_len=args.calib_seq_len)
    seconds = time.time() - started
    comparison = compare_models(model, quant_dir)
    summary = {"recipe": recipe, "model": str(model), "quantized": str(quant_dir), "quantize_seconds": round(seconds, 1),
               "heldout_comparison": comparison.as_dict()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["heldout_comparison"], indent=2))
    print(f"\nquantized checkpoint: {quant_dir}")
    print(f"quantization report:  {quant_dir / 'report.md'}")
    print(f"summary:              {out / 'summary.json'}")
    return 0


def run_recipes(args) -> int:
    from .recipe import DEFAULT_RECIPE, load_recipe, shipped_recipes

    for name in shipped_recipes():
        mark = " (default)" if name == DEFAULT_RECIPE else ""
        print(f"{name}{mark}: {load_recipe(name).description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .make_model import add_make_model_parser

    parser = argparse.ArgumentParser(prog="goldstick", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    add_quantize_parser(sub)
    add_compare_parser(sub)
    add_generate_parser(sub)
    add_make_model_parser(sub)
    sub.add_parser("recipes", help="list the shipped recipes").set_defaults(func=run_recipes)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError, FileExistsError) as exc:
        # our errors name the file/tensor/key; a traceback adds nothing for the user
        print(f"goldstick: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
