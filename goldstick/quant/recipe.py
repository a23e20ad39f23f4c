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

The schemes, rules, calibration and options are ``goldstick.quant.recipe_parts``. ``Recipe.plan(config)`` resolves a
recipe against a model (``goldstick.quant.plan``): every linear with its scheme and the rule that chose it. Linears
that serving fuses must share a scheme; the norms that feed linears are where a shared smoothing scale lives: both
are tables of ``goldstick.model.architecture`` (``FUSED_LINEARS``, ``FEEDING_NORMS``).

YAML is read with the line of every key and list item, so that each problem names its ``file:line``
(``compose_yaml``, ``LocatedReader``; the Golden-Stick policy reader uses them too).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from goldstick.model.config import ModelConfig
from goldstick.quant.plan import Plan
from goldstick.quant.recipe_parts import (
    Calibration,
    Options,
    RecipeError,
    Rule,
    Scheme,
    as_scheme,
    check_regex,
    check_text,
    closest,
    describe,
    did_you_mean,
    field_problems,
)

DEFAULT_RECIPE = "deepseek-r1-w8a8-mixed"

# Where shipped recipes live: the repo's recipes/ folder (source checkouts and editable installs), then a copy
# inside the package for wheel installs.
_HERE = Path(__file__).resolve().parents[1]  # the goldstick package folder
_RECIPE_DIRS = (_HERE.parent / "recipes", _HERE / "data" / "recipes")


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
            problems += [f"Recipe.rules[{i}]: expected a Rule, got {describe(r)}"
                         for i, r in enumerate(self.rules) if not isinstance(r, Rule)]
        else:
            problems.append(f"Recipe.rules: expected a list of Rule, got {describe(self.rules)}")
        object.__setattr__(self, "default", as_scheme(self.default))
        for name, cls in (("default", Scheme), ("calibration", Calibration), ("options", Options)):
            if not isinstance(getattr(self, name), cls):
                problems.append(f"Recipe.{name}: expected a {cls.__name__}, got {describe(getattr(self, name))}")
        for name in ("name", "description"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"Recipe.{name}: expected a string, got {describe(getattr(self, name))}")
        if problems:
            raise RecipeError(problems)

    # ---- reading --------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>") -> Recipe:
        return _RecipeReader(source, {}).recipe(raw)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RecipeError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
        return cls.from_yaml_string(text, source=str(path))

    @classmethod
    def from_yaml_string(cls, text: str, source: str = "<string>") -> Recipe:
        raw, lines, problems = compose_yaml(text, source)
        reader = _RecipeReader(source, lines)
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

    def with_calibration(self, **changes: Any) -> Recipe:
        """The same recipe with calibration fields replaced, e.g. ``recipe.with_calibration(data="calib.jsonl")``."""
        return dataclasses.replace(self, calibration=dataclasses.replace(self.calibration, **changes))

    # ---- resolving against a model ----------------------------------------------------------------------------
    def resolve(self, scheme: Scheme) -> Scheme:
        """The scheme with recipe-level defaults filled in (smoothquant alpha)."""
        if scheme.outlier_suppression == "smoothquant" and scheme.alpha is None:
            return dataclasses.replace(scheme, alpha=self.options.smoothquant_alpha)
        return scheme

    def plan(self, config: ModelConfig, *, strict: bool = True) -> Plan:
        """Every linear of ``config`` with its scheme and the rule that chose it.

        Raises RecipeError for rules that match nothing, rules that never apply, and fused linears with different
        schemes; with ``strict=False`` these are kept in ``Plan.errors`` instead (for a dry run that shows them).
        """
        plan = Plan(self, config)
        if strict and plan.errors:
            raise RecipeError([f"{self.source or self.name or 'recipe'}: {e}" for e in plan.errors])
        return plan


# ---- YAML with line numbers ----------------------------------------------------------------------------------

Loc = tuple  # a location inside the data: ("rules", 2, "scheme")
_MAX_YAML_DEPTH = 32       # a recipe is 4 levels deep
_MAX_YAML_NODES = 20_000   # ~5000 rules


def compose_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int], list[tuple[int, str]]]:
    """Parse YAML into plain Python data, the line of every key and list item (1-based, by location), and the
    values that could not be read as ``(line, message)``. Raises RecipeError for text that is not YAML, is empty,
    or is nested or aliased past the bounds below."""
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


