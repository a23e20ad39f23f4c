"""goldstick: post-training quantization of DeepSeek-V3/R1 for Ascend, with C-Eval accuracy analysis.

    goldstick run [--out DIR]                         the main job on the embedded default model:
                                                      quantize with the default recipe, compare with float
    goldstick quantize RECIPE [--model DIR] --out DIR [--dry-run] [--resume] [--calib PATH ...]
                      [--format ascend|vllm-ascend|golden-stick|compressed-tensors|mindspore]
    goldstick export SRC --format FORMAT --out DIR    convert a quantized checkpoint to another format
    goldstick compare FLOAT_DIR QUANT_DIR             float vs quantized on held-out text
    goldstick ceval --model DIR --quantized DIR --data CEVAL_DIR [--shots 0|5] --out DIR
    goldstick ceval eval/JOB.yaml                     C-Eval regression job (exit 3 when the drop fails the gate)
    goldstick generate DIR "prompt" [--temperature T ...] [--no-cache] [--verify]   continuation, with tokens/s
    goldstick serve DIR [--port N] [--host H] [--max-batch B] [--verify]   OpenAI-style HTTP server
    goldstick analyze --model DIR --recipe R --out DIR [--propose --budget X]   per-layer loss analysis
    goldstick make-model --out DIR [--size tiny|wide] [--fp8] [--set KEY=INT ...]
    goldstick verify DIR [--no-hash]                  check a quantized checkpoint (exit 2 listing problems)
    goldstick recipes                                 the shipped recipes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

from goldstick.errors import EXIT_INPUT_ERROR, GoldstickError, UsageError

# goldstick.io.layouts.FORMATS, spelled out so that parsing the command line imports no numerics
FORMAT_CHOICES = ("ascend", "vllm-ascend", "golden-stick", "compressed-tensors", "mindspore")


def _model_or_default(model: str | None) -> Path:
    if model:
        if not Path(model).exists():
            raise UsageError(f"model folder {model}: does not exist")
        return Path(model)
    from goldstick.testing.make_model import default_model_path

    path = default_model_path()
    print(f"model: the embedded default ({path})")
    return path


def _say_if_synthetic(model: Path) -> None:
    """Text from a synthetic model (goldstick make-model, or a checkpoint quantized from one) means nothing: say so."""
    source = model
    report = model / "report.json"
    if report.is_file():
        try:
            source = Path(json.loads(report.read_text()).get("model") or model)
        except (OSError, ValueError):
            pass
    if (model / "make_model.json").is_file() or (source / "make_model.json").is_file():
        print(f"note: {model} is a tiny synthetic model with random weights (goldstick make-model): it exercises "
              "the pipeline, and its text means nothing", file=sys.stderr)


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
    p.add_argument("--format", dest="export_format", choices=FORMAT_CHOICES, default=None,
                   help="checkpoint format: ascend (MindFormers / vllm-mindspore --quantization ascend; the default), "
                        "vllm-ascend (vllm-ascend, MindIE; the default for recipes with W8A16 linears, which "
                        "MindFormers cannot serve), golden-stick (MindFormers golden-stick mode), compressed-tensors "
                        "(vLLM) or mindspore (goldstick's earlier layout); each refuses what its stack cannot "
                        "apply, naming the layers")
    p.add_argument("--max-shard-size", type=float, default=4096, metavar="MB",
                   help="shard size cap in MiB (default 4096, Golden-Stick's)")
    p.add_argument("--path", choices=("auto", "stream", "layers"), default="auto",
                   help="auto (default): stream a recipe that needs no calibration shard by shard from the source "
                        "(no MindSpore, on worker processes), else layer by layer; stream / layers force one")
    p.add_argument("--executor", choices=("local", "threads", "ray", "inline"), default=None,
                   help="where independent units run: local processes (default for the streaming path), threads "
                        "of this process, a Ray cluster (RAY_ADDRESS or a local one; pip install "
                        "'goldstick[ray]'), or inline")
    p.add_argument("--workers", type=int, default=None, help="worker processes or threads (default: every core)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> int:
    from goldstick.quant.recipe import load_recipe

    model = _model_or_default(args.model)
    recipe = load_recipe(args.recipe)
    if args.dry_run:
        from goldstick.model.config import ModelConfig

        plan = recipe.plan(ModelConfig.from_file(model))
        print(plan.format())
        return 0
    if not args.out:
        raise UsageError("quantize: --out is required (or use --dry-run)")
    from goldstick.engine.pipeline import quantize

    started = time.time()
    result = quantize(model, recipe, out=args.out, calibration=args.calib, calib_samples=args.calib_samples,
                      calib_seq_len=args.calib_seq_len, resume=args.resume, progress=not args.no_progress,
                      export_format=args.export_format, max_shard_bytes=int(args.max_shard_size * (1 << 20)),
                      path=args.path, executor=args.executor, workers=args.workers)
    stream = getattr(result, "stream", None)
    if stream is not None:
        print(f"streaming path (data-free recipe, no calibration): {stream.input_bytes / 1e6:.0f} MB read, "
              f"{stream.output_bytes / 1e6:.0f} MB written, {stream.mb_per_s:.0f} MB/s on {stream.executor}")
    print(f"quantized in {time.time() - started:.1f}s -> {result.out}")
    print(f"report: {result.out / 'report.md'}")
    return 0


# ---- export ------------------------------------------------------------------------------------------------------
def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="convert a quantized checkpoint to another format",
                       description="Convert a quantized checkpoint between formats, tensor by tensor, without "
                                   "re-calibrating. Refuses, naming the layers, what the target format cannot hold.")
    p.add_argument("src", help="quantized checkpoint folder (any format goldstick reads)")
    p.add_argument("--format", dest="export_format", required=True, choices=FORMAT_CHOICES)
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--max-shard-size", type=float, default=4096, metavar="MB", help="shard size cap (default 4096)")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from goldstick.io.export import export_checkpoint

    started = time.time()
    out = export_checkpoint(args.src, args.out, args.export_format,
                            max_shard_bytes=int(args.max_shard_size * (1 << 20)))
    print(f"exported {args.src} -> {out} ({args.export_format}) in {time.time() - started:.1f}s")
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
    from goldstick.evaluation.compare import HELDOUT, compare_models

    result = compare_models(args.float_dir, args.quant_dir, data=args.data or HELDOUT, samples=args.samples,
                            seq_len=args.seq_len)
    print(json.dumps(result.as_dict(), indent=2))
    return 0


# ---- generate ----------------------------------------------------------------------------------------------------
def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt (greedy or sampled), with tokens/s",
                       description="Continue a prompt with a float or quantized checkpoint. Greedy unless "
                                   "--temperature > 0; decodes with the MLA latent KV cache unless --no-cache.")
    p.add_argument("model", nargs="?", help="checkpoint folder, float or quantized (default: embedded model)")
    p.add_argument("prompt", nargs="?", default="I love Beijing, because")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--no-cache", action="store_true", help="rerun the whole sequence every step (no KV cache)")
    p.add_argument("--verify", action="store_true", help="check the checkpoint first (goldstick verify: hashes, "
                                                         "tensors, scales) and refuse it if anything is wrong")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from goldstick.serve.generate import Generator, SamplingParams

    model = _model_or_default(args.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            ignore_eos=args.ignore_eos).check()
    if args.verify:
        _verify_first(model)
    _say_if_synthetic(model)
    generator = Generator.from_dir(model)
    (completion,), timing = generator.generate(args.prompt, params, use_cache=not args.no_cache)
    print(args.prompt + completion.text)
    mode = "no cache" if args.no_cache else "KV cache"
    print(f"[{timing.new_tokens} tokens in {timing.seconds:.2f}s: {timing.tokens_per_second:.1f} tokens/s "
          f"({mode}; prompt {timing.prompt_tokens} tokens, first token after {timing.prefill_seconds:.2f}s, "
          f"then {timing.decode_tokens_per_second:.1f} tokens/s); finish: {completion.finish_reason}]")
    return 0


def _verify_first(model: Path) -> None:
    """--verify: the full check of goldstick verify before the model is loaded (VerifyError lists every problem)."""
    from goldstick.io.verification import verify

    print(verify(model).raise_if_failed().summary(), file=sys.stderr)


# ---- serve -------------------------------------------------------------------------------------------------------
def add_serve_parser(sub) -> None:
    from goldstick.serve import MAX_BATCH as MAX_SERVE_BATCH

    p = sub.add_parser("serve", help="OpenAI-style HTTP server (/v1/completions, /v1/chat/completions, /v1/models)",
                       description="Serve a float or quantized checkpoint over HTTP (FastAPI + uvicorn, installed "
                                   "with goldstick). The port is taken before the model loads.")
    p.add_argument("model", nargs="?", help="checkpoint folder (default: embedded model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: the path as given; its folder name also matches)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-batch", type=int, default=MAX_SERVE_BATCH,
                   help=f"prompts of concurrent requests run together as one batch (default {MAX_SERVE_BATCH}; "
                        "1 serves one request at a time)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--verify", action="store_true", help="check the checkpoint first (goldstick verify: hashes, "
                                                         "tensors, scales) and refuse it if anything is wrong")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"goldstick serve needs FastAPI and uvicorn ({exc}): pip install fastapi uvicorn") from None
    from goldstick.serve.http import serve

    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {args.max_batch}")
    model = _model_or_default(args.model)
    if args.verify:
        _verify_first(model)
    _say_if_synthetic(model)
    serve(model, host=args.host, port=args.port, served_model_name=args.served_model_name,
          max_body_bytes=args.max_body_bytes, log_level=args.log_level, max_batch=args.max_batch)
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
    from goldstick.engine.pipeline import quantize
    from goldstick.evaluation.compare import compare_models
    from goldstick.quant.recipe import DEFAULT_RECIPE

    model = _model_or_default(None)
    out = Path(args.out)
    quant_dir = out / "quantized"
    if quant_dir.exists():
        import shutil

        shutil.rmtree(quant_dir)
    recipe = args.recipe or DEFAULT_RECIPE
    started = time.time()
    quantize(model, recipe, out=quant_dir, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    seconds = time.time() - started
    comparison = compare_models(model, quant_dir)
    summary = {"recipe": recipe, "model": str(model), "quantized": str(quant_dir),
               "quantize_seconds": round(seconds, 1),
               "heldout_comparison": comparison.as_dict()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["heldout_comparison"], indent=2))
    print(f"\nquantized checkpoint: {quant_dir}")
    print(f"quantization report:  {quant_dir / 'report.md'}")
    print(f"summary:              {out / 'summary.json'}")
    return 0


def run_recipes(args) -> int:
    from goldstick.quant.recipe import DEFAULT_RECIPE, load_recipe, shipped_recipes

    for name in shipped_recipes():
        mark = " (default)" if name == DEFAULT_RECIPE else ""
        print(f"{name}{mark}: {load_recipe(name).description}")
    return 0


def add_analyze_parser(sub) -> None:
    from goldstick.evaluation.analyze import add_analyze_parser as add

    add(sub)


def main(argv: list[str] | None = None) -> int:
    from goldstick.testing.make_model import add_make_model_parser

    parser = argparse.ArgumentParser(prog="goldstick", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"goldstick {version('goldstick')}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    add_quantize_parser(sub)
    add_export_parser(sub)
    add_compare_parser(sub)
    add_generate_parser(sub)
    add_serve_parser(sub)
    add_make_model_parser(sub)
    from goldstick.evaluation.ceval import add_ceval_parser

    add_ceval_parser(sub)
    add_analyze_parser(sub)
    from goldstick.io.verification import add_verify_parser

    add_verify_parser(sub)
    sub.add_parser("recipes", help="list the shipped recipes").set_defaults(func=run_recipes)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:  # quantize says how to resume
        print(f"goldstick: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    except (GoldstickError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as exc:
        # bad input (ours name the file/tensor/key/line; the OS errors name the path): a traceback adds nothing
        print(f"goldstick: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except (ValueError, RuntimeError) as exc:
        # not an error goldstick raises on purpose: status 1 tells it apart from bad input
        print(f"goldstick: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
