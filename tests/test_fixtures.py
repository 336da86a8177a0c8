"""The shared toy models really are what the other tests assume."""
from bdsan.train import evaluate_accuracy, predict


def _accuracy_and_asr(toy, trigger) -> tuple[float, float]:
    """Clean holdout accuracy, and the trigger's success toward class 0 on the other classes' images."""
    model = toy.model.normalized()
    holdout = toy.holdout
    non_target = holdout.x[holdout.y != 0]
    asr = (predict(model, non_target, transform=trigger) == 0).float().mean().item()
    return evaluate_accuracy(model, holdout.x, holdout.y), asr


def test_poisoned_toy_model_has_a_working_backdoor(toy_poisoned, trigger):
    accuracy, asr = _accuracy_and_asr(toy_poisoned, trigger)
    assert accuracy > 0.9 and asr > 0.9


def test_clean_toy_model_ignores_the_trigger(toy_clean, trigger):
    accuracy, asr = _accuracy_and_asr(toy_clean, trigger)
    assert accuracy > 0.9 and asr < 0.2
