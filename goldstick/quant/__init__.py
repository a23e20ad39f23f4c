"""Quantization maths and vocabulary: numerics, algorithms, FP8, kernels, recipes and plans, cells."""
