"""The FT baseline: FMP's fine-tune without pruning, on the fit split only."""
import torch

from bdsan.io.data import split_holdout
from bdsan.sanitize.context import Context
from bdsan.sanitize.registry import get_method, list_methods
from bdsan.train import evaluate_accuracy


def test_ft_is_registered_with_fmp_fine_tune_defaults():
    assert "ft" in list_methods()
    ft, fmp = get_method("ft"), get_method("fmp")
    for name in ("epochs", "lr", "momentum", "weight_decay", "batch_size", "reference_images", "max_passes"):
        assert getattr(ft, name) == getattr(fmp, name), name


def test_ft_fine_tunes_on_fit_and_keeps_clean_accuracy(poisoned_model, toy_poisoned):
    fit, verify = split_holdout(toy_poisoned.holdout, 0.5, seed=0)
    network = poisoned_model.normalized()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    result = get_method("ft", epochs=2).run(network, fit, Context(seed=0))
    assert result.model is network
    changed = [k for k, v in network.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "fine-tuning changed no weight"
    details = result.details
    assert details["fit_train"] + details["fit_val"] == len(fit)
    assert details["finetune"]["passes"] >= 2 and details["guard"]["selected"].startswith(("input", "after"))
    assert evaluate_accuracy(network, verify.x, verify.y) > 0.85
