"""C-Eval report folder: ``ceval.json``, ``ceval.md``, the plots (``categories.png``, ``subjects.png``,
``kl.png``), ``predictions.jsonl``, and the summary printed on stdout. The report dict is ``ceval_stats``'s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from goldstick.evaluation.ceval_data import CATEGORIES, HARD, LETTERS, SUBJECTS
from goldstick.evaluation.ceval_scoring import ModelRun


# ---- writing -----------------------------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_report(report: dict, runs: Sequence[ModelRun], out: Path, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = []
    if plots:
        try:
            report["plots"] = write_plots(report, out)
        except ImportError as exc:
            report["notes"].append(f"plots skipped: {exc}")
    write_predictions(runs, out / "predictions.jsonl")
    write_json(out / "ceval.json", report)
    (out / "ceval.md").write_text(render_markdown(report), encoding="utf-8")


def write_predictions(runs: Sequence[ModelRun], path: Path) -> None:
    probs = {r.label: r.probabilities for r in runs}
    preds = {r.label: r.predictions for r in runs}
    with open(path, "w", encoding="utf-8") as handle:
        for i, q in enumerate(runs[0].questions):
            record = {"subject": q.subject, "id": q.id, "answer": q.answer,
                      "predictions": {k: LETTERS[int(v[i])] if v[i] >= 0 else None for k, v in preds.items()},
                      "probabilities": {k: [round(float(x), 5) for x in v[i]] for k, v in probs.items()}}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _fmt(x, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ci(ci) -> str:
    return "—" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _kl(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def has_kl(comparison: dict) -> bool:
    """Does the comparison have a KL divergence (both models scored by logits or logprobs)?"""
    return comparison["kl"].get("mean") is not None


def kl_sentence(kl: dict) -> str:
    if kl.get("mean") is None:
        return "not measured (no question where both models have four finite letter log-probabilities)"
    return (f"mean {kl['mean']:.3g}, median {kl['median']:.3g}, p95 {kl['p95']:.3g}, max {kl['max']:.3g} nats"
            + (f" over {kl['questions']} questions" if "questions" in kl else ""))


def endpoint_lines(report: dict) -> list[str]:
    """The "Served models" section of ceval.md: how each endpoint was asked, and its counts."""
    lines = []
    for label, m in report["models"].items():
        e = m.get("endpoint")
        if not e:
            continue
        lines.append(f"- `{label}`: `{e['url']}`, served model `{e['served_model']}`, scoring `{e['scoring']}`, "
                     f"prompts as {e['prompts']}; {e['answers_fetched']} answer(s) fetched with "
                     f"{e['http_requests']} HTTP request(s) ({e['retries']} retries, {e['requests_per_second']} "
                     f"req/s, concurrency {e['concurrency']}), {e['answers_from_cache']} from the answer cache")
        if e["scoring"] == "logprobs":
            lines.append(f"  - letters: top {e['top_logprobs']} logprobs of the first token, forms "
                         f"{', '.join(repr(f) for f in e['letter_forms'])}; absent from the top "
                         f"{e['top_logprobs']}: {e['letter_scores_missing']} letter score(s) in "
                         f"{e['questions_with_missing_letters']} question(s) (-inf); scored on spaced letters: "
                         f"{e['questions_scored_on_spaced_letters']}; letter fallback `{e['letter_fallback']}` "
                         f"({e['echo_requests']} echo request(s))")
        else:
            lines.append(f"  - generation through `{e['api']}` with a budget of {e['max_tokens']} tokens: "
                         f"{e['unparsed']} reply(ies) without a parsable answer (counted wrong), "
                         f"{e['budget_exhausted']} reached the budget")
            for x in e.get("unparsed_examples", []):
                tail = x["reply_end"].replace("\n", " ").replace("`", "'").strip()
                lines.append(f"  - unparsed `{x['question']}`: " + (f"`…{tail}`" if tail else "(empty reply)"))
    return lines


def no_loss_note(comparison: dict) -> str | None:
    """The sentence that replaces the "most damaged subjects" list when no subject lost accuracy (else None)."""
    deltas = [v["delta"] for v in comparison["subjects"].values()]
    if any(d < 0 for d in deltas):
        return None
    gained = sum(d > 0 for d in deltas)
    if not gained:
        return f"No subject lost accuracy: Δ = 0 in all {len(deltas)} subjects"
    return f"No subject lost accuracy: Δ ≥ 0 in all {len(deltas)} subjects ({gained} gained)"


PLOT_CAPTIONS = {
    "categories.png": "accuracy per category, Hard and overall (95% bootstrap CI), and Δ per group (paired CI)",
    "subjects.png": "the most damaged subjects (Δ < 0) with their paired CIs",
    "kl.png": "KL(float‖quantized) of the A–D distribution per category and per subject (mean over questions): "
              "it moves even when no answer changes",
}


def render_markdown(report: dict) -> str:
    st = report["settings"]
    labels = list(report["models"])
    lines = ["# C-Eval accuracy report", ""]
    for label, info in report.get("overlap", {}).items():
        if info.get("status") == "overlap":
            lines += ["> **WARNING: CALIBRATION / EVALUATION OVERLAP** for `" + label + "`: "
                      + "; ".join(filter(None, [
                          f"calibration used the evaluated file(s) {', '.join(info['same_file'][:3])}"
                          if info.get("same_file") else "",
                          f"{info['question_matches']} evaluated question(s) appear in the calibration text "
                          f"(e.g. {', '.join(info['examples'][:3])})" if info.get("question_matches") else "",
                          *[n for n in info.get("notes", []) if "C-Eval" in n]]))
                      + ". Its score is optimistic.", ""]
    gate = report.get("gate")
    if gate:
        verdict = "PASSED" if gate["passed"] else "FAILED"
        lines += [f"**Gate: {verdict}** (allowed drop {gate['allowed_drop']} points, rule `{gate['rule']}`: "
                  f"{gate['rule_text']})", ""]
        for label, v in gate["candidates"].items():
            lines.append(f"- `{label}`: drop {_fmt(v['drop_points'])} points, CI {_ci(v['drop_ci'])}: "
                         f"{'pass' if v['passed'] else 'FAIL'} ({v['reason']})")
        lines.append("")
    lines += [f"Data `{st['data']}`, split `{st['split']}`, {st['shots']}-shot, {st['n_subjects']} subjects, "
              f"{st['n_questions']} questions"
              + (f" (first {st['limit_per_subject']} per subject)" if st.get("limit_per_subject") else "") + ".  ",
              f"Prompt: {st['prompt']}. Scoring: {st['scoring']}.  ",
              f"Overall = {st['overall_definition']}; Δ = {st['delta_definition']}. Confidence intervals: "
              f"{int(st['bootstrap']['confidence'] * 100)}% {st['bootstrap']['method']}, "
              f"{st['bootstrap']['samples']} resamples, seed {st['bootstrap']['seed']}.", ""]
    lines += ["## Accuracy (points)", "", "| model | overall | question-weighted | "
              + " | ".join(CATEGORIES) + " | Hard | seconds |", "|---" * (5 + len(CATEGORIES)) + "|"]
    for label in labels:
        m = report["models"][label]
        cats = " | ".join(_fmt(m["categories"].get(c)) for c in CATEGORIES)
        lines.append(f"| `{label}` | **{_fmt(m['overall'])}** | {_fmt(m['overall_question_weighted'])} | {cats} | "
                     f"{_fmt(m['hard'])} | {m['seconds']} |")
    lines.append("")
    for label, c in report["comparisons"].items():
        fl, mc, kl = c["flips"], c["mcnemar"], c["kl"]
        lines += [f"## `{label}` against `{c['float']}`", "",
                  f"- Δ overall: **{c['delta_points']:+.2f}** points, CI {_ci(c['delta_ci'])}; question-weighted "
                  f"{c['delta_question_weighted']:+.2f}, CI {_ci(c['delta_question_weighted_ci'])}",
                  f"- answers changed: {fl['changed']} of {st['n_questions']} (flip rate {c['flip_rate']:.4f}): "
                  f"correct→wrong {fl['correct_to_wrong']}, wrong→correct {fl['wrong_to_correct']}, "
                  f"wrong→other wrong {fl['wrong_to_other_wrong']}",
                  f"- McNemar (b={mc['b']}, c={mc['c']}): exact p = {mc['p_value']:.4g}, χ² (cc) = "
                  f"{mc['statistic']:.3f}",
                  f"- KL(float‖quantized) of the A–D distribution: {kl_sentence(kl)}", "",
                  "| group | float | quantized | Δ | CI | KL mean (nats) |", "|---|---|---|---|---|---|"]
        for cat, v in c["categories"].items():
            lines.append(f"| {cat} ({v['subjects']}) | {_fmt(v['float'])} | {_fmt(v['quantized'])} | "
                         f"{v['delta']:+.2f} | {_ci(v['ci'])} | {_kl(v.get('kl_mean'))} |")
        if c["hard"]:
            v = c["hard"]
            lines.append(f"| Hard ({v['subjects']}) | {_fmt(v['float'])} | {_fmt(v['quantized'])} | "
                         f"{v['delta']:+.2f} | {_ci(v['ci'])} | {_kl(v.get('kl_mean'))} |")
        note = no_loss_note(c)
        if note:
            lines += ["", f"Most damaged subjects: none. {note}."]
        else:
            damaged = [s for s in c["most_damaged"] if c["subjects"][s]["delta"] < 0][:5]
            lines += ["", "Most damaged subjects: " + ", ".join(
                f"`{s}` ({c['subjects'][s]['delta']:+.1f})" for s in damaged)]
        if has_kl(c):
            by_kl = sorted(c["subjects"], key=lambda s: (-(c["subjects"][s].get("kl_mean") or 0.0), s))[:5]
            lines += ["", "Largest A–D KL (subjects, nats): " + ", ".join(
                f"`{s}` ({_kl(c['subjects'][s].get('kl_mean'))})" for s in by_kl)
                + ("; see `kl.png`" if "kl.png" in report.get("plots", []) else "")]
        lines.append("")
    if report["comparisons"]:
        lines += ["## Per subject", "", "| subject | category | n | " + " | ".join(f"`{x}`" for x in labels)
                  + " | " + " | ".join(f"Δ `{x}` (CI)" for x in report["comparisons"])
                  + " | " + " | ".join(f"KL `{x}`" for x in report["comparisons"]) + " |",
                  "|---" * (3 + len(labels) + 2 * len(report["comparisons"])) + "|"]
    else:
        lines += ["## Per subject", "", "| subject | category | n | " + " | ".join(f"`{x}`" for x in labels) + " |",
                  "|---" * (3 + len(labels)) + "|"]
    for s in st["subjects"]:
        n = st["questions_per_subject"][s]
        accs = " | ".join(_fmt(report["models"][x]["subjects"][s]) for x in labels)
        deltas = "".join(f" | {c['subjects'][s]['delta']:+.1f} {_ci(c['subjects'][s]['ci'])}"
                         for c in report["comparisons"].values())
        deltas += "".join(f" | {_kl(c['subjects'][s].get('kl_mean'))}" for c in report["comparisons"].values())
        hard = " (Hard)" if s in HARD else ""
        lines.append(f"| {s}{hard} | {SUBJECTS[s].category} | {n} | {accs}{deltas} |")
    lines.append("")
    served = endpoint_lines(report)
    if served:
        lines += ["## Served models", ""] + served + [""]
    overlap = report.get("overlap", {})
    if overlap:
        lines += ["## Calibration overlap check", ""]
        for label, info in overlap.items():
            src = (info.get("calibration") or {}).get("source")
            lines.append(f"- `{label}`: **{info['status']}** (calibration `{src}`; same file: "
                         f"{len(info.get('same_file', []))}, evaluated questions found: "
                         f"{info.get('question_matches', 0)})"
                         + ("; " + "; ".join(info["notes"]) if info.get("notes") else ""))
        lines.append("")
    if report.get("plots"):
        lines += ["## Plots", ""]
        for p in report["plots"]:
            lines += [f"![{p}]({p})", "", f"`{p}`: {PLOT_CAPTIONS.get(p, p)}.", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def _model_colors(report: dict) -> dict[str, str]:
    """One colour per model, the same in every plot (a comparison takes its quantized model's colour)."""
    return {label: f"C{i % 10}" for i, label in enumerate(report["models"])}


def _group_names(report: dict) -> list[str]:
    first = report["models"][next(iter(report["models"]))]
    groups = [c for c in CATEGORIES if c in first["categories"]]
    return groups + (["Hard"] if first["hard"] is not None else []) + ["Overall"]


def _note(ax, text: str) -> None:
    """Write ``text`` in the middle of an empty axes (no bars, no ticks)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10, wrap=True,
            bbox={"boxstyle": "round", "facecolor": "whitesmoke", "edgecolor": "grey"})
    ax.set_xticks([])
    ax.set_yticks([])


def plot_categories(report: dict):
    """Accuracy per category / Hard / overall with CIs and, with comparisons, Δ per group: a matplotlib Figure.

    The legend sits above both panels (outside the axes), so it never covers a bar.
    """
    from matplotlib.figure import Figure

    labels = list(report["models"])
    colors = _model_colors(report)
    names = _group_names(report)
    comps = report["comparisons"]

    def acc(m, g):
        return m["overall"] if g == "Overall" else m["hard"] if g == "Hard" else m["categories"][g]

    def acc_ci(m, g):
        ci = m["ci"]
        return ci["overall"] if g == "Overall" else ci.get("hard") if g == "Hard" else ci["categories"][g]

    fig = Figure(figsize=(13 if comps else 7, 5), layout="constrained")
    axes = fig.subplots(1, 2 if comps else 1, squeeze=False)[0]
    ax = axes[0]
    width = 0.8 / len(labels)
    x = np.arange(len(names))
    for i, label in enumerate(labels):
        m = report["models"][label]
        vals = np.array([acc(m, g) for g in names])
        cis = np.array([acc_ci(m, g) for g in names])
        err = np.abs(np.stack([vals - cis[:, 0], cis[:, 1] - vals]))
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=label,
               color=colors[label])
    ax.axhline(25, color="grey", lw=0.8, ls="--", label="chance (25)")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("accuracy (points)")
    ax.set_title("C-Eval accuracy (95% bootstrap CI)")
    if comps:
        ax = axes[1]
        width = 0.8 / len(comps)
        all_zero = True
        for i, (label, c) in enumerate(comps.items()):
            blocks = [c["categories"][g] if g in c["categories"] else c["hard"] for g in names[:-1]]
            vals = np.array([b["delta"] for b in blocks] + [c["delta_points"]])
            cis = np.array([b["ci"] for b in blocks] + [c["delta_ci"]])
            all_zero &= bool(np.all(vals == 0) and np.all(cis == 0))
            err = np.abs(np.stack([vals - cis[:, 0], cis[:, 1] - vals]))
            ax.bar(x + (i - (len(comps) - 1) / 2) * width, vals, width, yerr=err, capsize=3,
                   color=colors.get(label))
        gate = report.get("gate")
        if gate:
            ax.axhline(-gate["allowed_drop"], color="red", lw=0.8, ls="--", label="allowed drop")
        ax.axhline(0, color="black", lw=0.8)
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, -1.0), max(high, 1.0))
        ax.set_xticks(x, names, rotation=20)
        ax.set_ylabel("Δ points (quantized − float)")
        ax.set_title("Accuracy change per group (paired bootstrap CI)")
        if all_zero:
            moved = any((c["kl"]["mean"] or 0.0) > 0 for c in comps.values())
            text = "Δ = 0 in every group, CI [0, 0]\n" + (
                "the A–D distributions still moved: see the KL divergence in kl.png" if moved
                else "and KL = 0: the A–D distributions are identical")
            ax.text(0.5, 0.35, text, transform=ax.transAxes, ha="center", va="center", fontsize=9,
                    bbox={"boxstyle": "round", "facecolor": "whitesmoke", "edgecolor": "grey"})
    handles = {}
    for a in axes:
        for h, t in zip(*a.get_legend_handles_labels()):
            handles.setdefault(t, h)
    handles = {t: handles[t] for t in sorted(handles, key=lambda t: t not in colors)}  # the models first
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=min(len(handles), 6),
               fontsize=9, frameon=False)
    return fig


def plot_subjects(report: dict):
    """The most damaged subjects (Δ < 0 only) per comparison; a note instead of bars when none lost accuracy."""
    from matplotlib.figure import Figure

    comps = report["comparisons"]
    colors = _model_colors(report)
    damaged = {label: [s for s in c["most_damaged"] if c["subjects"][s]["delta"] < 0][::-1]
               for label, c in comps.items()}
    rows = max([len(v) for v in damaged.values()] + [3])
    fig = Figure(figsize=(7 * len(comps), 0.45 * rows + 1.8), layout="constrained")
    axes = fig.subplots(1, len(comps), squeeze=False)[0]
    for ax, (label, c) in zip(axes, comps.items()):
        ax.set_title(f"Most damaged subjects: {label}")
        worst = damaged[label]
        if not worst:
            _note(ax, no_loss_note(c) or "No subject lost accuracy")
            continue
        vals = np.array([c["subjects"][s]["delta"] for s in worst])
        cis = np.array([c["subjects"][s]["ci"] for s in worst])
        err = np.abs(np.stack([vals - cis[:, 0], cis[:, 1] - vals]))
        ax.barh(np.arange(len(worst)), vals, xerr=err, capsize=3, color=colors.get(label, "tab:red"))
        ax.set_yticks(np.arange(len(worst)), [f"{s} (n={c['subjects'][s]['n']}, "
                                              f"changed {c['subjects'][s]['changed']})" for s in worst],
                      fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        low, high = ax.get_xlim()
        ax.set_xlim(min(low, -1.0), max(high, 1.0))
        lost = sum(v["delta"] < 0 for v in c["subjects"].values())
        kept = len(c["subjects"]) - lost
        ax.set_xlabel("Δ points (quantized − float)"
                      + (f"; {lost - len(worst)} more subject(s) lost accuracy" if lost > len(worst) else "")
                      + (f"; {kept} subject(s) did not" if kept else ""))
    return fig


def _kl_axis(ax, values: np.ndarray, horizontal: bool) -> bool:
    """Log scale for positive KL values (symlog when some are 0); False when every value is 0 (nothing to draw)."""
    positive = values[values > 0]
    if not positive.size:
        return False
    if positive.size == values.size:
        (ax.set_xscale if horizontal else ax.set_yscale)("log")
    else:
        (ax.set_xscale if horizontal else ax.set_yscale)("symlog", linthresh=float(positive.min()))
    return True


def _kl_floor(ax, values: np.ndarray, horizontal: bool) -> None:
    """On a log axis, start a decade below the smallest value (call after drawing), so that its bar shows."""
    positive = values[values > 0]
    if positive.size == values.size and positive.size:
        low = 10 ** (np.floor(np.log10(positive.min())) - 1)
        (ax.set_xlim if horizontal else ax.set_ylim)(low, None)


def plot_kl(report: dict):
    """KL(float || quantized) of the A-D distribution per category / Hard / overall and per subject: a Figure.

    Per-subject bars are sorted by KL (largest at the top). Every value is the mean over the group's questions.
    """
    from matplotlib.figure import Figure

    comps = {label: c for label, c in report["comparisons"].items() if has_kl(c)}
    colors = _model_colors(report)
    names = _group_names(report)
    first = next(iter(comps.values()))
    subjects = sorted(first["subjects"], key=lambda s: (-max((c["subjects"][s].get("kl_mean") or 0.0)
                                                              for c in comps.values()), s))[::-1]
    n_bars = len(subjects) * max(1, len(comps))
    fig = Figure(figsize=(11, 3.8 + 0.22 * n_bars + 1.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3.8, 0.22 * n_bars + 1.0])
    width = 0.8 / len(comps)

    def group_kl(c, g):
        if g == "Overall":
            return c["kl"]["mean"]
        block = c["hard"] if g == "Hard" else c["categories"].get(g)
        return (block or {}).get("kl_mean")

    x = np.arange(len(names))
    vals = np.array([[group_kl(c, g) or 0.0 for g in names] for c in comps.values()], dtype=float)
    top.set_title("KL(float‖quantized) of the A–D distribution per group (mean over questions)")
    if _kl_axis(top, vals, horizontal=False):
        for i, label in enumerate(comps):
            pos = x + (i - (len(comps) - 1) / 2) * width
            top.bar(pos, vals[i], width, label=label, color=colors.get(label))
            for px, v in zip(pos, vals[i]):
                top.annotate(f"{v:.2g}", (px, v), ha="center", va="bottom", fontsize=7,
                             xytext=(0, 2), textcoords="offset points")
        top.set_xticks(x, names, rotation=20)
        top.set_ylabel("KL (nats)")
        top.set_ylim(None, top.get_ylim()[1] * 2)  # room for the value labels
        _kl_floor(top, vals, horizontal=False)
    else:
        _note(top, "KL = 0 in every group: the A–D distributions are identical")

    y = np.arange(len(subjects))
    height = 0.8 / len(comps)
    svals = np.array([[c["subjects"][s].get("kl_mean") or 0.0 for s in subjects] for c in comps.values()],
                     dtype=float)
    bottom.set_title("KL(float‖quantized) of the A–D distribution per subject (mean over questions)")
    if _kl_axis(bottom, svals, horizontal=True):
        for i, label in enumerate(comps):
            pos = y + ((len(comps) - 1) / 2 - i) * height  # the first comparison on top, as in the legend
            bottom.barh(pos, svals[i], height, label=label, color=colors.get(label))
            for py, v in zip(pos, svals[i]):
                bottom.annotate(f"{v:.2g}", (v, py), ha="left", va="center", fontsize=7,
                                xytext=(2, 0), textcoords="offset points")
        bottom.set_yticks(y, [f"{s} ({SUBJECTS[s].category})" for s in subjects], fontsize=8)
        bottom.set_ylim(-0.6, len(subjects) - 0.4)
        bottom.set_xlabel("KL (nats)")
        bottom.set_xlim(None, bottom.get_xlim()[1] * 2)
        _kl_floor(bottom, svals, horizontal=True)
    else:
        _note(bottom, "KL = 0 in every subject: the A–D distributions are identical")
    handles = {}
    for a in (top, bottom):
        for h, t in zip(*a.get_legend_handles_labels()):
            handles.setdefault(t, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside upper center",
                   ncols=min(len(handles), 6), fontsize=9, frameon=False)
    return fig


def plot_figures(report: dict) -> dict:
    """file name -> matplotlib Figure, for every plot of the report (subjects only with a comparison, KL only with
    a comparison that has one)."""
    figures = {"categories.png": plot_categories(report)}
    if report["comparisons"]:
        figures["subjects.png"] = plot_subjects(report)
        if any(has_kl(c) for c in report["comparisons"].values()):
            figures["kl.png"] = plot_kl(report)
    return figures


def write_plots(report: dict, out: Path) -> list[str]:
    written = []
    for name, fig in plot_figures(report).items():
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        written.append(name)
    return written


def print_summary(report: dict, out: str | Path | None = None) -> None:
    for label, m in report["models"].items():
        print(f"{label}: overall {m['overall']:.2f} (question-weighted {m['overall_question_weighted']:.2f}) "
              f"over {m['n_subjects']} subjects / {m['n_questions']} questions, {m['seconds']}s")
    for label, c in report["comparisons"].items():
        print(f"{label} vs {c['float']}: delta {c['delta_points']:+.2f} points, CI {_ci(c['delta_ci'])}, "
              f"flip rate {c['flip_rate']:.4f} (correct->wrong {c['flips']['correct_to_wrong']}, wrong->correct "
              f"{c['flips']['wrong_to_correct']}), McNemar p {c['mcnemar']['p_value']:.4g}, KL mean "
              f"{_kl(c['kl']['mean'])}")
    for label, info in report.get("overlap", {}).items():
        if info.get("status") == "overlap":
            print(f"WARNING: {label}: calibration data overlaps the evaluated questions (see ceval.md)")
    gate = report.get("gate")
    if gate:
        print(f"gate ({gate['rule']}, allowed drop {gate['allowed_drop']}): "
              f"{'PASSED' if gate['passed'] else 'FAILED'}")
        for label, v in gate["candidates"].items():
            print(f"  {label}: {v['reason']}")
    if out:
        print(f"report: {Path(out) / 'ceval.md'}  ({Path(out) / 'ceval.json'})")
