"""The parts a recipe is made of, each checked when it is made: ``Scheme`` (how one linear is quantized), ``Rule``
(a regex over linear names → a scheme), ``Calibration`` (the calibration set) and ``Options`` (the engine knobs),
with ``RecipeError``; and the value checks and did-you-mean hints that every reader of recipe-like input shares
(the recipe reader in ``goldstick.quant.recipe``, the Golden-Stick policy reader in ``goldstick.quant.gs_compat``).

Schemes (every int8 weight is per-output-channel symmetric):
    float         kept in bf16
    w8a16         int8 weight, bf16 activation (weight-only)
    w8a8-static   int8 weight x int8 activation, per-tensor asymmetric, range calibrated offline;
                  optional outlier_suppression: none | smoothquant (alpha in (0, 1]) | osplus (shift + searched scale)
    w8a8-dynamic  int8 weight x int8 activation, per-token symmetric, computed at run time (no calibration);
                  optional outlier_suppression: smoothquant, only where the scale folds into the feeding norm
                  (input_layernorm -> q_a_proj + kv_a_proj_with_mqa or q_proj; q_a_layernorm -> q_b_proj;
                  kv_a_layernorm -> kv_b_proj): a dynamic linear has no per-channel input scale to carry it
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from goldstick.errors import GoldstickError
from goldstick.quant.schemes import FLOAT, SCHEMES, W8A8_DYNAMIC, W8A8_STATIC, W8A16

SCHEME_NAMES = (FLOAT, W8A16, W8A8_STATIC, W8A8_DYNAMIC)  # in the order plans and messages list them
OUTLIER_SUPPRESSIONS = ("none", "smoothquant", "osplus")

SCHEME_HELP = {name: SCHEMES[name].summary for name in SCHEME_NAMES}


class RecipeError(GoldstickError, ValueError):
    """A recipe that cannot be used. ``problems`` lists every problem found, each a complete sentence."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


# ---- value checks (shared by the dataclasses and the readers) -----------------------------------------------

def describe(value: Any) -> str:
    """A bad value as a message shows it: ``null``, ``str 'x'``, ``int 3``."""
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def closest(word: Any, candidates: tuple[str, ...] | list[str]) -> list[str]:
    """The candidates a typo most likely meant: those it is a prefix of, else the nearest by difflib."""
    if not isinstance(word, str) or not word:
        return []
    longer = [c for c in candidates if c.startswith(word) and c != word]
    return longer if len(longer) > 1 else difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)


def did_you_mean(word: Any, candidates: tuple[str, ...] | list[str]) -> str:
    """`` (did you mean 'w8a16'?)`` for a likely typo of one of ``candidates``, else the empty string."""
    close = closest(word, candidates)
    if len(close) > 1:
        return f" (did you mean one of {', '.join(repr(c) for c in close)}?)"
    return f" (did you mean {close[0]!r}?)" if close else ""


def _one_of(*allowed: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, str) and value in allowed:
            return None
        return f"bad value {value!r}{did_you_mean(value, allowed)}; allowed: {', '.join(allowed)}"
    return check


def _int_at_least(low: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"expected an integer, got {describe(value)}"
        return None if value >= low else f"must be >= {low}, got {value}"
    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {describe(value)}"


def _fraction(value: Any) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"expected a number in (0, 1], got {describe(value)}"
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}"


def _optional_fraction(value: Any) -> str | None:
    return None if value is None else _fraction(value)


def check_text(value: Any) -> str | None:
    """None for a string, else what is wrong with the value."""
    return None if isinstance(value, str) else f"expected a string, got {describe(value)}"


def _optional_text(value: Any) -> str | None:
    return None if value is None or isinstance(value, str) else f"expected a string or null, got {describe(value)}"


def check_regex(value: Any) -> str | None:
    """None for a non-empty string that compiles as a Python regex, else what is wrong with it."""
    if not isinstance(value, str):
        return f"expected a regex string, got {describe(value)}"
    if not value:
        return "empty regex"
    try:
        re.compile(value)
    except re.error as exc:
        return f"invalid regex {value!r}: {exc}"
    return None


def _knob(default: Any, check: Callable[[Any], str | None], help: str) -> Any:
    return field(default=default, metadata={"check": check, "help": help})


def field_problems(cls: type, values: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, message) for every bad value in ``values`` (a subset of the fields of ``cls``, one of the classes
    below), then the class's cross-field checks."""
    problems = []
    for f in dataclasses.fields(cls):
        check = f.metadata.get("check")
        if check is not None and f.name in values:
            message = check(values[f.name])
            if message:
                problems.append((f.name, message))
    if not problems and hasattr(cls, "_cross_problems"):
        full = {f.name: values.get(f.name, f.default) for f in dataclasses.fields(cls)}
        problems += cls._cross_problems(full)
    return problems


def _validate(obj: Any) -> None:
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    problems = field_problems(type(obj), values)
    if problems:
        raise RecipeError([f"{type(obj).__name__}.{name}: {message}" for name, message in problems])


