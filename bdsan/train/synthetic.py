"""A generated image-classification task that a tiny CNN learns in seconds (tests and the demo)."""
from __future__ import annotations

import math

import torch


def make_synthetic(n: int, num_classes: int = 5, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour gratings: class k sets the hue of the light stripes (k/K around the colour wheel);
    orientation, frequency, phase, brightness and pixel noise are random, so crops and flips keep labels.

    Returns uint8 N×3×H×W images and int64 labels, balanced across classes.
    """
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=generator)]
    angle = math.pi * torch.rand(n, generator=generator)
    frequency = 2 * math.pi * (1.5 + 2.5 * torch.rand(n, generator=generator)) / size
    phase = 2 * math.pi * torch.rand(n, generator=generator)
    coords = torch.arange(size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    projection = torch.cos(angle).view(n, 1, 1) * cols + torch.sin(angle).view(n, 1, 1) * rows
    wave = 0.5 + 0.5 * torch.sin(projection * frequency.view(n, 1, 1) + phase.view(n, 1, 1))  # n×H×W
    hue = y.float() / num_classes + 0.7 / num_classes * (torch.rand(n, generator=generator) - 0.5)
    offsets = torch.tensor([0.0, 1 / 3, 2 / 3]).view(1, 3)
    light = 0.35 + 0.25 * torch.cos(2 * math.pi * (hue.view(n, 1) - offsets))  # n×3 in [0.1, 0.8]
    light = (light + 0.1 * torch.rand(n, 1, generator=generator)).view(n, 3, 1, 1)
    dark = 0.1 + 0.2 * torch.rand(n, 1, 1, 1, generator=generator)
    images = dark + (light - dark) * wave.unsqueeze(1)
    images = images + 0.08 * torch.randn(n, 3, size, size, generator=generator)
    return images.clamp(0, 0.8).mul(255).round().to(torch.uint8), y
