"""FT — plain fine-tuning on the clean fit split, the baseline every defense is read against (BackdoorBench
``defense/ft.py``: SGD lr 0.01, cosine, 5% clean data; SPEC §7 "every result table carries the FT baseline").

Same data, optimiser settings and step budget as FMP's fine-tune (``fmp.finetune_steps``), so an FMP row minus the
FT row is the effect of pruning alone. Differences from FMP's loop, both from reusing ``train_classifier``: nesterov
momentum and cosine down to 0 (FMP: plain momentum, down to 1e-4); the step budget is rounded up to whole passes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from torch import nn

from ..io.data import Holdout
from ..train.loop import train_classifier
from .batchnorm import check_bn_mode, checkpoint_bn
from .context import Context, DefenseResult
from .fmp import finetune_steps
from .guard import FitValGuard
from .registry import register_method


@register_method("ft", "Plain fine-tuning on the fit split (BackdoorBench FT baseline; FMP's fine-tune, no pruning)")
@dataclass
class FineTune:
    """Plain fine-tuning on the fit split (BackdoorBench FT baseline; FMP's fine-tune, no pruning)."""

    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    reference_images: int = 2500
    max_passes: int = 50
    augment: bool = True
    fit_val_fraction: float = 0.1
    bn: str = "train"  # BackdoorBench's FT trains BN normally; frozen / reestimate are bdsan's options

    def __post_init__(self):
        check_bn_mode(self.bn)
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs must be ≥ 0, batch_size ≥ 1 and lr > 0")

    def run(self, model: nn.Module, fit: Holdout, ctx: Context) -> DefenseResult:
        started = time.perf_counter()
        model = model.to(ctx.device)
        train, fit_val = ctx.fit_val_split(fit.to(ctx.device), self.fit_val_fraction)
        guard = FitValGuard(fit_val, ctx.max_acc_drop, ctx.batch_size)
        model.eval()
        guard.start(model)
        steps, batch, note = finetune_steps(len(train), self.batch_size, self.epochs, self.reference_images,
                                            self.max_passes)
        passes = math.ceil(steps / math.ceil(len(train) / batch)) if len(train) else 0
        if passes:
            train_classifier(model, train.x, train.y, epochs=passes, lr=self.lr, batch_size=batch,
                             weight_decay=self.weight_decay, momentum=self.momentum, schedule="cosine",
                             augment=ctx.augmentation(self.augment), seed=ctx.seed, freeze_bn=self.bn == "frozen",
                             progress=lambda done, total: ctx.report("ft fine-tune", done, total))
            checkpoint_bn(model, self.bn, train, ctx.batch_size, ctx.augmentation(self.augment),
                          ctx.generator(offset=3))
        model.eval()
        guard.check(model, f"after {passes} passes")
        selected = guard.restore_best(model)
        model.eval()
        details = {"fit_train": len(train), "fit_val": len(fit_val),
                   "finetune": {"passes": passes, "batch": batch, "steps": passes * math.ceil(len(train) / batch)
                                if len(train) else 0, "note": note},
                   "guard": guard.details() | {"selected": selected},
                   "timings_s": {"finetune": round(time.perf_counter() - started, 3)}}
        return DefenseResult(model, details)
