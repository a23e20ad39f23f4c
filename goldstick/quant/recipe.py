"""Quantization recipes: which scheme each linear of DeepSeek-V3/R1 gets, as YAML or as Python objects.

A recipe is data. The same recipe reads from YAML (``Recipe.from_yaml``) or is built in Python::

    Recipe(name="my-mix",
           rules=[Rule(r".*\\.mlp\\.gate|.*\\.kv_b_proj|lm_head", "float"),
                  Rule(r".*\\.self_attn\\..*", Scheme("w8a8-static", outlier_suppression="smoothquant", alpha=0.8)),
                  Rule(r".*\\.mlp\\..*_proj", "w8a8-dynamic")],
           calibration=Calibration(data="calib.jsonl", samples=256))

Matching. ``match`` is a Python regex applied with ``re.fullmatch`` to the HF module name of a linear, without the
``.weight`` suffix: ``model.layers.3.mlp.experts.17.up_proj``, ``model.layers.0.self_attn.q_a_proj``, ``lm_head``.
fullmatch means a pattern names whole linears (``.*\\.kv_b_proj``, not ``kv_b_proj``), so ``q_proj`` never matches
``q_a_proj`` by accident. Rules are tried in order and **the first rule that matches wins**; linears that no rule
matches get ``default``. A rule that matches no linear of the model, or only linears an earlier rule already took,
is an error of ``Recipe.plan`` (it is almost always a typo or a rule in the wrong place).

Schemes (every int8 weight is per-output-channel symmetric):
    float         kept in bf16
    w8a16         int8 weight, bf16 activation (weight-only)
    w8a8-static   int8 weight x int8 activation, per-tensor asymmetric, range calibrated offline;
                  optional outlier_suppression: none | smoothquant (alpha in (0, 1]) | osplus (shift + searched scale)
    w8a8-dynamic  int8 weight x int8 activation, per-token symmetric, computed at run time (no calibration);
                  optional outlier_suppression: smoothquant, only where the scale folds into the feeding norm
                  (input_layernorm -> q_a_proj + kv_a_proj_with_mqa or q_proj; q_a_layernorm -> q_b_proj;
                  kv_a_layernorm -> kv_b_proj): a dynamic linear has no per-channel input scale to carry it

``Recipe.plan(config)`` resolves a recipe against a model: every linear with its scheme and the rule that chose it.
Linears that serving fuses must share a scheme (``FUSED_LINEARS``); the norms that feed linears, which is where
a shared smoothing scale lives, are in ``FEEDING_NORMS``. Both are plain tables.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from goldstick.model.config import ModelConfig
from goldstick.errors import GoldstickError

SCHEMES = ("float", "w8a16", "w8a8-static", "w8a8-dynamic")
OUTLIER_SUPPRESSIONS = ("none", "smoothquant", "osplus")
DEFAULT_RECIPE = "deepseek-r1-w8a8-mixed"

SCHEME_HELP = {
    "float": "kept in bf16",
    "w8a16": "int8 per-channel weight, bf16 activation",
    "w8a8-static": "int8 per-channel weight, int8 per-tensor asymmetric activation (calibrated)",
    "w8a8-dynamic": "int8 per-channel weight, int8 per-token symmetric activation (at run time)",
}

# Where shipped recipes live: the repo's recipes/ folder (source checkouts and editable installs), then a copy
# inside the package for wheel installs.
_HERE = Path(__file__).resolve().parents[1]  # the goldstick package folder
_RECIPE_DIRS = (_HERE.parent / "recipes", _HERE / "data" / "recipes")


class RecipeError(GoldstickError, ValueError):
    """A recipe that cannot be used. ``problems`` lists every problem found, each a complete sentence."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


# ---- small validation vocabulary (shared by the dataclasses and the YAML/dict reader) ---------------------------

def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _closest(word: Any, candidates: tuple[str, ...] | list[str]) -> list[str]:
    """The candidates a typo most likely meant: those it is a prefix of, else the nearest by difflib."""
    if not isinstance(word, str) or not word:
        return []
    longer = [c for c in candidates if c.startswith(word) and c != word]
    return longer if len(longer) > 1 else difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)


def _did_you_mean(word: Any, candidates: tuple[str, ...] | list[str]) -> str:
    close = _closest(word, candidates)
    if len(close) > 1:
        return f" (did you mean one of {', '.join(repr(c) for c in close)}?)"
    return f" (did you mean {close[0]!r}?)" if close else ""


def _one_of(*allowed: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, str) and value in allowed:
            return None
        return f"bad value {value!r}{_did_you_mean(value, allowed)}; allowed: {', '.join(allowed)}"
    return check


