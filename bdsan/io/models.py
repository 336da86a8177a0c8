"""Safe model loading (SPEC §2.1): formats recognised by content; untrusted files are data, never code."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelRefused
from .archs import build_arch
from .preprocess import Normalized, Preprocessing


@dataclass
class LoadedModel:
    """A model ready for bdsan: the raw torch module (None for ONNX) plus what is known about it."""

    module: nn.Module | None
    arch: str
    num_classes: int
    preprocessing: Preprocessing
    format: str
    path: str = ""
    sha256: str = ""
    classes: list[str] | None = None
    onnx_path: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters()) if self.module is not None else 0

    def normalized(self) -> Normalized:
        """The module wrapped so it takes [0,1] pixels."""
        if self.module is None:
            raise ModelRefused(f"{self.path}: ONNX models can be audited and checked, not defended")
        return Normalized(self.module, self.preprocessing)

    def info(self) -> dict:
        """The report's ``model`` object (SPEC §5)."""
        return {"path": self.path, "sha256": self.sha256, "format": self.format, "arch": self.arch,
                "num_classes": self.num_classes, "params": self.params,
                "preprocessing": self.preprocessing.to_dict(), "warnings": list(self.warnings)}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def from_module(module: nn.Module, arch: str, num_classes: int, preprocessing: Preprocessing,
                classes: list[str] | None = None) -> LoadedModel:
    """Wrap an in-memory module (Python API use and tests)."""
    return LoadedModel(module.eval(), arch, num_classes, preprocessing, "module", classes=classes)


def load_state_dict_into(arch: str, num_classes: int, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Build ``arch`` and load ``state_dict`` strictly, with a readable list of mismatches."""
    module = build_arch(arch, num_classes)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs {arch} {tuple(expected[k].shape)}"
                    for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" … (+{len(items) - 8})" if len(items) > 8 else "")
        parts = [f"missing {len(missing)}: {head(missing)}" if missing else "",
                 f"unexpected {len(unexpected)}: {head(unexpected)}" if unexpected else "",
                 f"shape mismatch {len(shapes)}: {head(shapes)}" if shapes else ""]
        raise ModelRefused(f"weights do not fit architecture {arch!r} — " + "; ".join(p for p in parts if p),
                           hint="check --arch and --num-classes (`bdsan archs` lists architectures)")
    module.load_state_dict(state_dict, strict=True)
    return module.eval()


def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
               preprocessing: Preprocessing | None = None, trust_code: bool = False) -> LoadedModel:
    """Load a model file safely (SPEC §2.1). ``preprocessing`` overrides what the file's metadata says.

    Minimal version: safetensors with bdsan metadata or ``arch``. (Issue 2 completes the formats.)
    """
    from safetensors import safe_open

    from .metadata import ARCH, NUM_CLASSES, read_classes, read_preprocessing

    path = Path(path)
    if not path.is_file():
        raise ModelRefused(f"model file not found: {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state_dict = {k: handle.get_tensor(k) for k in handle.keys()}
    arch = arch or metadata.get(ARCH)
    if not arch:
        raise ModelRefused(f"{path}: no architecture known", hint="pass --arch NAME")
    num_classes = num_classes or int(metadata.get(NUM_CLASSES, 0))
    module = load_state_dict_into(arch, num_classes, state_dict)
    preprocessing = preprocessing or read_preprocessing(metadata) or Preprocessing()
    return LoadedModel(module, arch, num_classes, preprocessing, "safetensors", str(path), sha256_file(path),
                       read_classes(metadata))
