"""C-Eval: accuracy of a float model and quantized ones on the same questions, and the accuracy-loss analysis.

``goldstick ceval`` (this module: the command line) runs ``run_ceval`` or a regression job. The parts, each
depending only on those before it:

* ``ceval_data``: the 52 subjects, the official CSV layout (or the hub), the answer-only prompt, tokenized requests;
* ``ceval_scoring``: a network's A-D scores on the requests (``ModelRun``) and the accuracy summaries;
* ``endpoint``: the same scores from a served model (any OpenAI-compatible endpoint) over HTTP;
* ``ceval_stats``: float against quantized (paired bootstrap, flips, McNemar, KL), ``build_report`` and the gate;
* ``ceval_overlap``: the guard against calibration data that holds evaluated questions;
* ``ceval_report``: ``ceval.json``, ``ceval.md``, the plots, ``predictions.jsonl`` and the printed summary;
* ``ceval_run``: ``run_ceval``, the float model and the quantized ones, scored, compared and written;
* ``ceval_jobs``: regression jobs (YAML), quantizing first when a job names a recipe.
"""

from __future__ import annotations

import os
import sys

from goldstick.evaluation.ceval_data import HUB_NAME, SPLITS, CEvalError
from goldstick.evaluation.ceval_jobs import load_job, run_job
from goldstick.evaluation.ceval_report import print_summary
from goldstick.evaluation.ceval_run import run_ceval
from goldstick.evaluation.endpoint import APIS, LETTER_FALLBACKS, SCORINGS, EndpointOptions


# ---- CLI ---------------------------------------------------------------------------------------------------------
def add_ceval_parser(sub) -> None:
    p = sub.add_parser(
        "ceval", help="C-Eval accuracy of a float model and quantized ones; or run a regression job (YAML)",
        description="C-Eval answer-only evaluation (official prompt, next-token A/B/C/D logits) of a float model "
                    "and quantized checkpoints on the same questions, with the accuracy-loss analysis. A model may "
                    "also be a served one (any OpenAI-compatible endpoint: vllm-mindspore, vLLM, goldstick serve), "
                    "scored over HTTP. With a job file (eval/*.yaml), runs the job and exits 3 when the accuracy "
                    "drop fails its gate.")
    p.add_argument("job", nargs="?", help="a regression job file (YAML); the other options then override it")
    p.add_argument("--model", metavar="[NAME=]DIR|URL",
                   help="float checkpoint folder, or a served model http://HOST:PORT/v1[?model=SERVED_NAME] "
                        "(default: the embedded tiny model)")
    p.add_argument("--quantized", action="append", default=[], metavar="[LABEL=]DIR|URL",
                   help="quantized checkpoint folder or served model URL (repeatable)")
    p.add_argument("--data", help=f"C-Eval folder ({{dev,val,test}}/{{subject}}_{{split}}.csv) or '{HUB_NAME}' "
                                  "(default: $GOLDSTICK_CEVAL_DIR)")
    p.add_argument("--split", default=None, choices=SPLITS, help="split to evaluate (default: val)")
    p.add_argument("--shots", type=int, default=None, choices=(0, 1, 2, 3, 4, 5),
                   help="dev examples in the prompt (default 0)")
    p.add_argument("--subjects", help="comma-separated subject handles, categories or 'hard' (default: all)")
    p.add_argument("--limit", type=int, help="first N questions of each subject")
    p.add_argument("--out", help="report folder (ceval.json, ceval.md, plots)")
    p.add_argument("--allowed-drop", type=float, default=None,
                   help="gate: allowed drop in points (float minus quantized, mean over subjects); exit 3 if exceeded")
    p.add_argument("--gate", choices=("point", "significant", "strict"), default=None,
                   help="gate rule (default: significant; see eval/README.md)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=None, help="bootstrap seed (default 0)")
    p.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per forward batch (default 4096)")
    p.add_argument("--no-shared-prefix", action="store_true",
                   help="run every prompt whole instead of prefilling each subject's shared header/shots once")
    e = p.add_argument_group("served models (endpoint URLs; see eval/README.md)")
    e.add_argument("--tokenizer", metavar="DIR",
                   help="folder with the tokenizer.json that builds the prompts; endpoints then get token-id "
                        "prompts (default: text prompts)")
    e.add_argument("--scoring", choices=SCORINGS, default=None,
                   help="logprobs: A-D from the first token's top-20 logprobs (default); generate: extract the "
                        "answer from a generated reply (reasoning models)")
    e.add_argument("--letter-fallback", choices=LETTER_FALLBACKS, default=None,
                   help="echo: the exact logprob of a letter absent from the top 20 (prompt + letter, echo=true, "
                        "max_tokens=0); none: it counts as -inf (default)")
    e.add_argument("--api", choices=APIS, default=None,
                   help="--scoring generate: chat completions with the server's template (default) or completions")
    e.add_argument("--max-tokens", type=int, default=None, help="--scoring generate: token budget per answer "
                                                                "(default 4096)")
    e.add_argument("--concurrency", type=int, default=None, help="requests in flight per endpoint (default 8)")
    e.add_argument("--timeout", type=float, default=None, help="seconds per request (default 600)")
    e.add_argument("--retries", type=int, default=None,
                   help="retries of a request on 429, 5xx or a connection error, with exponential backoff "
                        "(default 5)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_ceval_cli)


ENDPOINT_ARGS = ("scoring", "letter_fallback", "api", "max_tokens", "concurrency", "timeout", "retries")


def run_ceval_cli(args) -> int:
    endpoint = {k: getattr(args, k) for k in ENDPOINT_ARGS if getattr(args, k) is not None}
    if args.job:
        job = load_job(args.job)
        overrides = {k: getattr(args, k) for k in ("data", "split", "shots", "subjects", "limit", "out", "gate",
                                                   "seed", "batch_tokens")
                     if getattr(args, k) is not None}
        if args.model:
            overrides["model"] = args.model
        if args.quantized:
            overrides["quantized"] = list(args.quantized)
            overrides["recipe"] = []
        if args.allowed_drop is not None:
            overrides["allowed_drop"] = args.allowed_drop
        if args.bootstrap is not None:
            overrides["bootstrap_samples"] = args.bootstrap
        if args.tokenizer:
            overrides["tokenizer"] = args.tokenizer
        if endpoint:
            overrides["endpoint"] = {**job.endpoint, **endpoint}
        job = job.with_overrides(**overrides)
        return run_job(job, progress=not args.no_progress, plots=not args.no_plots)
    data = args.data or os.environ.get("GOLDSTICK_CEVAL_DIR")
    if not data:
        raise CEvalError("ceval: --data is required (or set GOLDSTICK_CEVAL_DIR, or give a job file)")
    if not args.quantized:
        print("ceval: no --quantized model: evaluating the float model alone", file=sys.stderr)
    report = run_ceval(args.model, args.quantized, data=data, split=args.split or "val", shots=args.shots or 0,
                       subjects=args.subjects, limit=args.limit, out=args.out,
                       batch_tokens=args.batch_tokens or 4096,
                       bootstrap_samples=args.bootstrap if args.bootstrap is not None else 2000,
                       seed=args.seed or 0, progress=not args.no_progress, plots=not args.no_plots,
                       allowed_drop=args.allowed_drop, gate=args.gate or "significant",
                       share_prefix=not args.no_shared_prefix, tokenizer=args.tokenizer,
                       endpoint_options=EndpointOptions(**endpoint))
    print_summary(report, args.out)
    return 0 if report.get("gate", {}).get("passed", True) else 3
