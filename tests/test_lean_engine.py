"""The engine's lean layer loop: the same checkpoint as the full float pass, with less memory and time.

What makes it lean (goldstick/engine/, model/network.py, quant/cells.py, io/writer.py), each checked here against
the plain way:
- attention-only float pass when no MLP linear needs statistics (the MLP runs once, quantized); routed experts read
  their float weight at the call (StreamedLinear) instead of all being held in float32;
- the quantized cells cast their int8 weight per call instead of caching a float32 copy;
- elementwise ops with a broadcast operand on the host on CPU (same float32 operations, same values);
- calibration batches cut to bounded activation sizes;
- the final shards planned and written in place (PlannedShardWriter + PlacedShards), not buffered.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from goldstick.engine import layer as engine_layer
from goldstick.engine import pipeline
from goldstick.engine.inputs import LayerTensors, batch_rows, prepare_batches
from goldstick.engine.layer import LayerQuantizer, mlp_groups, token_count
from goldstick.io.checkpoint import CheckpointReader
from goldstick.io.writer import PlacedShards, PlannedShardWriter, ShardedWriter
from goldstick.model.runtime import setup_mindspore
from goldstick.quant.recipe import load_recipe
from goldstick.testing.make_model import default_model_path

REPO = Path(__file__).resolve().parents[1]
FAST = dict(calib_samples=24, calib_seq_len=64, progress=False)  # 1536 tokens: more than the 1024-token sample


def shard_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("model*"))}


class FullFloatPass(LayerQuantizer):
    """The layer quantizer as goldstick.evaluation.analyze runs it: the float layer on every calibration token."""

    def __init__(self, *args, **kwargs):
        kwargs["lean"] = False
        super().__init__(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["deepseek-r1-w8a8-mixed", "deepseek-w8a8-dynamic-smoothquant"])
def test_lean_loop_writes_the_full_float_pass_checkpoint(recipe, tmp_path, monkeypatch):
    """Mixed (static OS+ attention with its search, dynamic MLP) and dynamic+SmoothQuant: byte-identical shards and
    index; the lean report measures its SQNRs on the token sample and says so."""
    lean = pipeline.quantize(default_model_path(), recipe, out=tmp_path / "lean", **FAST)
    monkeypatch.setattr(pipeline, "LayerQuantizer", FullFloatPass)
    full = pipeline.quantize(default_model_path(), recipe, out=tmp_path / "full", **FAST)
    assert shard_digests(tmp_path / "lean") == shard_digests(tmp_path / "full")
    assert np.array_equal(lean.final_logits, full.final_logits)
    token_sample = load_recipe(recipe).options.token_sample
    all_tokens = FAST["calib_samples"] * FAST["calib_seq_len"]
    for lean_layer, full_layer in zip(lean.report["layers"], full.report["layers"]):
        assert full_layer["sqnr_tokens"] == all_tokens
        assert lean_layer["sqnr_tokens"] == min(token_sample, all_tokens) < all_tokens
        assert np.isfinite(lean_layer["sqnr_db"]) and lean_layer["sqnr_db"] > 10
        for name, info in lean_layer["linears"].items():
            if "sqnr_db" in full_layer["linears"][name]:
                assert np.isfinite(info["sqnr_db"]), name
    moe = [layer for layer in lean.report["layers"] if "expert_tokens" in layer]
    k = CheckpointReader(default_model_path()).config.num_experts_per_tok
    assert moe and all(sum(layer["expert_tokens"]) == all_tokens * k for layer in moe)  # every token, k experts


def test_routed_experts_are_read_at_the_call_not_held(monkeypatch):
    """With an attention-only float pass, no routed expert's float weight is loaded into the network: each is
    read when the sample pass calls it (and again for its quantization and its SQNR reference), then dropped."""
    setup_mindspore()
    from goldstick.model.network import StreamedLinear

    reader = CheckpointReader(default_model_path())
    cfg = reader.config
    recipe = load_recipe("deepseek-r1-w8a8-dynamic")
    reads: list[str] = []
    original = LayerTensors.__getitem__

    def counting(self, name):
        reads.append(name)
        return original(self, name)
    monkeypatch.setattr(LayerTensors, "__getitem__", counting)
    ids = np.arange(2, 2 + 2 * 32, dtype=np.int32).reshape(2, 32)
    batches = prepare_batches(cfg, type("C", (), {"batches": [ids]})())
    embed = reader.read("model.embed_tokens.weight")
    hidden = [embed[b[0]] for b in batches]
    layer = cfg.first_k_dense_replace  # the first MoE layer
    lq = LayerQuantizer(cfg, layer, LayerTensors(reader, layer), recipe.plan(cfg), recipe, batches, hidden,
                        lean=True)
    assert lq.attention_only
    experts = [n for n in lq.linears if ".mlp.experts." in n]
    assert experts and all(isinstance(lq.linears[n], StreamedLinear) for n in experts)
    assert not [n for n in lq.float_tensors if ".mlp.experts." in n]
    assert not [n for n in reads if ".mlp.experts." in n]
    float_outputs = lq.observe(False)
    lq.quantize(float_outputs)
    outputs = lq.measure(float_outputs)
    assert outputs is hidden  # the caller's list, now the layer's outputs
    assert not [n for n in lq.float_tensors if ".mlp.experts." in n]
    tensors, labels = lq.tensors()
    assert all(labels[f"{n}.weight"] == "W8A8_DYNAMIC" for n in experts)
    # the reference layer (full float pass, every weight loaded) gives the same outputs
    reads.clear()
    embed_hidden = [embed[b[0]] for b in batches]
    ref = LayerQuantizer(cfg, layer, LayerTensors(reader, layer), recipe.plan(cfg), recipe, batches,
                         embed_hidden, lean=False)
    ref_float = ref.observe(False)
    ref.quantize(ref_float)
    ref_out = ref.measure(ref_float)
    assert all(np.array_equal(a, b) for a, b in zip(outputs, ref_out))
    ref_tensors, _ = ref.tensors()
    assert tensors.keys() == ref_tensors.keys()
    assert all(np.array_equal(tensors[k].view(np.uint8), ref_tensors[k].view(np.uint8)) for k in tensors)


def test_host_broadcast_ops_give_the_device_ops_values(monkeypatch):
    """RMSNorm (with a bias), the attention mask, rope and the MoE's dispatch and weighted sum computed on the host
    give the MindSpore ops' values through a whole MoE decoder layer, to float32 rounding (the norm's mean and the
    sum over the experts add in another order)."""
    setup_mindspore()
    from mindspore import Tensor

    from goldstick.model import network as model

    reader = CheckpointReader(default_model_path())
    cfg = reader.config
    layer = cfg.first_k_dense_replace
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 24, cfg.hidden_size)).astype(np.float32)
    batches = prepare_batches(cfg, type("C", (), {"batches": [np.zeros((2, 24), np.int32)]})())
    _, cos, sin, mask = batches[0]
    outputs = []
    for host in (True, False):
        monkeypatch.setattr(model, "_HOST_BROADCAST", host)
        block = model.DecoderLayer(cfg, layer)
        block.update_parameters_name(f"model.layers.{layer}.")
        params = {p.name: p for p in block.get_parameters()}
        for name in reader.layer_tensor_names(layer):
            params[name].set_data(Tensor(reader.read(name)))
        block.input_layernorm.set_bias(np.linspace(-1, 1, cfg.hidden_size, dtype=np.float32),
                                       f"model.layers.{layer}.input_layernorm.bias")
        outputs.append(block(Tensor(h), cos, sin, mask).asnumpy())
    scale = np.abs(outputs[1]).max()
    assert np.abs(outputs[0] - outputs[1]).max() <= 2e-6 * scale
    assert not np.array_equal(outputs[0], h)  # the layer did something


def test_quantized_cells_compute_as_the_ops_formula():
    """Dynamic and static W8A8 activations quantized on the host equal the MindSpore-ops formula (the Ascend
    semantics: round half to even, clip for static), and an uncached weight gives the cached one's output."""
    setup_mindspore()
    import mindspore as ms
    from mindspore import Tensor, ops

    from goldstick.quant.cells import DynamicW8A8Linear, StaticW8A8Linear

    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7, 96)).astype(np.float32) * rng.uniform(0.01, 30, 96).astype(np.float32)
    x[0, 0] = 0  # an all-zero token
    w = rng.integers(-127, 128, (40, 96)).astype(np.int8)
    scale = rng.uniform(1e-3, 1e-2, 40).astype(np.float32)
    cell = DynamicW8A8Linear(w, scale)
    flat = Tensor(x.reshape(-1, 96))
    token_scale = ops.maximum(ops.amax(ops.abs(flat), -1, True), 1e-30) / 127.0
    expected = (ops.matmul(ops.round(flat / token_scale), Tensor(w.astype(np.float32)).T) * token_scale
                * Tensor(scale)).asnumpy().reshape(5, 7, 40)
    got = cell(Tensor(x)).asnumpy()
    assert np.array_equal(got, expected)
    cell.cache_weight = False
    cell.reset_cache()
    assert np.array_equal(cell(Tensor(x)).asnumpy(), expected) and cell._weight_f32 is None

    input_scale = rng.uniform(0.05, 0.2, 96).astype(np.float32)
    offset = rng.integers(-20, 20, 96).astype(np.int8)
    beta = rng.standard_normal(96).astype(np.float32)
    static = StaticW8A8Linear(w, np.full(40, 1e-3, np.float32), np.zeros(40, np.int32), input_scale, offset, beta)
    q = ops.clamp(ops.round((flat + Tensor(beta)) / Tensor(input_scale) + Tensor(offset).astype(ms.float32)),
                  -128, 127)
    assert np.array_equal(static.quantize_input(flat).asnumpy(), q.asnumpy())


