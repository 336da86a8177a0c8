"""sanitize --method unlearn: removes a backdoor whose trigger only the scan found, within the accuracy guard."""
from __future__ import annotations

import copy
import functools
import itertools
import statistics

import pytest
import scan_helpers
import torch
from scan_helpers import trigger_asr

from bdsan.detectors.triggers import sig
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
    assert (guard["tie"], guard["pick"]) == ("difference", "latest")  # select=latest-within-diff-se, the default


def test_scan_wave_gives_unlearn_a_sine_only_the_wave_kind_knows():
    """A SIG backdoor the audit did not flag: with ``scan_wave`` the fit-split scan's wave kind flags the target and
    unlearn stamps that plane wave (not the real sine); the real trigger's ASR goes under the gate."""
    toy = scan_helpers.sig_toy()
    fit, verify = split_holdout(toy.holdout, 0.5, 0)
    model = copy.deepcopy(toy.model).normalized()
    asr = functools.partial(trigger_asr, x_uint8=verify.x, y=verify.y, trigger=sig)
    assert asr(model) > 0.8
    ctx = Context(device=torch.device("cpu"), seed=0, batch_size=256, max_acc_drop=3.0)  # no known triggers
    result = get_method("unlearn", epochs=5, scan_steps=150, scan_wave=True).run(model, fit, ctx)
    used = result.details["triggers"]
    assert {"name": f"scan_wave_class{scan_helpers.UNKNOWN_TARGET}", "source": "scan",
            "target": scan_helpers.UNKNOWN_TARGET, "kind": "wave"} in used
    assert all(t["source"] == "scan" for t in used)
    assert "wave" in result.details["scan"]["anomalous_kinds"][str(scan_helpers.UNKNOWN_TARGET)]
    assert result.details["scan"]["wave"]["flip_rate"][scan_helpers.UNKNOWN_TARGET] >= 0.9
    assert asr(result.model) <= 0.2


def test_mix_refresh_removes_a_picture_blend_the_found_picture_alone_leaves():
    """An image-blend backdoor (a picture blended at 0.2): unlearn with the mix kind's reconstruction alone leaves
    much of it (about half on this toy: the scan's picture works at a smaller weight than the real one); with
    ``mix_refresh`` a fresh picture toward the class, blended at twice the scan's median class's α (the default
    scale) and optimised against the model of each epoch, is stamped too, and the real trigger goes under the gate."""
    toy = scan_helpers.picture_blend_toy()
    fit, verify = split_holdout(toy.holdout, 0.5, 0)
    asr = functools.partial(trigger_asr, x_uint8=verify.x, y=verify.y, trigger=scan_helpers.blended_picture)
    results = {}
    for refresh in (False, True):
        model = copy.deepcopy(toy.model).normalized()
        ctx = Context(device=torch.device("cpu"), seed=0, batch_size=256, max_acc_drop=3.0)
        results[refresh] = get_method("unlearn", epochs=5, scan_steps=150, scan_mix_kind=True,
                                      mix_refresh=refresh).run(model, fit, ctx)
    assert asr(toy.model.normalized()) > 0.8
    assert asr(results[False].model) > 0.3 and asr(results[True].model) <= 0.2
    median_alpha = statistics.median(results[True].details["scan"]["mix"]["alpha"])
    tried = [entry for epoch in results[True].details["epochs"] for entry in epoch["mix_refresh"]]
    assert len(tried) == 5 and all(entry["alpha"] == round(2 * median_alpha, 4) for entry in tried)
    assert all("mix_refresh" not in epoch for epoch in results[False].details["epochs"])


def test_unlearn_rejects_bad_parameters():
    from bdsan.errors import UsageError

    with pytest.raises(UsageError):
        get_method("unlearn", regularizer="magic")
    with pytest.raises(UsageError):
        get_method("unlearn", distill_mode="magic")
    with pytest.raises(UsageError, match="precision must be one of"):
        get_method("unlearn", precision="fp16")
    with pytest.raises(UsageError, match="wave_phase must be one of random, found"):
        get_method("unlearn", wave_phase="exact")
    with pytest.raises(UsageError, match="wave_strength_min ≤ wave_strength_max"):
        get_method("unlearn", wave_strength_min=2.0, wave_strength_max=1.5)
    with pytest.raises(UsageError, match="mix_refresh_alpha must be one of median, own"):
        get_method("unlearn", mix_refresh_alpha="largest")
    with pytest.raises(UsageError, match="mix_refresh_scale > 0"):
        get_method("unlearn", mix_refresh_scale=0)


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


def test_clean_rows_only_distilled_still_remove_the_trigger():
    """``clean_ce=false``: the clean rows carry no cross-entropy (distillation only); the stamped rows' true labels
    still unlearn the trigger. Without distillation the clean rows would be unconstrained: refused."""
    toy = scan_helpers.unknown_patch_toy()
    fit, verify = split_holdout(toy.holdout, 0.5, 0)
    model = copy.deepcopy(toy.model).normalized()
    ctx = Context(device=torch.device("cpu"), seed=0, batch_size=256, max_acc_drop=3.0)
    result = get_method("unlearn", epochs=5, scan_steps=150, clean_ce=False).run(model, fit, ctx)
    assert result.details["guard"]["selected"] != "input"
    assert trigger_asr(result.model, verify.x, verify.y) <= 0.2
    with pytest.raises(Exception, match="clean_ce=false needs regularizer=distill"):
        get_method("unlearn", clean_ce=False, regularizer="l2")


