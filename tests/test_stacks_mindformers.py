"""goldstick's ``ascend`` and ``golden-stick`` outputs through MindFormers 2.1.0's own weight-loading code.

vllm-mindspore 0.5.1 hands DeepSeek-V3 to MindFormers (vllm_mindspore/model_executor/model_loader/utils.py), so
MindFormers decides what is loaded and how. The package itself does not import on a CPU-only machine (its
``__init__`` pulls training, dataset and device modules), so these tests execute the released source of the
functions and classes that load weights, taken from the wheel by name (``released``), with stubs only for
distributed state (tensor-parallel rank 0 of 1), logging and the device (``is_310p``, the NZ ``format_cast``).
MindSpore is the real one.

The MLA replay (``Loaded``) runs ``InferModelMixin.load_weights`` for the MLA block of every decoder layer: every
stored tensor name through the model's ``convert_name`` and ``generate_mapping``, the quant method
``GoldenStickConfig`` chooses from our description file, the parameters that method's ``create_weights`` makes,
each tensor through the parameter's own ``weight_loader`` (RoPE conversion, squeeze, shape checks), then
``process_weights_after_loading`` (the input-scale inversion). Then: every tensor consumed, every parameter loaded,
every shift where the forward adds it; and the numbers: each static linear rebuilt from what the loader holds, with
QuantV2 / QuantBatchMatmul semantics, equals goldstick's CPU twin on calibration tokens, exactly.

The whole-model replay (``Loaded(..., full=True)``) adds everything else, built by MindFormers' own classes from its
own specs (MLP, MoELayer with TopKRouter / GroupedMLP / SharedExpertMLP, RMSNorm, LanguageModelEmbedding, the output
ColumnParallelLinear) and loaded by ``GPTModel.load_weights`` from every tensor of every shard: every stored tensor
goes into a parameter slot or is skipped by a rule MindFormers has (``NOT_LOADED``: the MTP layer, the dynamic
linears' zero offsets), every slot (each expert, each fc1 half) takes exactly one tensor, every parameter outside the
MLA holds exactly the stored values. Each dynamic W8A8 linear (dense MLP, shared experts, routed experts) rebuilt
from what the loader holds (fc1 halves, transposed [E, in, out] expert stacks, squeezed bf16 scales) and run with
the Ascend kernels' arithmetic (DynamicQuant as the A2/A3 kernel computes it, per-token QuantBatchMatmul /
GroupedMatmulV4) equals the CPU twin to the bound its docstring derives. The contracts are data (``CONTRACT``,
``MF_CONFIG``, ``FULL_CONTRACT``, ``NOT_LOADED``, ``SLOTS``), each with the MindFormers file and line it comes from.

Optional, like tests/test_gs_bitexact.py: set GOLDSTICK_STACKS_PATH to a folder holding the unpacked wheels
(``pip install --no-deps --target DIR mindformers==2.1.0 vllm-mindspore==0.5.1``; .ci/run does).
"""

from __future__ import annotations

import ast
import logging
import os
import re
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
# The TransformerConfig fields the loading path reads, from the checkpoint's config.json (``hf``) as MindFormers
# 2.1.0 converts them when vllm-mindspore 0.5.1 serves it (paths under mindformers/ unless named; the conversion
# itself imports training modules, so the mapping is read off it here, field by field)
_TC, _CV, _DS = ("parallel_core/transformer_config.py", "models/deepseek3/config_converter_deepseek_v3.py",
                 "models/deepseek3/configuration_deepseek_v3.py")
_TU, _VM = "parallel_core/transformer_config_utils.py", "vllm_mindspore/model_executor/models/mf_models/config.py"


def _bf16(hf):
    import mindspore as ms

    return ms.bfloat16


