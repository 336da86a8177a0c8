"""Flips in the defenses' augmentation: the input model's mirror check decides (``bdsan.sanitize.mirror``)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from bdsan.errors import UsageError
from bdsan.io.data import Holdout
from bdsan.report import render_sanitize_text
from bdsan.sanitize import DefenseResult, register_method
from bdsan.sanitize.mirror import mirror_check, resolve_flip
from bdsan.sanitize.pipeline import sanitize
from bdsan.train.augment import augment_images


class HalfBrightness(nn.Module):
    """Class 0 when the left half is brighter, class 1 when the right half is (``mirrored=False``); or class 0 for
    a bright image and 1 for a dark one, which a flip cannot change (``mirrored=True``)."""

    def __init__(self, mirrored: bool):
        super().__init__()
        self.mirrored = mirrored
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        if self.mirrored:
            score = x.mean(dim=(1, 2, 3)) - 0.5
        else:
            width = x.shape[-1]
            score = x[..., : width // 2].mean(dim=(1, 2, 3)) - x[..., width // 2:].mean(dim=(1, 2, 3))
        return torch.stack([score, -score], 1) + 0 * self.unused


def _sides(n: int = 64) -> Holdout:
    """Half the images bright on the left (class 0), half bright on the right (class 1)."""
    x = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    x[: n // 2, :, :, :4] = 200
    x[n // 2:, :, :, 4:] = 200
    y = torch.tensor([0] * (n // 2) + [1] * (n - n // 2))
    return Holdout(x, y, ["left", "right"])


def test_mirror_check_refuses_flips_where_mirror_images_change_class():
    check = mirror_check(HalfBrightness(mirrored=False), _sides())
    assert check["accuracy"] == 1.0 and check["accuracy_flipped"] == 0.0
    assert check["lost"] == 64 and check["gained"] == 0
    assert check["flip"] is False


def test_mirror_check_keeps_flips_where_mirror_images_keep_their_class():
    data = _sides()
    bright = Holdout(torch.cat([torch.full((32, 3, 8, 8), 200, dtype=torch.uint8), data.x[:32] // 8]),
                     torch.tensor([0] * 32 + [1] * 32), ["bright", "dark"])
    check = mirror_check(HalfBrightness(mirrored=True), bright)
    assert check["accuracy"] == check["accuracy_flipped"] == 1.0
    assert check["flip"] is True


def test_resolve_flip_on_and_off_do_not_ask_the_model_and_other_modes_are_refused():
    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("the model was asked")

    assert resolve_flip("on", Exploding(), _sides()) == {"mode": "on", "flip": True}
    assert resolve_flip("off", Exploding(), _sides()) == {"mode": "off", "flip": False}
    with pytest.raises(ValueError):
        resolve_flip("sideways", Exploding(), _sides())


def test_crop_mode_never_flips_and_the_default_mode_does():
    x = torch.zeros(32, 3, 32, 32)
    x[..., :16] = 0.8  # every image bright on the left; a 4-pixel crop shift keeps it so
    left_brighter = lambda batch: batch[..., :16].mean(dim=(1, 2, 3)) > batch[..., 16:].mean(dim=(1, 2, 3))
    generator = torch.Generator().manual_seed(0)
    assert left_brighter(augment_images(x, generator, "crop")).all()
    flipped = ~left_brighter(augment_images(x, generator, True))
    assert 0 < int(flipped.sum()) < 32
    assert torch.equal(augment_images(x, generator, False), x)


@register_method("test-flip-probe", "test only: records whether it may flip")
@dataclass
class FlipProbe:
    """Test only: returns the model unchanged and says what the pipeline allowed."""

    augment: bool = True

    def run(self, model, fit, ctx):
        return DefenseResult(model, {"flip": ctx.flip, "augmentation": ctx.augmentation(self.augment)})


def test_pipeline_hands_the_flip_decision_to_the_method_and_reports_it(toy_poisoned):
    auto = sanitize(toy_poisoned.model, toy_poisoned.holdout, "test-flip-probe", {}, None, triggers=["blend_noise"])
    decision = auto.defense["augmentation"]
    assert decision["mode"] == "auto" and decision["n"] == len(toy_poisoned.holdout) // 2
    assert auto.defense["details"]["flip"] is decision["flip"]
    off = sanitize(toy_poisoned.model, toy_poisoned.holdout, "test-flip-probe", {}, None, triggers=["blend_noise"],
                   flip="off")
    assert off.defense["augmentation"] == {"mode": "off", "flip": False}
    assert off.defense["details"] == {"flip": False, "augmentation": "crop"}
    assert "augmentation: crop only (no flips) (--flip off)" in render_sanitize_text(off)
    assert "of their mirror images" in render_sanitize_text(auto)
    with pytest.raises(UsageError):
        sanitize(toy_poisoned.model, toy_poisoned.holdout, "test-flip-probe", {}, None, flip="sideways")
