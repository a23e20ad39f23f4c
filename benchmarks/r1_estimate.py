"""DeepSeek-R1 (671B) on paper: time and peak host memory to quantize it with the mixed recipe, from measurements.

Measured here, with the engine's own code (``LayerQuantizer``, recipe ``deepseek-r1-w8a8-mixed``) on one
R1-width MoE decoder layer (hidden 7168, q_lora 1536, kv_lora 512, 128 heads, rope 64 / nope 128 / v 128,
moe_intermediate 2048, a few routed experts instead of 256, FP8 blocks as in the release), built by
``goldstick make-model``:

  * read: ``CheckpointReader.read_layer`` seconds per FP8 source byte (mmap, FP8 block dequantization to f32);
  * forward: seconds of the attention block and of each expert call, timed by cell hooks during the float pass
    (the engine's statistics hooks on), and one expert alone at two token counts (per-call overhead + per token);
  * OS+ search: attention forwards per search and their seconds per token (searches run on ``token_sample``
    tokens; a candidate of the MLA linears runs the attention and the post-attention norm, not the MLP);
  * weight quantization, the quantized pass, tensor export and the work-file write;
  * memory: resident bytes after each phase and the phase's peak, divided by the layer's parameters.

Extrapolated to R1 (config defaults of goldstick.model.config.ModelConfig, which are R1's): 61 layers (3 dense with
intermediate 18432, 58 MoE with 256 routed experts + 1 shared, top-8), calibration 128 x 2048 tokens (the recipe's),
batches of 2 x 2048 tokens. Every assumption is printed with the estimate; docs/r1-estimate.md explains the method.

    python benchmarks/r1_estimate.py [--probe DIR] [--tokens 1024] [--seq-len 512] [--disk-gbps 2.0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402

PROBE = dict(hidden_size=7168, q_lora_rank=1536, kv_lora_rank=512, num_attention_heads=128, num_key_value_heads=128,
             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=2048,
             intermediate_size=18432, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
             num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)

# Public figures and assumptions for the NPU estimate (printed with the result).
NPU = dict(
    name="Ascend 910B",
    fp16_tflops=256.0,  # jishuzhan.net/article/1872432607539499010 (Ascend 910B: 256 TFLOPS FP16, 512 TOPS INT8)
    hbm_gb=64.0,  # 910B-class devices are sold with 64 GB HBM (assumed; the figure decides nothing here)
    mfu=0.30,  # assumed: PyNative layer-by-layer forwards with hooks and host dispatch reach ~30 % of peak
    devices=8,  # assumed: a layer's experts spread over the 8 devices (one device: 8x the forward time)
    pcie_gbps=25.0,  # host->device per card: PCIe 4.0 x16, 31.5 GB/s theoretical (same source), ~80 % of it
    op_launch_us=30.0,  # assumed PyNative launch cost per op on Ascend (no public figure; CPU here: ~80-110 us)
    host_stats_gbps=2.0,  # asnumpy + numpy per-channel min and max of hooked inputs (notes/mindspore-cpu.md §7:
                          # one numpy reduction pass 3.7-4.1 GB/s; min and max are two passes)
)
OPS_PER_EXPERT_CALL = 9  # 3 matmuls, silu, mul, + 3 statistics hooks' host copies + the split slice


def vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


# ---- analytic sizes (R1 and the probe share the widths, so per-unit measurements carry over) ---------------------
def attention_params(cfg) -> int:
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = h * cfg.q_lora_rank + cfg.q_lora_rank * heads * qk if cfg.q_lora_rank else h * heads * qk
    kv = (h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
          + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    return q + kv + heads * cfg.v_head_dim * h


def expert_params(cfg, intermediate: int | None = None) -> int:
    return 3 * cfg.hidden_size * (intermediate or cfg.moe_intermediate_size)


def attention_flops_per_token(cfg, seq_len: int) -> tuple[float, float]:
    """(projection FLOPs, score FLOPs) per token; the network forms every S x S score (masked), as on CPU."""
    heads = cfg.num_attention_heads
    score = 2 * heads * seq_len * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return 2.0 * attention_params(cfg), float(score)


# ---- measurement ---------------------------------------------------------------------------------------------------
def build_probe(directory: Path) -> Path:
    from goldstick.testing.make_model import make_model

    return make_model(directory, size="wide", fp8=True, overrides=PROBE)


def measure(probe: Path, tokens: int, seq_len: int, token_sample: int, grid: int) -> dict:
    from types import SimpleNamespace

    from goldstick.engine.inputs import prepare_batches
    from goldstick.engine.layer import LayerQuantizer, RunningStats
    from goldstick.io.checkpoint import CheckpointReader
    from goldstick.io.writer import write_safetensors
    from goldstick.model.network import MLP
    from goldstick.model.runtime import setup_mindspore
    from goldstick.quant.numerics import bf16_round
    from goldstick.quant.recipe import load_recipe

    setup_mindspore()
    import mindspore as ms

    reader = CheckpointReader(probe)
    cfg = reader.config
    recipe = load_recipe("deepseek-r1-w8a8-mixed")
    # a shorter OS+ search than the recipe's (grid, token_sample): its cost per evaluated token is what is measured
    recipe = dataclasses.replace(recipe, options=dataclasses.replace(recipe.options, osplus_grid=grid,
                                                                      token_sample=token_sample))
    plan = recipe.plan(cfg)
    rng = np.random.default_rng(0)
    batch = max(1, tokens // seq_len)
    ids = [rng.integers(3, cfg.vocab_size, (batch, seq_len), dtype=np.int32)]
    batches = prepare_batches(cfg, SimpleNamespace(batches=ids))
    hidden = [bf16_round(reader.read("model.embed_tokens.weight"))[b[0]] for b in batches]
    source_bytes = sum(reader._tensors[n].end - reader._tensors[n].start for n in reader.names()
                       if n.startswith("model.layers.0."))
    out: dict = {"tokens": batch * seq_len, "seq_len": seq_len, "source_bytes": source_bytes}
    rss0 = vm("VmRSS")

    def phase(name, fn):
        reset_peak()
        started = time.perf_counter()
        result = fn()
        out[name] = {"seconds": time.perf_counter() - started, "rss": vm("VmRSS") - rss0, "peak": vm("VmHWM") - rss0}
        return result

    tensors = phase("read", lambda: reader.read_layer(0))
    params = sum(a.size for a in tensors.values())
    out["params"] = params
    lq = phase("build", lambda: LayerQuantizer(cfg, 0, tensors, plan, recipe, batches, hidden))

    # time the attention block and every expert call inside the float pass with cell hooks
    spent = {"attention": 0.0, "experts": 0.0, "expert_calls": 0, "expert_rows": 0, "shared": 0.0}
    clock = {}

    def timed(cell, key):
        def pre(c, args):
            clock[key] = time.perf_counter()
            if key == "experts":
                spent["expert_calls"] += 1
                spent["expert_rows"] += args[0].shape[0]

        def post(c, args, output):
            spent[key] += time.perf_counter() - clock[key]
        return [cell.register_forward_pre_hook(pre), cell.register_forward_hook(post)]

    handles = timed(lq.layer.self_attn, "attention") + timed(lq.layer.mlp.shared_experts, "shared")
    for expert in lq.layer.mlp.experts:
        handles += timed(expert, "experts")
    float_outputs = phase("observe", lambda: lq.observe(False))
    for handle in handles:
        handle.remove()
    out["observe"].update(spent)

    # the OS+ search runs the attention (to the MLP's input) on its sample once per candidate, after one float run
    # for its targets: count those forwards and their tokens
    runs = {"calls": 0, "tokens": 0, "seconds": 0.0}
    original_inputs = lq._mlp_inputs

    def counting_inputs(batches, hidden):
        started = time.perf_counter()
        result = original_inputs(batches, hidden)
        runs["calls"] += 1
        runs["tokens"] += sum(h.shape[0] * h.shape[1] for h in hidden)
        runs["seconds"] += time.perf_counter() - started
        return result

    lq._mlp_inputs = counting_inputs
    phase("quantize", lambda: lq.quantize(float_outputs))
    lq._mlp_inputs = original_inputs
    out["quantize"]["search"] = runs
    phase("measure", lambda: lq.measure(float_outputs))
    stored, _ = phase("tensors", lambda: lq.tensors())
    with tempfile.TemporaryDirectory() as tmp:
        phase("write", lambda: write_safetensors(Path(tmp) / "layer.safetensors", stored.items()))
    out["stored_bytes"] = int(sum(a.nbytes for a in stored.values()))
    lq.layer = None  # free the layer before the single-expert timing

    # one expert alone (statistics hooks as in observe): per-call overhead and per-token cost
    expert = MLP(cfg.hidden_size, cfg.moe_intermediate_size)
    for p in expert.get_parameters():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.01))
    for lin in (expert.gate_proj, expert.up_proj, expert.down_proj):
        stats = RunningStats()
        lin.register_forward_pre_hook(lambda c, a, stats=stats: stats.update(a[0].asnumpy().reshape(-1, c.in_features)))
    timing = {}
    for rows in (16, 256):
        x = ms.Tensor(rng.standard_normal((rows, cfg.hidden_size)).astype(np.float32))
        expert(x)
        best = math.inf
        for _ in range(3):
            started = time.perf_counter()
            expert(x).asnumpy()
            best = min(best, time.perf_counter() - started)
        timing[rows] = best
    per_row = (timing[256] - timing[16]) / 240
    out["expert_alone"] = {"rows": list(timing), "seconds": list(timing.values()),
                           "per_row": per_row, "per_call": max(0.0, timing[16] - 16 * per_row)}
    return out


# ---- extrapolation --------------------------------------------------------------------------------------------------
def estimate(m: dict, disk_gbps: float) -> dict:
    from goldstick.model.config import ModelConfig
    from goldstick.quant.recipe import load_recipe

    r1 = ModelConfig()  # the defaults are R1's
    recipe = load_recipe("deepseek-r1-w8a8-mixed")
    cal_tokens = recipe.calibration.samples * recipe.calibration.seq_len
    seq = recipe.calibration.seq_len
    batch_tokens = 2 * seq  # engine batches: about 4096 tokens each
    batches = cal_tokens // batch_tokens
    sample = recipe.options.token_sample
    n_moe = r1.num_hidden_layers - r1.first_k_dense_replace
    n_dense = r1.first_k_dense_replace
    probe_tokens = m["tokens"]

    # forward seconds per token, from the probe's float pass
    proj, score = attention_flops_per_token(r1, m["seq_len"])
    attn_tok_probe = m["observe"]["attention"] / probe_tokens
    attn_rate = (proj + score) / attn_tok_probe  # FLOP/s achieved by the attention block
    proj_r1, score_r1 = attention_flops_per_token(r1, seq)
    attn_tok = (proj_r1 + score_r1) / attn_rate
    ea = m["expert_alone"]
    expert_row = ea["per_row"]  # seconds per token through one expert (R1 width)
    expert_call = ea["per_call"]  # seconds per expert call, whatever its rows
    dense_row = expert_row * r1.intermediate_size / r1.moe_intermediate_size
    rows_per_expert = batch_tokens * r1.num_experts_per_tok / r1.n_routed_experts  # mean, per batch

    def moe_pass(tokens: float, n_batches: float) -> float:
        routed = tokens * r1.num_experts_per_tok * expert_row + n_batches * r1.n_routed_experts * expert_call
        shared = tokens * r1.n_shared_experts * expert_row + n_batches * expert_call
        return tokens * attn_tok + routed + shared

    def dense_pass(tokens: float) -> float:
        return tokens * (attn_tok + dense_row)

    # OS+ search: attention forwards on token_sample tokens; the probe tells how many a search does
    search = m["quantize"]["search"]
    forwards_per_grid_point = (search["calls"] - 1) / m["grid"]  # one per candidate per search, after the targets
    search_forwards = forwards_per_grid_point * recipe.options.osplus_grid

    # weight quantization seconds per parameter (quantize phase minus its search forwards)
    quant_sec = max(0.0, m["quantize"]["seconds"] - search["seconds"]) / m["params"]
    read_sec = m["read"]["seconds"] / m["source_bytes"]  # per FP8 source byte, page cache warm
    write_sec = (m["tensors"]["seconds"] + m["write"]["seconds"]) / m["stored_bytes"]

    attn_p = attention_params(r1)
    moe_p = attn_p + (r1.n_routed_experts + r1.n_shared_experts) * expert_params(r1)
    dense_p = attn_p + expert_params(r1, r1.intermediate_size)
    total_p = n_moe * moe_p + n_dense * dense_p
    source_bytes = 640e9  # the FP8 release: ~640 GB in 163 shards (FP8 linears, bf16 rest)
    moe_bytes = source_bytes * n_moe * moe_p / total_p
    stored_ratio = m["stored_bytes"] / m["params"]

    cpu = {}
    cpu["read (FP8 -> f32)"] = source_bytes * read_sec
    cpu["float pass (observe)"] = n_moe * moe_pass(cal_tokens, batches) + n_dense * dense_pass(cal_tokens)
    cpu["OS+ search"] = search_forwards * (n_moe + n_dense) * sample * attn_tok
    cpu["quantized pass (measure)"] = cpu["float pass (observe)"]
    cpu["weight quantization"] = total_p * quant_sec
    cpu["export + write"] = total_p * stored_ratio * write_sec

    # NPU node: forward FLOPs on 8 devices at the assumed MFU; host work (read, dequant, quantize, write) as measured
    fwd_flops_tok_moe = proj_r1 + score_r1 + 2 * (r1.num_experts_per_tok + r1.n_shared_experts) * expert_params(r1)
    fwd_flops_tok_dense = proj_r1 + score_r1 + 2 * expert_params(r1, r1.intermediate_size)
    fwd_flops = (2 * cal_tokens * (n_moe * fwd_flops_tok_moe + n_dense * fwd_flops_tok_dense)
                 + search_forwards * sample * (n_moe + n_dense) * (proj_r1 + score_r1))
    npu_rate = NPU["devices"] * NPU["fp16_tflops"] * 1e12 * NPU["mfu"]
    # every hooked linear's input goes to the host for min/max (observe pass only): bytes per token per layer
    attn_in = 2 * r1.hidden_size + r1.q_lora_rank + r1.kv_lora_rank + r1.num_attention_heads * r1.v_head_dim
    moe_in = (r1.num_experts_per_tok + r1.n_shared_experts) * (2 * r1.hidden_size + r1.moe_intermediate_size)
    dense_in = 2 * r1.hidden_size + r1.intermediate_size
    stats_bytes = 4 * cal_tokens * (n_moe * (attn_in + moe_in) + n_dense * (attn_in + dense_in))
    expert_calls = 2 * batches * n_moe * (r1.n_routed_experts + 1)
    npu = {"forwards (8 NPUs, compute)": fwd_flops / npu_rate,
           "op launches of expert calls": expert_calls * OPS_PER_EXPERT_CALL * NPU["op_launch_us"] * 1e-6,
           "host: statistics of hooked inputs": stats_bytes / (NPU["host_stats_gbps"] * 1e9),
           "host->device weights (f32, PCIe)": 4 * total_p / (NPU["pcie_gbps"] * 1e9),
           "host: read (FP8 -> f32)": cpu["read (FP8 -> f32)"],
           "host: weight quantization": cpu["weight quantization"],
           "host: export + write": cpu["export + write"]}
    disk = source_bytes / (disk_gbps * 1e9)

    # peak host memory: the engine today holds the whole layer; bytes per parameter measured on the probe layer
    worst_phase = max(("build", "observe", "quantize", "measure", "tensors"), key=lambda k: m[k]["peak"])
    bytes_per_param = m[worst_phase]["peak"] / m["params"]
    activations = 3 * cal_tokens * r1.hidden_size * 4  # layer inputs, float outputs, quantized outputs (f32)
    b = batch_tokens // seq
    scores = 3 * b * r1.num_attention_heads * seq * seq * 4  # scores, masked scores, probabilities of one batch
    today = bytes_per_param * moe_p + activations + scores
    # the engine's lean loop (LayerQuantizer(lean=True)): tensors read one at a time into the network (4 B/param
    # once), routed experts streamed in float and resident as int8, one activation set replaced in place, batches
    # cut to one sequence (batch_rows) -- derived from the parameter counts, not measured on the probe
    lean_rows = max(1, min((1 << 21) // (r1.num_attention_heads * seq * seq), (1 << 20) // (seq * r1.hidden_size)))
    per_expert = {
        "float attention + shared expert (4 B/param, once)": 4 * (attn_p + expert_params(r1)),
        "routed experts as int8 (1 B/param) + one expert's f32 at a time": r1.n_routed_experts * expert_params(r1)
        + 4 * expert_params(r1),
        "activations (one set, outputs replace inputs)": cal_tokens * r1.hidden_size * 4,
        f"attention scores of one batch ({lean_rows} sequence)": 3 * lean_rows * r1.num_attention_heads * seq * seq * 4}
    return dict(cpu=cpu, npu=npu, disk=disk, stats_bytes=stats_bytes, expert_calls=expert_calls, cal_tokens=cal_tokens,
                batches=batches, search_forwards=search_forwards,
                attn_rate=attn_rate, attn_tok=attn_tok, expert_row=expert_row, expert_call=expert_call,
                rows_per_expert=rows_per_expert, moe_params=moe_p, dense_params=dense_p, total_params=total_p,
                moe_bytes=moe_bytes / n_moe, bytes_per_param=bytes_per_param, worst_phase=worst_phase,
                activations=activations, scores=scores, today=today, per_expert=per_expert,
                fwd_flops=fwd_flops, npu_rate=npu_rate, read_gbps=1 / read_sec / 1e9, quant_sec=quant_sec)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:8.1f} h" if seconds >= 360 else f"{seconds / 60:8.1f} min"


def report(m: dict, e: dict, disk_gbps: float) -> None:
    gb = 1e9
    print("measured on the probe layer (R1 widths, "
          f"{PROBE['n_routed_experts']} routed experts top-{PROBE['num_experts_per_tok']} + 1 shared, "
          f"{m['params'] / 1e9:.2f} G params, {m['source_bytes'] / gb:.2f} GB FP8 source; "
          f"calibration {m['tokens']} tokens at seq {m['seq_len']}):")
    for k in ("read", "build", "observe", "quantize", "measure", "tensors", "write"):
        v = m[k]
        print(f"  {k:9} {v['seconds']:8.2f} s   resident after {v['rss'] / gb:6.2f} GB   peak {v['peak'] / gb:6.2f} GB "
              f"({v['peak'] / m['params']:.1f} B/param)")
    o = m["observe"]
    print(f"  float pass: attention {o['attention']:.2f} s, {o['expert_calls']} expert calls {o['experts']:.2f} s "
          f"({o['expert_rows']} rows), shared expert {o['shared']:.2f} s")
    s = m["quantize"]["search"]
    print(f"  OS+ search (grid {m['grid']}, sample {m['token_sample']} tokens): {s['calls']} attention forwards, "
          f"{s['tokens']} tokens, {s['seconds']:.2f} s")
    ea = m["expert_alone"]
    print(f"  one expert alone with hooks: {ea['seconds'][0] * 1e3:.1f} ms at {ea['rows'][0]} rows, "
          f"{ea['seconds'][1] * 1e3:.1f} ms at {ea['rows'][1]} rows -> {ea['per_call'] * 1e3:.2f} ms per call "
          f"+ {ea['per_row'] * 1e6:.0f} us per row")
    print(f"\nderived: attention {e['attn_rate'] / 1e9:.1f} GFLOP/s -> {e['attn_tok'] * 1e3:.2f} ms/token at seq 2048; "
          f"expert {e['expert_row'] * 1e6:.0f} us/row + {e['expert_call'] * 1e3:.2f} ms/call "
          f"(R1: ~{e['rows_per_expert']:.0f} rows per expert per batch); FP8 read+dequant {e['read_gbps']:.2f} GB/s; "
          f"weight quantization {e['quant_sec'] * 1e9:.1f} s per G params")
    print(f"\nR1: {e['total_params'] / 1e9:.0f} G params in decoder layers (MoE layer {e['moe_params'] / 1e9:.2f} G, "
          f"~{e['moe_bytes'] / gb:.1f} GB FP8, {e['moe_params'] * 4 / gb:.0f} GB as f32), calibration "
          f"{e['cal_tokens']} tokens in {e['batches']} batches, OS+ search {e['search_forwards']:.0f} attention "
          f"forwards x {m['token_sample_recipe']} tokens per layer")
    print("\n(b) CPU only, this machine's measured rates (2 vCPU):")
    total = 0.0
    for k, v in e["cpu"].items():
        total += v
        print(f"  {k:34} {hours(v)}")
    print(f"  {'total':34} {hours(total)}   ({total / 86400:.1f} days)")
    print(f"\n(a) one node of {NPU['devices']} x {NPU['name']} ({NPU['fp16_tflops']:.0f} TFLOPS FP16 each, "
          f"assumed MFU {NPU['mfu']:.0%}, {NPU['op_launch_us']:.0f} us per op launch, "
          f"PCIe {NPU['pcie_gbps']:.0f} GB/s, "
          f"host statistics {NPU['host_stats_gbps']:.0f} GB/s on {e['stats_bytes'] / 1e12:.1f} TB); "
          f"host work at this machine's measured single-process rates:")
    total_npu = 0.0
    for k, v in e["npu"].items():
        total_npu += v
        print(f"  {k:34} {hours(v)}")
    print(f"  {'total (no overlap)':34} {hours(total_npu)}")
    print(f"  {'disk: 640 GB at ' + f'{disk_gbps:g} GB/s':34} {hours(e['disk'])}   (overlappable with compute)")
    print("\npeak host memory, one R1 MoE layer resident, as the probe measures it (LayerQuantizer not lean, as "
          "goldstick.evaluation.analyze runs it: read_layer reads the whole layer):")
    print(f"  measured {e['bytes_per_param']:.1f} B/param at the probe's worst phase ({e['worst_phase']}) x "
          f"{e['moe_params'] / 1e9:.2f} G params = {e['bytes_per_param'] * e['moe_params'] / gb:.0f} GB")
    float_pass = m["observe"]["peak"] / m["params"]
    print(f"  (float pass alone: {float_pass:.1f} B/param = {float_pass * e['moe_params'] / gb:.0f} GB; the probe's "
          f"worst phase is inflated by the OS+ searches' attention copies, which weigh less in an R1 layer)")
    print(f"  + calibration activations (inputs, float and quantized outputs, f32) {e['activations'] / gb:.1f} GB")
    print(f"  + attention scores of one batch (2 x 128 heads x 2048^2, 3 live copies) {e['scores'] / gb:.1f} GB")
    print(f"  = {e['today'] / gb:.0f} GB")
    per_expert = sum(e["per_expert"].values())
    print("the engine's lean loop (implemented since; derived from parameter counts, see docs/r1-estimate.md):")
    for k, v in e["per_expert"].items():
        print(f"  {k:70} {v / gb:6.1f} GB")
    print(f"  = {per_expert / gb:.0f} GB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", type=Path, help="an R1-width probe checkpoint (default: build one in a temp dir)")
    parser.add_argument("--tokens", type=int, default=1024, help="calibration tokens on the probe layer")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--token-sample", type=int, default=256, help="OS+ search sample on the probe")
    parser.add_argument("--grid", type=int, default=3, help="OS+ grid on the probe")
    parser.add_argument("--disk-gbps", type=float, default=2.0, help="assumed sequential read speed of the source")
    parser.add_argument("--json", type=Path, help="also write the measurements and the estimate here")
    parser.add_argument("--from-json", type=Path, help="re-derive the estimate from measurements saved by --json")
    args = parser.parse_args(argv)
    from goldstick.quant.recipe import load_recipe

    if args.from_json:
        m = json.loads(args.from_json.read_text())["measured"]
        m["expert_alone"]["rows"] = [int(r) for r in m["expert_alone"]["rows"]]
    else:
        with tempfile.TemporaryDirectory(prefix="r1-probe-") as tmp:
            probe = args.probe if args.probe else build_probe(Path(tmp) / "probe")
            m = measure(probe, args.tokens, args.seq_len, args.token_sample, args.grid)
        m.update(grid=args.grid, token_sample=args.token_sample,
                 token_sample_recipe=load_recipe("deepseek-r1-w8a8-mixed").options.token_sample)
    e = estimate(m, args.disk_gbps)
    report(m, e, args.disk_gbps)
    if args.json:
        args.json.write_text(json.dumps({"measured": m, "estimate": e}, indent=2, default=float))


if __name__ == "__main__":
    sys.exit(main())
