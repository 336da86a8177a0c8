"""Stamping found triggers on fine-tuning batches (unlearn, FMP) and on BN re-estimation batches."""
import pytest
import scan_helpers
import torch

import bdsan.detectors.scan as scan_module
from bdsan.detectors.scan import ScanSettings
from bdsan.detectors.triggers import Trigger, get_trigger
from bdsan.io.data import Holdout
from bdsan.sanitize.context import Context
from bdsan.sanitize.found_triggers import scan_fit_split, stamp_leading, stamped_like_training


def test_stamps_the_leading_fraction_with_the_triggers_and_leaves_the_rest():
    x = torch.full((8, 3, 16, 16), 0.5)
    white = get_trigger("patch", side=3, margin=0, content="white")
    black = get_trigger("patch", side=3, margin=0, content="black")
    out, n = stamp_leading(x, [white, black], 0.5, torch.Generator().manual_seed(0))
    assert n == 4
    corners = out[:, 0, -1, -1]
    assert set(corners[:4].tolist()) <= {0.0, 1.0} and (corners[4:] == 0.5).all()
    assert torch.equal(x, torch.full((8, 3, 16, 16), 0.5))  # the input batch is not modified


def test_nothing_to_stamp():
    x = torch.rand(4, 3, 8, 8)
    assert stamp_leading(x, [], 0.5, torch.Generator())[1] == 0
    assert stamp_leading(x, [get_trigger("sig")], 0.0, torch.Generator())[1] == 0
    assert stamp_leading(x[:1], [get_trigger("sig")], 0.1, torch.Generator())[1] == 1  # at least one


def test_bn_transform_stamps_like_training():
    x = torch.full((6, 3, 16, 16), 0.5)
    transform = stamped_like_training([get_trigger("patch", side=3, margin=0)], 0.5, torch.Generator())
    out = transform(x)
    assert (out[:3, :, -1, -1] == 1.0).all() and (out[3:] == 0.5).all()


def test_strength_scales_full_image_triggers_per_image_and_leaves_patches():
    x = torch.full((64, 3, 16, 16), 0.5)
    generator = torch.Generator().manual_seed(0)
    blend = get_trigger("blend_noise", alpha=0.2)
    out, n = stamp_leading(x, [blend], 0.5, generator, strength=(0.5, 2.0))
    change = (out[:n] - x[:n]).flatten(1)
    exact = (blend.apply(x[:1]) - x[:1]).flatten()
    factors = (change @ exact) / (exact @ exact)  # each row is the exact blend's change times one factor
    assert torch.allclose(change, factors[:, None] * exact, atol=1e-5)
    assert 0.5 - 1e-4 <= factors.min() < 0.8 and 1.7 < factors.max() <= 2.0 + 1e-4
    assert (out[n:] == 0.5).all()
    patch = get_trigger("patch", side=3, margin=0, content="white")
    out, n = stamp_leading(x, [patch], 0.5, generator, strength=(0.5, 2.0))
    assert torch.equal(out[:n], patch.apply(x[:n]))


