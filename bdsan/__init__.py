"""bdsan — a backdoor sanitizer for image classifiers.

The CLI is a thin layer over this API: ``load_model``, ``load_holdout``, ``audit``, ``sanitize``,
``export_onnx``, ``export_safetensors``.
"""
__version__ = "0.1.0"
