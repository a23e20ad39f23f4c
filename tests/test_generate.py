"""Decoding: the MLA latent KV cache against the uncached forward, logit processing against transformers' own
processors, seeded sampling, batching with left padding, stop conditions and the ``generate`` command."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from mindspore import Tensor, ops
from mindspore.ops import Primitive
from mindspore.ops.auto_generate import MatMulExt

from goldstick.cli import main as cli
from goldstick.engine.pipeline import quantize
from goldstick.quant.cells import DynamicW8A8Linear, replace_cell
from goldstick.quant.numerics import log_softmax
from goldstick.serve.generate import (
    Generator,
    SamplingParams,
    apply_repetition_penalty,
    choose_token,
    greedy_generate,
    sampling_filter,
    top_logprobs,
)
from goldstick.serve.host_ops import HostPrimitive, host_function, host_primitives
from goldstick.testing.make_model import default_model_path

TOLERANCE = 1e-4
PROMPTS = ["I love Beijing, because", "我爱北京"]  # different lengths: the batch is left-padded


def relative_error(ref: np.ndarray, out: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def float_gen() -> Generator:
    return Generator.from_dir(default_model_path())


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "w8a8"
    quantize(default_model_path(), "deepseek-r1-w8a8-dynamic", out=out, calib_samples=8, calib_seq_len=64,
             progress=False)
    return out


@pytest.fixture(scope="module")
def quant_gen(quant_dir) -> Generator:
    return Generator.from_dir(quant_dir)


@pytest.fixture(scope="module")
def w8a8_kv_b_gen() -> Generator:
    """The float model with every kv_b_proj replaced by a dynamic W8A8 cell: its weight cannot be absorbed,
    so the cache takes the expand path (the latent runs through the quantized cell each step)."""
    gen = Generator.from_dir(default_model_path())
    net = gen.net
    for i, layer in enumerate(net.model.layers):
        w = layer.self_attn.kv_b_proj.weight.asnumpy()
        scale = np.abs(w).max(1) / 127.0
        q = np.clip(np.rint(w / scale[:, None]), -128, 127).astype(np.int8)
        name = f"model.layers.{i}.self_attn.kv_b_proj"
        replace_cell(net, name, DynamicW8A8Linear(q, scale), name)
    return gen


# ------------------------------------------------------------------------------------------------ KV cache
def test_forward_cached_matches_full_forward_and_keeps_the_latent(float_gen):
    net = float_gen.net
    cfg = net.config
    ids = np.random.RandomState(0).randint(5, 3000, size=(2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.int32)
    mask[1, :3] = 0  # row 1 is left-padded
    full = net(Tensor(ids), Tensor(mask)).asnumpy()
    plain_before = net(Tensor(ids)).asnumpy()

    cache = net.new_cache(2, block=4)  # capacity grows 8 -> 12 on the way (slots past the length are masked)
    chunks = [net.forward_cached(Tensor(ids[:, :5]), cache, mask[:, :5]),          # prefill
              net.forward_cached(Tensor(ids[:, 5:7]), cache),                      # a 2-token chunk
              net.forward_cached(Tensor(ids[:, 7:8]), cache),                      # decode steps
              net.forward_cached(Tensor(ids[:, 8:9]), cache, last_only=True)]
    got = np.concatenate([c.asnumpy() for c in chunks[:3]], 1)
    assert relative_error(full[0, :8], got[0]) <= TOLERANCE
    assert relative_error(full[1, 3:8], got[1, 3:]) <= TOLERANCE  # padded query rows are never used
    assert relative_error(full[:, 8:], chunks[3].asnumpy()) <= TOLERANCE
    # the cache holds MLA's compressed latent and the shared roped key, not per-head K/V
    assert cache.length == 9 and cache.capacity == 12 and len(cache.latent) == cfg.num_hidden_layers
    assert cache.latent[0].shape == (2, 12, cfg.kv_lora_rank)
    assert cache.k_rope[0].shape == (2, 12, cfg.qk_rope_head_dim)
    # slot contents: the normed latent of the tokens (row 0 has no padding), zeros past the length
    attn = net.model.layers[0].self_attn
    h0 = net.model.layers[0].input_layernorm(net.model.embed_tokens(Tensor(ids)))
    latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(h0)[..., : cfg.kv_lora_rank]).asnumpy()
    np.testing.assert_allclose(cache.latent[0].asnumpy()[:, :9], latent, rtol=1e-5, atol=1e-5)
    assert not cache.latent[0].asnumpy()[:, 9:].any()
    assert cache.absorbed_weights(0, net.model.layers[0].self_attn) is not None  # float kv_b: absorbed
    # and the uncached forward is untouched
    np.testing.assert_array_equal(net(Tensor(ids)).asnumpy(), plain_before)


SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
             q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=2, topk_group=1,
             num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256)


@pytest.mark.parametrize("variant", [dict(q_lora_rank=None), dict(rope_interleave=False),
                                     dict(rope_scaling={"type": "yarn", "factor": 4.0, "mscale": 1.0,
                                                        "mscale_all_dim": 1.0, "original_max_position_embeddings": 8})],
                         ids=["no-q-lora", "rope-not-interleaved", "yarn"])
def test_cache_on_other_attention_variants(variant):
    """The parity variants of tests/test_parity.py, random weights: cached chunks equal the full forward."""
    from goldstick.model.config import ModelConfig
    from goldstick.model.network import DeepseekV3ForCausalLM
    from goldstick.model.runtime import setup_mindspore

    setup_mindspore()
    net = DeepseekV3ForCausalLM(ModelConfig(**{**SMALL, **variant}))
    rng = np.random.RandomState(0)
    net.load_weights({name: (1.0 + 0.2 * rng.randn(*p.shape)) if "norm" in name else 0.2 * rng.randn(*p.shape)
                      for name, p in net.named_weights().items()})
    net.set_train(False)
    ids = rng.randint(0, SMALL["vocab_size"], size=(2, 12)).astype(np.int32)
    full = net(Tensor(ids)).asnumpy()
    for absorb in (True, False):
        cache = net.new_cache(2, absorb=absorb, block=8)
        got = [net.forward_cached(Tensor(ids[:, :6]), cache)]
        got += [net.forward_cached(Tensor(ids[:, i:i + 1]), cache) for i in range(6, 12)]
        assert relative_error(full, np.concatenate([g.asnumpy() for g in got], 1)) <= TOLERANCE


@pytest.mark.parametrize("which", ["float", "w8a8-dynamic", "w8a8-kv_b-expand"])
def test_cached_decode_matches_uncached(which, request):
    """Greedy decoding of a left-padded batch: same tokens and per-step logits with and without the cache (the
    float model also through the expand path, absorb=False)."""
    gen = request.getfixturevalue({"float": "float_gen", "w8a8-dynamic": "quant_gen",
                                   "w8a8-kv_b-expand": "w8a8_kv_b_gen"}[which])
    can_absorb = gen.net.new_cache(1).absorbed_weights(0, gen.net.model.layers[0].self_attn) is not None
    assert can_absorb == (which != "w8a8-kv_b-expand")  # the recipe keeps kv_b_proj float: absorbed
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    plain, _ = gen.generate(PROMPTS, params, use_cache=False, keep_logits=True)
    for absorb in (True, False) if which == "float" else (True,):
        cached, _ = gen.generate(PROMPTS, params, use_cache=True, absorb=absorb, keep_logits=True)
        for c, p in zip(cached, plain):
            assert c.token_ids == p.token_ids and len(c.token_ids) == 8
            assert c.text == p.text
            for step_c, step_p in zip(c.logits, p.logits):
                assert relative_error(step_p, step_c) <= TOLERANCE


def test_batched_greedy_matches_each_prompt_alone(float_gen):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    batched, timing = float_gen.generate(PROMPTS + ["The"], params)
    for prompt, got in zip(PROMPTS + ["The"], batched):
        (alone,), _ = float_gen.generate(prompt, params)
        assert got.token_ids == alone.token_ids
    assert timing.new_tokens == 18 and timing.prompt_tokens == sum(len(float_gen.encode(p)) for p in PROMPTS) + 2


# ------------------------------------------------------------------------------------------------ sampling
def test_logit_processing_matches_transformers():
    torch = pytest.importorskip("torch")
    generation = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.RandomState(3)
    for trial in range(20):
        logits = rng.randn(50).astype(np.float32) * 3
        history = rng.randint(0, 50, size=rng.randint(1, 12))
        penalty, temperature = [1.0, 1.3, 0.7][trial % 3], [0.5, 1.0, 1.7][trial % 3]
        top_k, top_p = [0, 1, 5, 20][trial % 4], [1.0, 0.9, 0.5, 0.05][trial % 4]
        ids_t, scores_t = torch.tensor(history[None]), torch.tensor(logits[None])
        scores_t = generation.RepetitionPenaltyLogitsProcessor(penalty)(ids_t, scores_t)
        scores_t = generation.TemperatureLogitsWarper(temperature)(ids_t, scores_t)
        if top_k:
            scores_t = generation.TopKLogitsWarper(top_k)(ids_t, scores_t)
        scores_t = generation.TopPLogitsWarper(top_p)(ids_t, scores_t)
        ours = apply_repetition_penalty(logits.astype(np.float64), list(history), penalty)
        ours = sampling_filter(ours, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
        ref = scores_t[0].double().numpy()
        assert np.array_equal(np.isinf(ours), np.isinf(ref)), trial
        finite = np.isfinite(ref)
        np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6)


def test_sampling_follows_the_filtered_distribution():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(temperature=1.0, top_k=3)
    rng = np.random.default_rng(0)
    draws = np.bincount([choose_token(logits, [], params, rng) for _ in range(3000)], minlength=5)
    assert draws[3] == draws[4] == 0
    expected = np.exp(logits[:3]) / np.exp(logits[:3]).sum()
    np.testing.assert_allclose(draws[:3] / 3000, expected, atol=0.03)
    assert choose_token(logits, [0], SamplingParams(repetition_penalty=4.0), None) == 1  # greedy, penalised 0


def test_seeded_sampling_is_reproducible_and_batch_independent(float_gen):
    params = SamplingParams(max_tokens=4, temperature=1.2, top_p=0.95, top_k=40, repetition_penalty=1.1, seed=7,
                            ignore_eos=True)
    first, _ = float_gen.generate(PROMPTS, params)
    again, _ = float_gen.generate(PROMPTS, params)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    (alone,), _ = float_gen.generate(PROMPTS[1], params)
    assert alone.token_ids == first[1].token_ids
    others = {tuple(float_gen.generate(PROMPTS[0], dataclasses.replace(params, seed=s))[0][0].token_ids)
              for s in range(3)}
    assert len(others) > 1  # the seed matters


# ------------------------------------------------------------------------------------------------ stopping
def test_stop_conditions(float_gen):
    (c,), t = float_gen.generate(PROMPTS[0], SamplingParams(max_tokens=0))
    assert c.token_ids == [] and c.text == "" and c.finish_reason == "length" and t.new_tokens == 0
    (c,), _ = float_gen.generate(PROMPTS[0], SamplingParams(max_tokens=40))
    eos = float_gen.tokenizer.eos_id
    if c.finish_reason == "stop":  # the default model ends this prompt early; eos is kept in the ids, not the text
        assert c.token_ids[-1] == eos and len(c.token_ids) < 40
    else:
        assert len(c.token_ids) == 40 and eos not in c.token_ids
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=0, ignore_eos=True)
    (long,), _ = float_gen.generate(PROMPTS[0], sampled)
    pieces = [float_gen.decode([t]) for t in long.token_ids]
    stop = next(p for p in pieces[1:] if p.strip())  # a later token's text: the continuation must end before it
    (cut,), _ = float_gen.generate(PROMPTS[0], dataclasses.replace(sampled, stop=("never there", stop)))
    assert cut.finish_reason == "stop" and cut.text == long.text[: long.text.find(stop)]
    assert len(cut.token_ids) < len(long.token_ids)
    with pytest.raises(ValueError, match="context"):
        float_gen.generate(PROMPTS[0], SamplingParams(max_tokens=float_gen.max_positions))


@pytest.mark.parametrize("bad", [dict(max_tokens=-1), dict(temperature=-0.1), dict(top_p=0.0), dict(top_k=-2),
                                 dict(repetition_penalty=0.0), dict(seed=-1), dict(temperature=float("nan"))])
def test_sampling_params_reject_out_of_range(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).check()


# ------------------------------------------------------------------------------------------------ CLI
def test_generate_command(capsys):
    model = str(default_model_path())
    assert cli(["generate", model, "I love Beijing, because", "--max-tokens", "4", "--ignore-eos"]) == 0
    cached = capsys.readouterr().out.splitlines()
    assert cli(["generate", model, "I love Beijing, because", "--max-tokens", "4", "--ignore-eos",
                "--no-cache"]) == 0
    plain = capsys.readouterr().out.splitlines()
    assert cached[0] == plain[0] and cached[0].startswith("I love Beijing, because")
    assert "4 tokens in" in cached[-1] and "tokens/s (KV cache" in cached[-1] and "(no cache" in plain[-1]
    assert cli(["generate", model, "我爱", "--max-tokens", "3", "--temperature", "0.8", "--top-p", "0.9",
                "--top-k", "20", "--repetition-penalty", "1.2", "--seed", "1"]) == 0
    assert cli(["generate", model, "x", "--top-p", "2"]) == 2  # a UsageError is reported, not raised
    assert "top_p" in capsys.readouterr().err


def test_greedy_generate_compat(float_gen):
    text, stats = greedy_generate(default_model_path(), "I love Beijing, because", 3, net=float_gen.net)
    assert text.startswith("I love Beijing, because") and 1 <= stats["new_tokens"] <= 3


# ------------------------------------------------------------------------------------------------ logprobs
def uncached_logprobs(gen: Generator, ids: list[int]) -> np.ndarray:
    """log-softmax (float64) of the uncached forward's logits for one sequence: row j scores token j + 1."""
    return log_softmax(gen.net(Tensor(np.asarray([ids], dtype=np.int32))).asnumpy()[0])


