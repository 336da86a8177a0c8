"""Verified exports: ONNX, self-describing safetensors, slim (physically pruned) models.

``export_model`` picks the format from the output's suffix; both formats are checked before the file is
renamed into place (ONNX: onnx.checker + onnxruntime parity; safetensors: reload with no flags + parity).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from ..io.data import Holdout
from ..io.models import LoadedModel

FORMATS = {".onnx": "onnx", ".safetensors": "safetensors"}


def export_format(out: str | Path) -> str:
    """``onnx`` or ``safetensors`` from the output file's suffix."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"--out {out}: unknown export format {suffix or '(no suffix)'!r}",
                         hint="use a .onnx or .safetensors file name")
    return FORMATS[suffix]


def export_model(model: LoadedModel, out: str | Path, *, holdout: Holdout | None = None,
                 bake_preprocessing: bool = False, atol: float = 1e-3, min_agreement: float = 0.999,
                 slim: bool = False, opset: int = 18, input_size: int | None = None,
                 device: str | torch.device | None = None, batch_size: int = 256, seed: int = 0) -> dict:
    """Export ``model`` to ``out`` (format by suffix), verified; returns the artifact dict for the report."""
    fmt = export_format(out)
    if fmt == "safetensors":
        if slim or bake_preprocessing:
            raise UsageError("--slim and --bake-preprocessing apply to ONNX exports only",
                             hint="a slim model no longer matches its registry architecture, so safetensors "
                                  "could not be reloaded by name; export .onnx")
        from .safetensors import export_safetensors_verified

        return export_safetensors_verified(model, out, holdout=holdout, atol=atol, min_agreement=min_agreement,
                                           input_size=input_size, batch_size=batch_size, seed=seed)
    from .onnx import export_onnx

    if slim:
        from .slim import export_slim_onnx

        return export_slim_onnx(model, out, holdout=holdout, bake_preprocessing=bake_preprocessing, atol=atol,
                                min_agreement=min_agreement, opset=opset, input_size=input_size, device=device,
                                batch_size=batch_size, seed=seed)
    return export_onnx(model, out, holdout=holdout, bake_preprocessing=bake_preprocessing, atol=atol,
                       min_agreement=min_agreement, opset=opset, input_size=input_size, device=device,
                       batch_size=batch_size, seed=seed)
