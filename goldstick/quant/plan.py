"""The plan: a recipe resolved against a model, every linear with its scheme and the rule that chose it.

``Recipe.plan(config)`` makes one (and raises on its errors unless ``strict=False``). Rules are tried in order and
the first one whose regex fullmatches a linear's name takes it; linears no rule matches get the recipe's default.
A plan also finds what cannot be right: a rule that matches no linear, or only linears an earlier rule already
took; fused linears (``architecture.FUSED_LINEARS``) with different schemes; dynamic SmoothQuant on a linear whose
feeding norm (``architecture.FEEDING_NORMS``) cannot carry the scale. ``Plan.format()`` is the dry run's table.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from goldstick.model.architecture import (
    ROUTER,
    expert_of,
    fused_groups,
    layer_of,
    layer_prefix,
    name_template,
    smoothing_groups,
)
from goldstick.model.config import ModelConfig
from goldstick.model.names import number_ranges
from goldstick.quant.recipe_parts import SCHEME_NAMES, Rule, Scheme


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



class Plan:
    """The rewrite plan of one recipe on one model: every linear, its scheme and the rule that chose it.

    ``recipe`` is a ``goldstick.quant.recipe.Recipe`` (its rules, default, options and ``resolve``).
    """

    def __init__(self, recipe, config: ModelConfig):
        self.recipe, self.config = recipe, config
        names = config.linear_names()
        rules = recipe.rules
        schemes = [recipe.resolve(r.scheme) for r in rules]
        default = recipe.resolve(recipe.default)
        regexes = [r.regex for r in rules]
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
            if (layer := layer_of(e.name)) is not None:
                self._by_layer[layer].append(e)
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
        substring = sum(1 for n in names if rule.regex.search(n))
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
                key = (group.key, group.why, name_template(first.name), name_template(other.name), first.scheme.label,
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
                norm = group.key.removeprefix(layer_prefix(layer))
                router = next((n for n in group.linears if n.endswith("." + ROUTER)), None)
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
                    problems[why][name_template(n)].append(layer)
        for n in wanted.difference(grouped):  # o_proj, down_proj, lm_head
            layer = layer_of(n)
            problems["no norm feeds them"][name_template(n)].append(-1 if layer is None else layer)
        errors = []
        for why, names in problems.items():
            listed = ", ".join(f"{t.replace('{L}', number_ranges(ls, sep='..'))}" for t, ls in sorted(names.items()))
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
            layer = layer_of(name)
            why = (" (the MTP layer is not quantized in this version: it is passed through as float)"
                   if layer is not None and layer >= self.config.num_hidden_layers else "")
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
        return {s: c.get(s, 0) for s in SCHEME_NAMES}

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
            key = (name_template(e.name), e.scheme.label, e.chosen_by)
            expert = expert_of(e.name)
            groups.setdefault(key, {}).setdefault(layer_of(e.name), []).append(-1 if expert is None else expert)
        rows = []
        for (template, label, by), layers in groups.items():
            by_experts: dict[tuple[int, ...], list] = {}
            for layer, experts in layers.items():
                by_experts.setdefault(tuple(experts), []).append(layer)
            for experts, layer_list in by_experts.items():
                text = template
                if layer_list != [None]:
                    text = text.replace("{L}", number_ranges(layer_list, sep='..'), 1)
                if experts != (-1,):
                    text = text.replace("{E}", number_ranges(experts, sep='..'), 1)
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
        by_label = sorted(self.counts_by_label().items(),
                          key=lambda kv: (SCHEME_NAMES.index(kv[0].split("+")[0]), kv[0]))
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



def _rule_label(i: int, rule: Rule) -> str:
    """``rule 2 ('lm_head', line 21)``: the rule's index, its pattern and, when read from YAML, its line."""
    return f"rule {i} ('{rule.match}'{f', line {rule.line}' if rule.line else ''})"
