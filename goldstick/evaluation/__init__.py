"""Accuracy: float vs quantized on held-out text, sensitivity analysis, C-Eval."""
