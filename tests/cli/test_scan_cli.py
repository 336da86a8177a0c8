"""``bdsan scan``: exit 1 on an anomalous class, PNGs into a new --out-dir, reports without pixels or objects."""
from __future__ import annotations

import json

import pytest

SCAN_STEPS = 150


def test_cli_scan_flags_poisoned_model_and_writes_pngs(run_cli, tmp_path, poisoned_safetensors, holdout_npz):
    out_dir = tmp_path / "scan"
    report = tmp_path / "scan.json"
    result = run_cli("scan", poisoned_safetensors, "--holdout", holdout_npz, "--steps", SCAN_STEPS, "--kinds", "patch",
                     "--precision", "fp32", "--device", "cpu", "--out-dir", out_dir, "-o", report, "--quiet")
    assert result.code == 1, result.output
    assert "gate scan failed" in result.stderr
    data = json.loads(report.read_text())
    assert data["command"] == "scan" and data["scan"]["anomalous"] is True
    assert data["scan"]["suspected_target"] == 0  # the conftest backdoor targets class 0
    assert data["scan"]["bf16"] is False and data["scan"]["params"]["precision"] == "fp32"
    gate = next(g for g in data["gates"] if g["name"] == "scan")
    assert gate["passed"] is False and gate["value"] == len(gate["anomalous_classes"]) >= 1 and gate["limit"] == 0
    assert (out_dir / "patch_class0_trigger.png").is_file()
    assert "reconstructed" not in data["scan"] and "images" not in data["scan"]


def test_cli_scan_refuses_existing_out_dir(run_cli, tmp_path, clean_safetensors, holdout_npz):
    (tmp_path / "exists").mkdir()
    result = run_cli("scan", clean_safetensors, "--holdout", holdout_npz, "--out-dir", tmp_path / "exists",
                     "--device", "cpu")
    assert result.code == 2 and "already exists" in result.stderr
    assert list((tmp_path / "exists").iterdir()) == []


def test_cli_audit_scan_fails_the_gate_and_carries_the_scan_into_sarif(run_cli, tmp_path, poisoned_safetensors,
                                                                      holdout_npz):
    sarif = tmp_path / "r.sarif"
    result = run_cli("audit", poisoned_safetensors, "--holdout", holdout_npz, "--triggers", "blend_strip", "--scan",
                     "--scan-steps", SCAN_STEPS, "--scan-kinds", "patch,blend", "--scan-precision", "fp32",
                     "--device", "cpu", "-o", sarif, "--quiet")
    assert result.code == 1, result.output  # blend_strip does not fire on the corner-square backdoor; the scan does
    assert "gate scan failed" in result.stderr and "gate max_asr failed" not in result.stderr
    rules = [r["ruleId"] for r in json.loads(sarif.read_text())["runs"][0]["results"]]
    assert rules == ["bdsan/scan/anomalous-class"]


@pytest.mark.parametrize("command, option", [("audit", "--scan-kinds"), ("scan", "--kinds")])
def test_cli_refuses_an_unknown_scan_kind_before_any_work(run_cli, clean_safetensors, holdout_npz, command, option):
    extra = ["--scan"] if command == "audit" else []
    result = run_cli(command, clean_safetensors, "--holdout", holdout_npz, *extra, option, "patch,warp",
                     "--device", "cpu")
    assert result.code == 2 and "unknown kind warp" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_default_scan_kinds_are_the_scans_own():
    from bdsan.cli import SCAN_KINDS_DEFAULT, SCAN_KINDS_HELP
    from bdsan.detectors.scan import DEFAULT_KINDS, KINDS, ScanSettings

    assert SCAN_KINDS_DEFAULT == ",".join(DEFAULT_KINDS) == ",".join(ScanSettings().kinds)
    assert all(f"{kind} " in SCAN_KINDS_HELP for kind in KINDS)  # the help explains every kind


def test_cli_scan_refuses_an_unknown_precision(run_cli, clean_safetensors, holdout_npz):
    result = run_cli("scan", clean_safetensors, "--holdout", holdout_npz, "--precision", "fp16", "--device", "cpu")
    assert result.code == 2 and "fp16" in result.stderr


def test_junit_and_text_render_the_scan():
    from bdsan.report import Report, render_junit, render_text

    report = Report("scan")
    report.scan = {"anomalous": True, "anomalous_classes": [1], "anomalous_kinds": {"1": ["patch"]},
                   "suspected_target": 1, "mask_l1": [100.0, 9.0], "flip_rate": [0.9, 1.0],
                   "anomaly_index": [0.0, 3.1], "steps_run": 50, "time_s": 1.0, "n_opt": 10, "n_eval": 10}
    junit = render_junit(report)
    assert 'name="scan"' in junit and "ScanAnomalousClass" in junit and 'failures="1"' in junit
    assert "ANOMALOUS" in render_text(report)