def dotted(path: Loc) -> str:
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


class LocatedReader:
    """Reads raw data (from ``compose_yaml`` or a dict) and collects every problem with its ``file:line``.

    ``add`` records a problem about a location; ``mapping`` checks that a location holds a mapping of known keys;
    ``error()`` is the RecipeError listing every problem in file order. ``lines`` is ``compose_yaml``'s line map
    (empty for a dict: problems then name the source alone).
    """

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
        self.problems.append((line, f"{where}: {dotted(path) + ': ' if path else ''}{message}"))

    def mapping(self, raw: Any, path: Loc, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        """The mapping at ``path``; unknown keys are reported (and remembered as typos of what they resemble)."""
        if not isinstance(raw, dict):
            self.add(path, f"expected a mapping with keys {', '.join(allowed)}; got {describe(raw)}")
            return None
        for key in raw:
            if key not in allowed:
                self.typos.setdefault(path, set()).update(closest(str(key), allowed))
                hint = did_you_mean(str(key), allowed) or f" (valid keys: {', '.join(allowed)})"
                self.add(path, f"unknown key {key!r}{hint}", at=path + (key,))
        return raw


_TOP_KEYS = ("name", "description", "default", "rules", "calibration", "options")
_SCHEME_KEYS = ("scheme", "outlier_suppression", "alpha")
_RULE_KEYS = ("match",) + _SCHEME_KEYS + ("note",)


class _RecipeReader(LocatedReader):
    """Turns raw data (from YAML or a dict) into a Recipe, collecting every problem with its location."""

    def section(self, raw: Any, path: Loc, cls: type) -> Any:
        allowed = tuple(f.name for f in dataclasses.fields(cls))
        values = self.mapping(raw, path, allowed)
        if values is None:
            return None
        values = {k: v for k, v in values.items() if k in allowed}
        problems = field_problems(cls, values)
        for name, message in problems:
            self.add(path + (name,), message)
        return None if problems else cls(**values)

    def scheme(self, raw: dict[str, Any], path: Loc) -> Scheme | None:
        values = {("name" if k == "scheme" else k): v for k, v in raw.items() if k in _SCHEME_KEYS}
        problems = field_problems(Scheme, values)
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
        if "match" in values and (message := check_regex(values["match"])):
            self.add(path + ("match",), message)
            ok = False
        if "note" in values and (message := check_text(values["note"])):
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
                if message := check_text(top[key]):
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
                self.add(("rules",), f"expected a list of rules, got {describe(top['rules'])}")
            else:
                kwargs["rules"] = [self.rule(r, ("rules", i)) for i, r in enumerate(top["rules"])]
        for key, cls in (("calibration", Calibration), ("options", Options)):
            if key in top:
                kwargs[key] = self.section(top[key] if top[key] is not None else {}, (key,), cls)
        if self.problems:
            raise self.error()
        return Recipe(**kwargs, source=self.source)


# ---- shipped recipes -------------------------------------------------------------------------------------------

def shipped_recipe_dir() -> Path | None:
    """The folder the shipped recipes are read from (None when neither candidate holds any)."""
    return next((d for d in _RECIPE_DIRS if d.is_dir() and any(d.glob("*.yaml"))), None)


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with goldstick (``load_recipe`` accepts each)."""
    folder = shipped_recipe_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def load_recipe(name_or_path: str | Path = DEFAULT_RECIPE) -> Recipe:
    """A shipped recipe by name (``deepseek-r1-w8a8-mixed``) or a recipe file by path."""
    path = Path(name_or_path)
    if path.is_file():
        return Recipe.from_yaml(path)
    name = str(name_or_path).removesuffix(".yaml").removesuffix(".yml")
    folder = shipped_recipe_dir()
    if folder is not None and (folder / f"{name}.yaml").is_file():
        return Recipe.from_yaml(folder / f"{name}.yaml")
    names = shipped_recipes()
    raise RecipeError(f"{name_or_path}: no such recipe file and no shipped recipe of that name"
                      f"{did_you_mean(name, names)}; shipped: {', '.join(names) or '(none found)'}")
