"""The trigger suite: registered, deterministic, shape- and range-preserving, scaling with the image size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import bdsan.detectors.triggers as triggers_module
from bdsan.detectors.triggers import (
    DEFAULT_SUITE,
    Trigger,
    get_trigger,
    list_triggers,
    register_trigger,
    unit,
    user_trigger,
)
from bdsan.errors import DataError, UsageError


def images(n=4, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_suite_is_registered_in_order():
    names = list(list_triggers())
    assert names[:len(DEFAULT_SUITE)] == DEFAULT_SUITE
    assert set(DEFAULT_SUITE) == {"badnets_grid", "badnets_grid_dbr", "badnets_square", "blend_noise", "blend_strip",
                                  "sig", "trojan_patch", "four_corner", "wanet", "low_frequency"}


@pytest.mark.parametrize("name", DEFAULT_SUITE)
@pytest.mark.parametrize("size", [32, 64])
def test_trigger_is_deterministic_and_keeps_shape_and_range(name, size):
    x = images(size=size)
    trigger = get_trigger(name)
    first, second = trigger.apply(x.clone()), get_trigger(name).apply(x.clone())
    assert first.shape == x.shape and first.dtype == x.dtype
    assert torch.equal(first, second)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert not torch.equal(first, x), "the trigger changed nothing"
    # batch independence: stamping one image alone gives the same result as in the batch
    assert torch.allclose(trigger.apply(x[1:2]), first[1:2], atol=1e-6)
    # the input is not modified in place
    assert torch.equal(x, images(size=size))


def test_unit_scales_with_size():
    assert [unit(s, s) for s in (16, 32, 47, 48, 64, 224)] == [1, 1, 1, 2, 2, 7]
    assert unit(64, 32) == 1


def test_badnets_grid_exact_pixels():
    out = get_trigger("badnets_grid").apply(torch.full((1, 3, 32, 32), 0.5))
    expected = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    for channel in range(3):
        assert torch.equal(out[0, channel, -3:, -3:], expected)
    assert torch.all(out[0, :, :-3, :] == 0.5) and torch.all(out[0, :, :, :-3] == 0.5)


def test_badnets_grid_dbr_exact_pixels():
    out = get_trigger("badnets_grid_dbr").apply(torch.full((1, 3, 32, 32), 0.5))
    h = w = 32
    spec = {(h - 1, w - 1): 1, (h - 1, w - 2): 0, (h - 1, w - 3): 1, (h - 2, w - 1): 0, (h - 2, w - 2): 1,
            (h - 2, w - 3): 0, (h - 3, w - 1): 1, (h - 3, w - 2): 0, (h - 3, w - 3): 0}
    for (row, col), value in spec.items():
        assert torch.all(out[0, :, row, col] == value), (row, col)
    assert int((out != 0.5).sum()) == 27


def test_grids_scale_to_unit_cells_at_64px():
    out = get_trigger("badnets_grid_dbr").apply(torch.full((1, 1, 64, 64), 0.5))[0, 0]
    block = out[-6:, -6:]
    expected = torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(block, expected)
    assert get_trigger("badnets_grid").params_at(64, 64) == {"u": 2}


def test_square_and_trojan_sizes_scale():
    square = get_trigger("badnets_square")
    assert square.params_at(32, 32) == {"side": 3, "margin": 1, "value": 1.0}
    assert square.params_at(224, 224)["side"] == 22 and square.params_at(224, 224)["margin"] == 7
    out = square.apply(torch.zeros(1, 3, 32, 32))[0, 0]
    assert torch.equal(torch.nonzero(out).min(0).values, torch.tensor([28, 28]))
    assert torch.equal(torch.nonzero(out).max(0).values, torch.tensor([30, 30]))
    trojan = get_trigger("trojan_patch")
    assert trojan.params_at(64, 64)["side"] == 6 and trojan.params_at(64, 64)["margin"] == 4
    out64 = trojan.apply(torch.full((1, 3, 64, 64), 2.0))  # background clipped to 1, the patch pasted
    changed = torch.nonzero((out64[0] != 1).any(0))
    assert changed.min(0).values.tolist() >= [54, 54] and changed.max(0).values.tolist() <= [59, 59]


def test_four_corner_translates_the_dbr_block():
    out = get_trigger("four_corner").apply(torch.full((1, 1, 32, 32), 0.5))[0, 0]
    block = torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    for rows in (slice(0, 3), slice(29, 32)):
        for cols in (slice(0, 3), slice(29, 32)):
            assert torch.equal(out[rows, cols], block)


def test_blend_strip_pattern():
    out = get_trigger("blend_strip").apply(torch.zeros(1, 1, 4, 32))[0, 0, 0]
    expected = torch.tensor([0.2 if (j // 4) % 2 == 1 else 0.0 for j in range(32)])
    assert torch.allclose(out, expected)


def test_sig_is_additive_sine():
    out = get_trigger("sig").apply(torch.full((1, 1, 2, 32), 0.5))[0, 0, 0]
    expected = 0.5 + 40 / 255 * torch.sin(2 * torch.pi * torch.arange(32) * 6 / 32)
    assert torch.allclose(out, expected, atol=1e-6)


def test_sig_along_rows_is_the_transposed_sine():
    x = torch.full((1, 1, 32, 32), 0.5)
    rows = get_trigger("sig", axis="rows", frequency=3).apply(x)
    columns = get_trigger("sig", frequency=3).apply(x)
    assert torch.allclose(rows, columns.transpose(-1, -2))
    assert not torch.allclose(rows, columns)
    with pytest.raises(UsageError, match="axis"):
        get_trigger("sig", axis="diagonal").apply(x)


def test_blends_use_fixed_patterns_independent_of_global_seed():
    torch.manual_seed(1)
    a = get_trigger("blend_noise").apply(images())
    torch.manual_seed(2)
    b = get_trigger("blend_noise").apply(images())
    assert torch.equal(a, b)
    low = get_trigger("low_frequency")
    delta = low.apply(torch.full((1, 3, 32, 32), 0.5)) - 0.5
    assert abs(float(delta.abs().max()) - 0.1) < 1e-6


def test_blend_noise_is_grey_by_default_and_colour_with_three_channels():
    grey = torch.full((1, 3, 16, 16), 0.5)
    stamped = get_trigger("blend_noise").apply(grey)
    assert torch.equal(stamped[:, 0], stamped[:, 1]) and torch.equal(stamped[:, 1], stamped[:, 2])
    colour = get_trigger("blend_noise", channels=3).apply(grey)
    assert not torch.equal(colour[:, 0], colour[:, 1]) and torch.equal(colour[:, 0], stamped[:, 0])  # same stream
    with pytest.raises(UsageError, match="channels"):
        get_trigger("blend_noise", channels=2).apply(grey)


def test_wanet_warps_without_changing_constant_images():
    constant = torch.full((2, 3, 32, 32), 0.3)
    assert torch.allclose(get_trigger("wanet").apply(constant), constant, atol=1e-6)


def test_param_overrides_and_unknown_names():
    assert get_trigger("blend_noise", alpha=0.3).params["alpha"] == 0.3
    with pytest.raises(UsageError):
        get_trigger("no_such_trigger")
    with pytest.raises(UsageError):
        get_trigger("sig", colour=1)


def test_register_trigger_adds_to_registry(monkeypatch):
    monkeypatch.setattr(triggers_module, "_REGISTRY", dict(triggers_module._REGISTRY))

    @register_trigger("test_invert", "invert the image")
    def invert(x, strength: float = 1.0):
        return (1 - x) * strength + x * (1 - strength)

    trigger = get_trigger("test_invert")
    assert isinstance(trigger, Trigger) and trigger.params == {"strength": 1.0}
    assert list_triggers()["test_invert"] == "invert the image"
    assert torch.allclose(trigger.apply(torch.zeros(1, 1, 2, 2)), torch.ones(1, 1, 2, 2))


def _png(path, array):
    Image.fromarray(array).save(path)
    return path


def test_user_trigger_pastes_nonzero_pixels_resized_nearest(tmp_path):
    picture = np.zeros((16, 16, 3), np.uint8)
    picture[-2:, -2:] = 255
    trigger = user_trigger(_png(tmp_path / "t.png", picture))
    out = trigger.apply(torch.full((1, 3, 32, 32), 0.5))
    assert torch.all(out[0, :, -4:, -4:] == 1.0)
    assert int((out != 0.5).sum()) == 3 * 16
    assert trigger.params["alpha"] is None and len(trigger.params["image_sha256"]) == 64


def test_user_trigger_with_mask_and_alpha(tmp_path):
    picture = np.full((32, 32, 3), 255, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[:2, :2] = 255
    image_path, mask_path = _png(tmp_path / "t.png", picture), _png(tmp_path / "m.png", mask)
    out = user_trigger(image_path, mask_path).apply(torch.zeros(1, 3, 32, 32))
    assert int((out != 0).sum()) == 3 * 4
    blended = user_trigger(image_path, alpha=0.25).apply(torch.zeros(1, 3, 32, 32))
    assert torch.allclose(blended, torch.full_like(blended, 0.25))
    masked_blend = user_trigger(image_path, mask_path, alpha=0.5).apply(torch.zeros(1, 3, 32, 32))
    assert torch.allclose(masked_blend[0, :, :2, :2], torch.full((3, 2, 2), 0.5)) and float(masked_blend.sum()) == 6.0


def test_user_trigger_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        user_trigger(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read"):
        user_trigger(tmp_path / "bad.png")
    with pytest.raises(DataError, match="nothing to stamp"):
        user_trigger(_png(tmp_path / "black.png", np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(UsageError):
        user_trigger(_png(tmp_path / "w.png", np.full((8, 8, 3), 255, np.uint8)), alpha=1.5)


def test_patch_positions_and_sweep_families():
    x = torch.full((1, 1, 32, 32), 0.5)
    corners = {"bottom_right": ([26, 26], [29, 29]), "top_left": ([2, 2], [5, 5]), "centre": ([14, 14], [17, 17])}
    for position, (low, high) in corners.items():
        out = get_trigger("patch", side=4, margin=2, position=position, content="black").apply(x)[0, 0]
        changed = torch.nonzero(out != 0.5)
        assert changed.min(0).values.tolist() == low and changed.max(0).values.tolist() == high
        assert len(changed) == 16
    from bdsan.detectors.triggers import sweep_families

    families = sweep_families(64, 64)
    assert {name: len(variants) for name, (_, variants) in families.items()} == {"patch": 272, "blend": 6, "sig": 3}
    assert families["patch"][1][0].params_at(64, 64)["side"] == 6  # 3u at u = 2
    with pytest.raises(UsageError):
        get_trigger("patch", position="middle").apply(x)


def test_patch_at_explicit_pixels():
    x = torch.full((1, 1, 32, 32), 0.5)
    out = get_trigger("patch", side=4, top=7, left=20, content="black").apply(x)[0, 0]
    changed = torch.nonzero(out != 0.5)
    assert changed.min(0).values.tolist() == [7, 20] and changed.max(0).values.tolist() == [10, 23]
    only_top = get_trigger("patch", side=4, top=7, position="top_left", margin=1, content="black").apply(x)[0, 0]
    assert torch.nonzero(only_top != 0.5).min(0).values.tolist() == [7, 1]
    with pytest.raises(UsageError):
        get_trigger("patch", side=4, top=30, left=0).apply(x)
