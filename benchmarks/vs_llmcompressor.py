"""goldstick against llm-compressor, side by side: whole-process wall time, peak RSS and logits error vs float.

Both tools quantize the same Hugging Face DeepSeek-V3 checkpoint (built here by transformers from a config with
random weights, plus a few planted outlier channels in the attention norms so that smoothing matters, as on real
DeepSeek checkpoints) with the same calibration token ids and the same scheme:

    SmoothQuant alpha 0.8 folded into input_layernorm (-> q_a_proj + kv_a_proj_with_mqa) and q_a_layernorm
    (-> q_b_proj),
    then W8A8 on every other linear too: int8 per-channel symmetric weights, int8 dynamic per-token activations;
    router (mlp.gate), kv_b_proj and lm_head float.

goldstick runs its plain CLI with recipes/deepseek-w8a8-dynamic-smoothquant.yaml; llm-compressor runs `oneshot`
with SmoothQuantModifier(smoothing_strength=0.8, those two mappings) + QuantizationModifier(scheme="W8A8",
ignore=[lm_head, mlp.gate, kv_b_proj]) and saves its compressed-tensors checkpoint. Every tool run is one fresh
process (spawn to exit, output written), measured by a fresh wrapper process (wall time, ru_maxrss of its children);
runs alternate between the tools. Afterwards, untimed, each output is evaluated on held-out token ids against the
float model (transformers, float32): goldstick's through ``goldstick.load_model(OUT)`` (the exact CPU twin of the
integer kernels), llm-compressor's with its own fake-quant forward in torch, on the model oneshot leaves in
memory (one extra, untimed run, whose saved checkpoint is checked to equal the timed runs' byte for byte).

llm-compressor needs numpy >= 2 and MindSpore 2.10 numpy < 2, so it lives in its own venv (benchmarks/README.md):

    python benchmarks/vs_llmcompressor.py --llmc-python .venv-llmc/bin/python [--sizes tiny wide] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "deepseek-w8a8-dynamic-smoothquant.yaml"
ALPHA = 0.8

# (config overrides, calibration samples x seq_len, held-out samples x seq_len)
SIZES = {
    "tiny": (dict(hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4,
                  num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                  v_head_dim=32, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=8,
                  num_experts_per_tok=2, n_group=2, topk_group=1), (16, 128), (8, 128)),
    "wide": (dict(hidden_size=2048, num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=16,
                  num_key_value_heads=16, q_lora_rank=512, kv_lora_rank=256, qk_rope_head_dim=32,
                  qk_nope_head_dim=64, v_head_dim=64, intermediate_size=4096, moe_intermediate_size=1024,
                  n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2), (64, 256), (8, 256)),
}

# The wrapper: spawns one tool run and reports its wall time and the peak RSS of its process tree (ru_maxrss of
# the waited-for children, kB on Linux). A fresh wrapper per run, so no earlier run's peak leaks in.
WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.call(sys.argv[2:], stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": rc, "seconds": wall, "peak_rss": peak}))
"""


# ------------------------------------------------------------------------------------------- run in the llmc venv
def make_model(out: Path, size: str, seed: int = 0) -> None:
    """A DeepSeek-V3 checkpoint with random weights, written by transformers (bf16), plus goldstick's tokenizer."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    overrides = SIZES[size][0]
    vocab = int(json.loads((out.parent / "vocab.json").read_text())["vocab_size"])
    cfg = DeepseekV3Config(vocab_size=vocab, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                           max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                           rope_scaling={"type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
                                         "mscale": 1.0, "mscale_all_dim": 1.0,
                                         "original_max_position_embeddings": 4096},
                           **overrides)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            # planted outlier channels: a few large norm gains, as the massive activations of real DeepSeek layers
            for norm, count, gain in ((layer.input_layernorm, 4, 24.0), (layer.self_attn.q_a_layernorm, 3, 8.0)):
                channels = torch.randperm(norm.weight.numel(), generator=gen)[:count]
                norm.weight[channels] = gain
            if hasattr(layer.mlp, "gate"):  # a non-trivial routing bias, as in R1
                layer.mlp.gate.e_score_correction_bias.copy_(
                    torch.rand(layer.mlp.gate.e_score_correction_bias.shape, generator=gen) * 0.1)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    os.replace(tmp, out)


def llmc_quantize(model_dir: Path, calib: Path, out: Path, samples: int, seq_len: int,
                  heldout: Path | None = None, logits_out: Path | None = None) -> None:
    """What an llm-compressor user runs: load, oneshot (which linearizes the fused experts), save compressed.

    With ``heldout`` (the untimed accuracy run only) the quantized model in memory, i.e. llm-compressor's own
    fake-quant forward, then computes logits on the held-out ids in float32.
    (``load_quantizable_moe`` would linearize while loading, but its patching imports every transformers model,
    which needs torchvision, and no CPU torchvision build for torch 2.13 is on this machine's package index.)
    """
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM

    ids = [json.loads(line)["input_ids"] for line in calib.read_text().splitlines()]
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    recipe = [
        SmoothQuantModifier(smoothing_strength=ALPHA, mappings=[
            [["re:.*q_a_proj$", "re:.*kv_a_proj_with_mqa$"], "re:.*input_layernorm$"],
            [["re:.*q_b_proj$"], "re:.*q_a_layernorm$"],
        ]),
        QuantizationModifier(targets="Linear", scheme="W8A8",
                             ignore=["lm_head", "re:.*mlp.gate$", "re:.*kv_b_proj$"]),
    ]
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=samples, max_seq_length=seq_len,
            moe_calibrate_all_experts=False)
    if heldout is not None:  # before saving: saving compresses the model in place (int8 weights)
        _save_logits(model.to(torch.float32), heldout, logits_out)
        model.to(torch.bfloat16)  # exact: every value came from bf16
    model.save_pretrained(out, save_compressed=True)


def _save_logits(model, heldout: Path, out: Path) -> None:
    import numpy as np
    import torch

    ids = torch.tensor(np.load(heldout), dtype=torch.long)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(ids[i:i + 1]).logits for i in range(len(ids))])
    np.save(out, logits.float().numpy())


def float_logits(model_dir: Path, heldout: Path, out: Path) -> None:
    """The float reference: transformers' eager DeepseekV3 in float32 on the (bf16-stored) weights."""
    import torch
    from transformers import AutoModelForCausalLM

    _save_logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), heldout, out)


