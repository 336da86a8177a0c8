"""All-to-one poisoning of a uint8 dataset with any trigger function on [0,1] NCHW batches."""
from __future__ import annotations

from collections.abc import Callable

import torch

TriggerFn = Callable[[torch.Tensor], torch.Tensor]


def poison_arrays(x_uint8: torch.Tensor, y: torch.Tensor, trigger: TriggerFn, rate: float, target: int,
                  seed: int = 0, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp ``trigger`` on a seeded ``rate`` fraction of non-target images and relabel them ``target``.

    Returns the poisoned images, labels, and the boolean mask of poisoned indices.
    """
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.nonzero(y.cpu() != target).flatten()
    count = int(round(rate * len(y)))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]].to(y.device)
    x_out, y_out = x_uint8.clone(), y.clone()
    for start in range(0, len(chosen), batch_size):
        index = chosen[start:start + batch_size]
        stamped = trigger(x_out[index].float().div(255)).clamp(0, 1)
        x_out[index] = stamped.mul(255).round().to(torch.uint8)
    y_out[chosen] = target
    mask = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    mask[chosen] = True
    return x_out, y_out, mask
