"""Slim export: dead channels (FMP --hard-prune) are physically removed and the outputs do not change."""
from __future__ import annotations

import copy

import onnx
import pytest
import torch
from torch import nn

from bdsan.exporters.slim import export_slim_onnx, slim_model
from bdsan.io.archs import build_arch


def kill_channels(module: nn.Module, fraction: float = 0.25, zero_bias: bool = True, seed: int = 0) -> nn.Module:
    """What FMP --hard-prune leaves: conv output slices zero and the BN after them with γ = β = 0."""
    generator = torch.Generator().manual_seed(seed)
    conv = None
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            conv = layer
        elif isinstance(layer, nn.BatchNorm2d) and conv is not None:
            index = torch.randperm(layer.num_features, generator=generator)[:int(fraction * layer.num_features)]
            with torch.no_grad():
                conv.weight[index] = 0
                layer.weight[index] = 0
                if zero_bias:
                    layer.bias[index] = 0
            conv = None
    return module


def example(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_dead_channels_are_removed_and_outputs_kept(toy_poisoned):
    module = kill_channels(copy.deepcopy(toy_poisoned.model.module))
    slim, info = slim_model(module, example())
    # tiny_cnn has 16/32/64/64 channels: a quarter of each is dead
    assert info["channels_removed_total"] == 4 + 8 + 16 + 16
    assert info["after"]["params"] < info["before"]["params"]
    assert info["after"]["flops"] < info["before"]["flops"]
    assert info["after"]["weight_bytes"] < info["before"]["weight_bytes"]
    convs = [layer.out_channels for layer in slim.modules() if isinstance(layer, nn.Conv2d)]
    assert convs == [12, 24, 48, 48]
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(slim(x), module(x), atol=1e-5)
    assert next(p for p in module.parameters()).shape[0] == 16  # the input module is not changed


def test_live_or_constant_channels_stay(toy_poisoned):
    module = copy.deepcopy(toy_poisoned.model.module)
    _, info = slim_model(module, example())
    assert info["channels_removed_total"] == 0
    # faithful FMP zeroes only γ: the channel then outputs the constant β — not dead, must stay
    constant = kill_channels(copy.deepcopy(module), zero_bias=False)
    for layer in constant.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.bias.data.add_(0.5)
    _, info = slim_model(constant, example())
    assert info["channels_removed_total"] == 0


def test_residual_stream_channels_need_every_writer_dead():
    module = build_arch("small_resnet", 10).eval()
    # kill channel 3 of layer1's residual stream in the stem conv/bn and the block's conv2/bn2 only
    with torch.no_grad():
        for conv, bn in [(module.conv1, module.bn1), (module.layer1[0].conv2, module.layer1[0].bn2)]:
            conv.weight[3] = 0
            bn.weight[3] = 0
            bn.bias[3] = 0
    slim, info = slim_model(module, example())
    assert slim.conv1.out_channels == 31 and slim.layer1[0].conv2.out_channels == 31
    assert slim.layer2[0].conv1.in_channels == 31
    # only the stem is dead: the block's conv2 still writes channel 3 of the stream, so it stays
    partial = build_arch("small_resnet", 10).eval()
    with torch.no_grad():
        partial.conv1.weight[3] = 0
        partial.bn1.weight[3] = 0
        partial.bn1.bias[3] = 0
    _, info = slim_model(partial, example())
    assert info["channels_removed_total"] == 0


def test_slim_onnx_export_checks_parity_against_unpruned(tmp_path, toy_poisoned):
    model = copy.deepcopy(toy_poisoned.model)
    kill_channels(model.module)
    out = tmp_path / "slim.onnx"
    artifact = export_slim_onnx(model, out, holdout=toy_poisoned.holdout)
    slim = artifact["slim"]
    assert artifact["parity"]["passed"] and artifact["parity"]["agreement"] == 1.0
    assert slim["after"]["onnx_bytes"] == out.stat().st_size < slim["before"]["onnx_bytes"]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert "bdsan.slim" in meta and meta["bdsan.arch"] == "tiny_cnn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slim.onnx"]


@pytest.mark.parametrize("arch", ["cifar_resnet18", "preact_resnet18"])
def test_slim_resnets_keep_outputs(arch):
    module = kill_channels(build_arch(arch, 10).eval())
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):  # non-trivial running statistics
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    _slim, info = slim_model(module, example())
    assert info["channels_removed_total"] > 0 and info["max_scaled_diff"] <= 1e-4
