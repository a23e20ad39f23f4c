"""Build small, deterministic DeepSeek-V3-architecture checkpoints in the exact HF/R1 layout.

    make_model(out_dir, size="tiny")                 # float32, exact (parity tests)
    make_model(out_dir, size="tiny", dtype="bf16")   # bfloat16 roundings of the same weights
    make_model(out_dir, size="tiny", fp8=True)       # R1 release format: FP8 blocks + weight_scale_inv, rest bf16
    make_model(out_dir, size="r1", overrides={"num_hidden_layers": 2})  # R1 itself (goldstick.testing.r1_model)
    default_model_path("tiny")                       # the f32 tiny model, built once into a cache folder

A model directory holds ``config.json`` (``ModelConfig.to_dict()`` plus R1's extra keys; ``quantization_config``
for FP8), ``generation_config.json``, the project's own tokenizer (``goldstick.model.tokenizer``), ``make_model.json``
(how it was made and which channels carry the planted outliers) and safetensors shards named like R1's
(``model-00001-of-000006.safetensors``) with ``model.safetensors.index.json``. Every HF tensor name of §1.2 of the
notes is present, including the MTP layer ``model.layers.{num_hidden_layers}.*`` (``embed_tokens``, ``enorm``,
``hnorm``, ``eh_proj``, ``shared_head.norm``, ``shared_head.head`` plus a full attention block and MoE), the router
``mlp.gate.weight`` and the float32 ``mlp.gate.e_score_correction_bias``. With ``fp8=True`` every linear R1 stores
in FP8 (q_a/q_b/kv_a/kv_b/o, dense MLP, routed and shared experts, in all layers including MTP) is float8_e4m3fn with
a float32 ``<name>_scale_inv`` of 128x128 blocks; the router, embeddings, norms, lm_head, eh_proj and shared_head
stay bf16. By default the shards are cut so there are five or six, and one ``weight_scale_inv`` is placed in the
shard after its weight's, as can happen in R1. All three formats of one seed are roundings of the same float32
weights.

Sizes (``SIZES``; vocab = the bundled tokenizer's size rounded up to a multiple of 128):

    size  hidden layers(dense) heads q_lora kv_lora rope/nope/v  inter  moe_inter experts  groups, routing
    tiny     256   4 (1)          4     96      64  16/32/32      512     128       16     4, keep 2, top-4
    wide    1024   6 (1)          8    384     256  32/64/64     2816     512       32     4, keep 2, top-6

Both have 1 shared expert, routed_scaling_factor 2.5, one MTP layer, and YaRN rope scaling shaped like R1's
(factor 4 over 256 original positions, so max_position_embeddings 1024). Some dimensions are deliberately not
multiples of 128 (tiny: kv_a is 64+16 = 80 rows, q_a 96 rows; wide: kv_a 288 rows), so FP8 blocks are ragged.

How the weights are made (planted outliers, the statistics pass, bigram embeddings) is
``goldstick.testing.synthetic``; how strong the planted outliers are, ``goldstick.testing.outliers``.

The CLI (``goldstick make-model``) is wired by ``add_make_model_parser`` / ``run_make_model``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import ml_dtypes
import numpy as np

from goldstick.io.writer import ShardedWriter, write_json_atomic
from goldstick.model.architecture import fp8_linear
from goldstick.model.config import ConfigError, ModelConfig
from goldstick.model.tokenizer import CORPUS_PATH, train_tokenizer
from goldstick.quant.fp8 import quantize_fp8_blocks
from goldstick.testing.synthetic import (
    GENERATION_CONFIG,
    R1_FP8_QUANTIZATION_CONFIG,
    SIZES,
    TOKENIZER_VOCAB,
    WeightBuilder,
    parameter_counts,
    size_config,
    tensor_shapes,
)

CONTENT_VERSION = 2  # bump when the generated weights change on purpose

DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16}


# ---- writing ---------------------------------------------------------------------------------------------------
def _stored(name: str, w: np.ndarray, fp8: bool, dtype) -> list[tuple[str, np.ndarray]]:
    if name.endswith("e_score_correction_bias"):
        return [(name, w.astype(np.float32))]
    if fp8 and fp8_linear(name):
        q, scale_inv = quantize_fp8_blocks(w)
        return [(name, q), (f"{name}_scale_inv", scale_inv)]
    return [(name, w.astype(dtype))]


def _stored_bytes(cfg: ModelConfig, fp8: bool, dtype) -> int:
    total = 0
    for name, shape in tensor_shapes(cfg).items():
        n = int(np.prod(shape))
        if name.endswith("e_score_correction_bias"):
            total += 4 * n
        elif fp8 and fp8_linear(name):
            total += n + 4 * int(np.prod([-(-d // 128) for d in shape]))
        else:
            total += n * np.dtype(dtype).itemsize
    return total


def make_model(out_dir: str | Path, size: str = "tiny", fp8: bool = False, max_shard_bytes: int | None = None,
               seed: int = 0, dtype: str | None = None, overwrite: bool = False,
               overrides: dict | None = None, progress: bool = False) -> Path:
    """Write a deterministic DeepSeek-V3-architecture checkpoint of ``size`` into ``out_dir``; returns the path.

    ``overrides`` replaces config fields of the size (e.g. ``{"hidden_size": 7168, "moe_intermediate_size": 2048}``
    for R1-width layers in benchmarks); they are recorded in make_model.json.

    ``dtype`` is the storage type of the non-FP8 tensors: ``"f32"`` (default without ``fp8``) or ``"bf16"``
    (default with ``fp8``, as in R1). ``max_shard_bytes`` defaults to about a fifth of the checkpoint. The
    directory is built next to ``out_dir`` and renamed into place when complete; ``out_dir`` must not exist or be
    empty (or pass ``overwrite=True``).
    """
    if size == "r1":  # R1's real size: FP8 as released, generated and written streaming (goldstick.testing.r1_model)
        if dtype not in (None, "bf16"):
            raise ValueError("--size r1 is written as the release is: FP8 linears, everything else bf16")
        from goldstick.testing.r1_model import make_r1_model  # imports numba: only for this size

        return make_r1_model(out_dir, overrides=overrides, seed=seed, max_shard_bytes=max_shard_bytes,
                             overwrite=overwrite, progress=progress)
    dtype = dtype or ("bf16" if fp8 else "f32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    np_dtype = DTYPES[dtype]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    cfg = size_config(size)
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cfg)})
        if unknown:
            raise ConfigError(f"make_model overrides: {', '.join(unknown)} are not DeepSeek-V3 config fields")
        cfg = dataclasses.replace(cfg, **overrides)
        cfg.validate(source=f"make_model overrides {overrides}")  # refuse now, not after writing gigabytes
    cfg.torch_dtype = "float32" if dtype == "f32" and not fp8 else "bfloat16"
    if fp8:
        cfg.quantization_config = dict(R1_FP8_QUANTIZATION_CONFIG)
    if max_shard_bytes is None:
        max_shard_bytes = _stored_bytes(cfg, fp8, np_dtype) // 5 + 1

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        builder = WeightBuilder(cfg, seed)
        cross_shard = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
        holder: dict[str, ShardedWriter] = {}

        def placement(name, _arr):
            return holder["w"].shard_number + 1 if name == cross_shard else None

        with ShardedWriter(tmp, max_shard_bytes=max_shard_bytes, placement=placement) as writer:
            holder["w"] = writer
            for name, w in builder.tensors():
                for stored_name, arr in _stored(name, w, fp8, np_dtype):
                    writer.add(stored_name, arr)
        cfg.save(tmp)
        write_json_atomic(tmp / "generation_config.json", GENERATION_CONFIG)
        train_tokenizer(TOKENIZER_VOCAB, tmp, model_max_length=cfg.max_position_embeddings)
        write_json_atomic(tmp / "make_model.json", {
            "size": size, "seed": seed, "fp8": fp8, "dtype": dtype, "content_version": CONTENT_VERSION,
            **({"overrides": dict(overrides)} if overrides else {}),
            "parameters": parameter_counts(cfg), "planted": builder.planted.to_json(),
            "bigram_channels": [int(c) for c in builder.bigram_channels], "statistics": builder.report})
        if out_dir.exists():
            if overwrite:
                shutil.rmtree(out_dir)
            else:
                out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---- the cached default model -----------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("GOLDSTICK_CACHE") or Path.home() / ".cache" / "goldstick")


# the sources of the default model's bytes: a change to any of them makes a new cache folder
_PACKAGE = Path(__file__).parents[1]
CONTENT_SOURCES = (Path(__file__), _PACKAGE / "testing" / "synthetic.py", _PACKAGE / "model" / "architecture.py",
                   _PACKAGE / "model" / "tokenizer.py", CORPUS_PATH)


def _content_key() -> str:
    digest = hashlib.sha256()
    for path in CONTENT_SOURCES:
        digest.update(path.read_bytes())
    return f"v{CONTENT_VERSION}-{digest.hexdigest()[:10]}"


def default_model_path(size: str = "tiny") -> Path:
    """The f32 model of ``size`` (seed 0), made once under ``cache_dir()/models/``; safe under concurrency."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {list(SIZES)}")
    root = cache_dir() / "models"
    final = root / f"{size}-{_content_key()}"
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    made = make_model(staging, size=size)
    try:
        os.rename(made, final)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(made, ignore_errors=True)
        if not (final / "config.json").exists():
            raise
    return final


