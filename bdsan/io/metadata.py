"""The ``__metadata__`` keys bdsan writes into safetensors and ONNX files, and reads back."""
from __future__ import annotations

import json

from .preprocess import Preprocessing

ARCH = "bdsan.arch"
NUM_CLASSES = "bdsan.num_classes"
CLASSES = "bdsan.classes"
PREPROCESSING = "bdsan.preprocessing"
SOURCE_SHA256 = "bdsan.source_sha256"
VERSION = "bdsan.version"
# ONNX only: "true" when (x - mean) / std is inside the graph, so the model takes [0,1] pixels.
PREPROCESSING_BAKED = "bdsan.preprocessing_baked"


def build_metadata(arch: str, num_classes: int, preprocessing: Preprocessing, classes: list[str] | None = None,
                   source_sha256: str = "", extra: dict[str, str] | None = None) -> dict[str, str]:
    """String-only metadata (safetensors and ONNX metadata_props both require str → str)."""
    from .. import __version__

    metadata = {ARCH: arch, NUM_CLASSES: str(num_classes), PREPROCESSING: json.dumps(preprocessing.to_dict()),
                VERSION: __version__, SOURCE_SHA256: source_sha256,
                # flat copies for tools that only look for the usual names
                "mean": json.dumps(list(preprocessing.mean)), "std": json.dumps(list(preprocessing.std)),
                "input_size": str(preprocessing.input_size or "")}
    if classes:
        metadata[CLASSES] = json.dumps(list(classes))
    metadata.update(extra or {})
    return metadata


def read_preprocessing(metadata: dict[str, str]) -> Preprocessing | None:
    if PREPROCESSING in metadata:
        return Preprocessing.from_dict(json.loads(metadata[PREPROCESSING]))
    return None


def read_classes(metadata: dict[str, str]) -> list[str] | None:
    return json.loads(metadata[CLASSES]) if CLASSES in metadata else None
