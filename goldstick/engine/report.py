"""What a quantized checkpoint carries besides its tensors: the report (report.md rendered from report.json's
content) and the metadata both paths write (config.json and the description through the checkpoint writer, the
tokenizer files, recipe.yaml)."""

from __future__ import annotations

from pathlib import Path

from goldstick.io.export import copy_side_files, write_text_atomic
from goldstick.quant.plan import Plan
from goldstick.quant.recipe import Recipe


def render_report_md(report: dict) -> str:
    """report.md of the layer path: the schemes, each layer's output error, each linear's scheme, rule, error,
    activation range and transform, the routed tokens per expert."""
    lines = [f"# Quantization report: {report['recipe']}", "",
             f"Model: `{report['model']}`  ",
             (f"Calibration: `{report['calibration']['source']}`, {report['calibration']['samples']} samples x "
              f"{report['calibration']['seq_len']} tokens ({report['calibration']['tokens']} tokens)"), "",
             *[f"**Note:** {note}  " for note in report["calibration"].get("notes", [])],
             "## Schemes", "", "| scheme | linears |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["plan"]["counts"].items()]
    lines += ["", "## Layers (output error on calibration data)", "",
              "| layer | output SQNR dB | layer-delta SQNR dB | worst linear | its SQNR dB | measured on |",
              "|---|---|---|---|---|---|"]
    for layer in report["layers"]:
        scored = [(v["sqnr_db"], k) for k, v in layer["linears"].items() if isinstance(v.get("sqnr_db"), float)]
        worst = min(scored) if scored else ("-", "-")
        tokens = f"{layer['sqnr_tokens']} tokens" if "sqnr_tokens" in layer else ""  # absent from older reports
        lines.append(f"| {layer['layer']} | {layer['sqnr_db']} | {layer['delta_sqnr_db']} | `{worst[1]}` | {worst[0]} "
                     f"| {tokens} |")
    lines += ["", "## Linears", "", "| linear | scheme | rule | SQNR dB | act scale / zp | transform |",
              "|---|---|---|---|---|---|"]
    for layer in report["layers"]:
        for name, v in layer["linears"].items():
            act = v.get("activation")
            act_s = f"{act['scale']} / {act['zero_point']}" if act else ""
            t = v.get("transform")
            t_s = ""
            if t:
                t_s = (f"folded into {t['folded_into']}; " if t["folded_into"] else "explicit; ") + \
                    f"max scale {t['smooth_scale_max']}, shift absmax {t['shift_absmax']}"
                if t.get("alpha") is not None:
                    t_s += f", alpha {t['alpha']}"
                if t.get("threshold") is not None:
                    t_s += f", threshold {t['threshold']}"
            lines.append(f"| `{name}` | {v['scheme']} | {v['chosen_by']} | {v.get('sqnr_db', '')} | {act_s} | {t_s} |")
        if layer.get("expert_tokens") is not None:
            lines.append("")
            lines.append(f"Layer {layer['layer']} routed tokens per expert: {layer['expert_tokens']}"
                         + (f"; experts with no token (statistics from the layer's MoE input sample): "
                            f"{layer['experts_without_tokens']}" if layer.get("experts_without_tokens") else ""))
            lines.append("")
    return "\n".join(lines) + "\n"



def render_streamed_report_md(report: dict) -> str:
    """report.md of the streaming path: the schemes only (no calibration, no per-layer error measurement)."""
    lines = [f"# Quantization report: {report['recipe']}", "",
             f"Model: `{report['model']}`  ",
             "Path: streamed (data-free recipe: no calibration data, no per-layer error measurement)", "",
             "## Schemes", "", "| scheme | linears |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["plan"]["counts"].items()]
    return "\n".join(lines) + "\n"


def write_checkpoint_metadata(writer, cfg, recipe: Recipe, plan: Plan, source: Path, out: Path) -> None:
    """What every quantized checkpoint carries besides its tensors (both the layer and the streaming path);
    ``recipe`` as recorded (goldstick.engine.pipeline.recorded_recipe); ``writer`` the checkpoint's
    goldstick.io.export.CheckpointWriter."""
    writer.write_config(cfg.to_dict(), recipe.name, plan.counts_by_label())
    copy_side_files(source, out)
    write_text_atomic(out / "recipe.yaml", recipe.to_yaml())
