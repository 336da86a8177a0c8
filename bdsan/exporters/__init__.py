"""Verified exports: ONNX, self-describing safetensors, slim (physically pruned) models."""
