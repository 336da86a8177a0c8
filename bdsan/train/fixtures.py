"""A tiny backdoored (or clean) model on generated data, in seconds on a CPU: tests and the demo share it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..io.archs import build_arch
from ..io.data import Holdout
from ..io.models import LoadedModel, from_module
from ..io.preprocess import Preprocessing
from .loop import train_classifier
from .poison import poison_arrays
from .synthetic import make_synthetic

TOY_PREPROCESSING = Preprocessing((0.3, 0.3, 0.3), (0.25, 0.25, 0.25), 32)


def corner_square(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """The planted toy trigger: a white ``size``×``size`` square in the bottom-right corner."""
    x = x.clone()
    x[:, :, -size:, -size:] = 1.0
    return x


def top_left_patch(x: torch.Tensor) -> torch.Tensor:
    """4×4 random saturated colours in the top-left corner: not in the suite (ALGORITHMS §5), far from its patches."""
    colours = (torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(5)) > 0.5).float().to(x)
    x = x.clone()
    x[:, :, :4, :4] = colours
    return x


@dataclass
class ToyModel:
    model: LoadedModel
    holdout: Holdout
    poisoned: bool


def train_toy_model(poison_rate: float = 0.1, target: int = 0, num_classes: int = 5, n_train: int = 1000,
                    n_holdout: int = 400, epochs: int = 12, seed: int = 0, trigger=corner_square) -> ToyModel:
    """Train ``tiny_cnn`` on generated gratings, ``poison_rate`` of it stamped with ``trigger`` → ``target``.

    The holdout comes from a different generator seed and is never poisoned.
    """
    x, y = make_synthetic(n_train, num_classes, 32, seed=seed)
    if poison_rate > 0:
        x, y, _ = poison_arrays(x, y, trigger, poison_rate, target, seed=seed)
    torch.manual_seed(seed)
    module = build_arch("tiny_cnn", num_classes)
    loaded = from_module(module, "tiny_cnn", num_classes, TOY_PREPROCESSING, [f"class{i}" for i in range(num_classes)])
    train_classifier(loaded.normalized(), x, y, epochs=epochs, lr=0.1, batch_size=64, augment=False, seed=seed)
    module.eval()
    hx, hy = make_synthetic(n_holdout, num_classes, 32, seed=seed + 1000)
    holdout = Holdout(hx, hy, list(loaded.classes), "synthetic")
    return ToyModel(loaded, holdout, poison_rate > 0)
