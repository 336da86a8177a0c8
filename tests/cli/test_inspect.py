"""``bdsan inspect`` end to end through ``main()`` (real exit codes): the README's three models and every bad input."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bdsan.io.archs import build_arch


class CreatesFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def assert_refused(result, *fragments, code=3):
    """Exit ``code``, one ``error:`` line naming every fragment, no traceback."""
    assert result.code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in torchvision.models.resnet18(num_classes=10).state_dict().items()},
              str(path))
    return path


@pytest.fixture(scope="module")
def preact_files(tmp_path_factory):
    """BackdoorBench layout: a DataParallel state dict and an attack_result.pt-style bundle."""
    root = tmp_path_factory.mktemp("bb")
    state = {f"module.{k}": v for k, v in build_arch("preact_resnet18", 10).state_dict().items()}
    torch.save(state, root / "preact.pth")
    torch.save({"model_name": "preact", "num_classes": 10, "model": state}, root / "attack_result.pt")
    return root / "preact.pth", root / "attack_result.pt"


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.safetensors"
    save_file(build_arch("tiny_cnn", 3).state_dict(), str(path))
    return path


# --- the README's three models ------------------------------------------------------------------------------------

def test_torchvision_resnet18(run_cli, resnet18_file):
    result = run_cli("inspect", resnet18_file, "--arch", "resnet18")
    assert result.code == 0, result.output
    assert "resnet18" in result.stdout and "11,181,642" in result.stdout and "loads OK" in result.stdout
    data = run_cli("inspect", resnet18_file, "--arch", "resnet18", "--format", "json").json
    info = data["details"]["inspect"]
    assert (info["format"], info["num_classes"], info["params"], info["safe"]) == ("safetensors", 10, 11181642, True)
    assert data["model"]["sha256"] == info["sha256"] and len(info["sha256"]) == 64


def test_backdoorbench_preact_state_dict_and_bundle(run_cli, preact_files):
    state_path, bundle_path = preact_files
    result = run_cli("inspect", state_path, "--arch", "preact_resnet18", "--preset", "cifar10")
    assert result.code == 0, result.output
    assert "preact_resnet18" in result.stdout and "11,171,146" in result.stdout
    assert "mean 0.4914" in result.stdout
    bundle = run_cli("inspect", bundle_path, "--format", "json").json["details"]["inspect"]
    assert (bundle["format"], bundle["arch"], bundle["num_classes"], bundle["loaded"]) == \
        ("backdoorbench", "preact_resnet18", 10, True)


def test_state_dict_without_arch_is_described_but_not_loaded(run_cli, preact_files):
    result = run_cli("inspect", preact_files[0])
    assert result.code == 0
    assert "no architecture known: pass --arch" in result.stdout
    assert "classes       10" in result.stdout


def test_user_factory(run_cli, tmp_path):
    (tmp_path / "my_arch.py").write_text(
        "from torch import nn\n\n\n"
        "def build(num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(4, num_classes))\n")
    module = build_arch(f"{tmp_path / 'my_arch.py'}:build", 5)
    torch.save({"state_dict": module.state_dict()}, tmp_path / "mine.pt")
    old = os.getcwd()
    os.chdir(tmp_path)  # as a user would type it: relative to the current directory
    try:
        result = run_cli("inspect", "mine.pt", "--arch", "my_arch.py:build", "--format", "json")
    finally:
        os.chdir(old)
    assert result.code == 0, result.output
    info = result.json["details"]["inspect"]
    assert (info["arch"], info["num_classes"], info["params"]) == ("my_arch.py:build", 5, 4 * 27 + 4 + 4 * 5 + 5)


def test_json_goes_alone_to_stdout_and_o_writes_the_report(run_cli, small_file, tmp_path):
    report = tmp_path / "inspect.json"
    result = run_cli("inspect", small_file, "--arch", "tiny_cnn", "--format", "json", "-o", report)
    assert result.code == 0
    assert json.loads(result.stdout)["schema"] == "bdsan.report/1"
    assert json.loads(report.read_text())["details"]["inspect"]["arch"] == "tiny_cnn"
    assert "mean 0 / std 1" in result.stderr or "mean 0 / std 1" in report.read_text()


# --- unsafe files -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["torch_zip", "raw_pickle"])
def test_pickle_that_would_create_a_file(run_cli, tmp_path, form):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    payload = {"state_dict": build_arch("tiny_cnn", 3).state_dict(), "x": CreatesFile(marker)}
    if form == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    result = run_cli("inspect", path, "--arch", "tiny_cnn")
    assert_refused(result, "open", "--trust-code")
    assert "REFUSED" in result.stdout
    data = run_cli("inspect", path, "--format", "json")
    assert data.code == 3 and data.json["details"]["inspect"]["safe"] is False
    assert not marker.exists()


def test_trust_code_loads_torchscript_with_a_warning(run_cli, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.trace(build_arch("tiny_cnn", 3).eval(), torch.rand(1, 3, 32, 32)).save(str(path))
    assert_refused(run_cli("inspect", path), "TorchScript", "--trust-code")
    result = run_cli("inspect", path, "--trust-code", "--format", "json")
    assert result.code == 0
    data = result.json
    assert data["details"]["inspect"]["loaded"] and any("--trust-code" in w for w in data["warnings"])


# --- bad model inputs: exit 3, one message, nothing written ---------------------------------------------------------

def _truncated(tmp_path, small_file):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(small_file.read_bytes()[:300])
    return path


def _garbage(tmp_path, _small_file):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(bytes(range(256)) * 8)
    return path


@pytest.mark.parametrize("make, args, fragments", [
    (_truncated, ["--arch", "tiny_cnn"], ["truncated"]),
    (_garbage, [], ["not a recognised model format"]),
    (lambda tmp_path, _: tmp_path, [], ["is a directory"]),
    (lambda tmp_path, _: tmp_path / "missing.pt", [], ["not found"]),
    (lambda _, small: small, ["--arch", "small_resnet"], ["do not fit architecture 'small_resnet'", "missing"]),
    (lambda _, small: small, ["--arch", "tiny_cnn", "--num-classes", "7"], ["shape mismatch"]),
    (lambda _, small: small, ["--arch", "nonexistent_net"], ["unknown architecture"]),
])
def test_bad_model_inputs(run_cli, tmp_path, small_file, make, args, fragments):
    out = tmp_path / "outdir"
    out.mkdir()
    result = run_cli("inspect", make(tmp_path, small_file), *args, "-o", out / "report.json")
    assert_refused(result, *fragments)
    assert list(out.iterdir()) == []


def test_unwritable_report_path(run_cli, tmp_path, small_file):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_refused(run_cli("inspect", small_file, "--arch", "tiny_cnn", "-o", blocker / "r.json"),
                   "not a directory")
    assert_refused(run_cli("inspect", small_file, "--arch", "tiny_cnn", "-o", tmp_path / "no" / "r.json"),
                   "does not exist")
    as_directory = run_cli("inspect", small_file, "--arch", "tiny_cnn", "-o", tmp_path)
    assert as_directory.code == 2 and "is a directory" in as_directory.stderr  # click's own check: usage
    assert_refused(run_cli("inspect", small_file, "--arch", "tiny_cnn", "-o", small_file), "never overwritten")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "small.safetensors"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_output_directory(run_cli, tmp_path, small_file):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_refused(run_cli("inspect", small_file, "--arch", "tiny_cnn", "-o", locked / "r.json"),
                       "not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# --- bad holdouts (inspect --holdout checks the fit) -----------------------------------------------------------------

def _folder(root, layout, size=(32, 32)):
    for name, count in layout.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(np.full((size[1], size[0], 3), index, np.uint8)).save(root / name / f"{index}.png")
    return root


@pytest.mark.parametrize("layout, size, extra, fragments", [
    ({"a": 2, "b": 2}, (32, 32), [], ["2 classes", "model has 3"]),
    ({"a": 0, "b": 0, "c": 0}, (32, 32), [], ["no images found"]),
    ({"a": 3, "b": 0, "c": 0}, (32, 32), [], ["one class only"]),
    ({"a": 2, "b": 2, "c": 2}, (16, 16), ["--preset", "none", "--input-size", "32"], None),
    ({"a": 2, "b": 2, "c": 2}, (16, 16), [], ["16×16 but the model expects 32×32", "--input-size 32"]),
])
def test_bad_holdouts(run_cli, tmp_path, layout, size, extra, fragments):
    model = tmp_path / "m.safetensors"
    save_file(build_arch("tiny_cnn", 3).state_dict(), str(model))
    (tmp_path / "config.json").write_text(json.dumps({"arch": "tiny_cnn", "input_size": 32}))
    holdout = _folder(tmp_path / "holdout", layout, size)
    result = run_cli("inspect", model, "--holdout", holdout, *extra, "-o", tmp_path / "r.json")
    if fragments is None:
        assert result.code == 0, result.output
        assert json.loads((tmp_path / "r.json").read_text())["holdout"]["image_size"] == [32, 32]
    else:
        assert_refused(result, *fragments)
        assert not (tmp_path / "r.json").exists()


def test_unreadable_image_is_skipped_with_a_warning(run_cli, tmp_path, small_file):
    holdout = _folder(tmp_path / "h", {"a": 2, "b": 2, "c": 2})
    (holdout / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_cli("inspect", small_file, "--arch", "tiny_cnn", "--holdout", holdout, "--format", "json")
    assert result.code == 0, result.output
    data = result.json
    assert data["holdout"]["n"] == 6 and "broken.jpg" in data["holdout"]["skipped"][0]
    assert any("broken.jpg" in w for w in data["warnings"])
    assert "broken.jpg" in result.stderr  # logged for people too
