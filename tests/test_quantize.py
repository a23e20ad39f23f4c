"""The quantization engine end to end on the embedded default model: plan, calibration, schemes, resume, export."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from folders import digests

import goldstick
from goldstick.cli import main as cli
from goldstick.engine.calibration import CalibrationError, load_calibration
from goldstick.engine.pipeline import QuantizeError, quantize
from goldstick.io.checkpoint import CheckpointReader
from goldstick.io.writer import ShardedWriter
from goldstick.model.tokenizer import load_tokenizer
from goldstick.quant.recipe import load_recipe
from goldstick.testing.make_model import default_model_path

FAST = dict(calib_samples=8, calib_seq_len=64, progress=False)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return default_model_path()


def copy_checkpoint(src: Path, dst: Path, edit=None, layer_map: dict[int, int] | None = None,
                    config_edit=None) -> Path:
    """A copy of a checkpoint with tensors edited, or with decoder layers duplicated (new layer -> source layer)."""
    reader = CheckpointReader(src)
    dst.mkdir(parents=True)
    with ShardedWriter(dst, max_shard_bytes=8 << 20) as writer:
        cfg = reader.config
        for name in reader.names():
            parts = name.split(".")
            is_layer = name.startswith("model.layers.") and int(parts[2]) < cfg.num_hidden_layers
            if layer_map is not None and is_layer:
                continue
            if layer_map is not None and name.startswith("model.layers."):  # MTP: renumber after the new layers
                parts[2] = str(int(parts[2]) - cfg.num_hidden_layers + len(layer_map))
            array = reader.read_raw(name)
            writer.add(".".join(parts), edit(name, array) if edit else array)
            if reader.has(name + "_scale_inv"):
                writer.add(".".join(parts) + "_scale_inv", reader.read_raw(name + "_scale_inv"))
        for new, old in (layer_map or {}).items():
            for name in reader.layer_tensor_names(old):
                writer.add(name.replace(f"model.layers.{old}.", f"model.layers.{new}.", 1), reader.read_raw(name))
                if reader.has(name + "_scale_inv"):
                    writer.add(name.replace(f"model.layers.{old}.", f"model.layers.{new}.", 1) + "_scale_inv",
                               reader.read_raw(name + "_scale_inv"))
    config = json.loads((src / "config.json").read_text())
    if layer_map is not None:
        config["num_hidden_layers"] = len(layer_map)
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(src / extra, dst / extra)
    return dst


# ---- the plan ----------------------------------------------------------------------------------------------------
def test_dry_run_prints_the_plan_and_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli(["quantize", "deepseek-r1-w8a8-mixed", "--model", str(tiny), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "w8a8-static+osplus" in text and "w8a8-dynamic" in text and "float" in text
    assert "model.layers.{1..3}.mlp.experts.{0..15}.gate_proj" in text
    assert not out.exists()


# ---- end to end ------------------------------------------------------------------------------------------------
def test_python_api_quantizes_and_the_export_reproduces_the_engine(tiny, tmp_path):
    recipe = load_recipe("deepseek-r1-w8a8-mixed")
    result = quantize(tiny, recipe, out=tmp_path / "q", **FAST)
    out = result.out
    for name in ("config.json", "model.safetensors.index.json", "quant_model_description.json", "recipe.yaml",
                 "report.json", "report.md", "manifest.json", "tokenizer.json"):
        assert (out / name).exists(), name
    assert load_recipe(out / "recipe.yaml") == recipe.with_calibration(  # with the calibration the run used
        data="calibration/mixed-zh-en.jsonl", samples=FAST["calib_samples"], seq_len=FAST["calib_seq_len"])
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert set(manifest) == set(digests(out)) - {"manifest.json"}
    assert all(manifest[k]["sha256"] == v for k, v in digests(out).items() if k != "manifest.json")
    assert not (out / ".goldstick-work").exists()

    report = result.report
    assert report["plan"]["counts"] == result.plan.counts_by_label()
    q_a = report["layers"][0]["linears"]["model.layers.0.self_attn.q_a_proj"]
    assert q_a["scheme"] == "w8a8-static+osplus" and q_a["transform"]["folded_into"].endswith("input_layernorm")
    assert np.isfinite(q_a["sqnr_db"]) and q_a["sqnr_db"] > 20
    assert report["layers"][1]["expert_tokens"] and sum(report["layers"][1]["expert_tokens"]) > 0

    # the exported checkpoint, loaded back, gives exactly the engine's quantized logits
    tok = load_tokenizer(tiny)
    batch = load_calibration("calibration/mixed-zh-en.jsonl", tok.tokenizer, samples=8, seq_len=64,
                             bos_id=tok.bos_id).batches[0]
    from mindspore import Tensor

    logits = goldstick.load_model(out)(Tensor(batch)).asnumpy()
    assert np.abs(logits - result.final_logits).max() <= 1e-5 * np.abs(result.final_logits).max()
    # the MTP layer is passed through; the FP8 config is gone; our metadata is there
    reader = CheckpointReader(out)
    assert reader.mtp_tensor_names()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "ascend"  # the default format: MindFormers' ascend mode


def test_output_folder_must_be_new(tiny, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "something").write_text("x")
    with pytest.raises(QuantizeError, match="not empty"):
        quantize(tiny, "deepseek-r1-w8a16", out=tmp_path / "q", **FAST)


def test_resume_gives_the_same_bytes_as_one_run(tiny, tmp_path):
    once = quantize(tiny, "deepseek-r1-w8a8-smoothquant", out=tmp_path / "once", **FAST).out
    with pytest.raises(QuantizeError, match="resume"):
        quantize(tiny, "deepseek-r1-w8a8-smoothquant", out=tmp_path / "twice", stop_after_layer=1, **FAST)
    assert (tmp_path / "twice" / ".goldstick-work" / "state.json").exists()
    assert not (tmp_path / "twice" / "manifest.json").exists()  # visibly unfinished
    with pytest.raises(QuantizeError, match="not empty"):  # no silent restart over an interrupted run
        quantize(tiny, "deepseek-r1-w8a8-smoothquant", out=tmp_path / "twice", **FAST)
    quantize(tiny, "deepseek-r1-w8a8-smoothquant", out=tmp_path / "twice", resume=True, **FAST)
    assert digests(once) == digests(tmp_path / "twice")


def test_resume_refuses_different_inputs(tiny, tmp_path):
    with pytest.raises(QuantizeError):
        quantize(tiny, "deepseek-r1-w8a16", out=tmp_path / "q", stop_after_layer=0, **FAST)
    with pytest.raises(QuantizeError, match="different model, recipe or calibration"):
        quantize(tiny, "deepseek-r1-w8a8-dynamic", out=tmp_path / "q", resume=True, **FAST)


def test_moe_all_experts_option_keeps_the_routed_output(tiny, tmp_path):
    """Observing every expert on every token changes statistics, never the layer output: with a dynamic recipe
    (weights do not depend on statistics) the quantized logits are identical."""
    base = load_recipe("deepseek-r1-w8a8-dynamic")
    every = dataclasses.replace(base, options=dataclasses.replace(base.options, moe_calibrate_all_experts=True))
    routed = quantize(tiny, base, out=tmp_path / "routed", **FAST)
    observed = quantize(tiny, every, out=tmp_path / "all", **FAST)
    assert np.array_equal(routed.final_logits, observed.final_logits)
    name = "model.layers.1.mlp.experts.3.gate_proj"
    assert routed.report["layers"][1]["linears"][name]["tokens"] == \
        observed.report["layers"][1]["linears"][name]["tokens"] > 0  # routed coverage is reported in both
    assert observed.report["layers"][1]["experts_observed_on_all_tokens"]
    assert not routed.report["layers"][1]["experts_observed_on_all_tokens"]


def test_an_expert_no_token_reaches_gets_finite_statistics(tiny, tmp_path):
    """Layer 1's expert 5 is never routed (a huge negative correction bias); static W8A8 still gets finite,
    reported statistics from the layer's MoE input sample."""
    def never_route_expert_5(name, array):
        if name == "model.layers.1.mlp.gate.e_score_correction_bias":
            array = array.copy()
            array[5] = -1e4
        return array

    model = copy_checkpoint(tiny, tmp_path / "model", edit=never_route_expert_5)
    recipe = load_recipe("deepseek-r1-w8a8-smoothquant")  # static experts, routed statistics only
    recipe = dataclasses.replace(recipe, options=dataclasses.replace(recipe.options, moe_calibrate_all_experts=False))
    result = quantize(model, recipe, out=tmp_path / "q", **FAST)
    layer = result.report["layers"][1]
    assert layer["expert_tokens"][5] == 0 and layer["experts_without_tokens"] == [5]
    info = layer["linears"]["model.layers.1.mlp.experts.5.down_proj"]
    assert np.isfinite(info["activation"]["scale"]) and info["activation"]["scale"] > 0
    assert np.isfinite(result.final_logits).all()
    assert "no token" in (result.out / "report.md").read_text()


