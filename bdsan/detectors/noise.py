"""The scan's ``noise`` kind: the share of held-out images that fresh noise sends to each class.

A noise-blend backdoor answers any grey noise blended at the family's weight with its target (the 23 development
noise-blend targets took 0.98–1.00 of held-out images at weight 0.2), where a clean model's noise sink grows slowly
with the noise (CIFAR-10's frog 0.32–0.46, crop-trained GTSRB classes ≤ 0.28): BENCHMARKS.md, "Noise by dose".
Searched, not optimised: ``noise_draws`` seeded draws of uniform noise of each form in ``noise_channels`` (grey: one
value per pixel; colour: one per pixel and channel — a backdoor planted with one form ignores the other:
BENCHMARKS.md, "Colour noise"), each blended into every held-out image at ``noise_weight`` in one batched pass, per
class the mean share of images of other classes predicted as it, and the larger of the forms. The trigger it
reconstructs is that form's first draw at that weight, a patch-form trigger with a constant mask.
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


FORM_NAMES = {1: "grey", 3: "colour"}  # noise drawn once per pixel, or per pixel and channel


def noise_draws(draws: int, shape: tuple[int, int], seed: int, channels: int = 1) -> torch.Tensor:
    """``draws`` × ``channels`` × H × W uniform noise in [0, 1], seeded (1 channel: grey; 3: colour, other draws)."""
    generator = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET + channels - 1)
    return torch.rand((draws, channels, *shape), generator=generator)


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


def noise_forms(net, held: Holdout, num_classes: int, cfg: ScanSettings, seed: int, batch_size: int,
                device: torch.device, bf16: bool = False) -> tuple[list[float], dict, dict[str, torch.Tensor]]:
    """Every noise form of ``cfg.noise_channels`` (grey, colour) up to the images' channels: per class the larger
    form's take, the section's per-form details (``by_form`` takes, ``form`` of each class's take) and the parts."""
    image_channels = held.x.shape[1]
    channels = sorted({min(c, image_channels) for c in cfg.noise_channels})
    by_form, firsts = {}, {}
    for c in channels:
        name = FORM_NAMES.get(c, f"{c}-channel")
        noise = noise_draws(cfg.noise_draws, held.image_size, seed, c).to(device)
        by_form[name] = noise_takes(net, held, num_classes, noise, cfg.noise_weight, batch_size, device, bf16)
        firsts[name] = noise[0].expand(image_channels, -1, -1)
    names = list(by_form)
    table = torch.tensor([by_form[name] for name in names], dtype=torch.float64)
    best = table.argmax(0)
    form = [names[int(i)] for i in best]
    pattern = torch.stack([firsts[name] for name in form])
    parts = {"mask": torch.full((num_classes, 1, *held.image_size), cfg.noise_weight, device=pattern.device),
             "pattern": pattern.contiguous()}
    return table.max(0).values.tolist(), {"by_form": by_form, "form": form}, parts


def noise_verdict(takes, cfg: ScanSettings) -> np.ndarray:
    """Per class, anomalous by the noise kind: fresh noise sends ≥ ``noise_threshold`` of held-out images to it."""
    return np.asarray(takes, dtype=float) >= cfg.noise_threshold
