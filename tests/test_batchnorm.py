"""BN re-estimation: modes, augmentation passes and batches transformed like the training batches."""
import pytest
import torch
from torch import nn

from bdsan.io.data import Holdout
from bdsan.sanitize.batchnorm import check_bn_mode, checkpoint_bn


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))


def _data(n: int = 32) -> Holdout:
    return Holdout(torch.full((n, 3, 8, 8), 51, dtype=torch.uint8), torch.arange(n) % 2, ["a", "b"], "t")


def test_reestimate_replaces_running_statistics_with_the_datas():
    net = _net()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    checkpoint_bn(net, "reestimate", _data(), batch_size=8)
    # every pixel is 51/255 = 0.2 in all 3 channels → each output channel is 0.6 everywhere
    assert torch.allclose(net[1].running_mean, torch.full((4,), 0.6), atol=1e-4)


def test_transform_makes_the_statistics_those_of_the_transformed_batches():
    net = _net()
    with torch.no_grad():
        net[0].weight.fill_(1.0)

    def stamp_half(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[: len(x) // 2] = 1.0
        return x
    checkpoint_bn(net, "reestimate", _data(), batch_size=8, transform=stamp_half)
    assert torch.allclose(net[1].running_mean, torch.full((4,), (0.6 + 3.0) / 2), atol=1e-4)


def test_train_and_frozen_modes_leave_statistics_alone():
    for mode in ("train", "frozen"):
        net = _net()
        checkpoint_bn(net, mode, _data(), batch_size=8, transform=lambda x: x + 1)
        assert torch.equal(net[1].running_mean, torch.zeros(4))
    with pytest.raises(ValueError):
        check_bn_mode("sometimes")
