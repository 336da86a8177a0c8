"""Trap and Replace, post-hoc replace only (ALGORITHMS §2a; the repo's ``--no_trap`` ablation).

Keep the stem, re-initialise the light head (seeded), freeze the stem in eval mode and train the new head on the fit
split: crop + flip, CutMix on every batch, label smoothing 0.1, dropout 0.5 inside every head residual block and on
the head's final feature map, Adam lr 0.03, weight decay 5e-4, cosine over 100 epochs, batch 64, drop_last.

The head is changed **in place** (same modules, new weights), so the network, its state-dict keys and its ONNX graph
stay those of the input architecture; the dropout lives in forward hooks that exist only while training.

Split (``stem_end``): ``auto`` = the head starts at the last block of the last ``layerN`` stage (ResNets:
layer4[-1] → pool → classifier) or, for other networks, at the last convolution; ``stem_end=MODULE`` = everything
executed after that module is the head. Selection: the fit-val guard keeps the accepted epoch with the highest fit-val
CA (ties: the latest) — never test accuracy, which is what the original repo selects on (§0.1).

``distill_weight`` > 0 (not in the paper; default 0) adds KD to the input model's outputs on the same clean images.
Measured (BENCHMARKS.md "D-BR and Trap and Replace next to unlearn and FMP"): on ``small_resnet`` the auto head is
75% of the parameters; re-trained from 1,130 fit images it cost the 86% noise-blend model 11.5 test-CA points
(ASR 0.1%) and was rolled back. On a development model KD won back 8.3 of 11.6 points, but there the blend lives in
the stem (ASR 90.7% without KD, 98.6% with): a new head is no defense against a backdoor in the stem.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..device import channels_last, check_precision, precision_autocast, training_bf16
from ..errors import UsageError
from ..io.data import Holdout, to_float
from ..io.preprocess import Normalized
from ..train.augment import augment_images, cutmix
from .context import Context, DefenseResult
from .guard import FitValGuard
from .losses import distillation, frozen_copy
from .registry import register_method

_STAGE = re.compile(r"(^|\.)layer(\d+)$")


@register_method("trap-replace", "Replace the light head: re-initialise it and train it on the fit split (T&R §2a)")
@dataclass
class TrapReplace:
    """Replace the light head: re-initialise it and train it on the fit split (T&R §2a)."""

    epochs: int = 100
    lr: float = 0.03
    weight_decay: float = 5e-4
    batch_size: int = 64
    label_smoothing: float = 0.1
    dropout: float = 0.5
    cutmix: bool = True
    augment: bool = True
    stem_end: str = "auto"
    distill_weight: float = 0.0
    temperature: float = 2.0
    fit_val_fraction: float = 0.1
    precision: str = "auto"

    def __post_init__(self):
        check_precision(self.precision)
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 2 or not 0 <= self.dropout < 1:
            raise ValueError("need epochs ≥ 0, lr > 0, batch_size ≥ 2 and 0 ≤ dropout < 1")
        if self.distill_weight < 0 or self.temperature <= 0:
            raise ValueError("need distill_weight ≥ 0 and temperature > 0")

    def run(self, model: nn.Module, fit: Holdout, ctx: Context) -> DefenseResult:
        started = time.perf_counter()
        model = model.to(ctx.device).eval()
        train, fit_val = ctx.fit_val_split(fit.to(ctx.device), self.fit_val_fraction)
        example = to_float(train.x[:2])
        split = head_split(model, example, self.stem_end)
        guard = FitValGuard(fit_val, ctx.max_acc_drop, ctx.batch_size)
        guard.start(model)
        teacher = frozen_copy(model) if self.distill_weight > 0 else None
        reinitialise(split.head, ctx.generator(offset=53))
        frozen = [p for p in model.parameters() if p.requires_grad and not _is_head_param(p, split.head)]
        for p in frozen:
            p.requires_grad_(False)
        try:  # dropout draws from the global RNG: seed it from --seed, and give the caller's state back after
            with channels_last(model), torch.random.fork_rng(devices=_cuda_devices(ctx.device)):
                torch.manual_seed(ctx.seed * 1_000_003 + 61)
                log = self._train_head(model, split, train, guard, ctx, teacher)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        selected = guard.restore_best(model)
        model.eval()
        details = {"fit_train": len(train), "fit_val": len(fit_val), "stem_end": split.stem_end,
                   "head_modules": [name for name, _ in split.head], "dropout_sites": split.dropout_sites,
                   "head_parameters": sum(p.numel() for _, m in split.head for p in m.parameters(recurse=False)),
                   "epochs": log, "guard": guard.details() | {"selected": selected},
                   "timings_s": {"total": round(time.perf_counter() - started, 3)}}
        return DefenseResult(model, details, guard=guard.summary())

    def _train_head(self, model: nn.Module, split: HeadSplit, train: Holdout, guard: FitValGuard, ctx: Context,
                    teacher: nn.Module | None) -> list[dict]:
        device = ctx.device
        bf16 = training_bf16(device, self.precision)
        generator = ctx.generator(offset=59)
        batch = min(self.batch_size, max(2, len(train)))
        steps_per_epoch = max(1, len(train) // batch)  # drop_last
        total = self.epochs * steps_per_epoch
        params = [p for _, m in split.head for p in m.parameters(recurse=False)]
        optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
        log, step = [], 0
        for epoch in range(1, self.epochs + 1):
            model.eval()  # the stem: eval mode, frozen statistics
            for _, module in split.head:
                module.train()
            order = torch.randperm(len(train), generator=generator).to(device)
            loss_sum = 0.0
            with dropout_at(split, self.dropout):
                for index in order[:steps_per_epoch * batch].view(steps_per_epoch, batch):
                    x, y = to_float(train.x[index]), train.y[index]
                    x = augment_images(x, generator, ctx.augmentation(self.augment))
                    with precision_autocast(device, bf16):
                        loss = self._loss(model, x, y, generator, teacher)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    loss_sum += float(loss.detach())
                    ctx.report("trap-replace head", step, total)
            model.eval()
            ca = float(guard.correct(model).float().mean()) if len(guard.fit_val) else float("nan")
            guard.check(model, f"epoch {epoch}", objective=None if math.isnan(ca) else -ca)
            log.append({"epoch": epoch, "loss": loss_sum / steps_per_epoch, "ca_fit_val": ca})
        return log

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
              teacher: nn.Module | None) -> torch.Tensor:
        """Label-smoothed CE, on a CutMix batch (λ-weighted over both labels) when ``cutmix``; plus, with a
        teacher, ``distill_weight``·KD to the input model's outputs on the same (clean, mixed) images."""
        smoothing = self.label_smoothing
        if self.cutmix:
            x, partner, lam = cutmix(x, generator)
        logits = model(x).float()
        if self.cutmix:
            loss = lam * F.cross_entropy(logits, y, label_smoothing=smoothing) + (1 - lam) * F.cross_entropy(
                logits, y[partner], label_smoothing=smoothing)
        else:
            loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x).float()
            loss = loss + self.distill_weight * distillation(logits, target, self.temperature)
        return loss


