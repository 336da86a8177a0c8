"""Batched on-device augmentation: random crop with padding and horizontal flip (ALGORITHMS §0.4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True,
                  pad_mode: str = "constant") -> torch.Tensor:
    """Random ``pad``-pixel crop and a random horizontal flip per sample, in one gather.

    ``generator`` must live on ``x.device``'s type (CPU generators are fine for CPU tensors; the
    offsets are drawn on the CPU and moved, so any generator works).
    """
    n, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode=pad_mode)
        offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
        rows = (offsets[0].view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # n×h
        cols = (offsets[1].view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # n×w
        x = padded[torch.arange(n, device=x.device).view(n, 1, 1, 1),
                   torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1),
                   rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    if flip:
        flip_mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip_mask.view(n, 1, 1, 1), x.flip(3), x)
    return x
