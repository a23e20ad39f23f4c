"""Tensor and linear names folded on their numbers, for messages: ``model.layers.{0-3}.self_attn.o_proj (4)``."""

from __future__ import annotations

from collections import defaultdict


def number_ranges(numbers, sep: str = "-") -> str:
    """``{0, 1, 2, 5}`` -> ``{0-2,5}`` (``sep`` joins the ends of a run); a single number stays bare: ``3``."""
    nums, parts, i = sorted(set(numbers)), [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}{sep}{nums[j]}")
        i = j + 1
    return parts[0] if len(nums) == 1 else "{" + ",".join(parts) + "}"


def summarize_names(names) -> str:
    """``model.layers.{1-3}.mlp.experts.{0-15}.{down_proj,gate_proj,up_proj} (144)``: names folded on their numbers."""
    by_shape: dict[tuple, list[list[str]]] = defaultdict(list)
    for name in sorted(set(names)):
        parts = name.split(".")
        by_shape[tuple("#" if p.isdigit() else p for p in parts[:-1])].append(parts)
    merged: dict[tuple, set[str]] = defaultdict(set)
    counts: dict[tuple, int] = defaultdict(int)
    for shape, members in by_shape.items():
        numbers = tuple(number_ranges({int(m[i]) for m in members}) if tok == "#" else tok
                        for i, tok in enumerate(shape))
        merged[numbers] |= {m[-1] for m in members}
        counts[numbers] += len(members)
    out = []
    for prefix, lasts in merged.items():
        last = next(iter(lasts)) if len(lasts) == 1 else "{" + ",".join(sorted(lasts)) + "}"
        out.append(".".join(prefix + (last,)) + (f" ({counts[prefix]})" if counts[prefix] > 1 else ""))
    return "; ".join(out)
