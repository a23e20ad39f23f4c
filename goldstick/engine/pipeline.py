"""The quantization engine: recipe + checkpoint + calibration data -> quantized checkpoint + report.

    plan = recipe.plan(config)                                  every linear -> scheme (first matching rule)
    h    = embed(calibration batches)                           inputs of layer 0
    for each decoder layer (read from the checkpoint, one at a time):
        float pass   : run the float layer, hooks keep running per-channel min/max of every linear's input
        transform    : SmoothQuant / OS+ per group of linears that share an input (folded into the feeding norm
                       where every consumer of that norm takes part, else explicit per linear)
        quantize     : swap each linear for its integer cell (qlinear.py); OS+ searches its scale against the
                       error of the *layer's* output
        quant pass   : run the quantized layer -> next layer's inputs (quantized by default, float as an option),
                       layer and per-linear SQNR
        write        : the layer's tensors to a work file; the layer is freed
    assemble the checkpoint (shards, index, config, description, recipe, report, manifest last)

Peak memory is one decoder layer plus the calibration activations; it does not grow with the number of layers.
Everything the engine computes with is what will be stored (bf16 scales and float weights are rounded before use),
so the exported checkpoint, loaded by ``load_model``, reproduces the engine's quantized logits exactly.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from goldstick.quant import algorithms as alg
from goldstick.quant.numerics import (bf16_ceil, bf16_round, quantize_weight, sqnr_from_sums,
                                       sum_squares)
from goldstick.engine.calibration import DEFAULT_CALIBRATION, CalibrationSet, load_calibration, portable_source
from goldstick.io.checkpoint import CheckpointError, CheckpointReader, nonfinite_problem
from goldstick.io.files import sha256_file
from goldstick.quant.recipe import Plan, Recipe, load_recipe, smoothing_groups
from goldstick.model.runtime import release_memory, setup_mindspore
from goldstick.engine.stream import calibration_needed
from goldstick.io.writer import write_json_atomic, write_safetensors
from goldstick.errors import GoldstickError

WORK_DIR = ".goldstick-work"
DEFAULT_MAX_SHARD_BYTES = 4 << 30  # Golden-Stick's own 4 GB shard limit
BF16 = ml_dtypes.bfloat16

# Storage dtype of each quantized-linear tensor in the Golden-Stick / vllm-mindspore layout
# (notes/golden-stick.md §2.1, §3.2): scales in the bf16 compute dtype, deq_scale fp32, integer biases int32.
QUANT_TENSOR_DTYPES = {
    "weight": np.int8, "deq_scale": np.float32, "quant_bias": np.int32, "input_scale": BF16,
    "input_offset": np.int8, "beta": BF16, "weight_scale": BF16, "weight_offset": np.int32,
}


_EXPERT = re.compile(r".*\.mlp\.experts\.(\d+)\.")


class QuantizeError(GoldstickError, RuntimeError):
    pass


class QuantizeInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``quantize``; the message says how to continue (the work folder is left resumable)."""


# ------------------------------------------------------------------------------------------------ small helpers
def quantize_weight_unit(unit: tuple[np.ndarray, str]) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_weight(w, mode)`` as an executor work unit (a module-level function: picklable)."""
    return quantize_weight(*unit)


@dataclass
class RunningStats:
    """Per-channel running min/max of one linear's input, and how many tokens were seen."""

    minimum: np.ndarray | None = None
    maximum: np.ndarray | None = None
    tokens: int = 0

    def update(self, x: np.ndarray) -> None:
        lo, hi = x.min(axis=0), x.max(axis=0)
        if self.minimum is None:
            self.minimum, self.maximum = lo.astype(np.float32), hi.astype(np.float32)
        else:
            np.minimum(self.minimum, lo, out=self.minimum)
            np.maximum(self.maximum, hi, out=self.maximum)
        self.tokens += x.shape[0]

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.minimum), np.abs(self.maximum))


@dataclass
class Transform:
    """The activation transform of one static linear: x_tilde = (x - shift) / scale (per input channel)."""

    scale: np.ndarray
    shift: np.ndarray
    folded_into: str | None  # the norm that applies it, or None (explicit in input_scale / beta)
    details: dict = field(default_factory=dict)


@dataclass
class QuantizeResult:
    out: Path
    plan: Plan
    report: dict
    final_logits: np.ndarray | None = None  # quantized logits of the first calibration batch, from the engine


