"""Audit metrics (SPEC §4) from prediction tensors: CA, per-class CA, base rate, ASR per target, net ASR, RA.

Everything is a handful of ``bincount``s over the predictions, on whatever device they live on.
"""
from __future__ import annotations

import torch


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> list[float | None]:
    """Element-wise ratio as a list; None where the denominator is 0 (undefined, not 0)."""
    values = numerator.double() / denominator.clamp(min=1).double()
    return [float(v) if int(d) > 0 else None for v, d in zip(values.tolist(), denominator.tolist())]


def _flips_per_target(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every class t: images with label ≠ t predicted as t, and the number of images with label ≠ t."""
    predicted_as = torch.bincount(pred, minlength=num_classes)[:num_classes]
    correct_in = torch.bincount(y[pred == y], minlength=num_classes)[:num_classes]
    not_in = len(y) - torch.bincount(y, minlength=num_classes)[:num_classes]
    return predicted_as - correct_in, not_in


def clean_metrics(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """CA, per-class CA (None for classes without images, which are listed in ``classes_skipped``),
    the no-trigger flip rate ``base_rate[t]`` = P(pred = t | label ≠ t), and counts."""
    pred, y = pred.long(), y.long()
    counts = torch.bincount(y, minlength=num_classes)[:num_classes]
    correct = torch.bincount(y[pred == y], minlength=num_classes)[:num_classes]
    flips, not_in = _flips_per_target(pred, y, num_classes)
    n = len(y)
    return {"ca": float((pred == y).double().mean()) if n else None,
            "per_class_ca": _ratio(correct, counts),
            "base_rate": _ratio(flips, not_in),
            "n": n,
            "class_counts": counts.tolist(),
            "classes_skipped": [c for c, k in enumerate(counts.tolist()) if k == 0]}


def trigger_metrics(pred: torch.Tensor, y: torch.Tensor, num_classes: int, base_rate: list[float | None],
                    target: int | None = None) -> dict:
    """For triggered predictions: ASR for every candidate target t (images with label ≠ t predicted t), its
    maximum and arg-max (ties → lowest class index), ASR net of the base rate, and RA (accuracy against the true
    labels on images not of the suspected target). With ``target``, ``asr_max`` is ASR at that target."""
    pred, y = pred.long(), y.long()
    flips, not_in = _flips_per_target(pred, y, num_classes)
    asr = _ratio(flips, not_in)
    if target is not None:
        if not 0 <= target < num_classes:
            raise ValueError(f"target {target} outside 0..{num_classes - 1}")
        suspected = target
    else:
        defined = [v for v in asr if v is not None]
        suspected = asr.index(max(defined)) if defined else None
    if suspected is None:
        return {"asr": asr, "asr_max": None, "suspected_target": None, "asr_net": None, "ra": None, "n": 0}
    asr_max = asr[suspected]
    others = y != suspected
    n_others = int(others.sum())
    ra = float((pred[others] == y[others]).double().mean()) if n_others else None
    base = base_rate[suspected] if suspected < len(base_rate) else None
    return {"asr": asr, "asr_max": asr_max, "suspected_target": suspected,
            "asr_net": asr_max - base if asr_max is not None and base is not None else None,
            "ra": ra, "n": n_others}