def test_pruning_stage_keeps_the_trigger_channels_dead_and_stamps_only_patches(toy_poisoned):
    """``prune_ratio``: the channels the found triggers excite most are zeroed before fine-tuning and stay zero
    (reported as ``hard_pruned`` for the slim export); ``stamp=patches`` leaves full-image triggers out of the
    fine-tuning batches (the pruning handles them) while patches are still stamped."""
    from bdsan.detectors.triggers import get_trigger
    from bdsan.train.fixtures import corner_square
    from bdsan.train.loop import predict

    fit, verify = split_holdout(toy_poisoned.holdout, 0.5, 0)
    ctx = Context(seed=0, known_triggers=[get_trigger("badnets_square"), get_trigger("blend_noise")],
                  max_acc_drop=5.0)
    method = get_method("unlearn", prune_ratio=0.1, prune_images=48, epochs=2, stamp="patches", scan="never",
                        stop_at_floor=False)
    result = method.run(copy.deepcopy(toy_poisoned.model).normalized(), fit, ctx)
    details = result.details
    assert details["stamped_triggers"] == ["badnets_square"]
    assert details["pruned"]["n_pruned"] > 0 and details["hard_pruned"]
    by_trigger = details["pruned"]["by_trigger"]  # what each found trigger still does after pruning, and its floor
    assert [t["name"] for t in by_trigger] == ["badnets_square", "blend_noise"]
    for key in ("target_rate_fit", "untriggered_rate_fit"):
        assert sum(t[key] for t in by_trigger) / 2 == pytest.approx(details["pruned"][key])
    modules = dict(result.model.named_modules())
    for name, channels in details["hard_pruned"].items():
        assert modules[name].weight.detach()[channels].abs().sum() == 0, "a pruned channel grew back"
    assert [h["label"] for h in details["guard"]["history"]][:3] == ["input", "pruned", "epoch 1"]
    keep = verify.y != 0
    assert float((predict(result.model, verify.x[keep], transform=corner_square) == 0).float().mean()) <= 0.2
    with pytest.raises(Exception, match="stamp must be one of"):
        get_method("unlearn", stamp="blends")
    with pytest.raises(Exception, match="prune_ratio"):
        get_method("unlearn", prune_ratio=1.5)


def test_target_rate_counts_only_other_classes_sent_to_the_trigger_target():
    """The guard's default objective: of the stamped fit-val images whose class is not the trigger's suspected
    target, the share predicted as that target; a trigger with no known target counts its triggered error."""
    from bdsan.detectors.triggers import get_trigger
    from bdsan.io.data import Holdout
    from bdsan.sanitize.unlearn import _target_rate

    class AlwaysZeroExceptClassTwo(torch.nn.Module):  # predicts 0 for every image but the last two, 2 for those
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # predict() reads the device from a parameter

        def forward(self, x):
            logits = torch.zeros(len(x), 3)
            logits[:, 0] = 1.0
            logits[-2:, 2] = 2.0
            return logits

    x = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    fit_val = Holdout(x=x, y=torch.tensor([0, 0, 1, 1, 2, 2]), classes=["a", "b", "c"], path="synthetic")
    trigger = get_trigger("badnets_square")
    rate, n = _target_rate(AlwaysZeroExceptClassTwo(), fit_val, [trigger], {trigger.name: 0}, 64)
    assert n == 4 and rate == 0.5  # images of classes 1, 1, 2, 2: the first two go to 0, the last two to 2
    rate, n = _target_rate(AlwaysZeroExceptClassTwo(), fit_val, [trigger], {trigger.name: None}, 64)
    assert n == 6 and abs(rate - 2 / 6) < 1e-6  # no target known: triggered error (the two class-1 images)
    assert _target_rate(AlwaysZeroExceptClassTwo(), fit_val, [], {}, 64) == (None, 0)


def test_pruning_is_enough_only_at_the_untriggered_floor():
    """The fine-tuning is skipped only when the pruned model's triggered target rate is within two standard errors
    of the input model's untriggered rate into the same targets."""
    from bdsan.sanitize.unlearn import _at_floor

    assert _at_floor((0.020, 1000), (0.015, 1000))  # 0.5 points above a 1.5% floor: 1.0 SE, at the floor
    assert not _at_floor((0.100, 1000), (0.015, 1000))  # a tenth of the images still follow the trigger
    assert not _at_floor((0.040, 100), (0.0, 100))  # 4 of 100 against none: 2.04 SE, not at the floor
    assert not _at_floor((None, 0), (0.015, 1000)) and not _at_floor((0.0, 0), (0.0, 0))
    # 5 of 225 against 2 of 225: 1.1 SE on 225 images, but 2.4 SE when the errors are taken on 1,000 images
    assert _at_floor((5 / 225, 225), (2 / 225, 225), z=2.0)
    assert not _at_floor((5 / 225, 225), (2 / 225, 225), z=2.0, se_images=1000)
    assert _at_floor((0.020, 1125), (0.015, 1125), se_images=1000) == _at_floor((0.020, 1125), (0.015, 1125))


