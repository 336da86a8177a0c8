"""The shared toy models really are what the other tests assume."""
from bdsan.train import evaluate_accuracy, predict


def test_poisoned_toy_model_has_a_working_backdoor(toy_poisoned, trigger):
    model = toy_poisoned.model.normalized()
    holdout = toy_poisoned.holdout
    assert evaluate_accuracy(model, holdout.x, holdout.y) > 0.9
    non_target = holdout.x[holdout.y != 0]
    asr = (predict(model, non_target, transform=trigger) == 0).float().mean().item()
    assert asr > 0.9


def test_clean_toy_model_ignores_the_trigger(toy_clean, trigger):
    model = toy_clean.model.normalized()
    holdout = toy_clean.holdout
    assert evaluate_accuracy(model, holdout.x, holdout.y) > 0.9
    non_target = holdout.x[holdout.y != 0]
    asr = (predict(model, non_target, transform=trigger) == 0).float().mean().item()
    assert asr < 0.2
