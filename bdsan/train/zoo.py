"""The backdoored-model zoo shared by the benchmarks and the demo: poison a dataset with a suite trigger,
train a model fast, cache it by a hash of everything that determines its weights, and measure CA/ASR/RA with the
attack's own trigger on held-out test images (SPEC §4 conventions: target-class images excluded from ASR/RA).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_dir
from ..device import cpu_supports_bf16
from ..errors import DataError, UsageError
from ..io.archs import build_arch
from ..io.data import Holdout, stratified_split
from ..io.models import LoadedModel, from_module, load_model
from ..io.preprocess import Preprocessing
from .loop import Progress, predict, train_classifier
from .poison import POISON_MODES, poison_arrays, poisoned_labels
from .synthetic import make_synthetic

log = logging.getLogger("bdsan.train")

# Bump when poisoning or training code changes in a way that changes the weights: old cache entries are ignored.
ZOO_VERSION = 1


@dataclass(frozen=True)
class Attack:
    """A poisoning attack: a suite trigger (ALGORITHMS §5) with optional parameter overrides, rate, target, mode."""

    trigger: str
    rate: float = 0.1
    target: int = 0
    mode: str = "all2one"
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.mode not in POISON_MODES:
            raise UsageError(f"attack {self.trigger}: mode {self.mode!r} is not one of {', '.join(POISON_MODES)}")
        if not 0 <= self.rate < 1:
            raise UsageError(f"attack {self.trigger}: poison rate must be in [0, 1), got {self.rate} "
                             "(0 trains a clean twin)")

    @classmethod
    def parse(cls, text: str, rate: float = 0.1, target: int = 0, mode: str = "all2one") -> Attack:
        """``name[:mode][:key=value,...]``, e.g. ``sig:clean_label`` or ``blend_noise:alpha=0.3``."""
        name, *parts = text.strip().split(":")
        params: dict[str, Any] = {}
        for part in parts:
            if part in POISON_MODES:
                mode = part
                continue
            for pair in filter(None, part.split(",")):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise UsageError(f"attack {text!r}: expected mode or key=value, got {pair!r}")
                params[key.strip()] = _number(value.strip())
        return cls(name, rate, target, mode, tuple(sorted(params.items())))

    @property
    def label(self) -> str:
        """Short name for tables: the trigger, plus the mode and overrides when not default."""
        extras = ([] if self.mode == "all2one" else [self.mode]) + [f"{k}={v}" for k, v in self.params]
        if self.rate == 0:
            extras = ["clean twin"] + extras
        return self.trigger + (f" ({', '.join(extras)})" if extras else "")

    def build_trigger(self):
        from ..detectors.triggers import get_trigger

        return get_trigger(self.trigger, **dict(self.params))

    def to_dict(self) -> dict:
        return {"trigger": self.trigger, "rate": self.rate, "target": self.target, "mode": self.mode,
                "params": dict(self.params)}


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class Recipe:
    """How to train: architecture and optimiser settings (one-cycle SGD over device-resident uint8 data).

    ``precision="fast"``: bf16 autocast on CUDA, and on CPUs that run bf16 natively; fp32 elsewhere.
    ``augment``: ``True`` random crop + horizontal flip, ``"crop"`` the crop only (datasets whose classes come in
    mirror-image pairs, as GTSRB's keep-left / keep-right: BackdoorBench flips CIFAR-10 only), ``False`` neither.
    """

    arch: str
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: bool | str = True
    precision: str = "fast"

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision != "fast":
            return self.precision
        return "bf16" if device.type == "cuda" or cpu_supports_bf16() else "fp32"


# run.py / probe.py --augment: the recipe's ``augment`` value for each name
AUGMENTS: dict[str, bool | str] = {"crop+flip": True, "crop": "crop"}

RECIPES: dict[str, Recipe] = {
    # tiny_cnn on generated gratings: seconds on a CPU (tests, demo).
    "toy": Recipe("tiny_cnn", epochs=12, lr=0.1, batch_size=64, augment=False, precision="fp32"),
    # small_resnet on a CIFAR-10 subset: 20k images × 10 epochs ≈ 3 min on 2 AVX512-BF16 cores, CA ≈ 75%
    # (BENCHMARKS.md CPU tables; 6k × 8 epochs gave 53% CA and failed to implant badnets_grid).
    "cpu": Recipe("small_resnet", epochs=10, lr=0.2, batch_size=256),
    # Paper scale: cifar_resnet18 on full CIFAR-10, bf16 + channels_last on one GPU (SPEC §6: ≥ 92% CA ≤ 3 min on an
    # H100 — not measured yet, no GPU was available when this recipe was written).
    "paper": Recipe("cifar_resnet18", epochs=20, lr=0.2, batch_size=512, label_smoothing=0.1),
}


def recipe_with(name: str, epochs: int | None = None, augment: str | None = None) -> Recipe:
    """``RECIPES[name]`` with the benchmarks' ``--epochs`` / ``--augment`` (an ``AUGMENTS`` name) overrides, if given."""
    overrides = {"epochs": epochs, "augment": AUGMENTS.get(augment) if augment else None}
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class Dataset:
    """An image-classification dataset as uint8 N×C×H×W tensors (train and test), with an identity for caching."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_dataset(path: str | Path) -> Dataset:
    """A benchmark ``.npz`` with ``x_train/y_train/x_test/y_test`` (N×H×W×C uint8) and optional ``classes``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(data.files)
        if missing:
            raise DataError(f"{path}: missing keys {', '.join(sorted(missing))}")

        def images(key: str) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(data[key])).permute(0, 3, 1, 2).contiguous()

        x_train, x_test = images("x_train"), images("x_test")
        y_train = torch.from_numpy(data["y_train"].astype(np.int64))
        y_test = torch.from_numpy(data["y_test"].astype(np.int64))
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        classes = [str(c) for c in data["classes"]] if "classes" in data.files else [str(i) for i in range(num_classes)]
    return Dataset(path.stem, x_train, y_train, x_test, y_test, classes, _sha256(path))


