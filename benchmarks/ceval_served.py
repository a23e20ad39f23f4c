"""C-Eval through `goldstick serve` against C-Eval in-process, per model and per subject, and a server killed mid-job.

    python benchmarks/ceval_served.py --data CEVAL_DIR [--subjects all] [--split val] [--limit N]
                                      [--float DIR] [--quantized DIR | --recipe R] [--work DIR] [--kill-after N]

1. Without ``--quantized``, quantizes the float model (default: the embedded one) with ``--recipe`` (default: the
   default mix, deepseek-r1-w8a8-mixed).
2. Starts one ``goldstick serve`` per model (float and quantized) on free loopback ports.
3. Runs ``goldstick ceval`` in-process on both folders, then on both endpoints (``--tokenizer`` the float folder,
   so the endpoints get the in-process prompts' token ids; ``--letter-fallback echo``).
4. During the served run, once ``--kill-after`` answers of the quantized endpoint are cached, SIGKILLs its server:
   the job must exit 2 with one ``goldstick: error:`` line naming that URL. The server is restarted on the same
   port and the job rerun: it must finish, sending only the requests that are not in the answer cache.
5. Prints, per model and per subject, the accuracy in-process and served and the questions answered differently,
   and the largest difference of a choice probability; exits 1 if any answer or accuracy differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from goldstick.testing.serve_process import ServeProcess

CACHE_FILE = "endpoint-answers.jsonl"  # goldstick.evaluation.endpoint.CACHE_FILE


def goldstick(*args) -> list[str]:
    return [sys.executable, "-m", "goldstick.cli", *map(str, args)]


def run(cmd: list[str], what: str) -> float:
    started = time.perf_counter()
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(f"{what} failed with exit {rc}: {' '.join(cmd)}")
    return time.perf_counter() - started


def read_report(out: Path) -> tuple[dict, dict[str, dict]]:
    report = json.loads((out / "ceval.json").read_text())
    preds = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        preds[(p["subject"], p["id"])] = p
    return report, preds


def killed_and_rerun(cmd: list[str], out: Path, server: ServeProcess, kill_after: int,
                     log: Path) -> tuple[ServeProcess, dict]:
    """The served job with the quantized server killed once ``kill_after`` of its answers are cached; then the
    server restarted on the same port and the job rerun."""
    cache, stderr = out / CACHE_FILE, out.parent / "served-stderr.txt"
    out.mkdir(parents=True, exist_ok=True)
    with open(stderr, "w") as handle:  # a file, not a pipe: a pipe nobody reads fills up and blocks the job
        job = subprocess.Popen(cmd, stderr=handle)

        seen = {"offset": 0, "answers": 0}

        def answers() -> int:  # counts the cache's new complete lines only: cheap enough to poll often
            if cache.is_file():
                with open(cache, "rb") as f:
                    f.seek(seen["offset"])
                    chunk = f.read()
                whole = chunk[:chunk.rfind(b"\n") + 1]
                seen["offset"] += len(whole)
                seen["answers"] += sum(f'"{server.url}"'.encode() in line for line in whole.splitlines())
            return seen["answers"]

        while job.poll() is None and answers() < kill_after:
            time.sleep(0.02)
        if job.poll() is not None:
            sys.exit(f"the job ended (exit {job.returncode}) before {kill_after} answers of {server.url}; "
                     "lower --kill-after")
        server.kill()
        job.wait(timeout=600)
    err = stderr.read_text(errors="replace").replace("\r", "\n")
    errors = [line for line in err.splitlines() if line.startswith("goldstick: error:")]
    kept = len(cache.read_text().splitlines())
    dead = {"exit": job.returncode, "error_lines": errors, "answers_kept": kept}
    print(f"server killed after {answers()} quantized answers: exit {job.returncode}, "
          f"{len(errors)} error line(s): {errors[0] if errors else '-'}; {kept} answers kept")
    if job.returncode != 2 or len(errors) != 1 or server.url not in errors[0]:
        sys.exit("a dead endpoint must give exit 2 and one error line naming it")
    restarted = ServeProcess(server.model, log, port=server.port)
    dead["rerun_seconds"] = run(cmd, "the rerun after the restart")
    return restarted, dead


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("GOLDSTICK_CEVAL_DIR"),
                    help="C-Eval folder (default: $GOLDSTICK_CEVAL_DIR)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--subjects", default=None, help="comma-separated subjects or categories (default: all)")
    ap.add_argument("--limit", type=int, default=None, help="first N questions of each subject")
    ap.add_argument("--float", dest="float_dir", default=None, help="float model (default: the embedded one)")
    ap.add_argument("--quantized", default=None, help="quantized model (default: the float one quantized now)")
    ap.add_argument("--recipe", default="deepseek-r1-w8a8-mixed", help="recipe when quantizing (default: %(default)s)")
    ap.add_argument("--work", default="/tmp/goldstick-ceval-served")
    ap.add_argument("--kill-after", type=int, default=100,
                    help="quantized answers cached before its server is killed (0: no kill)")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(argv)
    if not args.data:
        ap.error("--data (or GOLDSTICK_CEVAL_DIR) is needed: the C-Eval CSVs are not shipped")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.float_dir is None:
        from goldstick.testing.make_model import default_model_path
        args.float_dir = str(default_model_path())
    float_dir = Path(args.float_dir)
    quant_dir = Path(args.quantized) if args.quantized else work / "quantized"
    if args.quantized is None and not (quant_dir / "config.json").is_file():
        run(goldstick("quantize", args.recipe, "--model", float_dir, "--out", quant_dir), "quantize")

    common = ["--data", args.data, "--split", args.split, "--no-plots", "--bootstrap", "200",
              *(["--subjects", args.subjects] if args.subjects else []),
              *(["--limit", args.limit] if args.limit else [])]
    in_process, served = work / "in-process", work / "served"
    for folder in (in_process, served):  # each run starts with empty reports and an empty answer cache
        shutil.rmtree(folder, ignore_errors=True)
    seconds_local = run(goldstick("ceval", "--model", f"float={float_dir}", "--quantized", f"quantized={quant_dir}",
                                  "--out", in_process, *common), "in-process ceval")

    log = work / "serve.log"
    servers = {"float": ServeProcess(float_dir, log), "quantized": ServeProcess(quant_dir, log)}
    cmd = goldstick("ceval", "--model", f"float={servers['float'].url}", "--quantized",
                    f"quantized={servers['quantized'].url}", "--tokenizer", float_dir, "--letter-fallback", "echo",
                    "--concurrency", args.concurrency, "--out", served, *common)
    dead = None
    try:
        if args.kill_after > 0:
            servers["quantized"], dead = killed_and_rerun(cmd, served, servers["quantized"], args.kill_after, log)
            seconds_served = dead["rerun_seconds"]
        else:
            seconds_served = run(cmd, "served ceval")
    finally:
        for s in servers.values():
            s.kill()

    local, local_preds = read_report(in_process)
    remote, remote_preds = read_report(served)
    subjects = local["settings"]["subjects"]
    problems = 0
    print(f"\nC-Eval {args.split}, {len(local_preds)} questions in {len(subjects)} subjects; in-process "
          f"{seconds_local:.0f} s, served {seconds_served:.0f} s (the rerun, after the kill)")
    for label in ("float", "quantized"):
        rows, moved, margins = [], [], []
        for s in subjects:
            keys = [k for k in local_preds if k[0] == s]
            differ = sum(local_preds[k]["predictions"][label] != remote_preds[k]["predictions"][label] for k in keys)
            for k in keys:
                a, b = local_preds[k]["probabilities"][label], remote_preds[k]["probabilities"][label]
                moved.append(max(abs(x - y) for x, y in zip(a, b)))
                margins.append(sorted(a)[-1] - sorted(a)[-2])
            acc_local, acc_remote = local["models"][label]["subjects"][s], remote["models"][label]["subjects"][s]
            problems += differ + (acc_local != acc_remote)
            rows.append((s, len(keys), acc_local, acc_remote, differ))
        moved_sorted = sorted(moved)
        p99 = moved_sorted[min(len(moved) - 1, int(0.99 * len(moved)))]
        print(f"\n{label}: subjects with equal accuracy {sum(r[2] == r[3] for r in rows)}/{len(rows)}, "
              f"answers differing {sum(r[4] for r in rows)}/{sum(r[1] for r in rows)}; "
              f"|p_in-process - p_served| per question: max {max(moved):.2e}, p99 {p99:.2e}, "
              f"{sum(m > 1e-3 for m in moved)} above 1e-3; smallest in-process top-two margin {min(margins):.2e}")
        print(f"  {'subject':42s} {'n':>4s} {'in-process':>10s} {'served':>8s} {'differ':>6s}")
        for s, n, a, b, d in rows:
            print(f"  {s:42s} {n:4d} {a:10.2f} {b:8.2f} {d:6d}")
        m_local, m_remote = local["models"][label], remote["models"][label]
        print(f"  overall (mean over subjects): in-process {m_local['overall']:.2f}, served {m_remote['overall']:.2f}")
    e = remote["models"]["quantized"].get("endpoint", {})
    if dead:
        print(f"\nkill: exit {dead['exit']}, {len(dead['error_lines'])} error line; rerun: "
              f"{e.get('answers_from_cache')} quantized answers from the cache, {e.get('answers_fetched')} fetched")
    print(f"reports: {in_process}/ceval.md, {served}/ceval.md")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