def test_batches_are_cut_to_bounded_activations():
    """Sequences per batch: attention scores within 2M elements and hidden states within 1M, at least one; the
    cut batches hold the calibration rows in order."""
    cfg = CheckpointReader(default_model_path()).config
    rows = batch_rows(cfg, 256)
    assert rows >= 1
    assert rows * cfg.num_attention_heads * 256 * 256 <= 1 << 21 and rows * 256 * cfg.hidden_size <= 1 << 20
    assert batch_rows(cfg, 1 << 16) == 1  # one sequence even when it alone is over the budget
    ids = np.arange(40 * 256, dtype=np.int32).reshape(40, 256) % cfg.vocab_size
    batches = prepare_batches(cfg, type("C", (), {"batches": [ids[:32], ids[32:]]})())
    assert all(len(b[0]) <= rows for b in batches)
    assert np.array_equal(np.concatenate([b[0] for b in batches]), ids)


def test_placed_shards_write_the_sharded_writer_bytes(tmp_path):
    """Planned from placeholders, then written in place tensor by tensor: the same files as the buffering writer."""
    rng = np.random.default_rng(2)
    tensors = [(f"t{i}", rng.standard_normal((rng.integers(1, 40), 16)).astype(dt))
               for i, dt in enumerate([np.float32, np.int8, np.int32, np.float32, np.int8] * 4)]
    buffered = ShardedWriter(tmp_path / "a", max_shard_bytes=3000)
    for name, array in tensors:
        buffered.add(name, array)
    buffered.close()
    planned = PlannedShardWriter(tmp_path / "b", max_shard_bytes=3000)
    for name, array in tensors:
        planned.add(name, np.broadcast_to(np.zeros((), array.dtype), array.shape))
    planned.open()
    placed = PlacedShards(planned)
    for name, array in reversed(tensors):  # any order
        placed.add(name, array)
    placed.close()
    a, b = shard_digests(tmp_path / "a"), shard_digests(tmp_path / "b")
    assert len(a) > 2 and a == b
    planned = PlannedShardWriter(tmp_path / "c", max_shard_bytes=3000)
    planned.add("x", np.zeros((4, 4), np.float32))
    planned.open()
    with pytest.raises(Exception, match="'x': 32 bytes given, 64 planned"):
        PlacedShards(planned).add("x", np.zeros((2, 4), np.float32))
    planned.abort()
    assert not list((tmp_path / "c").iterdir())


