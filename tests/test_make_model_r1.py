"""goldstick make-model --size r1: R1's architecture in the release's layout, on a slice small enough for CI
(2 layers, 1 dense + 1 MoE, 4 routed experts, vocabulary cut to 8192; every width R1's)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from goldstick.io.checkpoint import CheckpointReader
from goldstick.testing.r1_model import R1_ROPE_SCALING, Fp8Spec, decode, fp8_weight, r1_config, random_codes

SLICE = {"num_hidden_layers": 2, "first_k_dense_replace": 1, "n_routed_experts": 4, "n_group": 2, "topk_group": 1,
         "num_experts_per_tok": 2, "vocab_size": 8192}
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{6})\.safetensors")


def _release_layer(i: int, moe: bool, experts: int) -> dict[str, tuple[str, tuple]]:
    """The release index's tensors of decoder layer i (DeepSeek-R1 model.safetensors.index.json), written out by
    hand from the release rather than from goldstick's own config code."""
    p = f"model.layers.{i}"
    out = {f"{p}.input_layernorm.weight": ("BF16", (7168,)),
           f"{p}.post_attention_layernorm.weight": ("BF16", (7168,)),
           f"{p}.self_attn.q_a_layernorm.weight": ("BF16", (1536,)),
           f"{p}.self_attn.kv_a_layernorm.weight": ("BF16", (512,))}

    def fp8(name, shape):
        out[name + ".weight"] = ("F8_E4M3", shape)
        out[name + ".weight_scale_inv"] = ("F32", (-(-shape[0] // 128), -(-shape[1] // 128)))

    fp8(f"{p}.self_attn.q_a_proj", (1536, 7168))
    fp8(f"{p}.self_attn.q_b_proj", (24576, 1536))
    fp8(f"{p}.self_attn.kv_a_proj_with_mqa", (576, 7168))
    fp8(f"{p}.self_attn.kv_b_proj", (32768, 512))
    fp8(f"{p}.self_attn.o_proj", (7168, 16384))
    mlps = [(f"{p}.mlp.experts.{e}", 2048) for e in range(experts)] + [(f"{p}.mlp.shared_experts", 2048)] \
        if moe else [(f"{p}.mlp", 18432)]
    for prefix, inter in mlps:
        fp8(f"{prefix}.gate_proj", (inter, 7168))
        fp8(f"{prefix}.up_proj", (inter, 7168))
        fp8(f"{prefix}.down_proj", (7168, inter))
    if moe:
        out[f"{p}.mlp.gate.weight"] = ("BF16", (experts, 7168))
        out[f"{p}.mlp.gate.e_score_correction_bias"] = ("F32", (experts,))
    return out


@pytest.fixture(scope="module")
def r1_slice(tmp_path_factory):
    out = tmp_path_factory.mktemp("r1") / "slice"
    sets = [arg for key, value in SLICE.items() for arg in ("--set", f"{key}={value}")]
    code = ("import resource, sys\nfrom goldstick.cli import main\nrc = main(sys.argv[1:])\n"
            "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "make-model", "--size", "r1", "--out", str(out),
                           "--shard-size", "500", *sets], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    peak = int(re.search(r"maxrss_kb (\d+)", done.stdout).group(1)) * 1024
    return out, peak


def test_layout_names_dtypes_and_shapes_are_the_releases(r1_slice):
    out, _ = r1_slice
    index = json.loads((out / "model.safetensors.index.json").read_text())
    expected = {"model.embed_tokens.weight": ("BF16", (8192, 7168)), "model.norm.weight": ("BF16", (7168,)),
                "lm_head.weight": ("BF16", (8192, 7168))}
    expected.update(_release_layer(0, False, 4))
    expected.update(_release_layer(1, True, 4))
    expected.update(_release_layer(2, True, 4))  # the MTP layer: a full MoE block ...
    expected.update({"model.layers.2.embed_tokens.weight": ("BF16", (8192, 7168)),  # ... plus its own tensors
                     "model.layers.2.enorm.weight": ("BF16", (7168,)), "model.layers.2.hnorm.weight": ("BF16", (7168,)),
                     "model.layers.2.eh_proj.weight": ("BF16", (7168, 14336)),
                     "model.layers.2.shared_head.norm.weight": ("BF16", (7168,)),
                     "model.layers.2.shared_head.head.weight": ("BF16", (8192, 7168))})
    assert set(index["weight_map"]) == set(expected)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(SHARD_RE.fullmatch(s) for s in shards)
    total = 0
    for shard in shards:
        with safe_open(out / shard, framework="numpy") as f:
            for name in f.keys():
                info = f.get_slice(name)
                assert (info.get_dtype(), tuple(info.get_shape())) == expected[name], name
                total += int(np.prod(info.get_shape())) * {"BF16": 2, "F32": 4, "F8_E4M3": 1}[info.get_dtype()]
    assert index["metadata"]["total_size"] == total


def test_config_is_the_releases_and_the_reader_accepts_it(r1_slice):
    out, _ = r1_slice
    config = json.loads((out / "config.json").read_text())
    for key, value in {"hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
                       "q_lora_rank": 1536, "kv_lora_rank": 512, "num_attention_heads": 128, "qk_nope_head_dim": 128,
                       "qk_rope_head_dim": 64, "v_head_dim": 128, "routed_scaling_factor": 2.5,
                       "n_shared_experts": 1, "num_nextn_predict_layers": 1, "max_position_embeddings": 163840,
                       "rope_scaling": R1_ROPE_SCALING, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
                       "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                               "weight_block_size": [128, 128]}, **SLICE}.items():
        assert config[key] == value, key
    full = r1_config()  # unsliced: R1 itself
    assert (full.num_hidden_layers, full.first_k_dense_replace, full.n_routed_experts, full.num_experts_per_tok,
            full.n_group, full.topk_group, full.vocab_size) == (61, 3, 256, 8, 8, 4, 129280)
    reader = CheckpointReader(out)
    assert reader.mtp_layers() == [2]
    assert (out / "tokenizer.json").is_file()
    w = reader.read("model.layers.1.mlp.experts.3.up_proj.weight")  # FP8 decoded with its block scales
    assert np.isfinite(w).all() and 0.5 < float(w.std()) * 7168 ** 0.5 < 2.0


def test_statistics_and_planted_outliers(r1_slice):
    out, _ = r1_slice
    info = json.loads((out / "make_model.json").read_text())
    assert info["size"] == "r1" and info["overrides"] == SLICE
    planted = info["planted"]["massive"]
    for stats in info["statistics"]["layers"].values():
        assert 3.5 < stats["attention_spread"] < 4.5
        assert 0.5 < stats["residual_typical"] < 3.0
        # the massive channels persist through every layer, as in trained models
        for got, want in zip(stats["residual_massive"], planted.values()):
            assert abs(got - want) < 0.1 * abs(want)
    reader = CheckpointReader(out)
    emb = reader.read("model.embed_tokens.weight")
    channel, value = next(iter(planted.items()))
    bos = 0
    assert abs(emb[bos, int(channel)] - value) < 0.1 * abs(value)


def test_memory_stays_bounded(r1_slice):
    _, peak = r1_slice
    # one dense MLP projection decoded (18432 x 7168 float32, 0.5 GB) and the attention's float weights
    # (0.75 GB) for the statistics pass, plus the interpreter: whatever the number of experts or layers
    assert peak < 2.5e9, f"peak RSS {peak / 1e9:.2f} GB"


def test_codes_are_the_same_with_and_without_numba():
    for shape in [(3, 5), (130, 257), (256, 7)]:
        assert np.array_equal(random_codes(shape, 99), random_codes(shape, 99, use_numba=False))


def test_edited_blocks_keep_their_weights():
    """Planted rows and columns are applied to the FP8 blocks they touch; every other block keeps its bytes."""
    a = decode(*fp8_weight(Fp8Spec("w", (300, 260), 0.05), 1))
    b = decode(*fp8_weight(Fp8Spec("w", (300, 260), 0.05, rows={5: 0.01}, cols={200: 6.0}), 1))
    untouched = np.ones(a.shape, bool)
    untouched[:128] = False
    untouched[:, 128:256] = False
    assert np.array_equal(a[untouched], b[untouched])
    np.testing.assert_allclose(b[5, :128] / 0.01, a[5, :128], rtol=0.15, atol=1e-3)
    np.testing.assert_allclose(b[150:, 200] / 6.0, a[150:, 200], rtol=0.07, atol=1e-3)


@pytest.mark.parametrize("setting,fragment", [("n_routed_experts=5", "not divisible by n_group=8"),
                                              ("nonsense=5", "nonsense are not DeepSeek-V3 config fields")])
def test_a_bad_slice_is_one_error_line(tmp_path, capsys, setting, fragment):
    from goldstick.cli import main

    assert main(["make-model", "--size", "r1", "--out", str(tmp_path / "m"), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.count("goldstick: error: ") == 1 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
