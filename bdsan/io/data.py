"""Holdout data (SPEC §2.3): uint8 NCHW tensors on the device, stratified seeded splits."""
from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import DataError
from .preprocess import Preprocessing

if TYPE_CHECKING:
    from .models import LoadedModel

log = logging.getLogger("bdsan")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# Pillow's own default (about 89 megapixels): larger images are refused as possible decompression bombs.
MAX_IMAGE_PIXELS = 89_478_485


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

    def to(self, device: torch.device) -> Holdout:
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def subset(self, index: torch.Tensor) -> Holdout:
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
        take = round(len(members) * fraction)
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


__all__ = ["Holdout", "Preprocessing", "check_holdout_matches", "holdout_from_arrays", "load_holdout",
           "split_holdout", "stratified_split", "to_float"]


def load_holdout(path: str | Path, device: torch.device | str = "cpu", split: str | None = None,
                 classes: list[str] | None = None, input_size: int | None = None) -> Holdout:
    """Load labelled images from an ImageFolder directory or an ``.npz`` (SPEC §2.3) onto ``device``.

    ImageFolder: one sub-folder per class, sorted names = labels unless ``classes`` gives the order; png/jpg/jpeg/webp
    found recursively. Unreadable images are skipped and listed in ``Holdout.skipped`` (and logged).
    ``.npz``: ``x`` N×H×W×C uint8 and ``y`` N integers (or ``x_<split>``/``y_<split>``), optional ``classes``.
    Images are resized to ``input_size``×``input_size`` only when ``input_size`` is given; without it, images of
    different sizes are an error. Fewer than two classes present is an error (ASR needs a source and a target).
    """
    path = Path(path)
    if isinstance(device, str):
        from ..device import resolve_device

        device = resolve_device(device)
    if not path.exists():
        raise DataError(f"holdout not found: {path}")
    if path.is_dir():
        holdout = _load_image_folder(path, classes, input_size, device)
    else:
        holdout = _load_npz(path, split, classes, input_size, device)
    _check_usable(holdout)
    return holdout


def _check_usable(holdout: Holdout) -> None:
    if len(holdout) == 0:
        skipped = f" ({len(holdout.skipped)} unreadable: {holdout.skipped[0]})" if holdout.skipped else ""
        raise DataError(f"holdout {holdout.path} has no images{skipped}")
    present = torch.unique(holdout.y).tolist()
    if len(present) < 2:
        name = holdout.classes[present[0]] if present[0] < len(holdout.classes) else present[0]
        raise DataError(f"holdout {holdout.path} has images of one class only ({name!r}): attack success rates need "
                        "at least two classes", hint="add clean images of the other classes")
    if int(holdout.y.min()) < 0:
        raise DataError(f"holdout {holdout.path}: negative labels")


# --- .npz -------------------------------------------------------------------------------------------------------

def _load_npz(path: Path, split: str | None, classes: list[str] | None, input_size: int | None,
              device: torch.device) -> Holdout:
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    if not hasattr(archive, "files"):
        raise DataError(f"{path}: a single .npy array, expected an .npz with x and y")
    with archive as data:
        x_key, y_key = ("x", "y") if split is None else (f"x_{split}", f"y_{split}")
        if x_key not in data.files or y_key not in data.files:
            splits = sorted({k[2:] for k in data.files if k.startswith("x_")})
            hint = f"pass --split {'|'.join(splits)}" if splits and split is None else \
                "expected keys x and y (or x_train/y_train, x_test/y_test with --split)"
            raise DataError(f"{path}: no {x_key!r}/{y_key!r} arrays (keys: {', '.join(data.files)})", hint=hint)
        try:
            x, y = data[x_key], data[y_key]
            names = [str(c) for c in data["classes"]] if "classes" in data.files else None
        except ValueError as exc:  # object arrays need pickle: refused
            raise DataError(f"{path}: {exc}") from None
    x, y = _validate_arrays(path, x, y)
    if classes is not None:
        names = list(classes)
    if names is not None and len(y) and int(y.max()) >= len(names):
        raise DataError(f"{path}: label {int(y.max())} but only {len(names)} class names")
    if input_size is not None:
        x = _resize_nhwc(x, input_size)
    return holdout_from_arrays(x, y, names, device, str(path))


def _validate_arrays(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8 (0–255), got {x.dtype}",
                        hint="convert with (x * 255).round().astype(np.uint8) if they are floats in [0, 1]")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{path}: images must be N×H×W×C, got shape {x.shape}")
    if x.shape[3] not in (1, 3) and x.shape[1] in (1, 3):
        raise DataError(f"{path}: images look N×C×H×W {x.shape}; bdsan reads N×H×W×C",
                        hint="np.transpose(x, (0, 2, 3, 1))")
    if x.shape[3] not in (1, 3):
        raise DataError(f"{path}: images must have 1 or 3 channels (N×H×W×C), got shape {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: labels must be a 1-D integer array, got {y.dtype} shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{path}: negative labels")
    return x, y


