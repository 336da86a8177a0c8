"""What the pipeline hands a method (``Context``) and what a method hands back (``DefenseResult``)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..io.data import Holdout, stratified_split

log = logging.getLogger("bdsan.sanitize")

ProgressCallback = Callable[[str, int, int], None]


@dataclass
class Context:
    """Run-wide settings a defense may read; it never sees the verify split.

    ``known_triggers`` are the triggers the pipeline's audit of the *fit* split flagged (net ASR ≥ 0.5), with
    ``trigger_evidence`` the matching audit entries (name, params, suspected_target, asr_net) — for methods that
    use trigger knowledge.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    batch_size: int = 256
    max_acc_drop: float = 3.0
    progress: ProgressCallback | None = None
    known_triggers: list = field(default_factory=list)
    trigger_evidence: list[dict] = field(default_factory=list)
    fit_val_fraction: float = 0.1
    flip: bool = True  # whether augmentation may flip images (``mirror.resolve_flip``)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from ``--seed`` (+ ``offset`` so independent uses do not share streams)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)

    def augmentation(self, enabled: bool) -> bool | str:
        """A method's augmentation mode: crop + flip (``True``), the crop alone (``"crop"``) or none (``False``)."""
        return (True if self.flip else "crop") if enabled else False

    def report(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)

    def fit_val_split(self, fit: Holdout, fraction: float | None = None) -> tuple[Holdout, Holdout]:
        """(train, fit-val): a seeded stratified slice of the fit split for validation signals (ALGORITHMS §0.1).

        At least one image per class goes to fit-val when the class has two or more.
        """
        fraction = self.fit_val_fraction if fraction is None else fraction
        val_index, train_index = stratified_split(fit.y, fraction, self.seed + 7919, fit.num_classes)
        return fit.subset(train_index), fit.subset(val_index)


@dataclass
class DefenseResult:
    """The defended [0,1]-input model and JSON-safe details for the report's ``defense.details``."""

    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    guard: dict[str, Any] | None = None  # the method's fit-val guard summary; ``rolled_back`` = returned the input
