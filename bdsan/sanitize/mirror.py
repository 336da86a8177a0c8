"""Do horizontal flips keep this model's labels? The defenses' augmentation asks the input model, on the fit images.

BackdoorBench trains CIFAR-10 with random crops and flips and GTSRB with crops alone: GTSRB's classes come in
mirror-image pairs (keep left / keep right, turn left / turn right ahead), so a flipped image is another class's
image. A defense that fine-tunes with flips on such a model teaches it that a flipped "keep right" is "keep right".
``flip=auto`` keeps the flips only when the input model is no less accurate on flipped fit images than on the
originals, beyond chance (McNemar on the paired answers, ``MIRROR_Z`` standard errors).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..io.data import Holdout
from ..train.loop import predict

FLIP_MODES = ("auto", "on", "off")
MIRROR_Z = 2.0


@torch.no_grad()
def mirror_check(model: nn.Module, fit: Holdout, batch_size: int = 256, z: float = MIRROR_Z) -> dict:
    """Accuracy on the fit images and on their mirror images; ``flip`` False when the mirror images lose more
    images than they win by more than ``z`` standard errors of the paired difference."""
    right = predict(model, fit.x, batch_size) == fit.y
    right_flipped = predict(model, fit.x, batch_size, transform=lambda batch: batch.flip(3)) == fit.y
    lost = int((right & ~right_flipped).sum())
    gained = int((~right & right_flipped).sum())
    return {"flip": lost - gained <= z * math.sqrt(lost + gained), "n": len(fit.y),
            "accuracy": float(right.float().mean()) if len(right) else None,
            "accuracy_flipped": float(right_flipped.float().mean()) if len(right) else None,
            "lost": lost, "gained": gained, "z": z}


def resolve_flip(mode: str, model: nn.Module, fit: Holdout, batch_size: int = 256) -> dict:
    """``on``/``off`` as given; ``auto``: ``mirror_check``'s answer. Returns the check's summary with ``mode``."""
    if mode not in FLIP_MODES:
        raise ValueError(f"flip must be one of {', '.join(FLIP_MODES)}")
    if mode != "auto":
        return {"mode": mode, "flip": mode == "on"}
    return {"mode": mode} | mirror_check(model, fit, batch_size)