def synthetic_dataset(n_train: int = 1000, n_test: int = 500, num_classes: int = 5, size: int = 32,
                      seed: int = 0) -> Dataset:
    """Generated gratings (``make_synthetic``); the test split comes from a different generator seed."""
    x_train, y_train = make_synthetic(n_train, num_classes, size, seed=seed)
    x_test, y_test = make_synthetic(n_test, num_classes, size, seed=seed + 1000)
    fingerprint = f"synthetic-{n_train}-{n_test}-{num_classes}-{size}-{seed}"
    return Dataset("synthetic", x_train, y_train, x_test, y_test, [f"class{i}" for i in range(num_classes)],
                   fingerprint)


@dataclass
class Backdoored:
    """A trained backdoored model with the clean holdout carved out of its training subset (never poisoned)."""

    model: LoadedModel
    holdout: Holdout
    attack: Attack
    recipe: Recipe
    key: str
    config: dict
    train_seconds: float
    poisoned: int
    from_cache: bool
    details: dict = field(default_factory=dict)


def split_training_subset(data: Dataset, n_train: int | None, holdout_fraction: float, seed: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, holdout indices): a seeded ``n_train`` subset of the training split, then a stratified
    ``holdout_fraction`` of it set aside as the defender's clean data."""
    total = len(data.y_train)
    n_train = total if n_train is None or n_train <= 0 else min(n_train, total)
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(total, generator=generator)[:n_train]
    holdout_pos, train_pos = stratified_split(data.y_train[subset], holdout_fraction, seed, data.num_classes)
    return subset[train_pos], subset[holdout_pos]


def channel_stats(x_uint8: torch.Tensor) -> Preprocessing:
    """Per-channel mean/std of the clean training images, rounded to 4 decimals (the model's normalisation)."""
    x = x_uint8.float().div(255)
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return Preprocessing(tuple(round(v, 4) for v in mean), tuple(round(v, 4) for v in std), None)