def test_logprobs_are_the_log_softmax_of_the_logits(float_gen):
    params = SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    (c,), _ = float_gen.generate(PROMPTS[0], params)
    lp = uncached_logprobs(float_gen, c.prompt_ids + c.token_ids)
    n = len(c.prompt_ids)
    want = [lp[n - 1 + i, t] for i, t in enumerate(c.token_ids)]
    np.testing.assert_allclose(c.logprobs, want, atol=1e-4)
    assert c.prompt_logprobs[0] is None and c.prompt_top_logprobs[0] is None
    np.testing.assert_allclose(c.prompt_logprobs[1:], [lp[j, c.prompt_ids[j + 1]] for j in range(n - 1)], atol=1e-4)
    for i, top in enumerate(c.top_logprobs):
        assert len(top) == 3 and top[0][0] == c.token_ids[i]  # greedy: the chosen token is the likeliest
        assert [t for t, _ in top] == list(np.argsort(-lp[n - 1 + i], kind="stable")[:3])
        assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    assert all(len(top) == 2 for top in c.prompt_top_logprobs[1:])


def test_scoring_only_and_per_prompt_params(float_gen):
    """max_tokens 0 with prompt_logprobs runs the prefill only; one SamplingParams per prompt of a batch."""
    ids = [float_gen.encode(p) for p in PROMPTS]
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=1)
    greedy = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=0)
    (scored, generated), timing = float_gen.generate_ids(ids, [scoring, greedy])
    assert scored.token_ids == [] and scored.logprobs == [] and len(scored.prompt_logprobs) == len(ids[0])
    assert len(generated.token_ids) == 4 and generated.prompt_logprobs == []
    assert all(top == [] for top in generated.top_logprobs)  # logprobs=0: the chosen token's only
    assert timing.new_tokens == 4
    (alone,), _ = float_gen.generate_ids([ids[0]], scoring)
    np.testing.assert_allclose(scored.prompt_logprobs[1:], alone.prompt_logprobs[1:], atol=1e-4)
    (alone,), _ = float_gen.generate_ids([ids[1]], greedy)
    assert alone.token_ids == generated.token_ids
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        float_gen.generate_ids([ids[0]], [scoring, greedy])
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21).check()


