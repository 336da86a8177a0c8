"""benchmarks/probe.py's hooks: they wrap unlearn's pruning step and the fit-val guard to measure every state on
development images, and must follow those functions' return shapes (a refactor once broke them unnoticed)."""
import copy
import importlib.util
from pathlib import Path

import pytest

from bdsan.detectors.triggers import get_trigger
from bdsan.io.data import split_holdout
from bdsan.sanitize.context import Context
from bdsan.sanitize.guard import FitValGuard
from bdsan.sanitize.registry import get_method
from bdsan.sanitize.unlearn import Unlearn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def probe(monkeypatch):
    spec = importlib.util.spec_from_file_location("bdsan_bench_probe", BENCHMARKS / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # the hooks replace these class attributes; monkeypatch puts the originals back after the test
    monkeypatch.setattr(FitValGuard, "check", FitValGuard.check)
    monkeypatch.setattr(Unlearn, "_prune_step", Unlearn._prune_step)
    return module


def test_probe_measures_every_pruning_step_and_guard_check(probe, toy_poisoned, capsys):
    measured = []

    def measure(model) -> dict:
        measured.append(model)
        return {"ca": 0.5, "asr": 0.25, "untriggered": 0.1}

    trajectory = probe._watch_guard(measure)
    fit, _ = split_holdout(toy_poisoned.holdout, 0.5, 0)
    ctx = Context(seed=0, known_triggers=[get_trigger("badnets_square")], max_acc_drop=5.0)
    method = get_method("unlearn", prune_ratio=0.1, prune_images=48, epochs=1, scan="never", stop_at_floor=False)
    method.run(copy.deepcopy(toy_poisoned.model).normalized(), fit, ctx)

    labels = [step["label"] for step in trajectory]
    pruning = [step for step in trajectory if step["label"].startswith("prune ")]
    assert pruning and all(0.0 <= step["target_rate_fit"] <= 1.0 for step in pruning)
    assert labels[len(pruning):] == ["pruned", "epoch 1"]
    assert len(measured) == len(trajectory)
    printed = capsys.readouterr().out
    assert "fit target rate" in printed and "epoch 1: dev CA 50.0  ASR 25.0" in printed