@pytest.mark.parametrize("reference, expected", [("floor", 5), ("best", 10)])
def test_fewest_schedule_prunes_the_fewest_channels_that_reach_the_reference(toy_poisoned, monkeypatch, reference,
                                                                              expected):
    """``prune_schedule=fewest`` brackets the count by doubling, bisects, and leaves exactly that many of the most
    trigger-excited channels zeroed (channels zeroed by steps it tried and went back from are restored). The
    reference is the untriggered floor, or (``best``) the lower of it and what pruning every candidate reaches."""
    from bdsan.detectors.triggers import get_trigger
    from bdsan.sanitize.unlearn import Unlearn

    original = Unlearn._prune_step
    tried = []

    def rate_falls_at_five_then_ten(model, fit, triggers, targets, chosen, pairs, batch_size):
        mask, _ = original(model, fit, triggers, targets, chosen, pairs, batch_size)
        size = sum(len(c) for c in chosen.values())
        tried.append(size)
        return mask, [("badnets_square", 1.0 if size < 5 else 0.05 if size < 10 else 0.0, 1000)]

    monkeypatch.setattr(Unlearn, "_prune_step", staticmethod(rate_falls_at_five_then_ten))
    model = copy.deepcopy(toy_poisoned.model).normalized()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fit, _ = split_holdout(toy_poisoned.holdout, 0.5, 0)
    method = get_method("unlearn", prune_ratio=0.25, prune_images=48, prune_schedule="fewest",
                        fewest_reference=reference)
    mask, summary, rates = method._prune(model, fit, fit, [get_trigger("badnets_square")], {"badnets_square": 0},
                                         (0.06, 1000), Context(seed=0))
    assert summary["n_selected"] >= 16 and [t for t in tried if t < summary["n_selected"]][:4] == [1, 2, 4, 8]
    assert summary["n_pruned"] == expected and rates == [("badnets_square", 0.05 if expected == 5 else 0.0, 1000)]
    assert sum(len(c) for c in summary["layers"].values()) == expected
    mask.apply()  # the returned mask is the kept state's: re-applying it zeroes nothing more
    zeroed = sum(int((p.detach().flatten(1).abs().sum(1) == 0).sum() - (before[name].flatten(1).abs().sum(1) == 0)
                     .sum()) for name, p in model.named_parameters() if name.endswith("weight") and p.dim() == 4)
    assert zeroed == expected, "channels of abandoned steps were not restored"
    with pytest.raises(Exception, match="prune_schedule must be one of"):
        get_method("unlearn", prune_schedule="greedy")
    with pytest.raises(Exception, match="fewest_reference must be one of"):
        get_method("unlearn", fewest_reference="median")


def test_shifted_statistics_keep_the_delivered_ones_until_the_weights_change(toy_poisoned):
    """``bn=reestimate-shift``: the fit images' estimation error cancels — unchanged weights keep the delivered
    running statistics exactly (plain re-estimation replaces them) — while a weight change moves them by the change
    it makes on the fit images."""
    from torch import nn

    from bdsan.sanitize.batchnorm import ShiftedStatistics, reestimate_bn

    model = copy.deepcopy(toy_poisoned.model).normalized()
    fit, _ = split_holdout(toy_poisoned.holdout, 0.5, 0)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    delivered = bn.running_mean.clone(), bn.running_var.clone()
    shift = ShiftedStatistics(fit, 64, True, seed=3)
    shift.start(model)
    shift.checkpoint(model)
    assert torch.allclose(bn.running_mean, delivered[0], atol=1e-6) and torch.allclose(bn.running_var, delivered[1])
    reestimated = copy.deepcopy(model)
    reestimate_bn(reestimated, fit, 64)
    assert not torch.allclose(next(m for m in reestimated.modules() if isinstance(m, nn.BatchNorm2d)).running_mean,
                              delivered[0])
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():  # the first conv layer's output doubles: its BN's mean doubles, its variance quadruples
        conv.weight.mul_(2.0)
        if conv.bias is not None:
            conv.bias.mul_(2.0)
    shift.checkpoint(model)
    reference = shift.reference[next(n for n, m in model.named_modules() if m is bn)]
    assert torch.allclose(bn.running_mean, delivered[0] + reference[0], atol=1e-5)
    assert torch.allclose(bn.running_var, delivered[1] * 4, rtol=1e-3)
    with pytest.raises(Exception, match="bn must be one of"):
        get_method("fmp", bn="reestimate-shift")