def test_the_defenses_scan_keeps_the_settings_their_numbers_were_measured_with(monkeypatch):
    # unlearn / D-BR / FMP measured every number with patch + blend, keep=after-step and 0.3 size tests; the
    # detection scan's later defaults (wave, keep=measured, patch 0.35) must not change what they stamp
    seen = {}

    def fake_scan(model, holdout, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(scan_module, "scan", fake_scan)
    train = Holdout(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ["a", "b"])
    with pytest.raises(RuntimeError, match="stop here"):
        scan_fit_split(torch.nn.Flatten(), train, Context(), steps=1)
    assert seen["kinds"] == ("patch", "blend") and seen["keep"] == "after-step"
    assert seen["blend_max_norm_ratio"] == 0.3 and ScanSettings().keep == "measured"
    assert seen["max_norm_ratio"] == 0.3 and ScanSettings().max_norm_ratio == 0.35
    seen.clear()
    with pytest.raises(RuntimeError, match="stop here"):
        scan_fit_split(torch.nn.Flatten(), train, Context(), steps=1, wave=True)  # unlearn's scan_wave
    assert seen["kinds"] == ("patch", "blend", "wave") and seen["keep"] == "after-step"


def test_with_the_mix_kind_an_unflagged_suspect_gets_its_mix_picture_too(monkeypatch):
    """Nothing flagged and no suite trigger known: the most suspicious class's patch and blend are used, and with
    ``mix`` (unlearn's ``scan_mix_kind``) its mix picture too, so that ``mix_refresh`` has a class to work on."""
    reconstructed = [Trigger(f"scan_{kind}_class{cls}", {"source": "scan", "kind": kind, "target": cls,
                                                          "anomalous": False}, lambda x, **_: x)
                     for kind in ("patch", "blend", "mix") for cls in (0, 1)]

    def fake_scan(model, holdout, **kwargs):
        return {"reconstructed": reconstructed, "suspected_target": 1, "anomalous": False,
                "mix": {"alpha": [0.2, 0.1], "flip_rate": [0.5, 0.9], "anomaly_index": [0.7, 0.7]}}

    monkeypatch.setattr(scan_module, "scan", fake_scan)
    train = Holdout(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ["a", "b"])
    names = {mix: [t.name for t in scan_fit_split(torch.nn.Flatten(), train, Context(), steps=1, mix=mix)[0]]
             for mix in (False, True)}
    assert names == {False: ["scan_patch_class1", "scan_blend_class1"],
                     True: ["scan_patch_class1", "scan_blend_class1", "scan_mix_class1"]}


def test_scan_noise_kind_hands_a_flagged_class_its_noise_blend():
    """``scan_noise_kind``: the defenses' scan searches the noise kind (grey and colour) too, and a class it flags
    gets that noise blend as a found trigger; without it no noise trigger is found."""
    train = scan_helpers.grey_class1_holdout(40)
    without, _ = scan_fit_split(scan_helpers.ColourSink(), train, Context(), steps=2)
    assert not [t for t in without if t.params["kind"] == "noise"]
    found, summary = scan_fit_split(scan_helpers.ColourSink(), train, Context(), steps=2, noise=True)
    noise = [t for t in found if t.params["kind"] == "noise"]
    assert [t.params["target"] for t in noise] == [0] and noise[0].params["anomalous"]
    assert summary["noise"]["take"][0] == 1.0 and summary["noise"]["form"][0] == "colour"
    x = train.x.float() / 255
    assert scan_helpers.ColourSink()(noise[0](x)).argmax(1).eq(0).all()


def test_scan_mix_kind_hands_a_flagged_class_its_picture_blend():
    """``scan_mix_kind`` (unlearn, opt-in): the defenses' scan optimises the mix kind too, and the class of a
    picture-blend backdoor gets its mix reconstruction as a found trigger, which flips images to it."""
    toy = scan_helpers.picture_blend_toy()
    net = toy.model.normalized().eval()
    found, summary = scan_fit_split(net, toy.holdout, Context(), steps=150, mix=True)
    mix = [t for t in found if t.params["kind"] == "mix"]
    assert [t.params["target"] for t in mix] == [scan_helpers.UNKNOWN_TARGET] and mix[0].params["anomalous"]
    # that class's patch and blend reconstructions come with it
    assert {t.params["kind"] for t in found if t.params["target"] == scan_helpers.UNKNOWN_TARGET} >= {"patch", "blend"}
    assert min(range(5), key=summary["mix"]["alpha"].__getitem__) == scan_helpers.UNKNOWN_TARGET
    x = toy.holdout.x[toy.holdout.y != scan_helpers.UNKNOWN_TARGET].float() / 255
    with torch.no_grad():
        assert net(mix[0](x)).argmax(1).eq(scan_helpers.UNKNOWN_TARGET).float().mean() >= 0.5


def _scan_wave() -> tuple[torch.Tensor, Trigger]:
    """(the change, a Trigger like the scan's wave kind): 2 periods of a 0.1 sine down the rows of 16×16 images."""
    rows_wave = torch.sin(2 * torch.pi * 2 * torch.arange(16) / 16).view(1, 1, 16, 1).expand(1, 3, 16, 16) * 0.1
    return rows_wave, Trigger("scan_wave_class0", {"source": "scan", "kind": "wave", "target": 0},
                              lambda x, **_: (x + rows_wave.to(x)).clamp(0, 1))


def test_wave_phase_rolls_the_scans_wave_and_nothing_else():
    rows_wave, wave = _scan_wave()
    sine = get_trigger("sig")  # the suite's own sine is stamped as it is
    x = torch.full((2, 3, 16, 16), 0.5)
    changes = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        out, n = stamp_leading(x, [wave], 0.5, generator, wave_phase=True)
        change = out[0] - x[0]
        shifts = [k for k in range(16) if torch.allclose(change, torch.roll(rows_wave[0], k, dims=1), atol=1e-6)]
        assert shifts and (out[n:] == 0.5).all()  # the found wave, rolled down the rows: another phase
        changes.add(shifts[0])
        assert torch.equal(stamp_leading(x, [sine], 0.5, generator, wave_phase=True)[0][:1], sine.apply(x[:1]))
    assert len(changes) > 3
    out, _ = stamp_leading(x, [wave], 0.5, generator)
    assert torch.equal(out[:1], wave.apply(x[:1]))  # without it: exactly as found


def test_wave_strength_scales_the_scans_wave_and_not_the_suites_sine():
    rows_wave, wave = _scan_wave()
    sine = get_trigger("sig")
    x = torch.full((64, 3, 16, 16), 0.5)
    generator = torch.Generator().manual_seed(0)
    out, n = stamp_leading(x, [wave], 0.5, generator, wave_strength=(1.0, 2.0))
    factors = ((out[:n] - x[:n]) / rows_wave.to(x)).nan_to_num().amax(dim=(1, 2, 3))
    assert n == 32 and 1.0 <= factors.min() and factors.max() <= 2.0 + 1e-5
    assert factors.max() - factors.min() > 0.5  # one factor drawn per image, over the whole range
    assert torch.equal(stamp_leading(x, [sine], 0.5, generator, wave_strength=(2.0, 2.0))[0][:1], sine.apply(x[:1]))
    out, _ = stamp_leading(x, [wave], 0.5, generator, strength=(2.0, 2.0), wave_strength=(1.0, 1.0))
    assert torch.equal(out[:1], wave.apply(x[:1]))  # the wave's own range replaces the full-image one


def test_neighbour_waves_are_the_scans_wave_one_period_either_side():
    from bdsan.detectors.waves import WAVES_PER_FREQUENCY, plane_wave_trigger, wave_name
    from bdsan.sanitize.found_triggers import neighbour_waves

    index = 4 * WAVES_PER_FREQUENCY + 4 + 1  # 5 periods down the rows, phase π/2
    assert wave_name(index) == "5 periods across the rows, phase 1π/2"
    wave = plane_wave_trigger(index, 3, 0.1)
    x = torch.full((1, 3, 32, 32), 0.5)
    rows = torch.arange(32).view(1, 1, 32, 1)
    assert torch.allclose(wave.apply(x) - x, 0.1 * torch.sin(2 * torch.pi * 5 * rows / 32 + torch.pi / 2).expand_as(x),
                          atol=1e-6)
    found = neighbour_waves([wave, get_trigger("badnets_square")], 1)
    assert [t.name for t in found] == ["scan_wave_class3_4periods", "scan_wave_class3_6periods"]
    for trigger, periods in zip(found, (4, 6)):
        expected = 0.1 * torch.sin(2 * torch.pi * periods * rows / 32 + torch.pi / 2).expand_as(x)
        assert torch.allclose(trigger.apply(x) - x, expected, atol=1e-6)
        assert trigger.params["target"] == 3 and trigger.params["kind"] == "wave"
    assert neighbour_waves([wave], 0) == []
    assert [t.name for t in neighbour_waves([plane_wave_trigger(2, 0, 0.1)], 2)] == [  # never under one period
        "scan_wave_class0_2periods", "scan_wave_class0_3periods"]
