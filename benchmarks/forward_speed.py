"""Calibration forward speed: goldstick's MindSpore network against transformers' DeepseekV3, same checkpoint.

For each size, one random-weight DeepSeek-V3 checkpoint is written by transformers (``save_pretrained``) and read
by both tools. The timed work is what layer-wise calibration does (the engine's float pass): the calibration
batches' hidden states go through the decoder layers one layer at a time, every batch through layer i before
layer i+1, with forward pre-hooks keeping a running per-channel min/max of every linear's input.

  * goldstick: ``LayerQuantizer.observe`` itself (MindSpore PyNative, fp32, the engine's hooks, which also
    record the router's choices).
  * transformers: ``DeepseekV3DecoderLayer`` in fp32 under ``torch.no_grad``; pre-hooks on every ``nn.Linear``
    keep min/max with ``torch.aminmax``; transformers 5 stores routed experts as fused 3-D tensors with no
    per-expert module, so a pre-hook on the experts module keeps each expert's input min/max (its down_proj
    input is not observed: the torch side does slightly less statistics work). Two set-ups: ``eager`` (eager
    attention, eager expert loop) and ``default`` (what from_pretrained picks on CPU: sdpa attention, grouped_mm
    experts).

Each round runs every tool in a process of its own, alternating which goes first: the tool loads the checkpoint,
runs one warm-up pass (shape caches) and ``--passes`` timed passes. One process per tool, because two thread pools
in one process disturb each other on 2 cores: torch's OpenMP workers busy-wait after each parallel region and take
a core from the MindSpore op that follows (OMP_WAIT_POLICY=PASSIVE avoids that but slows torch instead). A pass's
tokens/s is calibration tokens / wall seconds of the whole layer-by-layer pass (embedding lookup and checkpoint
loading not included). The median pass is reported, and goldstick's median divided by each transformers median.
Both use the same number of intra-op threads (``--threads``, default 2: torch.set_num_threads and MindSpore's CPU
kernel threads). The final hidden states of the tools are compared as a check that they compute the same thing.

    python benchmarks/forward_speed.py [--sizes tiny wide] [--batch 4] [--seq-len 256] [--batches 2] [--rounds 3]
                                       [--passes 2] [--torch eager default]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "2")  # numpy/OpenBLAS read it when first imported

import numpy as np  # noqa: E402

# tiny: the embedded default model's shapes (goldstick.testing.make_model "tiny"); wide: the wide benchmark size
SIZES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64,
                 qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, intermediate_size=512,
                 moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4),
    "wide": dict(hidden_size=2048, num_hidden_layers=4, num_attention_heads=16, q_lora_rank=768, kv_lora_rank=512,
                 qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, intermediate_size=5632,
                 moe_intermediate_size=1024, n_routed_experts=16, num_experts_per_tok=4),
}
COMMON = dict(vocab_size=1024, n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
              routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=1024, rope_theta=10000.0,
              rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})




def write_checkpoint(directory: Path, size: str, seed: int = 0) -> None:
    """A transformers DeepseekV3 with seeded random weights (fan-in scaled, so activations stay O(1) through the
    layers), saved in the HF layout both tools read."""
    import torch
    import transformers

    config = transformers.DeepseekV3Config(**COMMON, **SIZES[size],
                                           num_key_value_heads=SIZES[size]["num_attention_heads"])
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif "embed" in name:
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]))
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:
                buf.normal_(0.0, 0.05)
    model.save_pretrained(directory, safe_serialization=True)


# ---- transformers side ------------------------------------------------------------------------------------------
class TorchCalibration:
    def __init__(self, directory: Path, impl: str):
        import torch
        import transformers

        kwargs = dict(attn_implementation="eager", experts_implementation="eager") if impl == "eager" else {}
        self.torch = torch
        self.model = transformers.DeepseekV3ForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
        self.impl = f"{self.model.config._attn_implementation} attention, " \
                    f"{self.model.config._experts_implementation} experts"
        self.stats: dict[str, list] = {}

    def inputs(self, ids: list[np.ndarray]):
        from transformers.masking_utils import create_causal_mask

        torch, inner = self.torch, self.model.model
        prepared = []
        with torch.no_grad():
            for batch in ids:
                h = inner.embed_tokens(torch.from_numpy(batch.astype(np.int64)))
                pos = torch.arange(batch.shape[1]).unsqueeze(0)
                mask = create_causal_mask(config=self.model.config, inputs_embeds=h, attention_mask=None, cache=None,
                                          position_ids=pos)
                prepared.append((h, pos, mask, inner.rotary_emb(h, pos)))
        return prepared

    def _keep(self, name: str, x):
        lo, hi = self.torch.aminmax(x, dim=0)
        if name in self.stats:
            self.torch.minimum(self.stats[name][0], lo, out=self.stats[name][0])
            self.torch.maximum(self.stats[name][1], hi, out=self.stats[name][1])
        else:
            self.stats[name] = [lo, hi]

    def _hooks(self, layer, prefix: str) -> list:
        from torch import nn
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts, DeepseekV3TopkRouter

        handles = []
        for name, module in layer.named_modules():
            full = prefix + name
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, full=full: self._keep(full, args[0].reshape(-1, m.in_features))))
            elif isinstance(module, DeepseekV3TopkRouter):
                def route(m, args, out, full=full):
                    counts = self.torch.bincount(out[2].reshape(-1), minlength=m.num_experts)
                    self.stats[full] = self.stats.get(full, 0) + counts
                handles.append(module.register_forward_hook(route))
            elif isinstance(module, DeepseekV3Experts):
                def experts(m, args, full=full):
                    x, top_k = args[0], args[1]
                    for e in range(m.num_experts):
                        rows = (top_k == e).any(-1).nonzero().squeeze(-1)
                        if rows.numel():
                            self._keep(f"{full}.{e}", x[rows])
                handles.append(module.register_forward_pre_hook(experts))
        return handles

    def calibrate(self, prepared) -> list:
        """One layer-by-layer float pass over every batch, hooks on; returns the last layer's outputs."""
        torch = self.torch
        hidden = [h for h, *_ in prepared]
        with torch.no_grad():
            for i, layer in enumerate(self.model.model.layers):
                handles = self._hooks(layer, f"model.layers.{i}.")
                hidden = [layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
                          for h, (_, pos, mask, pe) in zip(hidden, prepared)]
                for handle in handles:
                    handle.remove()
        return [h.numpy() for h in hidden]


