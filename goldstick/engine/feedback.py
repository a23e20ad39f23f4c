"""What a run tells its user on stderr: the calibration it uses, the work and a time estimate before the layers,
the layer a resume starts from, and progress bars for the layers and for the phases inside a layer."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from goldstick.engine.calibration import CalibrationSet, portable_source
from goldstick.quant.recipe import Recipe


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
            tqdm.write(message, file=sys.stderr)

    def phase(self, name: str, total: int, unit: str, kind: str | None = None) -> None:
        """Start a phase (ending the one before) of ``total`` ``unit`` ("tok" or "candidate")."""
        self.end_phase()
        self.unit, self.kind, self.started = unit, kind, time.perf_counter()
        if kind is not None:
            self.measured.setdefault(kind, [0, 0.0])
        if self.enabled:
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


def layer_bar(layers, enabled: bool, total: int, initial: int):
    """The run's bar over its layers (``layers`` itself when disabled)."""
    if not enabled:
        return layers
    return tqdm(layers, total=total, initial=initial, desc="quantize", unit="layer")


def calibration_summary(recipe: Recipe, calib: CalibrationSet, given: dict[str, bool], needed: bool) -> str:
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


def resume_summary(finished: int, layers: int) -> str:
    done = "layer 0 finished" if finished == 0 else f"layers 0-{finished} finished"
    if finished + 1 >= layers:
        return f"resuming: all {layers} layers finished; writing the checkpoint"
    return f"resuming from layer {finished + 1} of {layers} ({done})"


def work_summary(work: dict[str, int], sample: int, candidates: tuple[int, int], layers: int) -> str:
    """The run's work in tokens through the layers (the time estimate's cost model), said before it starts: ``work``
    one layer's tokens per kind of pass (LayerQuantizer.planned_work), ``sample`` the OS+ search's token sample,
    ``candidates`` the OS+ candidates of a layer (inside the attention, elsewhere)."""
    inside, elsewhere = candidates
    on = f"on a {sample:,}-token sample"
    parts, whole = [], []
    if work["statistics"]:
        attention = "statistics pass" + (f", {inside} OS+ candidates {on}" if inside else "")
        parts.append(f"{work['statistics']:,} tokens through the attention ({attention})")
    elif inside:
        whole.append(f"{inside} OS+ candidates in the attention {on}")
    if elsewhere:
        whole.append(f"{elsewhere} OS+ candidates {on}")
    parts.append(f"{work['layer']:,} {'' if parts else 'tokens '}through the whole layer ("
                 + ", ".join(["float and quantized passes", *whole]) + ")")
    each = " and ".join(parts)
    return f"work: {layers} layer{'s' if layers > 1 else ''}, each {each}; a time estimate follows"


def estimate_summary(per_layer: dict[str, float | None], kind: str, cfg, layer: int) -> str:
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
