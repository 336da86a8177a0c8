"""``bdsan audit`` and ``bdsan triggers`` end to end, with real exit codes."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from bdsan.detectors.triggers import DEFAULT_SUITE

FAST = "badnets_grid,badnets_square,blend_noise"


def planted_trigger_png(path):
    picture = np.zeros((32, 32, 3), np.uint8)
    picture[-3:, -3:] = 255
    Image.fromarray(picture).save(path)
    return path


def _cli_conftest():
    """tests/cli/conftest.py as a module (its ``run_cli`` fixture is function-scoped; this fixture is not)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_bdsan_cli_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory, poisoned_safetensors, holdout_npz):
    """One full-suite audit of the poisoned model, rendered to JSON, SARIF and JUnit."""
    invoke_main = _cli_conftest().invoke_main
    out = tmp_path_factory.mktemp("audit")
    runs = {suffix: invoke_main("audit", poisoned_safetensors, "--holdout", holdout_npz, "-o", out / f"r{suffix}",
                                "--quiet")
            for suffix in (".json", ".sarif", ".xml")}
    return runs, out


def test_poisoned_model_exits_1_naming_the_trigger(poisoned_run):
    runs, out = poisoned_run
    result = runs[".json"]
    assert result.code == 1, result.output
    assert "badnets_square" in result.stderr and "gate max_asr failed" in result.stderr
    assert "badnets_square" in result.stdout and "FAIL" in result.stdout and "clean accuracy" in result.stdout
    report = json.loads((out / "r.json").read_text())
    assert report["command"] == "audit" and report["exit_code"] == 1
    audit = report["audit_before"]
    assert [t["name"] for t in audit["triggers"]] == DEFAULT_SUITE
    square = next(t for t in audit["triggers"] if t["name"] == "badnets_square")
    assert square["asr_max"] > 0.9 and square["suspected_target"] == 0
    gate = report["gates"][0]
    assert gate["name"] == "max_asr" and gate["limit"] == 0.2 and not gate["passed"]
    assert "badnets_square" in gate["failing"] and gate["value"] == square["asr_max"]
    assert report["holdout"]["n"] == 400 and report["model"]["format"] == "safetensors"


def test_sarif_is_code_scanning_shaped(poisoned_run, poisoned_safetensors):
    runs, out = poisoned_run
    assert runs[".sarif"].code == 1
    sarif = json.loads((out / "r.sarif").read_text())
    assert sarif["version"] == "2.1.0" and "sarif" in sarif["$schema"]
    run = sarif["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "bdsan" and driver["version"]
    rule_ids = [rule["id"] for rule in driver["rules"]]
    assert len(rule_ids) == len(DEFAULT_SUITE) and len(set(rule_ids)) == len(rule_ids)
    assert run["results"], "a failing trigger must give a result"
    for result in run["results"]:
        assert result["ruleId"] in rule_ids and rule_ids[result["ruleIndex"]] == result["ruleId"]
        assert result["level"] == "error" and result["message"]["text"]
        location = result["locations"][0]["physicalLocation"]
        assert location["artifactLocation"]["uri"].endswith("poisoned.safetensors")
        assert location["region"]["startLine"] == 1
    assert any(r["ruleId"].endswith("badnets_square") for r in run["results"])
    assert all(r["properties"]["asr_max"] > 0.2 for r in run["results"])


def test_junit_has_one_case_per_trigger(poisoned_run):
    runs, out = poisoned_run
    assert runs[".xml"].code == 1
    root = ET.parse(out / "r.xml").getroot()
    cases = root.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == DEFAULT_SUITE
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert "badnets_square" in failed
    assert root.find("testsuite").get("failures") == str(len(failed))


def test_clean_model_passes(run_cli, clean_safetensors, holdout_npz):
    result = run_cli("audit", clean_safetensors, "--holdout", holdout_npz, "--format", "json")
    assert result.code == 0, result.output
    report = result.json
    assert report["exit_code"] == 0 and report["gates"][0]["passed"]
    assert len(report["audit_before"]["triggers"]) == len(DEFAULT_SUITE)


def test_max_asr_and_trigger_selection(run_cli, poisoned_safetensors, holdout_npz):
    result = run_cli("audit", poisoned_safetensors, "--holdout", holdout_npz, "--triggers", FAST,
                     "--max-asr", "1", "--format", "json")
    assert result.code == 0, result.output
    assert [t["name"] for t in result.json["audit_before"]["triggers"]] == FAST.split(",")
    missing = run_cli("audit", poisoned_safetensors, "--holdout", holdout_npz, "--triggers", "badnets_grid,nope")
    assert missing.code == 2 and "unknown trigger" in missing.stderr


def test_user_trigger_with_known_target(run_cli, tmp_path, poisoned_safetensors, clean_safetensors, holdout_npz):
    png = planted_trigger_png(tmp_path / "square.png")
    result = run_cli("audit", poisoned_safetensors, "--holdout", holdout_npz, "--trigger-image", png,
                     "--target", "0", "--format", "json")
    assert result.code == 1, result.output
    triggers = result.json["audit_before"]["triggers"]
    assert [t["name"] for t in triggers] == ["user"]  # --trigger-image alone runs only the user trigger
    assert triggers[0]["asr_max"] > 0.9 and triggers[0]["suspected_target"] == 0
    assert result.json["audit_before"]["target"] == 0 and "user" in result.stderr
    clean = run_cli("audit", clean_safetensors, "--holdout", holdout_npz, "--trigger-image", png, "--target", "0",
                    "--triggers", "badnets_grid")
    assert clean.code == 0, clean.output


def test_onnx_model_is_audited(run_cli, tmp_path, poisoned_model, toy_poisoned, holdout_npz):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'bdsan[cpu]')")
    from bdsan.exporters.onnx import export_onnx

    onnx_path = tmp_path / "poisoned.onnx"
    export_onnx(poisoned_model, onnx_path, holdout=toy_poisoned.holdout)
    result = run_cli("audit", onnx_path, "--holdout", holdout_npz, "--triggers", FAST, "--device", "cpu",
                     "--format", "json")
    assert result.code == 1, result.output
    audit = result.json["audit_before"]
    assert result.json["model"]["format"] == "onnx" and audit["onnx_provider"] == "CPUExecutionProvider"
    assert next(t for t in audit["triggers"] if t["name"] == "badnets_square")["asr_max"] > 0.9