def test_top_logprobs_order_and_ties():
    lp = np.log(np.array([0.1, 0.3, 0.1, 0.3, 0.2]))
    assert [t for t, _ in top_logprobs(lp, 3)] == [1, 3, 4]
    assert [t for t, _ in top_logprobs(lp, 4)] == [1, 3, 4, 0]  # the tie at the edge: the smaller id
    assert top_logprobs(lp, 0) == [] and len(top_logprobs(lp, 9)) == 5


# ------------------------------------------------------------------------------------------------ host ops
def test_host_primitives_compute_what_the_primitives_compute():
    rng = np.random.RandomState(0)

    def t(*shape, integers=False):
        a = rng.randint(-127, 128, shape) if integers else rng.randn(*shape)
        return Tensor(a.astype(np.float32))

    cases = [
        (ops.MatMul(transpose_b=True), (t(5, 64), t(32, 64))),
        (ops.MatMul(transpose_a=True), (t(64, 5), t(64, 32))),
        (ops.BatchMatMul(transpose_b=True), (t(2, 3, 5, 16), t(2, 3, 7, 16))),
        (ops.BatchMatMul(), (t(2, 3, 5, 16), t(2, 3, 16, 7))),
        (MatMulExt(), (t(2, 4, 5, 16), t(2, 1, 16, 7))),       # broadcast over heads
        (MatMulExt(), (t(2, 4, 5, 16), t(4, 16, 7))),          # broadcast over the batch
        (ops.Softmax(-1), (t(2, 4, 5, 7),)),
        (ops.Gather(), (t(50, 8), Tensor(rng.randint(0, 50, (2, 5)).astype(np.int32)), 0)),
    ]
    for primitive, args in cases:
        host = HostPrimitive(primitive, host_function(primitive))
        want, got = primitive(*args).asnumpy(), host(*args).asnumpy()
        assert got.shape == want.shape and got.dtype == want.dtype, primitive
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(primitive))
    # integer-valued operands (the W8A8 twin's matmul): exact
    x, w = t(7, 512, integers=True), t(96, 512, integers=True)
    matmul = ops.MatMul(transpose_b=True)
    assert np.array_equal(HostPrimitive(matmul, host_function(matmul))(x, w).asnumpy(), matmul(x, w).asnumpy())
    assert host_function(ops.ReduceSum()) is None