@contextlib.contextmanager
def dropout_at(split: HeadSplit, p: float):
    """Dropout(p) on the inputs of the split's dropout sites while the block runs (no module is added)."""
    hooks = [split.modules[name].register_forward_pre_hook(_dropout_hook(p)) for name in split.dropout_sites
             ] if p > 0 else []
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@dataclass
class HeadSplit:
    """The head's leaf modules in execution order, where dropout goes, the stem's last module, and the head's entry:
    the outermost module that starts the head and holds nothing of the stem (its input is the stem's output, on
    every path: what the trap stage's decoder reads)."""

    head: list[tuple[str, nn.Module]]
    dropout_sites: list[str]
    stem_end: str
    modules: dict[str, nn.Module]
    entry: str = ""


def head_split(model: nn.Module, example: torch.Tensor, stem_end: str = "auto") -> HeadSplit:
    """Find the light head by tracing which leaf modules run, in order, during one forward pass."""
    modules = dict(model.named_modules())
    order: list[str] = []
    names = {m: n for n, m in modules.items()}
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(names[mod]))
             for m in modules.values() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    order = list(dict.fromkeys(order))
    if stem_end == "auto":
        start = _auto_head_start(modules, order)
        first = next(i for i, n in enumerate(order) if n == start or n.startswith(start + "."))
        stem_end = order[first - 1] if first > 0 else ""
    else:
        if stem_end not in modules and isinstance(model, Normalized) and f"model.{stem_end}" in modules:
            stem_end = f"model.{stem_end}"  # the user's name, inside bdsan's normalising wrapper
        if stem_end not in modules:
            raise UsageError(f"stem_end {stem_end!r} is not a module of the model "
                             f"(leaf modules in order: {', '.join(order[-8:])}, …)")
        inside = [i for i, n in enumerate(order) if n == stem_end or n.startswith(stem_end + ".")]
        if not inside:
            raise UsageError(f"stem_end {stem_end!r} does not run in the forward pass")
        first = inside[-1] + 1
    head_names = [n for n in order[first:] if any(True for _ in modules[n].parameters(recurse=False))
                  or isinstance(modules[n], nn.modules.batchnorm._BatchNorm)]
    if not head_names:
        raise UsageError("the head after stem_end has no parameters to replace")
    if first >= len(order):
        raise UsageError(f"nothing runs after stem_end {stem_end!r}: no head to replace")
    return HeadSplit([(n, modules[n]) for n in head_names], _dropout_sites(modules, order[first:]), stem_end,
                     modules, _entry(order, first))