# ---- calibration data --------------------------------------------------------------------------------------------
def test_calibration_sources(tiny, tmp_path):
    import datasets

    tok = load_tokenizer(tiny)
    texts = [f"第{i}句话。Sentence number {i} is here." for i in range(20)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts))
    packed = load_calibration(tmp_path / "t.jsonl", tok.tokenizer, samples=4, seq_len=16, bos_id=tok.bos_id)
    assert [b.shape for b in packed.batches] == [(4, 16)] and packed.sha256

    rows = [[tok.bos_id, 5, 6, 7], [tok.bos_id, 8, 9], [tok.bos_id, 10, 11, 12]]
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps({"input_ids": r}) for r in rows))
    exact = load_calibration(tmp_path / "ids.jsonl", tok.tokenizer, samples=3, seq_len=16)
    assert sorted(tuple(r) for b in exact.batches for r in b.tolist()) == sorted(tuple(r) for r in rows)

    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    from_disk = load_calibration(tmp_path / "ds", tok.tokenizer, samples=4, seq_len=16, bos_id=tok.bos_id)
    assert np.array_equal(from_disk.batches[0], packed.batches[0])

    (tmp_path / "t.json").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts))
    from_file = load_calibration(tmp_path / "t.json", tok.tokenizer, samples=4, seq_len=16, bos_id=tok.bos_id)
    assert np.array_equal(from_file.batches[0], packed.batches[0])

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2"):
        load_calibration(tmp_path / "bad.jsonl", tok.tokenizer, samples=1, seq_len=8)


