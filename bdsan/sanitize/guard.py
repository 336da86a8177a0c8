"""Clean-accuracy guard (ALGORITHMS §0.2): accept or reject states; it never tunes anything.

Two parts: ``FitValGuard`` — a method calls it after every epoch/phase on its fit-val slice and gets back the best
accepted state; ``verify_check`` — the pipeline's one read-only check on the verify split after the defense.
"""
from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from ..io.data import Holdout
from ..train.loop import predict

log = logging.getLogger("bdsan.sanitize")
TIES = ("lowest-se", "difference")
PICKS = ("latest", "earliest")


class FitValGuard:
    """Tracks fit-val clean accuracy; keeps the best state whose drop stays within the limit.

    Among accepted states the one with the lowest ``objective`` wins (ties and ``None``: the latest), so a method
    without an objective gets its latest acceptable checkpoint. The input state is the fallback. With an
    ``objective_se`` (the objective's standard error), states within one SE of the lowest count as ties: the
    latest of them wins, so a noisy minimum on a small fit-val slice does not pick an early, half-trained epoch.
    ``tie="difference"``: a state ties with the lowest when their difference is within one standard error of the
    difference (both states' SEs), not only the lowest's: near zero the lowest's binomial SE vanishes, and one
    image (1 of 216) then separated epoch 3 from epochs 4–10. ``pick="earliest"``: the earliest of the tied states
    wins instead — stop as soon as the objective is as low as fit-val can tell (every accepted state is kept).

    Fit-val is small (10% of the fit split: 50 images for a 1,000-image holdout, where one image is 2 points), so a
    state is rejected only when its drop exceeds ``max_acc_drop`` by more than ``tolerance_se`` standard errors of
    the paired difference (from the images whose correctness changed). The pipeline's verify check stays strict.
    """

    def __init__(self, fit_val: Holdout, max_acc_drop: float, batch_size: int = 256, tolerance_se: float = 1.0,
                 tie: str = "lowest-se", pick: str = "latest"):
        if tie not in TIES:
            raise ValueError(f"tie must be one of {', '.join(TIES)}, got {tie!r}")
        if pick not in PICKS:
            raise ValueError(f"pick must be one of {', '.join(PICKS)}, got {pick!r}")
        self.tie, self.pick = tie, pick
        self.fit_val = fit_val
        self.max_acc_drop = float(max_acc_drop)
        self.batch_size = batch_size
        self.tolerance_se = float(tolerance_se)
        self.baseline: float | None = None
        self.history: list[dict] = []
        self._baseline_correct: torch.Tensor | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self._candidates: list[tuple[float, float, str, dict[str, torch.Tensor]]] = []
        self._best_label = "input"

    def correct(self, model: nn.Module) -> torch.Tensor:
        """Per fit-val image: did ``model`` classify it right."""
        if len(self.fit_val) == 0:
            return torch.zeros(0, dtype=torch.bool)
        return predict(model, self.fit_val.x, self.batch_size) == self.fit_val.y

    def start(self, model: nn.Module) -> float:
        """Record the input model's fit-val CA and keep its state as the fallback."""
        self._baseline_correct = self.correct(model)
        self.baseline = self._baseline_correct.float().mean().item() if len(self.fit_val) else float("nan")
        self._best_state = _copy_state(model)
        self.history.append({"label": "input", "ca_fit_val": self.baseline, "accepted": True})
        return self.baseline

    def check(self, model: nn.Module, label: str, objective: float | None = None, objective_se: float = 0.0
              ) -> bool:
        """Evaluate ``model`` now; remember its state if accepted and possibly best. Returns accepted."""
        correct = self.correct(model)
        n = len(correct)
        ca = correct.float().mean().item() if n else float("nan")
        drop, tolerance = 0.0, 0.0
        if n and self._baseline_correct is not None:
            drop = 100.0 * (self.baseline - ca)
            tolerance = self.tolerance_se * paired_standard_error(self._baseline_correct, correct)
        accepted = drop <= self.max_acc_drop + tolerance + 1e-9
        entry = {"label": label, "ca_fit_val": ca, "drop_points": drop, "tolerance_points": round(tolerance, 3),
                 "accepted": accepted}
        if objective is not None:
            entry["objective"] = float(objective)
            if objective_se:
                entry["objective_se"] = float(objective_se)
        self.history.append(entry)
        if accepted:
            value = float(objective) if objective is not None else 0.0
            if self.pick == "latest":  # an earlier state no better than this later one can never be chosen again
                self._candidates = [c for c in self._candidates if c[0] < value]
            self._candidates.append((value, float(objective_se), label, _copy_state(model)))
        return accepted

    def restore_best(self, model: nn.Module) -> str:
        """Load the best accepted state (or the input state) into ``model``; returns its label."""
        if self._candidates:
            lowest = min(self._candidates, key=lambda c: c[0])
            tied = [c for c in self._candidates if c[0] <= lowest[0] + self._tie_se(lowest[1], c[1]) + 1e-12]
            chosen = tied[0] if self.pick == "earliest" else tied[-1]
            self._best_label, self._best_state = chosen[2], chosen[3]
        if self._best_state is not None:
            model.load_state_dict(self._best_state)
        if self._best_label == "input" and len(self.history) > 1:
            log.warning("fit-val guard: no checkpoint kept CA within %.1f points; returning the input weights",
                        self.max_acc_drop)
        return self._best_label

    def _tie_se(self, lowest_se: float, se: float) -> float:
        """How far above the lowest objective a state still ties with it."""
        return math.hypot(lowest_se, se) if self.tie == "difference" else lowest_se

    def summary(self) -> dict:
        """What the pipeline reports: baseline, the chosen checkpoint, and whether it fell back to the input."""
        rejected = [h for h in self.history if not h["accepted"]]
        return {"fit_val_n": len(self.fit_val), "ca_fit_val_before": self.baseline, "selected": self._best_label,
                "rejected": [h["label"] for h in rejected],
                "max_drop_points": max((h["drop_points"] for h in rejected), default=0.0),
                "rolled_back": self._best_label == "input" and len(self.history) > 1}

    def details(self) -> dict:
        return {"fit_val_n": len(self.fit_val), "baseline_ca_fit_val": self.baseline,
                "max_acc_drop": self.max_acc_drop, "tolerance_se": self.tolerance_se, "tie": self.tie,
                "pick": self.pick,
                "selected": self._best_label, "history": self.history}


def paired_standard_error(before: torch.Tensor, after: torch.Tensor) -> float:
    """Standard error, in points, of the accuracy difference of two classifiers on the same images."""
    n = len(before)
    if n == 0:
        return 0.0
    lost = int((before & ~after).sum())
    gained = int((~before & after).sum())
    variance = (lost + gained - (lost - gained) ** 2 / n) / (n * n)
    return 100.0 * math.sqrt(max(variance, 0.0))


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def verify_check(ca_before: float, ca_after: float, max_acc_drop: float) -> dict:
    """The pipeline's read-only check on verify: roll back when CA dropped more than ``max_acc_drop`` points."""
    drop = 100.0 * (ca_before - ca_after)
    rolled_back = bool(drop > max_acc_drop + 1e-9)
    return {"ca_verify_before": ca_before, "ca_verify_after": ca_after, "drop_points": drop, "verify_drop_points": drop,
            "max_acc_drop": float(max_acc_drop), "rolled_back": rolled_back}


def snapshot(module: nn.Module) -> nn.Module:
    """A deep copy kept untouched so the pipeline can roll back to the input weights."""
    return copy.deepcopy(module)
