"""Quantization runs: calibration, the layer loop, resume, the streaming path, executors, reports."""