# ------------------------------------------------------------------------------------------- run in goldstick's venv
def goldstick_logits(model_dir: Path, heldout: Path, out: Path) -> None:
    import numpy as np
    from mindspore import Tensor

    import goldstick

    ids = np.load(heldout)
    net = goldstick.load_model(model_dir)
    np.save(out, np.concatenate([net(Tensor(ids[i:i + 1])).asnumpy() for i in range(len(ids))]))


def timed(cmd: list[str], log: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAPPER, str(log), *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {result['rc']}); its output is in {log}:\n"
                           + log.read_text()[-3000:])
    return result


def errors(ref, got) -> dict:
    import numpy as np

    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return {"rel_fro": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            "top1": float(np.mean(ref.argmax(-1) == got.argmax(-1)))}


def run_size(size: str, work: Path, llmc_python: str, repeats: int, seed: int) -> dict:
    import numpy as np

    from goldstick.testing.make_model import size_config

    _, (samples, seq_len), (h_samples, h_len) = SIZES[size]
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    here = str(Path(__file__).resolve())
    vocab = size_config("tiny").vocab_size  # goldstick's bundled BPE tokenizer, rounded up to 128
    (work / "vocab.json").write_text(json.dumps({"vocab_size": vocab}))
    if not model.exists():
        subprocess.run([llmc_python, here, "_make-model", str(model), size, str(seed)], check=True,
                       capture_output=True)
        from goldstick.model.tokenizer import train_tokenizer

        train_tokenizer(4096, model, model_max_length=1024)  # goldstick reads tokenizer.json for BOS/EOS
    rng = np.random.default_rng(seed)
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": [int(t) for t in row]}) + "\n"
                             for row in rng.integers(2, vocab, size=(samples, seq_len))))
    heldout = work / "heldout.npy"
    np.save(heldout, rng.integers(2, vocab, size=(h_samples, h_len)).astype(np.int32))

    gs_cli = str(Path(sys.executable).parent / "goldstick")
    runs = {"goldstick": [], "llm-compressor": []}
    for r in range(repeats):
        for tool in ("llm-compressor", "goldstick") if r % 2 == 0 else ("goldstick", "llm-compressor"):
            out = work / f"{tool}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            if tool == "goldstick":
                cmd = [gs_cli, "quantize", str(RECIPE), "--model", str(model), "--out", str(out), "--calib",
                       str(calib), "--calib-samples", str(samples), "--calib-seq-len", str(seq_len)]
            else:
                cmd = [llmc_python, here, "_llmc-quantize", str(model), str(calib), str(out), str(samples),
                       str(seq_len)]
            result = timed(cmd, work / f"{tool}-{r}.log")
            runs[tool].append(result)
            print(f"  {size} run {r} {tool:15s} {result['seconds']:7.1f} s  {result['peak_rss'] / 2**20:7.0f} MiB",
                  flush=True)

    # accuracy, untimed, against the float model: goldstick's last output through load_model; llm-compressor's
    # model as oneshot leaves it in memory (one more run, whose saved checkpoint must equal the timed runs')
    last = repeats - 1
    subprocess.run([llmc_python, here, "_float-logits", str(model), str(heldout), str(work / "float.npy")],
                   check=True, capture_output=True)
    subprocess.run([llmc_python, here, "_llmc-quantize", str(model), str(calib), str(work / "llm-compressor-eval"),
                    str(samples), str(seq_len), str(heldout), str(work / "llmc.npy")], check=True, capture_output=True)
    same = all(_tensors_digest(work / f"llm-compressor-{r}") == _tensors_digest(work / "llm-compressor-eval")
               for r in range(repeats))
    subprocess.run([sys.executable, here, "_goldstick-logits", str(work / f"goldstick-{last}"), str(heldout),
                    str(work / "goldstick.npy")], check=True, capture_output=True)
    ref = np.load(work / "float.npy")
    acc = {"llm-compressor": errors(ref, np.load(work / "llmc.npy")),
           "goldstick": errors(ref, np.load(work / "goldstick.npy"))}
    return {"size": size, "calibration": [samples, seq_len], "heldout": [h_samples, h_len], "runs": runs,
            "accuracy": acc, "llmc_eval_run_equals_timed_runs": same}


