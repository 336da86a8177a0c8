"""Preprocessing (SPEC §2.4): models see ``(x - mean) / std`` of [0,1] pixels."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


@dataclass(frozen=True)
class Preprocessing:
    """Per-channel normalisation and the input size the model expects (None = as given)."""

    mean: tuple[float, ...] = PRESETS["none"][0]
    std: tuple[float, ...] = PRESETS["none"][1]
    input_size: int | None = None

    @classmethod
    def preset(cls, name: str, input_size: int | None = None) -> Preprocessing:
        mean, std = PRESETS[name]
        return cls(mean, std, input_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        size = data.get("input_size")
        return cls(tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),
                   int(size) if size not in (None, "", "None") else None)


class Normalized(nn.Module):
    """Wraps a classifier so it takes [0,1] pixels: triggers are stamped before normalisation."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)
