"""One decoder layer, quantized in place (goldstick.engine.pipeline runs it layer after layer).

    float pass   : run the float layer, hooks keep running per-channel min/max of every linear's input
    transform    : SmoothQuant / OS+ per group of linears that share an input (folded into the feeding norm where
                   every consumer of that norm takes part, else explicit per linear)
    quantize     : swap each linear for its integer cell (goldstick.quant.cells); OS+ searches its scale against
                   the error of the *layer's* output
    quant pass   : run the quantized layer -> next layer's inputs, layer and per-linear SQNR
    tensors      : the layer's tensors in their storage dtypes, with their description labels

MindSpore is imported when a layer is built, not with this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from goldstick.engine.feedback import Feedback
from goldstick.engine.result import QuantizeError
from goldstick.engine.statistics import (
    RayStatistics,
    RunningStats,
    StatisticsActor,
    attention_statistics,
    only_projections,
    projection_statistics,
)
from goldstick.engine.weight_units import quantize_weight_unit, quantize_weights  # noqa: F401 (the unit, here too)
from goldstick.model.architecture import (
    ROUTER,
    VALUE_CONSUMER,
    VALUE_PRODUCER,
    expert_of,
    smoothing_groups,
    value_rows,
)
from goldstick.model.runtime import release_memory
from goldstick.quant import algorithms as alg
from goldstick.quant.numerics import bf16_ceil, bf16_round, quantize_weight, sqnr_from_sums, sum_squares
from goldstick.quant.plan import Plan
from goldstick.quant.recipe import Recipe
from goldstick.quant.schemes import FLOAT, W8A8_DYNAMIC, W8A16, mindspore_dtypes

BF16 = ml_dtypes.bfloat16
STORAGE_DTYPES = mindspore_dtypes()  # local tensor name -> numpy dtype of a quantized linear's tensors
MLP_GROUP_ELEMENTS = 1 << 22


@dataclass
class Transform:
    """The activation transform of one static linear: x_tilde = (x - shift) / scale (per input channel)."""

    scale: np.ndarray
    shift: np.ndarray
    folded_into: str | None  # the norm that applies it, or None (explicit in input_scale / beta)
    details: dict = field(default_factory=dict)


class LayerQuantizer:
    """Quantizes one decoder layer in place according to its plan entries."""

    def __init__(self, cfg, layer_index: int, tensors: dict[str, np.ndarray], plan: Plan, recipe: Recipe,
                 batches: list, hidden: list[np.ndarray], executor=None, lean: bool = False,
                 feedback: Feedback | None = None, per_tensor_static: bool = False):
        """``lean`` (the engine's layer loop): allow the attention-only float pass (below), and let ``measure``
        replace the items of ``hidden`` with the layer's outputs as they arrive (the caller's list: the next
        layer's inputs, without a second copy). goldstick.evaluation.analyze needs the float layer on every token:
        not lean. ``feedback``: where the phases report their progress (default: silent).
        ``per_tensor_static``: static linears in the ascend layout (``PerTensorStaticW8A8Linear``: one true scale,
        applied as its bf16 reciprocal), o_proj's smoothing folded into kv_b_proj's V rows; else the per-channel
        divisor layout (``StaticW8A8Linear``)."""
        from mindspore import Tensor

        from goldstick.model.network import DecoderLayer, Linear, MoE, RMSNorm, StreamedLinear, parameter_placeholders
        from goldstick.quant.cells import replace_cell

        self.cfg, self.index, self.plan, self.recipe = cfg, layer_index, plan, recipe
        self.per_tensor_static = per_tensor_static
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
        # ``tensors`` (LayerTensors) reads each tensor when asked for. With ``attention_only`` the routed experts (or
        # a dense layer's MLP) run in float only on the token sample, once each: they read their weight at the call
        # (StreamedLinear), so they are never held in float32 (R1's dense MLP: 1.6 GB, its experts: 45 GB)
        self.source = tensors
        self.streamed = set()
        if self.attention_only:
            where = "mlp.experts." if isinstance(self.layer.mlp, MoE) else "mlp."
            for local, cell in list((self.layer.mlp.experts if where == "mlp.experts." else self.layer.mlp)
                                    .cells_and_names()):
                if isinstance(cell, Linear):
                    name = f"{self.prefix}{where}{local}"
                    replace_cell(self.layer, f"{where}{local}", StreamedLinear(
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
        instead of a few dozen, where the CPU matmul runs faster, and a quantized expert casts its weight once
        per group. ``outputs``: the list to fill, which may be ``inputs`` (each input is replaced once its group is
        done, so no second copy of the calibration activations is held)."""
        from mindspore import Tensor

        batches = batches or self.batches
        outputs = [None] * len(inputs) if outputs is None else outputs
        hidden_size = self.cfg.hidden_size
        for group in mlp_groups(batches, hidden_size, MLP_GROUP_ELEMENTS):
            attended = [self.layer.attend(float_tensor(inputs[b]), *batches[b][1:]).asnumpy() for b in group]
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
            if all_experts:  # every expert also sees every token, for its statistics only (the output is routed)
                handles.append(self.layer.mlp.register_forward_hook(_run_every_expert))
        self.feedback.phase("float pass", token_count(self.batches), "tok", kind="layer")
        try:
            outputs = self.run(self.hidden)
        finally:
            self.feedback.end_phase()
            for handle in handles:
                handle.remove()
        self.routes = _routes_by_batch(self.routes, self.batches)
        self._fill_unseen_experts()
        return outputs

    def _stats_hook(self, name: str):
        stats = self.stats.setdefault(name, RunningStats())
        return self.linears[name].register_forward_pre_hook(
            lambda cell, inputs: stats.update(inputs[0].asnumpy().reshape(-1, cell.in_features)))

    def _observe_attention(self) -> list[np.ndarray]:
        """The attention's statistics over every calibration token (goldstick.engine.statistics: split across the
        executor's actors when it has them, same values), then the float layer on the token sample."""
        self.feedback.phase("statistics pass", token_count(self.batches), "tok", kind="statistics")
        if hasattr(self.executor, "actors") and self.executor.workers > 1 and len(self.batches) > 1:
            split = RayStatistics(self.executor.actors(StatisticsActor))
            self.stats.update(split.observe(self.cfg, self.index, self.float_tensors, self.needs_stats, self.hidden,
                                            self.batches))
            self.feedback.advance(token_count(self.batches), "tok")
        elif only_projections(self.prefix, self.needs_stats):
            for h in self.hidden:
                self._observe_projection_inputs(h)
                self.feedback.advance(h.shape[0] * h.shape[1], "tok")
        else:
            self.stats.update(attention_statistics(self.layer, self.prefix, self.needs_stats, self.hidden,
                                                   self.batches, lambda n: self.feedback.advance(n, "tok")))
        router = getattr(self.layer.mlp, "gate", None)
        handle = None
        if router is not None:  # the float routing of the sample, reused by the OS+ search
            handle = router.register_forward_hook(
                lambda cell, inputs, output: self.routes.append((output[0].asnumpy(), output[1].asnumpy())))
        batches, hidden = self.sample
        self.feedback.phase("float pass on the sample", token_count(batches), "tok", kind="layer")
        try:
            outputs = self.run(hidden, batches)
        finally:
            self.feedback.end_phase()
            if handle is not None:
                handle.remove()
        self.routes = _routes_by_batch(self.routes, batches)
        return outputs

    def _observe_projection_inputs(self, h: np.ndarray) -> None:
        """One batch of the statistics pass when only the MLA input projections need statistics."""
        projection_statistics(self.layer, self.prefix, self.needs_stats, h, self.stats)

    def _fill_unseen_experts(self) -> None:
        """An expert no calibration token reached gets statistics from the layer's bounded MoE input sample."""
        if self.expert_tokens is None:
            return
        self.unseen = [e for e in range(self.cfg.n_routed_experts)
                       if self.stats.get(f"{self.prefix}mlp.experts.{e}.gate_proj", RunningStats()).tokens == 0]
        if not self.unseen or not self.moe_sample:
            return
        sample = float_tensor(np.concatenate(self.moe_sample))
        for e in self.unseen:
            handles = [self._stats_hook(f"{self.prefix}mlp.experts.{e}.{local}")
                       for local in ("gate_proj", "up_proj", "down_proj")]
            self.layer.mlp.experts[e](sample)
            for handle in handles:
                handle.remove()

    # ---- transforms and quantization ---------------------------------------------------------
    def quantize(self, float_outputs: list[np.ndarray]) -> None:
        options = self.recipe.options
        # the float MLP inputs on the token sample (before any cell changes): the targets of an OS+ search scored
        # there
        mlp_input_targets = self._mlp_inputs(*self.sample) if any(
            self._scored_at_mlp_input(members) for members in self._osplus_searches()) else None
        static_groups, explicit = self._static_groups()
        dynamic_groups = self._dynamic_smoothing_groups()
        smoothed = {m for _, members in dynamic_groups for m in members}
        weight_quant = []
        for name, entry in self.entries.items():
            scheme = entry.scheme
            if name not in self.linears:
                continue  # the router: a float Router cell, not a Linear
            if scheme.name == FLOAT:
                self._set_float(name)
            elif scheme.name in (W8A16, W8A8_DYNAMIC) and name not in smoothed:
                weight_quant.append(name)
        # independent of calibration and of each other (the experts): one unit each, on the executor if any
        done = quantize_weights([f"{n}.weight" for n in weight_quant], self.source, self.weight, self.executor,
                                options.weight_rounding)
        for k, name in enumerate(weight_quant):
            self._set_weight_quant(name, self.entries[name].scheme.name, done[k])
            done[k] = None  # the cell holds its own copy: R1's experts are 11.3 GB of int8 per layer
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
                target = mlp_input_targets if self._scored_at_mlp_input(members) else sample[2]
                self._search_osplus(members, norm, (*self.sample, target), options.osplus_grid)
            self.feedback.end_phase()
        for name, norm in self.norms.items():
            if name not in {t.folded_into for t in self.transforms.values()}:
                norm.weight.set_data(float_tensor(bf16_round(self.float_tensors[f"{name}.weight"])))
        router = getattr(self.layer.mlp, "gate", None)
        if router is not None:
            router.weight.set_data(float_tensor(bf16_round(self.float_tensors[f"{self.prefix}{ROUTER}.weight"])))

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
            if schemes and all(s.name == W8A8_DYNAMIC and s.outlier_suppression == "smoothquant" for s in schemes):
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
        cell.weight.set_data(float_tensor(w))
        self._set_cell(name, cell)
        self.reference[name] = (source, None)

    def _set_weight_quant(self, name: str, scheme: str, quantized: tuple | None = None) -> None:
        from goldstick.quant.cells import DynamicW8A8Linear, W8A16Linear

        if quantized is None:
            quantized = quantize_weight(self.weight(f"{name}.weight"), self.recipe.options.weight_rounding)
        cls = W8A16Linear if scheme == W8A16 else DynamicW8A8Linear
        self._set_cell(name, cls(*quantized))
        self.reference[name] = None if name in self.streamed else (self.weight(f"{name}.weight"), None)

    def _set_dynamic_smoothed(self, name: str, t: Transform) -> None:
        """Dynamic W8A8 on x / s with s folded into the feeding norm: the norm's stored (bf16) weight defines s."""
        from goldstick.quant.cells import DynamicW8A8Linear

        gamma = self.float_tensors[f"{t.folded_into}.weight"]
        new_gamma = bf16_round(alg.fold_smoothing_into_norm(gamma, t.scale))
        scale = np.where(new_gamma != 0, gamma / np.where(new_gamma != 0, new_gamma, 1), t.scale).astype(np.float32)
        self.norms[t.folded_into].weight.set_data(float_tensor(new_gamma))
        w = alg.apply_smoothing(self.weight(f"{name}.weight"), scale)
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
            new_gamma = bf16_round(alg.fold_smoothing_into_norm(gamma, scale))
            scale = np.where(new_gamma != 0, gamma / np.where(new_gamma != 0, new_gamma, 1), scale).astype(np.float32)
            new_beta = bf16_round(alg.fold_osplus_into_norm(gamma, shift, scale)[1])
            shift = (-new_beta * scale).astype(np.float32)
            norm = self.norms[t.folded_into]
            norm.weight.set_data(float_tensor(new_gamma))
            if np.any(new_beta != 0) or norm.has_bias:
                self._set_norm_bias(t.folded_into, new_beta)
        lo = (stats.minimum - shift) / scale
        hi = (stats.maximum - shift) / scale
        params = alg.activation_params_asymmetric(float(lo.min()), float(hi.max()))
        act_scale = float(bf16_ceil(params.scale))  # stored in bf16: round up so the range stays covered
        if self.per_tensor_static:
            self._set_static_per_tensor(name, t, w, scale, shift, float(lo.min()), act_scale)
            return
        zero_point = int(np.clip(np.rint(-128 - min(float(lo.min()), 0.0) / act_scale), -128, 127))
        if t.folded_into:
            input_scale = np.full(w.shape[1], act_scale, np.float32)
            beta = None
        else:
            input_scale = bf16_ceil(alg.fold_smoothing_into_input_scale(act_scale, scale))
            scale = (input_scale / np.float32(act_scale)).astype(np.float32)  # what the stored scale really does
            beta = bf16_round(-shift) if np.any(shift != 0) else None
            shift = -beta if beta is not None else shift
        q, w_scale = quantize_weight(alg.apply_smoothing(w, scale), self.recipe.options.weight_rounding)
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

    def _set_static_per_tensor(self, name: str, t: Transform, w: np.ndarray, scale: np.ndarray, shift: np.ndarray,
                               lo: float, act_scale: float) -> None:
        """``_set_static`` in the ascend layout. A transform no norm applies: its scale goes into kv_b_proj's V rows
        (o_proj only), its shift stays as ``beta`` in the scaled domain, ``(x / s) + beta``."""
        from goldstick.quant.cells import PerTensorStaticW8A8Linear, quantv2_multiplier

        beta, sw = None, alg.apply_smoothing(w, scale)
        if not t.folded_into:
            if np.any(scale != 1):
                self._fold_into_values(name, scale)
            if np.any(shift != 0):
                beta = bf16_round(-shift / scale)
                shift = (-beta).astype(np.float32)
        multiplier = float(quantv2_multiplier(act_scale))
        zero_point = int(np.clip(np.rint(-128 - min(lo, 0.0) * multiplier), -128, 127))
        q, w_scale = quantize_weight(sw, self.recipe.options.weight_rounding)
        deq = alg.deq_scale(1.0 / multiplier, w_scale)  # the step the runtime applies: 1 / multiplier
        # the shift's compensation W @ z: z in x's domain when a norm applies it, in (x / s)'s otherwise
        term = alg.osplus_bias_compensation(w if t.folded_into else sw, shift, deq).int_term if np.any(shift) else None
        bias = alg.quant_bias(q, zero_point, extra=term)
        self._set_cell(name, PerTensorStaticW8A8Linear(q, deq, bias, np.array([act_scale], np.float32),
                                                       np.array([zero_point], np.float32), beta))
        self.transforms[name] = Transform(scale, shift, t.folded_into, dict(t.details))
        self.act_params[name] = alg.ActQuantParams(scale=np.float32(act_scale), zero_point=zero_point)
        # the float linear on what the cell receives (without a norm: x / s, from the folded V rows)
        self.reference[name] = (sw, (w.astype(np.float64) @ shift).astype(np.float32) if t.folded_into else None)

    def _fold_into_values(self, name: str, scale: np.ndarray) -> None:
        """Divide the V rows of the float kv_b_proj that feed o_proj by o_proj's smoothing scale (stored bf16)."""
        from goldstick.quant.cells import QuantLinearBase

        producer = self.prefix + VALUE_PRODUCER
        cell = self.linears.get(producer)
        if name != self.prefix + VALUE_CONSUMER or cell is None or isinstance(cell, QuantLinearBase):
            raise QuantizeError(f"{name}: a per-channel smoothing scale that neither a norm nor a float "
                                f"{VALUE_PRODUCER} can absorb has no form in a per-tensor static layout")
        source = self.weight(f"{producer}.weight")
        rows = value_rows(self.cfg)
        exact = source.copy()
        exact[rows] = source[rows] / scale[:, None]
        cell.weight.set_data(float_tensor(bf16_round(exact)))
        self.reference[producer] = (exact, None)

    def _set_norm_bias(self, norm_name: str, bias: np.ndarray) -> None:
        norm = self.norms[norm_name]
        if norm.has_bias:
            norm.bias.set_data(float_tensor(bias))
        else:
            norm.set_bias(bias, f"{norm_name}.bias")

    def planned_work(self) -> dict[str, int]:
        """Tokens this layer passes through, per kind of pass (Feedback's, the time estimate's cost model):
        ``statistics`` the statistics pass over every calibration token (attention-only float pass) and the OS+
        candidates scored at the MLP's input (attention runs on the token sample), ``layer`` the whole layer: the
        float pass, the other OS+ candidates on the token sample, the quantized pass. Without ``attention_only`` no
        statistics pass times the attention: every candidate counts as a layer run (an over-estimate)."""
        tokens, sample = token_count(self.batches), token_count(self.sample[0])
        attention, candidates = (n * sample for n in self.osplus_candidates())
        if self.attention_only:
            return {"statistics": tokens + attention, "layer": sample + candidates + sample + tokens}
        return {"statistics": 0, "layer": tokens + attention + candidates + tokens}

    def osplus_candidates(self) -> tuple[int, int]:
        """How many candidates the OS+ searches of this layer try: (scored at the MLP's input, each an attention run
        on the token sample; scored at the layer's output, each a layer run on it)."""
        searches = self._osplus_searches()
        inside = sum(map(self._scored_at_mlp_input, searches))
        return inside * self.recipe.options.osplus_grid, (len(searches) - inside) * self.recipe.options.osplus_grid

    def _osplus_searches(self) -> list[list[str]]:
        """The members of each OS+ search of this layer, in search order."""
        folded, explicit = self._static_groups()
        return [members for _, members, method in folded if method == "osplus"] + \
            [[n] for n in explicit if self.entries[n].scheme.outlier_suppression == "osplus"]

    def _scored_at_mlp_input(self, members: list[str]) -> bool:
        """Whether an OS+ search's loss is the error of the MLP's input (recipe option ``osplus_loss: mlp-input``,
        for a search whose linears are all in the attention: the rest of the layer sees them only through it; no
        candidate runs the MLP, most of an R1 layer's work), else the layer output's."""
        return self.recipe.options.osplus_loss == "mlp-input" and all(
            m.startswith(self.prefix + "self_attn.") for m in members)

    def _mlp_inputs(self, batches: list, hidden: list) -> list[np.ndarray]:
        """What the MLP receives, post_attention_layernorm(h + attn(input_layernorm(h))), for each batch, as the
        layer's cells are now."""
        return [self.layer.post_attention_layernorm(self.layer.attend(float_tensor(h), *b[1:])).asnumpy()
                for b, h in zip(batches, hidden)]

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

        at_mlp_input = self._scored_at_mlp_input(members)
        moe = self.layer.mlp if self.routes and not at_mlp_input else None

        def run_layer() -> list[np.ndarray]:
            replay = None
            if moe is not None:
                # experts chosen as in the float pass: a token switching experts is an all-or-nothing jump in the
                # loss that would drown the smooth effect of the threshold
                kept = [(w[: ids.size], e[: ids.size]) for (w, e), (ids, *_) in zip(self.routes, batches)]
                replay = moe.gate.register_forward_hook(_replay_routing(np.concatenate([w for w, _ in kept]),
                                                                        np.concatenate([e for _, e in kept])))
            try:
                return self.run(hidden, batches=batches)
            finally:
                if replay is not None:
                    replay.remove()

        def layer_loss(_sample, z, s) -> float:
            t = Transform(s, z, norm)
            for m in members:
                self._set_static(m, t)
            # the candidate before's cells (replaced cells can sit in reference cycles: hooks) and the heap they
            # used go back now, not at the collector's whim (R1's o_proj: 117 MB of int8 a candidate)
            release_memory()
            outs = self._mlp_inputs(batches, hidden) if at_mlp_input else run_layer()
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
            self.feedback.phase("quantized pass", token_count(self.batches), "tok", kind="layer")
            sums, outputs = self._quantized_pass(self.hidden, self.batches)
            self.feedback.end_phase()
            self._report(sums, float_outputs, outputs, self.hidden)
            return outputs
        batches, hidden = self.sample
        self.feedback.phase("quantized pass", token_count(batches) + token_count(self.batches), "tok", kind="layer")
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
            expert = expert_of(name)
            if expert is not None and self.expert_tokens is not None:  # routed coverage (hooks see padding rows too)
                info["tokens"] = int(self.expert_tokens[expert])
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
                # the parameter's own memory where the dtype is already right (int8 weights: no second copy)
                out[name] = value.astype(cell.storage.get(local, STORAGE_DTYPES[local]), copy=False)
                labels[name] = cell.description
            elif name.endswith("e_score_correction_bias"):
                out[name], labels[name] = value.astype(np.float32), "FLOAT"
            else:
                out[name], labels[name] = value.astype(BF16), "FLOAT"
        return out, labels


def mlp_groups(batches: list, hidden_size: int, budget: int) -> list[list[int]]:
    """Consecutive batch indices whose tokens the MLP half of a layer runs on together: [tokens, hidden] within
    ``budget`` float32 elements (16 MB), at least one batch per group: more rows per expert matmul."""
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


def _replay_routing(weights: np.ndarray, ids: np.ndarray):
    """A forward hook for a router that replaces its choice with recorded ones: (weights [N, k], ids [N, k]) for
    the next N tokens, consumed call by call."""
    from mindspore import Tensor

    left = [weights, ids]

    def hook(router, inputs, output):
        t = inputs[0].shape[0]
        taken = [np.ascontiguousarray(a[:t]) for a in left]
        left[:] = [a[t:] for a in left]
        return Tensor.from_numpy(taken[0]), Tensor.from_numpy(taken[1])

    return hook


def _run_every_expert(moe, inputs, output) -> None:
    """Forward hook on a MoE cell: every routed expert also runs on every token, so that its statistics hooks see
    them all; the layer's output stays the routed one."""
    x = inputs[0]
    flat = x.reshape(-1, x.shape[-1])
    for expert in moe.experts:
        expert(flat)


def token_count(batches: list) -> int:
    return int(sum(ids.size for ids, *_ in batches))


def float_tensor(array: np.ndarray):
    from mindspore import Tensor

    return Tensor(np.ascontiguousarray(array, dtype=np.float32))


def _round(value, digits: int = 3):
    if isinstance(value, float) and not np.isfinite(value):
        return "inf" if value > 0 else "-inf"
    return round(float(value), digits)
