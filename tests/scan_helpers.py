"""A tiny model backdoored with a trigger the suite does not know, shared by the scan and unlearn tests."""
from __future__ import annotations

import functools

import torch

from bdsan.detectors.triggers import sig
from bdsan.train.fixtures import top_left_patch, train_toy_model

UNKNOWN_TARGET = 2


@functools.lru_cache(maxsize=1)
def unknown_patch_toy():
    """ToyModel (tiny_cnn, 5 classes) backdoored with ``top_left_patch`` → class 2; trained once per session."""
    return train_toy_model(trigger=top_left_patch, target=UNKNOWN_TARGET, seed=1)


def blended_picture(x: torch.Tensor) -> torch.Tensor:
    """An image-blend trigger: a fixed smooth colour picture (seeded 4×4 colours, upsampled) blended at 0.2."""
    low = torch.rand((1, 3, 4, 4), generator=torch.Generator().manual_seed(5))
    picture = torch.nn.functional.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
    return torch.lerp(x, picture.to(x.device, x.dtype).expand_as(x), 0.2)


@functools.lru_cache(maxsize=1)
def picture_blend_toy():
    """ToyModel backdoored with ``blended_picture`` → class 2; trained once per session."""
    return train_toy_model(trigger=blended_picture, target=UNKNOWN_TARGET, seed=1)


@functools.lru_cache(maxsize=1)
def sig_toy():
    """ToyModel backdoored with SIG's sine (``sig``, across the columns) → class 2; trained once per session."""
    return train_toy_model(trigger=sig, target=UNKNOWN_TARGET, seed=1)


def trigger_asr(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, target: int = UNKNOWN_TARGET,
                trigger=top_left_patch) -> float:
    """Real ASR of ``trigger`` (default ``top_left_patch``) on images whose label is not ``target``."""
    x = x_uint8[y != target].float().div(255)
    with torch.no_grad():
        return float((model.eval()(trigger(x)).argmax(1) == target).float().mean())


class ColourSink(torch.nn.Module):
    """Class 0 when a pixel's channels differ (colour noise; grey noise leaves them equal), class 1 otherwise."""

    def forward(self, x):
        spread = x.std(1).mean((1, 2))
        return torch.stack([100 * (spread - 0.02), torch.zeros_like(spread)], 1)


def grey_class1_holdout(count: int):
    """``count`` flat grey 16×16 images from 0.3 to 0.7 brightness, all of class 1 (``ColourSink``'s default)."""
    from bdsan.io.data import Holdout

    brightness = torch.linspace(0.3, 0.7, count)
    x = (brightness.view(-1, 1, 1, 1) * 255).round().to(torch.uint8).expand(-1, 3, 16, 16).contiguous()
    return Holdout(x, torch.ones(count, dtype=torch.long), ["a", "b"])
