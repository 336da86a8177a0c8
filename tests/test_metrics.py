"""SPEC §4 metrics against values computed by hand."""
from __future__ import annotations

import pytest
import torch

from bdsan.detectors.metrics import clean_metrics, trigger_metrics


def t(values):
    return torch.tensor(values, dtype=torch.long)


# 3 classes; labels 0,0,1,1,2,2
Y = t([0, 0, 1, 1, 2, 2])


def test_clean_metrics_by_hand():
    clean = clean_metrics(t([0, 1, 1, 1, 2, 0]), Y, 3)
    assert clean["ca"] == pytest.approx(4 / 6)
    assert clean["per_class_ca"] == [pytest.approx(0.5), 1.0, pytest.approx(0.5)]
    # base rate t: images with label != t predicted t. t=0: image 5 (label 2) → 1/4; t=1: image 1 → 1/4; t=2: 0/4
    assert clean["base_rate"] == [pytest.approx(0.25), pytest.approx(0.25), 0.0]
    assert clean["n"] == 6 and clean["class_counts"] == [2, 2, 2] and clean["classes_skipped"] == []


def test_trigger_metrics_by_hand():
    base = [0.25, 0.25, 0.0]
    # triggered predictions: three non-0 images go to 0 (of 4), one goes to 2
    result = trigger_metrics(t([0, 0, 0, 2, 0, 0]), Y, 3, base)
    assert result["asr"] == [pytest.approx(0.75), 0.0, pytest.approx(0.25)]
    assert result["asr_max"] == pytest.approx(0.75) and result["suspected_target"] == 0
    assert result["asr_net"] == pytest.approx(0.5)
    # RA excludes images of class 0: labels 1,1,2,2 vs predictions 0,2,0,0 → 0 correct
    assert result["ra"] == 0.0 and result["n"] == 4


def test_ties_go_to_the_lowest_class():
    # image of class 0 → 1, class 1 → 0: ASR(0) = 1/4, ASR(1) = 1/4, ASR(2) = 0
    result = trigger_metrics(t([1, 0, 1, 0, 2, 2]), Y, 3, [0.0, 0.0, 0.0])
    assert result["asr"][0] == result["asr"][1] == pytest.approx(0.25)
    assert result["suspected_target"] == 0


def test_all_correct_and_all_wrong():
    perfect = clean_metrics(Y.clone(), Y, 3)
    assert perfect["ca"] == 1.0 and perfect["per_class_ca"] == [1.0, 1.0, 1.0] and perfect["base_rate"] == [0.0] * 3
    unaffected = trigger_metrics(Y.clone(), Y, 3, perfect["base_rate"])
    assert unaffected["asr"] == [0.0, 0.0, 0.0] and unaffected["asr_max"] == 0.0
    assert unaffected["suspected_target"] == 0 and unaffected["ra"] == 1.0
    everything_to_two = t([2] * 6)
    wrong = clean_metrics(everything_to_two, Y, 3)
    assert wrong["ca"] == pytest.approx(2 / 6) and wrong["per_class_ca"] == [0.0, 0.0, 1.0]
    assert wrong["base_rate"] == [0.0, 0.0, 1.0]
    backdoor = trigger_metrics(everything_to_two, Y, 3, wrong["base_rate"])
    assert backdoor["asr_max"] == 1.0 and backdoor["suspected_target"] == 2
    assert backdoor["asr_net"] == 0.0  # the model says 2 with or without the trigger: not a backdoor signal
    assert backdoor["ra"] == 0.0


def test_empty_classes_are_skipped_and_listed():
    y = t([0, 0, 2, 2])  # class 1 and 3 have no images
    clean = clean_metrics(t([0, 1, 2, 2]), y, 4)
    assert clean["classes_skipped"] == [1, 3]
    assert clean["per_class_ca"] == [0.5, None, 1.0, None]
    assert clean["base_rate"] == [0.0, pytest.approx(0.25), 0.0, 0.0]
    # an empty class is still a candidate target: all four images are "not of class 3"
    result = trigger_metrics(t([3, 3, 3, 2]), y, 4, clean["base_rate"])
    assert result["asr"] == [0.0, 0.0, 0.0, pytest.approx(0.75)]
    assert result["suspected_target"] == 3 and result["ra"] == pytest.approx(0.25) and result["n"] == 4


def test_single_class_holdout_has_undefined_asr_for_that_class():
    y = t([1, 1, 1])
    clean = clean_metrics(y.clone(), y, 2)
    assert clean["base_rate"] == [0.0, None]
    result = trigger_metrics(t([0, 0, 1]), y, 2, clean["base_rate"])
    assert result["asr"] == [pytest.approx(2 / 3), None]
    assert result["suspected_target"] == 0


def test_known_target():
    result = trigger_metrics(t([0, 0, 0, 2, 0, 0]), Y, 3, [0.25, 0.25, 0.0], target=2)
    assert result["suspected_target"] == 2 and result["asr_max"] == pytest.approx(0.25)
    assert result["asr_net"] == pytest.approx(0.25)
    # RA without class-2 images: labels 0,0,1,1 vs predictions 0,0,0,2 → 2/4
    assert result["ra"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        trigger_metrics(Y.clone(), Y, 3, [0.0] * 3, target=3)