# ---- goldstick side ---------------------------------------------------------------------------------------------
class GoldstickCalibration:
    def __init__(self, directory: Path):
        from goldstick.engine.inputs import prepare_batches
        from goldstick.engine.layer import LayerQuantizer
        from goldstick.io.checkpoint import CheckpointReader
        from goldstick.quant.recipe import load_recipe

        self.prepare_batches, self.layer_quantizer = prepare_batches, LayerQuantizer
        self.reader = CheckpointReader(directory)
        self.cfg = self.reader.config
        self.recipe = load_recipe("deepseek-r1-w8a8-mixed")
        self.plan = self.recipe.plan(self.cfg)
        self.layers = None

    def inputs(self, ids: list[np.ndarray]):
        batches = self.prepare_batches(self.cfg, SimpleNamespace(batches=ids))
        embed = self.reader.read("model.embed_tokens.weight")
        # the layers are built (weights read and set) once, outside the timed passes, as transformers' are
        self.layers = [self.layer_quantizer(self.cfg, i, self.reader.read_layer(i), self.plan, self.recipe,
                                            batches, [])
                       for i in range(self.cfg.num_hidden_layers)]
        return [embed[b[0]] for b in batches]  # the engine's batches (it cuts big ones: batch_rows)

    def calibrate(self, hidden) -> list:
        """The engine's float pass (observe), layer by layer; returns the last layer's outputs."""
        for lq in self.layers:
            lq.hidden = hidden
            hidden = lq.observe(self.recipe.options.moe_calibrate_all_experts)
        return hidden


