"""A fast training loop over device-resident uint8 data (bf16 autocast + channels_last on CUDA)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..device import autocast, channels_last, precision_autocast, training_bf16
from .augment import augment_images

Progress = Callable[[int, int], None]


@torch.no_grad()
def predict(model: nn.Module, x_uint8: torch.Tensor, batch_size: int = 512,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Arg-max predictions of a [0,1]-input model over uint8 images, optionally transformed first."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(x_uint8), batch_size):
        batch = x_uint8[start:start + batch_size].to(device).float().div_(255)
        if transform is not None:
            batch = transform(batch)
        with autocast(device):
            out.append(model(batch).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=device)


def evaluate_accuracy(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Clean accuracy of a [0,1]-input model."""
    if len(y) == 0:
        return float("nan")
    return (predict(model, x_uint8, batch_size) == y.to(x_uint8.device)).float().mean().item()


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: running statistics are used and no longer updated."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def make_optimizer(params, kind: str, lr: float, weight_decay: float, total_steps: int, momentum: float = 0.9,
                   schedule: str | None = None):
    """(optimizer, per-step scheduler): ``sgd`` (nesterov when momentum > 0) with a one-cycle schedule (25% warm-up)
    or ``schedule="cosine"``; ``adam`` with cosine annealing over ``total_steps``."""
    total_steps = max(1, total_steps)
    if kind == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        schedule = schedule or "cosine"
    else:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                    nesterov=momentum > 0)
        schedule = schedule or "onecycle"
    if schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                                        pct_start=0.25)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return optimizer, scheduler


def train_classifier(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, *, epochs: int = 10,
                     lr: float = 0.1, batch_size: int = 128, weight_decay: float = 5e-4,
                     momentum: float = 0.9, schedule: str = "onecycle", augment: bool | str = True, seed: int = 0,
                     label_smoothing: float = 0.0, progress: Progress | None = None,
                     precision: str = "auto", freeze_bn: bool = False) -> nn.Module:
    """Train a [0,1]-input model with SGD (nesterov) on uint8 images already on the model's device.

    ``schedule``: ``onecycle`` (fast from-scratch training) or ``cosine`` (fine-tuning).
    ``precision``: ``auto`` (bf16 autocast on CUDA, fp32 elsewhere), ``bf16`` (bf16 autocast on any device;
    about 4× faster on CPUs with AVX512-BF16/AMX, slower on others) or ``fp32``.
    ``freeze_bn``: BatchNorm layers stay in eval mode (running statistics used, not updated).
    ``augment``: random crop + horizontal flip (``True``), the crop only (``"crop"``) or neither (``False``).
    """
    device = next(model.parameters()).device
    bf16 = training_bf16(device, precision)  # auto: CUDA only (the harness asks for CPU bf16 itself)
    x_uint8, y = x_uint8.to(device), y.to(device)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, (len(y) + batch_size - 1) // batch_size)
    total = epochs * steps_per_epoch
    optimizer, scheduler = make_optimizer(model.parameters(), "sgd", lr, weight_decay, total, momentum=momentum,
                                          schedule=schedule)
    with channels_last(model):  # faster convolutions on CPU (oneDNN) and CUDA; layout restored after
        model.train()
        if freeze_bn:
            freeze_batchnorm(model)
        step = 0
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator).to(device)
            for start in range(0, len(y), batch_size):
                index = order[start:start + batch_size]
                batch = x_uint8[index].float().div_(255)
                batch = augment_images(batch, generator, augment)
                if device.type == "cuda":
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with precision_autocast(device, bf16):
                    loss = F.cross_entropy(model(batch), y[index], label_smoothing=label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                if progress:
                    progress(step, total)
    model.eval()
    return model