def _tensors_digest(folder: Path) -> str:
    """sha256 over the tensors of a safetensors checkpoint (names and bytes, not the JSON header's order)."""
    import hashlib

    import ml_dtypes  # noqa: F401 - registers numpy's bfloat16, which safetensors' numpy reader needs
    from safetensors import safe_open

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as f:
            for name in sorted(f.keys()):
                digest.update(name.encode())
                digest.update(f.get_tensor(name).tobytes())
    return digest.hexdigest()


def report(result: dict) -> str:
    def med(tool, key):
        return statistics.median(r[key] for r in result["runs"][tool])

    s, c, h = result["size"], result["calibration"], result["heldout"]
    lines = [f"\n{s}: {SIZES[s][0]['hidden_size']} hidden, {SIZES[s][0]['num_hidden_layers']} layers, "
             f"{SIZES[s][0]['n_routed_experts']} experts; calibration {c[0]} x {c[1]} tokens, held-out {h[0]} x {h[1]}",
             f"{'tool':15s} {'wall s (median)':>16s} {'peak RSS MiB':>13s} {'logits rel. Frob.':>18s} "
             f"{'top-1 agree':>12s}   all runs (s / MiB)"]
    for tool in ("llm-compressor", "goldstick"):
        a = result["accuracy"][tool]
        all_runs = ", ".join(f"{r['seconds']:.1f}/{r['peak_rss'] / 2**20:.0f}" for r in result["runs"][tool])
        lines.append(f"{tool:15s} {med(tool, 'seconds'):16.1f} {med(tool, 'peak_rss') / 2**20:13.0f} "
                     f"{a['rel_fro']:18.5f} {a['top1']:12.4f}   {all_runs}")
    t = med("goldstick", "seconds") / med("llm-compressor", "seconds")
    m = med("goldstick", "peak_rss") / med("llm-compressor", "peak_rss")
    e = result["accuracy"]["goldstick"]["rel_fro"] / result["accuracy"]["llm-compressor"]["rel_fro"]
    if not result["llmc_eval_run_equals_timed_runs"]:
        lines.append("note: llm-compressor's accuracy run saved other tensors than its timed runs")
    lines.append(f"ratios goldstick / llm-compressor: wall time {t:.2f}x, peak RSS {m:.2f}x, logits error {e:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):  # a child run (see run_size)
        cmd, args = argv[0], argv[1:]
        if cmd == "_make-model":
            make_model(Path(args[0]), args[1], int(args[2]))
        elif cmd == "_llmc-quantize":
            extra = (Path(args[5]), Path(args[6])) if len(args) > 5 else ()
            llmc_quantize(Path(args[0]), Path(args[1]), Path(args[2]), int(args[3]), int(args[4]), *extra)
        elif cmd == "_float-logits":
            float_logits(Path(args[0]), Path(args[1]), Path(args[2]))
        elif cmd == "_goldstick-logits":
            goldstick_logits(Path(args[0]), Path(args[1]), Path(args[2]))
        else:
            raise SystemExit(f"unknown child command {cmd}")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llmc-python", default=os.environ.get("LLMC_PYTHON", ".venv-llmc/bin/python"),
                        help="python of the venv with llmcompressor (default $LLMC_PYTHON or .venv-llmc/bin/python)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "wide"])
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per tool and size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="keep models and outputs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if not Path(args.llmc_python).exists():
        parser.error(f"--llmc-python {args.llmc_python}: no such file (see benchmarks/README.md for the venv)")
    version = subprocess.run([args.llmc_python, "-c", "import llmcompressor; print(llmcompressor.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    print(f"llm-compressor {version} ({args.llmc_python}); goldstick recipe {RECIPE.relative_to(ROOT)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work) if args.work else Path(tmp)
        for size in args.sizes:
            results.append(run_size(size, root / size, args.llmc_python, args.repeats, args.seed))
            print(report(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"llmcompressor": version, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