def test_bn_auto_keeps_the_statistics_only_when_every_trigger_toward_the_primary_target_is_a_suite_patch(
        toy_poisoned):
    """``bn=auto``: the primary target is the found trigger's that fires most above its untriggered rate; suite
    patches only toward it → frozen statistics, a calibrated lr, fine-tune even at the floor; a full-image trigger
    or one only the scan found toward it → the re-estimation as before. A trigger toward another class does not
    decide."""
    from bdsan.detectors.triggers import Trigger, get_trigger
    from bdsan.sanitize.unlearn import _target_rates
    from bdsan.train.fixtures import corner_square

    fit, _ = split_holdout(toy_poisoned.holdout, 0.5, 0)
    model = copy.deepcopy(toy_poisoned.model).normalized().eval()
    triggers = [Trigger("planted", {}, lambda x: corner_square(x)), get_trigger("blend_noise")]

    def settings(blend_target: int, **params) -> dict:
        targets = {"planted": 0, "blend_noise": blend_target}
        floors = _target_rates(model, fit, triggers, targets, 256, stamped=False)
        return get_method("unlearn", **params)._settings(model, fit, fit, triggers, targets, floors, 256)

    patch = settings(3)
    assert (patch["primary_target"], patch["toward_primary"], patch["full_image"]) == (0, ["planted"], [])
    assert (patch["bn"], patch["lr"], patch["stop_at_floor"]) == ("frozen", None, False)  # lr: calibrated later
    mixed = settings(0)
    assert mixed["full_image"] == ["blend_noise"]
    assert (mixed["bn"], mixed["lr"], mixed["stop_at_floor"]) == ("reestimate-augmented", 0.01, True)
    explicit = settings(3, lr="0.005", stop_at_floor="true")
    assert (explicit["bn"], explicit["lr"], explicit["stop_at_floor"]) == ("frozen", 0.005, True)
    triggers[0] = Trigger("planted", {"source": "scan", "kind": "patch"}, lambda x, **_: corner_square(x))
    scanned = settings(3)  # the same patch, but only the scan found it: statistics re-estimated
    assert (scanned["from_scan"], scanned["bn"], scanned["lr"], scanned["stop_at_floor"]) == (
        ["planted"], "reestimate-augmented", 0.01, True)
    earlier = settings(3, bn="reestimate-augmented")
    assert (earlier["bn"], earlier["lr"], earlier["stop_at_floor"]) == ("reestimate-augmented", 0.01, True)
    assert "primary_target" not in earlier
    with pytest.raises(Exception, match="lr must be auto"):
        get_method("unlearn", lr="fast")
    with pytest.raises(Exception, match="bn must be one of"):
        get_method("fmp", bn="auto")


def test_few_images_per_class_with_reestimated_statistics_skip_pruning_and_stamp_less(toy_poisoned,
                                                                                      stamped_shares):
    """``few_per_class``: with re-estimated statistics and fewer fit-train images per class than that, nothing is
    pruned, mixes are distilled and ``few_stamp_fraction`` of each batch (training and BatchNorm batches) is stamped
    (a fifth with the mixes, a tenth without); with more images per class, or with frozen statistics, the defaults'
    pruning and share stand."""
    from bdsan.detectors.triggers import get_trigger
    from bdsan.sanitize import unlearn

    fit, _ = split_holdout(toy_poisoned.holdout, 0.5, 0)  # 200 images, 5 classes: 36 fit-train images per class
    ctx = Context(seed=0, known_triggers=[get_trigger("badnets_square"), get_trigger("blend_noise")],
                  max_acc_drop=5.0)
    shares = stamped_shares(unlearn)
    run = functools.partial(get_method, "unlearn", epochs=1, scan="never", bn="reestimate-augmented",
                            prune_images=48, stop_at_floor=False)
    few = run(few_per_class=40).run(copy.deepcopy(toy_poisoned.model).normalized(), fit, ctx).details
    assert few["statistics"]["fit_train_per_class"] == 36 and few["statistics"]["few_images_per_class"]
    assert (few["statistics"]["prune_ratio"], few["statistics"]["stamp_fraction"]) == (0.0, 0.2)
    assert few["statistics"]["mix_distill"] == 1.0
    assert "pruned" not in few and [h["label"] for h in few["guard"]["history"]] == ["input", "epoch 1"]
    assert shares and set(shares) == {0.2}
    train, _ = ctx.fit_val_split(fit, 0.1)

    def settings(**params) -> dict:  # bn given: nothing measured, only the rule applied
        return run(**params)._settings(toy_poisoned.model, fit, train, [], {}, [], 256)

    many = settings()  # few_per_class=5
    assert (many["few_images_per_class"], many["prune_ratio"], many["stamp_fraction"]) == (False, 1 / 64, 0.5)
    frozen = settings(few_per_class=40, bn="frozen")
    assert (frozen["few_images_per_class"], frozen["prune_ratio"], frozen["stamp_fraction"]) == (False, 1 / 64, 0.5)
    assert settings(few_per_class=40)["few_images_per_class"]
    # mix_distill=auto mixes only where the few-images rule applies (and only with distillation)
    assert settings(few_per_class=40, mix_distill="auto")["mix_distill"] == 1.0
    assert settings(mix_distill="auto")["mix_distill"] == 0.0
    assert settings(few_per_class=40, bn="frozen", mix_distill="auto")["mix_distill"] == 0.0
    assert settings(few_per_class=40, mix_distill="auto", regularizer="l2")["mix_distill"] == 0.0
    assert settings(few_per_class=40, mix_distill=0.5)["mix_distill"] == 0.5
    # few_stamp_fraction=auto: a fifth of the clean rows with the mixes, a tenth without; a number as given
    assert settings(few_per_class=40, mix_distill=0)["stamp_fraction"] == 0.1
    assert settings(few_per_class=40, few_stamp_fraction=0.3)["stamp_fraction"] == 0.3
    for wrong in (0, "half"):
        with pytest.raises(Exception, match="few_stamp_fraction"):
            get_method("unlearn", few_stamp_fraction=wrong)