def _int_at_least(low: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"expected an integer, got {_describe(value)}"
        return None if value >= low else f"must be >= {low}, got {value}"
    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {_describe(value)}"


def _fraction(value: Any) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"expected a number in (0, 1], got {_describe(value)}"
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}"


def _optional_fraction(value: Any) -> str | None:
    return None if value is None else _fraction(value)


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {_describe(value)}"


def _optional_text(value: Any) -> str | None:
    return None if value is None or isinstance(value, str) else f"expected a string or null, got {_describe(value)}"


def _regex(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a regex string, got {_describe(value)}"
    if not value:
        return "empty regex"
    try:
        re.compile(value)
    except re.error as exc:
        return f"invalid regex {value!r}: {exc}"
    return None


def _knob(default: Any, check: Callable[[Any], str | None], help: str) -> Any:
    return field(default=default, metadata={"check": check, "help": help})


def _field_problems(cls: type, values: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, message) for every bad value in ``values`` (a subset of cls's fields), then cross-field checks."""
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
    problems = _field_problems(type(obj), values)
    if problems:
        raise RecipeError([f"{type(obj).__name__}.{name}: {message}" for name, message in problems])


# ---- the recipe objects -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scheme:
    """How one linear is quantized. ``alpha`` None means ``options.smoothquant_alpha`` (filled in by the plan)."""

    name: str = _knob("float", _one_of(*SCHEMES), "float | w8a16 | w8a8-static | w8a8-dynamic")
    outlier_suppression: str = _knob("none", _one_of(*OUTLIER_SUPPRESSIONS),
                                     "none | smoothquant (w8a8-static, w8a8-dynamic) | osplus (w8a8-static)")
    alpha: float | None = _knob(None, _optional_fraction, "SmoothQuant migration strength in (0, 1]")

    def __post_init__(self) -> None:
        _validate(self)

    @staticmethod
    def _cross_problems(v: dict[str, Any]) -> list[tuple[str, str]]:
        problems = []
        if v["outlier_suppression"] == "osplus" and v["name"] != "w8a8-static":
            problems.append(("outlier_suppression", f"'osplus' applies only to scheme w8a8-static, not {v['name']}"))
        elif v["outlier_suppression"] == "smoothquant" and v["name"] not in ("w8a8-static", "w8a8-dynamic"):
            # dynamic: the smoothing scale must fold into a norm (Plan checks which linears can)
            problems.append(("outlier_suppression", f"'smoothquant' applies only to schemes w8a8-static and "
                                                    f"w8a8-dynamic, not {v['name']}"))
        if v["alpha"] is not None and v["outlier_suppression"] != "smoothquant":
            problems.append(("alpha", "alpha is the SmoothQuant strength: set it only with "
                                      "outlier_suppression: smoothquant"))
        return problems

    @property
    def quantized(self) -> bool:
        return self.name != "float"

    @property
    def static(self) -> bool:
        """True when activation ranges come from calibration."""
        return self.name == "w8a8-static"

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


def _as_scheme(value: Scheme | str) -> Scheme:
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
        object.__setattr__(self, "scheme", _as_scheme(self.scheme))
        problems = [f"Rule.match: {m}" for m in [_regex(self.match)] if m]
        if not isinstance(self.scheme, Scheme):
            problems.append(f"Rule.scheme: expected a Scheme or a scheme name, got {_describe(self.scheme)}")
        if not isinstance(self.note, str):
            problems.append(f"Rule.note: expected a string, got {_describe(self.note)}")
        if problems:
            raise RecipeError(problems)
        object.__setattr__(self, "_regex", re.compile(self.match))

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
                              "the layer-output error of each candidate; also the bounded MoE input sample that "
                              "gives statistics to experts no calibration token reached")
    osplus_grid: int = _knob(20, _int_at_least(1),
                             "OS+ tries N clipping thresholds t, evenly spaced from the largest shifted channel "
                             "range (shift only) down to the smallest; channel j is scaled by max(1, range_j / t)")
    smoothquant_alpha: float = _knob(0.5, _fraction, "SmoothQuant alpha for rules that do not set one")

    def __post_init__(self) -> None:
        _validate(self)


_TOP_KEYS = ("name", "description", "default", "rules", "calibration", "options")
_SCHEME_KEYS = ("scheme", "outlier_suppression", "alpha")
_RULE_KEYS = ("match",) + _SCHEME_KEYS + ("note",)


@dataclass(frozen=True)
class Recipe:
    """Ordered rules (first match wins), a default scheme, the calibration set and the engine options."""

    rules: tuple[Rule, ...] = ()
    default: Scheme = field(default_factory=Scheme)
    calibration: Calibration = field(default_factory=Calibration)
    options: Options = field(default_factory=Options)
    name: str = ""
    description: str = ""
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.rules, (list, tuple)):
            object.__setattr__(self, "rules", tuple(self.rules))
            problems += [f"Recipe.rules[{i}]: expected a Rule, got {_describe(r)}"
                         for i, r in enumerate(self.rules) if not isinstance(r, Rule)]
        else:
            problems.append(f"Recipe.rules: expected a list of Rule, got {_describe(self.rules)}")
        object.__setattr__(self, "default", _as_scheme(self.default))
        for name, cls in (("default", Scheme), ("calibration", Calibration), ("options", Options)):
            if not isinstance(getattr(self, name), cls):
                problems.append(f"Recipe.{name}: expected a {cls.__name__}, got {_describe(getattr(self, name))}")
        for name in ("name", "description"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"Recipe.{name}: expected a string, got {_describe(getattr(self, name))}")
        if problems:
            raise RecipeError(problems)

    # ---- reading --------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> "Recipe":
        return _Reader(source, {}).recipe(raw)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RecipeError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
        return cls.from_yaml_string(text, source=str(path))

    @classmethod
    def from_yaml_string(cls, text: str, source: str = "<string>") -> "Recipe":
        raw, lines, problems = _compose_yaml(text, source)
        reader = _Reader(source, lines)
        reader.problems += problems
        return reader.recipe(raw)

    # ---- writing --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        default = self.default.to_dict()
        return {
            "name": self.name,
            "description": self.description,
            "default": default["scheme"] if len(default) == 1 else default,
            "rules": [r.to_dict() for r in self.rules],
            "calibration": dataclasses.asdict(self.calibration),
            "options": dataclasses.asdict(self.options),
        }

    def to_yaml(self) -> str:
        """YAML that reads back to an equal Recipe (comments of the original file are not kept)."""
        head = f"# {self.name or 'recipe'}: written by goldstick Recipe.to_yaml()\n"
        return head + yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=120)

    def with_calibration(self, **changes: Any) -> "Recipe":
        """The same recipe with calibration fields replaced, e.g. ``recipe.with_calibration(data="calib.jsonl")``."""
        return dataclasses.replace(self, calibration=dataclasses.replace(self.calibration, **changes))

    # ---- resolving against a model ----------------------------------------------------------------------------
    def resolve(self, scheme: Scheme) -> Scheme:
        """The scheme with recipe-level defaults filled in (smoothquant alpha)."""
        if scheme.outlier_suppression == "smoothquant" and scheme.alpha is None:
            return dataclasses.replace(scheme, alpha=self.options.smoothquant_alpha)
        return scheme

    def plan(self, config: ModelConfig, *, strict: bool = True) -> "Plan":
        """Every linear of ``config`` with its scheme and the rule that chose it.

        Raises RecipeError for rules that match nothing, rules that never apply, and fused linears with different
        schemes; with ``strict=False`` these are kept in ``Plan.errors`` instead (for a dry run that shows them).
        """
        plan = Plan(self, config)
        if strict and plan.errors:
            raise RecipeError([f"{self.source or self.name or 'recipe'}: {e}" for e in plan.errors])
        return plan


