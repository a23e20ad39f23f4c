"""How vllm-mindspore 0.5.1 reaches MindFormers for DeepSeek-V3, from its own released code: the architecture is
handed to MindFormers, ``--quantization ascend|golden-stick`` is accepted and becomes MindFormers'
``model_config.quantization``, the mode tests/test_stacks_mindformers.py loads our checkpoints in.

Optional: set GOLDSTICK_STACKS_PATH to a folder with the unpacked wheel (``pip install --no-deps --target DIR
vllm-mindspore==0.5.1``; .ci/run does).
"""

from __future__ import annotations

import argparse
import os
import types
from pathlib import Path

import pytest
from test_stacks_mindformers import released

VMS = Path(os.environ.get("GOLDSTICK_STACKS_PATH", "")) / "vllm_mindspore"
pytestmark = pytest.mark.skipif(not (VMS / "model_executor").is_dir(),
                                reason="vllm-mindspore 0.5.1 source not found: set GOLDSTICK_STACKS_PATH to a folder "
                                       "with the wheel unpacked (pip install --no-deps --target DIR "
                                       "vllm-mindspore==0.5.1)")
# the contract, with where it comes from (vllm_mindspore 0.5.1 wheel)
CONTRACT = {
    "architecture": "DeepseekV3ForCausalLM -> MindFormersForCausalLM (model_executor/model_loader/utils.py:40-57)",
    "quantization flag": "--quantization accepts ascend and golden-stick (platforms/ascend.py:142-150)",
    "mode": "model_config.quantization -> MindFormers' model.model_config.quantization "
            "(model_executor/models/mf_models/config.py:92-97, transform_config :162-197)",
}


def test_deepseek_goes_to_mindformers():
    ns = released("model_executor/model_loader/utils.py", ["mf_mcore_compatible", "resolve_mf_mcore_arch"],
                  {"mcore_support_list": ["DeepseekV3ForCausalLM"]}, root=VMS)
    archs = ["DeepseekV3ForCausalLM"]
    ns["resolve_mf_mcore_arch"](None, archs)
    assert archs == ["MindFormersForCausalLM"]


def test_quantization_flag_reaches_mindformers():
    ns = released("platforms/ascend.py", ["AscendPlatform.pre_register_and_update"],
                  {"logger": types.SimpleNamespace(debug=lambda *a: None)}, root=VMS)
    parser = argparse.ArgumentParser()
    parser.add_argument("--quantization", choices=["awq", "fp8"])
    ns["AscendPlatform"].pre_register_and_update(parser)
    for mode in ("ascend", "golden-stick"):
        assert parser.parse_args(["--quantization", mode]).quantization == mode

    class MindFormerConfig(types.SimpleNamespace):
        pass

    ns = released("model_executor/models/mf_models/config.py",
                  ["_get_nested_attr", "_set_nested_attr", "transform_config", "MF_MODEL_COMMON_MAPPING"],
                  {"MindFormerConfig": MindFormerConfig, "VllmConfig": object}, root=VMS)
    vllm_config = types.SimpleNamespace(
        model_config=types.SimpleNamespace(quantization="ascend", dtype="bfloat16", max_model_len=4096),
        cache_config=types.SimpleNamespace(block_size=128))
    target = MindFormerConfig()
    ns["transform_config"](ns["MF_MODEL_COMMON_MAPPING"], vllm_config, target)
    assert target.model.model_config.quantization == "ascend"
