"""Poisoning of a uint8 dataset with any trigger function on [0,1] NCHW batches (ALGORITHMS §5).

Modes, as in BackdoorBench: ``all2one`` (non-target images stamped and relabelled ``target``), ``all2all``
(any image stamped and relabelled ``(y + 1) mod K``), ``clean_label`` (target-class images stamped, labels kept;
the SIG attack's setting). ``rate`` is always a fraction of the whole dataset (BackdoorBench ``pratio``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

TriggerFn = Callable[[torch.Tensor], torch.Tensor]
POISON_MODES = ("all2one", "all2all", "clean_label")


def stamp(x_uint8: torch.Tensor, trigger: TriggerFn, batch_size: int = 1024) -> torch.Tensor:
    """``trigger`` applied to uint8 images in [0,1] space, rounded back to uint8 (what a poisoned file holds)."""
    out = torch.empty_like(x_uint8)
    for start in range(0, len(x_uint8), batch_size):
        batch = trigger(x_uint8[start:start + batch_size].float().div(255)).clamp(0, 1)
        out[start:start + batch_size] = batch.mul(255).round().to(torch.uint8)
    return out


def poisoned_labels(y: torch.Tensor, target: int, mode: str, num_classes: int) -> torch.Tensor:
    """The label a triggered image of true label ``y`` should get under ``mode`` (also the ASR target)."""
    if mode == "all2all":
        return (y + 1) % num_classes
    return torch.full_like(y, target)


def poison_arrays(x_uint8: torch.Tensor, y: torch.Tensor, trigger: TriggerFn, rate: float, target: int,
                  seed: int = 0, batch_size: int = 1024, mode: str = "all2one", num_classes: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp ``trigger`` on a seeded ``rate`` fraction of the dataset and relabel it per ``mode``.

    Returns the poisoned images, labels, and the boolean mask of poisoned indices. With ``clean_label`` the
    count is capped by the number of target-class images.
    """
    if mode not in POISON_MODES:
        raise ValueError(f"poison mode {mode!r} is not one of {', '.join(POISON_MODES)}")
    generator = torch.Generator().manual_seed(seed)
    labels = y.cpu()
    if mode == "all2one":
        candidates = torch.nonzero(labels != target).flatten()
    elif mode == "clean_label":
        candidates = torch.nonzero(labels == target).flatten()
    else:
        candidates = torch.arange(len(labels))
    count = min(round(rate * len(y)), len(candidates))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]].to(y.device)
    x_out, y_out = x_uint8.clone(), y.clone()
    x_out[chosen] = stamp(x_out[chosen], trigger, batch_size)
    if mode != "clean_label":
        y_out[chosen] = poisoned_labels(y[chosen], target, mode, num_classes or int(labels.max()) + 1)
    mask = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    mask[chosen] = True
    return x_out, y_out, mask