class Feedback:
    """What a run tells its user on stderr while it works: messages, a second bar for the phase of the layer at work
    (tokens, or OS+ candidates), and what the time estimate is made from. Disabled (``progress=False``) it prints
    nothing; it still times the phases.

    Each phase has a kind for the estimate: ``statistics`` (a pass that computes only what the statistics need:
    the attention or less) or ``layer`` (the whole layer, float or quantized); ``measured`` sums the tokens and
    seconds per kind."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.measured: dict[str, list] = {}  # kind -> [tokens, seconds]
        self.bar = None
        self.unit = self.kind = None
        self.started = 0.0

    def say(self, message: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def phase(self, name: str, total: int, unit: str, kind: str | None = None) -> None:
        """Start a phase (ending the one before) of ``total`` ``unit`` ("tok" or "candidate")."""
        self.end_phase()
        self.unit, self.kind, self.started = unit, kind, time.perf_counter()
        if kind is not None:
            self.measured.setdefault(kind, [0, 0.0])
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"  {name}", unit=unit, unit_scale=unit == "tok", position=1,
                            leave=False, mininterval=0.5, file=sys.stderr)

    def advance(self, n: int, unit: str) -> None:
        """``n`` more ``unit`` done; ignored when the phase counts another unit (the OS+ search's layer runs)."""
        if unit != self.unit:
            return
        if self.kind is not None:
            self.measured[self.kind][0] += n
        if self.bar is not None:
            self.bar.update(n)

    def end_phase(self) -> None:
        if self.kind is not None:
            self.measured[self.kind][1] += time.perf_counter() - self.started
        self.unit = self.kind = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def estimate(self, work: dict[str, int]) -> float | None:
        """Seconds for ``work`` (tokens per kind, LayerQuantizer.planned_work) at the measured seconds per token;
        None while a kind it needs has not been timed."""
        seconds = 0.0
        for kind, tokens in work.items():
            done, spent = self.measured.get(kind, (0, 0.0))
            if tokens and not done:
                return None
            seconds += tokens * spent / done if tokens else 0.0
        return seconds


# ------------------------------------------------------------------------------------------------ the layer
class LayerQuantizer:
    """Quantizes one decoder layer in place according to its plan entries."""

    def __init__(self, cfg, layer_index: int, tensors: dict[str, np.ndarray], plan: Plan, recipe: Recipe,
                 batches: list, hidden: list[np.ndarray], executor=None, lean: bool = False,
                 feedback: Feedback | None = None):
        """``lean`` (the engine's layer loop): allow the attention-only float pass (below), and let ``measure``
        replace the items of ``hidden`` with the layer's outputs as they arrive (the caller's list: the next
        layer's inputs, without a second copy). goldstick.evaluation.analyze needs the float layer on every token: not lean.
        ``feedback``: where the phases report their progress (default: silent)."""
        from mindspore import Tensor

        from goldstick.model.network import DecoderLayer, Linear, MoE, RMSNorm, StreamedLinear, parameter_placeholders
        from goldstick.quant.cells import replace_cell

        self.cfg, self.index, self.plan, self.recipe = cfg, layer_index, plan, recipe
        self.feedback = feedback or Feedback()
        self.executor = executor  # a goldstick.engine.executors.Executor for the weight-only/dynamic linears, or None
        self.prefix = f"model.layers.{layer_index}."
        self.batches, self.hidden = batches, hidden
        self.entries = {e.name: e for e in plan.for_layer(layer_index)}
        self.needs_stats = {n for n, e in self.entries.items()
                            if e.scheme.static or e.scheme.outlier_suppression != "none"}
        # When no MLP linear needs activation statistics and the next layer reads the quantized outputs, the float
        # pass over all calibration tokens only has to go through the attention (for its statistics): the float
        # layer then runs on a bounded token sample only (the OS+ search's targets, the report's SQNR), and the
        # MLP (most of a DeepSeek layer's work) runs once, quantized. Same checkpoint as the full float pass.
        self.lean = lean
        self.attention_only = lean and recipe.options.inputs_from == "quantized" and not any(
            n.startswith(self.prefix + "mlp.") for n in self.needs_stats)
        with parameter_placeholders():  # every parameter is set from ``tensors`` below
            self.layer = DecoderLayer(cfg, layer_index)
        self.layer.update_parameters_name(self.prefix)
        # ``tensors`` (LayerTensors) reads each tensor when asked for. With ``attention_only`` the routed experts
        # run in float only on the token sample, once each: they read their weight at the call (StreamedLinear),
        # so the experts are never all held in float32 at once
        self.source = tensors
        self.streamed = set()
        if self.attention_only and isinstance(self.layer.mlp, MoE):
            for local, cell in list(self.layer.mlp.experts.cells_and_names()):
                if isinstance(cell, Linear):
                    name = f"{self.prefix}mlp.experts.{local}"
                    replace_cell(self.layer, f"mlp.experts.{local}", StreamedLinear(
                        cell.in_features, cell.out_features, lambda name=name: self.weight(f"{name}.weight")),
                        full_name=name)
                    self.streamed.add(name)
        params = {p.name: p for p in self.layer.get_parameters()}
        self.float_tensors = {}
        for name in tensors:
            if name.rpartition(".")[0] in self.streamed:
                continue
            if name not in params:
                raise QuantizeError(f"layer {layer_index}: checkpoint tensor {name!r} has no place in the network")
            array = self.float_tensors[name] = np.ascontiguousarray(tensors[name], dtype=np.float32)
            params[name].set_data(Tensor.from_numpy(array))  # shares the array
        unset = sorted(set(params) - set(self.float_tensors))
        if unset:
            raise QuantizeError(f"layer {layer_index}: the checkpoint has no tensor for {', '.join(unset)}")
        self.linears = {self.prefix + n: c for n, c in self.layer.cells_and_names()
                        if isinstance(c, (Linear, StreamedLinear))}
        self.norms = {self.prefix + n: c for n, c in self.layer.cells_and_names() if isinstance(c, RMSNorm)}
        self.stats: dict[str, RunningStats] = {}
        self.expert_tokens: np.ndarray | None = None
        self.moe_sample: list[np.ndarray] = []
        self.routes: list[tuple[np.ndarray, np.ndarray]] = []
        self.transforms: dict[str, Transform] = {}
        self.act_params: dict[str, alg.ActQuantParams] = {}
        self.linear_noise: dict[str, list[float]] = {}
        # a linear's float reference for its SQNR: (weight, bias) on what the cell receives, or None = its
        # checkpoint weight, read again when measured (a streamed expert)
        self.reference: dict[str, tuple[np.ndarray, np.ndarray | None] | None] = {}
        self.report: dict = {}
        self.sample = self._sample()

    def weight(self, name: str) -> np.ndarray:
        """A float32 checkpoint tensor of this layer: the loaded one, or read now (a streamed expert's)."""
        if name in self.float_tensors:
            return self.float_tensors[name]
        return np.ascontiguousarray(self.source[name], dtype=np.float32)

    # ---- float pass ---------------------------------------------------------------------------
    def run(self, inputs: list[np.ndarray], batches: list | None = None,
            outputs: list | None = None) -> list[np.ndarray]:
        """The layer's outputs for each batch. The attention runs batch by batch; the MLP half runs on the tokens of
        several consecutive batches at once (``mlp_groups``): each routed expert then gets a few hundred rows
        instead of a few dozen, where the CPU matmul runs ~1.5x faster, and a quantized expert casts its weight once
        per group. ``outputs``: the list to fill, which may be ``inputs`` (each input is replaced once its group is
        done, so no second copy of the calibration activations is held)."""
        from mindspore import Tensor

        batches = batches or self.batches
        outputs = [None] * len(inputs) if outputs is None else outputs
        hidden_size = self.cfg.hidden_size
        for group in mlp_groups(batches, hidden_size, MLP_GROUP_ELEMENTS):
            attended = [self.layer.attend(_tensor(inputs[b]), *batches[b][1:]).asnumpy() for b in group]
            flat = np.concatenate([a.reshape(-1, hidden_size) for a in attended]) if len(group) > 1 \
                else attended[0].reshape(-1, hidden_size)
            del attended
            y = self.layer.feed_forward(Tensor.from_numpy(flat)).asnumpy()
            start = 0
            for b in group:
                shape = inputs[b].shape
                outputs[b] = y[start:start + shape[0] * shape[1]].reshape(shape)
                start += shape[0] * shape[1]
            self.feedback.advance(start, "tok")
        return outputs

    def observe(self, all_experts: bool) -> list[np.ndarray]:
        """Float pass with statistics hooks; returns the float outputs of every calibration batch (of the token
        sample only, when ``attention_only``)."""
        if self.attention_only:
            return self._observe_attention()
        handles = [self._stats_hook(name) for name in self.linears]
        moe = getattr(self.layer.mlp, "gate", None)
        if moe is not None:
            self.expert_tokens = np.zeros(self.cfg.n_routed_experts, dtype=np.int64)
            budget = [self.recipe.options.token_sample]

            def router_hook(cell, inputs, output):
                ids = output[1].asnumpy()
                self.routes.append((output[0].asnumpy(), ids))  # the float routing, reused by the OS+ search
                self.expert_tokens += np.bincount(ids.reshape(-1), minlength=self.cfg.n_routed_experts)
                if budget[0] > 0:  # a bounded sample of MoE inputs, for experts that see no token
                    x = inputs[0].asnumpy()[: budget[0]]
                    self.moe_sample.append(x)
                    budget[0] -= x.shape[0]
            handles.append(moe.register_forward_hook(router_hook))
            self.layer.mlp.observe_all_experts = all_experts
        self.feedback.phase("float pass", _tokens(self.batches), "tok", kind="layer")
        try:
            outputs = self.run(self.hidden)
        finally:
            self.feedback.end_phase()
            for handle in handles:
                handle.remove()
            if moe is not None:
                self.layer.mlp.observe_all_experts = False
        self.routes = _routes_by_batch(self.routes, self.batches)
        self._fill_unseen_experts()
        return outputs

    def _stats_hook(self, name: str):
        stats = self.stats.setdefault(name, RunningStats())
        return self.linears[name].register_forward_pre_hook(
            lambda cell, inputs: stats.update(inputs[0].asnumpy().reshape(-1, cell.in_features)))

    def _observe_attention(self) -> list[np.ndarray]:
        """The attention's statistics over every calibration token, then the float layer on the token sample."""
        self.feedback.phase("statistics pass", _tokens(self.batches), "tok", kind="statistics")
        if self.needs_stats <= {self.prefix + "self_attn." + n for n in (*NORMED_INPUT_PROJECTIONS, "q_b_proj")}:
            for h in self.hidden:
                self._observe_projection_inputs(h)
                self.feedback.advance(h.shape[0] * h.shape[1], "tok")
        else:
            handles = [self._stats_hook(name) for name in sorted(self.needs_stats)]
            try:
                for (ids, cos, sin, mask), h in zip(self.batches, self.hidden):
                    self.layer.self_attn(self.layer.input_layernorm(_tensor(h)), cos, sin, mask)
                    self.feedback.advance(ids.size, "tok")
            finally:
                for handle in handles:
                    handle.remove()
        router = getattr(self.layer.mlp, "gate", None)
        handle = None
        if router is not None:  # the float routing of the sample, reused by the OS+ search
            handle = router.register_forward_hook(
                lambda cell, inputs, output: self.routes.append((output[0].asnumpy(), output[1].asnumpy())))
        batches, hidden = self.sample
        self.feedback.phase("float pass on the sample", _tokens(batches), "tok", kind="layer")
        try:
            outputs = self.run(hidden, batches)
        finally:
            self.feedback.end_phase()
            if handle is not None:
                handle.remove()
        self.routes = _routes_by_batch(self.routes, batches)
        return outputs

    def _observe_projection_inputs(self, h: np.ndarray) -> None:
        """Statistics of the MLA projections that read the normed input (q_a_proj or q_proj, kv_a_proj_with_mqa)
        and of q_b_proj (its input: q_a_layernorm(q_a_proj(x))) without the rest of the attention, when no other
        attention linear needs them (every recipe that smooths only the MLA inputs): of the attention's matmuls only
        q_a_proj runs (the wide benchmark model's float attention pass: ~9 s of a 70 s run). The same values as the
        hooks on the whole attention see."""
        attn, prefix = self.layer.self_attn, self.prefix + "self_attn."
        x = self.layer.input_layernorm(_tensor(h))
        x_np = x.asnumpy().reshape(-1, x.shape[-1])
        for local in NORMED_INPUT_PROJECTIONS:
            if prefix + local in self.needs_stats:
                self.stats.setdefault(prefix + local, RunningStats()).update(x_np)
        if prefix + "q_b_proj" in self.needs_stats:
            q = attn.q_a_layernorm(attn.q_a_proj(x)).asnumpy()
            self.stats.setdefault(prefix + "q_b_proj", RunningStats()).update(q.reshape(-1, q.shape[-1]))

    def _fill_unseen_experts(self) -> None:
        """An expert no calibration token reached gets statistics from the layer's bounded MoE input sample."""
        if self.expert_tokens is None:
            return
        self.unseen = [e for e in range(self.cfg.n_routed_experts)
                       if self.stats.get(f"{self.prefix}mlp.experts.{e}.gate_proj", RunningStats()).tokens == 0]
        if not self.unseen or not self.moe_sample:
            return
        sample = _tensor(np.concatenate(self.moe_sample))
        for e in self.unseen:
            handles = [self._stats_hook(f"{self.prefix}mlp.experts.{e}.{local}")
                       for local in ("gate_proj", "up_proj", "down_proj")]
            self.layer.mlp.experts[e](sample)
            for handle in handles:
                handle.remove()

    # ---- transforms and quantization ---------------------------------------------------------
    def quantize(self, float_outputs: list[np.ndarray]) -> None:
        options = self.recipe.options
        static_groups, explicit = self._static_groups()
        dynamic_groups = self._dynamic_smoothing_groups()
        smoothed = {m for _, members in dynamic_groups for m in members}
        weight_quant = []
        for name, entry in self.entries.items():
            scheme = entry.scheme
            if name not in self.linears:
                continue  # the router: a float Router cell, not a Linear
            if scheme.name == "float":
                self._set_float(name)
            elif scheme.name in ("w8a16", "w8a8-dynamic") and name not in smoothed:
                weight_quant.append(name)
        # independent of calibration and of each other (the experts): one unit each, on the executor if any
        mode = options.weight_rounding
        if self.executor is not None and len(weight_quant) > 1:
            done = self.executor.map(quantize_weight_unit,
                                     [(self.weight(f"{n}.weight"), mode) for n in weight_quant])
        else:
            done = [None] * len(weight_quant)
        for name, result in zip(weight_quant, done):
            self._set_weight_quant(name, self.entries[name].scheme.name, result)
        # dynamic linears with SmoothQuant: one scale per norm, folded into it (the plan refused the rest)
        for norm, members in dynamic_groups:
            transform = self._initial_transform(members, "smoothquant", norm)
            for m in members:
                self._set_dynamic_smoothed(m, transform)
        # static linears: one shared transform per folded group, else their own
        search_jobs = []
        for norm, members, method in static_groups:
            transform = self._initial_transform(members, method, norm)
            for m in members:
                self._set_static(m, transform)
            if method == "osplus":
                search_jobs.append((members, norm))
        for name in explicit:
            method = self.entries[name].scheme.outlier_suppression
            self._set_static(name, self._initial_transform([name], method, None))
            if method == "osplus":
                search_jobs.append(([name], None))
        if search_jobs:
            self.feedback.phase("OS+ search", len(search_jobs) * options.osplus_grid, "candidate")
            if self.attention_only:
                sample = (*self.sample, float_outputs)  # the float pass ran on the sample only
            else:
                sample = (*self.sample, [t[: len(ids)] for t, (ids, *_) in zip(float_outputs, self.sample[0])])
            for members, norm in search_jobs:
                self._search_osplus(members, norm, sample, options.osplus_grid)
            self.feedback.end_phase()
        for name, norm in self.norms.items():
            if name not in {t.folded_into for t in self.transforms.values()}:
                norm.weight.set_data(_tensor(bf16_round(self.float_tensors[f"{name}.weight"])))
        router = getattr(self.layer.mlp, "gate", None)
        if router is not None:
            router.weight.set_data(_tensor(bf16_round(self.float_tensors[f"{self.prefix}mlp.gate.weight"])))

    def _static_groups(self) -> tuple[list[tuple[str, list[str], str]], list[str]]:
        """Static linears that share a norm and a suppression method fold one transform into that norm."""
        static = {n for n, e in self.entries.items() if e.scheme.static}
        folded, taken = [], set()
        for group in smoothing_groups(self.cfg, self.index):
            members = list(group.linears)
            methods = {self.entries[m].scheme.outlier_suppression for m in members if m in self.entries}
            if all(m in static for m in members) and len(methods) == 1 and methods != {"none"}:
                folded.append((group.key, members, methods.pop()))
                taken.update(members)
        explicit = [n for n in self.entries if n in static and n not in taken]
        return folded, explicit

    def _dynamic_smoothing_groups(self) -> list[tuple[str, list[str]]]:
        """Norms whose linears are all w8a8-dynamic + smoothquant (Plan guarantees the whole group agrees)."""
        out = []
        for group in smoothing_groups(self.cfg, self.index):
            schemes = [self.entries[m].scheme for m in group.linears if m in self.entries]
            if schemes and all(s.name == "w8a8-dynamic" and s.outlier_suppression == "smoothquant" for s in schemes):
                out.append((group.key, list(group.linears)))
        return out

    def _union_stats(self, members: list[str]) -> RunningStats:
        union = RunningStats()
        for m in members:
            s = self.stats[m]
            if s.minimum is None:
                raise QuantizeError(f"{m}: no calibration statistics (it never ran on calibration data)")
            union.update(np.stack([s.minimum, s.maximum]))
        return union

    def _initial_transform(self, members: list[str], method: str, norm: str | None) -> Transform:
        stats = self._union_stats(members)
        n = stats.minimum.shape[0]
        ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)
        if method == "none":
            return Transform(ones, zeros, None)
        if method == "smoothquant":
            alpha = self.entries[members[0]].scheme.alpha
            alpha = self.recipe.options.smoothquant_alpha if alpha is None else alpha
            weights = [self.weight(f"{m}.weight") for m in members]
            scale = alg.smoothquant_scales(stats.absmax, weights, alpha=alpha)
            return Transform(scale, zeros, norm, {"alpha": float(alpha)})
        shift = alg.osplus_shift(stats.minimum, stats.maximum)
        return Transform(ones, shift, norm, {"threshold": None})

    def _set_cell(self, name: str, cell) -> None:
        from goldstick.quant.cells import replace_cell

        replace_cell(self.layer, name[len(self.prefix):], cell, full_name=name)
        cell.cache_weight = False  # see QuantLinearBase: the engine would otherwise hold the layer in float32 twice
        self.linears[name] = cell

    def _set_float(self, name: str) -> None:
        from goldstick.model.network import Linear

        source = self.weight(f"{name}.weight")
        w = bf16_round(source)
        cell = Linear(w.shape[1], w.shape[0])
        cell.weight.set_data(_tensor(w))
        self._set_cell(name, cell)
        self.reference[name] = (source, None)

    def _set_weight_quant(self, name: str, scheme: str, quantized: tuple | None = None) -> None:
        from goldstick.quant.cells import DynamicW8A8Linear, W8A16Linear

        if quantized is None:
            quantized = quantize_weight(self.weight(f"{name}.weight"), self.recipe.options.weight_rounding)
        cls = W8A16Linear if scheme == "w8a16" else DynamicW8A8Linear
        self._set_cell(name, cls(*quantized))
        self.reference[name] = None if name in self.streamed else (self.weight(f"{name}.weight"), None)

    def _set_dynamic_smoothed(self, name: str, t: Transform) -> None:
        """Dynamic W8A8 on x / s with s folded into the feeding norm: the norm's stored (bf16) weight defines s."""
        from goldstick.quant.cells import DynamicW8A8Linear

        gamma = self.float_tensors[f"{t.folded_into}.weight"]
        new_gamma = bf16_round(gamma / t.scale)
        scale = np.where(new_gamma != 0, gamma / np.where(new_gamma != 0, new_gamma, 1), t.scale).astype(np.float32)
        self.norms[t.folded_into].weight.set_data(_tensor(new_gamma))
        w = self.weight(f"{name}.weight") * scale[None, :]
        q, w_scale = quantize_weight(w, self.recipe.options.weight_rounding)
        self._set_cell(name, DynamicW8A8Linear(q, w_scale))
        self.transforms[name] = Transform(scale, np.zeros_like(scale), t.folded_into, dict(t.details))
        self.reference[name] = (w, None)  # the float linear on what the cell receives (x / s)

    def _set_static(self, name: str, t: Transform) -> None:
        """Quantize one static linear under transform t; for a folded t also (re)write the norm's weight/bias."""
        from goldstick.quant.cells import StaticW8A8Linear

        w = self.weight(f"{name}.weight")
        stats = self.stats[name]
        scale, shift = t.scale, t.shift
        if t.folded_into:
            # the norm applies the transform; its stored (bf16) weight/bias define the effective scale and shift
            gamma = self.float_tensors[f"{t.folded_into}.weight"]
            new_gamma = bf16_round(gamma / scale)
            scale = np.where(new_gamma != 0, gamma / np.where(new_gamma != 0, new_gamma, 1), scale).astype(np.float32)
            new_beta = bf16_round(-shift / scale)
            shift = (-new_beta * scale).astype(np.float32)
            norm = self.norms[t.folded_into]
            norm.weight.set_data(_tensor(new_gamma))
            if np.any(new_beta != 0) or norm.has_bias:
                self._set_norm_bias(t.folded_into, new_beta)
        lo = (stats.minimum - shift) / scale
        hi = (stats.maximum - shift) / scale
        params = alg.activation_params_asymmetric(float(lo.min()), float(hi.max()))
        act_scale = float(bf16_ceil(params.scale))  # stored in bf16: round up so the range stays covered
        zero_point = int(np.clip(np.rint(-128 - min(float(lo.min()), 0.0) / act_scale), -128, 127))
        if t.folded_into:
            input_scale = np.full(w.shape[1], act_scale, np.float32)
            beta = None
        else:
            input_scale = bf16_ceil(act_scale * scale)
            scale = (input_scale / np.float32(act_scale)).astype(np.float32)  # what the stored scale really does
            beta = bf16_round(-shift) if np.any(shift != 0) else None
            shift = -beta if beta is not None else shift
        q, w_scale = quantize_weight(w * scale[None, :], self.recipe.options.weight_rounding)
        deq = alg.deq_scale(act_scale, w_scale)
        shift_term = alg.osplus_bias_compensation(w, shift, deq).int_term if np.any(shift != 0) else None
        bias = alg.quant_bias(q, zero_point, extra=shift_term)
        self._set_cell(name, StaticW8A8Linear(q, deq, bias, input_scale, np.full(w.shape[1], zero_point, np.int8),
                                              beta))
        self.transforms[name] = Transform(scale, shift, t.folded_into, dict(t.details))
        self.act_params[name] = alg.ActQuantParams(scale=np.float32(act_scale), zero_point=zero_point)
        # float reference for the linear's own SQNR, as a function of what the cell receives
        if t.folded_into:
            self.reference[name] = (w * scale[None, :], (w.astype(np.float64) @ shift).astype(np.float32))
        else:
            self.reference[name] = (w, None)

    def _set_norm_bias(self, norm_name: str, bias: np.ndarray) -> None:
        norm = self.norms[norm_name]
        if norm.has_bias:
            norm.bias.set_data(_tensor(bias))
        else:
            norm.set_bias(bias, f"{norm_name}.bias")

    def planned_work(self) -> dict[str, int]:
        """Tokens this layer passes through, per kind of pass (Feedback's, the time estimate's cost model):
        ``statistics`` the statistics pass over every calibration token (attention-only float pass), ``layer`` the
        whole layer: the float pass, each OS+ candidate on the token sample, the quantized pass."""
        tokens, sample = _tokens(self.batches), _tokens(self.sample[0])
        candidates = self.osplus_candidates() * sample
        if self.attention_only:
            return {"statistics": tokens, "layer": sample + candidates + sample + tokens}
        return {"statistics": 0, "layer": tokens + candidates + tokens}

    def osplus_candidates(self) -> int:
        """How many candidates the OS+ search tries in this layer (each one a layer run on the token sample)."""
        folded, explicit = self._static_groups()
        searches = sum(method == "osplus" for *_, method in folded)
        searches += sum(self.entries[n].scheme.outlier_suppression == "osplus" for n in explicit)
        return searches * self.recipe.options.osplus_grid

    def _sample(self) -> tuple[list, list]:
        """The bounded token sample (batches, inputs) the OS+ search runs on: whole sequences, about
        ``token_sample`` tokens, from the first batches."""
        want = self.recipe.options.token_sample
        batches, hidden, tokens = [], [], 0
        for (ids, cos, sin, mask), h in zip(self.batches, self.hidden):
            rows = min(len(ids), max(1, -(-(want - tokens) // ids.shape[1])))
            batches.append((ids[:rows], cos[:rows], sin[:rows], mask[:rows]))
            hidden.append(h[:rows])
            tokens += rows * ids.shape[1]
            if tokens >= want:
                break
        return batches, hidden

    def _search_osplus(self, members: list[str], norm: str | None, sample, grid: int) -> None:
        batches, hidden, targets = sample
        stats = self._union_stats(members)
        shift = alg.osplus_shift(stats.minimum, stats.maximum)
        lo, hi = alg.osplus_shifted_range(stats.minimum, stats.maximum, shift)

        moe = self.layer.mlp if self.routes else None

        def layer_loss(_sample, z, s) -> float:
            t = Transform(s, z, norm)
            for m in members:
                self._set_static(m, t)
            if moe is not None:
                # experts chosen as in the float pass: a token switching experts is an all-or-nothing jump in the
                # loss that would drown the smooth effect of the threshold
                kept = [(w[: ids.size], e[: ids.size]) for (w, e), (ids, *_) in zip(self.routes, batches)]
                moe.forced_routing = (np.concatenate([w for w, _ in kept]), np.concatenate([e for _, e in kept]))
            try:
                outs = self.run(hidden, batches=batches)
            finally:
                if moe is not None:
                    moe.forced_routing = None
            self.feedback.advance(1, "candidate")
            return float(np.mean([np.mean((o - r) ** 2) for o, r in zip(outs, targets)]))

        result = alg.osplus_search_scale(shift, lo, hi, np.zeros((1, shift.size), np.float32), layer_loss,
                                         num_grid=grid)
        best = Transform(result.scale, shift, norm,
                         {"threshold": result.threshold, "grid_points": int(result.grid.size),
                          "loss_best": float(result.losses[result.best_index]),
                          "loss_shift_only": float(result.losses[0])})
        for m in members:
            self._set_static(m, best)

    # ---- quantized pass, report and tensors -------------------------------------------------
    def measure(self, float_outputs: list[np.ndarray]) -> list[np.ndarray]:
        """Quantized pass: outputs, layer SQNR and per-linear SQNR against the float linear on the same input.

        With ``attention_only`` the SQNRs are measured on the token sample (where the float outputs are known) and
        the pass over every calibration token runs without the float references: they would cost a second, float,
        matmul per linear."""
        if not self.attention_only:
            self.feedback.phase("quantized pass", _tokens(self.batches), "tok", kind="layer")
            sums, outputs = self._quantized_pass(self.hidden, self.batches)
            self.feedback.end_phase()
            self._report(sums, float_outputs, outputs, self.hidden)
            return outputs
        batches, hidden = self.sample
        self.feedback.phase("quantized pass", _tokens(batches) + _tokens(self.batches), "tok", kind="layer")
        sums, sample_outputs = self._quantized_pass(hidden, batches)
        self.reference.clear()  # the float weights are not needed any more: free them before the big pass
        for name in self.linears:
            self.float_tensors.pop(f"{name}.weight", None)
        release_memory()  # the replaced float cells sit in reference cycles (hooks): collect them now
        router = getattr(self.layer.mlp, "gate", None)
        handle = None
        if router is not None:  # routed coverage, counted on the quantized pass (the float one saw the sample only)
            self.expert_tokens = np.zeros(self.cfg.n_routed_experts, dtype=np.int64)

            def count(cell, inputs, output):
                self.expert_tokens += np.bincount(output[1].asnumpy().reshape(-1), minlength=self.cfg.n_routed_experts)
            handle = router.register_forward_hook(count)
        try:  # each input is dropped as its output arrives (lean: the caller's list)
            outputs = self.run(self.hidden, self.batches, outputs=self.hidden)
        finally:
            self.feedback.end_phase()
            if handle is not None:
                handle.remove()
        if router is not None:
            self.unseen = [int(e) for e in np.nonzero(self.expert_tokens == 0)[0]]
        self._report(sums, float_outputs, sample_outputs, hidden)
        return outputs

    def _quantized_pass(self, hidden: list, batches: list) -> tuple[dict, list[np.ndarray]]:
        """Run the quantized layer, summing each linear's signal and noise power against its float reference on
        the same input."""
        sums = {n: [0.0, 0.0] for n in self.linears}
        handles = []
        for name, cell in self.linears.items():
            def hook(cell, inputs, output, name=name):
                # float32 reference (an SQNR of int8 noise needs no more), sums in float64: wide layers would
                # otherwise hold float64 copies of every input and output
                ref_w, ref_c = self.reference[name] or (self.weight(f"{name}.weight"), None)
                x = inputs[0].asnumpy().reshape(-1, ref_w.shape[1])
                ref = x @ ref_w.T.astype(np.float32, copy=False)
                if ref_c is not None:
                    ref += ref_c
                got = output.asnumpy().reshape(ref.shape)
                sums[name][0] += sum_squares(ref)
                ref -= got
                sums[name][1] += sum_squares(ref)
            handles.append(cell.register_forward_hook(hook))
        try:
            outputs = self.run(hidden, batches)
        finally:
            for handle in handles:
                handle.remove()
        return sums, outputs

    def _report(self, sums: dict, float_outputs: list, outputs: list, hidden: list) -> None:
        # layer SQNR batch by batch: no concatenated copies of the calibration activations
        totals = np.zeros(4)
        for r, g, h in zip(float_outputs, outputs, hidden):
            totals += [sum_squares(r), sum_squares(r - g), sum_squares(r - h), sum_squares((r - h) - (g - h))]
        self.report = {
            "layer": self.index,
            "sqnr_db": _round(sqnr_from_sums(totals[0], totals[1])),
            "delta_sqnr_db": _round(sqnr_from_sums(totals[2], totals[3])),
            "sqnr_tokens": int(sum(h.shape[0] * h.shape[1] for h in hidden)),
            "linears": {},
        }
        for name, entry in self.entries.items():
            info = {"scheme": entry.scheme.label, "chosen_by": entry.chosen_by}
            if name in sums and sums[name][0] > 0:
                signal, noise = sums[name]
                info["sqnr_db"] = _round(10 * np.log10(signal / noise)) if noise > 0 else "inf"
            expert = _EXPERT.match(name)
            if expert and self.expert_tokens is not None:  # routed coverage (hooks also see bucket padding rows)
                info["tokens"] = int(self.expert_tokens[int(expert.group(1))])
            elif name in self.stats and self.stats[name].tokens:
                info["tokens"] = int(self.stats[name].tokens)
            if name in self.transforms:
                t = self.transforms[name]
                if name in self.act_params:  # static only: dynamic activations have no stored range
                    info["activation"] = {"scale": _round(float(self.act_params[name].scale), 8),
                                          "zero_point": int(self.act_params[name].zero_point)}
                info["transform"] = {
                    "folded_into": t.folded_into,
                    "smooth_scale_max": _round(float(t.scale.max())),
                    "channels_scaled": int(np.sum(t.scale != 1)),
                    "shift_absmax": _round(float(np.abs(t.shift).max())),
                    **{k: _round(v) if isinstance(v, float) else v for k, v in t.details.items()},
                }
            self.report["linears"][name] = info
        if self.expert_tokens is not None:
            self.report["expert_tokens"] = [int(t) for t in self.expert_tokens]
            self.report["experts_without_tokens"] = [int(e) for e in getattr(self, "unseen", [])]
            self.report["experts_observed_on_all_tokens"] = bool(self.recipe.options.moe_calibrate_all_experts)
        return outputs

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor of the quantized layer in its storage dtype, with its description label."""
        from goldstick.model.network import StreamedLinear
        from goldstick.quant.cells import QuantLinearBase

        left = [n for n, c in self.linears.items() if isinstance(c, StreamedLinear)]
        if left:  # every plan entry replaces its cell; a streamed one has no tensors to write
            raise QuantizeError(f"layer {self.index}: no quantized or float cell was made for {', '.join(left)}")
        out = {}
        labels = {}
        for p in self.layer.get_parameters():
            name = p.name
            value = p.asnumpy()
            owner = name.rsplit(".", 1)[0]
            cell = self.linears.get(owner)
            if isinstance(cell, QuantLinearBase):
                local = name.rsplit(".", 1)[1]
                out[name] = value.astype(QUANT_TENSOR_DTYPES[local])
                labels[name] = cell.description
            elif name.endswith("e_score_correction_bias"):
                out[name], labels[name] = value.astype(np.float32), "FLOAT"
            else:
                out[name], labels[name] = value.astype(BF16), "FLOAT"
        return out, labels


MLP_GROUP_ELEMENTS = 1 << 22
# the MLA linears that read input_layernorm's output directly (LayerQuantizer._observe_projection_inputs)
NORMED_INPUT_PROJECTIONS = ("q_a_proj", "q_proj", "kv_a_proj_with_mqa")


def mlp_groups(batches: list, hidden_size: int, budget: int) -> list[list[int]]:
    """Consecutive batch indices whose tokens the MLP half of a layer runs on together: [tokens, hidden] within
    ``budget`` float32 elements (16 MB; the wide benchmark model: 2048 tokens), at least one batch per group.
    Measured on the wide model's experts (~128 rows per batch of 512 tokens): 120 GFLOP/s at 128 rows, 190 at 512."""
    groups, tokens = [], 0
    for index, (ids, *_) in enumerate(batches):
        if groups and tokens + ids.size <= budget // hidden_size:
            groups[-1].append(index)
            tokens += ids.size
        else:
            groups.append([index])
            tokens = ids.size
    return groups


def _routes_by_batch(routes: list, batches: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """The router's (weights, ids) recorded call by call (a call may cover several batches: ``mlp_groups``), cut
    into one pair per batch."""
    if not routes:
        return routes
    bounds = np.cumsum([ids.size for ids, *_ in batches])[:-1]
    weights = np.split(np.concatenate([w for w, _ in routes]), bounds)
    ids = np.split(np.concatenate([e for _, e in routes]), bounds)
    return list(zip(weights, ids))


def _tokens(batches: list) -> int:
    return int(sum(ids.size for ids, *_ in batches))


def _tensor(array: np.ndarray):
    from mindspore import Tensor

    return Tensor(np.ascontiguousarray(array, dtype=np.float32))


def _round(value, digits: int = 3):
    if isinstance(value, float) and not np.isfinite(value):
        return "inf" if value > 0 else "-inf"
    return round(float(value), digits)


# ------------------------------------------------------------------------------------------------ the pipeline
def _fingerprint(reader: CheckpointReader, recipe: Recipe, calib: CalibrationSet) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(reader.config.to_dict(), sort_keys=True).encode())
    digest.update(json.dumps({n: [reader.dtype(n), list(reader.shape(n))] for n in reader.names()},
                             sort_keys=True).encode())
    digest.update(recipe.to_yaml().encode())
    for batch in calib.batches:
        digest.update(batch.tobytes())
    return digest.hexdigest()


def _prepare_batches(cfg, calib: CalibrationSet) -> list:
    from mindspore import Tensor

    from goldstick.model.network import RotaryTables, positions_and_mask

    rotary = RotaryTables(cfg)
    prepared = []
    for whole in calib.batches:
        rows = batch_rows(cfg, whole.shape[1])
        for start in range(0, len(whole), rows):
            ids = whole[start:start + rows]
            positions, mask = positions_and_mask(Tensor(ids), None)
            cos, sin = rotary(positions)
            prepared.append((ids, cos, sin, mask))
    return prepared


def batch_rows(cfg, seq_len: int, score_budget: int = 1 << 21, hidden_budget: int = 1 << 20) -> int:
    """Sequences per forward batch: attention scores [rows, heads, seq, seq] within ``score_budget`` elements and
    hidden states [rows * seq, hidden] within ``hidden_budget`` (8 MB / 4 MB in float32), at least one sequence.
    MindSpore's CPU memory pool keeps its peak for the life of the process, so the biggest batch's temporaries set
    the RSS. Measured on the wide benchmark model (hidden 2048, 16 heads, seq 256): these budgets (4 sequences)
    against twice them, 4 % more time and 100 MB less peak; 16-sequence batches, the same time and 1 GB more."""
    per_scores = cfg.num_attention_heads * seq_len * seq_len
    per_hidden = seq_len * cfg.hidden_size
    return max(1, min(score_budget // per_scores, hidden_budget // per_hidden))


def quantize(model: str | Path | None = None, recipe: str | Path | Recipe = "deepseek-r1-w8a8-mixed",
             out: str | Path | None = None, calibration: str | Path | None = None,
             calib_samples: int | None = None, calib_seq_len: int | None = None, calib_seed: int | None = None,
             resume: bool = False, progress: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
             stop_after_layer: int | None = None, export_format: str = "mindspore", path: str = "auto",
             executor=None, workers: int | None = None) -> QuantizeResult:
    """Quantize a DeepSeek-V3/R1 checkpoint with a recipe; returns the output folder, the plan and the report.

    ``model`` None means the embedded default model. ``calibration`` and ``calib_*`` override the recipe's data.
    ``resume`` continues an interrupted run in ``out`` from its last finished layer (same bytes as one run).
    ``stop_after_layer`` stops after that layer, leaving the run resumable (what a kill does, deterministically).
    ``export_format``: ``mindspore`` (Golden-Stick / vllm-mindspore) or ``compressed-tensors`` (vLLM); a recipe the
    format cannot hold is refused here, before calibrating (goldstick.io.export).
    ``path``: ``auto`` streams a recipe that needs no calibration (goldstick.engine.stream: shard by shard from the source,
    bit-identical output, no MindSpore) unless calibration data, ``stop_after_layer`` or an interrupted layer run
    ask for the layer path; ``stream`` / ``layers`` force one. ``executor`` (``local`` processes, ``ray``,
    ``inline`` or a goldstick.engine.executors.Executor) and ``workers`` run the independent units: the streamed
    tensors, or the weight quantization of a layer's weight-only/dynamic linears (experts) in the layer path
    (default there: inline, in this process).
    """
    from goldstick.engine.stream import route, stream_quantize

    if model is None:
        from goldstick.testing.make_model import default_model_path
        model = default_model_path()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    given = calibration is not None or calib_samples is not None or calib_seq_len is not None or calib_seed is not None
    chosen, why = route(model, recipe, path, export_format, given, stop_after_layer, out, resume)
    if chosen == "stream":
        return stream_quantize(model, recipe, out, executor=executor, workers=workers, progress=progress,
                               max_shard_bytes=max_shard_bytes, resume=resume)
    if progress:
        print(f"layer path: {why}", flush=True)
    setup_mindspore()
    from goldstick.model.tokenizer import load_tokenizer

    reader = CheckpointReader(model)
    cfg = reader.config
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    plan = recipe.plan(cfg)
    from goldstick.io.export import check_plan

    check_plan(cfg, plan, export_format)
    if out is None:
        raise QuantizeError("quantize needs an output folder (out=...)")
    if max_shard_bytes <= 0:
        raise QuantizeError(f"the shard size cap must be positive, got {max_shard_bytes} bytes")
    out = Path(out)
    work = out / WORK_DIR
    if out.exists() and any(out.iterdir()) and not resume:
        raise QuantizeError(f"{out} is not empty; choose a new folder (or --resume an interrupted run there)")
    feedback = Feedback(progress)
    finished = resume and (out / "manifest.json").exists()
    if resume and not finished and not (work / "state.json").exists():
        feedback.say(f"resume: {out} holds no finished layer; starting from layer 0")
        resume = False  # nothing was finished yet: start from the beginning

    tok = load_tokenizer(model)
    cal = recipe.calibration
    seq_len, clipped = _within_context(cfg, calib_seq_len or cal.seq_len)
    calib = load_calibration(calibration or cal.data or DEFAULT_CALIBRATION, tok.tokenizer,
                             samples=calib_samples or cal.samples, seq_len=seq_len,
                             seed=cal.seed if calib_seed is None else calib_seed, bos_id=tok.bos_id)
    if clipped:
        print(f"goldstick: warning: {clipped}", file=sys.stderr, flush=True)
        calib.notes.append(clipped)
    recorded = recorded_recipe(recipe, plan, calib)
    if finished:
        return _finished_run(out, work, plan, recorded)
    given = {"samples": calib_samples is not None, "seq_len": calib_seq_len is not None,
             "data": calibration is not None, "seed": calib_seed is not None}
    feedback.say(_calibration_summary(recipe, calib, given, bool(calibration_needed(plan))))
    fingerprint = _fingerprint(reader, recipe, calib)
    batches = _prepare_batches(cfg, calib)

    work.mkdir(parents=True, exist_ok=True)
    # state.json says which layers are finished and the size + sha256 of every work file they left; a file is
    # written under a temporary name and renamed before it is recorded, so a kill mid-write leaves nothing trusted
    state = {"fingerprint": fingerprint, "finished": -1, "files": {}}
    if resume:
        state = json.loads((work / "state.json").read_text())
        if state.get("fingerprint") != fingerprint:
            raise QuantizeError(f"{out}: the interrupted run used a different model, recipe or calibration data; "
                                "resume needs the same inputs")
        state.setdefault("files", {})
        _check_work_files(out, work, state)
        feedback.say(_resume_summary(state["finished"], cfg.num_hidden_layers))
    else:
        write_json_atomic(work / "state.json", state)
    if state["finished"] >= 0:
        hidden_file = np.load(work / "hidden.npz")
        hidden = [hidden_file[f"b{i}"] for i in range(len(batches))]
    else:
        embed = bf16_round(_read_finite(reader, "model.embed_tokens.weight"))  # as exported
        hidden = [embed[ids] for ids, *_ in batches]
        del embed

    from goldstick.engine.executors import Executor, get_executor

    ex = None if executor is None and workers is None else get_executor(executor, workers)
    try:
        return _run_layers(out, work, state, reader, recipe, plan, calib, batches, hidden, feedback,
                           max_shard_bytes, stop_after_layer, export_format, ex)
    except KeyboardInterrupt:
        try:
            done = json.loads((work / "state.json").read_text())["finished"]  # what a resume will see
        except (OSError, ValueError, KeyError):  # interrupted while the finished run removed its work folder
            done = state["finished"]
        left = cfg.num_hidden_layers - done - 1
        where = (f"continue from layer {done + 1} ({left} of {cfg.num_hidden_layers} layers left)"
                 if left else f"finish writing the checkpoint (all {cfg.num_hidden_layers} layers are quantized)")
        raise QuantizeInterrupted(f"interrupted; rerun with --resume to {where}") from None
    finally:
        feedback.end_phase()
        if ex is not None and not isinstance(executor, Executor):
            ex.close()  # one we made (a passed-in Executor stays the caller's)


def _run_layers(out: Path, work: Path, state: dict, reader: CheckpointReader, recipe: Recipe, plan: Plan,
                calib: CalibrationSet, batches: list, hidden: list, feedback: Feedback, max_shard_bytes: int,
                stop_after_layer: int | None, export_format: str, executor=None) -> QuantizeResult:
    """The layer loop from the first unfinished layer, then the assembly; ``state`` is updated as layers finish."""
    cfg = reader.config
    progress = feedback.enabled
    layers = range(state["finished"] + 1, cfg.num_hidden_layers)
    bar = _progress(layers, progress, cfg.num_hidden_layers, state["finished"] + 1)
    per_layer: dict[str, float | None] = {}  # "dense" / "MoE": estimated seconds of one layer, from the first timed
    for i in bar:
        started = time.time()
        lq = LayerQuantizer(cfg, i, LayerTensors(reader, i), plan, recipe, batches, hidden, executor=executor,
                            lean=True, feedback=feedback)
        kind = "MoE" if cfg.is_moe_layer(i) else "dense"
        timing = kind not in per_layer  # the first layer of its kind: its float pass times the estimate
        if timing:
            if not per_layer:
                feedback.say(_work_summary(lq, len(layers)))
            feedback.measured.clear()
        float_outputs = lq.observe(recipe.options.moe_calibrate_all_experts)
        if timing:
            per_layer[kind] = feedback.estimate(lq.planned_work())
            feedback.say(_estimate_summary(per_layer, kind, cfg, i))
        lq.quantize(float_outputs)
        quant_outputs = lq.measure(float_outputs)
        tensors, labels = lq.tensors()
        write_safetensors(_tmp(work / f"layer-{i:05d}.safetensors"), tensors.items())
        os.replace(_tmp(work / f"layer-{i:05d}.safetensors"), work / f"layer-{i:05d}.safetensors")
        write_json_atomic(work / f"layer-{i:05d}.json", {"report": lq.report, "labels": labels})
        hidden = quant_outputs if recipe.options.inputs_from == "quantized" else float_outputs
        np.savez(_tmp(work / "hidden.npz"), **{f"b{k}": h for k, h in enumerate(hidden)})
        os.replace(_tmp(work / "hidden.npz"), work / "hidden.npz")
        for name in (f"layer-{i:05d}.safetensors", f"layer-{i:05d}.json", "hidden.npz"):
            state["files"][name] = _file_record(work / name)
        write_json_atomic(work / "state.json", {**state, "finished": i})  # the commit point of layer i
        state["finished"] = i
        if progress:
            bar.set_postfix_str(f"layer {i}: SQNR {lq.report['sqnr_db']} dB, {time.time() - started:.1f}s")
        del lq, tensors, float_outputs, quant_outputs
        release_memory()  # hooks and swapped cells form reference cycles; free the layer now, not later
        if stop_after_layer is not None and i >= stop_after_layer and i < cfg.num_hidden_layers - 1:
            raise QuantizeError(f"stopped after layer {i} as asked; continue with resume=True")

    final_logits = _final_logits(reader, hidden[0])
    report = _assemble(out, work, reader, recipe, plan, calib, max_shard_bytes, export_format)
    return QuantizeResult(out=out, plan=plan, report=report, final_logits=final_logits)


class LayerTensors(Mapping):
    """A layer's checkpoint tensors, each read (and refused if not finite) when asked for."""

    def __init__(self, reader: CheckpointReader, layer: int):
        self.reader, self.names = reader, reader.layer_tensor_names(layer)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        return _read_finite(self.reader, name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _read_finite(reader: CheckpointReader, name: str) -> np.ndarray:
    """``reader.read(name)``, refused if it holds NaN or Inf: they would turn scales and every later layer's
    calibration into NaN and still produce a checkpoint that looks complete."""
    values = reader.read(name)
    problem = nonfinite_problem(reader.file_of(name), name, values)
    if problem:
        raise CheckpointError(f"{problem}; goldstick refuses to quantize a checkpoint with non-finite weights")
    return values


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{path.suffix}")


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _check_work_files(out: Path, work: Path, state: dict) -> None:
    """Every work file a finished layer left must be there with the size and sha256 state.json recorded."""
    files = state.get("files", {})
    needed = [f"layer-{i:05d}.{ext}" for i in range(state["finished"] + 1) for ext in ("safetensors", "json")]
    needed += ["hidden.npz"] if state["finished"] >= 0 else []
    for name in needed:
        path, want = work / name, files.get(name)
        if want is None:
            problem = "is not recorded in state.json"
        elif not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != want["bytes"]:
            problem = f"has {path.stat().st_size} bytes, state.json recorded {want['bytes']} (cut or overwritten)"
        elif sha256_file(path) != want["sha256"]:
            problem = "does not match the sha256 state.json recorded (damaged)"
        else:
            continue
        raise QuantizeError(f"{path} {problem}: the interrupted run cannot be resumed from it; delete {out} and "
                            "quantize again without --resume")


def recorded_recipe(recipe: Recipe, plan: Plan, calib: CalibrationSet) -> Recipe:
    """The recipe a checkpoint records (its recipe.yaml): with the calibration the run used (source, samples,
    sequence length after clipping to the context, seed), so that quantizing with it again reproduces the run. A
    recipe that needs no calibration is recorded as given: the data only measured the report's errors, and the
    streaming path, which reads none, writes the same recipe.yaml."""
    if not calibration_needed(plan):
        return recipe
    return recipe.with_calibration(data=portable_source(calib.source), samples=calib.samples,
                                   seq_len=calib.seq_len, seed=calib.seed)


def write_checkpoint_metadata(writer, cfg, recipe: Recipe, plan: Plan, source: Path, out: Path) -> None:
    """What every quantized checkpoint carries besides its tensors (both the layer and the streaming path);
    ``recipe`` as recorded (``recorded_recipe``)."""
    from goldstick.io.export import copy_side_files, write_text_atomic

    writer.write_config(cfg.to_dict(), recipe.name, plan.counts_by_label())
    copy_side_files(source, out)
    write_text_atomic(out / "recipe.yaml", recipe.to_yaml())


def _remove_temporaries(out: Path) -> None:
    """Half-written files a killed run left in the output (shard and metadata temporaries, never final names)."""
    for path in out.iterdir():
        if path.is_file() and path.name.startswith(".") and path.name.endswith((".partial", ".tmp")):
            path.unlink(missing_ok=True)


def _finished_run(out: Path, work: Path, plan: Plan, recipe: Recipe) -> QuantizeResult:
    """``resume`` on a folder with a manifest: the run finished (the manifest is written last). ``recipe`` as
    recorded (``recorded_recipe``)."""
    written = out / "recipe.yaml"
    if not written.exists() or written.read_text() != recipe.to_yaml():
        raise QuantizeError(f"{out} holds a finished run of another recipe or calibration (manifest.json): "
                            "nothing to resume")
    if not work.exists():
        raise QuantizeError(f"{out} holds a finished run (manifest.json): nothing to resume")
    shutil.rmtree(work)  # killed while removing its work folder, after the manifest: only the cleanup was left
    return QuantizeResult(out=out, plan=plan, report=json.loads((out / "report.json").read_text()))


def _progress(layers, enabled: bool, total: int, initial: int):
    if not enabled:
        return layers
    from tqdm import tqdm

    return tqdm(layers, total=total, initial=initial, desc="quantize", unit="layer")


def _within_context(cfg, seq_len: int) -> tuple[int, str | None]:
    """The calibration sequence length clipped to the model's context, and the warning when it was clipped."""
    context = cfg.max_position_embeddings
    if seq_len <= context:
        return seq_len, None
    return context, (f"calibration seq_len {seq_len} is longer than the model's context (max_position_embeddings "
                     f"{context}): calibrating on sequences of {context} tokens")


def _calibration_summary(recipe: Recipe, calib: CalibrationSet, given: dict[str, bool], needed: bool) -> str:
    """The calibration set's size and where it comes from, said before the run."""
    cal = recipe.calibration
    default = f"{cal.samples} x {cal.seq_len}"
    if given["samples"] and given["seq_len"]:
        size = f"given; the recipe's default: {default}"
    elif given["samples"] or given["seq_len"]:
        mine, theirs = ("samples", "seq_len") if given["samples"] else ("seq_len", "samples")
        size = f"{mine} given, {theirs} from the recipe's default: {default}"
    else:
        size = f"recipe {recipe.name or '(unnamed)'}'s default; --calib-samples / --calib-seq-len change it"
    data = "given" if given["data"] else "the recipe's" if cal.data else "the default"
    line = (f"calibration: {calib.samples} samples x {calib.seq_len} tokens = {calib.tokens:,} tokens ({size}) from "
            f"{portable_source(calib.source)} ({data}), seed {calib.seed}")
    if not needed:
        line += "; the recipe needs no calibration: the data only measures the report's per-layer errors"
    return line


def _resume_summary(finished: int, layers: int) -> str:
    done = "layer 0 finished" if finished == 0 else f"layers 0-{finished} finished"
    if finished + 1 >= layers:
        return f"resuming: all {layers} layers finished; writing the checkpoint"
    return f"resuming from layer {finished + 1} of {layers} ({done})"


def _work_summary(lq: LayerQuantizer, layers: int) -> str:
    """The run's work in tokens through the layers (the time estimate's cost model), said before it starts."""
    work, sample, candidates = lq.planned_work(), _tokens(lq.sample[0]), lq.osplus_candidates()
    each = f"{work['statistics']:,} tokens through the statistics pass and " if work["statistics"] else ""
    each += f"{work['layer']:,} {'' if each else 'tokens '}through the whole layer (float and quantized passes"
    each += f", {candidates} OS+ candidates on a {sample:,}-token sample)" if candidates else ")"
    return f"work: {layers} layer{'s' if layers > 1 else ''}, each {each}; a time estimate follows"


def _estimate_summary(per_layer: dict[str, float | None], kind: str, cfg, layer: int) -> str:
    """The time estimate for layers ``layer`` to the last, from the per-layer estimates of dense and MoE layers
    (a kind not timed yet counted as the one that was)."""
    if per_layer[kind] is None:
        return "estimate: none (no pass was timed)"
    left = ["MoE" if cfg.is_moe_layer(i) else "dense" for i in range(layer, cfg.num_hidden_layers)]
    seconds = sum(per_layer.get(k) or per_layer[kind] for k in left)
    untimed = [k for k in left if k not in per_layer]
    line = (f"estimate: about {_duration(seconds)} for the {len(left)} layer{'s' if len(left) > 1 else ''} left (an "
            f"estimate: {kind} layer {layer}'s first passes timed and scaled by the token counts above")
    if untimed:
        line += (f"; the {len(untimed)} {untimed[0]} layer{'s' if len(untimed) > 1 else ''} counted as {kind} ones "
                 f"until layer {left.index(untimed[0]) + layer} is timed")
    return line + ")"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _final_logits(reader: CheckpointReader, hidden: np.ndarray) -> np.ndarray:
    """The quantized model's logits for the first calibration batch: final norm and lm_head as stored (bf16)."""
    cfg = reader.config
    norm = bf16_round(_read_finite(reader, "model.norm.weight")).astype(np.float64)
    head = bf16_round(_read_finite(reader, "lm_head.weight"))
    from goldstick.model.network import Linear, RMSNorm

    rms = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    rms.weight.set_data(_tensor(norm))
    lm = Linear(cfg.hidden_size, cfg.vocab_size)
    lm.weight.set_data(_tensor(head))
    return lm(rms(_tensor(hidden))).asnumpy()


def _assemble(out: Path, work: Path, reader: CheckpointReader, recipe: Recipe, plan: Plan,
              calib: CalibrationSet, max_shard_bytes: int, export_format: str = "mindspore") -> dict:
    """Write the final checkpoint from the per-layer work files, then the metadata, then the manifest.

    The engine's tensors are in the mindspore layout; ``export.CheckpointWriter`` writes them in ``export_format``,
    one layer at a time.
    """
    from goldstick.io.export import CheckpointWriter, write_text_atomic
    from goldstick.io.writer import PlacedShards, PlannedShardWriter

    cfg = reader.config
    _remove_temporaries(out)  # an earlier, killed assembly may have left some
    if export_format == "mindspore":
        # plan the shards from dtypes and shapes (ShardedWriter's cut, same bytes), then write each tensor into
        # place as it is read: memory is one layer's tensors, not a shard (Golden-Stick's cap: 4 GB)
        planned = PlannedShardWriter(out, max_shard_bytes=max_shard_bytes, overwrite=True)
        _add_checkpoint_tensors(CheckpointWriter(out, export_format, cfg, max_shard_bytes, shards=planned),
                                reader, work, placeholders=True)
        writer = CheckpointWriter(out, export_format, cfg, max_shard_bytes, shards=PlacedShards(planned))
        try:
            planned.open()
        except BaseException:
            writer.abort()
            raise
    else:  # compressed-tensors derives some tensors from values: buffered shards
        writer = CheckpointWriter(out, export_format, cfg, max_shard_bytes)
    try:
        layer_reports = _add_checkpoint_tensors(writer, reader, work, placeholders=False)
    except BaseException:
        writer.abort()
        raise
    writer.close(what=f"recipe {recipe.name or '(unnamed)'}")

    write_checkpoint_metadata(writer, cfg, recorded_recipe(recipe, plan, calib), plan, reader.path, out)
    report = {
        "recipe": recipe.name,
        "model": str(reader.path),
        "calibration": calib.provenance(),
        "plan": {"counts": plan.counts_by_label()},
        "layers": layer_reports,
    }
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_report_md(report))
    _write_manifest(out)
    shutil.rmtree(work)
    return report


def _add_checkpoint_tensors(writer, reader: CheckpointReader, work: Path, placeholders: bool) -> list[dict]:
    """Add every tensor of the quantized checkpoint to ``writer`` in the writing order: globals, each layer's work
    file (float tensors, then each quantized linear's), MTP. ``placeholders``: zero-stride arrays of the right
    dtype and shape, no data read (to plan shards). Returns the layers' reports."""
    from safetensors import safe_open

    from goldstick.io.checkpoint import STORED_DTYPES

    def value(read, dtype, shape):
        return np.broadcast_to(np.zeros((), dtype), tuple(shape)) if placeholders else read()

    cfg = reader.config
    reports = []
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        writer.add(name, "FLOAT", value(lambda: bf16_round(reader.read(name)).astype(BF16), BF16, reader.shape(name)))
    for i in range(cfg.num_hidden_layers):
        meta = json.loads((work / f"layer-{i:05d}.json").read_text())
        reports.append(meta["report"])
        labels = meta["labels"]
        owners: dict[str, dict] = {}
        with safe_open(work / f"layer-{i:05d}.safetensors", framework="numpy") as f:
            for name in sorted(f.keys()):
                if placeholders:
                    info = f.get_slice(name)
                    array = value(None, STORED_DTYPES[info.get_dtype()], info.get_shape())
                else:
                    array = f.get_tensor(name)
                if labels[name] == "FLOAT":
                    writer.add(name, "FLOAT", array)
                else:
                    owner, _, local = name.rpartition(".")
                    owners.setdefault(owner, {})[local] = array
        for owner, tensors in owners.items():
            writer.add(owner, labels[f"{owner}.weight"], tensors)
    # MTP passes through unquantized, in bf16 like every float tensor (FP8 dequantized); the router's
    # e_score_correction_bias stays float32 as in the decoder layers
    for name in reader.mtp_tensor_names():
        keep_f32 = name.endswith("e_score_correction_bias") and reader.dtype(name) == "F32"
        writer.add(name, "FLOAT", value(
            lambda: reader.read_raw(name) if keep_f32 else _read_finite(reader, name).astype(BF16),
            np.float32 if keep_f32 else BF16, reader.shape(name)))
    return reports


def _write_manifest(out: Path) -> None:
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and WORK_DIR not in path.parts and path.name != "manifest.json":
            files[str(path.relative_to(out))] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    write_json_atomic(out / "manifest.json", {"producer": "goldstick", "files": files})


def render_report_md(report: dict) -> str:
    lines = [f"# Quantization report: {report['recipe']}", "",
             f"Model: `{report['model']}`  ",
             f"Calibration: `{report['calibration']['source']}`, {report['calibration']['samples']} samples x "
             f"{report['calibration']['seq_len']} tokens ({report['calibration']['tokens']} tokens)", "",
             *[f"**Note:** {note}  " for note in report["calibration"].get("notes", [])],
             "## Schemes", "", "| scheme | linears |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["plan"]["counts"].items()]
    lines += ["", "## Layers (output error on calibration data)", "",
              "| layer | output SQNR dB | layer-delta SQNR dB | worst linear | its SQNR dB | measured on |",
              "|---|---|---|---|---|---|"]
    for layer in report["layers"]:
        scored = [(v["sqnr_db"], k) for k, v in layer["linears"].items() if isinstance(v.get("sqnr_db"), float)]
        worst = min(scored) if scored else ("-", "-")
        tokens = f"{layer['sqnr_tokens']} tokens" if "sqnr_tokens" in layer else ""  # absent from older reports
        lines.append(f"| {layer['layer']} | {layer['sqnr_db']} | {layer['delta_sqnr_db']} | `{worst[1]}` | {worst[0]} "
                     f"| {tokens} |")
    lines += ["", "## Linears", "", "| linear | scheme | rule | SQNR dB | act scale / zp | transform |",
              "|---|---|---|---|---|---|"]
    for layer in report["layers"]:
        for name, v in layer["linears"].items():
            act = v.get("activation")
            act_s = f"{act['scale']} / {act['zero_point']}" if act else ""
            t = v.get("transform")
            t_s = ""
            if t:
                t_s = (f"folded into {t['folded_into']}; " if t["folded_into"] else "explicit; ") + \
                    f"max scale {t['smooth_scale_max']}, shift absmax {t['shift_absmax']}"
                if t.get("alpha") is not None:
                    t_s += f", alpha {t['alpha']}"
                if t.get("threshold") is not None:
                    t_s += f", threshold {t['threshold']}"
            lines.append(f"| `{name}` | {v['scheme']} | {v['chosen_by']} | {v.get('sqnr_db', '')} | {act_s} | {t_s} |")
        if layer.get("expert_tokens") is not None:
            lines.append("")
            lines.append(f"Layer {layer['layer']} routed tokens per expert: {layer['expert_tokens']}"
                         + (f"; experts with no token (statistics from the layer's MoE input sample): "
                            f"{layer['experts_without_tokens']}" if layer.get("experts_without_tokens") else ""))
            lines.append("")
    return "\n".join(lines) + "\n"
