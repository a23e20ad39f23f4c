"""Parity of goldstick's MindSpore network with transformers' DeepseekV3ForCausalLM (fp32, eager).

Each case writes a checkpoint with transformers' own ``save_pretrained`` (per-expert 2-D names on disk, as R1),
loads it with ``goldstick.load_model`` and compares logits on the same token ids: max|diff| / max|ref| <= 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the parity oracle needs the test extra (torch, transformers)")
transformers = pytest.importorskip("transformers")

import mindspore as ms  # noqa: E402

import goldstick  # noqa: E402
from goldstick.model.config import ModelConfig  # noqa: E402

TOLERANCE = 1e-4

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
            q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=2, topk_group=1,
            num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256, rope_theta=10000.0,
            routed_scaling_factor=2.5, norm_topk_prob=True)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}

CASES = {
    "q-lora-yarn-groups": dict(rope_scaling=YARN),
    "no-q-lora-no-yarn": dict(q_lora_rank=None),
    "two-dense-layers-4-groups": dict(num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=16, n_group=4,
                                      topk_group=2, num_experts_per_tok=3, rope_scaling=YARN),
    "no-norm-topk-two-shared": dict(norm_topk_prob=False, n_shared_experts=2, routed_scaling_factor=1.0),
    "rope-not-interleaved": dict(rope_interleave=False, rope_scaling=YARN),
}


def write_hf_checkpoint(directory, seed: int = 0, **overrides):
    """A randomly initialised transformers DeepseekV3 saved in HF layout; weights large enough to matter."""
    config = transformers.DeepseekV3Config(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.3 if "embed" in name else 0.15)
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:
                buf.normal_(0.0, 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def relative_error(ref: np.ndarray, out: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf = write_hf_checkpoint(tmp_path, **CASES[case])
    ids = np.random.RandomState(1).randint(0, BASE["vocab_size"], size=(2, 13))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    net = goldstick.load_model(tmp_path)
    out = net(ms.Tensor(ids.astype(np.int32))).asnumpy()
    assert out.shape == ref.shape and out.dtype == np.float32
    assert relative_error(ref, out) <= TOLERANCE


def test_yarn_changes_the_softmax_scale_like_transformers(tmp_path):
    write_hf_checkpoint(tmp_path, rope_scaling=YARN)
    cfg = ModelConfig.from_file(tmp_path)
    hf_attn = transformers.models.deepseek_v3.modeling_deepseek_v3
    expected = hf_attn.yarn_apply_mscale(dict(YARN, rope_type="yarn"), cfg.qk_head_dim ** -0.5)
    assert cfg.softmax_scale == pytest.approx(expected, rel=1e-12)
    assert cfg.softmax_scale > cfg.qk_head_dim ** -0.5 * 1.2  # mscale^2 with factor 4 is ~1.29


def test_batch_of_different_lengths_matches_each_sequence_alone(tmp_path):
    """Right- and left-padded batches give, on the real tokens, the logits of each sequence run alone in HF."""
    hf = write_hf_checkpoint(tmp_path, rope_scaling=YARN, num_hidden_layers=4, first_k_dense_replace=2)
    rng = np.random.RandomState(2)
    lengths = [13, 7, 10]
    seqs = [rng.randint(2, BASE["vocab_size"], size=n) for n in lengths]
    net = goldstick.load_model(tmp_path)
    width = max(lengths)
    for side in ("right", "left"):
        ids = np.zeros((len(seqs), width), dtype=np.int32)
        mask = np.zeros((len(seqs), width), dtype=np.int32)
        for row, seq in enumerate(seqs):
            span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
            ids[row, span], mask[row, span] = seq, 1
        out = net(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
        for row, seq in enumerate(seqs):
            with torch.no_grad():
                ref = hf(torch.tensor(seq[None])).logits.numpy()[0]
            got = out[row][mask[row].astype(bool)]
            assert relative_error(ref, got) <= TOLERANCE, (side, row)


def test_bf16_and_fp8_copies_give_the_f32_logits_within_their_precision(tmp_path):
    """make_model writes one set of weights as F32, as BF16 and as R1-style FP8 blocks across shards; the network
    read from each copy gives the F32 logits up to the storage format's rounding (bf16: 8 mantissa bits, e4m3: 3).

    Measured as RMS relative error: a rounding can flip a token's expert choice, and one flipped token sets the
    max-abs error of the whole batch."""
    from goldstick.testing.make_model import make_model

    ids = ms.Tensor(np.random.RandomState(0).randint(3, 3000, (2, 32)).astype(np.int32))
    logits = {kind: goldstick.load_model(make_model(tmp_path / kind, **kw))(ids).asnumpy()
              for kind, kw in (("f32", {}), ("bf16", {"dtype": "bf16"}), ("fp8", {"fp8": True}))}
    ref = logits["f32"]

    def rms(other):
        return float(np.sqrt(np.mean((other - ref) ** 2) / np.mean(ref ** 2)))

    bf16, fp8 = rms(logits["bf16"]), rms(logits["fp8"])
    assert 0 < bf16 <= 1.5e-2  # measured 4.5e-3
    assert bf16 < fp8 <= 6e-2  # measured 2.1e-2
    assert (logits["bf16"].argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    assert (logits["fp8"].argmax(-1) == ref.argmax(-1)).mean() >= 0.8
