"""goldstick vs msModelSlim (Huawei's own Ascend quantizer) on the same tiny DeepSeek-V3 with MTP, on CPU.

Both quantize the embedded default model (4 layers, MoE, MLA, an MTP layer; a bf16 copy, as msModelSlim expects
bf16 weights) with W8A8 "mixed": MLA linears static (per-tensor asymmetric activations) with anti-outlier
smoothing, MLP / experts dynamic per-token, kv_b_proj and the router float. The calibration text is the same token
rows for both (goldstick's calibration/mixed-zh-en.jsonl, --samples x --seq-len tokens; msModelSlim gets them
decoded, as a JSON list of strings). Both write the ascend layout, and goldstick reads msModelSlim's output with the
CPU twin of the integer kernels, so both checkpoints are measured the same way: held-out logits against the float
model (SQNR, KL, top-1 agreement), plus wall time and peak RSS of each quantization (the process tree's, sampled).

    goldstick  : deepseek-r1-w8a8-mixed (OS+ on the MLA inputs, folded into the norms; o_proj's into the V rows of
                 kv_b_proj, its shift as o_proj.beta), --format ascend
    msModelSlim: its own DeepSeek W8A8 practice (lab_practice/deepseek_v3_2/deepseek_w8a8.yaml: flex smooth quant
                 on norm-linear and o/v subgraphs, *self_attn* static W8A8 except kv_b_proj, *mlp* dynamic except
                 the gate), run by its CLI through benchmarks/msmodelslim_shim/run_msmodelslim.py (a CPU shim)

msModelSlim needs torch and an older transformers than goldstick's tests, so it runs from a venv of its own:

    python3 -m venv /work/venv-msl && /work/venv-msl/bin/pip install torch "transformers>=4.57,<5" accelerate \
        "pydantic>=2.10.1" easydict==1.13 einops "wcmatch>=10.0" scipy pygtrie safetensors psutil pyyaml tqdm \
        && /work/venv-msl/bin/pip install --no-deps msmodelslim==26.1.0
    .venv/bin/python benchmarks/vs_msmodelslim.py --msl-python /work/venv-msl/bin/python

Prints the table and writes OUT/vs_msmodelslim.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "benchmarks" / "msmodelslim_shim"
CALIBRATION = "calibration/mixed-zh-en.jsonl"


def bf16_copy(src: Path, dst: Path) -> Path:
    """The model with bf16 weights (the router's correction bias stays fp32, as in R1) and torch_dtype bfloat16."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            save_file({k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32
                       and not k.endswith("e_score_correction_bias") else v for k, v in tensors.items()},
                      str(dst / f.name))
        elif f.name == "config.json":
            config = json.loads(f.read_text())
            config["torch_dtype"] = "bfloat16"
            (dst / f.name).write_text(json.dumps(config, indent=2))
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def calibration_texts(model: Path, samples: int, seq_len: int, out: Path) -> Path:
    """goldstick's calibration token rows, decoded, as the JSON list of strings msModelSlim reads."""
    from goldstick.engine.calibration import load_calibration
    from goldstick.model.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    calib = load_calibration(str(ROOT / CALIBRATION), tok.tokenizer, samples=samples, seq_len=seq_len,
                             bos_id=tok.bos_id)
    rows = [row for batch in calib.batches for row in batch]
    texts = [tok.tokenizer.decode([int(i) for i in row if int(i) != tok.bos_id]) for row in rows]
    out.write_text(json.dumps(texts, ensure_ascii=False))
    return out


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, peak RSS in MB of its process tree, sampled every 0.1 s)."""
    import psutil

    started = time.time()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}); see {log}")
    return time.time() - started, peak / 2**20


def layout_differences(ours: Path, theirs: Path) -> dict[str, list[str]]:
    """Where the two ascend-layout checkpoints differ in tensor names, dtypes, shapes or description labels (each
    list folded with goldstick.model.names.summarize_names)."""
    from goldstick.io.checkpoint import CheckpointReader
    from goldstick.model.names import summarize_names

    a, b = CheckpointReader(ours), CheckpointReader(theirs)
    la = json.loads((ours / "quant_model_description.json").read_text())
    lb = json.loads((theirs / "quant_model_description.json").read_text())
    both = sorted(set(a.names()) & set(b.names()))
    found = {
        "only goldstick": sorted(set(a.names()) - set(b.names())),
        "only msModelSlim": sorted(set(b.names()) - set(a.names())),
        "dtype or shape": [n for n in both if (a.dtype(n), a.shape(n)) != (b.dtype(n), b.shape(n))],
        "label": [n for n in both if la.get(n) != lb.get(n)],
    }
    for key, names in found.items():
        print(f"layout, {key}: {summarize_names(names) if names else 'none'}")
    return {key: summarize_names(names) for key, names in found.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--msl-python", default="/work/venv-msl/bin/python", help="python of the msModelSlim venv")
    ap.add_argument("--out", default="/tmp/goldstick-vs-msmodelslim")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()

    from goldstick.evaluation.compare import compare_models
    from goldstick.testing.make_model import default_model_path

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = bf16_copy(default_model_path(), out / "model")
    texts = calibration_texts(model, args.samples, args.seq_len, out / "calibration.json")
    practice = (SHIM / "deepseek_w8a8_cpu.yaml").read_text().replace("CALIBRATION_JSON", str(texts))
    (out / "msmodelslim.yaml").write_text(practice)

    runs = {
        "msModelSlim 26.1.0": ([args.msl_python, str(SHIM / "run_msmodelslim.py"), "quant", "--model_path",
                                str(model), "--save_path", str(out / "msmodelslim"), "--device", "cpu",
                                "--model_type", "DeepSeek-V3", "--config_path", str(out / "msmodelslim.yaml"),
                                "--trust_remote_code", "False"], out / "msmodelslim"),
        "goldstick": ([sys.executable, "-m", "goldstick.cli", "quantize", "deepseek-r1-w8a8-mixed", "--model",
                       str(model), "--out", str(out / "goldstick"), "--format", "ascend", "--calib",
                       str(ROOT / CALIBRATION), "--calib-samples", str(args.samples), "--calib-seq-len",
                       str(args.seq_len), "--no-progress"], out / "goldstick"),
    }
    rows = {}
    for name, (cmd, folder) in runs.items():
        seconds, rss = timed(cmd, out / f"{folder.name}.log")
        comparison = compare_models(model, folder).as_dict()
        rows[name] = {"seconds": round(seconds, 1), "peak_rss_mb": round(rss), **comparison}
    rows["layout"] = layout_differences(out / "goldstick", out / "msmodelslim")
    (out / "vs_msmodelslim.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'':20s} {'wall s':>8s} {'peak RSS MB':>12s} {'logits SQNR dB':>15s} {'KL':>9s} {'top-1':>7s}")
    for name, r in rows.items():
        if name == "layout":
            continue
        print(f"{name:20s} {r['seconds']:8.1f} {r['peak_rss_mb']:12d} {r['logits_sqnr_db']:15.2f} "
              f"{r['kl_mean']:9.5f} {r['top1_agreement']:7.3f}")


if __name__ == "__main__":
    main()
