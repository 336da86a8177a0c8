"""sanitize --method dbr (ALGORITHMS §3 BR on §3b synthesised suspects): the toy backdoor unlearnt from a flagged
suite trigger, bounded ascent, and the no-trigger case."""
from __future__ import annotations

import copy

import pytest
import torch

from bdsan.detectors.triggers import get_trigger
from bdsan.errors import UsageError
from bdsan.io.data import split_holdout
from bdsan.sanitize.context import Context
from bdsan.sanitize.registry import get_method, list_methods
from bdsan.train.fixtures import corner_square


def _flagged_context() -> Context:
    """What the pipeline's fit audit hands a method for the toy: badnets_square flagged, target 0."""
    square = get_trigger("badnets_square")
    return Context(seed=0, max_acc_drop=3.0, known_triggers=[square],
                   trigger_evidence=[{"name": square.name, "suspected_target": 0, "asr_net": 1.0}])


def _toy_asr(model: torch.nn.Module, verify) -> float:
    x = verify.x[verify.y != 0].float().div(255)
    with torch.no_grad():
        return float((model.eval()(corner_square(x)).argmax(1) == 0).float().mean())


def _run(toy, **params):
    fit, verify = split_holdout(toy.holdout, 0.5, 0)
    model = copy.deepcopy(toy.model).normalized()
    return verify, model, get_method("dbr", **params).run(model, fit, _flagged_context())


def test_dbr_is_registered():
    assert "dbr" in list_methods()


# The toy's real trigger sits one pixel from the flagged suite square: relabelling the shifted proxies removes it;
# ascent on them (the paper's unlearning) unlearns the proxy (fit-val 0%) but only part of the real trigger: from
# > 0.9 to 0.54 on a 2-core AMD EPYC without AVX-512 (at most 0.5 on the AVX-512 and AMX machines before it).
@pytest.mark.parametrize(("mode", "max_real_asr"), [("ascent", 0.6), ("relabel", 0.2)])
def test_dbr_unlearns_the_toy_backdoor_within_the_guard(toy_poisoned, mode, max_real_asr):
    verify, _, result = _run(toy_poisoned, mode=mode, lr=0.001, epochs=10)
    assert _toy_asr(toy_poisoned.model.normalized(), verify) > 0.9
    assert _toy_asr(result.model, verify) <= max_real_asr
    assert result.details["triggers"] == [{"name": "badnets_square", "source": "audit", "target": 0}]
    guard = result.details["guard"]
    assert guard["selected"] != "input"
    selected = next(h for h in guard["history"] if h["label"] == guard["selected"])
    assert selected["accepted"] and selected["objective"] < guard["history"][0]["objective"]


def test_bounded_ascent_skips_batches_already_unlearnt(toy_poisoned):
    _, _, result = _run(toy_poisoned, epochs=1, max_ascent_ce=0.0)  # every batch is "unlearnt enough"
    epoch = result.details["epochs"][0]
    assert epoch["ascent_batches_skipped"] > 0 and result.details["max_ascent_ce"] == 0.0


def test_without_a_trigger_the_model_is_returned_unchanged(toy_poisoned):
    fit, _ = split_holdout(toy_poisoned.holdout, 0.5, 0)
    model = copy.deepcopy(toy_poisoned.model).normalized()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = get_method("dbr", scan="never").run(model, fit, Context(seed=0))
    assert "no trigger" in result.details["note"]
    assert all(torch.equal(v, result.model.state_dict()[k]) for k, v in before.items())


def test_dbr_rejects_bad_parameters():
    with pytest.raises(UsageError):
        get_method("dbr", mode="forget")
    with pytest.raises(UsageError):
        get_method("dbr", strength_min=2.0, strength_max=1.0)
    with pytest.raises(UsageError, match="needs mode=relabel"):
        get_method("dbr", suspect_classes="all")
    with pytest.raises(UsageError, match="scan_roam"):
        get_method("dbr", scan_roam=-1)


@pytest.mark.parametrize("method, extra", [("dbr", {}), ("fmp", {"rank": "triggers"})])
def test_dbr_and_fmp_hand_scan_keys_and_roam_to_the_scan(toy_poisoned, monkeypatch, method, extra):
    """``scan_keys`` / ``scan_roam`` reach ``gather_triggers`` (D-BR: off by default; FMP: ``scan_roam`` 4 in the
    bdsan recipe, 0 in the paper's); the fake stops the run there."""
    import importlib

    module = importlib.import_module(f"bdsan.sanitize.{method}")
    seen = []

    class Stop(Exception):
        pass

    def fake(*args, **kwargs):
        seen.append((kwargs.get("keys"), kwargs.get("roam")))
        raise Stop

    monkeypatch.setattr(module, "gather_triggers", fake)
    fit, _ = split_holdout(toy_poisoned.holdout, 0.5, 0)
    default_roam = 4 if method == "fmp" else 0
    for params, expected in [({}, (0, default_roam)), ({"scan_keys": 2, "scan_roam": 4}, (2, 4)),
                             ({"scan_roam": 0}, (0, 0))]:
        model = copy.deepcopy(toy_poisoned.model).normalized()
        with pytest.raises(Stop):
            get_method(method, **extra, **params).run(model, fit, Context(seed=0))
        assert seen[-1] == expected
    with pytest.raises(UsageError, match="scan_keys"):
        get_method(method, scan_keys=-1)