def _moe_layer_quantizer(recipe_name: str, lean: bool, batch_count: int = 3):
    setup_mindspore()
    reader = CheckpointReader(default_model_path())
    cfg = reader.config
    recipe = load_recipe(recipe_name)
    rng = np.random.default_rng(3)
    ids = [rng.integers(2, cfg.vocab_size, (2, 40)).astype(np.int32) for _ in range(batch_count)]
    batches = prepare_batches(cfg, type("C", (), {"batches": ids})())
    embed = reader.read("model.embed_tokens.weight")
    layer = cfg.first_k_dense_replace
    return LayerQuantizer(cfg, layer, LayerTensors(reader, layer), recipe.plan(cfg), recipe, batches,
                          [embed[b[0]] for b in batches], lean=lean)


def test_osplus_loss_at_the_mlp_input_runs_the_attention_only(tmp_path, monkeypatch):
    """``osplus_loss: mlp-input``: the MLA linears' OS+ candidates are scored on the error of the MLP's input
    (post-attention norm of the attention half) against the float layer's on the token sample: no candidate runs
    the MLP, most of an R1 layer's work."""
    recipe = tmp_path / "mixed-mlp-input.yaml"
    recipe.write_text((REPO / "recipes" / "deepseek-r1-w8a8-mixed.yaml").read_text()
                      .replace("  osplus_loss: layer", "  osplus_loss: mlp-input"))
    lq = _moe_layer_quantizer(str(recipe), lean=True)
    float_outputs = lq.observe(False)
    float_branch = lq._mlp_inputs(*lq.sample)
    mlp_runs, searches = [], []
    feed_forward = type(lq.layer).feed_forward
    monkeypatch.setattr(type(lq.layer), "feed_forward", lambda self, h: (mlp_runs.append(1), feed_forward(self, h))[1])
    search = engine_layer.alg.osplus_search_scale

    def spy(shift, lo, hi, x, loss_fn, **kwargs):
        result = search(shift, lo, hi, x, loss_fn, **kwargs)
        # the chosen candidate, scored again, and the MLP input it leaves behind
        best = loss_fn(x, shift, result.scale)
        branch = lq._mlp_inputs(*lq.sample)
        searches.append((best, result.losses[result.best_index],
                         np.mean([np.mean((b - f) ** 2) for b, f in zip(branch, float_branch)])))
        return result
    monkeypatch.setattr(engine_layer.alg, "osplus_search_scale", spy)
    lq.quantize(float_outputs)
    inside, elsewhere = lq.osplus_candidates()
    assert len(searches) == inside // lq.recipe.options.osplus_grid == 3 and elsewhere == 0  # q_a+kv_a, q_b, o_proj
    assert not mlp_runs
    for best, recorded, branch_error in searches:
        assert best == recorded == pytest.approx(branch_error, rel=1e-6) and best > 0


