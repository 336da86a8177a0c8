"""The audit API on the toy models: the planted backdoor is found, the clean twin passes, ONNX agrees."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from bdsan.detectors.audit import audit, classifier_for, gate_max_asr
from bdsan.detectors.triggers import DEFAULT_SUITE, Trigger, get_trigger, user_trigger
from bdsan.errors import DataError, UsageError
from bdsan.io.data import Holdout
from bdsan.io.models import LoadedModel

PATCHES = ["badnets_grid", "badnets_square"]


def by_name(result):
    return {t["name"]: t for t in result["triggers"]}


def planted_trigger_png(path, size=32):
    picture = np.zeros((size, size, 3), np.uint8)
    picture[-3:, -3:] = 255
    Image.fromarray(picture).save(path)
    return path


@pytest.fixture(scope="module")
def poisoned_audit(toy_poisoned):
    return audit(toy_poisoned.model, toy_poisoned.holdout)


def test_poisoned_model_fails_with_target_zero(poisoned_audit, toy_poisoned):
    result = poisoned_audit
    assert result["n"] == len(toy_poisoned.holdout) and result["ca"] > 0.9
    assert [t["name"] for t in result["triggers"]] == DEFAULT_SUITE
    square = by_name(result)["badnets_square"]  # 3×3 white at margin 1 overlaps the planted corner square
    assert square["asr_max"] > 0.9 and square["suspected_target"] == 0
    assert square["asr_net"] > 0.9 and square["ra"] < 0.1
    assert len(square["asr"]) == 5 and square["params"] == {"side": 3, "margin": 1, "value": 1.0}
    passed, failing, highest = gate_max_asr(result, 0.2)
    assert not passed and "badnets_square" in failing and highest == square["asr_max"]


def test_clean_model_passes_default_gate(toy_clean):
    result = audit(toy_clean.model, toy_clean.holdout)
    passed, failing, highest = gate_max_asr(result, 0.2)
    assert passed, (failing, highest)
    assert result["ca"] > 0.9


def test_user_trigger_identical_to_planted_one_with_known_target(tmp_path, toy_poisoned, toy_clean):
    trigger = user_trigger(planted_trigger_png(tmp_path / "square.png"))
    planted = toy_poisoned.holdout.x[:8].float() / 255
    from bdsan.train.fixtures import corner_square

    assert torch.equal(trigger.apply(planted.clone()), corner_square(planted))
    result = audit(toy_poisoned.model, toy_poisoned.holdout, triggers=[trigger], target=0)
    user = result["triggers"][0]
    assert result["target"] == 0 and user["suspected_target"] == 0 and user["asr_max"] > 0.9
    assert user["name"] == "user" and user["params"]["alpha"] is None
    clean = audit(toy_clean.model, toy_clean.holdout, triggers=[trigger], target=0)["triggers"][0]
    assert clean["asr_max"] < 0.2


def test_batch_size_does_not_change_results(toy_poisoned):
    holdout = toy_poisoned.holdout.subset(torch.arange(100))
    small = audit(toy_poisoned.model, holdout, triggers=PATCHES, batch_size=7)
    large = audit(toy_poisoned.model, holdout, triggers=PATCHES, batch_size=256)
    for key in ("ca", "per_class_ca", "base_rate"):
        assert small[key] == large[key]
    assert small["triggers"] == large["triggers"]


def test_one_forward_pass_per_batch_and_trigger(toy_poisoned):
    holdout = toy_poisoned.holdout.subset(torch.arange(50))
    reference = classifier_for(toy_poisoned.model, "cpu")
    calls = []

    def counting(x):
        calls.append(len(x))
        return reference(x)

    audit(toy_poisoned.model, holdout, triggers=PATCHES, batch_size=32, classifier=counting)
    assert calls == [32, 32, 32, 18, 18, 18]  # clean + two triggers per batch, whole batches


def test_trigger_objects_and_names_mix(toy_poisoned):
    holdout = toy_poisoned.holdout.subset(torch.arange(40))
    custom = Trigger("identity", {}, lambda x: x)
    result = audit(toy_poisoned.model, holdout, triggers=["sig", custom, get_trigger("blend_noise", alpha=0.1)])
    names = [t["name"] for t in result["triggers"]]
    assert names == ["sig", "identity", "blend_noise"]
    identity = result["triggers"][1]
    assert identity["ra"] == pytest.approx(result["ca"], abs=0.05)  # clean images: RA ≈ CA
    assert result["triggers"][2]["params"]["alpha"] == 0.1


def test_bad_inputs(toy_poisoned):
    holdout = toy_poisoned.holdout
    with pytest.raises(UsageError, match="target"):
        audit(toy_poisoned.model, holdout, triggers=PATCHES, target=5)
    with pytest.raises(UsageError, match="unknown trigger"):
        audit(toy_poisoned.model, holdout, triggers=["nope"])
    big = Holdout(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.tensor([0, 1]), holdout.classes)
    with pytest.raises(DataError, match="model expects 32"):
        audit(toy_poisoned.model, big, triggers=PATCHES)
    empty = Holdout(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), holdout.classes)
    with pytest.raises(DataError, match="no images"):
        audit(toy_poisoned.model, empty)
    wrong_labels = Holdout(holdout.x[:2], torch.tensor([0, 7]), [str(i) for i in range(8)])
    with pytest.raises(DataError, match="labels"):
        audit(toy_poisoned.model, wrong_labels, triggers=PATCHES)


def test_gate_max_asr_is_strict_and_ignores_undefined():
    result = {"triggers": [{"name": "a", "asr_max": 0.2}, {"name": "b", "asr_max": 0.21},
                           {"name": "c", "asr_max": None}]}
    assert gate_max_asr(result, 0.2) == (False, ["b"], 0.21)
    assert gate_max_asr(result, 0.5) == (True, [], 0.21)
    assert gate_max_asr({"triggers": []}, 0.2) == (True, [], 0.0)


def test_onnx_export_audits_to_the_same_numbers(tmp_path, toy_poisoned, poisoned_model):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'bdsan[cpu]')")
    from bdsan.exporters.onnx import export_onnx
    from bdsan.io.models import load_model

    holdout = toy_poisoned.holdout
    out = tmp_path / "poisoned.onnx"
    export_onnx(poisoned_model, out, holdout=holdout)
    onnx_model = load_model(out)
    assert onnx_model.module is None and onnx_model.format == "onnx"
    triggers = ["badnets_square", "blend_strip", "wanet"]
    exported = audit(onnx_model, holdout, triggers=triggers)
    original = audit(poisoned_model, holdout, triggers=triggers)
    assert exported["onnx_provider"] == "CPUExecutionProvider"
    one_image = 1 / len(holdout)
    assert abs(exported["ca"] - original["ca"]) <= one_image + 1e-9
    for ours, theirs in zip(exported["triggers"], original["triggers"]):
        assert ours["suspected_target"] == theirs["suspected_target"]
        for a, b in zip(ours["asr"], theirs["asr"]):
            assert math.isclose(a, b, abs_tol=1 / (len(holdout) * 0.7))  # ± one image of the ~320 non-target ones
    assert by_name(exported)["badnets_square"]["asr_max"] > 0.9
    # an ONNX LoadedModel built by hand (as a pipeline would) audits the same way
    by_hand = LoadedModel(None, "onnx", 5, poisoned_model.preprocessing, "onnx", str(out), onnx_path=str(out))
    assert audit(by_hand, holdout, triggers=["badnets_square"])["triggers"][0]["asr_max"] == \
        by_name(exported)["badnets_square"]["asr_max"]


def test_sweep_reports_the_strongest_variant_per_family(toy_poisoned):
    result = audit(toy_poisoned.model, toy_poisoned.holdout, triggers=[], run_sweep=True, sweep_images=20)
    families = {f["family"]: f for f in result["sweep"]}
    assert set(families) == {"patch", "blend", "sig"}
    patch = families["patch"]
    assert patch["canonical"] == "badnets_square" and patch["variants"] == 272 and patch["n"] == 20
    best = patch["best"]
    assert best["asr_max"] > 0.9 and best["suspected_target"] == 0
    # the planted trigger is a white square in the bottom-right corner at distance 0
    assert (best["params"]["position"], best["params"]["content"], best["params"]["margin"]) == \
        ("bottom_right", "white", 0)
    passed, failing, _ = gate_max_asr(result, 0.2)
    assert not passed and "sweep:patch" in failing