def test_frozen_statistics_lr_sets_the_median_conv_step_and_leaves_the_statistics_alone(toy_poisoned):
    """The lr for frozen BatchNorm statistics: one step moves the median conv layer by ``FROZEN_STEP`` of its norm
    (at most ``cap``), so a model whose weights are larger for the same function gets a larger lr; the running
    statistics are not touched and no gradient is left behind."""
    from bdsan.sanitize.unlearn import FROZEN_STEP, frozen_statistics_lr

    model = copy.deepcopy(toy_poisoned.model).normalized()
    x, y = toy_poisoned.holdout.x[:64].float() / 255, toy_poisoned.holdout.y[:64]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr, per_lr = frozen_statistics_lr(model, x, y, cap=100.0)
    assert per_lr > 0 and lr == pytest.approx(FROZEN_STEP / per_lr)
    assert frozen_statistics_lr(model, x, y, cap=lr / 2)[0] == lr / 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training
    with torch.no_grad():  # the same function with every conv's weights doubled: a step moves them 4× less
        for conv, bn in ((a, b) for a, b in itertools.pairwise(model.model) if isinstance(b, torch.nn.BatchNorm2d)):
            conv.weight.mul_(2)
            bn.running_mean.mul_(2)
            bn.running_var.mul_(4)
    assert frozen_statistics_lr(model, x, y, cap=100.0)[0] == pytest.approx(4 * lr, rel=1e-3)


def test_scan_auto_runs_unless_the_audit_flagged_a_backdoor_strength_trigger(monkeypatch):
    """A clean model's natural flip (net ASR 0.5–0.6) must not keep the fit-split scan from looking for the real
    backdoor; a suite trigger at backdoor strength (≥ 0.9), or one a caller hands in without evidence, does."""
    from bdsan.detectors.triggers import get_trigger
    from bdsan.sanitize import found_triggers

    calls = []
    monkeypatch.setattr(found_triggers, "scan_fit_split", lambda *a, **k: (calls.append(1), ([], {}))[1])
    blend = get_trigger("blend_noise")

    def scanned(mode: str, asr_net: float | None) -> bool:
        calls.clear()
        evidence = [] if asr_net is None else [{"name": "blend_noise", "asr_net": asr_net, "suspected_target": 6}]
        ctx = Context(known_triggers=[blend], trigger_evidence=evidence)
        triggers, _, _ = found_triggers.gather_triggers(None, None, ctx, mode, steps=1)
        assert triggers == [blend]
        return bool(calls)

    assert scanned("auto", 0.55) and not scanned("if-none", 0.55)
    assert not scanned("auto", 0.98) and not scanned("auto", None)
    assert scanned("always", 0.98) and not scanned("never", 0.55)
    with pytest.raises(Exception, match="scan must be auto"):
        get_method("unlearn", scan="sometimes")


def test_scan_keys_and_roam_add_further_patches_toward_the_flagged_class():
    """``scan_keys``: after the fit-split scan, each found patch brings up to that many further keys toward its class
    (the scan's own triggers first, the keys after them); they are stamped and pruned by like the first. ``scan_roam``:
    a patch toward the class optimised at random positions is tried too, and kept only when it flips at least
    ``ROAM_MIN_FLIP`` — the toy's backdoor is tied to its corner (tiny_cnn keeps a 4×4 grid), so it is not."""
    from bdsan.sanitize.found_triggers import ROAM_MIN_FLIP, scan_fit_split

    toy = scan_helpers.unknown_patch_toy()
    fit, _ = split_holdout(toy.holdout, 0.5, 0)
    ctx = Context(device=torch.device("cpu"), seed=0, batch_size=256)
    model = copy.deepcopy(toy.model).normalized()
    found, summary = scan_fit_split(model, fit, ctx, steps=150, keys=1, roam=4)
    scanned = [t for t in found if "key" not in t.params and "roam" not in t.params]
    patches = [t for t in scanned if t.params["kind"] == "patch"]
    extra = found[len(scanned):]
    assert patches and found[:len(scanned)] == scanned  # the scan's own triggers first
    assert [t.name for t in extra] == [f"{t.name}_key1" for t in patches] == summary["keys"]["found"]
    assert all(t.params["target"] == scan_helpers.UNKNOWN_TARGET for t in extra)
    tried = summary["roam"]["found"]
    assert [r["name"] for r in tried] == [f"{t.name}_roam" for t in patches]
    assert all(r["flip"] < ROAM_MIN_FLIP and not r["kept"] for r in tried)


