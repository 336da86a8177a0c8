"""safetensors export with ``__metadata__`` so bdsan reloads the file with no extra flags.

The metadata (``bdsan.io.metadata``) carries the architecture, class count and names, preprocessing (mean, std,
input size), the source file's sha256 and the bdsan version. ``verify=True`` reloads the written file through
``load_model`` with no flags and compares its logits with the in-memory model before the file is renamed into
place, so a file that would not reload as the same model is never left behind.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..errors import GateFailed, ModelRefused, OutputError
from ..io.data import Holdout
from ..io.metadata import build_metadata
from ..io.models import LoadedModel, sha256_file


def _state_for_file(model: LoadedModel) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage (safetensors refuses aliased tensors, e.g. tied weights)."""
    if model.module is None:
        raise ModelRefused(f"{model.path}: an ONNX model has no PyTorch weights to write as safetensors")
    state, seen = {}, set()
    for key, value in model.module.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        state[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return state


def export_safetensors(model: LoadedModel, out: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights and metadata atomically; returns the path."""
    out = Path(out)
    metadata = build_metadata(model.arch, model.num_classes, model.preprocessing, model.classes,
                              model.sha256, extra_metadata)
    with atomic_path(out) as tmp:
        save_file(_state_for_file(model), str(tmp), metadata=metadata)
    return out


def export_safetensors_verified(model: LoadedModel, out: str | Path, *, holdout: Holdout | None = None,
                                atol: float = 1e-3, min_agreement: float = 0.999, input_size: int | None = None,
                                batch_size: int = 256, seed: int = 0,
                                extra_metadata: dict[str, str] | None = None) -> dict:
    """Write, reload with ``load_model(path)`` (no flags), check metadata and logits, then rename into place.

    Returns the artifact dict (path, sha256, bytes, parity). A mismatch raises GateFailed and leaves no file.
    """
    from ..io.models import load_model
    from .onnx import compare_logits, export_input_size, parity_inputs, torch_logits

    out = Path(out)
    if model.path and out.exists() and out.resolve() == Path(model.path).resolve():
        raise OutputError(f"refusing to overwrite the input model {out}")
    metadata = build_metadata(model.arch, model.num_classes, model.preprocessing, model.classes,
                              model.sha256, extra_metadata)
    with atomic_path(out) as tmp:
        save_file(_state_for_file(model), str(tmp), metadata=metadata)
        reloaded = load_model(tmp)
        mismatches = [f"{name}: {got!r} != {want!r}" for name, got, want in [
            ("arch", reloaded.arch, model.arch), ("num_classes", reloaded.num_classes, model.num_classes),
            ("preprocessing", reloaded.preprocessing, model.preprocessing), ("classes", reloaded.classes, model.classes)]
            if got != want]
        input_hw = export_input_size(model, holdout, input_size)
        pixels = parity_inputs(holdout, len(model.preprocessing.mean), input_hw, seed)
        parity = compare_logits(torch_logits(model.normalized(), pixels, batch_size),
                                torch_logits(reloaded.normalized(), pixels, batch_size), atol, min_agreement)
        parity["inputs"] = "holdout" if holdout is not None else f"{len(pixels)} random images (seed {seed})"
        if mismatches or not parity["passed"]:
            error = GateFailed(f"the written safetensors file does not reload as the same model "
                             f"({'; '.join(mismatches) or 'logits differ'}; max |Δlogit| {parity['max_abs_diff']:.3g}); "
                             "no file written")
            error.details = {"parity": parity, "mismatches": mismatches}
            raise error
    return {"path": str(out), "format": "safetensors", "sha256": sha256_file(out), "bytes": out.stat().st_size,
            "parity": parity, "metadata": metadata}