def test_osplus_candidates_run_the_whole_layer_by_default():
    """The shipped mixed recipe scores every OS+ candidate on the layer's output (``osplus_loss: layer``)."""
    lq = _moe_layer_quantizer("deepseek-r1-w8a8-mixed", lean=True)
    assert lq.recipe.options.osplus_loss == "layer"
    assert lq.osplus_candidates() == (0, 3 * lq.recipe.options.osplus_grid)  # q_a + kv_a, q_b, o_proj
    assert lq.planned_work()["statistics"] == token_count(lq.batches)  # the statistics pass only


@pytest.mark.parametrize("loss", ["layer", "mlp-input"])
def test_osplus_candidates_scored_at_the_layer_output_run_the_whole_layer(loss, tmp_path, monkeypatch):
    """A static OS+ linear outside the attention (the shared expert's gate/up, fed by the post-attention norm) is
    scored on the layer's output whatever ``osplus_loss`` says: each candidate runs the whole layer."""
    recipe = tmp_path / "shared-osplus.yaml"
    recipe.write_text("name: shared-osplus\ndefault: float\nrules:\n"
                      "  - match: '.*\\.mlp\\.shared_experts\\.(gate_proj|up_proj)'\n"
                      "    scheme: w8a8-static\n    outlier_suppression: osplus\n"
                      f"options:\n  osplus_grid: 3\n  osplus_loss: {loss}\n")
    lq = _moe_layer_quantizer(str(recipe), lean=True)
    # two searches of their own (the norm also feeds the routed experts: nothing folds into it)
    assert not lq.attention_only and lq.osplus_candidates() == (0, 6)
    float_outputs = lq.observe(False)
    calls = {"layer": 0, "mlp inputs": 0}
    run, mlp_inputs = lq.run, lq._mlp_inputs
    monkeypatch.setattr(lq, "run", lambda *a, **k: (calls.__setitem__("layer", calls["layer"] + 1), run(*a, **k))[1])
    monkeypatch.setattr(lq, "_mlp_inputs", lambda *a: (calls.__setitem__("mlp inputs", 1), mlp_inputs(*a))[1])
    lq.quantize(float_outputs)
    assert calls == {"layer": 6, "mlp inputs": 0}