def test_select_latest_within_diff_se_never_gives_a_zero_standard_error(monkeypatch):
    """``select=latest-within-diff-se`` (default): the guard's objective SE from one success and one failure added,
    so no hits (or one) on 216 fit-val images still has a width; ``latest-within-se`` keeps the plain binomial SE."""
    import math

    from bdsan.sanitize import unlearn as module

    monkeypatch.setattr(module, "_target_rate", lambda *args, **kwargs: (0.0, 216))
    plain = module.Unlearn(select="latest-within-se")._measure(None, None, [], {}, 256)
    adjusted = module.Unlearn()._measure(None, None, [], {}, 256)  # the default
    assert plain == (0.0, 0.0)
    assert adjusted[0] == 0.0 and math.isclose(adjusted[1], math.sqrt((1 / 218) * (217 / 218) / 218))
    monkeypatch.setattr(module, "_target_rate", lambda *args, **kwargs: (1 / 216, 216))
    plain_se = module.Unlearn(select="latest-within-se")._measure(None, None, [], {}, 256)[1]
    assert module.Unlearn()._measure(None, None, [], {}, 256)[1] > plain_se > 0
    assert module.Unlearn(select="earliest-within-diff-se")._measure(None, None, [], {}, 256)[1] == \
        module.Unlearn()._measure(None, None, [], {}, 256)[1]  # the same tie width, the earliest state kept


def test_roam_audit_tries_a_roaming_patch_toward_each_class_a_suite_patch_was_flagged_for(toy_poisoned, monkeypatch):
    """``roam_audit``: the audit flagged a patch at backdoor strength, so the scan does not run; one roaming patch
    toward that class is tried (not toward a flagged full-image trigger's class), used only when it flips ≥ 0.5."""
    from bdsan.detectors.triggers import get_trigger
    from bdsan.sanitize import unlearn as module
    from bdsan.sanitize.found_triggers import ROAM_MIN_FLIP, gather_triggers

    square, blend = get_trigger("badnets_square"), get_trigger("blend_noise")
    ctx = Context(seed=0, known_triggers=[square, blend],
                  trigger_evidence=[{"name": square.name, "suspected_target": 0, "asr_net": 1.0},
                                    {"name": blend.name, "suspected_target": 1, "asr_net": 0.95}])
    fit, _ = split_holdout(toy_poisoned.holdout, 0.5, 0)
    model = copy.deepcopy(toy_poisoned.model).normalized()
    assert gather_triggers(model, fit, ctx, "auto", 60, roam=4) == ([square, blend], [
        {"name": square.name, "source": "audit"}, {"name": blend.name, "source": "audit"}], None)
    triggers, sources, summary = gather_triggers(model, fit, ctx, "auto", 60, roam=4, roam_audit=True)
    [tried] = summary["roam"]["found"]
    assert tried["name"] == "badnets_square_roam" and tried["kept"] == (tried["flip"] >= ROAM_MIN_FLIP)
    assert [t.name for t in triggers[2:]] == (["badnets_square_roam"] if tried["kept"] else [])
    assert all(s["source"] == "audit-roam" and s["target"] == 0 for s in sources[2:])

    seen = []

    def fake(*args, **kwargs):
        seen.append((args[-1], kwargs.get("noise")))
        raise RuntimeError("stop")

    monkeypatch.setattr(module, "gather_triggers", fake)
    for params in ({"roam_audit": True}, {"scan_noise_kind": False}):
        with pytest.raises(RuntimeError, match="stop"):
            get_method("unlearn", **params).run(model, fit, ctx)
    assert seen == [(True, True), (False, False)]  # the noise kind is searched by default (BENCHMARKS "Colour noise")


def test_select_earliest_within_diff_se_asks_the_guard_for_the_earliest_tied_state(toy_poisoned, monkeypatch):
    """``select=earliest-within-diff-se``: the same difference-SE tie as the default, the earliest tied state kept."""
    from bdsan.sanitize import unlearn as module

    monkeypatch.setattr(module, "gather_triggers", lambda *args, **kwargs: ([], [], None))  # nothing to unlearn
    fit, _ = split_holdout(toy_poisoned.holdout, 0.5, 0)
    model = copy.deepcopy(toy_poisoned.model).normalized()
    ctx = Context(device=torch.device("cpu"), seed=0, batch_size=256, max_acc_drop=3.0)
    picks = {select: module.Unlearn(select=select).run(model, fit, ctx).details["guard"]
             for select in ("earliest-within-diff-se", "latest-within-diff-se", "latest-within-se")}
    assert {select: (g["tie"], g["pick"]) for select, g in picks.items()} == {
        "earliest-within-diff-se": ("difference", "earliest"), "latest-within-diff-se": ("difference", "latest"),
        "latest-within-se": ("lowest-se", "latest")}


