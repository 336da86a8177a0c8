"""`bdsan export`: verified ONNX / safetensors, exit codes and no partial files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bdsan.exporters.safetensors import export_safetensors
from bdsan.io.archs import build_arch
from bdsan.io.models import from_module, load_model
from bdsan.io.onnx_runtime import OnnxClassifier
from bdsan.io.preprocess import Preprocessing


def test_export_onnx_with_holdout_json_only_on_stdout(tmp_path, run_cli, poisoned_safetensors, holdout_npz,
                                                      toy_poisoned, capfd):
    out = tmp_path / "m.onnx"
    result = run_cli("export", poisoned_safetensors, "--out", out, "--holdout", holdout_npz, "--format", "json")
    assert result.code == 0, result.stderr
    report = result.json  # stdout is exactly one JSON document
    assert capfd.readouterr().out == ""  # the exporter printed nothing at the file-descriptor level either
    assert report["command"] == "export" and report["exit_code"] == 0
    assert [g["passed"] for g in report["gates"]] == [True, True]
    artifact = report["artifacts"][0]
    assert artifact["path"] == str(out) and artifact["bytes"] == out.stat().st_size
    parity = report["details"]["export"]["parity"]
    assert parity["n"] == 400 and parity["agreement"] == 1.0 and parity["inputs"] == "holdout"
    # the user's view: plain onnxruntime, normalise with the metadata, same predictions as PyTorch
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["bdsan.arch"] == "tiny_cnn" and meta["bdsan.preprocessing_baked"] == "false"
    pixels = toy_poisoned.holdout.x.float() / 255
    pre = toy_poisoned.model.preprocessing
    x = (pixels.numpy() - np.array(pre.mean, np.float32)[:, None, None]) / np.array(pre.std, np.float32)[:, None, None]
    onnx_pred = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)
    with torch.no_grad():
        assert (onnx_pred == toy_poisoned.model.normalized()(pixels).argmax(1).numpy()).all()


def test_bake_preprocessing_flag(tmp_path, run_cli, poisoned_safetensors):
    out = tmp_path / "baked.onnx"
    result = run_cli("export", poisoned_safetensors, "--out", out, "--bake-preprocessing", "--quiet")
    assert result.code == 0, result.stderr
    assert "gate export_parity_agreement: PASS" in result.stdout
    assert OnnxClassifier(out).baked


def test_parity_failure_exit_1_no_file(tmp_path, run_cli, poisoned_safetensors):
    out = tmp_path / "strict.onnx"
    result = run_cli("export", poisoned_safetensors, "--out", out, "--atol", "0", "--format", "json")
    assert result.code == 1
    assert "parity failed" in result.stderr and "no file written" in result.stderr
    report = result.json
    assert report["exit_code"] == 1 and report["artifacts"] == []
    assert not report["gates"][0]["passed"] and report["gates"][0]["value"] > 0
    assert list(tmp_path.iterdir()) == []


def test_safetensors_export_reloads_without_flags(tmp_path, run_cli, poisoned_safetensors, toy_poisoned):
    out = tmp_path / "copy.safetensors"
    result = run_cli("export", poisoned_safetensors, "--out", out, "--format", "json")
    assert result.code == 0, result.stderr
    assert result.json["details"]["export"]["parity"]["max_abs_diff"] == 0.0
    loaded = load_model(out)
    assert (loaded.arch, loaded.num_classes, loaded.preprocessing) == ("tiny_cnn", 5, toy_poisoned.model.preprocessing)


def test_unexportable_model_exit_3_with_reason_no_file(tmp_path, run_cli, capfd):
    spec = f"{Path(__file__).parents[1] / 'unexportable_arch.py'}:build"
    weights = export_safetensors(from_module(build_arch(spec, 3), spec, 3, Preprocessing(input_size=8)),
                                 tmp_path / "dd.safetensors")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli("export", weights, "--arch", spec, "--out", out_dir / "dd.onnx", "--format", "json")
    assert result.code == 3
    assert "cannot convert" in result.stderr and "data-dependent" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert capfd.readouterr().out == ""
    assert list(out_dir.iterdir()) == []


def test_slim_flag_reports_before_and_after(tmp_path, run_cli, toy_poisoned):
    import copy

    from torch import nn

    model = copy.deepcopy(toy_poisoned.model)
    conv = None
    for layer in model.module.modules():
        if isinstance(layer, nn.Conv2d):
            conv = layer
        elif isinstance(layer, nn.BatchNorm2d) and conv is not None:
            with torch.no_grad():
                conv.weight[:4] = 0
                layer.weight[:4] = 0
                layer.bias[:4] = 0
            conv = None
    weights = export_safetensors(model, tmp_path / "pruned.safetensors")
    result = run_cli("export", weights, "--out", tmp_path / "slim.onnx", "--slim", "--format", "json")
    assert result.code == 0, result.stderr
    slim = result.json["details"]["export"]["slim"]
    assert slim["channels_removed_total"] == 16
    assert slim["after"]["params"] < slim["before"]["params"]
    assert slim["after"]["onnx_bytes"] < slim["before"]["onnx_bytes"]


@pytest.mark.parametrize("args, code, message", [
    (["--out", "{tmp}/m.pt"], 2, "unknown export format"),
    (["--out", "{tmp}/exists.onnx"], 3, "already exists"),
    (["--out", "{tmp}/x.safetensors", "--slim"], 2, "ONNX exports only"),
])
def test_bad_outputs(tmp_path, run_cli, poisoned_safetensors, args, code, message):
    (tmp_path / "exists.onnx").write_bytes(b"keep")
    argv = [a.format(tmp=tmp_path) for a in args]
    result = run_cli("export", poisoned_safetensors, *argv)
    assert result.code == code and message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.onnx"]
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep"
