"""Shared fixtures: a tiny CNN backdoored with a 3×3 white corner square (10% poison → class 0), a clean twin,
and their files on disk. Trained once per test session, in seconds."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bdsan.allocator import keep_freed_memory
from bdsan.exporters.safetensors import export_safetensors
from bdsan.train.fixtures import corner_square, train_toy_model

torch.set_num_threads(min(2, torch.get_num_threads()))
keep_freed_memory()  # as the CLI does: the suite runs as the product would


@pytest.fixture
def stamped_shares(monkeypatch):
    """``record(module)`` → a list that collects every share of a batch ``module`` stamps: the share passed to its
    ``stamp_leading`` (training batches) and to its ``stamped_like_training`` (BatchNorm re-estimation batches)."""
    def record(module) -> list:
        shares = []

        def recording(real, position: int):  # position: where the function takes the stamped share
            def recorded(*args, **kwargs):
                shares.append(args[position])
                return real(*args, **kwargs)
            return recorded

        monkeypatch.setattr(module, "stamp_leading", recording(module.stamp_leading, 2))
        monkeypatch.setattr(module, "stamped_like_training", recording(module.stamped_like_training, 1))
        return shares
    return record


@pytest.fixture(scope="session")
def toy_poisoned():
    """ToyModel: ``.model`` (LoadedModel, tiny_cnn, 5 classes), ``.holdout`` (400 clean images)."""
    return train_toy_model(poison_rate=0.1, seed=0)


@pytest.fixture(scope="session")
def toy_clean():
    return train_toy_model(poison_rate=0.0, seed=0)


@pytest.fixture
def poisoned_model(toy_poisoned):
    """A fresh copy of the poisoned LoadedModel that a test may modify."""
    return copy.deepcopy(toy_poisoned.model)


@pytest.fixture(scope="session")
def trigger():
    return corner_square


def _write_holdout_npz(path, holdout):
    np.savez(path, x=holdout.x.permute(0, 2, 3, 1).cpu().numpy(), y=holdout.y.cpu().numpy())
    return path


@pytest.fixture(scope="session")
def holdout_npz(tmp_path_factory, toy_poisoned):
    """The clean holdout as ``.npz`` (x: N×H×W×C uint8, y: N)."""
    return _write_holdout_npz(tmp_path_factory.mktemp("data") / "holdout.npz", toy_poisoned.holdout)


@pytest.fixture(scope="session")
def poisoned_safetensors(tmp_path_factory, toy_poisoned):
    """The poisoned model as a self-describing safetensors file (no --arch needed)."""
    return export_safetensors(toy_poisoned.model, tmp_path_factory.mktemp("models") / "poisoned.safetensors")


@pytest.fixture(scope="session")
def clean_safetensors(tmp_path_factory, toy_clean):
    return export_safetensors(toy_clean.model, tmp_path_factory.mktemp("models") / "clean.safetensors")
