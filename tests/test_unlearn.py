"""sanitize --method unlearn: removes a backdoor whose trigger only the scan found, within the accuracy guard."""
from __future__ import annotations

import copy

import pytest
import scan_helpers
import torch
from scan_helpers import trigger_asr

from bdsan.io.data import split_holdout
from bdsan.sanitize.context import Context
from bdsan.sanitize.registry import get_method, list_methods


@pytest.fixture(scope="module")
def unlearned():
    toy = scan_helpers.unknown_patch_toy()
    fit, verify = split_holdout(toy.holdout, 0.5, 0)
    model = copy.deepcopy(toy.model).normalized()
    asr_before = trigger_asr(model, verify.x, verify.y)
    ctx = Context(device=torch.device("cpu"), seed=0, batch_size=256, max_acc_drop=3.0)  # no known triggers
    result = get_method("unlearn", epochs=5, scan_steps=150).run(model, fit, ctx)
    return toy, fit, verify, asr_before, result


def test_unlearn_is_registered():
    assert "unlearn" in list_methods()


def test_unlearn_removes_a_trigger_only_the_scan_knows(unlearned):
    _, _, verify, asr_before, result = unlearned
    assert asr_before > 0.8
    # On the 180 fit-train images the scan may rank class 2 first without flagging it (5 classes make MAD noisy);
    # unlearn then uses the most suspicious class's reconstructions. Either way only reconstructed triggers are used.
    assert result.details["scan"]["suspected_target"] == scan_helpers.UNKNOWN_TARGET
    assert [t["source"] for t in result.details["triggers"]] and all(
        t["source"] == "scan" for t in result.details["triggers"])
    assert trigger_asr(result.model, verify.x, verify.y) <= 0.2  # the sanitize gate's default --max-asr


def test_unlearn_keeps_fit_accuracy_within_the_guard(unlearned):
    _, _, _, _, result = unlearned
    guard = result.details["guard"]
    selected = next(h for h in guard["history"] if h["label"] == guard["selected"])
    assert selected["accepted"] and selected.get("drop_points", 0.0) <= guard["max_acc_drop"]
    assert guard["selected"] != "input"


def test_unlearn_rejects_bad_parameters():
    from bdsan.errors import UsageError

    with pytest.raises(UsageError):
        get_method("unlearn", regularizer="magic")
    with pytest.raises(UsageError):
        get_method("unlearn", distill_mode="magic")
    with pytest.raises(UsageError, match="precision must be one of"):
        get_method("unlearn", precision="fp16")


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_unlearn_fine_tunes_in_either_precision_and_gives_the_weight_layout_back(precision):
    toy = scan_helpers.unknown_patch_toy()
    fit, _ = split_holdout(toy.holdout, 0.5, 0)
    model = copy.deepcopy(toy.model).normalized()
    ctx = Context(device=torch.device("cpu"), seed=0, batch_size=256, max_acc_drop=100.0)
    result = get_method("unlearn", epochs=1, scan_steps=50, precision=precision).run(model, fit, ctx)
    assert len(result.details["epochs"]) == 1, "the fine-tuning ran"
    assert all(p.is_contiguous() for p in result.model.parameters())  # channels_last was only for the passes


def test_suppress_target_removes_the_teachers_target_mass_only_off_target():
    from bdsan.sanitize.losses import teacher_targets

    logits = torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([1, 0, 2])
    fixed, rows = teacher_targets(logits, labels, [0], "suppress-target")
    probs = fixed.softmax(1)
    assert rows.all()
    assert probs[0, 0] < 1e-6 and probs[2, 0] < 1e-6  # images of other classes: no mass on the suspected target
    assert torch.equal(fixed[1], logits[1])  # an image of the target class keeps its outputs
    assert torch.equal(logits[0], torch.tensor([3.0, 1.0, 0.0]))  # the input is not modified in place
    assert torch.equal(teacher_targets(logits, labels, [0], "all")[0], logits)


def test_agree_distils_only_where_the_teacher_is_right():
    from bdsan.sanitize.losses import teacher_targets

    logits = torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    _, rows = teacher_targets(logits, torch.tensor([1, 0, 2]), [0], "agree")
    assert rows.tolist() == [False, True, False]


def test_consistency_on_stamped_images_removes_the_trigger_too():
    """``stamped_loss=consistency``: stamped images are pulled to the input model's clean-image answers (no labels)."""
    toy = scan_helpers.unknown_patch_toy()
    fit, verify = split_holdout(toy.holdout, 0.5, 0)
    model = copy.deepcopy(toy.model).normalized()
    assert trigger_asr(model, verify.x, verify.y) > 0.8
    ctx = Context(device=torch.device("cpu"), seed=0, batch_size=256, max_acc_drop=3.0)
    result = get_method("unlearn", epochs=5, scan_steps=150, stamped_loss="consistency").run(model, fit, ctx)
    assert result.details["guard"]["selected"] != "input"
    assert trigger_asr(result.model, verify.x, verify.y) <= 0.2
    with pytest.raises(Exception, match="stamped_loss must be one of"):
        get_method("unlearn", stamped_loss="kl")
