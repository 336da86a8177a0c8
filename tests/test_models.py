"""Model loading (SPEC §2.1, §2.2): formats by content, weights-only loading, refusal of code, architecture facts."""
from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bdsan.errors import ModelRefused
from bdsan.io import sniff
from bdsan.io.archs import build_arch
from bdsan.io.models import UnsafeModel, infer_num_classes, inspect_model, load_model, strip_prefixes
from bdsan.io.pickle_scan import scan_file, scan_pickle_bytes
from bdsan.io.preprocess import Preprocessing


class CreatesFile:
    """Unpickling this opens (creates) ``marker`` for writing: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny_state(num_classes: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_arch("tiny_cnn", num_classes).state_dict()


def same_outputs(module_a, module_b, size: int = 32) -> bool:
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(module_a.eval()(x), module_b.eval()(x))


# --- sniffing ---------------------------------------------------------------------------------------------------

def test_formats_are_recognised_by_content_not_extension(tmp_path):
    save_file(tiny_state(), str(tmp_path / "a.pt"))  # safetensors with a misleading suffix
    torch.save(tiny_state(), tmp_path / "b.safetensors")  # torch zip with a misleading suffix
    torch.save(tiny_state(), tmp_path / "c.bin", _use_new_zipfile_serialization=False)
    assert sniff.sniff_format(tmp_path / "a.pt") == sniff.SAFETENSORS
    assert sniff.sniff_format(tmp_path / "b.safetensors") == sniff.TORCH_ZIP
    assert sniff.sniff_format(tmp_path / "c.bin") == sniff.PICKLE


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"\x00" * 64, "not a recognised model format"),
    (bytes(range(256)) * 4, "not a recognised model format"),
])
def test_unrecognised_bytes_are_refused(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelRefused, match=message):
        load_model(path, arch="tiny_cnn")


def test_truncated_safetensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(tiny_state(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelRefused, match="truncated"):
        load_model(path, arch="tiny_cnn")
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(ModelRefused, match="truncated|corrupt"):
        load_model(path, arch="tiny_cnn")


def test_garbage_safetensors_header_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    header = b"{not json at all"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 32)
    with pytest.raises(ModelRefused, match="corrupt safetensors header"):
        load_model(path, arch="tiny_cnn")


def test_directory_missing_file_and_foreign_zip_are_refused(tmp_path):
    with pytest.raises(ModelRefused, match="is a directory"):
        load_model(tmp_path)
    with pytest.raises(ModelRefused, match="not found"):
        load_model(tmp_path / "nope.pt")
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ModelRefused, match="not a PyTorch checkpoint"):
        load_model(tmp_path / "x.zip")


# --- the pickle scanner and refusal of code ---------------------------------------------------------------------

@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_scanner_lists_globals_without_running_them(tmp_path, protocol):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"weights": [1, 2], "payload": CreatesFile(marker)}, protocol=protocol)
    scan = scan_pickle_bytes(data)
    assert scan.unsafe == ["io.open"] or scan.unsafe == ["builtins.open"]
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "raw_pickle", "raw_pickle_protocol0"])
def test_pickle_that_would_create_a_file_is_refused_and_nothing_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    payload = {"state_dict": tiny_state(), "extra": CreatesFile(marker)}
    if writer == "torch_zip":
        torch.save(payload, path)
    elif writer == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=0 if writer.endswith("0") else 4))
    assert not marker.exists()
    with pytest.raises(UnsafeModel) as refused:
        load_model(path, arch="tiny_cnn", num_classes=4)
    assert "open" in refused.value.message and "--trust-code" in refused.value.hint
    info, loaded = inspect_model(path)
    assert loaded is None and info["safe"] is False and any("open" in g for g in info["unsafe_globals"])
    assert not marker.exists()


def test_pickled_module_is_refused_then_loads_with_trust_code_and_a_warning(tmp_path):
    module = build_arch("tiny_cnn", 4)
    path = tmp_path / "module.pt"
    torch.save(module, path)
    with pytest.raises(UnsafeModel, match="torch.nn.modules"):
        load_model(path)
    loaded = load_model(path, trust_code=True)
    assert loaded.num_classes == 4 and loaded.module is not None
    assert any(w.startswith("--trust-code") for w in loaded.warnings)
    assert same_outputs(loaded.module, module)


def test_torchscript_is_refused_then_loads_with_trust_code(tmp_path):
    module = build_arch("tiny_cnn", 3).eval()
    path = tmp_path / "scripted.pt"
    torch.jit.trace(module, torch.rand(1, 3, 32, 32)).save(str(path))
    assert sniff.sniff_format(path) == sniff.TORCHSCRIPT
    with pytest.raises(UnsafeModel, match="TorchScript"):
        load_model(path)
    loaded = load_model(path, trust_code=True)
    assert loaded.format == "torchscript" and loaded.num_classes == 3
    assert any("--trust-code" in w for w in loaded.warnings)
    assert same_outputs(loaded.module, module)


# --- safe formats -----------------------------------------------------------------------------------------------

def test_torchvision_resnet18_safetensors_needs_only_arch(tmp_path):
    import torchvision

    module = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    loaded = load_model(path, arch="resnet18")
    assert (loaded.arch, loaded.num_classes, loaded.format) == ("resnet18", 7, "safetensors")
    assert loaded.sources["num_classes"] == "inferred from fc.weight"
    assert loaded.params == sum(p.numel() for p in module.parameters())
    assert same_outputs(loaded.module, module)


def test_self_describing_safetensors_needs_no_flags(poisoned_safetensors, toy_poisoned):
    loaded = load_model(poisoned_safetensors)
    assert loaded.arch == "tiny_cnn" and loaded.num_classes == 5
    assert loaded.preprocessing == toy_poisoned.model.preprocessing
    assert loaded.classes == toy_poisoned.model.classes
    assert loaded.sources["arch"] == "metadata" and not loaded.warnings


def test_backdoorbench_state_dict_with_dataparallel_prefix(tmp_path):
    module = build_arch("preact_resnet18", 10)
    state = {f"module.{k}": v for k, v in module.state_dict().items()}
    path = tmp_path / "preact.pth"
    torch.save({"epoch": 200, "model_state_dict": state}, path)
    loaded = load_model(path, arch="preact_resnet18")
    assert loaded.num_classes == 10 and loaded.format == "torch"
    assert same_outputs(loaded.module, module)


def test_backdoorbench_attack_result_bundle(tmp_path):
    module = build_arch("preact_resnet18", 10)
    bundle = {"model_name": "preactresnet18", "num_classes": 10, "model": module.state_dict(),
              "data_path": "./data/cifar10", "img_size": (32, 32, 3),
              "bd_test": {"poison_indicator": np.zeros(10, dtype=np.int64), "x": np.zeros((2, 3), np.float32)}}
    path = tmp_path / "attack_result.pt"
    torch.save(bundle, path)
    loaded = load_model(path)
    assert (loaded.format, loaded.arch, loaded.num_classes) == ("backdoorbench", "preact_resnet18", 10)
    assert loaded.preprocessing.input_size == 32 and loaded.preprocessing.mean[0] == pytest.approx(0.4914)
    assert any("data_path" in w for w in loaded.warnings)
    assert same_outputs(loaded.module, module)


def test_legacy_non_zip_state_dict_and_compiled_prefix(tmp_path):
    state = {f"_orig_mod.{k}": v for k, v in tiny_state(6).items()}
    path = tmp_path / "old.pt"
    torch.save({"net": state}, path, _use_new_zipfile_serialization=False)
    loaded = load_model(path, arch="tiny_cnn")
    assert loaded.num_classes == 6 and loaded.format == "pickle"


def test_strip_prefixes_handles_nested_wrappers():
    assert list(strip_prefixes({"module._orig_mod.fc.weight": torch.zeros(1)})) == ["fc.weight"]


def test_wrong_arch_lists_missing_unexpected_and_shapes(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(tiny_state(4), str(path))
    with pytest.raises(ModelRefused, match="do not fit architecture 'small_resnet'.*missing"):
        load_model(path, arch="small_resnet")
    with pytest.raises(ModelRefused, match=r"shape mismatch .*\(4, 1024\) vs tiny_cnn \(9, 1024\)"):
        load_model(path, arch="tiny_cnn", num_classes=9)
    with pytest.raises(ModelRefused, match="unknown architecture"):
        load_model(path, arch="no_such_net")


def test_no_architecture_known_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(tiny_state(), str(path))
    with pytest.raises(ModelRefused, match="no architecture known") as refused:
        load_model(path)
    assert "--arch" in refused.value.hint


def test_config_json_beside_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(tiny_state(4), str(path))
    (tmp_path / "config.json").write_text(json.dumps(
        {"arch": "tiny_cnn", "num_classes": 4, "preset": "cifar10", "input_size": 32,
         "classes": ["a", "b", "c", "d"]}))
    loaded = load_model(path)
    assert loaded.arch == "tiny_cnn" and loaded.classes == ["a", "b", "c", "d"]
    assert loaded.preprocessing == Preprocessing.preset("cifar10", 32)
    assert loaded.sources["arch"] == "config.json"
    # the command line wins over config.json
    assert load_model(path, preprocessing=Preprocessing.preset("imagenet")).preprocessing.mean[0] == 0.485


def test_config_json_naming_code_is_refused_without_trust(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil_arch.py").write_text(f"open({str(marker)!r}, 'w')\ndef build(num_classes):\n    pass\n")
    path = tmp_path / "m.safetensors"
    save_file(tiny_state(4), str(path))
    (tmp_path / "config.json").write_text(json.dumps({"arch": "evil_arch.py:build"}))
    with pytest.raises(ModelRefused, match="code factory"):
        load_model(path)
    assert not marker.exists()


def test_metadata_naming_code_is_refused_without_trust(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(tiny_state(4), str(path), metadata={"bdsan.arch": "os:system"})
    with pytest.raises(ModelRefused, match="code factory"):
        load_model(path)


def test_bad_config_json_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(tiny_state(4), str(path))
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ModelRefused, match="config.json: not valid JSON"):
        load_model(path, arch="tiny_cnn")


def test_user_factory_from_a_file(tmp_path):
    (tmp_path / "my_arch.py").write_text(
        "from torch import nn\n"
        "def build(num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(8, num_classes))\n")
    torch.manual_seed(0)
    spec = f"{tmp_path / 'my_arch.py'}:build"
    module = build_arch(spec, 3)
    path = tmp_path / "mine.pt"
    torch.save(module.state_dict(), path)
    loaded = load_model(path, arch=spec)
    assert loaded.num_classes == 3 and loaded.params == 8 * 3 * 9 + 8 + 8 * 3 + 3
    assert same_outputs(loaded.module, module)


def test_num_classes_inference_prefers_the_classifier():
    state = {"features.0.weight": torch.zeros(16, 3, 3, 3), "fc.weight": torch.zeros(12, 64),
             "proj.weight": torch.zeros(5, 12)}
    assert infer_num_classes(state)[0] == 12
    assert infer_num_classes(tiny_state(7), "tiny_cnn") == (7, "inferred from 16.weight")


def test_onnx_metadata_and_shapes(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((6, 3 * 8 * 8), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "W"], ["logits"], transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6])], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "m.bin"
    onnx.save(proto, str(path))
    loaded = load_model(path)
    assert (loaded.format, loaded.module, loaded.onnx_path, loaded.arch) == ("onnx", None, str(path), "onnx")
    assert loaded.num_classes == 6 and loaded.preprocessing.input_size == 8
    helper.set_model_props(proto, {"bdsan.arch": "tiny_cnn", "bdsan.num_classes": "6",
                                   "bdsan.preprocessing": json.dumps(Preprocessing.preset("cifar10", 8).to_dict())})
    onnx.save(proto, str(path))
    loaded = load_model(path)
    assert loaded.arch == "tiny_cnn" and loaded.preprocessing == Preprocessing.preset("cifar10", 8)


def test_scan_of_a_plain_state_dict_is_all_safe(tmp_path):
    torch.save(tiny_state(), tmp_path / "sd.pt")
    scan = scan_file(tmp_path / "sd.pt")
    assert scan.globals and scan.unsafe == []