@pytest.mark.parametrize("which", ["float", "w8a8-dynamic"])
def test_host_primitives_keep_decoding(which, request):
    """goldstick serve's network: every primitive a cell holds runs on the host; the same greedy tokens as eager,
    past the cache's first 64-position block and on both attention paths."""
    gen = Generator.from_dir(default_model_path() if which == "float" else request.getfixturevalue("quant_dir"))
    ids = [gen.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=70, ignore_eos=True)
    eager, _ = gen.generate_ids(ids, params, keep_logits=True)
    expand, _ = gen.generate_ids(ids[:1], SamplingParams(max_tokens=3), absorb=False, keep_logits=True)
    replaced, kept = host_primitives(gen.net)
    assert replaced > 0 and kept == []
    held = [v for _, cell in gen.net.cells_and_names() for v in vars(cell).values()]
    assert not any(isinstance(v, Primitive) for v in held)
    assert sum(isinstance(v, HostPrimitive) for v in held) == replaced
    host, _ = gen.generate_ids(ids, params, keep_logits=True)
    host_expand, _ = gen.generate_ids(ids[:1], SamplingParams(max_tokens=3), absorb=False, keep_logits=True)
    for a, b in zip(eager + expand, host + host_expand):
        if which == "float":  # the int8 twin's requantization can turn a last-bit change into another code
            assert a.token_ids == b.token_ids
            assert max(relative_error(x, y) for x, y in zip(a.logits, b.logits)) <= TOLERANCE
        else:
            assert relative_error(a.logits[0], b.logits[0]) <= 0.05
