"""DeepSeek-R1 at its real size: ``goldstick make-model --size r1`` (``make_r1_model``).

R1's architecture exactly as the release's ``config.json`` gives it (``r1_config``: hidden 7168, 61 layers of which
the first 3 dense with intermediate 18432, then 256 routed experts of 2048 + 1 shared, top-8 in 8 groups keeping 4,
routed_scaling_factor 2.5, q_lora 1536, kv_lora 512, 128 heads, rope/nope/v 64/128/128, vocab 129280, YaRN factor 40
over 4096 positions, one MTP layer), any field replaceable for slices (``--set n_routed_experts=16``), written in the
release's layout: FP8 e4m3 linears with float32 128x128 ``weight_scale_inv``, bf16 embeddings, norms, router, heads
and ``eh_proj``, float32 ``e_score_correction_bias``, ~5 GB shards ``model-00001-of-0000NN.safetensors`` and the
index, the MTP layer ``model.layers.{num_hidden_layers}.*`` with its own ``embed_tokens``, ``enorm``/``hnorm``,
``eh_proj`` and ``shared_head``. The tokenizer is the project's bundled BPE tokenizer (a real ``tokenizer.json``;
vocabulary rows past it are never predicted).

How it stays fast and bounded (an R1 MoE layer is 11 G parameters):

* **FP8 codes straight from a counter-based RNG.** Every FP8 weight is drawn as bytes: a splitmix64 stream per row
  (seeded by the seed, the tensor's name and the row) gives four 16-bit uniforms per step, and a 65536-entry table
  maps each to the e4m3 code of the matching normal quantile, scaled so the table's extremes are +-448. The block
  scales (``weight_scale_inv``) carry the weight's standard deviation, with a +-10 % log-normal jitter per block as
  in the release. A numba kernel runs the rows on every core (the numpy fallback gives the same bytes); no float
  weight is ever made for an expert that the statistics pass does not run.
* **Written in place.** The shards are planned from the tensor list (``PlannedShardWriter``) and each tensor's bytes
  are written at their offset as soon as they exist, the embeddings and heads (129280 x 7168) in row chunks: memory
  is one dense MLP projection or one chunk, whatever the number of experts or layers.
* **The same planted outliers and statistics pass as the small models** (``goldstick.testing.synthetic``): massive
  and offset channels in ``embed_tokens``, the norm gains, the damped read/write columns and rows (applied to the
  FP8 blocks they touch: those blocks are decoded, edited and re-encoded with amax/448), bigram embeddings and head.
  The float32 statistics pass runs on the corpus tokens through the decoded attention and MLP to set q_b_proj,
  o_proj, down_proj and router scales; in an MoE layer it runs the routed experts of a bounded sample
  (``STATISTICS_EXPERTS``, all of them in slices of up to that many) and scales their summed output by
  sqrt(experts / sampled), the experts being independent draws.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from goldstick.io.writer import PlannedShardWriter, pwrite_array, write_json_atomic
from goldstick.model.architecture import fp8_linear, route
from goldstick.model.config import ConfigError, ModelConfig
from goldstick.model.tokenizer import build_tokenizer, train_tokenizer
from goldstick.quant.fp8 import (
    BLOCK,
    FP8,
    FP8_MAX,
    FP8_TO_F32,
    dequantize_fp8_blocks,
    quantize_fp8_blocks,
    scale_grid_shape,
)
from goldstick.testing.synthetic import (
    ATTENTION_SPREAD,
    BIGRAM_FRACTION,
    GENERATION_CONFIG,
    MASSIVE_READ,
    OFFSET_STD,
    PLANTED_WRITE,
    R1_EXTRA,
    R1_FP8_QUANTIZATION_CONFIG,
    ROUTER_LOGIT_STD,
    SUBLAYER_SCALE,
    TOKENIZER_VOCAB,
    WeightBuilder,
    attention,
    attention_scores,
    parameter_counts,
    rmsnorm,
    round3,
    score_spread,
    tensor_rng,
    tensor_shapes,
)

try:
    import numba
except Exception:  # the numpy code below gives the same bytes, slower
    numba = None

R1_ROPE_SCALING = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "original_max_position_embeddings": 4096, "type": "yarn"}
R1_MAX_POSITIONS = 163840
R1_SHARD_BYTES = 5_000_000_000
R1_CONTENT_VERSION = 1
BIGRAM_RANK_CAP = 512  # the bigram factors' rank (3/8 of hidden would be 2688: a 4096-token SVD of minutes)
STATISTICS_EXPERTS = 16  # routed experts the statistics pass runs in an MoE layer
ROW_CHUNK = 8192  # rows per chunk of the embeddings and heads (each chunk has its own random stream)
BLOCK_JITTER = 0.1  # log-normal spread of the block scales around the weight's standard deviation

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def r1_config(overrides: dict | None = None) -> ModelConfig:
    """The release's config (``ModelConfig()`` defaults are R1's), with ``overrides`` for slices."""
    cfg = ModelConfig(max_position_embeddings=R1_MAX_POSITIONS, rope_scaling=dict(R1_ROPE_SCALING),
                      num_nextn_predict_layers=1, torch_dtype="bfloat16",
                      quantization_config=dict(R1_FP8_QUANTIZATION_CONFIG), extra=dict(R1_EXTRA))
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cfg)})
        if unknown:
            raise ConfigError(f"make_model overrides: {', '.join(unknown)} are not DeepSeek-V3 config fields")
        cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate(source=f"make_model --size r1 overrides {overrides or {}}")
    return cfg


# ---- FP8 codes from a counter-based RNG ----------------------------------------------------------------------
def _normal_table() -> np.ndarray:
    """uint16 -> the normal quantile (k + 0.5) / 65536, float32 (random normals for the bf16 tensors)."""
    normal = statistics.NormalDist()
    return np.array([normal.inv_cdf((k + 0.5) / 65536) for k in range(65536)], dtype=np.float32)


NORMAL_TABLE = _normal_table()
CODE_TABLE = (NORMAL_TABLE * np.float32(FP8_MAX / NORMAL_TABLE.max())).astype(FP8).view(np.uint8)
CODE_STD = float(np.std(FP8_TO_F32[CODE_TABLE].astype(np.float64)))  # std of the decoded codes (~107)


def _mix_numpy(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def _codes_numpy(out: np.ndarray, table: np.ndarray, seed: int) -> None:
    rows, cols = out.shape
    with np.errstate(over="ignore"):
        state = _mix_numpy(np.uint64(seed) ^ ((np.arange(rows, dtype=np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)))
        for j in range(0, cols, 4):
            state += np.uint64(_GOLDEN)
            z = _mix_numpy(state.copy())
            for k in range(min(4, cols - j)):
                out[:, j + k] = table[((z >> np.uint64(16 * k)) & np.uint64(0xFFFF)).astype(np.intp)]


if numba is not None:
    @numba.njit(cache=True, nogil=True, inline="always")
    def _mix_numba(z):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        return z ^ (z >> np.uint64(31))

    @numba.njit(cache=True, nogil=True, parallel=True)
    def _codes_numba(out, table, seed):
        rows, cols = out.shape
        golden = np.uint64(_GOLDEN)
        mask = np.uint64(0xFFFF)
        for r in numba.prange(rows):
            state = _mix_numba(np.uint64(seed) ^ ((np.uint64(r) + np.uint64(1)) * golden))
            row = out[r]
            for j in range(0, cols, 4):
                state = state + golden
                z = _mix_numba(state)
                for k in range(min(4, cols - j)):
                    row[j + k] = table[np.intp((z >> np.uint64(16 * k)) & mask)]


    @numba.njit(cache=True, nogil=True, parallel=True)
    def _decode_numba(codes, scale, lut, out):
        rows, cols = codes.shape
        for r in numba.prange(rows):
            srow = scale[r // 128]
            for c in range(cols):
                out[r, c] = lut[codes[r, c]] * srow[c // 128]


def random_codes(shape: tuple[int, int], seed: int, use_numba: bool = True, table: np.ndarray = CODE_TABLE
                 ) -> np.ndarray:
    """e4m3 codes (uint8) of a standard-normal-shaped weight: row r is a splitmix64 stream of ``seed`` and r, so
    the bytes do not depend on the thread count or on numba. ``table=NORMAL_TABLE``: float32 standard normals."""
    out = np.empty(shape, dtype=table.dtype)
    if numba is not None and use_numba:
        _codes_numba(out, table, np.uint64(seed))
    else:
        _codes_numpy(out, table, seed)
    return out


def tensor_seed(seed: int, name: str) -> int:
    return ((seed & 0xFFFFFFFF) << 32) | zlib.crc32(name.encode())


@dataclass
class Fp8Spec:
    """One FP8 linear: random codes of standard deviation ``std``, with some rows and columns multiplied."""

    name: str  # the weight's name (``..._proj.weight``)
    shape: tuple[int, int]
    std: float
    rows: dict[int, float] = field(default_factory=dict)
    cols: dict[int, float] = field(default_factory=dict)


def fp8_weight(spec: Fp8Spec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8, scale_inv float32) of ``spec`` before any statistics factor (a scalar on scale_inv)."""
    codes = random_codes(spec.shape, tensor_seed(seed, spec.name))
    grid = scale_grid_shape(spec.shape)
    jitter = np.exp(tensor_rng(seed, spec.name + "#blocks").standard_normal(grid) * BLOCK_JITTER)
    scale = (spec.std / CODE_STD * jitter).astype(np.float32)
    if spec.rows:
        factors = np.ones(spec.shape[0], np.float32)
        factors[list(spec.rows)] = list(spec.rows.values())
        for band in sorted({r // BLOCK for r in spec.rows}):
            _requantize(codes, scale, slice(band * BLOCK, (band + 1) * BLOCK), slice(None),
                        factors[band * BLOCK:(band + 1) * BLOCK, None])
    if spec.cols:
        factors = np.ones(spec.shape[1], np.float32)
        factors[list(spec.cols)] = list(spec.cols.values())
        for band in sorted({c // BLOCK for c in spec.cols}):
            _requantize(codes, scale, slice(None), slice(band * BLOCK, (band + 1) * BLOCK),
                        factors[None, band * BLOCK:(band + 1) * BLOCK])
    return codes, scale


def _requantize(codes, scale, rows: slice, cols: slice, factors: np.ndarray) -> None:
    """Decode the blocks of codes[rows, cols], multiply by ``factors`` and encode them again (amax / 448)."""
    part = codes[rows, cols]
    r0 = (rows.start or 0) // BLOCK
    c0 = (cols.start or 0) // BLOCK
    gr, gc = scale_grid_shape(part.shape)
    block_scale = scale[r0:r0 + gr, c0:c0 + gc]
    values = FP8_TO_F32[part] * np.repeat(np.repeat(block_scale, BLOCK, 0)[:part.shape[0]], BLOCK, 1)[:, :part.shape[1]]
    q, s = quantize_fp8_blocks(values * factors)
    codes[rows, cols] = q.view(np.uint8)
    scale[r0:r0 + gr, c0:c0 + gc] = s


def decode(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 weight of FP8 codes and block scales (the float32 products goldstick.quant.fp8 makes)."""
    if numba is None:
        return dequantize_fp8_blocks(codes.view(FP8), scale)
    out = np.empty(codes.shape, np.float32)
    _decode_numba(codes, scale, FP8_TO_F32, out)
    return out


# ---- the plan of the checkpoint --------------------------------------------------------------------------------
def stored_specs(cfg: ModelConfig) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every stored tensor in writing order; an FP8 weight's scale follows it."""
    specs = []
    for name, shape in tensor_shapes(cfg).items():
        if name.endswith("e_score_correction_bias"):
            specs.append((name, np.dtype(np.float32), shape))
        elif fp8_linear(name):
            specs.append((name, np.dtype(FP8), shape))
            specs.append((f"{name}_scale_inv", np.dtype(np.float32), scale_grid_shape(shape)))
        else:
            specs.append((name, np.dtype(ml_dtypes.bfloat16), shape))
    return specs


class R1Builder(WeightBuilder):
    """Writes the tensors of an R1-sized checkpoint into an opened PlannedShardWriter, running the statistics pass
    layer by layer (``WeightBuilder``'s, on the decoded FP8 weights)."""

    def __init__(self, cfg: ModelConfig, seed: int, writer: PlannedShardWriter, progress: bool = False):
        super().__init__(cfg, seed)
        self.writer, self.progress = writer, progress
        self.n_tok = build_tokenizer(TOKENIZER_VOCAB).get_vocab_size()
        self.rank = min(int(round(BIGRAM_FRACTION * self.h)), BIGRAM_RANK_CAP)
        self.timings: dict[str, float] = {}
        self.pending: dict[str, np.ndarray] = {}  # block scales waiting for their statistics factor

    # -- writing helpers
    def put(self, name: str, array: np.ndarray, row: int = 0) -> None:
        path, offset, nbytes = self.writer.location(name)
        data = np.ascontiguousarray(array)
        row_bytes = nbytes // self.shape_of(name)[0] if row else 0
        pwrite_array(path, offset + row * row_bytes, data, write_back=data.nbytes >= (16 << 20))

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def put_fp8(self, spec: Fp8Spec, decoded: bool = False, scaled_later: bool = False):
        """Write one FP8 linear's codes and (unless ``scaled_later``: ``put_scale`` does) its scale; returns its
        float32 weight if ``decoded``."""
        codes, scale = fp8_weight(spec, self.seed)
        self.put(spec.name, codes)
        if scaled_later:
            self.pending[spec.name] = scale
        else:
            self.put(f"{spec.name}_scale_inv", scale)
        return decode(codes, scale) if decoded else None

    def put_scale(self, spec: Fp8Spec, factor: float) -> None:
        """Write the scale of a linear written with ``scaled_later``, times the statistics pass's factor."""
        self.put(f"{spec.name}_scale_inv", self.pending.pop(spec.name) * np.float32(factor))

    # -- embeddings and heads, in row chunks
    def embedding_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of embed_tokens (float32); the chunk's random streams depend on the chunk only."""
        chunk = start // ROW_CHUNK
        name = "model.embed_tokens.weight"
        emb = random_codes((stop - start, self.h), tensor_seed(self.seed, f"{name}#{chunk}"), table=NORMAL_TABLE)
        lo, hi = start, min(stop, self.n_tok)
        if hi > lo:
            emb[:hi - lo, self.bigram_channels] = self.bigram_x[lo:hi]
        rows = np.array([t for t in sorted(self.planted.massive_tokens) if start <= t < stop], dtype=np.intp)
        jitter = self.normal(f"embed-massive-jitter#{chunk}", (stop - start, len(self.planted.massive)), 0.03)
        for j, (c, a) in enumerate(self.planted.massive.items()):
            emb[rows - start, c] = a * (1.0 + jitter[rows - start, j])
        spread = self.normal(f"embed-offset-spread#{chunk}", (stop - start, len(self.planted.offset)), OFFSET_STD)
        for j, (c, m) in enumerate(self.planted.offset.items()):
            emb[:, c] = m + spread[:, j]
        return emb

    def head_rows(self, start: int, stop: int) -> np.ndarray:
        chunk = start // ROW_CHUNK
        head = random_codes((stop - start, self.h), tensor_seed(self.seed, f"lm_head.weight#{chunk}"),
                            table=NORMAL_TABLE)
        head *= np.float32(0.02 / np.sqrt(self.h))
        lo, hi = start, min(stop, self.n_tok)
        if hi > lo:
            head[:hi - lo, self.bigram_channels] = self.bigram_y[lo:hi] * self.head_gain[None, :]
        unigram = np.full(stop - start, -30.0, np.float32)  # rows past the tokenizer: never predicted
        if hi > lo:
            unigram[:hi - lo] = self.unigram[lo:hi]
        head[:, self.planted.special] = (unigram[:, None] * self.head_coef[None, :]).astype(np.float32)
        return head

    def put_rows(self, name: str, make) -> None:
        rows = self.shape_of(name)[0]
        for start in range(0, rows, ROW_CHUNK):
            stop = min(rows, start + ROW_CHUNK)
            self.put(name, make(start, stop).astype(ml_dtypes.bfloat16), row=start)

    # -- the whole model
    def write(self) -> None:
        cfg = self.cfg
        self.shapes = {name: shape for name, _, shape in stored_specs(cfg)}
        started = time.time()
        x, y, unigram, _ = self.bigram_factors(self.rank)
        self.bigram_x, self.bigram_y, self.unigram = x.astype(np.float32), y.astype(np.float32), unigram
        self.bigram_channels = self.ordinary[:self.rank]
        self.put_rows("model.embed_tokens.weight", self.embedding_rows)
        emb = self.embedding_rows(0, min(ROW_CHUNK, cfg.vocab_size))  # every statistics token is in chunk 0
        self.timings["embeddings"] = time.time() - started
        hidden = emb[self.tokens]
        bar = tqdm(total=cfg.num_hidden_layers + cfg.num_nextn_predict_layers, desc="make-model r1", unit="layer",
                   disable=not self.progress)
        for layer in range(cfg.num_hidden_layers):
            started = time.time()
            _, hidden = self.layer(layer, hidden)
            self.timings[f"layer {layer}"] = round(time.time() - started, 2)
            bar.update()
        final_norm = self.norm_weight("model.norm.weight", self.h)
        self.put("model.norm.weight", final_norm.astype(ml_dtypes.bfloat16))
        self.head_gain, self.head_coef = self.head_fit(hidden, final_norm)
        self.put_rows("lm_head.weight", self.head_rows)
        for layer in range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
            started = time.time()
            # WeightBuilder.mtp_layer: embed_tokens, enorm, hnorm, eh_proj, the block (self.layer writes it),
            # shared_head; the embedding and head copies are written in row chunks
            for name, value in self.mtp_layer(layer, emb, hidden, None, final_norm):
                if name.endswith("embed_tokens.weight"):
                    self.put_rows(name, self.embedding_rows)
                elif name.endswith("shared_head.head.weight"):
                    self.put_rows(name, self.head_rows)
                else:
                    self.put(name, value.astype(ml_dtypes.bfloat16))
            self.timings[f"layer {layer}"] = round(time.time() - started, 2)
            bar.update()
        bar.close()

    # -- one decoder layer, written as it is made
    def layer(self, layer: int, hidden: np.ndarray):
        cfg, pl = self.cfg, self.planted
        p, a = f"model.layers.{layer}", f"model.layers.{layer}.self_attn"
        h, n = self.h, cfg.num_attention_heads
        massive_cols = {c: MASSIVE_READ / abs(v) for c, v in pl.massive.items()}
        write_rows = {c: PLANTED_WRITE for c in pl.special}
        v_rows = {}
        for c, g in pl.v_gain[layer].items():
            head, d = divmod(c, cfg.v_head_dim)
            v_rows[head * (cfg.qk_nope_head_dim + cfg.v_head_dim) + cfg.qk_nope_head_dim + d] = g
        specs = {
            "q_a_proj": Fp8Spec(f"{a}.q_a_proj.weight", (cfg.q_lora_rank, h), h ** -0.5, cols=massive_cols),
            "q_b_proj": Fp8Spec(f"{a}.q_b_proj.weight", (n * cfg.qk_head_dim, cfg.q_lora_rank),
                                cfg.q_lora_rank ** -0.5),
            "kv_a_proj_with_mqa": Fp8Spec(f"{a}.kv_a_proj_with_mqa.weight",
                                          (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h), h ** -0.5, cols=massive_cols),
            "kv_b_proj": Fp8Spec(f"{a}.kv_b_proj.weight", (n * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                                          cfg.kv_lora_rank), cfg.kv_lora_rank ** -0.5, rows=v_rows),
            "o_proj": Fp8Spec(f"{a}.o_proj.weight", (h, n * cfg.v_head_dim), (n * cfg.v_head_dim) ** -0.5,
                              rows=write_rows),
        }
        w = {f"{p}.input_layernorm.weight": self.norm_weight(f"{p}.input_layernorm.weight", h,
                                                             pl.input_norm_gain[layer]),
             f"{a}.q_a_layernorm.weight": self.norm_weight(f"{a}.q_a_layernorm.weight", cfg.q_lora_rank,
                                                           pl.q_a_norm_gain[layer]),
             f"{a}.kv_a_layernorm.weight": self.norm_weight(f"{a}.kv_a_layernorm.weight", cfg.kv_lora_rank)}
        for name, value in w.items():
            self.put(name, value.astype(ml_dtypes.bfloat16))
        for local, spec in specs.items():
            w[spec.name] = self.put_fp8(spec, decoded=True, scaled_later=local in ("q_b_proj", "o_proj"))
        stats: dict = {}
        target = SUBLAYER_SCALE * self._typical(hidden)
        x = rmsnorm(hidden, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
        spread = score_spread(attention_scores(cfg, w, a, x)[0])
        f_q = round3(ATTENTION_SPREAD / spread)
        w[f"{a}.q_b_proj.weight"] *= np.float32(f_q)
        self.put_scale(specs["q_b_proj"], f_q)
        stats["attention_spread"] = round(spread * f_q, 3)  # the logits are linear in q_b_proj
        attn = attention(cfg, w, a, x) @ w[f"{a}.o_proj.weight"].T
        f_o = round3(target / self._typical(attn))
        self.put_scale(specs["o_proj"], f_o)
        hidden = hidden + attn * np.float32(f_o)
        del w, attn

        post = self.norm_weight(f"{p}.post_attention_layernorm.weight", h, pl.post_norm_gain[layer])
        self.put(f"{p}.post_attention_layernorm.weight", post.astype(ml_dtypes.bfloat16))
        flat = rmsnorm(hidden, post, cfg.rms_norm_eps).reshape(-1, h)
        if cfg.is_moe_layer(layer):
            out, downs = self.moe(layer, flat, massive_cols, write_rows, stats)
        else:
            downs = self.mlp_specs(f"{p}.mlp", cfg.intermediate_size, massive_cols, write_rows)
            out = self.run_mlp(downs, flat)
            downs = [downs]
        f = round3(target / self._typical(out))
        for spec in downs:
            self.put_scale(spec["down_proj"], f)
        hidden = hidden + out.reshape(hidden.shape) * np.float32(f)
        stats["residual_typical"] = round(self._typical(hidden), 4)
        on = np.isin(self.positions_ids, list(self.planted.massive_tokens))
        stats["residual_massive"] = [round(float(np.mean(hidden[..., c][on])), 2) for c in self.planted.massive]
        stats["residual_offset"] = [round(float(np.mean(hidden[..., c])), 2) for c in self.planted.offset]
        self.report["layers"][layer] = stats
        return {}, hidden

    def mlp_specs(self, prefix: str, inter: int, massive_cols: dict, write_rows: dict) -> dict[str, Fp8Spec]:
        h = self.h
        return {"gate_proj": Fp8Spec(f"{prefix}.gate_proj.weight", (inter, h), h ** -0.5, cols=massive_cols),
                "up_proj": Fp8Spec(f"{prefix}.up_proj.weight", (inter, h), h ** -0.5, cols=massive_cols),
                "down_proj": Fp8Spec(f"{prefix}.down_proj.weight", (h, inter), inter ** -0.5, rows=write_rows)}

    def run_mlp(self, specs: dict[str, Fp8Spec], x: np.ndarray | None) -> np.ndarray | None:
        """Write one MLP's three linears; with inputs ``x``, also its float output (factor 1), one weight at a
        time in float32."""
        if x is None:
            for local, spec in specs.items():
                self.put_fp8(spec, scaled_later=local == "down_proj")
            return None
        g = x @ self.put_fp8(specs["gate_proj"], decoded=True).T
        u = x @ self.put_fp8(specs["up_proj"], decoded=True).T
        hidden = g / (1.0 + np.exp(-g)) * u
        del g, u
        return hidden @ self.put_fp8(specs["down_proj"], decoded=True, scaled_later=True).T

    def moe(self, layer: int, flat: np.ndarray, massive_cols: dict, write_rows: dict, stats: dict):
        cfg, m = self.cfg, f"model.layers.{layer}.mlp"
        gate = self.reads_residual(self.linear(f"{m}.gate.weight", cfg.n_routed_experts, self.h))
        gate *= np.float32(round3(ROUTER_LOGIT_STD / float(np.std(flat @ gate.T))))
        bias = self.normal(f"{m}.gate.e_score_correction_bias", (cfg.n_routed_experts,), 0.02)
        self.put(f"{m}.gate.weight", gate.astype(ml_dtypes.bfloat16))
        self.put(f"{m}.gate.e_score_correction_bias", bias)
        logits = flat @ gate.T
        weights, ids = route(cfg, 1.0 / (1.0 + np.exp(-logits)), bias)
        sampled = min(cfg.n_routed_experts, STATISTICS_EXPERTS)
        routed = np.zeros_like(flat)
        downs = []
        experts = range(cfg.n_routed_experts)
        for e in tqdm(experts, desc=f"layer {layer} experts", unit="expert", leave=False,
                      disable=not self.progress or cfg.n_routed_experts < 64):
            specs = self.mlp_specs(f"{m}.experts.{e}", cfg.moe_intermediate_size, massive_cols, write_rows)
            downs.append(specs)
            tok, slot = np.nonzero(ids == e)
            if e < sampled and tok.size:
                y = self.run_mlp(specs, flat[tok])
                np.add.at(routed, tok, y * weights[tok, slot, None])
            else:
                self.run_mlp(specs, None)
        routed *= np.float32(np.sqrt(cfg.n_routed_experts / sampled))
        shared_specs = self.mlp_specs(f"{m}.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts,
                                      massive_cols, write_rows)
        downs.append(shared_specs)
        shared = self.run_mlp(shared_specs, flat)
        load = np.bincount(ids.ravel(), minlength=cfg.n_routed_experts) / ids.size
        stats["experts_used"] = int((load > 0).sum())
        stats["expert_load_max"] = round(float(load.max()), 4)
        stats["statistics_experts"] = sampled
        return routed + shared, downs


def make_r1_model(out_dir: str | Path, overrides: dict | None = None, seed: int = 0,
                  max_shard_bytes: int | None = None, overwrite: bool = False, progress: bool = False) -> Path:
    """Write an R1-architecture FP8 checkpoint (the release's layout) into ``out_dir``; returns the path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    cfg = r1_config(overrides)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = PlannedShardWriter(tmp, max_shard_bytes=max_shard_bytes or R1_SHARD_BYTES)
        for name, dtype, shape in stored_specs(cfg):
            writer.add(name, np.broadcast_to(np.zeros((), dtype), shape))
        writer.open()
        builder = R1Builder(cfg, seed, writer, progress=progress)
        try:
            builder.write()
        except BaseException:
            writer.abort()
            raise
        writer.close()
        cfg.save(tmp)
        write_json_atomic(tmp / "generation_config.json", GENERATION_CONFIG)
        train_tokenizer(TOKENIZER_VOCAB, tmp, model_max_length=cfg.max_position_embeddings)
        write_json_atomic(tmp / "make_model.json", {
            "size": "r1", "seed": seed, "fp8": True, "dtype": "bf16", "content_version": R1_CONTENT_VERSION,
            **({"overrides": dict(overrides)} if overrides else {}),
            "parameters": parameter_counts(cfg), "planted": builder.planted.to_json(),
            "bigram_channels": [int(c) for c in builder.bigram_channels], "statistics": builder.report,
            "seconds": builder.timings})
        if out_dir.exists():
            shutil.rmtree(out_dir) if overwrite else out_dir.rmdir()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


