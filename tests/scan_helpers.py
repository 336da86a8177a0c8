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
