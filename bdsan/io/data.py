"""Holdout data (SPEC §2.3): uint8 NCHW tensors on the device, stratified seeded splits."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import DataError
from .preprocess import Preprocessing


@dataclass
class Holdout:
    """Clean labelled images the defender trusts: ``x`` uint8 N×C×H×W and ``y`` int64 N, on one device."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    path: str = ""
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise DataError(f"holdout images must be uint8 N×C×H×W, got {tuple(self.x.shape)} {self.x.dtype}")
        if len(self.x) != len(self.y):
            raise DataError(f"{len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x.shape[2]), int(self.x.shape[3])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: torch.device) -> "Holdout":
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def subset(self, index: torch.Tensor) -> "Holdout":
        index = index.to(self.x.device)
        return replace(self, x=self.x[index], y=self.y[index])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=self.num_classes).tolist()

    def float_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """[0,1] float batches in order, converted one batch at a time."""
        for start in range(0, len(self), batch_size):
            yield to_float(self.x[start:start + batch_size]), self.y[start:start + batch_size]


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float [0,1]."""
    return x_uint8.float().div_(255.0)


def stratified_split(y: torch.Tensor, fraction: float, seed: int, num_classes: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (first, second) with ``fraction`` of every class in ``first``; seeded, order shuffled.

    Every class with at least two images keeps at least one on each side.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = y.cpu()
    num_classes = num_classes or int(labels.max()) + 1
    first, second = [], []
    for cls in range(num_classes):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        take = int(round(len(members) * fraction))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        first.append(members[:take])
        second.append(members[take:])
    first_index, second_index = torch.cat(first), torch.cat(second)
    first_index = first_index[torch.randperm(len(first_index), generator=generator)]
    second_index = second_index[torch.randperm(len(second_index), generator=generator)]
    return first_index, second_index


def split_holdout(holdout: Holdout, fit_fraction: float = 0.5, seed: int = 0) -> tuple[Holdout, Holdout]:
    """The fit split (defenses train and rank on it) and the verify split (only audits read it)."""
    fit_index, verify_index = stratified_split(holdout.y, fit_fraction, seed, holdout.num_classes)
    return holdout.subset(fit_index), holdout.subset(verify_index)


def holdout_from_arrays(x_nhwc: np.ndarray, y: np.ndarray, classes: list[str] | None = None,
                        device: torch.device | str = "cpu", path: str = "") -> Holdout:
    """Build a Holdout from N×H×W×C uint8 and N integer labels."""
    if x_nhwc.dtype != np.uint8 or x_nhwc.ndim != 4:
        raise DataError(f"images must be uint8 N×H×W×C, got {x_nhwc.shape} {x_nhwc.dtype}")
    y_tensor = torch.as_tensor(np.asarray(y).astype(np.int64))
    num_classes = len(classes) if classes else int(y_tensor.max()) + 1 if len(y_tensor) else 0
    x_tensor = torch.from_numpy(np.ascontiguousarray(x_nhwc)).permute(0, 3, 1, 2).contiguous()
    return Holdout(x_tensor.to(device), y_tensor.to(device),
                   list(classes) if classes else [str(i) for i in range(num_classes)], path)


__all__ = ["Holdout", "Preprocessing", "holdout_from_arrays", "split_holdout", "stratified_split", "to_float"]


def load_holdout(path: str | "Path", device: torch.device | str = "cpu", split: str | None = None,
                 classes: list[str] | None = None, input_size: int | None = None) -> Holdout:
    """Load a holdout from an ``.npz`` (``x``/``y`` or ``x_<split>``/``y_<split>``) or an ImageFolder directory.

    Minimal version: ``.npz`` only. (Issue 2 completes ImageFolder, resizing and validation.)
    """
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise DataError(f"holdout not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        x_key, y_key = ("x", "y") if split is None else (f"x_{split}", f"y_{split}")
        x, y = data[x_key], data[y_key]
        names = [str(c) for c in data["classes"]] if "classes" in data.files else None
    return holdout_from_arrays(x, y, classes or names, device, str(path))
