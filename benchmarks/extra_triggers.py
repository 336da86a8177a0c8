"""Benchmark-only attacks, registered as bdsan triggers so that the zoo can train with them (not in the suite).

``blend_image``: BackdoorBench's "blended" attack blends a fixed natural picture (Hello Kitty) into the image at 0.2.
We cannot ship that picture, so the key is a test image of *another* dataset of ``../shared/data`` — a CIFAR-10 photo
for GTSRB models, a traffic sign for CIFAR-10 models: ``blend_image:source=cifar10,index=7``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bdsan.detectors.triggers import register_trigger
from bdsan.errors import UsageError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@functools.lru_cache(maxsize=8)
def key_image(source: str, index: int) -> torch.Tensor:
    """Test image ``index`` of ``DATA/<source>.npz`` as a 3 × H × W float tensor in [0, 1]."""
    path = DATA / f"{source}.npz"
    if not path.is_file():
        raise UsageError(f"blend_image: no dataset {path}")
    with np.load(path) as data:
        image = data["x_test"][int(index)]
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


@register_trigger("blend_image", "Blend a fixed natural image (another dataset's test image) at alpha 0.2 "
                  "(BackdoorBench 'blended'; benchmarks only)")
def blend_image(x: torch.Tensor, alpha: float = 0.2, source: str = "cifar10", index: int = 0) -> torch.Tensor:
    key = key_image(str(source), int(index)).to(x.device, x.dtype)
    if key.shape[-2:] != x.shape[-2:]:
        key = F.interpolate(key[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
    return torch.lerp(x, key[: x.shape[-3]].expand_as(x), alpha)
