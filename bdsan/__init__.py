"""bdsan — a backdoor sanitizer for image classifiers.

The CLI is a thin layer over this API: ``load_model``, ``load_holdout``, ``audit``, ``scan``, ``sanitize``,
``export_onnx``, ``export_safetensors``, ``trap_train``. Heavy modules load on first use, so ``import bdsan`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "bdsan.io.models",
    "load_holdout": "bdsan.io.data",
    "check_holdout_matches": "bdsan.io.data",
    "split_holdout": "bdsan.io.data",
    "inspect_model": "bdsan.io.models",
    "LoadedModel": "bdsan.io.models",
    "Holdout": "bdsan.io.data",
    "Preprocessing": "bdsan.io.preprocess",
    "audit": "bdsan.detectors.audit",
    "scan": "bdsan.detectors.scan",
    "sanitize": "bdsan.sanitize",
    "trap_train": "bdsan.sanitize.trap_train",
    "export_onnx": "bdsan.exporters.onnx",
    "export_safetensors": "bdsan.exporters.safetensors",
}

__all__ = ["Holdout", "LoadedModel", "Preprocessing", "__version__", "audit", "check_holdout_matches",
           "export_onnx", "export_safetensors", "inspect_model", "load_holdout", "load_model", "sanitize", "scan",
           "split_holdout", "trap_train"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'bdsan' has no attribute {name!r}")
    try:
        # bdsan.sanitize is both a package and the API function: the package forwards calls to the pipeline.
        value = importlib.import_module(module) if name == "sanitize" else getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise AttributeError(f"bdsan.{name} is not available ({module}: {exc})") from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
