"""Trigger previews (``bdsan triggers --preview DIR``): what each trigger does to sample images, as PNGs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..atomic import atomic_dir
from ..io.data import Holdout, to_float
from .triggers import DEFAULT_SUITE, Trigger, get_trigger

MIN_TILE = 96  # pixels: small images are enlarged (nearest) so single-pixel cells stay visible
LABEL_WIDTH = 130


def sample_images(holdout: Holdout | None, samples: int, seed: int) -> torch.Tensor:
    """[0,1] float samples: round-robin over the holdout's classes, or generated gratings when no holdout."""
    if holdout is None:
        from ..train.synthetic import make_synthetic

        x, _ = make_synthetic(samples, num_classes=min(samples, 5), size=32, seed=seed)
        return to_float(x)
    y = holdout.y.cpu()
    order = [torch.nonzero(y == c).flatten().tolist() for c in range(holdout.num_classes)]
    picked: list[int] = []
    depth = 0
    while len(picked) < min(samples, len(y)):
        for members in order:
            if depth < len(members) and len(picked) < samples:
                picked.append(members[depth])
        depth += 1
    return to_float(holdout.x[torch.tensor(picked, dtype=torch.long).to(holdout.device)].cpu())


def _tiles(x: torch.Tensor) -> Image.Image:
    """A row of images, enlarged by an integer factor, 2-px gaps."""
    n, channels, height, width = x.shape
    scale = max(1, math.ceil(MIN_TILE / max(height, width)))
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if channels == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
    gap = 2
    row = np.full((height * scale, n * (width * scale + gap) - gap, 3), 255, np.uint8)
    for i, tile in enumerate(pixels):
        row[:, i * (width * scale + gap):i * (width * scale + gap) + width * scale] = tile
    return Image.fromarray(row)


def _labelled(image: Image.Image, label: str) -> Image.Image:
    canvas = Image.new("RGB", (LABEL_WIDTH + image.width, image.height + 4), "white")
    canvas.paste(image, (LABEL_WIDTH, 2))
    ImageDraw.Draw(canvas).text((6, image.height // 2 - 6), label, fill="black")
    return canvas


def write_previews(out_dir: str | Path, holdout: Holdout | None = None, triggers: list[Trigger] | None = None,
                   samples: int = 8, seed: int = 0, force: bool = False) -> list[Path]:
    """One ``<trigger>.png`` per trigger (a row of stamped samples) and ``contact_sheet.png`` (clean row first,
    then one labelled row per trigger), written atomically into the new directory ``out_dir``."""
    triggers = triggers or [get_trigger(name) for name in DEFAULT_SUITE]
    x = sample_images(holdout, samples, seed)
    rows = [("clean", _tiles(x))] + [(t.name, _tiles(t.apply(x.clone()))) for t in triggers]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force=force) as tmp:
        for name, row in rows[1:]:
            row.save(tmp / f"{name}.png")
        labelled = [_labelled(row, name) for name, row in rows]
        sheet = Image.new("RGB", (max(r.width for r in labelled), sum(r.height for r in labelled)), "white")
        top = 0
        for row in labelled:
            sheet.paste(row, (0, top))
            top += row.height
        sheet.save(tmp / "contact_sheet.png")
    return [out_dir / f"{name}.png" for name, _ in rows[1:]] + [out_dir / "contact_sheet.png"]