def test_projection_inputs_give_the_attention_hooks_statistics(monkeypatch):
    """When only the MLA input projections need statistics (SmoothQuant on the attention inputs), the lean float
    pass computes their inputs without running the attention, and gets exactly the statistics that hooks on the
    whole attention collect."""
    calls = []
    original = LayerQuantizer._observe_projection_inputs
    monkeypatch.setattr(LayerQuantizer, "_observe_projection_inputs",
                        lambda self, h: calls.append(h.shape) or original(self, h))
    lean = _moe_layer_quantizer("deepseek-w8a8-dynamic-smoothquant", lean=True)
    full = _moe_layer_quantizer("deepseek-w8a8-dynamic-smoothquant", lean=False)
    lean.observe(False)
    full.observe(False)
    assert len(calls) == len(lean.batches)  # every calibration batch, through the shortcut
    names = sorted(lean.needs_stats)
    assert [n.rsplit(".", 1)[-1] for n in names] == ["kv_a_proj_with_mqa", "q_a_proj", "q_b_proj"]
    for name in names:
        assert lean.stats[name].tokens == full.stats[name].tokens == sum(shape[0] * shape[1] for shape in calls)
        assert np.array_equal(lean.stats[name].minimum, full.stats[name].minimum), name
        assert np.array_equal(lean.stats[name].maximum, full.stats[name].maximum), name


def test_mlp_groups_join_batches_within_the_budget():
    batches = [(np.zeros((2, 64)),), (np.zeros((2, 64)),), (np.zeros((1, 64)),), (np.zeros((4, 64)),)]
    assert mlp_groups(batches, hidden_size=8, budget=8 * 192) == [[0], [1, 2], [3]]
    assert mlp_groups(batches, hidden_size=8, budget=8 * 1000) == [[0, 1, 2, 3]]
    assert mlp_groups(batches, hidden_size=8, budget=1) == [[0], [1], [2], [3]]  # at least one batch each


def test_grouped_mlp_gives_the_batch_by_batch_outputs_and_routes(monkeypatch):
    """The MLP half over several batches' tokens at once gives each batch's outputs as a batch-by-batch run does
    (to float32 rounding: the matmuls see other row counts), and the recorded routing is cut back per batch."""
    runs, calls = {}, []
    original = engine_layer.mlp_groups
    monkeypatch.setattr(engine_layer, "mlp_groups", lambda *args: calls.append(original(*args)) or calls[-1])
    for budget in ("grouped", "single"):
        monkeypatch.setattr(engine_layer, "MLP_GROUP_ELEMENTS", 1 << 22 if budget == "grouped" else 1)
        calls.clear()
        lq = _moe_layer_quantizer("deepseek-r1-w8a8-mixed", lean=False)
        runs[budget] = (lq.observe(False), lq.routes, [b[0].size for b in lq.batches])
        assert calls == [[[0, 1, 2]]] if budget == "grouped" else calls == [[[0], [1], [2]]]
    (grouped, grouped_routes, sizes), (single, single_routes, _) = runs["grouped"], runs["single"]
    assert len(grouped) == len(single) == len(sizes) == 3
    for a, b in zip(grouped, single):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert [w.shape[0] for w, _ in grouped_routes] == sizes == [e.shape[0] for _, e in single_routes]
    for (_, e1), (_, e2) in zip(grouped_routes, single_routes):
        assert np.mean(e1 == e2) > 0.99  # a token at a routing tie may switch with the last bit


def test_an_expert_no_token_reaches_gets_statistics_from_the_moe_sample():
    """The float pass's fallback for an expert the router never picks: its three linears see the layer's bounded
    MoE input sample (statistics of exactly those rows)."""
    from mindspore import Tensor

    lq = _moe_layer_quantizer("deepseek-r1-w8a8-smoothquant", lean=False)
    bias = lq.layer.mlp.gate.e_score_correction_bias
    pushed = np.zeros(bias.shape, np.float32)
    pushed[0] = -1e4  # expert 0 is never chosen
    bias.set_data(Tensor(pushed))
    lq.observe(False)
    assert 0 in lq.unseen
    sample = np.concatenate(lq.moe_sample)
    gate = lq.stats[f"{lq.prefix}mlp.experts.0.gate_proj"]
    assert gate.tokens == sample.shape[0] > 0
    assert np.array_equal(gate.minimum, sample.min(0)) and np.array_equal(gate.maximum, sample.max(0))
    assert lq.stats[f"{lq.prefix}mlp.experts.0.down_proj"].tokens == sample.shape[0]
