"""ONNX export: checker, parity gate, metadata, baked preprocessing, coverage of the architecture registry."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from unexportable_arch import DataDependent

from bdsan.errors import GateFailed, ModelRefused
from bdsan.exporters.onnx import compare_logits, export_onnx
from bdsan.io.archs import build_arch, list_archs
from bdsan.io.models import from_module
from bdsan.io.onnx_runtime import OnnxClassifier
from bdsan.io.preprocess import Preprocessing

OWN_ARCHS = ["tiny_cnn", "small_resnet", "cifar_resnet18", "preact_resnet18"]
# residual (resnet18), depthwise + squeeze-excite + hardswish (mobilenet_v3_small), concat (squeezenet1_1)
TORCHVISION_SAMPLE = ["resnet18", "mobilenet_v3_small", "squeezenet1_1"]
# models that need more than 64 px (fixed-size patch embeddings, deep downsampling)
SWEEP_SIZES = {"inception_v3": 96, "googlenet": 64}
SWEEP_224 = ("vit_", "swin_", "maxvit_")


def plain_session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def torch_argmax(model, pixels: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.normalized().eval()(pixels).argmax(1).numpy()


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory, toy_poisoned):
    out = tmp_path_factory.mktemp("onnx") / "toy.onnx"
    return out, export_onnx(toy_poisoned.model, out, holdout=toy_poisoned.holdout)


def test_export_writes_one_verified_file(toy_onnx):
    path, artifact = toy_onnx
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.onnx"]  # no .data sidecar, no temp file
    assert artifact["bytes"] == path.stat().st_size and len(artifact["sha256"]) == 64
    parity = artifact["parity"]
    assert parity["passed"] and parity["n"] == 400 and parity["agreement"] == 1.0
    assert parity["max_scaled_diff"] <= 1e-3 and parity["inputs"] == "holdout"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def test_metadata_and_opset(toy_onnx, toy_poisoned):
    path, _ = toy_onnx
    proto = onnx.load(str(path))
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 18
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["bdsan.arch"] == "tiny_cnn" and meta["bdsan.num_classes"] == "5"
    assert meta["bdsan.preprocessing_baked"] == "false"
    assert Preprocessing.from_dict(json.loads(meta["bdsan.preprocessing"])) == toy_poisoned.model.preprocessing
    assert json.loads(meta["bdsan.classes"]) == toy_poisoned.model.classes
    assert meta["bdsan.version"] and "bdsan.source_sha256" in meta


def test_plain_onnxruntime_gives_pytorch_predictions_at_any_batch_size(toy_onnx, toy_poisoned):
    path, _ = toy_onnx
    session = plain_session(path)
    name = session.get_inputs()[0].name
    pixels = toy_poisoned.holdout.x[:37].float() / 255
    pre = toy_poisoned.model.preprocessing
    mean, std = np.array(pre.mean, np.float32)[:, None, None], np.array(pre.std, np.float32)[:, None, None]
    logits = np.concatenate([session.run(None, {name: ((pixels[i:i + n].numpy() - mean) / std)})[0]
                             for i, n in [(0, 1), (1, 7), (8, 29)]])
    assert (logits.argmax(1) == torch_argmax(toy_poisoned.model, pixels)).all()


def test_onnx_classifier_matches_pytorch(toy_onnx, toy_poisoned):
    path, _ = toy_onnx
    classifier = OnnxClassifier(path, "cpu")
    assert classifier.provider == "CPUExecutionProvider" and not classifier.baked
    assert classifier.metadata["bdsan.arch"] == "tiny_cnn" and classifier.num_classes == 5
    assert classifier.input_size == (32, 32)
    pixels = toy_poisoned.holdout.x[:50].float() / 255
    logits = classifier(pixels)
    assert isinstance(logits, torch.Tensor) and logits.shape == (50, 5)
    with torch.no_grad():
        expected = toy_poisoned.model.normalized()(pixels)
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_baked_preprocessing_takes_raw_pixels(tmp_path, toy_poisoned):
    out = tmp_path / "baked.onnx"
    artifact = export_onnx(toy_poisoned.model, out, bake_preprocessing=True)
    assert artifact["parity"]["passed"] and artifact["parity"]["n"] == 64  # random inputs when no holdout
    session = plain_session(out)
    pixels = toy_poisoned.holdout.x[:64].float() / 255
    logits = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]
    assert (logits.argmax(1) == torch_argmax(toy_poisoned.model, pixels)).all()
    classifier = OnnxClassifier(out, "cpu", preprocessing=toy_poisoned.model.preprocessing)
    assert classifier.baked and torch.allclose(classifier(pixels), torch.from_numpy(logits))


def test_export_prints_nothing(tmp_path, toy_poisoned, capfd):
    export_onnx(toy_poisoned.model, tmp_path / "quiet.onnx")
    captured = capfd.readouterr()
    assert captured.out == ""


def test_parity_failure_raises_and_leaves_no_file(tmp_path, toy_poisoned, monkeypatch):
    def corrupted(self, pixels):
        return original(self, pixels) + 1.0

    original = OnnxClassifier.predict_numpy
    monkeypatch.setattr(OnnxClassifier, "predict_numpy", corrupted)
    out = tmp_path / "bad.onnx"
    with pytest.raises(GateFailed, match="parity failed") as info:
        export_onnx(toy_poisoned.model, out, holdout=toy_poisoned.holdout)
    assert info.value.exit_code == 1
    assert info.value.details["parity"]["max_abs_diff"] == pytest.approx(1.0, abs=1e-4)
    assert list(tmp_path.iterdir()) == []


def test_zero_tolerance_fails_the_gate(tmp_path, toy_poisoned):
    with pytest.raises(GateFailed):
        export_onnx(toy_poisoned.model, tmp_path / "strict.onnx", atol=0.0)
    assert list(tmp_path.iterdir()) == []


def test_unexportable_model_is_refused_with_reason(tmp_path, capfd):
    model = from_module(DataDependent(), "data_dependent", 3, Preprocessing(input_size=8))
    out = tmp_path / "never.onnx"
    with pytest.raises(ModelRefused, match="cannot convert") as info:
        export_onnx(model, out)
    assert info.value.exit_code == 3
    assert "data-dependent" in info.value.message and "forward" in info.value.message
    assert list(tmp_path.iterdir()) == []
    assert capfd.readouterr().out == ""


def test_compare_logits_definition():
    reference = torch.tensor([[10.0, 0.0], [0.2, 0.1]])
    candidate = torch.tensor([[10.005, 0.0], [0.1, 0.1005]])  # second row: a flip outside the tie tolerance
    parity = compare_logits(reference, candidate, atol=1e-3, min_agreement=0.5)
    assert parity["max_abs_diff"] == pytest.approx(0.1)
    assert parity["max_scaled_diff"] == pytest.approx(0.1)  # row 2: 0.1 / max(1, 0.2)
    assert parity["agreement"] == 0.5 and not parity["passed"]
    tied = compare_logits(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0 + 1e-7]]), 1e-3, 1.0)
    assert tied["agreement"] == 1.0 and tied["agreement_strict"] == 0.0 and tied["ties"] == 1 and tied["passed"]


def _export_arch(tmp_path, arch: str, size: int, preset: str = "cifar10"):
    model = from_module(build_arch(arch, 10), arch, 10, Preprocessing.preset(preset, size))
    out = tmp_path / f"{arch}.onnx"
    artifact = export_onnx(model, out)
    assert artifact["parity"]["passed"], artifact["parity"]
    session = plain_session(out)
    assert session.get_outputs()[0].shape[-1] == 10
    pixels = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    assert (OnnxClassifier(out)(pixels).argmax(1).numpy() == torch_argmax(model, pixels)).all()


@pytest.mark.parametrize("arch", OWN_ARCHS)
def test_registry_architectures_export(tmp_path, arch):
    _export_arch(tmp_path, arch, 32)


@pytest.mark.parametrize("arch", TORCHVISION_SAMPLE)
def test_torchvision_sample_exports_at_tiny_size(tmp_path, arch):
    _export_arch(tmp_path, arch, 32, "imagenet")


def _torchvision_archs() -> list[str]:
    return [name for name, description in list_archs().items() if description == "torchvision classification model"]


@pytest.mark.skipif(os.environ.get("BDSAN_FULL_EXPORT_SWEEP") != "1",
                    reason="full torchvision sweep takes an hour on CPU: BDSAN_FULL_EXPORT_SWEEP=1")
@pytest.mark.parametrize("arch", _torchvision_archs() if os.environ.get("BDSAN_FULL_EXPORT_SWEEP") == "1" else [])
def test_full_torchvision_sweep(tmp_path, arch):
    size = 224 if arch.startswith(SWEEP_224) else SWEEP_SIZES.get(arch, 64)
    _export_arch(tmp_path, arch, size, "imagenet")


def test_user_factory_model_exports(tmp_path):
    factory = tmp_path / "my_arch.py"
    factory.write_text(
        "from torch import nn\n"
        "def build(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n")
    spec = f"{factory}:build"
    model = from_module(build_arch(spec, 4), spec, 4, Preprocessing.preset("cifar10", 32))
    out = tmp_path / "user.onnx"
    artifact = export_onnx(model, out)
    assert artifact["parity"]["passed"]
    assert OnnxClassifier(out).metadata["bdsan.arch"] == spec


def test_missing_onnxruntime_names_the_extra(toy_onnx, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(ModelRefused, match="onnxruntime is not installed") as info:
        OnnxClassifier(toy_onnx[0])
    assert "bdsan[cpu]" in info.value.hint and "bdsan[gpu]" in info.value.hint


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA build installed")
def test_cuda_request_without_cuda_build_runs_on_cpu(toy_onnx, caplog):
    classifier = OnnxClassifier(toy_onnx[0], torch.device("cuda"))
    assert classifier.provider == "CPUExecutionProvider"
    assert "CUDAExecutionProvider" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs a GPU and onnxruntime-gpu")
def test_cuda_provider_is_used_on_gpu(toy_onnx, toy_poisoned):
    classifier = OnnxClassifier(toy_onnx[0], "cuda")
    assert classifier.provider == "CUDAExecutionProvider"
    pixels = (toy_poisoned.holdout.x[:64].float() / 255).cuda()
    logits = classifier(pixels)
    assert logits.device.type == "cuda"
    with torch.no_grad():
        expected = toy_poisoned.model.normalized().cuda()(pixels)
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_export_leaves_the_model_as_it_was(tmp_path, poisoned_model):
    poisoned_model.module.train()
    export_onnx(poisoned_model, tmp_path / "m.onnx")
    assert poisoned_model.module.training  # mode (and device) untouched
