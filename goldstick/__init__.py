"""goldstick: MindSpore-native post-training quantization for DeepSeek-V3/R1.

The public API is a few verbs and config objects:

    import goldstick
    model = goldstick.default_model_path()                    # the embedded tiny DeepSeek-V3 model (made once)
    recipe = goldstick.load_recipe("deepseek-r1-w8a8-mixed")  # or goldstick.Recipe(rules=..., ...)
    print(recipe.plan(goldstick.ModelConfig.from_file(model)).format())
    result = goldstick.quantize(model, recipe, out="out/q")   # -> .out, .plan, .report
    net = goldstick.load_model(result.out)                    # MindSpore nn.Cell: logits = net(ids)
    print(goldstick.compare_models(model, result.out))        # float vs quantized on held-out text
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module; imported on first use so that `import goldstick` (and the CLI's --help) stays fast
_LAZY = {
    "load_model": "goldstick.io.loader",
    "ModelConfig": "goldstick.model.config",
    "CheckpointReader": "goldstick.io.checkpoint",
    "CheckpointError": "goldstick.io.checkpoint",
    "make_model": "goldstick.testing.make_model",
    "default_model_path": "goldstick.testing.make_model",
    "quantize": "goldstick.engine.pipeline",
    "QuantizeResult": "goldstick.engine.pipeline",
    "load_recipe": "goldstick.quant.recipe",
    "Recipe": "goldstick.quant.recipe",
    "Rule": "goldstick.quant.recipe",
    "Scheme": "goldstick.quant.recipe",
    "Calibration": "goldstick.quant.recipe",
    "Options": "goldstick.quant.recipe",
    "compare_models": "goldstick.evaluation.compare",
    "from_golden_stick": "goldstick.quant.gs_compat",
    "verify": "goldstick.io.verification",  # not goldstick/verify.py: a submodule would shadow the function
    "VerifyReport": "goldstick.io.verification",
    # errors: every one derives from GoldstickError (goldstick/errors.py has the tree)
    "GoldstickError": "goldstick.errors",
    "UsageError": "goldstick.errors",
    "TokenizerError": "goldstick.errors",
    "ConfigError": "goldstick.model.config",
    "RecipeError": "goldstick.quant.recipe",
    "CalibrationError": "goldstick.engine.calibration",
    "QuantizeError": "goldstick.engine.pipeline",
    "WriterError": "goldstick.io.writer",
    "ExportError": "goldstick.io.export",
    "CEvalError": "goldstick.evaluation.ceval",
    "JobError": "goldstick.evaluation.ceval_jobs",
    "AnalyzeError": "goldstick.evaluation.analyze",
    "VerifyError": "goldstick.io.verification",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'goldstick' has no attribute {name!r}")