def _resize_nhwc(x: np.ndarray, size: int, batch: int = 512) -> np.ndarray:
    """Bilinear, antialiased resize of uint8 N×H×W×C to size×size (a no-op when already that size)."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    out = np.empty((len(x), size, size, x.shape[3]), dtype=np.uint8)
    for start in range(0, len(x), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(x[start:start + batch])).permute(0, 3, 1, 2).float()
        chunk = torch.nn.functional.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
        out[start:start + batch] = chunk.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


# --- ImageFolder ----------------------------------------------------------------------------------------------

def _load_image_folder(root: Path, classes: list[str] | None, input_size: int | None,
                       device: torch.device) -> Holdout:
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        if not folders:
            raise DataError(f"{root}: no class sub-folders", hint="ImageFolder layout: DIR/<class>/<image>.png")
        names = folders
    else:
        names = list(classes)
        absent = [c for c in names if c not in folders]
        if len(absent) == len(names):
            raise DataError(f"{root}: none of the --classes folders exist (found: {', '.join(folders[:10])})")
        if absent:
            log.warning("warning: no folder for class(es) %s in %s: they get no images", ", ".join(absent), root)
        ignored = [f for f in folders if f not in names]
        if ignored:
            log.warning("warning: ignoring folders not named in --classes: %s", ", ".join(ignored[:10]))
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(names):
        folder = root / name
        if folder.is_dir():
            found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            files.extend((p, label) for p in found)
    if not files:
        raise DataError(f"{root}: no images found (looked for {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} "
                        "in the class folders)")
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(lambda item: _decode(item[0], input_size), files))
    readable, labels, skipped = [], [], []
    for (file, label), (image, problem) in zip(files, decoded):
        if problem:
            skipped.append(f"{file}: {problem}")
        else:
            readable.append((file, image))
            labels.append(label)
    if skipped:
        log.warning("warning: skipped %d unreadable image(s) in %s, e.g. %s", len(skipped), root, skipped[0])
    if not readable:
        return Holdout(torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), names,
                       str(root), skipped)
    sizes = Counter(image.shape[:2] for _, image in readable)
    if len(sizes) > 1:
        (common, n_common), (other, _) = sizes.most_common(2)
        example = next(file for file, image in readable if image.shape[:2] == other)
        raise DataError(f"{root}: images differ in size ({n_common} are {common[0]}×{common[1]}, but e.g. {example} "
                        f"is {other[0]}×{other[1]})", hint="pass --input-size N to resize them all to N×N")
    images = [image for _, image in readable]
    x = np.stack(images)
    return replace(holdout_from_arrays(x, np.asarray(labels, dtype=np.int64), names, device, str(root)),
                   skipped=skipped)


def _decode(file: Path, input_size: int | None) -> tuple[np.ndarray | None, str | None]:
    """One image as H×W×3 uint8, or the reason it could not be read. Pillow's bomb check stays on."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                if image.width * image.height > (Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS):
                    return None, f"{image.width}×{image.height} pixels exceeds the decompression-bomb limit"
                rgb = image.convert("RGB")
        if input_size is not None and rgb.size != (input_size, input_size):
            rgb = rgb.resize((input_size, input_size), Image.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"decompression-bomb limit: {exc}"
    except Exception as exc:  # noqa: BLE001 — Pillow raises OSError, SyntaxError, ValueError… for bad files
        return None, f"unreadable image ({type(exc).__name__}: {exc})"


# --- holdout vs model -----------------------------------------------------------------------------------------

def check_holdout_matches(model: LoadedModel, holdout: Holdout) -> Holdout:
    """Refuse a holdout the model cannot be measured on; return it with labels in the model's class order.

    Class names from folders are mapped onto the model's class names when the model has them; numeric labels
    (an ``.npz`` without names) may cover fewer classes than the model. Image size must equal the model's
    ``input_size`` when that is known, and channels must match the first convolution.
    """
    n_model = model.num_classes
    numeric = holdout.classes == [str(i) for i in range(len(holdout.classes))]
    if model.classes and not numeric and holdout.classes != model.classes and \
            set(holdout.classes) <= set(model.classes):
        mapping = torch.tensor([model.classes.index(c) for c in holdout.classes], device=holdout.y.device)
        holdout = replace(holdout, y=mapping[holdout.y], classes=list(model.classes))
    max_label = int(holdout.y.max()) if len(holdout) else -1
    if max_label >= n_model:
        raise DataError(f"holdout {holdout.path} has label {max_label} but the model has {n_model} classes",
                        hint="check --num-classes, or that the holdout belongs to this model")
    if len(holdout.classes) != n_model:
        if numeric and len(holdout.classes) < n_model:
            names = model.classes or [str(i) for i in range(n_model)]
            holdout = replace(holdout, classes=list(names))
        else:
            raise DataError(f"holdout {holdout.path} has {len(holdout.classes)} classes "
                            f"({', '.join(holdout.classes[:6])}{' …' if len(holdout.classes) > 6 else ''}) but the "
                            f"model has {n_model}",
                            hint="pass --classes with all class names in the model's label order")
    size = model.preprocessing.input_size
    if size and holdout.image_size != (size, size):
        height, width = holdout.image_size
        raise DataError(f"holdout images are {height}×{width} but the model expects {size}×{size}",
                        hint=f"pass --input-size {size} to resize them")
    channels = _input_channels(model)
    if channels and channels != holdout.x.shape[1]:
        raise DataError(f"holdout images have {holdout.x.shape[1]} channel(s) but the model takes {channels}")
    return holdout


def _input_channels(model: LoadedModel) -> int | None:
    """Input channels of the first convolution, when there is one."""
    if model.module is None:
        return None
    first = next((m for m in model.module.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return int(first.in_channels) if first is not None else None
