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
    "load_model": "goldstick.loader",
    "ModelConfig": "goldstick.config",
    "CheckpointReader": "goldstick.checkpoint",
    "CheckpointError": "goldstick.checkpoint",
    "make_model": "goldstick.make_model",
    "default_model_path": "goldstick.make_model",
    "quantize": "goldstick.engine",
    "QuantizeResult": "goldstick.engine",
    "load_recipe": "goldstick.recipe",
    "Recipe": "goldstick.recipe",
    "Rule": "goldstick.recipe",
    "Scheme": "goldstick.recipe",
    "Calibration": "goldstick.recipe",
    "Options": "goldstick.recipe",
    "compare_models": "goldstick.evaluate",
    "from_golden_stick": "goldstick.gs_compat",
    "verify": "goldstick.verification",  # not goldstick/verify.py: a submodule would shadow the function
    "VerifyReport": "goldstick.verification",
    # errors: every one derives from GoldstickError (goldstick/errors.py has the tree)
    "GoldstickError": "goldstick.errors",
    "UsageError": "goldstick.errors",
    "TokenizerError": "goldstick.errors",
    "ConfigError": "goldstick.config",
    "RecipeError": "goldstick.recipe",
    "CalibrationError": "goldstick.calibration",
    "QuantizeError": "goldstick.engine",
    "WriterError": "goldstick.writer",
    "ExportError": "goldstick.export",
    "CEvalError": "goldstick.ceval",
    "JobError": "goldstick.ceval_jobs",
    "AnalyzeError": "goldstick.analyze",
    "VerifyError": "goldstick.verification",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'goldstick' has no attribute {name!r}")
