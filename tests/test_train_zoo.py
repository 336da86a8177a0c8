"""Poisoning modes, the zoo's cache and the attack-trigger metrics."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from bdsan.errors import UsageError
from bdsan.train.fixtures import corner_square
from bdsan.train.poison import poison_arrays
from bdsan.train.zoo import RECIPES, Attack, attack_metrics, synthetic_dataset, train_backdoored


def _images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n, 3, 8, 8), 100, dtype=torch.uint8), torch.arange(n) % 4


def test_all2one_stamps_non_target_images_and_relabels_them():
    x, y = _images(40)
    xp, yp, mask = poison_arrays(x, y, corner_square, 0.25, target=0, seed=1)
    assert int(mask.sum()) == 10
    assert (y[mask] != 0).all() and (yp[mask] == 0).all()
    assert (xp[mask][:, :, -3:, -3:] == 255).all() and (xp[~mask] == 100).all()
    assert torch.equal(yp[~mask], y[~mask])


def test_all2all_shifts_labels_by_one():
    x, y = _images(40)
    _, yp, mask = poison_arrays(x, y, corner_square, 0.5, target=0, seed=1, mode="all2all", num_classes=4)
    assert int(mask.sum()) == 20
    assert torch.equal(yp[mask], (y[mask] + 1) % 4)


def test_clean_label_keeps_labels_and_only_touches_the_target_class():
    x, y = _images(40)
    xp, yp, mask = poison_arrays(x, y, corner_square, 0.5, target=2, seed=1, mode="clean_label")
    assert int(mask.sum()) == 10  # capped at the 10 images of class 2
    assert (y[mask] == 2).all() and torch.equal(yp, y)
    assert (xp[mask][:, :, -1, -1] == 255).all()


def test_poisoning_is_seeded():
    x, y = _images(40)
    assert torch.equal(poison_arrays(x, y, corner_square, 0.25, 0, seed=3)[2],
                       poison_arrays(x, y, corner_square, 0.25, 0, seed=3)[2])


def test_attack_parse():
    attack = Attack.parse("blend_noise:all2all:alpha=0.3", rate=0.05, target=1)
    assert (attack.trigger, attack.mode, attack.rate, attack.target) == ("blend_noise", "all2all", 0.05, 1)
    assert dict(attack.params) == {"alpha": 0.3}
    assert attack.build_trigger().params["alpha"] == 0.3
    assert attack.label == "blend_noise (all2all, alpha=0.3)"
    with pytest.raises(UsageError):
        Attack.parse("sig:nonsense")
    with pytest.raises(UsageError):
        Attack("sig", rate=1.0)


def test_rate_zero_is_a_clean_twin():
    clean = Attack.parse("badnets_grid", rate=0.0)
    assert clean.label == "badnets_grid (clean twin)"
    x, y = _images(40)
    xp, yp, mask = poison_arrays(x, y, clean.build_trigger(), clean.rate, target=0, seed=1)
    assert not mask.any() and torch.equal(xp, x) and torch.equal(yp, y)


class _Fixed(nn.Module):
    """Predicts class 0 when the bottom-right pixel is white, else the label encoded in pixel (0, 0)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 255).round().long()
        label = torch.where(x[:, 0, -1, -1] > 0.99, torch.zeros_like(label), label)
        return nn.functional.one_hot(label, 4).float() + self.dummy


def test_attack_metrics_by_hand():
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    x = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    x[:, 0, 0, 0] = y.to(torch.uint8)
    x[5, 0, 0, 0] = 3  # one clean mistake
    x[4, 0, 0, 0] = 0  # and one into the target, without the trigger
    attack = Attack("badnets_grid")
    metrics = attack_metrics(_Fixed(), x, y, attack, 4, trigger=corner_square)
    assert metrics["ca"] == pytest.approx(4 / 6)
    assert metrics["asr"] == 1.0 and metrics["ra"] == 0.0
    assert metrics["untriggered"] == pytest.approx(1 / 5)
    assert metrics["n_triggered"] == 5


def test_train_backdoored_caches_by_config(tmp_path):
    data = synthetic_dataset(n_train=1200, n_test=200, num_classes=4)
    attack = Attack("badnets_grid")
    recipe = RECIPES["toy"]
    first = train_backdoored(data, attack, recipe, holdout_fraction=0.25, seed=0, cache_dir=tmp_path)
    assert not first.from_cache and first.poisoned == 90  # 10% of the 900 non-holdout images
    assert len(first.holdout) == 300 and first.holdout.class_counts() == [75, 75, 75, 75]
    metrics = attack_metrics(first.model.normalized(), data.x_test, data.y_test, attack, 4)
    assert metrics["ca"] > 0.8 and metrics["asr"] > 0.9
    second = train_backdoored(data, attack, recipe, holdout_fraction=0.25, seed=0, cache_dir=tmp_path)
    assert second.from_cache and second.key == first.key
    for name, value in first.model.module.state_dict().items():
        assert torch.equal(value, second.model.module.state_dict()[name])
    assert torch.equal(second.holdout.x, first.holdout.x)
    other = train_backdoored(data, attack, replace(recipe, epochs=1), holdout_fraction=0.25, seed=0,
                             cache_dir=tmp_path)
    assert other.key != first.key and not other.from_cache