def _rule_label(i: int, rule: Rule) -> str:
    """``rule 2 ('lm_head', line 21)``: the rule's index, its pattern and, when read from YAML, its line."""
    return f"rule {i} ('{rule.match}'{f', line {rule.line}' if rule.line else ''})"


# ---- YAML with line numbers ----------------------------------------------------------------------------------

Loc = tuple  # a location inside the recipe: ("rules", 2, "scheme")
_MAX_YAML_DEPTH = 32       # a recipe is 4 levels deep
_MAX_YAML_NODES = 20_000   # ~5000 rules


def _compose_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int], list[tuple[int, str]]]:
    """Parse YAML into plain Python data plus the line of every key and list item (1-based)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise RecipeError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:  # PyYAML's parser recurses once per nesting level
        raise RecipeError(f"{source}: not a recipe: the YAML is nested too deeply") from None
    if root is None:
        raise RecipeError(f"{source}: the file is empty")
    scalars = yaml.SafeLoader("")
    lines: dict[Loc, int] = {}
    problems: list[tuple[int, str]] = []

    budget = [_MAX_YAML_NODES]

    def scalar(node: yaml.Node) -> Any:
        try:
            return scalars.construct_object(node)
        except Exception as exc:  # noqa: BLE001 - PyYAML's constructors raise anything (!!int 'x', bad !!timestamp)
            line = node.start_mark.line + 1
            problems.append((line, f"{source}:{line}: cannot read the value {node.value!r} tagged {node.tag} "
                                   f"({getattr(exc, 'problem', None) or exc})"))
            return None

    def build(node: yaml.Node, path: Loc) -> Any:
        # aliases make the node graph a DAG (exponential "billion laughs") or a cycle: bound depth and size
        budget[0] -= 1
        if len(path) > _MAX_YAML_DEPTH or budget[0] < 0:
            raise RecipeError(f"{source}:{node.start_mark.line + 1}: not a recipe: the YAML is nested more than "
                              f"{_MAX_YAML_DEPTH} levels or has more than {_MAX_YAML_NODES} values (aliases?)")
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    problems.append((line, f"{source}:{line}: keys must be plain words"))
                    continue
                key = scalar(key_node)
                if key in out:
                    problems.append((line, f"{source}:{line}: duplicate key {key!r}"))
                lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(item, path + (i,)) for i, item in enumerate(node.value)]
        return scalar(node)

    return build(root, ()), lines, problems


def _dotted(path: Loc) -> str:
    """("rules", 2, "scheme") → ``rules[2].scheme``; keys that are not plain words print as ``['.*\\.mlp']``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not re.fullmatch(r"[A-Za-z_][\w-]*", str(part)):
            out += f"['{part}']"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Reader:
    """Turns raw data (from YAML or a dict) into a Recipe, collecting every problem with its location."""

    def __init__(self, source: str, lines: dict[Loc, int]):
        self.source, self.lines = source, lines
        self.problems: list[tuple[int, str]] = []   # (line, message), reported in file order
        self.typos: dict[Loc, set[str]] = {}         # keys an unknown key probably meant, per mapping

    def error(self) -> RecipeError:
        return RecipeError([text for _, text in sorted(self.problems, key=lambda p: p[0])])

    def add(self, path: Loc, message: str, at: Loc | None = None) -> None:
        """Record a problem about ``path``, located at the line of ``at`` (default: path itself)."""
        probe = path if at is None else at
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe, 0)
        where = f"{self.source}:{line}" if line else self.source
        self.problems.append((line, f"{where}: {_dotted(path) + ': ' if path else ''}{message}"))

    def mapping(self, raw: Any, path: Loc, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        """The mapping at ``path``; unknown keys are reported (and remembered as typos of what they resemble)."""
        if not isinstance(raw, dict):
            self.add(path, f"expected a mapping with keys {', '.join(allowed)}; got {_describe(raw)}")
            return None
        for key in raw:
            if key not in allowed:
                self.typos.setdefault(path, set()).update(_closest(str(key), allowed))
                hint = _did_you_mean(str(key), allowed) or f" (valid keys: {', '.join(allowed)})"
                self.add(path, f"unknown key {key!r}{hint}", at=path + (key,))
        return raw

    def section(self, raw: Any, path: Loc, cls: type) -> Any:
        allowed = tuple(f.name for f in dataclasses.fields(cls))
        values = self.mapping(raw, path, allowed)
        if values is None:
            return None
        values = {k: v for k, v in values.items() if k in allowed}
        problems = _field_problems(cls, values)
        for name, message in problems:
            self.add(path + (name,), message)
        return None if problems else cls(**values)

    def scheme(self, raw: dict[str, Any], path: Loc) -> Scheme | None:
        values = {("name" if k == "scheme" else k): v for k, v in raw.items() if k in _SCHEME_KEYS}
        problems = _field_problems(Scheme, values)
        for name, message in problems:
            self.add(path + ("scheme" if name == "name" else name,), message)
        return None if problems else Scheme(**values)

    def rule(self, raw: Any, path: Loc) -> Rule | None:
        values = self.mapping(raw, path, _RULE_KEYS)
        if values is None:
            return None
        ok = True
        for key in ("match", "scheme"):
            if key not in values and key not in self.typos.get(path, ()):
                self.add(path, f"missing key {key!r} (a rule is {{match: <regex>, scheme: <scheme>, ...}})")
                ok = False
        if "match" in values and (message := _regex(values["match"])):
            self.add(path + ("match",), message)
            ok = False
        if "note" in values and (message := _text(values["note"])):
            self.add(path + ("note",), message)
            ok = False
        scheme = self.scheme(values, path) if "scheme" in values else None
        if not ok or scheme is None:
            return None
        return Rule(values["match"], scheme, values.get("note", ""), line=self.lines.get(path))

    def recipe(self, raw: Any) -> Recipe:
        top = self.mapping(raw, (), _TOP_KEYS)
        if top is None:
            raise self.error()
        kwargs: dict[str, Any] = {}
        for key in ("name", "description"):
            if key in top:
                if message := _text(top[key]):
                    self.add((key,), message)
                else:
                    kwargs[key] = top[key]
        if "default" in top:
            default = top["default"]
            if isinstance(default, str):
                default = {"scheme": default}
            if self.mapping(default, ("default",), _SCHEME_KEYS) is not None:
                if "scheme" not in default:
                    if "scheme" not in self.typos.get(("default",), ()):
                        self.add(("default",), "missing key 'scheme'")
                else:
                    kwargs["default"] = self.scheme(default, ("default",))
        if "rules" in top:
            if not isinstance(top["rules"], list):
                self.add(("rules",), f"expected a list of rules, got {_describe(top['rules'])}")
            else:
                kwargs["rules"] = [self.rule(r, ("rules", i)) for i, r in enumerate(top["rules"])]
        for key, cls in (("calibration", Calibration), ("options", Options)):
            if key in top:
                kwargs[key] = self.section(top[key] if top[key] is not None else {}, (key,), cls)
        if self.problems:
            raise self.error()
        return Recipe(**kwargs, source=self.source)


# ---- shipped recipes -------------------------------------------------------------------------------------------

def _recipe_dir() -> Path | None:
    return next((d for d in _RECIPE_DIRS if d.is_dir() and any(d.glob("*.yaml"))), None)


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with goldstick (``load_recipe`` accepts each)."""
    folder = _recipe_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def load_recipe(name_or_path: str | Path = DEFAULT_RECIPE) -> Recipe:
    """A shipped recipe by name (``deepseek-r1-w8a8-mixed``) or a recipe file by path."""
    path = Path(name_or_path)
    if path.is_file():
        return Recipe.from_yaml(path)
    name = str(name_or_path).removesuffix(".yaml").removesuffix(".yml")
    folder = _recipe_dir()
    if folder is not None and (folder / f"{name}.yaml").is_file():
        return Recipe.from_yaml(folder / f"{name}.yaml")
    names = shipped_recipes()
    raise RecipeError(f"{name_or_path}: no such recipe file and no shipped recipe of that name"
                      f"{_did_you_mean(name, names)}; shipped: {', '.join(names) or '(none found)'}")


# ---- model structure tables (data, not code paths) ---------------------------------------------------------------
# Names are relative to ``model.layers.N.``; "{e}" means one entry per routed expert; "*" means all routed experts
# of the layer together. Entries that a layer does not have (q_proj vs q_a_proj, dense vs MoE) are skipped.

FEEDING_NORMS: dict[str, tuple[str, ...]] = {
    # x = input_layernorm(h) feeds both MLA down-projections (q_proj when q_lora_rank is None)
    "input_layernorm": ("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
    "self_attn.q_a_layernorm": ("self_attn.q_b_proj",),
    "self_attn.kv_a_layernorm": ("self_attn.kv_b_proj",),
    # the MoE router reads the same normed input as the experts: smoothing folded into this norm must also
    # rescale the router's weight columns
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj", "mlp.gate",
                                 "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                                 "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
}
# o_proj (fed by attention) and every down_proj (fed by silu(gate)*up) have no feeding norm.

FUSED_LINEARS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("fused_qkv_a_proj", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
     "serving fuses q_a_proj and kv_a_proj_with_mqa into one matmul (fused_qkv_a_proj)"),
    ("gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"),
     "serving fuses gate_proj and up_proj into one matmul (gate_up_proj)"),
    ("gate_up_proj", ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
     "serving fuses gate_proj and up_proj into one matmul (gate_up_proj)"),
    # before the per-expert pair below, so that a split inside the experts is reported once, as fused_moe
    ("fused_moe", ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.experts.*.down_proj"),
     "serving runs all routed experts of a layer as one fused MoE kernel with one quantization method"),
    ("gate_up_proj", ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"),
     "serving fuses gate_proj and up_proj into one matmul (gate_up_proj)"),
)


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one layer that belong together: ``key`` is the norm (smoothing) or the fused module."""

    key: str
    linears: tuple[str, ...]
    why: str = ""


def _expand(config: ModelConfig, layer: int, members: tuple[str, ...], present: set[str]) -> list[tuple[str, ...]]:
    prefix = f"model.layers.{layer}."
    if any("{e}" in m for m in members):
        groups = [tuple(prefix + m.format(e=e) for m in members) for e in range(config.n_routed_experts)]
    else:
        names = []
        for m in members:
            if "*" in m:
                names += [prefix + m.replace("*", str(e)) for e in range(config.n_routed_experts)]
            else:
                names.append(prefix + m)
        groups = [tuple(names)]
    return [g for g in (tuple(n for n in g if n in present) for g in groups) if g]


def smoothing_groups(config: ModelConfig, layer: int) -> list[LinearGroup]:
    """The norms of one layer with the linears each feeds (``FEEDING_NORMS`` resolved for this layer).

    One smoothing scale per group: the scale folded into the norm divides the input of every linear listed.
    """
    present = set(config.layer_linear_names(layer))
    out = []
    for norm, members in FEEDING_NORMS.items():
        for group in _expand(config, layer, members, present):
            out.append(LinearGroup(f"model.layers.{layer}.{norm}", group))
    return out


def fused_groups(config: ModelConfig, layer: int) -> list[LinearGroup]:
    """Linears of one layer that serving runs as one module and that therefore need one scheme."""
    present = set(config.layer_linear_names(layer))
    out = []
    for kind, members, why in FUSED_LINEARS:
        for group in _expand(config, layer, members, present):
            if len(group) > 1:
                out.append(LinearGroup(kind, group, why))
    return out


# ---- the plan ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PlanEntry:
    name: str
    scheme: Scheme
    rule: int | None      # index into recipe.rules, None = the recipe's default
    match: str | None     # that rule's regex

    @property
    def chosen_by(self) -> str:
        return "default" if self.rule is None else f"rule {self.rule}"


@dataclass(frozen=True)
class Overlap:
    """Rule ``rule`` (earlier) takes ``count`` linears that rule ``shadowed`` (later) also matches."""

    rule: int
    shadowed: int
    count: int
    example: str

    def __str__(self) -> str:
        return (f"rule {self.rule} shadows rule {self.shadowed} on {self.count} linear"
                f"{'s' if self.count != 1 else ''} (e.g. {self.example})")


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class Plan:
    """The rewrite plan of one recipe on one model: every linear, its scheme and the rule that chose it."""

    def __init__(self, recipe: Recipe, config: ModelConfig):
        self.recipe, self.config = recipe, config
        names = config.linear_names()
        rules = recipe.rules
        schemes = [recipe.resolve(r.scheme) for r in rules]
        default = recipe.resolve(recipe.default)
        regexes = [r._regex for r in rules]
        matched = [0] * len(rules)
        taken = [0] * len(rules)
        shadow: dict[tuple[int, int], list] = {}
        entries = []
        for name in names:
            first = None
            for i, rx in enumerate(regexes):
                if rx.fullmatch(name):
                    matched[i] += 1
                    if first is None:
                        first = i
                    else:
                        hit = shadow.setdefault((first, i), [0, name])
                        hit[0] += 1
            if first is None:
                entries.append(PlanEntry(name, default, None, None))
            else:
                taken[first] += 1
                entries.append(PlanEntry(name, schemes[first], first, rules[first].match))
        self.entries: tuple[PlanEntry, ...] = tuple(entries)
        self._by_name = {e.name: e for e in entries}
        self._by_layer: dict[int, list[PlanEntry]] = defaultdict(list)
        for e in entries:
            if m := _LAYER_RE.match(e.name):
                self._by_layer[int(m.group(1))].append(e)
        self.rule_matches, self.rule_takes = tuple(matched), tuple(taken)
        self._overlaps = [Overlap(i, j, n, ex) for (i, j), (n, ex) in sorted(shadow.items())]
        errors = []
        for i in range(len(rules)):
            if not matched[i]:
                errors.append(self._unmatched_error(i, names))
            elif not taken[i]:
                by = ", ".join(f"rule {o.rule} on {o.count}" for o in self._overlaps if o.shadowed == i)
                errors.append(f"{_rule_label(i, rules[i])} never applies: every linear it matches "
                              f"({matched[i]}) is taken by an earlier rule ({by}); move it up or remove it")
        errors += self._fused_errors()
        errors += self._dynamic_smoothing_errors()
        self.errors: tuple[str, ...] = tuple(errors)

    # ---- problems ---------------------------------------------------------------------------------------------
    def _unmatched_error(self, i: int, names: list[str]) -> str:
        rule = self.recipe.rules[i]
        message = f"{_rule_label(i, rule)} matches no linear of this model"
        substring = sum(1 for n in names if rule._regex.search(n))
        if substring:
            return message + (f"; it matches {substring} as a substring, but rules must match the whole name "
                              f"(re.fullmatch): try '.*{rule.match}.*' or '.*\\.{rule.match}'")
        if "weight" in rule.match:
            return message + "; linear names have no '.weight' suffix (e.g. 'model.layers.0.self_attn.o_proj')"
        return message + f"; names look like {names[0]!r}, 'model.layers.3.mlp.experts.0.up_proj', 'lm_head'"

    def _fused_errors(self) -> list[str]:
        splits: dict[tuple, list] = {}
        for layer in range(self.config.num_hidden_layers):
            already: set[str] = set()
            for group in fused_groups(self.config, layer):
                if already.intersection(group.linears):
                    continue
                first = self._by_name[group.linears[0]]
                other = next((self._by_name[n] for n in group.linears[1:]
                              if self._by_name[n].scheme != first.scheme), None)
                if other is None:
                    continue
                already.update(group.linears)
                key = (group.key, group.why, _template(first.name), _template(other.name), first.scheme.label,
                       first.chosen_by, other.scheme.label, other.chosen_by)
                splits.setdefault(key, [0, first.name, other.name])[0] += 1
        errors = []
        for (kind, why, _, _, label_a, by_a, label_b, by_b), (count, a, b) in splits.items():
            more = f"; {count - 1} more {kind} group{'s' if count > 2 else ''} split the same way" if count > 1 else ""
            errors.append(f"{a} ({label_a}, {by_a}) and {b} ({label_b}, {by_b}) must share a scheme: {why}{more}")
        return errors

    def _dynamic_smoothing_errors(self) -> list[str]:
        """w8a8-dynamic + smoothquant: a dynamic linear has no per-channel input scale, so the smoothing scale must
        fold into the norm that feeds it, which then divides the input of every linear that norm feeds."""
        wanted = {e.name for e in self.entries
                  if e.scheme.name == "w8a8-dynamic" and e.scheme.outlier_suppression == "smoothquant"}
        if not wanted:
            return []
        problems: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        grouped = set()
        for layer in range(self.config.num_hidden_layers):
            for group in smoothing_groups(self.config, layer):
                if not wanted.intersection(group.linears):
                    continue
                grouped.update(group.linears)
                norm = group.key.removeprefix(f"model.layers.{layer}.")
                router = next((n for n in group.linears if n.endswith(".mlp.gate")), None)
                first = self._by_name[group.linears[0]].scheme
                other = next((n for n in group.linears if self._by_name[n].scheme != first), None)
                if router is not None:
                    why = f"{norm} also feeds the MoE router mlp.gate, whose weights stay float"
                elif other is not None:
                    why = (f"{norm} feeds linears with different schemes ({first.label} vs "
                           f"{self._by_name[other].scheme.label}); every linear it feeds must share the scheme")
                else:
                    continue
                for n in wanted.intersection(group.linears):
                    problems[why][_template(n)].append(layer)
        for n in wanted.difference(grouped):  # o_proj, down_proj, lm_head
            m = _LAYER_RE.match(n)
            problems["no norm feeds them"][_template(n)].append(int(m.group(1)) if m else -1)
        errors = []
        for why, names in problems.items():
            listed = ", ".join(f"{t.replace('{L}', _ranges(ls))}" for t, ls in sorted(names.items()))
            errors.append(f"w8a8-dynamic+smoothquant folds the smoothing scale into the feeding norm, which is not "
                          f"possible for {listed}: {why} (use outlier_suppression: none for them)")
        return errors

    # ---- lookups ------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> PlanEntry:
        entry = self._by_name.get(name.removesuffix(".weight"))
        if entry is None:
            m = _LAYER_RE.match(name)
            why = (" (the MTP layer is not quantized in this version: it is passed through as float)"
                   if m and int(m.group(1)) >= self.config.num_hidden_layers else "")
            raise KeyError(f"{name!r} is not a linear of the plan{why}")
        return entry

    def scheme_of(self, name: str) -> Scheme:
        return self[name].scheme

    def for_layer(self, layer: int) -> list[PlanEntry]:
        return list(self._by_layer.get(layer, ()))

    def schemes(self) -> dict[str, Scheme]:
        """name → scheme: what two plans must agree on to quantize a model the same way."""
        return {e.name: e.scheme for e in self.entries}

    def counts(self) -> dict[str, int]:
        """Number of linears per scheme name (every scheme listed, zeros included)."""
        c = Counter(e.scheme.name for e in self.entries)
        return {s: c.get(s, 0) for s in SCHEMES}

    def counts_by_label(self) -> dict[str, int]:
        """Like counts, split by outlier suppression (``w8a8-static+osplus``, ...), nonzero only."""
        return dict(Counter(e.scheme.label for e in self.entries))

    def overlaps(self) -> list[Overlap]:
        return list(self._overlaps)

    @property
    def needs_calibration(self) -> bool:
        """True when some linear needs activation statistics (static ranges or outlier suppression)."""
        return any(e.scheme.static or e.scheme.outlier_suppression != "none" for e in self.entries)

    # ---- output -------------------------------------------------------------------------------------------------
    def rows(self) -> list[tuple[str, int, str, str]]:
        """The compact table: (name pattern, count, scheme label, chosen by), identical linears collapsed."""
        groups: dict[tuple[str, str, str], dict[int | None, list[int]]] = {}
        for e in self.entries:
            key = (_template(e.name), e.scheme.label, e.chosen_by)
            layer = _LAYER_RE.match(e.name)
            expert = re.search(r"\.experts\.(\d+)\.", e.name)
            groups.setdefault(key, {}).setdefault(int(layer.group(1)) if layer else None, []).append(
                int(expert.group(1)) if expert else -1)
        rows = []
        for (template, label, by), layers in groups.items():
            by_experts: dict[tuple[int, ...], list] = {}
            for layer, experts in layers.items():
                by_experts.setdefault(tuple(experts), []).append(layer)
            for experts, layer_list in by_experts.items():
                text = template
                if layer_list != [None]:
                    text = text.replace("{L}", _ranges(layer_list), 1)
                if experts != (-1,):
                    text = text.replace("{E}", _ranges(list(experts)), 1)
                rows.append((text, len(layer_list) * len(experts), label, by))
        return rows

    def format(self) -> str:
        """Human-readable dry run: the compact table, the rules, counts per scheme, overlaps and errors."""
        c = self.config
        q = "q_lora_rank " + (str(c.q_lora_rank) if c.q_lora_rank is not None else "none (q_proj)")
        title = self.recipe.name or self.recipe.source or "(unnamed)"
        lines = [f"plan: recipe {title} on a {c.num_hidden_layers}-layer "
                 f"model ({c.first_k_dense_replace} dense, {c.n_routed_experts} routed experts, {q}): "
                 f"{len(self.entries)} linears"]
        rows = self.rows()
        width = max([len(r[0]) for r in rows] + [6])
        label_width = max([len(r[2]) for r in rows] + [6])
        lines.append(f"  {'linear':<{width}}  {'count':>6}  {'scheme':<{label_width}}  chosen by")
        lines += [f"  {t:<{width}}  {n:>6}  {label:<{label_width}}  {by}" for t, n, label, by in rows]
        lines.append("rules (first match wins, re.fullmatch on the linear name):")
        for i, rule in enumerate(self.recipe.rules):
            note = f"  # {rule.note}" if rule.note else ""
            lines.append(f"  rule {i}: '{rule.match}' -> {self.recipe.resolve(rule.scheme).label}; "
                         f"matches {self.rule_matches[i]}, takes {self.rule_takes[i]}{note}")
        n_default = sum(1 for e in self.entries if e.rule is None)
        lines.append(f"  default: {self.recipe.resolve(self.recipe.default).label}; takes {n_default}")
        by_label = sorted(self.counts_by_label().items(), key=lambda kv: (SCHEMES.index(kv[0].split("+")[0]), kv[0]))
        counts = ", ".join(f"{label} {n}" for label, n in by_label)
        lines.append(f"counts: {counts}")
        lines.append("overlaps:" + ("" if self._overlaps else " none"))
        lines += [f"  {o}" for o in self._overlaps]
        if self.errors:
            lines.append("errors:")
            lines += [f"  {e}" for e in self.errors]
        lines.append(f"calibration: {'needed' if self.needs_calibration else 'not needed'}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def scheme(s: Scheme) -> dict[str, Any]:
            return s.to_dict()

        return {
            "recipe": self.recipe.name,
            "source": self.recipe.source,
            "model": {"num_hidden_layers": self.config.num_hidden_layers,
                      "first_k_dense_replace": self.config.first_k_dense_replace,
                      "n_routed_experts": self.config.n_routed_experts,
                      "q_lora_rank": self.config.q_lora_rank},
            "counts": self.counts(),
            "needs_calibration": self.needs_calibration,
            "rules": [{"index": i, "match": r.match, **scheme(self.recipe.resolve(r.scheme)),
                       "matches": self.rule_matches[i], "takes": self.rule_takes[i]}
                      for i, r in enumerate(self.recipe.rules)],
            "default": scheme(self.recipe.resolve(self.recipe.default)),
            "overlaps": [dataclasses.asdict(o) for o in self._overlaps],
            "errors": list(self.errors),
            "linears": {e.name: {**scheme(e.scheme), "rule": e.rule} for e in self.entries},
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def _template(name: str) -> str:
    """``model.layers.3.mlp.experts.17.up_proj`` → ``model.layers.{L}.mlp.experts.{E}.up_proj``."""
    name = re.sub(r"^model\.layers\.\d+\.", "model.layers.{L}.", name)
    return re.sub(r"\.experts\.\d+\.", ".experts.{E}.", name)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] → ``{0..2,5}``; a single value stays bare."""
    values = sorted(set(values))
    if len(values) == 1:
        return str(values[0])
    parts = []
    start = prev = values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}..{prev}")
        start = prev = v
    return "{" + ",".join(parts) + "}"
