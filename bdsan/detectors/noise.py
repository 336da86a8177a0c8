"""The scan's ``noise`` kind: the share of held-out images that fresh grey noise sends to each class.

A noise-blend backdoor answers any grey noise blended at the family's weight with its target (the 23 development
noise-blend targets took 0.98–1.00 of held-out images at weight 0.2), where a clean model's noise sink grows slowly
with the noise (CIFAR-10's frog 0.32–0.46, crop-trained GTSRB classes ≤ 0.28): BENCHMARKS.md, "Noise by dose".
Searched, not optimised: ``noise_draws`` seeded draws of uniform grey noise, each blended into every held-out image
at ``noise_weight`` in one batched pass, per class the mean share of images of other classes predicted as it. The
trigger it reconstructs is the first draw at that weight, a patch-form trigger with a constant mask.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..device import precision_autocast
from ..io.data import Holdout, to_float

if TYPE_CHECKING:
    from .scan import ScanSettings

NOISE_SEED_OFFSET = 7717  # the draws never repeat the suite's noise (seed 20240601) for a small scan seed


def noise_draws(draws: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """``draws`` × 1 × H × W uniform grey noise in [0, 1], seeded."""
    generator = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET)
    return torch.rand((draws, 1, *shape), generator=generator)


@torch.no_grad()
def class_takes(net, held: Holdout, num_classes: int, perturb: Callable[[torch.Tensor], torch.Tensor],
                batch_size: int, device: torch.device, bf16: bool = False) -> torch.Tensor:
    """Per class c: the share of held-out images with label ≠ c predicted c once ``perturb`` (of [0, 1] images)
    is applied to every image."""
    others = (len(held) - torch.bincount(held.y, minlength=num_classes)).double().clamp_min(1)
    hits = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for start in range(0, len(held), batch_size):
        x, y = to_float(held.x[start:start + batch_size]), held.y[start:start + batch_size]
        with precision_autocast(device, bf16):
            predicted = net(perturb(x)).argmax(1)
        hits += torch.bincount(predicted[predicted != y], minlength=num_classes).double()
    return hits / others


def noise_takes(net, held: Holdout, num_classes: int, noise: torch.Tensor, weight: float, batch_size: int,
                device: torch.device, bf16: bool = False) -> list[float]:
    """Per class c: the share of held-out images with label ≠ c predicted c once blended toward each noise draw at
    ``weight``, the mean over draws."""
    takes = [class_takes(net, held, num_classes, lambda x, u=draw: torch.lerp(x, u.expand_as(x), weight),
                         batch_size, device, bf16) for draw in noise.to(device)]
    return torch.stack(takes).mean(0).tolist()


def noise_parts(noise: torch.Tensor, weight: float, num_classes: int, channels: int) -> dict[str, torch.Tensor]:
    """The first draw at ``weight`` as patch-form parts for every class: mask ``weight`` everywhere, the noise as the
    pattern (x' = (1 − w)·x + w·u, the noise blend)."""
    first = noise[:1]
    return {"mask": torch.full((num_classes, 1, *first.shape[-2:]), weight, device=first.device),
            "pattern": first.expand(num_classes, channels, -1, -1).contiguous()}


def noise_verdict(takes, cfg: ScanSettings) -> np.ndarray:
    """Per class, anomalous by the noise kind: fresh noise sends ≥ ``noise_threshold`` of held-out images to it."""
    return np.asarray(takes, dtype=float) >= cfg.noise_threshold