MF_CONFIG = {
    "hidden_size": (lambda hf: hf["hidden_size"], f"{_TU}:251"),
    "vocab_size": (lambda hf: hf["vocab_size"], f"{_TU}:268"),
    "num_layers": (lambda hf: hf["num_hidden_layers"], f"{_CV}:32"),
    "mtp_num_layers": (lambda hf: 0, f"num_nextn_predict_layers ({_CV}:36) set to 0 for model_type deepseek_v3 "
                                     "(models/deepseek3/modeling_deepseek_v3_infer.py:47-48)"),
    "layernorm_epsilon": (lambda hf: hf["rms_norm_eps"], f"{_CV}:33"),
    "ffn_hidden_size": (lambda hf: hf["intermediate_size"], f"{_CV}:34"),
    "num_moe_experts": (lambda hf: hf["n_routed_experts"], f"{_CV}:43"),
    "moe_router_group_topk": (lambda hf: hf["topk_group"], f"{_CV}:44"),
    "shared_expert_num": (lambda hf: hf["n_shared_experts"], f"{_CV}:45"),
    "moe_ffn_hidden_size": (lambda hf: hf["moe_intermediate_size"], f"{_CV}:47"),
    "moe_shared_expert_intermediate_size": (lambda hf: hf["moe_intermediate_size"] * hf["n_shared_experts"],
                                            f"{_TC}:2445-2446"),
    "first_k_dense_replace": (lambda hf: hf["first_k_dense_replace"], f"{_TU}:376"),
    "moe_layer_freq": (lambda hf: hf["moe_layer_freq"], f"{_TU}:375 (checked against first_k_dense_replace, "
                                                         f"{_TC}:2522-2541)"),
    "hidden_act": (lambda hf: hf["hidden_act"], f"{_TU}:317"),
    "gated_linear_unit": (lambda hf: True, f"{_DS}:151"),
    "add_bias_linear": (lambda hf: False, f"{_DS}:150"),
    "add_mlp_fc1_bias_linear": (lambda hf: None, f"{_TC}:280"),
    "add_mlp_fc2_bias_linear": (lambda hf: None, f"{_TC}:290"),
    "use_alltoall": (lambda hf: False, f"{_TC}:846"),
    "moe_router_enable_expert_bias": (lambda hf: True, f"{_DS}:147"),
    "moe_router_fusion": (lambda hf: True, f"{_DS}:148"),
    "moe_router_topk": (lambda hf: hf["num_experts_per_tok"], f"{_CV}:46"),
    "moe_router_num_groups": (lambda hf: hf["n_group"], f"{_CV}:42"),
    "moe_router_topk_scaling_factor": (lambda hf: hf["routed_scaling_factor"], f"{_CV}:48"),
    "moe_router_score_function": (lambda hf: hf["scoring_func"], f"{_TU}:359-360"),
    "norm_topk_prob": (lambda hf: hf["norm_topk_prob"], f"{_TU}:383"),
    "normalization": (lambda hf: "RMSNorm", f"{_DS}:149"),
    "init_method": (lambda hf: "normal", "VocabParallelEmbedding ignores it (layers.py:1113)"),
    # vllm-mindspore's settings for MindFormers models on Atlas A2/A3 (not 310P): every dtype bf16
    "params_dtype": (_bf16, f"{_VM}:103"),
    "compute_dtype": (_bf16, f"model_config.dtype ({_VM}:93): config.json's torch_dtype, bfloat16"),
    "layernorm_compute_dtype": (_bf16, f"{_VM}:101"),
    "moe_router_dtype": (_bf16, f"router_dense_type ({_VM}:104) -> moe_router_dtype ({_TU}:362)"),
    # the attention half of the layer spec (not built here: the MLA replay's)
    "multi_latent_attention": (lambda hf: True, f"{_DS}:152, {_VM}:129"),
    "qk_layernorm": (lambda hf: True, f"{_TU}:249"),
    "use_flash_attention": (lambda hf: True, f"{_DS}:145"),
    "use_fused_mla": (lambda hf: False, "models/deepseek3/modeling_deepseek_v3_infer.py:54-56 (ms_custom_ops)"),
    # the MLA's
    "q_lora_rank": (lambda hf: hf["q_lora_rank"], f"{_TU}:408"),
    "kv_lora_rank": (lambda hf: hf["kv_lora_rank"], f"{_TU}:409"),
    "qk_pos_emb_head_dim": (lambda hf: hf["qk_rope_head_dim"], f"{_CV}:53"),
    "qk_head_dim": (lambda hf: hf["qk_nope_head_dim"], f"{_CV}:52"),
    "v_head_dim": (lambda hf: hf["v_head_dim"], f"{_TU}:410"),
    "num_attention_heads": (lambda hf: hf["num_attention_heads"], f"{_TU}:241"),
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



# ---------------------------------------------------------------------------------------------- the rest, as data
# Everything outside the MLA: dense MLP, MoE (router, routed experts, shared experts), norms, embedding, final norm,
# output layer, the MTP layer (paths under mindformers/parallel_core/inference/ unless they start with models/)
FULL_CONTRACT = {
    "layer kinds": "the first first_k_dense_replace layers dense, the rest MoE (base_models/gpt/gpt_layer_specs.py:"
                   "240-266); dense: MLP with MergedColumnParallelLinear fc1 + RowParallelLinear fc2 "
                   "(gpt_layer_specs.py:294-299); MoE: MoELayer with TopKRouter, GroupedMLP "
                   "(ColumnParallelGroupedLinear fc1, RowParallelGroupedLinear fc2) and SharedExpertMLP "
                   "(MergedColumnParallelLinear + RowParallelLinear) (base_models/gpt/moe_module_spec.py:57-99); "
                   "use_alltoall False without data parallelism (utils.py:300-330)",
    "quant method": "W8A8_DYNAMIC -> A8W8DynamicLinearMethod for fc1 / fc2 / shared / experts (quantization/"
                    "golden_stick/config.py:30-34, 140-183; the experts' key matched with the expert id removed, "
                    ":164-169); router, norms, embedding and output layer take no quant config (transformer/moe/"
                    "router.py:55-62, transformer/norm.py:104, language_model_embedding.py:80-86, base_models/gpt/"
                    "gpt_model.py:201-207)",
    "dynamic params": "weight int8 [out, in] and w_scale params_dtype [out]; grouped: weight int8 [E, in, out], "
                      "w_scale [E, out]; no offset parameter (quantization/golden_stick/a8dynw8.py:46-84)",
    "names": "gate_proj / up_proj / down_proj -> gating / hidden / linear_fc2, gate.weight -> router.weight, gate."
             "e_score_correction_bias -> router.expert_bias, post_attention_layernorm -> pre_mlp_layernorm, "
             "embed_tokens -> embedding.word_embeddings, model.norm -> decoder.final_layernorm, lm_head -> "
             "output_layer (models/deepseek3/utils.py:32-65); weight_scale -> w_scale, weight_offset -> w_offset "
             "(models/deepseek3/modeling_deepseek_v3_infer.py:270-271)",
    "stacking": "gating / hidden -> linear_fc1 with shard ids (model_utils.py:248-251, gpt_model.py:475-484); "
                "routed experts.{e}.gating / hidden / linear_fc2 .weight -> experts.weight1 (w1, w3) / weight2 (w2), "
                "their w_scale -> experts.linear_fc1 / linear_fc2 .w_scale, expert id e (weights_utils.py:297-346, "
                "gpt_model.py:486-513)",
    "dense fc1": "gating rows [0, ffn), hidden rows [ffn, 2 ffn) of weight [2 ffn, in] and w_scale [2 ffn]; "
                 "[out, 1] scales squeezed (tensor_parallel/layers.py:482-513)",
    "dense fc2": "weight [out, in] and squeezed w_scale as stored (tensor_parallel/layers.py:861-895)",
    "grouped fc1": "expert e: weight1[e][:, 0:ffn] = gate.T, [:, ffn:2 ffn] = up.T; w_scale[e][0:ffn] / [ffn:2 ffn]"
                   " = the squeezed scales (tensor_parallel/grouped_layers.py:328-378)",
    "grouped fc2": "expert e: weight2[e] = down.T, w_scale[e] = the squeezed scale (tensor_parallel/"
                   "grouped_layers.py:567-605)",
    "float params": "router weight moe_router_dtype, expert_bias float32 (transformer/moe/router.py:55-62, 143, 111); "
                    "norms layernorm_compute_dtype (transformer/norm.py:104, weights_utils.py:37-42); embedding "
                    "params_dtype, rows written in place (tensor_parallel/layers.py:1190-1226); output layer "
                    "params_dtype [vocab, hidden] (layers.py:86-104, 363-405)",
    "after loading": "A8W8DynamicLinearMethod.process_weights_after_loading: grouped weights cast to the NZ device "
                     "format only (a8dynw8.py:87-93), reached through model_utils.py:180-193",
    "dynamic forward": "DynamicQuantExt(x) -> int8 codes and a per-token fp32 scale; QuantBatchMatmul(codes, weight, "
                       "w_scale, pertoken_scale=scale) in params_dtype, transpose_x2 (a8dynw8.py:69, 104-122); grouped"
                       ": GroupedMatmulV4 with scale [w_scale], per_token_scale [scale], group_list (a8dynw8.py:"
                       "108-117)",
}
# Stored tensors MindFormers does not load, each with the rule that skips it: kind -> (matches(name, cfg), rule)
NOT_LOADED = {
    "mtp layer": (lambda name, cfg: name.startswith(f"model.layers.{cfg.num_hidden_layers}."),
                  "num_nextn_predict_layers is set to 0 for model_type deepseek_v3 (models/deepseek3/"
                  "modeling_deepseek_v3_infer.py:47-48), so the main model builds num_hidden_layers decoder layers "
                  "(transformer/transformer_block.py:165-169) and no MTP block (base_models/gpt/gpt_model.py:177-187);"
                  " model.layers.{N}.* become decoder.layers.{N}.* (models/deepseek3/utils.py:64), names without a "
                  "parameter, which load_weights skips (gpt_model.py:425, 503-504)"),
    "dynamic weight_offset": (lambda name, cfg: name.endswith(".weight_offset"),
                              "A8W8DynamicLinearMethod creates weight and w_scale only, per-token activations and "
                              "weights being symmetric (quantization/golden_stick/a8dynw8.py:46-84); *.w_offset "
                              "(modeling_deepseek_v3_infer.py:271) has no parameter and is skipped (gpt_model.py:425,"
                              " 503-504)"),
}
# How many tensors each parameter takes, by (shard id, expert id): MindFormers' own bookkeeping marks a parameter
# loaded after its first tensor (gpt_model.py:483, 512), so a missing expert or half would go unnoticed there
SLOTS = (
    (r"\.mlp\.experts\.(weight1|linear_fc1\.w_scale)$",
     lambda c: {(s, e) for e in range(c.num_moe_experts) for s in ("w1", "w3")}, "grouped_layers.py:328-378"),
    (r"\.mlp\.experts\.(weight2|linear_fc2\.w_scale)$",
     lambda c: {("w2", e) for e in range(c.num_moe_experts)}, "grouped_layers.py:567-605"),
    (r"\.linear_fc1\.(weight|w_scale)$", lambda c: {("gating", None), ("hidden", None)}, "layers.py:482-513"),
    (r"\.linear_qkv_down_proj\.beta$", lambda c: {("q_down", None)},
     "input_layernorm.bias -> linear_q_down_proj.beta (modeling_deepseek_v3_infer.py:241-242)"),
    (r"\.linear_qkv_down_proj\.", lambda c: {("q_down", None), ("kv_down", None)}, "layers.py:1042-1070"),
)

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


class _ProcessGroup:
    """Tensor-, data- and expert-parallel groups of one rank: rank 0 of 1 (the stubbed distributed state)."""

    rank, size = 0, 1


class _ModelCommProcessGroups:
    tp = tp_dp = dp = moe_ep = moe_tp = _ProcessGroup()


class _TokenDispatcher:
    """Stands in for MoEAllGatherTokenDispatcher (token_dispatcher.py:80): communication only, no parameters."""

    def __init__(self, num_local_experts, config, model_comm_pgs=None):
        self.num_local_experts = num_local_experts


def _device_ops():
    """mindspore.ops with the one device-only call of the loading path stubbed: ``format_cast`` to the NZ layout
    (a8dynw8.py:92-93, grouped experts after loading), a storage format of the NPU that keeps every value."""
    from mindspore import ops

    auto = types.SimpleNamespace(**{k: getattr(ops.auto_generate, k) for k in dir(ops.auto_generate)
                                    if not k.startswith("__")})
    auto.format_cast = lambda tensor, fmt: tensor
    proxy = types.SimpleNamespace(**{k: getattr(ops, k) for k in dir(ops) if not k.startswith("__")})
    proxy.auto_generate = auto
    return proxy


def mindformers_namespace() -> dict:
    import abc
    import collections
    import copy
    import dataclasses
    import inspect
    import typing

    import mindspore as ms
    from mindspore import Parameter, Tensor, mint, nn
    from mindspore.common import dtype as mstype
    from mindspore.common.initializer import initializer
    from mindspore.ops import operations as P

    ns: dict = {"np": np, "ms": ms, "mindspore": ms, "Tensor": Tensor, "Parameter": Parameter, "nn": nn,
                "ops": _device_ops(), "mint": mint, "P": P, "mstype": mstype, "initializer": initializer,
                "re": re, "defaultdict": defaultdict, "OrderedDict": collections.OrderedDict,
                "ABC": abc.ABC, "abstractmethod": abc.abstractmethod, "dataclass": dataclasses.dataclass,
                "field": dataclasses.field, "deepcopy": copy.deepcopy, "types": types, "inspect": inspect,
                **{k: getattr(typing, k) for k in ("Optional", "List", "Dict", "Any", "Union", "Tuple", "Callable",
                                                  "Iterable", "Set", "Literal", "Generator")},
                "logger": logging.getLogger("mindformers"),
                # the stubs: distributed state (rank 0 of 1), device queries, type-only names
                "is_310p": lambda: False, "is_910b": lambda: False, "is_pynative": lambda: False,
                "is_batch_invariant": lambda: False, "is_legacy_model": lambda: False,
                "get_tensor_model_parallel_rank": lambda: 0, "get_tensor_model_parallel_world_size": lambda: 1,
                "get_pipeline_model_parallel_world_size": lambda: 1,
                "ProcessGroup": _ProcessGroup, "default_pgs": _ProcessGroup(),
                "ModelCommProcessGroups": _ModelCommProcessGroups, "default_model_comm_pgs": _ModelCommProcessGroups(),
                "MoEAllGatherTokenDispatcher": _TokenDispatcher, "MoEAlltoAllTokenDispatcher": _TokenDispatcher,
                "TransformerConfig": object, "MLATransformerConfig": object, "QuantizationBackends": str,
                "format_type": {"nz": 29}}
    from mindspore.ops.auto_generate import DynamicQuantExt, GroupedMatmulV4, QuantBatchMatmul, QuantV2

    ns.update(QuantV2=QuantV2, QuantBatchMatmul=QuantBatchMatmul, DynamicQuantExt=DynamicQuantExt,
              GroupedMatmulV4=GroupedMatmulV4)
    inference = "parallel_core/inference/"
    released(inference + "quantization/base_config.py", ["QuantizeMethodBase", "QuantizationConfig"], ns)
    released(inference + "utils.py", ["ensure_divisibility", "divide", "get_num_layers_and_offset"], ns)
    released(inference + "weights_utils.py",
             ["default_weight_loader", "set_weight_attrs", "split_loaded_weight", "infer_trans_rope_weight",
              "deal_linear_q_up_weight", "deal_linear_kv_up_weight", "deal_linear_kv_down_weight",
              "split_fusion_loaded_weight", "deal_training_ffn_weight", "deal_training_moe_weight",
              "make_expert_params_mapping", "make_expert_params_mapping_with_expert_dim"], ns)
    released(inference + "tensor_parallel/layers.py",
             ["LinearMethodBase", "UnquantizedLinearMethod", "LinearBase", "ColumnParallelLinear",
              "MergedColumnParallelLinear", "RowParallelLinear", "ReplicatedLinear", "VocabParallelEmbedding",
              "UnquantizedEmbeddingMethod"], ns)
    released(inference + "quantization/golden_stick/a8w8.py", ["A8W8LinearMethod"], ns)
    released(inference + "quantization/golden_stick/a8dynw8.py", ["A8W8DynamicLinearMethod"], ns)
    ns["A8W4DynamicLinearMethod"] = None  # W4A8_DYNAMIC: not a scheme goldstick writes
    released(inference + "quantization/golden_stick/config.py",
             ["QUANTIZATION_METHOD_MAPPING", "mapping_rules", "GoldenStickConfig"], ns)
    released(inference + "tensor_parallel/grouped_layers.py",
             ["GroupedLinearMethodBase", "UnquantizedGroupedLinearMethod", "GroupedLinearBase",
              "ColumnParallelGroupedLinear", "RowParallelGroupedLinear"], ns)
    released(inference + "transformer/activation.py", ["SiLU", "ACTIVATION_MAP", "get_act_func"], ns)
    released(inference + "transformer/norm.py", ["LayerNorm", "RMSNorm", "get_norm_cls"], ns)
    released("parallel_core/utils/spec_utils.py", ["ModuleSpec", "import_module", "get_module", "build_module"], ns)
    released(inference + "transformer/mlp.py", ["MLPSubmodules", "MLP"], ns)
    released(inference + "transformer/moe/experts.py", ["GroupedMLP"], ns)
    released(inference + "transformer/moe/shared_experts.py", ["SharedExpertMLP"], ns)
    released(inference + "transformer/moe/router.py", ["Router", "TopKRouter"], ns)
    released(inference + "transformer/moe/moe_layer.py", ["MoESubmodules", "BaseMoELayer", "MoELayer"], ns)
    released(inference + "base_models/gpt/moe_module_spec.py", ["get_moe_module_spec"], ns)
    released(inference + "transformer/transformer_block.py", ["TransformerBlockSubmodules"], ns)
    released(inference + "base_models/gpt/gpt_layer_specs.py",
             ["get_mlp_module_spec", "get_gpt_decoder_block_spec"], ns)
    released(inference + "base_models/common/embeddings/language_model_embedding.py", ["LanguageModelEmbedding"],
             ns)
    # DeepSeek's names: the mixin's convert_name with the model's weight_mapping, then the model's override
    released("models/deepseek3/utils.py", ["DeepseekV3PreTrainedModel.weight_mapping"], ns)
    ns["ModelMixin__base"] = ns["DeepseekV3PreTrainedModel"]
    released("parallel_core/utils/model_mixin.py", ["ModelMixin.convert_name"], ns)
    ns["InferenceDeepseekV3ForCausalLM__base"] = ns["ModelMixin"]
    released("models/deepseek3/modeling_deepseek_v3_infer.py", ["InferenceDeepseekV3ForCausalLM.convert_name"], ns)
    ns["Attention"] = type("Attention", (), {})  # the MLA's own post-processing is the MLA tests' (model_utils.py:190)
    released(inference + "model_utils.py",
             ["InferModelMixin.generate_mapping", "InferModelMixin.process_weights_after_loading"], ns)
    released(inference + "base_models/gpt/gpt_model.py",
             ["GPTModel._determine_expert_map", "GPTModel.load_default_param", "GPTModel.load_weights",
              "GPTModel.generate_expert_mapping", "GPTModel.map_global_expert_id_to_local_expert_id"], ns)

    def layer_spec(num_experts=None, moe_grouped_gemm=True, gated_linear_unit=True, use_alltoall=False, **_):
        """get_gpt_layer_local_spec reduced to the MLP spec it builds (gpt_layer_specs.py:101-106): the attention
        half of the layer spec is the MLA replay's."""
        mlp = ns["get_mlp_module_spec"](num_experts=num_experts, gated_linear_unit=gated_linear_unit,
                                        moe_grouped_gemm=moe_grouped_gemm, use_alltoall=use_alltoall)
        return types.SimpleNamespace(submodules=types.SimpleNamespace(mlp=mlp))

    ns["get_gpt_layer_local_spec"] = layer_spec
    return ns


# ---------------------------------------------------------------------------------------------- replaying the load
def skip_without_bf16_cpu_zeros() -> None:
    """The whole model's build needs MindSpore's CPU Zeros kernel in bf16 (MindFormers' TopKRouter creates its expert
    bias with ``mint.zeros(..., bfloat16)``, moe/router.py:56); MindSpore 2.7's CPU backend has none (2.10's has)."""
    import mindspore as ms

    if tuple(int(p) for p in ms.__version__.split(".")[:2]) < (2, 10):
        pytest.skip(f"MindSpore {ms.__version__}'s CPU backend has no bf16 Zeros kernel, which MindFormers' router "
                    "build calls")


class Loaded:
    """One checkpoint folder as MindFormers builds and loads it: the MLA block of every decoder layer, or with
    ``full`` the whole main model (MLA, norms, dense MLP, MoE router / routed experts / shared experts, embedding,
    final norm, output layer), every stored tensor offered to ``GPTModel.load_weights``."""

    def __init__(self, ns: dict, folder: Path, quantization: str, full: bool = False):
        if full:
            skip_without_bf16_cpu_zeros()
        import json

        from safetensors import safe_open

        from goldstick.io.checkpoint import CheckpointReader

        cfg = CheckpointReader(folder).config
        self.cfg, self.ns, self.full = cfg, ns, full
        self.hf_config = hf = json.loads((folder / "config.json").read_text())
        self.mf_config = mf_config = types.SimpleNamespace(**{k: f(hf) for k, (f, _) in MF_CONFIG.items()})
        # the quantization config as quantization/utils.py:46-67 assembles it
        description = [f for f in folder.glob("*.json")
                       if any(k in f.name for k in ("quantization_description", "quant_model_description"))]
        assert len(description) == 1, description  # MindFormers refuses several (utils.py:55-58)
        self.description = json.loads(description[0].read_text())
        full_config = dict(hf.get("quantization_config") or {})
        full_config.update(self.description)
        full_config["weight_mapping"] = ns["DeepseekV3PreTrainedModel"].weight_mapping
        full_config["quantization"] = quantization
        self.quant_config = ns["GoldenStickConfig"](full_config)
        model_cls = type("Model", (ns["InferenceDeepseekV3ForCausalLM"], ns["InferModelMixin"], ns["GPTModel"]), {})
        self.model = model = model_cls()
        # one object plays InferenceDeepseekV3ForCausalLM (config.quantization) and GPTModel (the TransformerConfig)
        model.config = types.SimpleNamespace(**vars(mf_config), quantization=quantization)
        model.use_fused_mla = False
        model.transformer_config = mf_config
        model.model_comm_pgs = ns["default_model_comm_pgs"]
        model.expert_map = model._determine_expert_map()  # None: all experts on this rank (gpt_model.py:358-360)
        self.params: dict = {}
        self.modules: dict = {}  # MLA linears: prefix -> (layer, quant method)
        self.cells: dict = {}  # full: prefix -> MindFormers cell (MLP / MoELayer / norms / embedding / output)
        for i in range(cfg.num_hidden_layers):
            for norm in ("input_layernorm", "self_attention.q_layernorm", "self_attention.kv_layernorm"):
                size = {"input_layernorm": cfg.hidden_size, "self_attention.q_layernorm": cfg.q_lora_rank,
                        "self_attention.kv_layernorm": cfg.kv_lora_rank}[norm]
                name = f"decoder.layers.{i}.{norm}.weight"
                if full:  # RMSNorm's own parameter (norm.py:104: layernorm_compute_dtype, default loader)
                    self._add(name[: -len(".weight")], ns["RMSNorm"](mf_config, size, hf["rms_norm_eps"]))
                else:
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
        if full:
            self._build_rest()
        self.records: list[tuple[str, str, object, object]] = []  # (parameter, stored tensor, shard id, expert id)
        for name, param in self.params.items():
            param.weight_loader = self._recording(name, getattr(param, "weight_loader", ns["default_weight_loader"]))
        model.get_params_dict = lambda: self.params
        self.files = sorted(folder.glob("*.safetensors"))  # every shard, as model_utils.py:143-149
        self.stored: dict[str, str] = {}
        self.arrays: dict[str, np.ndarray] = {}
        weights = []
        for file in self.files:
            with safe_open(file, framework="np") as f:
                for name in f.keys():  # noqa: SIM118
                    self.stored[name] = file.name
                    if full or self.in_scope(name):
                        self.arrays[name] = f.get_tensor(name)
                        weights.append((model.convert_name(name), _Slice(self.arrays[name], name)))
        self.converted = {model.convert_name(n): n for n in self.stored if self.in_scope(n)}
        self.loaded = model.load_weights(weights, model.generate_mapping(), True)
        self.slot_of = {stored: (param, shard, expert) for param, stored, shard, expert in self.records}
        for layer, method in self.modules.values():  # (QuantizeMethodBase's is a no-op: float linears)
            if hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(layer)
        for cell in self.cells.values():  # model_utils.py:180-193, on the MLP / MoE cells (the MLA's: above)
            model.process_weights_after_loading(cell)

    def _add(self, prefix: str, cell) -> None:
        self.cells[prefix] = cell
        for local, param in cell.parameters_and_names():
            self.params[f"{prefix}.{local}"] = param

    def _build_rest(self) -> None:
        """Everything but the MLA, with MindFormers' own classes and specs: the per-layer MLP spec from
        get_gpt_decoder_block_spec (dense for the first first_k_dense_replace layers, gpt_layer_specs.py:235-262),
        each built as TransformerLayer builds it (transformer_layer.py:170-178, 233-242), and GPTModel's embedding,
        final norm and output layer (gpt_model.py:157-163, transformer_block.py:171-177, gpt_model.py:200-208)."""
        ns, c, hf = self.ns, self.mf_config, self.hf_config
        pgs = ns["default_model_comm_pgs"]
        block = ns["get_gpt_decoder_block_spec"](c, normalization=c.normalization)
        assert len(block.layer_specs) == self.cfg.num_hidden_layers  # no MTP layer (mtp_num_layers 0)
        for i, spec in enumerate(block.layer_specs):
            mlp = spec.submodules.mlp
            moe = mlp.module in (ns["MoELayer"], ns["GroupedMLP"])
            extra = {"model_comm_pgs": pgs} if moe else {"tp_group": pgs.tp}
            self._add(f"decoder.layers.{i}.mlp", ns["build_module"](
                mlp, config=c, quant_config=self.quant_config, prefix=f"decoder.layers.{i}.mlp", **extra))
            self._add(f"decoder.layers.{i}.pre_mlp_layernorm", ns["RMSNorm"](c, c.hidden_size, c.layernorm_epsilon))
        self._add("embedding", ns["LanguageModelEmbedding"](config=c, vocab_size=c.vocab_size,
                                                          max_sequence_length=hf["max_position_embeddings"],
                                                          model_comm_pgs=pgs))
        self._add("decoder.final_layernorm", ns["RMSNorm"](c, c.hidden_size, c.layernorm_epsilon))
        self._add("output_layer", ns["ColumnParallelLinear"](c.hidden_size, c.vocab_size, config=c, bias=False,
                                                             gather_output=True, compute_dtype=c.compute_dtype,
                                                             tp_group=pgs.tp))

    def _recording(self, param_name: str, loader):
        def load(param, loaded_weight, *args, **kwargs):
            shard = args[0] if args else kwargs.get("shard_id", kwargs.get("loaded_shard_id"))
            self.records.append((param_name, loaded_weight.name, shard, kwargs.get("expert_id")))
            return loader(param, loaded_weight, *args, **kwargs)
        return load

    def in_scope(self, name: str) -> bool:
        """The MLA block and its norms of the main layers (the MLP and experts load through other classes)."""
        parts = name.split(".")
        return (len(parts) > 3 and parts[0] == "model" and parts[1] == "layers"
                and int(parts[2]) < self.cfg.num_hidden_layers
                and (parts[3] in ("self_attn", "input_layernorm")))

    def held(self, prefix: str) -> dict[str, np.ndarray]:
        layer, _ = self.modules[prefix]
        return {local: _numpy(p) for local, p in layer.parameters_and_names()}

    def held_for(self, stored: str) -> np.ndarray:
        """What the parameter holds of one stored tensor after the loader's transforms, in the stored tensor's
        orientation (FULL_CONTRACT's dense fc1 / grouped fc1 / grouped fc2 rules undone)."""
        param, shard, expert = self.slot_of[stored]
        value = _numpy(self.params[param])
        if expert is not None:  # grouped: weight [E, in, out], w_scale [E, out]
            value = value[expert]
            if shard in ("w1", "w3"):
                half = value.shape[-1] // 2
                value = value[..., :half] if shard == "w1" else value[..., half:]
            return value.T  # [in, out] -> [out, in]; a scale row stays as it is
        if shard in ("gating", "hidden"):
            half = value.shape[0] // 2
            return value[:half] if shard == "gating" else value[half:]
        return value


class _Slice:
    """What safe_open(...).get_slice gives the loaders: indexable, with get_shape(); and the stored name."""

    def __init__(self, array: np.ndarray, name: str = ""):
        self.array, self.name = array, name

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
    # ascend: several shards of at most 4 MB (the whole output is ~17 MB), so that every shard is read
    return {"ascend": quantize(default_model_path(), mixed, out=root / "ascend", export_format="ascend",
                               max_shard_bytes=4 << 20, **kw).out,
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


# ---------------------------------------------------------------------------------------------- the whole model
def _squeezed(array: np.ndarray) -> np.ndarray:
    """A stored tensor as the loaders take it: [out, 1] scales squeezed (layers.py:495-496, 879-880;
    grouped_layers.py:366-368, 575-577)."""
    return array.reshape(-1) if array.ndim == 2 and array.shape[1] == 1 else array


def _check_full(loaded: Loaded) -> None:
    """Every stored tensor consumed or skipped by a NOT_LOADED rule, every parameter slot (SLOTS) filled by exactly
    one tensor, and every non-MLA parameter holding exactly the stored values (so names, dtypes and shapes were
    taken as they are; the MLA's values: the MLA tests)."""
    cfg, c = loaded.cfg, loaded.mf_config
    consumed = {stored for _, stored, _, _ in loaded.records}
    skipped = {name: kind for name in loaded.stored for kind, (match, _) in NOT_LOADED.items() if match(name, cfg)}
    assert not consumed & set(skipped), f"loaded although a rule skips them: {sorted(consumed & set(skipped))}"
    assert set(loaded.stored) - consumed == set(skipped), \
        f"not consumed, no rule: {sorted(set(loaded.stored) - consumed - set(skipped))}; " \
        f"skipped by a rule but absent: {sorted(set(skipped) - set(loaded.stored))}"
    for name, kind in skipped.items():  # the offsets MindFormers has no use for are the zeros of symmetric linears
        if kind == "dynamic weight_offset":
            assert loaded.description[name] == "W8A8_DYNAMIC" and not np.any(loaded.arrays[name]), name
    assert not set(loaded.params) - set(loaded.loaded), "MindFormers never loads some parameters"
    got = defaultdict(list)
    for param, _, shard, expert in loaded.records:
        got[param].append((shard, expert))
    for param in loaded.params:
        rule = next((slots for pattern, slots, _ in SLOTS if re.search(pattern, param)), None)
        if rule is None:
            assert len(got[param]) == 1, f"{param}: slots {got[param]}, one tensor expected"
        else:
            assert sorted(got[param], key=repr) == sorted(rule(c), key=repr), \
                f"{param}: slots {sorted(got[param], key=repr)} != {sorted(rule(c), key=repr)}"
    for param, stored, _, _ in loaded.records:
        if ".self_attention." in param:
            continue
        held, want = loaded.held_for(stored), _squeezed(loaded.arrays[stored])
        assert held.shape == want.shape, f"{param} holds {held.shape} of {stored} {want.shape}"
        assert np.issubdtype(held.dtype, np.integer) == np.issubdtype(want.dtype, np.integer), (param, stored)
        assert np.array_equal(held.astype(np.float64), want.astype(np.float64)), \
            f"{param} holds {stored} changed (dtype {want.dtype} into {held.dtype})"


def test_golden_stick_target_whole_model_through_mindformers(ns, checkpoints):
    """`--format golden-stick` (static attention, dynamic MLP and experts): the whole main model loads the same way
    in MindFormers' golden-stick mode ([out] bf16 weight scales, int32 offsets, skipped as the ascend ones)."""
    loaded = Loaded(ns, checkpoints["golden-stick"], "golden-stick", full=True)
    assert not loaded.quant_config.is_modelslim
    _check_full(loaded)


@pytest.fixture(scope="module")
def ascend_full(ns, checkpoints):
    return Loaded(ns, checkpoints["ascend"], "ascend", full=True)


def test_ascend_target_whole_model_through_mindformers(ascend_full):
    """`--format ascend` of the mixed recipe, every tensor of every shard through MindFormers' loading of the whole
    main model (MLA, dense MLP, router, routed and shared experts, norms, embedding, final norm, output layer)."""
    loaded = ascend_full
    assert len(loaded.files) > 1  # several shards, all read
    assert loaded.quant_config.is_modelslim
    _check_full(loaded)
    # what the replay built is DeepSeek's: dense layers first, then MoE layers, dynamic W8A8 everywhere in the MLP
    cfg, ns = loaded.cfg, loaded.ns
    for i in range(cfg.num_hidden_layers):
        mlp = loaded.cells[f"decoder.layers.{i}.mlp"]
        assert isinstance(mlp, ns["MoELayer"] if cfg.is_moe_layer(i) else ns["MLP"]), i
        linears = ([mlp.experts.linear_fc1, mlp.experts.linear_fc2, mlp.shared_experts.linear_fc1,
                    mlp.shared_experts.linear_fc2] if cfg.is_moe_layer(i) else [mlp.linear_fc1, mlp.linear_fc2])
        assert all(isinstance(x.quant_method, ns["A8W8DynamicLinearMethod"]) for x in linears), i
    # the MTP layer is not loaded at all, and nothing else is skipped
    skipped = {n for n in loaded.stored if NOT_LOADED["mtp layer"][0](n, cfg)}
    assert skipped and all(n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in skipped)
    assert {n for n in loaded.stored if n.endswith(".weight_offset")} == \
        {n for n, label in loaded.description.items() if label == "W8A8_DYNAMIC" and n.endswith(".weight_offset")}


def _tampered(src: Path, out: Path, drop=(), change=None) -> Path:
    """A copy of checkpoint ``src`` with tensors dropped or changed (config and description files as they are)."""
    import shutil

    from safetensors import safe_open

    from goldstick.io.writer import ShardedWriter

    out.mkdir()
    for f in src.glob("*.json"):
        if f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    w = ShardedWriter(out, max_shard_bytes=4 << 20, overwrite=True)
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, framework="np") as f:
            for name in f.keys():  # noqa: SIM118
                if name not in drop:
                    w.add(name, (change or {}).get(name, lambda a: a)(f.get_tensor(name)))
    w.close(metadata={"format": "ascend"})
    return out


def test_whole_model_check_refuses_what_mindformers_takes_silently(ns, checkpoints, tmp_path):
    """The check has teeth where MindFormers' loader has none: a routed expert's missing scale (the grouped
    parameter still counts as loaded after its other experts, gpt_model.py:512) and a weight scale that is not
    bf16-exact (rounded into the bf16 w_scale without a word, a8dynw8.py:61-66, grouped_layers.py:352-366)."""
    src = checkpoints["ascend"]
    missing = "model.layers.2.mlp.experts.5.up_proj.weight_scale"
    loaded = Loaded(ns, _tampered(src, tmp_path / "drop", drop={missing}), "ascend", full=True)
    assert not set(loaded.params) - set(loaded.loaded)
    with pytest.raises(AssertionError, match="mlp.experts.linear_fc1.w_scale: slots"):
        _check_full(loaded)
    scale = "model.layers.1.mlp.experts.7.gate_proj.weight_scale"
    loaded = Loaded(ns, _tampered(src, tmp_path / "rounded", change={scale: lambda a: a * np.float32(1 + 2 ** -12)}),
                    "ascend", full=True)
    with pytest.raises(AssertionError, match=f"holds {scale} changed"):
        _check_full(loaded)


def test_r1_mtp_layer_names_in_mindformers(ascend_full):
    """R1's MTP layer is layer 61, which DeepseekV3PreTrainedModel.weight_mapping names outright (models/deepseek3/
    utils.py:55-62): in the main model three of its tensors land on main-model parameters (its embed_tokens,
    shared_head.head and shared_head.norm on embedding, output_layer and decoder.final_layernorm, utils.py:59-61),
    the rest on MTP-block names (decoder.transformer / enorm / hnorm / eh_proj) or decoder.layers.61, which a
    61-layer main model does not have. (The tiny model's MTP layer, 4, matches none of those entries: every one of
    its tensors is skipped, test_ascend_target_whole_model_through_mindformers.)"""
    from goldstick.model.config import ModelConfig

    cfg = ModelConfig(num_nextn_predict_layers=1)  # the defaults are R1's
    n = cfg.num_hidden_layers
    assert n == 61
    names = [*cfg.layer_tensor_shapes(n), *cfg.mtp_extra_tensor_shapes(n)]
    converted = {name: ascend_full.model.convert_name(name) for name in names}
    main_globals = {p for p in ascend_full.params if not p.startswith("decoder.layers.")}
    assert main_globals == {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                            "output_layer.weight"}
    onto_main = {name: mf for name, mf in converted.items() if mf in main_globals}
    assert onto_main == {f"model.layers.{n}.embed_tokens.weight": "embedding.word_embeddings.weight",
                         f"model.layers.{n}.shared_head.head.weight": "output_layer.weight",
                         f"model.layers.{n}.shared_head.norm.weight": "decoder.final_layernorm.weight"}
    rest = set(converted.values()) - set(onto_main.values())
    assert all(mf.startswith(("decoder.transformer.", "decoder.enorm.", "decoder.hnorm.", "decoder.eh_proj.",
                              f"decoder.layers.{n}.")) for mf in rest), sorted(rest)


# ---------------------------------------------------------------------------------------------- dynamic W8A8 numbers
def ascend_dynamic_quant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DynamicQuantExt()(x, None) (a8dynw8.py:104) = aclnnDynamicQuant, symmetric per token, as the Atlas A2/A3
    kernel computes it (CANN ops, quant/dynamic_quant/op_kernel: dynamic_quant_base.h DuplicateConst fills 127.0;
    dynamic_quant.h Compute and dynamic_quant_db.h ProcessBf16, per row in fp32: m = Div(127, max|x|),
    scaleOut = 1 / m, y = Cast(Muls(x, m), CAST_RINT), int32 -> half -> int8 exact for |y| <= 127). Not the
    documented ``x / (max / 127)``: the kernel multiplies by the reciprocal. Returns (codes, per-token scale)."""
    a = np.asarray(x, np.float32)
    m = np.float32(127.0) / np.abs(a).max(axis=-1, keepdims=True)
    return np.rint(a * m), np.float32(1.0) / m


def ascend_pertoken_matmul(codes: np.ndarray, weight: np.ndarray, w_scale: np.ndarray,
                           token_scale: np.ndarray) -> np.ndarray:
    """QuantBatchMatmul(transpose_x2=True)(codes, weight, w_scale, pertokenScale=token_scale) (a8dynw8.py:69, 122)
    and GroupedMatmulV4's per-token A8W8 (:108-117), before the cast to params_dtype: the int32 accumulator
    dequantized by the per-channel scale, then multiplied by the per-token scale, in fp32 (CANN
    quant_batch_matmul_v3_pertoken_basic.h BasicDequantCompute: AscendDequant(acc, scale), PertokenCalculate: Mul)."""
    acc = codes.astype(np.int64) @ weight.astype(np.int64).T
    assert np.abs(acc).max() < 2 ** 24  # exact in fp32
    return (acc.astype(np.float32) * w_scale.astype(np.float32)) * token_scale


def _dynamic_inputs(folder: Path) -> dict:
    """Every dynamic W8A8 linear of goldstick's CPU network loaded from ``folder`` and the rows it receives on
    calibration tokens: name -> (cell, x)."""
    from mindspore import Tensor

    import goldstick
    from goldstick.engine.calibration import load_calibration
    from goldstick.model.tokenizer import load_tokenizer
    from goldstick.quant.cells import DynamicW8A8Linear
    from goldstick.testing.make_model import default_model_path

    net = goldstick.load_model(folder)
    seen: dict[str, list] = {}
    cells, handles = {}, []
    for name, cell in net.cells_and_names():
        if isinstance(cell, DynamicW8A8Linear):
            cells[name] = cell
            handles.append(cell.register_forward_hook(
                lambda c, inputs, output, name=name: seen.setdefault(name, []).append(
                    inputs[0].asnumpy().reshape(-1, c.in_features))))
    tok = load_tokenizer(default_model_path())
    batch = load_calibration("calibration/mixed-zh-en.jsonl", tok.tokenizer, samples=4, seq_len=32,
                             bos_id=tok.bos_id).batches[0]
    net(Tensor(batch))
    for h in handles:
        h.remove()
    return {name: (cells[name], np.concatenate(xs)) for name, xs in seen.items()}


def _twin(cell, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """goldstick's CPU twin on ``x``: its output and the int8 codes it multiplied (its matmul's first operand)."""
    from mindspore import Tensor

    codes = []
    matmul = cell.matmul

    def spy(a, b):
        codes.append(a.asnumpy())
        return matmul(a, b)

    cell.matmul = spy
    try:
        y = cell(Tensor(np.ascontiguousarray(x))).asnumpy()
    finally:
        cell.matmul = matmul
    return y, codes[0]


def test_dynamic_linears_rebuilt_from_mindformers_equal_the_twin(ascend_full, checkpoints):
    """Each dynamic W8A8 linear (dense MLP, shared experts, every routed expert that calibration tokens reach) rebuilt
    from what MindFormers holds after its own transforms (fc1 halves, [E, in, out] expert stacks transposed back,
    squeezed bf16 w_scale), run with the Ascend kernels' arithmetic, against goldstick's CPU twin on the same rows:
    the calibration inputs and their bf16 roundings (the dtype the kernel takes).

    Tolerance: the twin computes s = max|x| / 127, codes rint(x / s), y = (acc * s) * w_scale; the kernel
    m = 127 / max|x|, codes rint(x * m), y = (acc * w_scale) * (1 / m). Each side rounds twice in fp32 after the exact
    integer accumulator and the two token scales differ by at most three roundings (s vs 1 / (127 / max)), so where
    the codes agree |y_kernel - y_twin| <= 7 * 2^-24 |y| < 2^-21 |y|. The codes themselves can differ, by one, only
    where x * m lies within a few fp32 ulps of a half-integer (x / s and x * m differ by <= 3 ulps of <= 127, i.e.
    < 2^-15): asserted below (2^-14), with the accumulator drift it causes (sum |W| over flipped codes, times the
    scales) added to that element's tolerance."""
    loaded = ascend_full
    cfg = loaded.cfg
    inputs = _dynamic_inputs(checkpoints["ascend"])
    kinds: dict[str, set] = defaultdict(set)
    flips, total = defaultdict(int), defaultdict(int)
    worst = 0.0
    for name, (cell, x) in sorted(inputs.items()):
        layer = int(name.split(".")[2])
        kind = "routed" if ".experts." in name else "shared" if ".shared_experts." in name else "dense"
        kinds[kind].add(name if kind != "routed" else name.rsplit(".", 1)[0])
        assert cfg.is_moe_layer(layer) == (kind != "dense"), name
        weight = loaded.held_for(f"{name}.weight")
        w_scale = loaded.held_for(f"{name}.weight_scale").astype(np.float32)
        assert weight.dtype == np.int8 and weight.shape == (cell.out_features, cell.in_features), name
        x = x[np.abs(x).max(axis=-1) > 0]  # (an all-zero row would make m infinite; none occur)
        for variant, rows in (("fp32", x), ("bf16", x.astype(BF16).astype(np.float32))):
            y_twin, codes_twin = _twin(cell, rows)
            codes, token_scale = ascend_dynamic_quant(rows)
            y = ascend_pertoken_matmul(codes, weight, w_scale, token_scale)
            delta = codes - codes_twin
            assert np.abs(delta).max() <= 1, name
            pre = rows * (np.float32(127.0) / np.abs(rows).max(axis=-1, keepdims=True))
            assert np.all(np.abs(pre - np.floor(pre) - 0.5)[delta != 0] <= 2 ** -14), name
            drift = (np.abs(delta) @ np.abs(weight.astype(np.float64)).T) * w_scale * token_scale
            err = np.abs(y.astype(np.float64) - y_twin)
            assert np.all(err <= 2 ** -21 * np.abs(y_twin) + 1.001 * drift), (name, variant, float(err.max()))
            clean = ~np.any(delta != 0, axis=1)
            worst = max(worst, float((err[clean] / np.maximum(np.abs(y_twin[clean]), 1e-30)).max(initial=0)))
            flips[variant] += int(np.count_nonzero(delta))
            total[variant] += delta.size
    # the coverage the contract asks for: the dense MLP, the shared experts of every MoE layer, many routed experts
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert kinds["dense"] == {f"model.layers.{i}.mlp.{p}" for i in range(cfg.num_hidden_layers)
                              if not cfg.is_moe_layer(i) for p in ("gate_proj", "up_proj", "down_proj")}
    assert kinds["shared"] == {f"model.layers.{i}.mlp.shared_experts.{p}" for i in moe_layers
                               for p in ("gate_proj", "up_proj", "down_proj")}
    assert len(kinds["routed"]) >= 2 * len(moe_layers)
    # measured here: no flip on the fp32 rows, ~2e-4 of the codes on the bf16 rows (exact ties of a bf16 input,
    # broken one way by x / s and the other by x * m); rows without a flip agree to < 2^-21 (56% bit for bit)
    assert all(flips[v] <= 1e-3 * total[v] for v in total), (dict(flips), dict(total))
    assert worst < 2 ** -21, worst
