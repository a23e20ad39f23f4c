"""goldstick's ``ascend`` and ``golden-stick`` outputs through MindFormers 2.1.0's own weight-loading code.

vllm-mindspore 0.5.1 hands DeepSeek-V3 to MindFormers (vllm_mindspore/model_executor/model_loader/utils.py), so
MindFormers decides what is loaded and how. The package itself does not import on a CPU-only machine (its
``__init__`` pulls training, dataset and device modules), so these tests execute the released source of the
functions and classes that load weights, taken from the wheel by name (``released``), with stubs only for
distributed state (tensor-parallel rank 0 of 1), logging and the device (``is_310p``). MindSpore is the real one.

The tests replay ``InferModelMixin.load_weights`` for the MLA block of every decoder layer: every stored tensor
name through the model's ``convert_name`` and ``generate_mapping``, the quant method ``GoldenStickConfig``
chooses from our description file, the parameters that method's ``create_weights`` makes, each tensor through
the parameter's own ``weight_loader`` (RoPE conversion, squeeze, shape checks), then
``process_weights_after_loading`` (the input-scale inversion). Then: every tensor consumed, every parameter
loaded, every shift where the forward adds it; and the numbers: each static linear rebuilt from what the loader
holds, with QuantV2 / QuantBatchMatmul semantics, equals goldstick's CPU twin on calibration tokens, exactly.

Optional, like tests/test_gs_bitexact.py: set GOLDSTICK_STACKS_PATH to a folder holding the unpacked wheels
(``pip install --no-deps --target DIR mindformers==2.1.0``; .ci/run does).
"""

from __future__ import annotations

import ast
import logging
import os
import textwrap
import types
from collections import defaultdict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

STACKS = os.environ.get("GOLDSTICK_STACKS_PATH", "")
MF = Path(STACKS) / "mindformers"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MF / "parallel_core").is_dir(),
                       reason="MindFormers 2.1.0 source not found: set GOLDSTICK_STACKS_PATH to a folder with the "
                              "wheel unpacked (pip install --no-deps --target DIR mindformers==2.1.0)"),
]
BF16 = ml_dtypes.bfloat16

# ---------------------------------------------------------------------------------------------- the contract, as data
# Where each rule comes from (mindformers 2.1.0 wheel, paths under mindformers/):
CONTRACT = {
    "files": "every *.safetensors in the folder, no index needed (parallel_core/inference/model_utils.py:143-149)",
    "description": "one JSON named like quantization_description / quant_model_description, merged into "
                   "config.json's quantization_config (parallel_core/inference/quantization/utils.py:46-65)",
    "mode": "quantization 'golden-stick' -> is_modelslim False, anything else ('ascend') -> True "
            "(parallel_core/inference/quantization/golden_stick/config.py:60)",
    "labels": "W8A8, W8A8_DYNAMIC, W4A8_DYNAMIC, FLOAT; W8A16 has no method (golden_stick/config.py:30-34, 180)",
    "static params (ascend)": "input_scale [1], input_offset [1], beta [in], in params_dtype (a8w8.py:81-90)",
    "static params (golden-stick)": "input_scale [in] params_dtype, input_offset [in] int8 (a8w8.py:73-80)",
    "inversion": "ascend: input_scale = bf16(1 / input_scale) after loading (a8w8.py:112-118)",
    "forward": "ascend: x + beta, QuantV2(x, input_scale, input_offset), QuantBatchMatmul (a8w8.py:120-140)",
    "norm shifts": "input_layernorm.bias -> linear_q_down_proj.beta, q_layernorm.bias -> linear_q_up_proj.beta "
                   "(models/deepseek3/modeling_deepseek_v3_infer.py:239-242)",
    "rope": "q_up / kv_down rows converted by infer_trans_rope_weight only when is_modelslim "
            "(parallel_core/inference/tensor_parallel/layers.py:382, 1049; weights_utils.py:73-78)",
    "w_scale": "[out, 1] squeezed (layers.py:1035-1036, 880-881; weights_utils.py:106-107)",
    "unmatched names": "skipped without a word (base_models/gpt/gpt_model.py:425-426); unloaded parameters only "
                       "warn (:517-518)",
}
# the MLA block of one decoder layer: MindFormers module -> (loader class in layers.py, in, out sizes as
# functions of the config); linear_qkv_down_proj is q_down + kv_down stacked (model_utils.py:240-243)
MLA_MODULES = {
    "linear_qkv_down_proj": ("ReplicatedLinear", lambda c: c.hidden_size,
                             lambda c: [c.q_lora_rank, c.kv_lora_rank + c.qk_rope_head_dim]),
    "linear_q_up_proj": ("ColumnParallelLinear", lambda c: c.q_lora_rank,
                         lambda c: [c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)]),
    "linear_kv_up_proj": ("ColumnParallelLinear", lambda c: c.kv_lora_rank,
                          lambda c: [c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)]),
    "linear_proj": ("RowParallelLinear", lambda c: c.num_attention_heads * c.v_head_dim, lambda c: [c.hidden_size]),
}
# the goldstick linear whose input each module quantizes, and the norm that feeds it
HF_OF = {"linear_qkv_down_proj": ("self_attn.q_a_proj", "input_layernorm"),
         "linear_q_up_proj": ("self_attn.q_b_proj", "self_attn.q_a_layernorm"),
         "linear_proj": ("self_attn.o_proj", None)}


