"""``bdsan sanitize`` end to end through ``bdsan.cli.main`` (real exit codes, SPEC §3)."""
from __future__ import annotations

import json

FAST = ["--param", "rank_images=10", "--param", "epochs=6", "--param", "reference_images=0", "--param",
        "batch_size=64", "--triggers", "badnets_square,blend_noise"]


def test_sanitize_fmp_passes_and_writes_the_report(run_cli, poisoned_safetensors, holdout_npz, tmp_path):
    out = tmp_path / "clean"
    result = run_cli("sanitize", poisoned_safetensors, "--holdout", holdout_npz, "--method", "fmp", "--out", out,
                     *FAST, "-o", tmp_path / "r.json", "--quiet")
    assert result.code == 0, result.output
    assert "gate max_asr: PASS" in result.stdout and "ASR badnets_square" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["command"] == "sanitize" and report["exit_code"] == 0
    assert report["model"]["path"] == str(poisoned_safetensors)
    assert report["audit_export"]["triggers"][0]["asr_max"] <= 0.2 < report["audit_before"]["triggers"][0]["asr_max"]
    assert {a["path"] for a in report["artifacts"]} == {"model.onnx", "model.safetensors"}
    assert json.loads((out / "report.json").read_text())["artifacts"] == report["artifacts"]
    assert "load" in report["timings_s"]


def test_destructive_pruning_is_rolled_back_with_exit_1(run_cli, poisoned_safetensors, holdout_npz, tmp_path):
    out = tmp_path / "out"
    result = run_cli("sanitize", poisoned_safetensors, "--holdout", holdout_npz, "--out", out, "--format", "json",
                     "--param", "prune_ratio=0.9", "--param", "rank_images=5", "--param", "epochs=1",
                     "--param", "reference_images=0", "--param", "known_trigger_fraction=0",
                     "--triggers", "badnets_square")
    assert result.code == 1, result.output
    report = result.json
    guard = report["defense"]["guard"]
    assert guard["rolled_back"] is True and guard["drop_points"] > 3
    assert report["artifacts"] == [] and sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert "gate max_acc_drop failed" in result.stderr


def test_bad_inputs_exit_codes(run_cli, poisoned_safetensors, holdout_npz, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    result = run_cli("sanitize", poisoned_safetensors, "--holdout", holdout_npz, "--out", taken)
    assert result.code == 3 and "already exists" in result.stderr
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    result = run_cli("sanitize", poisoned_safetensors, "--holdout", holdout_npz, "--out", tmp_path / "x",
                     "--param", "prune_rate=0.1")
    assert result.code == 2 and "no parameter 'prune_rate'" in result.stderr
    result = run_cli("sanitize", poisoned_safetensors, "--holdout", holdout_npz, "--out", tmp_path / "x",
                     "--method", "nope")
    assert result.code == 2 and "unknown method" in result.stderr
    assert not (tmp_path / "x").exists()


def test_list_methods(run_cli):
    result = run_cli("sanitize", "--list-methods")
    assert result.code == 0 and "fmp" in result.stdout and "prune_ratio=" in result.stdout
    assert "rank_images=256  (depends on recipe)" in result.stdout  # resolved for the default recipe


def test_text_report_names_the_triggers_the_fit_split_scan_found():
    from bdsan.report import Report, render_sanitize_text

    report = Report("sanitize")
    report.defense = {"method": "unlearn", "params": {"scan_wave": True},
                      "details": {"triggers": [{"name": "badnets_grid", "source": "audit"},
                                               {"name": "scan_wave_class0", "source": "scan", "target": 0,
                                                "kind": "wave"},
                                               {"name": "scan_patch_class2", "source": "scan", "target": 2,
                                                "kind": "patch"}]}}
    text = render_sanitize_text(report)
    assert "  triggers the scan reconstructed on the fit split: wave → 0, patch → 2\n" in text
    fmp = {"method": "fmp", "params": {}, "details": {"finetune": {"trigger_sources": [
        {"name": "scan_wave_class0", "source": "scan", "target": 0, "kind": "wave"}]}}}
    report.defense = fmp  # FMP keeps its trigger sources under its fine-tuning details
    assert "  triggers the scan reconstructed on the fit split: wave → 0\n" in render_sanitize_text(report)
    fmp["details"]["finetune"]["trigger_sources"] = [{"name": "badnets_grid", "source": "audit"}]
    assert "scan reconstructed" not in render_sanitize_text(report)
    assert "roaming patches" not in render_sanitize_text(report)
    fmp["details"]["finetune"]["scan"] = {"roam": {"found": [
        {"name": "scan_patch_class2_roam", "flip": 0.9355, "kept": True},
        {"name": "badnets_grid_roam", "flip": 0.0762, "kept": False}]}}
    assert ("  roaming patches: scan_patch_class2_roam (flips 93.5%, used), badnets_grid_roam (flips 7.6%, not used)\n"
            in render_sanitize_text(report))


def test_text_report_gives_the_fresh_pictures_flips_epoch_by_epoch():
    from bdsan.report import Report, render_sanitize_text

    report = Report("sanitize")
    report.defense = {"method": "unlearn", "params": {"mix_refresh": True}, "details": {"epochs": [
        {"epoch": 1, "mix_refresh": [{"name": "scan_mix_class0_refresh1", "alpha": 0.203, "flip": 1.0, "kept": True}]},
        {"epoch": 2, "mix_refresh": [{"name": "scan_mix_class0_refresh2", "alpha": 0.203, "flip": 0.42,
                                      "kept": False}]}]}}
    assert ("  fresh pictures each epoch (mix_refresh, weight 0.203): flips 100.0% → 42.0%; 1 used\n"
            in render_sanitize_text(report))
    report.defense["details"]["epochs"] = [{"epoch": 1}]
    assert "fresh pictures" not in render_sanitize_text(report)


def test_text_report_says_how_unlearn_treated_batchnorm_and_why():
    from bdsan.report import Report, render_sanitize_text

    report = Report("sanitize")
    statistics = {"bn": "frozen", "lr": 0.00094, "stop_at_floor": False, "primary_target": 0,
                  "toward_primary": ["badnets_grid"], "full_image": [], "from_scan": []}
    report.defense = {"method": "unlearn", "params": {"bn": "auto"}, "details": {"statistics": statistics}}
    assert ("  BatchNorm statistics: frozen (every found trigger toward 0 is a suite patch); lr 0.00094; fine-tunes "
            "after pruning at the floor\n") in render_sanitize_text(report)
    statistics.update(bn="reestimate-augmented", lr=0.01, stop_at_floor=True, from_scan=["scan_patch_class0"])
    assert ("  BatchNorm statistics: reestimate-augmented (a trigger only the scan found points at 0: "
            "scan_patch_class0); lr 0.01; stops after pruning at the floor\n") in render_sanitize_text(report)
    statistics.update(bn="reestimate-augmented", lr=0.01, stop_at_floor=True, full_image=["blend_noise"])
    assert ("  BatchNorm statistics: reestimate-augmented (a full-image trigger points at 0: blend_noise); lr 0.01; "
            "stops after pruning at the floor\n") in render_sanitize_text(report)
    statistics.update(few_images_per_class=True, fit_train_per_class=2.02, prune_ratio=0.0, stamp_fraction=0.1)
    assert ("; lr 0.01; 2.02 fit-train images per class: nothing pruned, 10% of each batch stamped\n"
            in render_sanitize_text(report))
    report.defense["details"] = {}
    assert "BatchNorm statistics" not in render_sanitize_text(report)