# ---- the recipe objects -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scheme:
    """How one linear is quantized. ``alpha`` None means ``options.smoothquant_alpha`` (filled in by the plan)."""

    name: str = _knob(FLOAT, _one_of(*SCHEME_NAMES), " | ".join(SCHEME_NAMES))
    outlier_suppression: str = _knob("none", _one_of(*OUTLIER_SUPPRESSIONS),
                                     "none | smoothquant (w8a8-static, w8a8-dynamic) | osplus (w8a8-static)")
    alpha: float | None = _knob(None, _optional_fraction, "SmoothQuant migration strength in (0, 1]")

    def __post_init__(self) -> None:
        _validate(self)

    @staticmethod
    def _cross_problems(v: dict[str, Any]) -> list[tuple[str, str]]:
        problems = []
        if v["outlier_suppression"] == "osplus" and v["name"] != W8A8_STATIC:
            problems.append(("outlier_suppression", f"'osplus' applies only to scheme w8a8-static, not {v['name']}"))
        elif v["outlier_suppression"] == "smoothquant" and v["name"] not in (W8A8_STATIC, W8A8_DYNAMIC):
            # dynamic: the smoothing scale must fold into a norm (Plan checks which linears can)
            problems.append(("outlier_suppression", f"'smoothquant' applies only to schemes w8a8-static and "
                                                    f"w8a8-dynamic, not {v['name']}"))
        if v["alpha"] is not None and v["outlier_suppression"] != "smoothquant":
            problems.append(("alpha", "alpha is the SmoothQuant strength: set it only with "
                                      "outlier_suppression: smoothquant"))
        return problems

    @property
    def quantized(self) -> bool:
        return self.name != FLOAT

    @property
    def static(self) -> bool:
        """True when activation ranges come from calibration."""
        return self.name == W8A8_STATIC

    @property
    def label(self) -> str:
        """Short display name: ``w8a8-static+smoothquant(0.5)``, ``w8a8-static+osplus``, ``w8a16``."""
        if self.outlier_suppression == "none":
            return self.name
        if self.outlier_suppression == "smoothquant" and self.alpha is not None:
            return f"{self.name}+smoothquant({self.alpha:g})"
        return f"{self.name}+{self.outlier_suppression}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scheme": self.name}
        if self.outlier_suppression != "none":
            out["outlier_suppression"] = self.outlier_suppression
        if self.alpha is not None:
            out["alpha"] = self.alpha
        return out


def as_scheme(value: Scheme | str) -> Scheme:
    """A Scheme as is; a scheme name (``"w8a16"``) as the Scheme of that name."""
    return Scheme(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class Rule:
    """``match`` (re.fullmatch over HF linear names) → ``scheme``. ``note`` says why, for humans and the dry run."""

    match: str
    scheme: Scheme
    note: str = ""
    # the YAML line the rule was read from, for the plan's messages; not part of the rule's value
    line: int | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", as_scheme(self.scheme))
        problems = [f"Rule.match: {m}" for m in [check_regex(self.match)] if m]
        if not isinstance(self.scheme, Scheme):
            problems.append(f"Rule.scheme: expected a Scheme or a scheme name, got {describe(self.scheme)}")
        if not isinstance(self.note, str):
            problems.append(f"Rule.note: expected a string, got {describe(self.note)}")
        if problems:
            raise RecipeError(problems)
        object.__setattr__(self, "_regex", re.compile(self.match))

    @property
    def regex(self) -> re.Pattern[str]:
        """``match``, compiled once."""
        return self._regex

    def matches(self, name: str) -> bool:
        return self._regex.fullmatch(name) is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"match": self.match, **self.scheme.to_dict()}
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class Calibration:
    """The calibration set: needed only by w8a8-static and outlier suppression (``Plan.needs_calibration``)."""

    data: str | None = _knob(None, _optional_text,
                             "a .jsonl file, a local datasets folder or file, or a datasets hub name; "
                             "null = given at run time")
    samples: int = _knob(128, _int_at_least(1), "number of calibration sequences")
    seq_len: int = _knob(2048, _int_at_least(1), "tokens per sequence (longer ones are truncated)")
    seed: int = _knob(0, _int_at_least(0), "seed of the sample selection")

    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class Options:
    """Engine knobs. Every knob is here, with its default: there are no hidden ones."""

    inputs_from: str = _knob("quantized", _one_of("quantized", "float"),
                             "which outputs of layer i feed layer i+1 during calibration: the quantized ones "
                             "(errors propagate, as at run time) or the float ones")
    moe_calibrate_all_experts: bool = _knob(False, _boolean,
                                            "run every routed expert on every calibration token for its "
                                            "statistics (the layer output still uses the router's choice)")
    weight_rounding: str = _knob("absmax127", _one_of("absmax127", "gs"),
                                 "int8 weight scale: absmax/127, or gs = absmax/127.5 (Golden-Stick-identical)")
    token_sample: int = _knob(1024, _int_at_least(1),
                              "tokens (whole calibration sequences, at least one) on which the OS+ search measures "
                              "the error of each candidate (see osplus_loss); also the bounded MoE input sample "
                              "that gives statistics to experts no calibration token reached")
    osplus_grid: int = _knob(20, _int_at_least(1),
                             "OS+ tries N clipping thresholds t, evenly spaced from the largest shifted channel "
                             "range (shift only) down to the smallest; channel j is scaled by max(1, range_j / t)")
    osplus_loss: str = _knob("layer", _one_of("layer", "mlp-input"),
                             "where an OS+ candidate's error is measured: the layer's output (each candidate runs "
                             "the whole layer), or, for linears inside the attention, what the MLP receives (the "
                             "post-attention norm of the attention half: each candidate runs the attention only, "
                             "no expert per candidate at R1's width; 0.10-0.15 dB lower logits SQNR on the "
                             "embedded model)")
    smoothquant_alpha: float = _knob(0.5, _fraction, "SmoothQuant alpha for rules that do not set one")

    def __post_init__(self) -> None:
        _validate(self)