def test_mixup_pairs_mixes_two_different_rows_convexly():
    from bdsan.train.augment import mixup_pairs

    rows = torch.eye(6).view(6, 6, 1, 1)  # row i is the unit vector e_i: a mix shows which two rows it took
    mixed, first, second = mixup_pairs(rows, 200, torch.Generator().manual_seed(0))
    mixed = mixed.view(200, 6)
    assert mixed.shape == (200, 6) and torch.allclose(mixed.sum(1), torch.ones(200))
    assert ((mixed > 0).sum(1) == 2).all() and (first != second).all()  # two different rows, never one with itself
    assert (mixed[torch.arange(200), first] + mixed[torch.arange(200), second] > 0.999).all()  # the ones returned
    assert (mixed >= 0).all() and len(set(zip(first.tolist(), second.tolist()))) > 10


def test_suppress_targets_only_where_every_source_image_is_another_class():
    from bdsan.sanitize.losses import suppress_targets

    logits = torch.zeros(3, 4)
    a, b = torch.tensor([1, 2, 0]), torch.tensor([3, 0, 1])  # mixes of (1, 3), (2, 0), (0, 1); target 0 suspected
    fixed = suppress_targets(logits, [0], a, b)
    assert fixed[0, 0] == -1e4 and fixed[1:, 0].eq(0).all() and fixed[:, 1:].eq(0).all()
    assert logits.eq(0).all() and suppress_targets(logits, [], a, b) is logits


def test_mix_distill_holds_mixes_of_the_clean_rows_to_the_input_model(toy_poisoned, monkeypatch):
    """``mix_distill``: each training batch adds ``mix_distill`` × (clean rows) mixes of its clean rows, distilled
    toward the input model's answers with the suspected target's share limited (``mix_target``: the mixes it answers
    with that target left out, its share capped at what the two images earn, or suppressed); ``mix_kind``: pasted
    boxes (the default) or convex mixes; ``mix_stamp`` of the mixes reach the network stamped, the input model
    answering them unstamped; ``auto`` (the default) mixes only below ``few_per_class``, and mixes need the
    distillation regulariser."""
    from bdsan.detectors.triggers import get_trigger
    from bdsan.sanitize import unlearn

    def recorder(name: str, calls: list, summary):
        real = getattr(unlearn, name)

        def recorded(*args):
            calls.append(summary(*args))
            return real(*args)
        monkeypatch.setattr(unlearn, name, recorded)

    counts, distilled, capped, suppressed = [], [], [], []
    recorder("mixup_pairs", counts, lambda x, count, generator: (len(x), count))
    recorder("distillation", distilled, lambda student, teacher, temperature: len(student))
    recorder("cap_targets", capped, lambda answers, suspected, temperature, *sources:
             (len(answers), suspected, [len(s) for s in sources]))
    recorder("suppress_targets", suppressed, lambda answers, suspected, *labels:
             (len(answers), suspected, [len(s) for s in labels]))
    kept = []  # the mixes each step distils on
    real_answers = unlearn.Unlearn._mix_answers

    def mix_answers(self, *args):
        answers, rows = real_answers(self, *args)
        kept.append(rows)
        return answers, rows

    monkeypatch.setattr(unlearn.Unlearn, "_mix_answers", mix_answers)
    fit, _ = split_holdout(toy_poisoned.holdout, 0.5, 0)
    square = get_trigger("badnets_square")
    ctx = Context(seed=0, known_triggers=[square], max_acc_drop=5.0,
                  trigger_evidence=[{"name": square.name, "suspected_target": 0, "asr_net": 1.0}])
    run = functools.partial(get_method, "unlearn", epochs=1, scan="never", prune_ratio=0, mix_kind="blend")
    run().run(copy.deepcopy(toy_poisoned.model).normalized(), fit, ctx)
    # mix_distill=auto with 36 fit-train images per class: no mixes, one term (the clean rows) per step
    assert counts == [] and len(distilled) == 10
    distilled.clear()
    run(mix_distill=2).run(copy.deepcopy(toy_poisoned.model).normalized(), fit, ctx)  # mix_target=drop
    assert len(counts) == 10 and all(count == 2 * clean for clean, count in counts)  # 10 steps, twice the clean rows
    # each step: the clean rows, then the mixes the input model does not answer with the suspected target
    assert distilled[1::2] == [int(rows.sum()) for rows in kept] and [len(rows) for rows in kept] == [
        count for _, count in counts] and 0 < sum(distilled[1::2])
    assert not capped and not suppressed
    counts.clear()
    run(mix_distill=2, mix_target="cap").run(copy.deepcopy(toy_poisoned.model).normalized(), fit, ctx)
    # the suspected target's share in the answers on the mixes is capped by the answers on their two images
    assert capped == [(count, [0], [count, count]) for _, count in counts] and not suppressed
    run(mix_distill=2, mix_target="suppress").run(copy.deepcopy(toy_poisoned.model).normalized(), fit, ctx)
    assert len(suppressed) == 10 and len(capped) == 10
    boxes = []
    recorder("boxmix_pairs", boxes, lambda x, count, generator: count)
    counts.clear()
    run(mix_distill=1, mix_kind="box").run(copy.deepcopy(toy_poisoned.model).normalized(), fit, ctx)
    assert len(boxes) == 10 and counts == []  # pasted boxes instead of convex mixes
    stamps, seen, answered = [], [], []  # mix_stamp: the student sees some mixes stamped, the teacher none of them
    real_stamp = unlearn.stamp_leading

    def stamp_leading(x, triggers, fraction, *args, **kwargs):
        out, n = real_stamp(x, triggers, fraction, *args, **kwargs)
        stamps.append((x, out, n))
        return out, n
    monkeypatch.setattr(unlearn, "stamp_leading", stamp_leading)
    monkeypatch.setattr(unlearn.Unlearn, "_mix_answers", lambda self, teacher, mixed, *args: (
        answered.append(mixed[0]) or real_answers(self, teacher, mixed, *args)))
    model = copy.deepcopy(toy_poisoned.model).normalized()
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]) if module.training else None)
    run(mix_distill=1, mix_kind="box", mix_stamp=0.5).run(model, fit, ctx)
    assert len(stamps) == 20 and len(answered) == 10  # each step: the batch's stamping, then the mixes'
    steps = [inputs for inputs in seen if len(inputs) > unlearn.Unlearn.batch_size]  # steps (batch + mixes)
    assert len(steps) == 10
    for (x, out, n), mixes, inputs in zip(stamps[1::2], answered, steps):
        assert mixes is x and n == round(0.5 * len(x)) > 0  # the teacher answers the mixes as drawn
        assert not torch.equal(out[:n], x[:n]) and torch.equal(out[n:], x[n:])
        assert torch.equal(inputs[-len(x):], out)  # the student is trained on them stamped
    for wrong in ({"mix_stamp": 0.5, "mix_distill": 0}, {"mix_stamp": 1}):  # no mixes to stamp; all of them
        with pytest.raises(Exception, match="mix_stamp"):
            get_method("unlearn", **wrong)
    with pytest.raises(Exception, match="mix_distill"):
        get_method("unlearn", mix_distill=1, regularizer="l2")
    with pytest.raises(Exception, match="mix_distill"):
        get_method("unlearn", mix_distill=-1)
    with pytest.raises(Exception, match="mix_target must be one of drop, cap, suppress"):
        get_method("unlearn", mix_target="zero")


