"""Architecture registry (SPEC §2.2): torchvision classifiers, CIFAR ResNets, small test nets, user factories."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import torch.nn.functional as F
import torchvision
from torch import nn

from ..errors import ModelRefused

ArchFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ArchFactory] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_arch(name: str, description: str = ""):
    """Decorator: add a builder ``factory(num_classes=...) -> nn.Module`` under ``name``."""

    def add(factory: ArchFactory) -> ArchFactory:
        _REGISTRY[name] = factory
        _DESCRIPTIONS[name] = description or (factory.__doc__ or name).strip().splitlines()[0]
        return factory

    return add


def _load_entry_points() -> None:
    for ep in entry_points(group="bdsan.archs"):
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = ep.load()
            _DESCRIPTIONS[ep.name] = f"plugin {ep.value}"


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_archs() -> dict[str, str]:
    """Name → one-line description, bdsan's own first, then plugins, then torchvision's."""
    _load_entry_points()
    names = dict(_DESCRIPTIONS)
    for name in _torchvision_names():
        names.setdefault(name, "torchvision classification model")
    return names


def build_arch(spec: str, num_classes: int) -> nn.Module:
    """Build ``spec`` (a registry name, ``file.py:factory`` or ``package.module:factory``)."""
    _load_entry_points()
    if spec in _REGISTRY:
        return _REGISTRY[spec](num_classes=num_classes)
    if spec in _torchvision_names():
        return torchvision.models.get_model(spec, weights=None, num_classes=num_classes)
    if ":" in spec:
        return _user_factory(spec)(num_classes=num_classes)
    raise ModelRefused(f"unknown architecture {spec!r}",
                       hint="`bdsan archs` lists the registry; user models: --arch my_arch.py:build")


def _user_factory(spec: str) -> ArchFactory:
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py") or "/" in target:
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise ModelRefused(f"architecture file not found: {target}")
            module_name = f"bdsan_user_arch_{abs(hash(str(path)))}"
            spec_obj = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[module_name] = module
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ModelRefused:
        raise
    except Exception as exc:  # user code: any failure is a refused input
        raise ModelRefused(f"could not import architecture {target!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelRefused(f"{target!r} has no callable {attr!r}")
    return factory


# --- CIFAR ResNets ----------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """Post-activation residual block (kuangliu/pytorch-cifar key layout)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block (BackdoorBench ``PreActBlock`` key layout)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class CifarResNet(nn.Module):
    """ResNet for 32-px inputs: 3×3 stem conv, no max-pool, four stages, global pool, linear."""

    def __init__(self, block: type[nn.Module], num_blocks: list[int], num_classes: int = 10,
                 widths: tuple[int, ...] = (64, 128, 256, 512), preact: bool = False):
        super().__init__()
        self.preact = preact
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        if not preact:
            self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        for index, (width, blocks) in enumerate(zip(widths, num_blocks)):
            stride = 1 if index == 0 else 2
            layers = []
            for block_stride in [stride] + [1] * (blocks - 1):
                layers.append(block(self.in_planes, width, block_stride))
                self.in_planes = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


@register_arch("cifar_resnet18", "ResNet-18 for 32-px inputs (3×3 stem, no max-pool; kuangliu keys)")
def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    return CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes)


@register_arch("preact_resnet18", "PreAct ResNet-18, key-compatible with BackdoorBench checkpoints")
def preact_resnet18(num_classes: int = 10) -> nn.Module:
    return CifarResNet(PreActBlock, [2, 2, 2, 2], num_classes, preact=True)


@register_arch("small_resnet", "narrow CIFAR ResNet-10 (16–128 channels) for CPU-scale benchmarks")
def small_resnet(num_classes: int = 10) -> nn.Module:
    return CifarResNet(BasicBlock, [1, 1, 1, 1], num_classes, widths=(32, 64, 128, 256))


@register_arch("tiny_cnn", "four-conv test network (16/32/64/64 channels), trains in seconds on a CPU")
def tiny_cnn(num_classes: int = 10) -> nn.Module:
    def stage(cin: int, cout: int, pool: bool) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    return nn.Sequential(*stage(3, 16, False), *stage(16, 32, True), *stage(32, 64, True), *stage(64, 64, False),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, num_classes))