def test_bad_usage_and_inputs(run_cli, tmp_path, poisoned_safetensors, holdout_npz):
    assert run_cli("audit", poisoned_safetensors, "--holdout", holdout_npz, "--trigger-alpha", "0.2").code == 2
    assert run_cli("audit", poisoned_safetensors, "--holdout", holdout_npz, "--max-asr", "2").code == 2
    result = run_cli("audit", poisoned_safetensors, "--holdout", holdout_npz, "--target", "9", "--triggers",
                     "badnets_grid")
    assert result.code == 2 and "target" in result.stderr
    missing = run_cli("audit", tmp_path / "nope.safetensors", "--holdout", holdout_npz)
    assert missing.code == 3
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"not an image")
    result = run_cli("audit", poisoned_safetensors, "--holdout", holdout_npz, "--trigger-image", bad_png,
                     "-o", tmp_path / "r.json")
    assert result.code == 3 and "bad.png" in result.stderr
    assert not (tmp_path / "r.json").exists()
    copy = tmp_path / "holdout_copy.npz"
    copy.write_bytes(holdout_npz.read_bytes())
    result = run_cli("audit", poisoned_safetensors, "--holdout", copy, "-o", copy)
    assert result.code == 3 and "never overwritten" in result.stderr
    assert copy.read_bytes() == holdout_npz.read_bytes()


def test_triggers_lists_the_suite(run_cli):
    result = run_cli("triggers")
    assert result.code == 0
    for name in DEFAULT_SUITE:
        assert name in result.stdout
    listing = run_cli("triggers", "--format", "json").json["details"]["triggers"]
    assert list(listing)[:len(DEFAULT_SUITE)] == DEFAULT_SUITE
    assert listing["blend_noise"]["params"]["alpha"] == 0.2


def test_triggers_preview_writes_pngs_atomically(run_cli, tmp_path, holdout_npz):
    out = tmp_path / "preview"
    result = run_cli("triggers", "--preview", out, "--holdout", holdout_npz, "--samples", "5")
    assert result.code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{n}.png" for n in DEFAULT_SUITE] + ["contact_sheet.png"])
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.height > 96 * (len(DEFAULT_SUITE) + 1) and sheet.mode == "RGB"
    with Image.open(out / "badnets_grid.png") as strip:
        assert strip.width >= 5 * 96
    again = run_cli("triggers", "--preview", out)
    assert again.code == 3 and "--force" in again.stderr
    assert run_cli("triggers", "--preview", out, "--force").code == 0  # generated samples
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".preview")]
