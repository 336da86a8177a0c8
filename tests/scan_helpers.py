"""A tiny model backdoored with a trigger the suite does not know, shared by the scan and unlearn tests."""
from __future__ import annotations

import functools

import torch

from bdsan.train.fixtures import train_toy_model

UNKNOWN_TARGET = 2


def top_left_patch(x: torch.Tensor) -> torch.Tensor:
    """4×4 random saturated colours in the top-left corner: not in the suite (ALGORITHMS §5), far from its patches."""
    colours = (torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(5)) > 0.5).float().to(x)
    x = x.clone()
    x[:, :, :4, :4] = colours
    return x


@functools.lru_cache(maxsize=1)
def unknown_patch_toy():
    """ToyModel (tiny_cnn, 5 classes) backdoored with ``top_left_patch`` → class 2; trained once per session."""
    return train_toy_model(trigger=top_left_patch, target=UNKNOWN_TARGET, seed=1)


def trigger_asr(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, target: int = UNKNOWN_TARGET) -> float:
    """Real ASR of ``top_left_patch`` on images whose label is not ``target``."""
    x = x_uint8[y != target].float().div(255)
    with torch.no_grad():
        return float((model.eval()(top_left_patch(x)).argmax(1) == target).float().mean())
