"""safetensors export: self-describing metadata that load_model reads back with no flags."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from bdsan.errors import GateFailed, OutputError
from bdsan.exporters.safetensors import export_safetensors, export_safetensors_verified
from bdsan.io.models import load_model


def test_metadata_round_trips_through_load_model(tmp_path, toy_poisoned):
    out = export_safetensors(toy_poisoned.model, tmp_path / "m.safetensors")
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["bdsan.arch"] == "tiny_cnn" and meta["bdsan.num_classes"] == "5"
    assert json.loads(meta["mean"]) == list(toy_poisoned.model.preprocessing.mean)
    assert json.loads(meta["std"]) == list(toy_poisoned.model.preprocessing.std)
    assert meta["input_size"] == "32" and meta["bdsan.version"] and "bdsan.source_sha256" in meta
    loaded = load_model(out)  # no flags
    assert (loaded.arch, loaded.num_classes) == ("tiny_cnn", 5)
    assert loaded.preprocessing == toy_poisoned.model.preprocessing
    assert loaded.classes == toy_poisoned.model.classes
    pixels = toy_poisoned.holdout.x[:20].float() / 255
    with torch.no_grad():
        assert torch.equal(loaded.normalized()(pixels), toy_poisoned.model.normalized()(pixels))


def test_verified_export_reports_parity(tmp_path, toy_poisoned):
    out = tmp_path / "v.safetensors"
    artifact = export_safetensors_verified(toy_poisoned.model, out, holdout=toy_poisoned.holdout)
    assert artifact["parity"]["passed"] and artifact["parity"]["max_abs_diff"] == 0.0
    assert artifact["parity"]["n"] == 400 and artifact["bytes"] == out.stat().st_size
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]


def test_reload_mismatch_leaves_no_file(tmp_path, toy_poisoned, monkeypatch):
    from bdsan.io import models

    real = models.load_model

    def wrong_classes(path, *args, **kwargs):
        loaded = real(path, *args, **kwargs)
        loaded.classes = ["a", "b", "c", "d", "e"]
        return loaded

    monkeypatch.setattr(models, "load_model", wrong_classes)
    with pytest.raises(GateFailed, match="does not reload"):
        export_safetensors_verified(toy_poisoned.model, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_the_input(poisoned_safetensors):
    model = load_model(poisoned_safetensors)
    before = poisoned_safetensors.read_bytes()
    with pytest.raises(OutputError):
        export_safetensors_verified(model, poisoned_safetensors)
    assert poisoned_safetensors.read_bytes() == before
