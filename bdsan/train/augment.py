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


def augment_images(x: torch.Tensor, generator: torch.Generator, mode: bool | str) -> torch.Tensor:
    """``mode``: ``True`` crop + flip, ``"crop"`` the crop alone (mirror-image classes), ``False`` ``x`` unchanged."""
    return augment_batch(x, generator, flip=mode != "crop") if mode else x


def cutmix(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix for one batch (ALGORITHMS §2a.4, β = 1): (mixed images, partner permutation, λ).

    λ ~ Beta(1, 1) = U(0, 1); a box of side W·√(1−λ) × H·√(1−λ) centred uniformly, clipped to the image, is pasted from a
    shuffled copy of the batch; λ is recomputed as 1 − box area / image area. Loss: λ·L(y) + (1−λ)·L(y[perm]).
    """
    n, _, h, w = x.shape
    lam = float(torch.rand((), generator=generator))
    cut = (1.0 - lam) ** 0.5
    cy, cx = (int(v) for v in (torch.rand(2, generator=generator) * torch.tensor([h, w])))
    half_h, half_w = int(h * cut) // 2, int(w * cut) // 2
    top, bottom = max(cy - half_h, 0), min(cy + half_h, h)
    left, right = max(cx - half_w, 0), min(cx + half_w, w)
    perm = torch.randperm(n, generator=generator).to(x.device)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    return mixed, perm, lam


def mixup_pairs(x: torch.Tensor, count: int, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``count`` convex mixes λ·x[i] + (1−λ)·x[j] of random pairs i ≠ j of ``x``, i, j), λ ~ U(0, 1) per mix.

    Images between the ones a small set has, for a teacher to label (unlearn's ``mix_distill``); ``x`` needs ≥ 2 rows.
    """
    first, second = _distinct_pairs(len(x), count, generator)
    lam = torch.rand(count, generator=generator).to(x.device, x.dtype).view(count, 1, 1, 1)
    first, second = first.to(x.device), second.to(x.device)
    return lam * x[first] + (1 - lam) * x[second], first, second


def boxmix_pairs(x: torch.Tensor, count: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``count`` images x[i] with a box of x[j] pasted in, i, j) for random pairs i ≠ j: CutMix boxes, one per
    image, of side √(1 − λ)·H × √(1 − λ)·W, λ ~ U(0, 1), centred uniformly and clipped. Unlike a convex mix, no
    pixel is a blend of two images; ``x`` needs ≥ 2 rows."""
    _, _, h, w = x.shape
    first, second = _distinct_pairs(len(x), count, generator)
    side = (1 - torch.rand(count, generator=generator)).sqrt()
    centre = torch.rand(count, 2, generator=generator) * torch.tensor([h, w])
    half = side.view(count, 1) * torch.tensor([h, w]) / 2
    low, high = (centre - half).to(x.device), (centre + half).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + 0.5
    cols = torch.arange(w, device=x.device).view(1, 1, w) + 0.5
    box = ((rows >= low[:, 0].view(-1, 1, 1)) & (rows < high[:, 0].view(-1, 1, 1)) &
           (cols >= low[:, 1].view(-1, 1, 1)) & (cols < high[:, 1].view(-1, 1, 1))).unsqueeze(1)
    first, second = first.to(x.device), second.to(x.device)
    return torch.where(box, x[second], x[first]), first, second


def _distinct_pairs(n: int, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random row pairs (i, j) of ``n`` rows with i ≠ j, on the CPU."""
    first = torch.randint(n, (count,), generator=generator)
    return first, (first + torch.randint(1, n, (count,), generator=generator)) % n