def test_cap_targets_limits_a_mix_to_what_its_images_earn_the_target():
    from bdsan.sanitize.losses import cap_targets

    answers = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.05, 0.5, 0.45]]))  # mixes; class 0 suspected
    first = torch.log(torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.8, 0.1]]))
    second = torch.log(torch.tensor([[0.2, 0.1, 0.7], [0.01, 0.1, 0.89]]))
    probs = cap_targets(answers, [0], 1.0, first, second).softmax(1)
    assert torch.allclose(probs[0], torch.tensor([0.2, 0.48, 0.32]))  # capped at 0.2, the rest scaled by 0.8 / 0.5
    assert torch.allclose(probs[1], answers[1].exp())  # under the cap: as it was
    at_two = cap_targets(answers * 2, [0], 2.0, first * 2, second * 2)  # the cap is taken at the temperature
    assert torch.allclose((at_two / 2).softmax(1), probs)
    assert cap_targets(answers, [], 1.0, first, second) is answers


def test_mix_target_drop_skips_only_mixes_answered_with_a_target_neither_image_is_of():
    answers = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])  # the teacher's logits on 3 mixes
    teacher = lambda mixes: answers[mixes[:, 0, 0, 0].long()]  # mix i: a constant image of value i
    mixes = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    labels = torch.tensor([1, 2, 0])  # the clean rows' labels; mixes of rows (0, 1), (2, 1), (0, 1)
    mixed = (mixes, torch.tensor([0, 2, 0]), torch.tensor([1, 1, 1]))
    unlearn = get_method("unlearn", mix_distill=1, mix_target="drop")
    kept_answers, kept = unlearn._mix_answers(teacher, mixed, torch.zeros(3, 3), labels, [0])
    assert kept.tolist() == [False, True, True] and torch.equal(kept_answers, answers)
    assert unlearn._mix_answers(teacher, mixed, torch.zeros(3, 3), labels, [])[1].all()  # nothing suspected


def test_boxmix_pairs_paste_one_box_of_another_row_and_blend_no_pixel():
    from bdsan.train.augment import boxmix_pairs

    rows = torch.arange(1.0, 7.0).view(6, 1, 1, 1).expand(6, 3, 8, 8)  # row i is a constant image of value i + 1
    mixed, first, second = boxmix_pairs(rows, 300, torch.Generator().manual_seed(0))
    assert mixed.shape == (300, 3, 8, 8) and (first != second).all()
    from_first = mixed == (first + 1.0).view(-1, 1, 1, 1)
    from_second = mixed == (second + 1.0).view(-1, 1, 1, 1)
    assert (from_first ^ from_second).all()  # every pixel from exactly one of the two rows, none blended
    pasted = from_second[:, 0]
    rows_hit, cols_hit = pasted.any(2), pasted.any(1)  # a box: the pasted pixels are the product of a row and a column range
    assert torch.equal(pasted, rows_hit.unsqueeze(2) & cols_hit.unsqueeze(1))
    assert 0 < pasted.float().mean() < 1 and pasted.flatten(1).any(1).float().mean() > 0.9
    with pytest.raises(Exception, match="mix_kind must be one of blend, box"):
        get_method("unlearn", mix_kind="swap")
