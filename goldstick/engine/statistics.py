"""Per-channel activation statistics of one layer's attention, in this process or split across Ray actors.

    stats = attention_statistics(layer, prefix, needs, hidden, batches)                 # here
    stats = RayStatistics(ray_executor.actors(StatisticsActor)).observe(cfg, index, tensors, needs, hidden, batches)

The engine's statistics pass (goldstick.engine.layer, the lean loop: every calibration token through the attention
only) keeps a running per-channel min/max of the inputs of the linears that need them. Min and max are exact and do
not depend on the order in which tokens arrive, so the calibration batches can be split across workers, each
running the same MindSpore cells on its share, and the results reduced with ``np.minimum`` / ``np.maximum`` (token
counts summed): the statistics, and so the checkpoint, are those of one process, byte for byte. On Ascend one actor
runs per NPU (docs/scale-out.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from goldstick.model.architecture import NORMED_INPUT_PROJECTIONS


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

    def merge(self, other: RunningStats) -> None:
        """Fold in statistics of other tokens (exact: the same as having seen them here)."""
        if other.minimum is None:
            return
        if self.minimum is None:
            self.minimum, self.maximum = other.minimum.copy(), other.maximum.copy()
        else:
            np.minimum(self.minimum, other.minimum, out=self.minimum)
            np.maximum(self.maximum, other.maximum, out=self.maximum)
        self.tokens += other.tokens

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.minimum), np.abs(self.maximum))


def only_projections(prefix: str, needs: set[str]) -> bool:
    """True when only the projections that read the normed input (q_a_proj or q_proj, kv_a_proj_with_mqa) and
    q_b_proj need statistics (recipes that smooth only the MLA inputs): of the attention's matmuls only q_a_proj
    has to run."""
    return needs <= {f"{prefix}self_attn.{n}" for n in (*NORMED_INPUT_PROJECTIONS, "q_b_proj")}


def projection_statistics(layer, prefix: str, needs: set[str], h: np.ndarray, stats: dict) -> None:
    """One batch's statistics of the projections of ``only_projections`` (the values hooks on the whole attention
    see), into ``stats``."""
    from mindspore import Tensor

    attn, local = layer.self_attn, prefix + "self_attn."
    x = layer.input_layernorm(Tensor(np.ascontiguousarray(h, dtype=np.float32)))
    x_np = x.asnumpy().reshape(-1, x.shape[-1])
    for name in NORMED_INPUT_PROJECTIONS:
        if local + name in needs:
            stats.setdefault(local + name, RunningStats()).update(x_np)
    if local + "q_b_proj" in needs:
        q = attn.q_a_layernorm(attn.q_a_proj(x)).asnumpy()
        stats.setdefault(local + "q_b_proj", RunningStats()).update(q.reshape(-1, q.shape[-1]))


def attention_statistics(layer, prefix: str, needs: set[str], hidden: list, batches: list, advance=None
                         ) -> dict[str, RunningStats]:
    """Statistics of the attention linears in ``needs`` over every batch: ``projection_statistics`` when
    ``only_projections``, else the attention runs with hooks on those linears."""
    from mindspore import Tensor

    stats: dict[str, RunningStats] = {}
    if only_projections(prefix, needs):
        for h in hidden:
            projection_statistics(layer, prefix, needs, h, stats)
            if advance:
                advance(h.shape[0] * h.shape[1])
        return stats
    cells = dict(layer.cells_and_names())
    handles = []
    for name in sorted(needs):
        running = stats.setdefault(name, RunningStats())
        handles.append(cells[name[len(prefix):]].register_forward_pre_hook(
            lambda cell, inputs, running=running: running.update(inputs[0].asnumpy().reshape(-1, cell.in_features))))
    try:
        for (ids, cos, sin, mask), h in zip(batches, hidden):
            layer.self_attn(layer.input_layernorm(Tensor(np.ascontiguousarray(h, dtype=np.float32))), cos, sin, mask)
            if advance:
                advance(ids.size)
    finally:
        for handle in handles:
            handle.remove()
    return stats


class StatisticsActor:
    """One worker of the split statistics pass (a Ray actor): builds the layer's attention from the tensors it is
    sent and returns the statistics of its share of the batches."""

    def __init__(self):
        from goldstick.model.runtime import setup_mindspore

        setup_mindspore()

    def observe(self, config: dict, index: int, tensors: dict, needs: list[str], ids: list, hidden: list) -> dict:
        from mindspore import Tensor

        from goldstick.model.config import ModelConfig
        from goldstick.model.network import DecoderLayer, RotaryTables, parameter_placeholders, positions_and_mask

        cfg = ModelConfig.from_dict(config)
        prefix = f"model.layers.{index}."
        with parameter_placeholders():
            layer = DecoderLayer(cfg, index)
        layer.update_parameters_name(prefix)
        params = {p.name: p for p in layer.get_parameters()}
        for name, array in tensors.items():
            params[name].set_data(Tensor.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))
        rotary = RotaryTables(cfg)
        batches = []
        for batch in ids:  # as goldstick.engine.inputs.prepare_batches makes them
            positions, mask = positions_and_mask(Tensor(batch), None)
            batches.append((batch, *rotary(positions), mask))
        stats = attention_statistics(layer, prefix, set(needs), hidden, batches)
        return {name: (s.minimum, s.maximum, s.tokens) for name, s in stats.items()}


class RayStatistics:
    """The statistics pass split across Ray actors (``StatisticsActor``s: ``RayExecutor.actors``)."""

    def __init__(self, actors: list):
        import ray

        self.ray, self.actors = ray, actors

    def observe(self, cfg, index: int, tensors: dict, needs: set[str], hidden: list, batches: list
                ) -> dict[str, RunningStats]:
        """Contiguous shares of the batches, one per actor; the reduction is exact (min, max, token counts)."""
        share = -(-len(batches) // len(self.actors))
        attention = {n: a for n, a in tensors.items() if ".self_attn." in n or n.endswith("input_layernorm.weight")}
        sent = self.ray.put(attention)
        calls = [actor.observe.remote(cfg.to_dict(), index, sent, sorted(needs),
                                      [ids for ids, *_ in batches[k * share:(k + 1) * share]],
                                      hidden[k * share:(k + 1) * share])
                 for k, actor in enumerate(self.actors) if batches[k * share:(k + 1) * share]]
        stats: dict[str, RunningStats] = {}
        for part in self.ray.get(calls):
            for name, (lo, hi, tokens) in part.items():
                stats.setdefault(name, RunningStats()).merge(RunningStats(lo, hi, tokens))
        return stats
