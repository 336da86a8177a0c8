"""The fit-val guard: paired standard error and noise-aware acceptance (ALGORITHMS §0.2)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bdsan.io.data import Holdout
from bdsan.sanitize.guard import FitValGuard, paired_standard_error


def test_paired_standard_error_counts_only_changed_images():
    before = torch.tensor([True] * 40 + [False] * 10)
    assert paired_standard_error(before, before.clone()) == 0.0
    after = before.clone()
    after[:4] = False  # 4 lost
    after[45] = True  # 1 gained
    expected = 100 * math.sqrt((5 - 9 / 50) / 50 ** 2)
    assert math.isclose(paired_standard_error(before, after), expected)


class _FixedPredictions(nn.Module):
    """Predicts a stored label per image (the images carry their index in pixel [0, 0, 0])."""

    def __init__(self, labels: torch.Tensor):
        super().__init__()
        self.labels = labels
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        index = (x[:, 0, 0, 0] * 255).round().long()
        return nn.functional.one_hot(self.labels[index], 2).float() + 0 * self.weight


def test_guard_tolerates_noise_but_rejects_a_large_drop():
    n = 50
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    y = torch.zeros(n, dtype=torch.long)
    guard = FitValGuard(Holdout(x, y, ["a", "b"], "mem"), max_acc_drop=3.0, tolerance_se=1.0)
    guard.start(_FixedPredictions(torch.zeros(n, dtype=torch.long)))  # all 50 right
    slightly_worse = torch.zeros(n, dtype=torch.long)
    slightly_worse[:2] = 1  # 4 points lost, SE of 2 flips on 50 images ≈ 2.8 points → accepted
    assert guard.check(_FixedPredictions(slightly_worse), "noisy")
    wrecked = torch.zeros(n, dtype=torch.long)
    wrecked[:10] = 1  # 20 points lost, SE ≈ 6 points → rejected
    assert not guard.check(_FixedPredictions(wrecked), "wrecked")
    strict = FitValGuard(Holdout(x, y, ["a", "b"], "mem"), max_acc_drop=3.0, tolerance_se=0.0)
    strict.start(_FixedPredictions(torch.zeros(n, dtype=torch.long)))
    assert not strict.check(_FixedPredictions(slightly_worse), "noisy")
    assert guard.history[1]["tolerance_points"] > 0 and guard.summary()["rejected"] == ["wrecked"]


def test_objectives_within_one_standard_error_of_the_lowest_pick_the_latest_state():
    n = 50
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    holdout = Holdout(x, torch.zeros(n, dtype=torch.long), ["a", "b"], "mem")
    states = [_FixedPredictions(torch.zeros(n, dtype=torch.long)) for _ in range(4)]
    for index, model in enumerate(states):
        model.weight.data.fill_(float(index))

    def chosen(objectives: list[float], se: float | list[float], tie: str = "lowest-se", pick: str = "latest"
               ) -> tuple[str, float]:
        guard = FitValGuard(holdout, max_acc_drop=3.0, tie=tie, pick=pick)
        guard.start(states[0])
        ses = se if isinstance(se, list) else [se] * len(objectives)
        for index, (objective, objective_se) in enumerate(zip(objectives, ses), start=1):
            guard.check(states[index], f"epoch {index}", objective=objective, objective_se=objective_se)
        target = _FixedPredictions(torch.zeros(n, dtype=torch.long))
        return guard.restore_best(target), target.weight.item()

    assert chosen([0.30, 0.24, 0.27], se=0.0) == ("epoch 2", 2.0)  # the lowest
    assert chosen([0.30, 0.24, 0.27], se=0.04) == ("epoch 3", 3.0)  # within one SE of it: the latest
    assert chosen([0.24, 0.30, 0.35], se=0.04) == ("epoch 1", 1.0)  # later ones are worse by more than one SE
    # the seed-12 case: 1 of 216 images, then 2 of 216; the lowest's own SE (0.0046) leaves the later one out by
    # 1e-5, the difference's SE (both states') does not
    one, two = 1 / 216, 2 / 216
    ses = [math.sqrt(p * (1 - p) / 216) for p in (two, one, two)]
    assert chosen([two, one, two], se=ses) == ("epoch 2", 2.0)
    assert chosen([two, one, two], se=ses, tie="difference") == ("epoch 3", 3.0)
    assert chosen([0.24, 0.29, 0.35], se=0.04) == ("epoch 1", 1.0)  # 0.05 above: more than the lowest's SE
    assert chosen([0.24, 0.29, 0.35], se=0.04, tie="difference") == ("epoch 2", 2.0)  # within √2·0.04
    # pick="earliest": the first of the tied states (every accepted state is kept for it)
    assert chosen([0.30, 0.0, 0.0], se=0.0) == ("epoch 3", 3.0)
    assert chosen([0.30, 0.0, 0.0], se=0.0, pick="earliest") == ("epoch 2", 2.0)
    assert chosen([0.30, 0.24, 0.27], se=0.04, tie="difference", pick="earliest") == ("epoch 2", 2.0)  # 0.30 is out
    assert chosen([0.24, 0.29, 0.35], se=0.04, tie="difference", pick="earliest") == ("epoch 1", 1.0)
    with pytest.raises(ValueError, match="tie"):
        FitValGuard(holdout, max_acc_drop=3.0, tie="nearest")
    with pytest.raises(ValueError, match="pick"):
        FitValGuard(holdout, max_acc_drop=3.0, pick="middle")
