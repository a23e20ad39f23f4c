"""The report of ``goldstick analyze``: ``analysis.md`` and the box plots of the worst linears' input channels.

Both read the analysis dict that ``analyze.analyze`` builds (``analysis.json``); the box plots also take the
token-sample quantiles of the engine pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BOX_MAX_CHANNELS = 256   # inputs wider than this show their worst channels plus evenly spaced ordinary ones


# ------------------------------------------------------------------------------------------------ plots
def write_boxplots(report: dict, main, out: Path, count: int) -> list[str]:
    """Box plots of the input channels of the ``count`` worst linears with distinct inputs (``main``: the
    ``analyze.PassResult`` of the recipe, for its token-sample quantiles and transforms)."""
    if count <= 0 or not main.boxes:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen, seen = [], set()
    for row in report["ranking"]:
        name = row["slot"]
        key = main.input_key.get(name)
        if key is None or key in seen or key not in main.boxes:
            continue
        seen.add(key)
        chosen.append(name)
        if len(chosen) >= count:
            break
    written = []
    for rank, name in enumerate(chosen, 1):
        q = main.boxes[main.input_key[name]]
        info = report["linears"][name]["input"]
        transform = main.transforms.get(name)
        panels = [("before smoothing" if transform else "input (the recipe applies no smoothing here)", q, info)]
        if transform is not None:
            scale, shift = transform
            panels.append(("after smoothing/shift: (x - shift) / scale", (q - shift) / scale, info["after"]))
        channels = _shown_channels(q, info)
        fig, axes = plt.subplots(len(panels), 1, figsize=(min(4 + 0.06 * len(channels), 22), 3.6 * len(panels)),
                                 squeeze=False)
        worst = {w["channel"] for w in info["worst_channels"]}
        for ax, (title, qq, summary) in zip(axes[:, 0], panels):
            stats = [{"whislo": qq[1, c], "q1": qq[2, c], "med": qq[3, c], "q3": qq[4, c], "whishi": qq[5, c],
                      "fliers": [qq[0, c], qq[6, c]], "label": str(c)} for c in channels]
            boxes = ax.bxp(stats, showfliers=True, patch_artist=True, widths=0.7,
                           flierprops={"markersize": 2, "marker": "."})
            for box, c in zip(boxes["boxes"], channels):
                box.set_facecolor("tab:red" if c in worst else "tab:blue")
                box.set_alpha(0.8 if c in worst else 0.4)
            ax.set_xticks(range(1, len(channels) + 1),
                          [str(c) if c in worst else "" for c in channels], rotation=90, fontsize=7)
            ax.set_title(f"{title} - range ratio {summary['range_ratio']}, max outlier score "
                         f"{summary['max_outlier_score']}", fontsize=9)
            ax.set_ylabel("activation")
        sqnr = report["linears"][name]["sqnr_db"]
        fig.suptitle(f"#{rank} {name} ({report['linears'][name]['scheme']}, SQNR {sqnr} dB): input channels "
                     f"(box p25-p75, whiskers p1-p99, dots min/max; red = worst channels)", fontsize=10)
        fig.tight_layout()
        file = f"boxplot-{rank:02d}-{name.replace('model.layers.', 'L').replace('.', '_')}.png"
        fig.savefig(out / file, dpi=90)
        plt.close(fig)
        written.append(file)
    return written


def _shown_channels(q: np.ndarray, info: dict) -> list[int]:
    c = q.shape[1]
    if c <= BOX_MAX_CHANNELS:
        return list(range(c))
    worst = [w["channel"] for w in info["worst_channels"]]
    absmax = np.maximum(np.abs(q[0]), np.abs(q[-1]))
    top = [int(x) for x in np.argsort(-absmax)[: BOX_MAX_CHANNELS // 2]]
    spaced = [int(x) for x in np.linspace(0, c - 1, BOX_MAX_CHANNELS // 2).round()]
    return sorted(set(worst) | set(top) | set(spaced))


# ------------------------------------------------------------------------------------------------ markdown
def render_md(report: dict, top: int = 10) -> str:
    est = report["estimate"]
    cal = report["calibration"]
    lines = [f"# Quantization-loss analysis: {report['recipe']}", "",
             f"Model: `{report['model']}`  ",
             f"Calibration: `{cal['source']}`, {cal['samples']} x {cal['seq_len']} tokens ({cal['tokens']} tokens)  ",
             f"Estimated loss L (sum over slots of output NSR): **{est['recipe']}** ({est['recipe_db']} dB); "
             f"with every candidate in {report['safer']}: {est['all_safer']}", "",
             "Definitions:", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["definitions"].items()]
    lines += ["", f"## Most sensitive linears (top {top} of {len(report['ranking'])} slots, lowest SQNR first)", "",
              "| rank | linear | scheme | SQNR dB | cosine | NSR | in safer scheme, SQNR dB |",
              "|---|---|---|---|---|---|---|"]
    for i, row in enumerate(report["ranking"][:top], 1):
        lines.append(f"| {i} | `{row['slot']}` | {row['scheme']} | {row['sqnr_db']} | {row['cosine']} | "
                     f"{row['nsr']} | {row.get('safer_sqnr_db', '')} |")
    lines += ["", f"## Units that can move to {report['safer']} (largest gain first)", "",
              "| unit | scheme | NSR | NSR in safer | gain |", "|---|---|---|---|---|"]
    for u in report["units"]:
        lines.append(f"| `{u['unit']}` | {u['scheme']} | {u['nsr']} | {u['safer_nsr']} | {u['gain']} |")
    lines += ["", "## Decoder layers", "",
              "| layer | SQNR dB | cosine | residual-branch SQNR dB | its cosine | cumulative SQNR dB | "
              "cumulative cosine | worst linear | its SQNR dB |", "|---|---|---|---|---|---|---|---|---|"]
    for layer in report["layers"]:
        lines.append(f"| {layer['layer']} | {layer['sqnr_db']} | {layer['cosine']} | {layer['delta_sqnr_db']} | "
                     f"{layer['delta_cosine']} | {layer['cumulative_sqnr_db']} | {layer['cumulative_cosine']} | "
                     f"`{layer['worst_linear']}` | {layer['worst_linear_sqnr_db']} |")
    lines += ["", "## Input outliers of the most sensitive linears", ""]
    shown = 0
    for row in report["ranking"]:
        info = report["linears"].get(row["slot"], {}).get("input")
        if not info:
            continue
        lines.append(f"### `{row['slot']}` (SQNR {row['sqnr_db']} dB)")
        lines.append("")
        for label, block in (("before smoothing", info), ("after smoothing", info.get("after"))):
            if not block:
                continue
            worst = ", ".join(f"{w['channel']} ({w['outlier_score']}; max {w['absmax']}, mean {w['mean']}, "
                              f"std {w['std']})" for w in block["worst_channels"])
            lines.append(f"- {label}: range ratio {block['range_ratio']}, max outlier score "
                         f"{block['max_outlier_score']}, max peak/std {block['max_peak_over_std']}; worst channels "
                         f"(outlier score): {worst}")
        if "after" not in info:
            lines.append("- no smoothing or shift in this recipe for this linear")
        lines.append("")
        shown += 1
        if shown >= min(top, 6):
            break
    prop = report.get("proposal")
    if prop:
        lines += ["## Proposed recipe", "",
                  f"Budget {prop['budget']} = {prop['budget_value']} (unit of L); estimate {prop['start']} -> "
                  f"{prop['estimate']} ({prop['estimate_db']} dB); {'fits' if prop['fits'] else 'does NOT fit'}"
                  + (f"; measured on the proposal: {prop['measured_estimate']}" if "measured_estimate" in prop
                     else ""), ""]
        if prop.get("note"):
            lines += [f"**Note:** {prop['note']}", ""]
        if prop["steps"]:
            lines += ["| step | unit | from | to | gain | estimate after |", "|---|---|---|---|---|---|"]
            lines += [f"| {s['step']} | `{s['unit']}` | {s['from']} | {s['to']} | {s['gain']} | "
                      f"{s['estimate_after']} |" for s in prop["steps"]]
            lines += ["", f"`{prop['recipe_file']}`:", "", "```yaml", prop["recipe_yaml"].rstrip(), "```", ""]
    if report.get("plots"):
        lines += ["## Box plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines) + "\n"
