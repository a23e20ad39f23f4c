"""``from_golden_stick`` with Golden-Stick's own ``PTQConfig`` objects (mindspore_gs 1.4.1), as ``PTQ(config,
layer_policies)`` takes them: the DeepSeek ``dsquant`` policy of Golden-Stick's example translates to the shipped
mixed recipe, enum and MindSpore-dtype fields included.

Runs where ``mindspore_gs`` imports: a normal ``pip install -e ".[gs,test]"``, or a ``--no-deps`` folder named by
``GOLDSTICK_GS_PATH`` (then a failed import is an error, not a skip); skipped otherwise.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict

import pytest

GS_PATH_ENV = "GOLDSTICK_GS_PATH"
_gs_path = os.environ.get(GS_PATH_ENV)
if _gs_path:
    if _gs_path not in sys.path:
        sys.path.insert(0, _gs_path)
    import mindspore_gs  # noqa: F401
else:
    pytest.importorskip("mindspore_gs")

import mindspore as ms  # noqa: E402
from mindspore_gs.common import BackendTarget  # noqa: E402
from mindspore_gs.ptq import OutliersSuppressionType, PTQConfig, PTQMode, QuantGranularity  # noqa: E402

from goldstick.model.config import ModelConfig  # noqa: E402
from goldstick.quant.gs_compat import from_golden_stick  # noqa: E402
from goldstick.quant.recipe import RecipeError, load_recipe  # noqa: E402

FFN = r".*\.feed_forward\..*"


def _dsquant() -> tuple[PTQConfig, OrderedDict]:
    """Golden-Stick's example/deepseekv3/ds_utils.py::create_ptq('dsquant'), with GS's own classes."""
    cfg = PTQConfig(mode=PTQMode.QUANTIZE, backend=BackendTarget.ASCEND, opname_blacklist=["lkv2kv", "lm_head"],
                    weight_quant_dtype=ms.int8, act_quant_dtype=ms.int8,
                    outliers_suppression=OutliersSuppressionType.OUTLIER_SUPPRESSION_PLUS,
                    act_quant_granularity=QuantGranularity.PER_TENSOR,
                    weight_quant_granularity=QuantGranularity.PER_CHANNEL)
    ffn = PTQConfig(mode=PTQMode.QUANTIZE, backend=BackendTarget.ASCEND, weight_quant_dtype=ms.int8,
                    act_quant_dtype=ms.int8, outliers_suppression=OutliersSuppressionType.NONE,
                    act_quant_granularity=QuantGranularity.PER_TOKEN,
                    weight_quant_granularity=QuantGranularity.PER_CHANNEL)
    return cfg, OrderedDict({FFN: ffn})


def test_real_ptqconfig_translates_to_the_mixed_recipe():
    cfg, layer_policies = _dsquant()
    r1 = ModelConfig()
    recipe, notes = from_golden_stick(cfg, layer_policies, config=r1)
    assert recipe.plan(r1).schemes() == load_recipe("deepseek-r1-w8a8-mixed").plan(r1).schemes()
    assert any("absmax/127.5" in n for n in notes)  # GS's weight scale, reported rather than silently changed


def test_real_ptqconfig_without_layer_policies_is_the_network_policy_everywhere():
    cfg, _ = _dsquant()
    r1 = ModelConfig()
    recipe, _ = from_golden_stick(cfg, config=r1)
    schemes = recipe.plan(r1).schemes()
    expert, kv_b = schemes["model.layers.3.mlp.experts.0.gate_proj"], schemes["model.layers.3.self_attn.kv_b_proj"]
    assert (expert.name, expert.outlier_suppression) == ("w8a8-static", "osplus")
    assert kv_b.name == "float"  # the substring blacklist 'lkv2kv'


def test_layer_policies_given_twice_is_an_error():
    cfg, layer_policies = _dsquant()
    with pytest.raises(RecipeError, match="layer_policies given twice"):
        from_golden_stick({"weight_quant_dtype": "int8", "layer_policies": {FFN: {}}}, layer_policies)