# ---- CLI hook --------------------------------------------------------------------------------------------------
def add_make_model_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("make-model", help="write a small deterministic DeepSeek-V3-architecture checkpoint",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--size", choices=(*SIZES, "r1"), default="tiny",
                   help="tiny, wide, or r1: DeepSeek-R1's exact architecture and release layout (FP8, ~5 GB shards; "
                        "slice it with --set num_hidden_layers=2 --set n_routed_experts=16 ...)")
    p.add_argument("--fp8", action="store_true", help="R1 release format: FP8 block weights + weight_scale_inv")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="storage of the non-FP8 tensors (default f32, or bf16 with --fp8)")
    p.add_argument("--shard-size", type=float, default=None, metavar="MB", help="maximum shard size in MB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=INT", dest="overrides",
                   help="override an integer config field of the size, e.g. --set hidden_size=7168 (repeatable)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_make_model)
    return p


def run_make_model(args: argparse.Namespace) -> int:
    shard = None if args.shard_size is None else int(args.shard_size * 1_000_000)
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: expected KEY=INTEGER, e.g. hidden_size=7168") from None
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty (add --overwrite to replace it)")
    path = make_model(args.out, size=args.size, fp8=args.fp8, max_shard_bytes=shard, seed=args.seed,
                      dtype=args.dtype, overwrite=args.overwrite, overrides=overrides or None,
                      progress=args.size == "r1")
    info = json.loads((path / "make_model.json").read_text())
    print(f"wrote {path} ({args.size}, {info['parameters']['total']:,} parameters)")
    return 0