def _entry(order: list[str], first: int) -> str:
    """The largest name prefix of the head's first leaf under which no stem leaf ran (a residual block, not its
    first convolution, so that the shortcut's input is the same tensor)."""
    stem = order[:first]
    entry = order[first]
    parts = entry.split(".")
    for length in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:length])
        if any(n == prefix or n.startswith(prefix + ".") for n in stem):
            break
        entry = prefix
    return entry


def _auto_head_start(modules: dict[str, nn.Module], order: list[str]) -> str:
    """ResNet-like: the last block of the highest ``layerN`` stage; otherwise the last convolution that runs."""
    stages = [(int(m.group(2)), name) for name in modules if (m := _STAGE.search(name))
              and isinstance(modules[name], nn.Sequential) and len(modules[name])]
    if stages:
        _, name = max(stages)
        return f"{name}.{len(modules[name]) - 1}"
    convs = [n for n in order if isinstance(modules[n], nn.Conv2d)]
    if not convs:
        raise UsageError("no convolution found: give stem_end=MODULE")
    return convs[-1]


def _dropout_sites(modules: dict[str, nn.Module], head_order: list[str]) -> list[str]:
    """Inputs that get dropout: every head block's second conv, and the head's pooling (else its first linear)."""
    sites = [n for n in head_order if n.endswith(".conv2") and isinstance(modules[n], nn.Conv2d)]
    pool = [n for n in head_order if isinstance(modules[n], (nn.AdaptiveAvgPool2d, nn.AvgPool2d))]
    linear = [n for n in head_order if isinstance(modules[n], nn.Linear)]
    final = pool[:1] or linear[:1]
    return sites + final


def _dropout_hook(p: float):
    def hook(module, inputs):
        return (F.dropout(inputs[0], p, training=True), *inputs[1:])

    return hook


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def _is_head_param(p: torch.Tensor, head: list[tuple[str, nn.Module]]) -> bool:
    return any(p is q for _, m in head for q in m.parameters(recurse=False))


@torch.no_grad()
def reinitialise(head: list[tuple[str, nn.Module]], generator: torch.Generator) -> None:
    """Fresh, seeded weights (§2a.1): conv kaiming-normal (fan_out, ReLU), BN γ=1 β=0 with reset statistics,
    linear as PyTorch's default (kaiming-uniform a=√5, bias U(±1/√fan_in))."""
    for _, module in head:
        if isinstance(module, nn.Conv2d):
            weight = torch.empty(module.weight.shape)
            nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu", generator=generator)
            module.weight.copy_(weight)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            weight = torch.empty(module.weight.shape)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            module.weight.copy_(weight)
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                module.bias.copy_((torch.rand(module.bias.shape, generator=generator) * 2 - 1) * bound)
        else:
            raise UsageError(f"cannot re-initialise head module {type(module).__name__}: give another stem_end")