def test_text_sarif_and_junit_name_the_wave_that_flagged_a_class():
    from xml.etree import ElementTree as ET

    from bdsan.report import Report, render_junit, render_sarif, render_text

    report = Report("scan")
    report.scan = {"anomalous": True, "anomalous_classes": [0], "anomalous_kinds": {"0": ["wave"]},
                   "suspected_target": 0, "mask_l1": None, "flip_rate": [0.97, 0.93, 0.91],
                   "anomaly_index": [None, None, None], "steps_run": 0, "time_s": 1.0, "n_opt": 10, "n_eval": 10,
                   "params": {"wave_amplitude": 32 / 255, "wave_threshold": 0.9},
                   "wave": {"flip_rate": [0.97, 0.93, 0.91], "selection_flip_rate": [0.98, 0.95, 0.92],
                            "n_select": 10,
                            "wave": ["6 periods across the columns, phase 1π/2",
                                     "12 periods across the rows, phase 0π/2", "9 periods across the rows, phase 0π/2"],
                            "edge_ratio": [0.2, 1.0, 0.6], "texture": [False, True, False],
                            "scrambled_flip_rate": [0.0, 0.1, 0.25], "sink": [False, True, True]}}
    text = render_text(report)
    assert "97.0%  6 periods across the columns, phase 1π/2  ANOMALOUS" in text
    assert "93.0%  12 periods across the rows, phase 0π/2 (texture: still rising at the top frequency)" in text
    assert "91.0%  9 periods across the rows, phase 0π/2 (sink: 25.0% with its pixels shuffled)\n" in text
    report.scan["wave"]["flip_rate"][2] = 0.5  # under the wave threshold: nothing was set aside, no note
    assert "50.0%  9 periods across the rows, phase 0π/2\n" in render_text(report)
    report.scan["wave"]["flip_rate"][2] = 0.91
    message = json.loads(render_sarif(report))["runs"][0]["results"][0]["message"]["text"]
    assert "grey plane wave (6 periods across the columns, phase 1π/2, amplitude 32/255) sends 97.0%" in message
    assert "sends 97.0% of held-out images to class 0, its pixels shuffled only 0.0% (anomalous" in message
    assert "natural stripe class" in message  # a clean model can react to a wave too (GTSRB's class 2)
    report.scan["params"]["wave_scrambled_max"] = 0.075
    report.scan["wave"]["scrambled_flip_rate"][0] = 0.08  # kept: the shuffled wave crossed, the response is tuned
    message = json.loads(render_sarif(report))["runs"][0]["results"][0]["message"]["text"]
    assert "its pixels shuffled 8.0% (but the response is tuned to one frequency: edge ratio 0.20)" in message
    failure = ET.fromstring(render_junit(report)).find(".//testcase[@name='scan']/failure")
    assert "6 periods across the columns" in failure.get("message")
    details = json.loads(failure.text)
    assert details["anomalous_kinds"] == {"0": ["wave"]} and details["wave"]["flip_rate"] == [0.97, 0.93, 0.91]


def test_text_and_sarif_name_the_noise_that_flagged_a_class():
    from bdsan.report import Report, render_sarif, render_text

    report = Report("scan")
    report.scan = {"anomalous": True, "anomalous_classes": [1], "anomalous_kinds": {"1": ["noise"]},
                   "suspected_target": 1, "mask_l1": [40.0, 38.0], "flip_rate": [0.6, 0.7],
                   "anomaly_index": [0.1, 0.2], "steps_run": 50, "time_s": 1.0, "n_opt": 10, "n_eval": 10,
                   "noise": {"take": [0.05, 0.99], "weight": 0.2, "draws": 3, "threshold": 0.7}}
    assert "   99.0%  ANOMALOUS" in render_text(report) and "noise take" in render_text(report)
    message = json.loads(render_sarif(report))["runs"][0]["results"][0]["message"]["text"]
    assert "grey noise blended at 20% sends 99.0% of held-out images to class 1" in message
    assert "noise-blend backdoor" in message
    report.scan["noise"]["form"] = ["grey", "colour"]  # the class's take came from colour noise
    message = json.loads(render_sarif(report))["runs"][0]["results"][0]["message"]["text"]
    assert "Fresh colour noise blended at 20% sends 99.0%" in message
    report.scan["anomalous_kinds"] = {"1": ["patch", "noise"]}  # a small patch too: the patch message
    message = json.loads(render_sarif(report))["runs"][0]["results"][0]["message"]["text"]
    assert "anomalously small patch trigger for class 1" in message


def test_text_and_sarif_name_the_mix_kind():
    from bdsan.report import Report, render_sarif, render_text

    report = Report("scan")
    report.scan = {"anomalous": True, "anomalous_classes": [0], "anomalous_kinds": {"0": ["mix"]},
                   "suspected_target": 0, "mask_l1": [40.0, 38.0, 39.0], "flip_rate": [0.6, 0.7, 0.7],
                   "anomaly_index": [0.1, 0.2, 0.0], "steps_run": 50, "time_s": 1.0, "n_opt": 10, "n_eval": 10,
                   "mix": {"alpha": [0.062, 0.141, 0.15], "flip_rate": [0.79, 0.7, 0.7], "anomaly_index": [4.24, 0, 0]}}
    text = render_text(report)
    assert "mix α" in text and " 0.062   79.0%     4.24  ANOMALOUS" in text
    message = json.loads(render_sarif(report))["runs"][0]["results"][0]["message"]["text"]
    assert "anomalously small mix (a full-image blend toward a picture" in message
