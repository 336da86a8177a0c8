"""benchmarks/run.py end to end at toy scale: generated data, tiny_cnn, one attack, none + ft (FMP has its own
tests; the harness treats every registered method alike)."""
import importlib.util
import json
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(RUN_PY.parent))  # as `python benchmarks/run.py` does: its sibling modules import
        spec = importlib.util.spec_from_file_location("bdsan_bench_run", RUN_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_harness_runs_end_to_end_at_toy_scale(bench, tmp_path):
    pytest.importorskip("bdsan.sanitize.pipeline")
    defenses = ["none", "ft"]
    out = tmp_path / "bench"
    argv = ["--data", "synthetic", "--synthetic-n", "1200", "--recipe", "toy", "--attacks", "badnets_grid",
            "--holdout-fraction", "0.25", "--defenses", *defenses, "--param", "ft.epochs=2",
            "--device", "cpu",
            "--out", str(out), "--cache", str(tmp_path / "cache")]
    results = bench.main(argv)

    runs = {run["defense"]: run for run in results["runs"]}
    assert set(runs) == set(defenses)
    assert all("error" not in run for run in runs.values()), [r.get("error") for r in runs.values()]
    none = runs["none"]
    assert none["before"]["asr"] > 0.9 and none["before"]["ca"] > 0.8
    assert none["after"] == none["before"]
    assert none["holdout"] == 300 and none["poisoned"] == 90  # 10% of the 900 training images
    for defense in defenses[1:]:
        run = runs[defense]
        assert run["before"] == none["before"]
        assert 0.0 <= run["after"]["asr"] <= 1.0
        assert run["defense_seconds"] > 0 and run["timings_s"]
        assert run["suite_before"]["max_asr"] is not None
        assert run["holdout_split"] == {"fit": 150, "verify": 150}
        known = {t["name"]: t for t in run["known_triggers"]}  # the fit audit's evidence, kept with the row
        assert known["badnets_grid"]["suspected_target"] == 0 and known["badnets_grid"]["asr_net"] >= 0.5

    saved = json.loads((out / "results.json").read_text())
    assert [r["defense"] for r in saved["summary"]] == defenses
    table = (out / "results.md").read_text()
    assert "| badnets_grid | ft |" in table and "ASR before" in table
    assert "target recall after" in table and table.count("| badnets_grid | ft |") == 2
    assert 0.0 <= none["before"]["target_recall"] <= 1.0 and none["before"]["n_target"] > 0
    assert (out / "asr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = bench.main(argv[:-4] + ["--defenses", "none", "ft", "--fit-fraction", "0.8",
                                    "--out", str(tmp_path / "again"), "--cache", str(tmp_path / "cache")])
    assert again["runs"][0]["from_cache"] and again["runs"][0]["before"] == none["before"]
    assert again["fit_fraction"] == 0.8 and again["runs"][1]["holdout_split"] == {"fit": 240, "verify": 60}
    table = (tmp_path / "again" / "results.md").read_text()
    assert "fit fraction 0.8" in table
    assert f"| {none['train_seconds']:.0f} (cached) |" in table  # the cached model's training time, from its meta


@pytest.mark.parametrize("defense, message", [("unlern", "unknown method 'unlern'"),
                                              ("ft:epochs=x", "epochs='x': invalid literal")])
def test_harness_refuses_a_bad_defense_before_training(bench, tmp_path, defense, message):
    pytest.importorskip("bdsan.sanitize.pipeline")
    argv = ["--data", "synthetic", "--synthetic-n", "1200", "--recipe", "toy", "--defenses", "none", defense,
            "--device", "cpu", "--out", str(tmp_path / "bench"), "--cache", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match=message):
        bench.main(argv)
    assert not (tmp_path / "cache").exists()  # nothing was trained


def test_summary_mean_and_std_over_seeds(bench):
    results = {"runs": [
        {"seed": 0, "attack": "a", "defense": "ft", "train_seconds": 1.0, "from_cache": False, "defense_seconds": 2.0,
         "before": {"ca": 0.9, "asr": 1.0, "ra": 0.0}, "after": {"ca": 0.8, "asr": 0.2, "ra": 0.7}},
        {"seed": 1, "attack": "a", "defense": "ft", "train_seconds": 3.0, "from_cache": False, "defense_seconds": 4.0,
         "before": {"ca": 0.7, "asr": 1.0, "ra": 0.0}, "after": {"ca": 0.6, "asr": 0.4, "ra": 0.5}},
    ]}
    (row,) = bench.summarize(results)
    assert row["ca_before"] == pytest.approx((0.8, 0.1414213562))
    assert row["asr_after"] == pytest.approx((0.3, 0.1414213562))
    assert row["train_seconds"] == pytest.approx((2.0, 1.4142135623))


def test_details_summary_keeps_the_guards_choice_and_the_pruning_decision(bench):
    history = [{"label": "input", "ca_fit_val": 0.9, "accepted": True},
               {"label": "pruned", "ca_fit_val": 0.8, "drop_points": 10.0, "objective": 0.01, "objective_se": 0.005,
                "accepted": True}]
    details = {"fit_train": 10, "fit_val": 2, "guard": {"selected": "pruned", "history": history},
               "pruned": {"n_pruned": 3, "target_rate_fit": 0.01, "untriggered_rate_fit": 0.02, "at_floor": True,
                          "layers": {"conv": [0, 1, 2]}, "by_trigger": [{"name": "badnets_grid", "target": 0}]}}
    summary = bench._details_summary(details)
    assert summary.pop("guard_history") == [  # each state's label, fit-val CA and objective; not the drop
        history[0], {k: v for k, v in history[1].items() if k != "drop_points"}]
    assert summary == {"fit_train": 10, "fit_val": 2, "selected": "pruned",
                       "pruned": {"n_pruned": 3, "target_rate_fit": 0.01, "untriggered_rate_fit": 0.02,
                                  "at_floor": True, "by_trigger": [{"name": "badnets_grid", "target": 0}]}}
    assert bench._details_summary({"fit_train": 1}) == {"fit_train": 1}
    epochs = [{"epoch": 1, "ce": 0.5, "reg": 0.1, "target-rate_fit_val": 0.02}]  # unlearn's per-epoch log
    assert bench._details_summary({"fit_train": 1, "epochs": epochs}) == {"fit_train": 1, "epochs": epochs}
    used = [{"name": "scan_wave_class0", "source": "scan", "target": 0, "kind": "wave"}]
    scan = {"suspected_target": 0, "anomalous_kinds": {"0": ["wave"]}, "mask_l1": [1.0, 2.0]}
    assert bench._details_summary({"triggers": used, "scan": scan}) == {
        "triggers": used, "scan": {"suspected_target": 0, "anomalous_kinds": {"0": ["wave"]}}}
    fmp = {"finetune": {"trigger_sources": used, "scan": scan}}  # FMP keeps them under its fine-tuning
    assert bench._details_summary(fmp) == bench._details_summary({"triggers": used, "scan": scan})
