"""An architecture torch.export cannot trace (Python control flow on a tensor value), loadable as `--arch FILE:build`."""
from __future__ import annotations

from torch import nn


class DataDependent(nn.Module):
    """Branches on the sum of its logits: no static graph exists."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, num_classes)

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        if logits.sum() > 0:
            return logits
        return -logits


def build(num_classes: int = 10) -> DataDependent:
    return DataDependent(num_classes)
