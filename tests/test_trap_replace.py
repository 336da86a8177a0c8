"""sanitize --method trap-replace (ALGORITHMS §2a): the head split, CutMix, and the toy backdoor replaced away."""
from __future__ import annotations

import copy

import pytest
import torch

from bdsan.errors import UsageError
from bdsan.io.archs import build_arch
from bdsan.io.data import split_holdout
from bdsan.io.preprocess import Normalized, Preprocessing
from bdsan.sanitize.context import Context
from bdsan.sanitize.registry import get_method, list_methods
from bdsan.sanitize.trap_replace import head_split
from bdsan.train.augment import cutmix
from bdsan.train.fixtures import corner_square

EXAMPLE = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_auto_head_is_the_last_residual_block_and_the_classifier():
    split = head_split(build_arch("cifar_resnet18", 10), EXAMPLE)
    assert [n for n, _ in split.head] == ["layer4.1.conv1", "layer4.1.bn1", "layer4.1.conv2", "layer4.1.bn2",
                                          "linear"]
    assert split.dropout_sites == ["layer4.1.conv2", "avgpool"]  # inside the block, and on the final feature map
    split = head_split(build_arch("small_resnet", 10), EXAMPLE)  # one block per stage: its shortcut is head too
    assert [n for n, _ in split.head][-3:] == ["layer4.0.shortcut.0", "layer4.0.shortcut.1", "linear"]
    split = head_split(build_arch("tiny_cnn", 5), EXAMPLE)  # no stages: from the last convolution on
    assert [n for n, _ in split.head] == ["11", "12", "16"] and split.dropout_sites == ["14"]


def test_explicit_stem_end_and_bad_names():
    split = head_split(build_arch("cifar_resnet18", 10), EXAMPLE, stem_end="layer4")
    assert [n for n, _ in split.head] == ["linear"] and split.dropout_sites == ["avgpool"]
    with pytest.raises(UsageError, match="not a module"):
        head_split(build_arch("cifar_resnet18", 10), EXAMPLE, stem_end="layer9")
    wrapped = Normalized(build_arch("cifar_resnet18", 10), Preprocessing())  # what the pipeline defends
    split = head_split(wrapped, EXAMPLE, stem_end="layer4")  # the model's own names work inside the wrapper
    assert [n for n, _ in split.head] == ["model.linear"] and split.stem_end == "model.layer4"


def test_cutmix_pastes_one_box_and_weights_by_its_area():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 32, 32).contiguous()
    mixed, partner, lam = cutmix(x, torch.Generator().manual_seed(3))
    from_partner = (mixed != x).any(1)  # 4×32×32: pixels that came from another image
    for i in range(4):
        if partner[i] != i:
            assert torch.equal(mixed[i][:, from_partner[i]], x[partner[i]][:, from_partner[i]])
            assert lam == pytest.approx(1 - from_partner[i].float().mean().item())


@pytest.fixture(scope="module")
def replaced(toy_poisoned):
    fit, verify = split_holdout(toy_poisoned.holdout, 0.5, 0)
    model = copy.deepcopy(toy_poisoned.model).normalized()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = get_method("trap-replace", epochs=20).run(model, fit, Context(seed=0, max_acc_drop=3.0))
    return verify, before, result


def test_trap_replace_is_registered():
    assert "trap-replace" in list_methods()


def test_new_head_removes_the_toy_backdoor_and_keeps_the_stem(replaced):
    verify, before, result = replaced
    model = result.model.eval()
    others = verify.y != 0
    x = verify.x[others].float().div(255)
    with torch.no_grad():
        assert (model(corner_square(x)).argmax(1) == 0).float().mean() <= 0.2
        assert (model(verify.x.float().div(255)).argmax(1) == verify.y).float().mean() >= 0.9
    after = model.state_dict()
    head = set(result.details["head_modules"])
    for key, value in before.items():
        module = key.rsplit(".", 1)[0]
        assert torch.equal(after[key], value) == (module not in head), key
    assert all(not m._forward_pre_hooks for m in model.modules())  # the dropout hooks are gone
    assert all(p.requires_grad for p in model.parameters())
    assert result.guard["selected"].startswith("epoch") and not result.guard["rolled_back"]


def test_trap_replace_rejects_bad_parameters():
    with pytest.raises(UsageError):
        get_method("trap-replace", dropout=1.0)


def test_distillation_variant_trains_the_head_only(toy_poisoned):
    fit, _ = split_holdout(toy_poisoned.holdout, 0.5, 0)
    model = copy.deepcopy(toy_poisoned.model).normalized()
    head = ("model.11.", "model.12.", "model.16.")  # tiny_cnn: last conv, its BN, the classifier
    stem = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(head)}
    result = get_method("trap-replace", epochs=2, distill_weight=1.0).run(model, fit, Context(seed=0))
    assert [e["epoch"] for e in result.details["epochs"]] == [1, 2]
    assert all(torch.equal(result.model.state_dict()[k], v) for k, v in stem.items())
    with pytest.raises(UsageError):
        get_method("trap-replace", temperature=0)