# ---------------------------------------------------------------------------------------------- released code
def released(path: str, names: list[str], namespace: dict, root: Path = MF) -> dict:
    """Execute the named top-level functions / classes / assignments, ``Class.method`` (inside a stand-in class,
    so that ``super()`` works) or ``Class.attribute`` of the released file ``root / path`` in ``namespace``."""
    source = (root / path).read_text()
    tree = ast.parse(source)
    top = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    top.update({t.id: n for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name)})
    for name in names:
        owner, _, member = name.partition(".")
        if not member:
            exec(compile(ast.Module([top[owner]], []), str(root / path), "exec"), namespace)
            continue
        node = next(n for n in top[owner].body if getattr(n, "name", None) == member
                    or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") == member for t in n.targets)))
        decorators = "".join(f"@{ast.unparse(d)}\n" for d in getattr(node, "decorator_list", []))
        code = textwrap.indent(decorators + ast.get_source_segment(source, node), "    ")
        base = namespace.get(f"{owner}__base", object)
        namespace["__base"] = base
        exec(f"class {owner}(__base):\n{code}\n", namespace)
        namespace[f"{owner}__base"] = namespace[owner]  # the next member of the same class extends this one
    return namespace


def mindformers_namespace() -> dict:
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops
    from mindspore.common.initializer import initializer

    ns: dict = {"np": np, "ms": ms, "mindspore": ms, "Tensor": Tensor, "Parameter": Parameter, "nn": nn,
                "ops": ops, "initializer": initializer, "Optional": object, "List": list, "Dict": dict, "Any": object,
                "re": __import__("re"), "defaultdict": defaultdict,
                "logger": logging.getLogger("mindformers"),
                "is_310p": lambda: False, "get_tensor_model_parallel_rank": lambda: 0,
                "get_tensor_model_parallel_world_size": lambda: 1,
                "is_legacy_model": lambda: False}
    from mindspore.ops.auto_generate import DynamicQuantExt, QuantBatchMatmul, QuantV2

    ns.update(QuantV2=QuantV2, QuantBatchMatmul=QuantBatchMatmul, DynamicQuantExt=DynamicQuantExt)
    ns["QuantizationConfig"] = ns["QuantizeMethodBase"] = ns["QuantizationBackends"] = object
    ns["LinearMethodBase"] = type("LinearMethodBase", (), {})
    released("parallel_core/inference/weights_utils.py",
             ["default_weight_loader", "set_weight_attrs", "split_loaded_weight", "infer_trans_rope_weight",
              "deal_linear_q_up_weight", "deal_linear_kv_up_weight", "deal_linear_kv_down_weight"], ns)
    released("parallel_core/inference/quantization/golden_stick/a8w8.py", ["A8W8LinearMethod"], ns)
    released("parallel_core/inference/quantization/golden_stick/a8dynw8.py", ["A8W8DynamicLinearMethod"], ns)
    released("parallel_core/inference/tensor_parallel/layers.py",
             ["UnquantizedLinearMethod", "ColumnParallelLinear.weight_loader", "ReplicatedLinear.weight_loader",
              "RowParallelLinear.weight_loader"], ns)
    ns["A8W4DynamicLinearMethod"] = None
    ns["UnquantizedEmbeddingMethod"] = ns["VocabParallelEmbedding"] = type("Unused", (), {})
    released("parallel_core/inference/quantization/golden_stick/config.py",
             ["QUANTIZATION_METHOD_MAPPING", "mapping_rules", "GoldenStickConfig"], ns)
    # DeepSeek's names: the mixin's convert_name with the model's weight_mapping, then the model's override
    released("models/deepseek3/utils.py", ["DeepseekV3PreTrainedModel.weight_mapping"], ns)
    ns["ModelMixin__base"] = ns["DeepseekV3PreTrainedModel"]
    released("parallel_core/utils/model_mixin.py", ["ModelMixin.convert_name"], ns)
    ns["InferenceDeepseekV3ForCausalLM__base"] = ns["ModelMixin"]
    released("models/deepseek3/modeling_deepseek_v3_infer.py", ["InferenceDeepseekV3ForCausalLM.convert_name"], ns)
    released("parallel_core/inference/model_utils.py", ["InferModelMixin.generate_mapping"], ns)
    released("parallel_core/inference/base_models/gpt/gpt_model.py",
             ["GPTModel.load_default_param", "GPTModel.load_weights"], ns)
    return ns


# ---------------------------------------------------------------------------------------------- replaying the load
class Loaded:
    """The MLA block of every decoder layer as MindFormers builds and loads it from one checkpoint folder."""

    def __init__(self, ns: dict, folder: Path, quantization: str):
        import json

        from safetensors import safe_open

        from goldstick.io.checkpoint import CheckpointReader

        cfg = CheckpointReader(folder).config
        self.cfg, self.ns = cfg, ns
        mf_config = types.SimpleNamespace(
            q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
            qk_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, num_attention_heads=cfg.num_attention_heads,
            moe_shared_expert_intermediate_size=None, num_moe_experts=cfg.n_routed_experts, hidden_size=cfg.hidden_size)
        # the quantization config as quantization/utils.py:46-67 assembles it
        description = [f for f in folder.glob("*.json")
                       if any(k in f.name for k in ("quantization_description", "quant_model_description"))]
        assert len(description) == 1, description  # MindFormers refuses several (utils.py:55-58)
        full = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
        full.update(json.loads(description[0].read_text()))
        full["weight_mapping"] = ns["DeepseekV3PreTrainedModel"].weight_mapping
        full["quantization"] = quantization
        self.quant_config = ns["GoldenStickConfig"](full)
        model_cls = type("Model", (ns["InferenceDeepseekV3ForCausalLM"], ns["InferModelMixin"], ns["GPTModel"]), {})
        self.model = model = model_cls()
        model.config = types.SimpleNamespace(quantization=quantization, num_moe_experts=cfg.n_routed_experts)
        model.use_fused_mla = False
        model.transformer_config = mf_config
        self.params: dict = {}
        self.modules: dict = {}
        for i in range(cfg.num_hidden_layers):
            for norm in ("input_layernorm", "self_attention.q_layernorm", "self_attention.kv_layernorm"):
                size = {"input_layernorm": cfg.hidden_size, "self_attention.q_layernorm": cfg.q_lora_rank,
                        "self_attention.kv_layernorm": cfg.kv_lora_rank}[norm]
                name = f"decoder.layers.{i}.{norm}.weight"
                self.params[name] = ns["Parameter"](np.zeros(size, np.float32), name=name, requires_grad=False)
            for module, (loader_cls, size_in, sizes_out) in MLA_MODULES.items():
                prefix = f"decoder.layers.{i}.self_attention.{module}"
                layer = ns["nn"].Cell()
                method = self.quant_config.get_quant_method(layer, prefix)
                owner = types.SimpleNamespace(tp_group=types.SimpleNamespace(rank=0), config=mf_config,
                                              quant_config=self.quant_config,
                                              output_size_per_partition=sum(sizes_out(cfg)),
                                              input_size_per_partition=size_in(cfg))
                loader = ns[loader_cls].weight_loader.__get__(owner)
                method.create_weights(layer, size_in(cfg), sizes_out(cfg), ns["ms"].bfloat16,
                                      weight_loader=loader, transpose_b=True)
                self.modules[prefix] = (layer, method)
                for local, param in layer.parameters_and_names():
                    self.params[f"{prefix}.{local}"] = param
        model.get_params_dict = lambda: self.params
        files = sorted(folder.glob("*.safetensors"))  # every shard, as model_utils.py:143-149
        self.stored: dict[str, str] = {}
        weights = []
        for file in files:
            with safe_open(file, framework="np") as f:
                for name in f.keys():  # noqa: SIM118
                    self.stored[name] = file.name
                    if self.in_scope(name):
                        weights.append((model.convert_name(name), _Slice(f.get_tensor(name))))
        self.converted = {model.convert_name(n): n for n in self.stored if self.in_scope(n)}
        self.loaded = model.load_weights(weights, model.generate_mapping(), True)
        for layer, method in self.modules.values():  # (QuantizeMethodBase's is a no-op: float linears)
            if hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(layer)

    def in_scope(self, name: str) -> bool:
        """The MLA block and its norms of the main layers (the MLP and experts load through other classes)."""
        parts = name.split(".")
        return (len(parts) > 3 and parts[0] == "model" and parts[1] == "layers"
                and int(parts[2]) < self.cfg.num_hidden_layers
                and (parts[3] in ("self_attn", "input_layernorm")))

    def held(self, prefix: str) -> dict[str, np.ndarray]:
        layer, _ = self.modules[prefix]
        return {local: _numpy(p) for local, p in layer.parameters_and_names()}


class _Slice:
    """What safe_open(...).get_slice gives the loaders: indexable, with get_shape()."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __getitem__(self, key):
        return self.array[key]

    def get_shape(self):
        return list(self.array.shape)


def _numpy(param) -> np.ndarray:
    value = param.asnumpy() if not hasattr(param, "value") else param.asnumpy()
    return np.asarray(value)


# ---------------------------------------------------------------------------------------------- checkpoints
def _attention_static_recipe():
    from goldstick.quant.recipe import Recipe, Rule, Scheme

    return Recipe(name="attn-static-ffn-dynamic", rules=(
        Rule(r".*\.mlp\.gate|.*\.self_attn\.kv_b_proj|lm_head", "float"),
        Rule(r".*\.self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa)", Scheme("w8a8-static", "smoothquant")),
        Rule(r".*\.self_attn\.o_proj", Scheme("w8a8-static", "smoothquant")),
        Rule(r".*\.mlp\..*_proj", "w8a8-dynamic")))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import dataclasses

    from goldstick.engine.pipeline import quantize
    from goldstick.model.runtime import setup_mindspore
    from goldstick.quant.recipe import load_recipe
    from goldstick.testing.make_model import default_model_path

    setup_mindspore()
    mixed = load_recipe("deepseek-r1-w8a8-mixed")
    mixed = dataclasses.replace(mixed, options=dataclasses.replace(mixed.options, osplus_grid=3, token_sample=32))
    root = tmp_path_factory.mktemp("stacks")
    kw = dict(calib_samples=4, calib_seq_len=32, progress=False)
    return {"ascend": quantize(default_model_path(), mixed, out=root / "ascend", export_format="ascend", **kw).out,
            "golden-stick": quantize(default_model_path(), _attention_static_recipe(), out=root / "gs",
                                     export_format="golden-stick", **kw).out}


@pytest.fixture(scope="module")
def ns():
    from goldstick.model.runtime import setup_mindspore

    setup_mindspore()
    return mindformers_namespace()


def _calibration_inputs(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per static linear of goldstick's CPU network loaded from ``folder``: (the input MindFormers' linear receives,
    i.e. the feeding norm's output without its bias; goldstick's cell output) on calibration tokens."""
    from mindspore import Tensor

    import goldstick
    from goldstick.engine.calibration import load_calibration
    from goldstick.model.tokenizer import load_tokenizer
    from goldstick.quant.cells import StaticW8A8Linear
    from goldstick.testing.make_model import default_model_path

    net = goldstick.load_model(folder)
    seen: dict[str, list] = {}
    handles = []
    for name, cell in net.cells_and_names():
        if isinstance(cell, StaticW8A8Linear):
            def hook(c, inputs, output, name=name):
                seen.setdefault(name, [None, None, None])[1:] = [inputs[0].asnumpy().reshape(-1, c.in_features),
                                                                output.asnumpy().reshape(-1, c.out_features)]
            handles.append(cell.register_forward_hook(hook))
        if name.endswith(("input_layernorm", "q_a_layernorm")) and getattr(cell, "has_bias", False):
            def norm_hook(c, inputs, output, name=name):
                c.has_bias = False
                try:
                    seen.setdefault(name, [None, None, None])[0] = c.construct(inputs[0]).asnumpy().reshape(
                        -1, output.shape[-1])
                finally:
                    c.has_bias = True
            handles.append(cell.register_forward_hook(norm_hook))
    tok = load_tokenizer(default_model_path())
    batch = load_calibration("calibration/mixed-zh-en.jsonl", tok.tokenizer, samples=4, seq_len=32,
                             bos_id=tok.bos_id).batches[0]
    net(Tensor(batch))
    for h in handles:
        h.remove()
    return seen


# ---------------------------------------------------------------------------------------------- the tests
def _rope_rows(n: int, r: int, heads: int) -> np.ndarray:
    """Row order infer_trans_rope_weight gives (per head, the last r rows: even then odd), as indices."""
    rows = np.arange(n).reshape(heads, -1)
    head = rows.copy()
    head[:, -r:] = np.concatenate([rows[:, -r::2], rows[:, -r + 1::2]], axis=1)
    return head.reshape(-1)


def _check(loaded: Loaded, folder: Path, mode: str) -> None:
    cfg = loaded.cfg
    # every stored MLA tensor went into a parameter, every parameter got a tensor
    not_consumed = sorted(hf for mf, hf in loaded.converted.items() if not _consumed(loaded, mf))
    assert not not_consumed, f"MindFormers skips: {not_consumed}"
    unloaded = sorted(set(loaded.params) - set(loaded.loaded))
    assert not unloaded, f"MindFormers never loads: {unloaded}"
    seen = _calibration_inputs(folder)
    r, heads = cfg.qk_rope_head_dim, cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        base = f"model.layers.{i}."
        for module, (hf_linear, norm) in HF_OF.items():
            held = loaded.held(f"decoder.layers.{i}.self_attention.{module}")
            # linear_qkv_down_proj holds kv_down's rows first, then q_down's (layers.py:1040-1046)
            parts = ([base + "self_attn.kv_a_proj_with_mqa"] if module.endswith("down_proj") else []) + \
                [base + hf_linear]
            x = seen[base + norm][0] if (norm and base + norm in seen) else seen[parts[-1]][1]
            ours = np.concatenate([seen[p][2] for p in parts], axis=1)
            if mode == "golden-stick" or module != "linear_proj":  # rows MindFormers holds in its kernel order
                if module == "linear_q_up_proj":
                    ours = ours[:, _rope_rows(ours.shape[1], r, heads)]
                elif module == "linear_qkv_down_proj":
                    kv = cfg.kv_lora_rank + r
                    ours = np.concatenate([ours[:, :kv][:, _rope_rows(kv, r, 1)], ours[:, kv:]], 1)
            w = held["weight"].astype(np.int64)
            if mode == "ascend":
                # x + beta (a8w8.py:127-129), QuantV2 = aclnnAscendQuant: round(x * scale + offset) with the
                # inverted bf16 scale (:116-118); the shift is the norm's bias (or o_proj.beta), as our norm adds it
                xb = x + held["beta"].astype(np.float32)
                codes = np.rint(xb * held["input_scale"].astype(np.float32) + held["input_offset"].astype(np.float32))
            else:
                # golden-stick: an int8 offset selects QuantV2's divisor form (mindspore_gs ptq/ptq/hal.py:242-245);
                # no beta exists in this mode
                assert "beta" not in held
                codes = np.rint(x / held["input_scale"].astype(np.float32) + held["input_offset"].astype(np.float32))
            codes = np.clip(codes, -128, 127).astype(np.int64)
            acc = codes @ w.T + held["quant_bias"].astype(np.int64)
            rebuilt = acc.astype(np.float32) * held["deq_scale"].astype(np.float32)
            assert np.array_equal(rebuilt, ours), (i, module, float(np.abs(rebuilt - ours).max()))


def _consumed(loaded: Loaded, mf_name: str) -> bool:
    for param_name, weight_name, _ in loaded.model.generate_mapping():
        if weight_name in mf_name:
            return mf_name.replace(weight_name, param_name) in loaded.loaded
    return mf_name in loaded.loaded


def test_ascend_target_through_mindformers_ascend_mode(ns, checkpoints):
    """`--format ascend` (the default recipe, with all three OS+ shifts) in MindFormers' ascend (modelslim) mode."""
    loaded = Loaded(ns, checkpoints["ascend"], "ascend")
    assert loaded.quant_config.is_modelslim
    # the shifts: the norm biases are the q/kv down and q up projections' beta, o_proj's its own
    from goldstick.io.checkpoint import CheckpointReader

    reader = CheckpointReader(checkpoints["ascend"])
    for i in range(loaded.cfg.num_hidden_layers):
        for module, source in (("linear_qkv_down_proj", "input_layernorm.bias"),
                               ("linear_q_up_proj", "self_attn.q_a_layernorm.bias"),
                               ("linear_proj", "self_attn.o_proj.beta")):
            beta = loaded.held(f"decoder.layers.{i}.self_attention.{module}")["beta"].astype(np.float32)
            assert np.any(beta != 0)
            assert np.array_equal(beta, reader.read(f"model.layers.{i}.{source}").astype(np.float32)), (i, module)
    _check(loaded, checkpoints["ascend"], "ascend")


def test_golden_stick_target_through_mindformers_golden_stick_mode(ns, checkpoints):
    """`--format golden-stick` (static attention with SmoothQuant, no shifts) in MindFormers' golden-stick mode:
    RoPE rows pre-permuted, per-channel divisor scales, numbers equal to the twin's."""
    loaded = Loaded(ns, checkpoints["golden-stick"], "golden-stick")
    assert not loaded.quant_config.is_modelslim
    _check(loaded, checkpoints["golden-stick"], "golden-stick")


def test_earlier_mindspore_layout_fails_in_ascend_mode(ns, tmp_path):
    """The check has teeth: goldstick's earlier `mindspore` layout ([in]-shaped input_scale) stops in the released
    loaders' shape check (layers.py:1059-1064), as the ascend mode needs [1]."""
    from goldstick.engine.pipeline import quantize
    from goldstick.testing.make_model import default_model_path

    folder = quantize(default_model_path(), _attention_static_recipe(), out=tmp_path / "ms", export_format="mindspore",
                      calib_samples=2, calib_seq_len=16, progress=False).out
    with pytest.raises(ValueError, match="should be equal to 'loaded_weight.shape'"):
        Loaded(ns, folder, "ascend")