# ---- the benchmark ----------------------------------------------------------------------------------------------
def run_size(size: str, args) -> dict:
    tools = ["goldstick"] + [f"transformers {impl}" for impl in args.torch]
    seconds: dict[str, list[float]] = {name: [] for name in tools}
    labels: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix=f"forward-speed-{size}-") as tmp:
        work = Path(tmp)
        write_checkpoint(work, size)
        rng = np.random.default_rng(args.seed)
        np.save(work / "ids.npy", rng.integers(3, COMMON["vocab_size"], (args.batches, args.batch, args.seq_len),
                                               dtype=np.int32))
        for r in range(args.rounds):
            for name in (tools if r % 2 == 0 else tools[::-1]):  # alternate who goes first
                out = work / f"{name.replace(' ', '-')}.npy"
                done = subprocess.run([sys.executable, __file__, "_passes", name, str(work), str(args.passes),
                                       str(args.threads), str(out)], capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                seconds[name] += result["seconds"]
                labels[name] = name if name == "goldstick" else f"{name} ({result['impl']})"
        ref = np.load(work / "goldstick.npy")
        agreement = {name: float(np.abs(np.load(work / f"{name.replace(' ', '-')}.npy") - ref).max()
                                 / np.abs(ref).max())
                     for name in tools}
    tokens = args.batch * args.seq_len * args.batches
    return dict(size=size, tokens=tokens, seconds=seconds, agreement=agreement, labels=labels)


def timed_passes(name: str, directory: Path, passes: int, threads: int, out: Path) -> None:
    """In a process of its own: load one tool, one warm-up pass, ``passes`` timed ones; prints their seconds as JSON
    and saves the last pass's final hidden states."""
    ids = list(np.load(directory / "ids.npy"))
    if name == "goldstick":
        from goldstick.model.runtime import setup_mindspore

        setup_mindspore()
        import mindspore as ms

        ms.device_context.cpu.op_tuning.threads_num(threads)
        tool = GoldstickCalibration(directory)
    else:
        import torch
        import transformers

        torch.set_num_threads(threads)
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        tool = TorchCalibration(directory, name.split()[-1])
    prepared = tool.inputs(ids)
    tool.calibrate(prepared)  # warm-up (shape caches)
    seconds = []
    for _ in range(passes):
        started = time.perf_counter()
        outputs = tool.calibrate(prepared)
        seconds.append(time.perf_counter() - started)
    np.save(out, np.concatenate([o.reshape(-1) for o in outputs]))
    print(json.dumps({"seconds": seconds, "impl": getattr(tool, "impl", "")}))


def report(result: dict, args) -> None:
    size, tokens = result["size"], result["tokens"]
    shape = {k: SIZES[size][k] for k in ("hidden_size", "num_hidden_layers", "n_routed_experts",
                                         "moe_intermediate_size", "num_experts_per_tok")}
    print(f"\n{size}: {shape}; {args.batches} batches x {args.batch} x {args.seq_len} tokens = {tokens} tokens "
          f"per pass, {args.rounds} rounds (alternating processes) x {args.passes} passes")
    print(f"  {'tool':72} {'tok/s per pass':>26} {'median':>8}  max|diff| vs goldstick")
    medians = {}
    for name, secs in result["seconds"].items():
        rates = [tokens / s for s in secs]
        medians[name] = statistics.median(rates)
        rounds = " ".join(f"{r:.0f}" for r in rates)
        print(f"  {result['labels'][name]:72} {rounds:>26} {medians[name]:>8.0f}  "
              f"{result['agreement'][name]:.1e}")
    for name in medians:
        if name != "goldstick":
            print(f"  ratio goldstick / {name}: {medians['goldstick'] / medians[name]:.2f}x")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_passes"]:
        name, directory, passes, threads, out = argv[1:]
        return timed_passes(name, Path(directory), int(passes), int(threads), Path(out))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "wide"], choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batches", type=int, default=2, help="calibration batches per pass")
    parser.add_argument("--rounds", type=int, default=3, help="processes per tool, alternating")
    parser.add_argument("--passes", type=int, default=2, help="timed passes per process (after a warm-up pass)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch", nargs="+", default=["eager", "default"], choices=["eager", "default"],
                        help="transformers set-ups to compare with")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import mindspore
    import torch
    import transformers

    print(f"threads: torch.set_num_threads({args.threads}), mindspore op_tuning.threads_num({args.threads}), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, mindspore {mindspore.__version__}, {os.cpu_count()} CPUs, fp32; "
          f"one process per tool and round")
    for size in args.sizes:
        report(run_size(size, args), args)


if __name__ == "__main__":
    sys.exit(main())
