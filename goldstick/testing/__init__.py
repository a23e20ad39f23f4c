"""Synthetic DeepSeek-V3 checkpoints (the embedded default model, test and benchmark models)."""
