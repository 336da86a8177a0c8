"""The trap stage of Trap and Replace (ALGORITHMS §2b): train from scratch on possibly poisoned data with a
reconstruction decoder reading the stem's output.

Loss = CE(logits, y) + ``recon_weight``·MSE(decoder(stem(x)), x) + ``tv_weight``·TV(decoder(stem(x))), the paper's
10 and 1: the stem must keep enough of every image to redraw it, which leaves the backdoor's shortcut to the light
head (the bait), and the replace stage then throws that head away. ``x`` is the augmented [0,1] image the network
sees. The decoder reads the input of the first leaf module that runs in the head (the stem's output) through a
forward pre-hook, so any architecture whose head ``head_split`` finds works without changes to its code.

Checkpoint: after every epoch the network, decoder, optimiser, scheduler, generator state and log go to one file,
written atomically and read back with ``weights_only=True``; ``resume`` continues from it when the settings, the
architecture's shapes and the data fingerprint match, so an interrupted run ends with the weights an uninterrupted
one would have had.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path
from ..device import channels_last, check_precision, precision_autocast, training_bf16
from ..errors import OutputError, UsageError
from ..io.data import to_float
from ..sanitize.trap_replace import HeadSplit, head_split
from .augment import augment_images
from .loop import make_optimizer

OPTIMIZERS = ("adam", "sgd")
TrapProgress = Callable[[int, int, dict], None]  # (step, total, {"epoch", "loss" and "recon_mse" as 0-dim tensors})


@dataclass
class TrapSettings:
    """Stage-1 hyper-parameters. ``adam`` with cosine annealing is the paper's CIFAR/GTSRB recipe (lr 1e-3, 200
    epochs, batch 256); ``sgd`` is the benchmark zoo's one-cycle SGD (nesterov, momentum 0.9), for comparing with a
    model trained normally on the same recipe. ``stem_ce_scale`` [ours, not the paper]: the factor on the
    classification loss's gradient into the stem (1: the paper; 0: the stem learns from the reconstruction alone,
    so only the head can learn a trigger→target shortcut)."""

    epochs: int = 200
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 256
    label_smoothing: float = 0.0
    recon_weight: float = 10.0
    tv_weight: float = 1.0
    stem_ce_scale: float = 1.0
    augment: bool | str = True
    stem_end: str = "auto"
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self):
        check_precision(self.precision)
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 2 or self.weight_decay < 0:
            raise UsageError("trap-train needs epochs ≥ 1, lr > 0, batch size ≥ 2 and weight decay ≥ 0")
        if self.recon_weight < 0 or self.tv_weight < 0 or not 0 <= self.label_smoothing < 1 or not \
                0 <= self.stem_ce_scale <= 1:
            raise UsageError("the reconstruction and TV weights must be ≥ 0, label smoothing in [0, 1), "
                             "stem_ce_scale in [0, 1]")


@dataclass
class TrapResult:
    """The trained network (in place), its decoder, the split it was trained for and the per-epoch log."""

    decoder: nn.Module
    split: HeadSplit
    log: list[dict]
    resumed_from: int
    seconds: float

    def details(self) -> dict:
        return {"stem_end": self.split.stem_end, "decoder_reads": self.split.entry,
                "decoder": [type(m).__name__ for m in self.decoder],
                "decoder_parameters": sum(p.numel() for p in self.decoder.parameters()),
                "resumed_from_epoch": self.resumed_from, "seconds": round(self.seconds, 3), "epochs": self.log}


def build_decoder(channels: int, feature_hw: tuple[int, int], image_hw: tuple[int, int],
                  out_channels: int = 3) -> nn.Sequential:
    """ConvTranspose(k4, s2, p1) stages, each doubling the resolution and quartering the channels (at least 16),
    InstanceNorm + ReLU between them, Sigmoid at the end (§2b's ResNet-18 decoder: 512→128→32→3); a stem that
    keeps the input resolution gets one 3×3 convolution."""
    ratios = {image / feature for image, feature in zip(image_hw, feature_hw)}
    stages = round(math.log2(next(iter(ratios)))) if len(ratios) == 1 and min(ratios) >= 1 else -1
    if stages < 0 or any(f * 2 ** stages != i for f, i in zip(feature_hw, image_hw)):
        raise UsageError(f"cannot decode a {feature_hw[0]}×{feature_hw[1]} stem output back to "
                         f"{image_hw[0]}×{image_hw[1]} images (the sizes must differ by a power of two)",
                         hint="choose another --stem-end")
    if stages == 0:
        return nn.Sequential(nn.Conv2d(channels, out_channels, 3, 1, 1), nn.Sigmoid())
    layers: list[nn.Module] = []
    width = channels
    for stage in range(stages):
        last = stage == stages - 1
        following = out_channels if last else max(16, width // 4)
        layers.append(nn.ConvTranspose2d(width, following, 4, 2, 1))
        if not last:
            layers += [nn.InstanceNorm2d(following), nn.ReLU(inplace=True)]
        width = following
    return nn.Sequential(*layers, nn.Sigmoid())


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """(Σ squared vertical + Σ squared horizontal neighbour differences) / (B·C·H·W), as in §2b."""
    vertical = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).sum()
    horizontal = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).sum()
    return (vertical + horizontal) / x.numel()


class StemTap:
    """While active, keeps the input of the head's entry module from each forward pass (the stem's output); with
    ``ce_scale`` < 1 the head receives it with that factor on its gradient (the decoder's copy keeps it whole)."""

    def __init__(self, split: HeadSplit, ce_scale: float = 1.0):
        self.module = split.modules[split.entry]
        self.ce_scale = ce_scale
        self.features: torch.Tensor | None = None

    def __enter__(self) -> Self:
        self.handle = self.module.register_forward_pre_hook(self._keep)
        return self

    def __exit__(self, *exc) -> bool:
        self.handle.remove()
        return False

    def _keep(self, module: nn.Module, inputs: tuple) -> tuple | None:
        if self.features is not None:  # a module called twice in one pass: the first call is the stem's output
            return None
        self.features = features = inputs[0]
        if self.ce_scale == 1:
            return None
        scaled = features * self.ce_scale + features.detach() * (1 - self.ce_scale)  # same values
        return (scaled, *inputs[1:])

    def take(self) -> torch.Tensor:
        features, self.features = self.features, None
        if features is None:
            raise UsageError("the head's first module did not run: choose another --stem-end")
        return features


def train_trap(network: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, settings: TrapSettings, *,
               checkpoint: Path | None = None, resume: bool = False,
               progress: TrapProgress | None = None) -> TrapResult:
    """Train ``network`` (a [0,1]-input model, changed in place) with the trap loss on uint8 images already on its
    device. ``checkpoint``: the file written after every epoch; an existing one is continued with ``resume`` and
    refused without it."""
    started = time.perf_counter()
    device = next(network.parameters()).device
    bf16 = training_bf16(device, settings.precision)
    split = head_split(network, to_float(x_uint8[:2]), settings.stem_end)
    decoder = _decoder_for(network, split, to_float(x_uint8[:2]), settings.seed).to(device)
    batch = min(settings.batch_size, len(y))
    steps_per_epoch = math.ceil(len(y) / batch)
    total = settings.epochs * steps_per_epoch
    optimizer, scheduler = make_optimizer([*network.parameters(), *decoder.parameters()], settings.optimizer,
                                          settings.lr, settings.weight_decay, total)
    generator = torch.Generator().manual_seed(settings.seed)
    fingerprint = _fingerprint(settings, network, x_uint8, y)
    done, log = 0, []
    if checkpoint is not None and checkpoint.exists():
        if not resume:
            raise OutputError(f"an earlier trap-train checkpoint exists: {checkpoint}",
                              hint="--resume continues it; --force starts over")
        done, log = _load_checkpoint(checkpoint, fingerprint, network, decoder, optimizer, scheduler, generator,
                                     device)
    resumed_from = done
    with StemTap(split, settings.stem_ce_scale) as tap, channels_last(network):
        for epoch in range(done + 1, settings.epochs + 1):
            network.train()
            decoder.train()
            sums = torch.zeros(5, device=device)  # loss, ce, mse, tv, correct
            order = torch.randperm(len(y), generator=generator).to(device)
            for step, index in enumerate(order.split(batch), start=1):
                x, target = to_float(x_uint8[index]), y[index]
                x = augment_images(x, generator, settings.augment)
                with precision_autocast(device, bf16):
                    logits = network(x).float()
                    recon = decoder(tap.take()).float()
                ce = F.cross_entropy(logits, target, label_smoothing=settings.label_smoothing)
                mse = F.mse_loss(recon, x)
                tv = total_variation(recon)
                loss = ce + settings.recon_weight * mse + settings.tv_weight * tv
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():  # device-side sums: no synchronisation per step
                    sums[:4] += torch.stack([loss, ce, mse, tv]) * len(index)
                    sums[4] += (logits.argmax(1) == target).sum()
                if progress is not None:  # tensors: a progress bar reads them only when it redraws
                    progress((epoch - 1) * steps_per_epoch + step, total,
                             {"epoch": epoch, "loss": loss.detach(), "recon_mse": mse.detach()})
            mean = (sums / len(y)).tolist()
            log.append({"epoch": epoch, "loss": mean[0], "ce": mean[1], "recon_mse": mean[2], "tv": mean[3],
                        "train_accuracy": mean[4]})
            if checkpoint is not None:
                _save_checkpoint(checkpoint, fingerprint, epoch, log, network, decoder, optimizer, scheduler,
                                 generator)
    network.eval()
    decoder.eval()
    return TrapResult(decoder, split, log, resumed_from, time.perf_counter() - started)


@torch.no_grad()
def _decoder_for(network: nn.Module, split: HeadSplit, example: torch.Tensor, seed: int) -> nn.Sequential:
    was_training = network.training
    with StemTap(split) as tap:
        network.eval()(example)
        features = tap.take()
    network.train(was_training)
    if features.ndim != 4:
        raise UsageError(f"the stem's output has shape {tuple(features.shape)}, not a feature map: the decoder needs "
                         "one", hint="choose an earlier --stem-end")
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's global RNG untouched
        torch.manual_seed(seed)
        return build_decoder(features.shape[1], tuple(features.shape[2:]), tuple(example.shape[2:]),
                             example.shape[1])


def _fingerprint(settings: TrapSettings, network: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor) -> str:
    """What a checkpoint must match to be continued: the settings, the network's shapes, its buffers before
    training (the normalisation among them) and the data."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    digest.update(json.dumps({k: list(v.shape) for k, v in network.state_dict().items()}).encode())
    for name, buffer in network.named_buffers():
        digest.update(name.encode())
        digest.update(buffer.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(x_uint8.cpu().contiguous().numpy().tobytes())
    digest.update(y.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save_checkpoint(path: Path, fingerprint: str, epoch: int, log: list[dict], network: nn.Module,
                     decoder: nn.Module, optimizer, scheduler, generator: torch.Generator) -> None:
    state = {"fingerprint": fingerprint, "epoch": epoch, "log": log, "network": network.state_dict(),
             "decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "generator": generator.get_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, fingerprint: str, network: nn.Module, decoder: nn.Module, optimizer, scheduler,
                     generator: torch.Generator, device: torch.device) -> tuple[int, list[dict]]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        stored = state["fingerprint"]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:  # truncated, foreign
        raise OutputError(f"cannot read the trap-train checkpoint {path}: {exc}",
                          hint="--force starts over (the checkpoint is deleted)") from None
    if stored != fingerprint:
        raise UsageError(f"the checkpoint {path} was written for other data, architecture or stage-1 settings",
                         hint="give the same --data, --arch and training options, or --force to start over")
    network.load_state_dict(state["network"])
    decoder.load_state_dict(state["decoder"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"].cpu())
    return int(state["epoch"]), list(state["log"])