def config_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def train_backdoored(data: Dataset, attack: Attack, recipe: Recipe, *, n_train: int | None = None,
                     holdout_fraction: float = 0.05, seed: int = 0, device: torch.device | str = "cpu",
                     cache_dir: str | Path | None = None, progress: Progress | None = None,
                     trap: dict | None = None) -> Backdoored:
    """Poison the training subset (minus the holdout) with ``attack``, train ``recipe`` on it, cache the result.

    The cache key covers the dataset fingerprint, attack, recipe (with the precision actually used), subset size,
    holdout fraction, seed and ``ZOO_VERSION``; a hit loads the weights instead of training.
    ``trap``: train with Trap and Replace's stage 1 instead (``bdsan.train.trap``; these ``TrapSettings`` fields
    over the recipe's one-cycle SGD, epochs, learning rate and batch), on the same poisoned data; part of the key.
    """
    device = torch.device(device)
    if attack.target >= data.num_classes:
        raise UsageError(f"target {attack.target} is not a class of {data.name} ({data.num_classes} classes)")
    train_index, holdout_index = split_training_subset(data, n_train, holdout_fraction, seed)
    x_clean, y_clean = data.x_train[train_index], data.y_train[train_index]
    preprocessing = channel_stats(x_clean)
    precision = recipe.resolved_precision(device)
    config = {"zoo_version": ZOO_VERSION, "dataset": data.fingerprint, "attack": attack.to_dict(),
              "recipe": {**dataclasses.asdict(recipe), "precision": precision}, "n_train": len(train_index),
              "holdout": len(holdout_index), "holdout_fraction": holdout_fraction, "seed": seed}
    if trap is not None:
        config["trap"] = dict(sorted(trap.items()))
    key = config_key(config)
    holdout = Holdout(data.x_train[holdout_index].to(device), data.y_train[holdout_index].to(device),
                      list(data.classes), f"{data.name}:train-holdout")
    entry = Path(cache_dir) / key if cache_dir else None
    if entry is not None and (entry / "model.safetensors").is_file() and (entry / "meta.json").is_file():
        meta = json.loads((entry / "meta.json").read_text())
        model = load_model(entry / "model.safetensors")
        model.module.to(device)
        log.info("zoo: %s from cache %s", attack.label, entry)
        return Backdoored(model, holdout, attack, recipe, key, config, meta["train_seconds"], meta["poisoned"], True,
                          meta.get("details", {}))

    x_poisoned, y_poisoned, mask = poison_arrays(x_clean, y_clean, attack.build_trigger(), attack.rate,
                                                 attack.target, seed=seed, mode=attack.mode,
                                                 num_classes=data.num_classes)
    torch.manual_seed(seed)
    module = build_arch(recipe.arch, data.num_classes)
    model = from_module(module, recipe.arch, data.num_classes, preprocessing, list(data.classes))
    network = model.normalized().to(device)
    if device.type == "cuda" or precision == "bf16":
        network = network.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    details: dict = {"precision": precision}
    if trap is not None:
        from .trap import TrapSettings, train_trap

        settings = TrapSettings(**{"epochs": recipe.epochs, "optimizer": "sgd", "lr": recipe.lr,
                                   "batch_size": recipe.batch_size, "weight_decay": recipe.weight_decay,
                                   "label_smoothing": recipe.label_smoothing, "augment": recipe.augment,
                                   "precision": precision, "seed": seed, **trap})
        trapped = train_trap(network, x_poisoned.to(device), y_poisoned.to(device), settings,
                             progress=(lambda done, total, _: progress(done, total)) if progress else None)
        details["trap"] = {k: v for k, v in trapped.details().items() if k != "epochs"} | {
            "last_epoch": trapped.log[-1]}
    else:
        train_classifier(network, x_poisoned.to(device), y_poisoned.to(device), epochs=recipe.epochs, lr=recipe.lr,
                         batch_size=recipe.batch_size, weight_decay=recipe.weight_decay,
                         label_smoothing=recipe.label_smoothing, augment=recipe.augment, seed=seed,
                         precision=precision, progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start
    module.to(memory_format=torch.contiguous_format).eval()
    result = Backdoored(model, holdout, attack, recipe, key, config, train_seconds, int(mask.sum()), False, details)
    if entry is not None:
        _store(result, entry)
    return result


def _store(result: Backdoored, entry: Path) -> None:
    from ..exporters.safetensors import export_safetensors

    entry.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(entry, force=True) as tmp:
        export_safetensors(result.model, tmp / "model.safetensors")
        meta = {"config": result.config, "train_seconds": result.train_seconds, "poisoned": result.poisoned,
                "details": result.details}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


@torch.no_grad()
def attack_metrics(network: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, attack: Attack,
                   num_classes: int, batch_size: int = 512, trigger=None) -> dict:
    """CA on clean images; ASR and RA with the attack's own trigger (SPEC §4); ``untriggered``: the same ASR count
    on the images *without* the trigger (the rate no defense can go below by removing the trigger's effect alone);
    ``target_recall``: clean accuracy on the target class's own images (a defense that simply stops predicting the
    target would score ASR 0 and lose only that class's share of CA).

    all2one / clean_label: over images whose true label is not the target; ASR = predicted target, RA = predicted
    true label. all2all: over all images, ASR = predicted ``(y + 1) mod K``.
    """
    trigger = trigger or attack.build_trigger()
    device = next(network.parameters()).device
    y = y.to(device)
    clean_pred = predict(network, x_uint8, batch_size)
    keep = torch.ones_like(y, dtype=torch.bool) if attack.mode == "all2all" else y != attack.target
    triggered_pred = predict(network, x_uint8[keep.to(x_uint8.device)], batch_size, transform=trigger)
    wanted = poisoned_labels(y[keep], attack.target, attack.mode, num_classes)

    def ratio(hits: torch.Tensor) -> float:
        return hits.float().mean().item() if len(hits) else math.nan

    return {"ca": ratio(clean_pred == y), "asr": ratio(triggered_pred == wanted), "ra": ratio(triggered_pred == y[keep]),
            "untriggered": ratio(clean_pred[keep] == wanted), "n_clean": len(y), "n_triggered": int(keep.sum()),
            "target_recall": ratio(clean_pred[~keep] == attack.target), "n_target": int((~keep).sum())}