def test_cli_calibration_override(tiny, tmp_path, capsys):
    rows = [[0] + list(range(10 + i, 74 + i)) for i in range(4)]
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps({"input_ids": r}) for r in rows))
    out = tmp_path / "q"
    assert cli(["quantize", "deepseek-r1-w8a16", "--model", str(tiny), "--out", str(out), "--calib",
                str(tmp_path / "ids.jsonl"), "--calib-samples", "4", "--calib-seq-len", "32", "--no-progress"]) == 0
    calibration = json.loads((out / "report.json").read_text())["calibration"]
    assert calibration["pretokenized"] and calibration["samples"] == 4 and calibration["tokens"] == 4 * 32
    assert str(out / "report.md") in capsys.readouterr().out


# ---- equivalence of the transforms through the MindSpore layer ---------------------------------------------------
def test_smoothing_and_shifting_alone_keep_the_layer_output(tiny):
    """Fold a SmoothQuant-style scale and an OS+ shift into input_layernorm (weight / s, bias -z / s) and into
    q_a/kv_a (W diag(s), output bias W z), and an explicit shift+scale into o_proj: no rounding, so the decoder
    layer's output must not change beyond float error (<= 1e-5 relative)."""
    from mindspore import Tensor, nn, ops

    from goldstick.model.network import DecoderLayer, RotaryTables, positions_and_mask

    reader = CheckpointReader(tiny)
    cfg = reader.config
    tensors = reader.read_layer(1)
    layer = DecoderLayer(cfg, 1)
    layer.update_parameters_name("model.layers.1.")
    params = {p.name: p for p in layer.get_parameters()}
    for name, value in tensors.items():
        params[name].set_data(Tensor(value))
    rng = np.random.default_rng(0)
    ids = Tensor(rng.integers(0, cfg.vocab_size, (2, 24)).astype(np.int32))
    positions, mask = positions_and_mask(ids, None)
    cos, sin = RotaryTables(cfg)(positions)
    h = Tensor(reader.read("model.embed_tokens.weight")[ids.asnumpy()])
    before = layer(h, cos, sin, mask).asnumpy()

    class Affine(nn.Cell):  # x -> ((x - z) / s) @ (W diag s).T + W z, the float form of a transformed linear
        def __init__(self, w, s, z, explicit):
            super().__init__()
            self.w = Tensor((w * s[None, :]).astype(np.float32))
            self.c = Tensor((w.astype(np.float64) @ z).astype(np.float32))
            self.s, self.z, self.explicit = Tensor(s), Tensor(z), explicit

        def construct(self, x):
            if self.explicit:
                x = (x - self.z) / self.s
            return ops.matmul(x, self.w.T) + self.c

    hidden = cfg.hidden_size
    s = np.exp(rng.normal(0, 1, hidden)).astype(np.float32)
    z = rng.normal(0, 0.5, hidden).astype(np.float32)
    gamma = tensors["model.layers.1.input_layernorm.weight"]
    layer.input_layernorm.weight.set_data(Tensor((gamma / s).astype(np.float32)))
    layer.input_layernorm.set_bias((-z / s).astype(np.float32), "model.layers.1.input_layernorm.bias")
    for local in ("q_a_proj", "kv_a_proj_with_mqa"):
        w = tensors[f"model.layers.1.self_attn.{local}.weight"]
        setattr(layer.self_attn, local, Affine(w, s, z, explicit=False))
    v = cfg.num_attention_heads * cfg.v_head_dim
    s_o = np.exp(rng.normal(0, 1, v)).astype(np.float32)
    z_o = rng.normal(0, 0.5, v).astype(np.float32)
    layer.self_attn.o_proj = Affine(tensors["model.layers.1.self_attn.o_proj.weight"], s_o, z_o, explicit=True)
    after = layer(h, cos, sin, mask).asnumpy()
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
