"""safetensors export with ``__metadata__`` so bdsan reloads the file with no extra flags."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from ..io.metadata import build_metadata
from ..io.models import LoadedModel
from ..atomic import atomic_path


def export_safetensors(model: LoadedModel, out: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights and metadata atomically; returns the path."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
    metadata = build_metadata(model.arch, model.num_classes, model.preprocessing, model.classes,
                              model.sha256, extra_metadata)
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return out
