"""BatchNorm during fine-tuning on a few hundred images (ALGORITHMS §0.5).

Measured on the CIFAR-10 CPU benchmark model (small_resnet, CA 74.7% on dev test images, 450 fit-train images):
re-estimating the running statistics on the unaugmented fit images alone costs 5.8 points, before any training;
from 4 passes of crop+flip copies — the distribution the network learnt to normalise — it costs 1.8. FMP (bdsan
recipe, badnets_grid) ended at −3.4 points with ``reestimate``, −2.2 with ``reestimate-augmented``, −14.7 when the
delivered statistics were kept under train-mode fine-tuning, and diverged (CA 14%) with BN frozen in eval mode at
lr 0.01. bdsan's recipes therefore use ``reestimate-augmented``; ``train`` (the papers' plain fine-tuning, and the
FT baseline's) and ``reestimate`` (ALGORITHMS §0.5's default) stay selectable.
"""
from __future__ import annotations

import torch
from torch import nn

from ..device import autocast
from ..io.data import Holdout
from ..train.augment import augment_batch
from ..train.loop import freeze_batchnorm

BN_MODES = ("reestimate-augmented", "reestimate", "reestimate-shift", "frozen", "train")
AUGMENTED_PASSES = 4


def check_bn_mode(bn: str, shift: bool = False, auto: bool = False) -> None:
    """Reject a ``bn`` parameter that is not one of ``BN_MODES`` (``reestimate-shift`` only where ``shift``;
    ``auto``, a method's own choice per model, only where ``auto``)."""
    modes = [m for m in BN_MODES if shift or m != "reestimate-shift"] + (["auto"] if auto else [])
    if bn not in modes:
        raise ValueError(f"bn must be one of {', '.join(modes)}, got {bn!r}")


def set_training(model: nn.Module, bn: str) -> None:
    """Training mode for a fine-tuning step. ``bn``:

    - ``frozen``: BatchNorm in eval mode throughout (running statistics used and left alone);
    - ``train``: plain training mode, running statistics drift to the fit images (the papers' fine-tuning);
    - ``reestimate``: ``train``, then running statistics recomputed on the unaugmented fit images at every
      checkpoint (ALGORITHMS §0.5's default);
    - ``reestimate-augmented``: the same from 4 passes of crop+flip copies when the method augments;
    - ``reestimate-shift``: ``train``, then at every checkpoint the delivered statistics moved by how much the
      fine-tuning changed the fit images' statistics (``ShiftedStatistics``; methods that support it).
    """
    model.train()
    if bn == "frozen":
        freeze_batchnorm(model)


def checkpoint_bn(model: nn.Module, bn: str, data: Holdout, batch_size: int, augment: bool | str = False,
                  generator: torch.Generator | None = None, transform=None) -> None:
    """What happens to BN running statistics before a checkpoint is judged (``reestimate`` modes only).
    ``augment``: the method's augmentation mode (``Context.augmentation``); ``transform`` (batch → batch) makes the
    re-estimation batches look like the training batches (e.g. stamped)."""
    if bn == "reestimate":
        reestimate_bn(model, data, batch_size, transform=transform)
    elif bn == "reestimate-augmented":
        reestimate_bn(model, data, batch_size, augment_passes=AUGMENTED_PASSES if augment else 0,
                      generator=generator, transform=transform, flip=augment != "crop")


@torch.no_grad()
def reestimate_bn(model: nn.Module, data: Holdout, batch_size: int, augment_passes: int = 0,
                  generator: torch.Generator | None = None, transform=None, flip: bool = True) -> None:
    """Recompute BN running statistics with no-grad passes over the data (ALGORITHMS §0.5): one unaugmented pass,
    or ``augment_passes`` passes of crop+flip copies (the distribution the network was trained to normalise; crops
    alone with ``flip=False``); ``transform`` is applied to each batch after augmentation."""
    bns = list(_batchnorms(model).values())
    if not bns or len(data) == 0:
        return
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the pass
    model.train()
    generator = generator or torch.Generator().manual_seed(0)
    for _ in range(max(1, augment_passes)):
        for x, _ in data.float_batches(batch_size):
            if augment_passes:
                x = augment_batch(x, generator, flip=flip)
            if transform is not None:
                x = transform(x)
            with autocast(x.device):
                model(x)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.train(was_training)


class ShiftedStatistics:
    """``bn=reestimate-shift``: BN running statistics = the delivered ones + the change the fine-tuning made to the
    fit images' statistics (mean: difference; variance: ratio), both measured by ``reestimate_bn`` on the same
    augmented (and stamped) batches from the same seed. A few hundred fit images estimate the statistics with an
    error of their own; that error is in both measurements and cancels, so a model whose weights did not change
    keeps its delivered statistics (to float rounding), while the change the weights make is still followed.

    ``transform_for(generator)`` builds the batch transform (e.g. stamping) from the measurement's generator."""

    def __init__(self, data: Holdout, batch_size: int, augment: bool | str, seed: int, transform_for=None):
        self.data, self.batch_size, self.augment, self.seed = data, batch_size, augment, seed
        self.transform_for = transform_for
        self.delivered: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def start(self, model: nn.Module) -> None:
        """Remember ``model``'s statistics and what the fit images give it, before fine-tuning."""
        self.delivered = _running_statistics(model)
        self.reference = self._measure(model)
        _set_running_statistics(model, self.delivered)

    def checkpoint(self, model: nn.Module) -> None:
        """Set the statistics of the fine-tuned ``model``: delivered + (now − reference) on the fit images."""
        now = self._measure(model)
        shifted = {}
        for name, (mean, var) in self.delivered.items():
            (ref_mean, ref_var), (now_mean, now_var) = self.reference[name], now[name]
            shifted[name] = (mean + now_mean - ref_mean, var * now_var / ref_var.clamp_min(1e-12))
        _set_running_statistics(model, shifted)

    def _measure(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        transform = self.transform_for(generator) if self.transform_for is not None else None
        reestimate_bn(model, self.data, self.batch_size, augment_passes=AUGMENTED_PASSES if self.augment else 0,
                      generator=generator, transform=transform, flip=self.augment != "crop")
        return _running_statistics(model)


def _batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def _running_statistics(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (bn.running_mean.detach().clone(), bn.running_var.detach().clone())
            for name, bn in _batchnorms(model).items()}


@torch.no_grad()
def _set_running_statistics(model: nn.Module, statistics: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for name, bn in _batchnorms(model).items():
        mean, var = statistics[name]
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
