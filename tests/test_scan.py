"""bdsan scan: reverse-engineers a trigger the suite does not know, and leaves a clean model alone."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scan_helpers
import torch
from scan_helpers import UNKNOWN_TARGET

from bdsan.cli import SCAN_PRECISIONS
from bdsan.detectors.keys import (
    KEY_MASK_CUTOFF,
    further_patch_keys,
    mix_picture,
    paste_at_random,
    roaming_patch,
)
from bdsan.detectors.noise import noise_verdict
from bdsan.detectors.scan import (
    ScanSettings,
    _anomaly_index,
    anomalous_triggers,
    kind_verdict,
    scan,
    scan_section,
    scrambled_flip_rates,
)
from bdsan.detectors.triggers import Trigger
from bdsan.detectors.waves import (
    edge_ratios,
    plane_wave_trigger,
    plane_waves,
    wave_name,
    wave_verdict,
)
from bdsan.device import PRECISIONS, channels_last, cpu_supports_bf16, training_bf16, wants_bf16
from bdsan.errors import DataError
from bdsan.io.data import Holdout
from bdsan.io.models import from_module
from bdsan.io.preprocess import Preprocessing

SCAN_STEPS = 150  # early stopping usually ends sooner; toy scale
TARGET = UNKNOWN_TARGET


@pytest.fixture(scope="module")
def unknown_patch_toy():
    return scan_helpers.unknown_patch_toy()


@pytest.fixture(scope="module")
def unknown_patch_scan(unknown_patch_toy):
    return scan(unknown_patch_toy.model, unknown_patch_toy.holdout, steps=SCAN_STEPS, seed=0, device="cpu",
                kinds=("patch",))


def test_scan_flags_the_unknown_patch_target(unknown_patch_toy, unknown_patch_scan):
    section = scan_section(unknown_patch_scan)
    assert section["anomalous"] is True
    assert section["suspected_target"] == TARGET
    assert TARGET in section["anomalous_classes"]
    assert section["flip_rate"][TARGET] >= 0.5
    assert section["mask_l1"][TARGET] < min(v for c, v in enumerate(section["mask_l1"]) if c != TARGET)
    json.dumps(section)  # JSON-safe without the Trigger objects and PNGs


def test_reconstructed_mask_overlaps_the_real_trigger(unknown_patch_scan):
    patch = next(t for t in unknown_patch_scan["reconstructed"]
                 if t.params == {**t.params, "kind": "patch", "target": TARGET})
    mask = patch.fn.parts["mask"][0, 0]
    # The real trigger covers rows/cols 0–3 (a 2-px margin allows for the receptive field). The optimised mask keeps
    # a faint tail everywhere (sigmoid never reaches 0), so look at where its strong pixels (≥ half the max) are.
    rows, cols = torch.nonzero(mask >= 0.5 * mask.max(), as_tuple=True)
    assert float(((rows < 6) & (cols < 6)).float().mean()) >= 0.75, (rows.tolist(), cols.tolist())


def test_reconstructed_triggers_are_usable_bdsan_triggers(unknown_patch_toy, unknown_patch_scan):
    found = anomalous_triggers(unknown_patch_scan)
    assert found and all(isinstance(t, Trigger) for t in found)
    assert found[0].params["target"] == TARGET
    holdout = unknown_patch_toy.holdout
    x = holdout.x[holdout.y != TARGET].float().div(255)
    with torch.no_grad():
        predicted = unknown_patch_toy.model.normalized()(found[0].apply(x)).argmax(1)
    assert float((predicted == TARGET).float().mean()) >= 0.5
    # Any resolution: the trigger is resized with the images.
    assert found[0].apply(torch.rand(2, 3, 64, 64)).shape == (2, 3, 64, 64)


def test_scan_pngs(unknown_patch_scan):
    images = unknown_patch_scan["images"]
    assert f"patch_class{TARGET}_trigger.png" in images and f"patch_class{TARGET}_stamped.png" in images
    assert all(data[:8] == b"\x89PNG\r\n\x1a\n" for data in images.values())


def test_clean_model_is_not_flagged(toy_clean):
    section = scan_section(scan(toy_clean.model, toy_clean.holdout, steps=SCAN_STEPS, seed=0, device="cpu",
                                kinds=("patch",)))
    assert section["anomalous"] is False
    assert section["anomalous_classes"] == []


def test_plane_waves_are_the_ones_their_names_say():
    waves = plane_waves(16, 24, periods=12)
    assert waves.shape == (96, 1, 16, 24)
    index = 5 * 8 + 0 * 4 + 1  # 6 periods across the columns, phase π/2: SIG's sine, shifted
    assert wave_name(index) == "6 periods across the columns, phase 1π/2"
    expected = torch.sin(2 * math.pi * 6 * torch.arange(24) / 24 + math.pi / 2)
    torch.testing.assert_close(waves[index, 0], expected.expand(16, 24))
    down = 2 * 8 + 1 * 4 + 3  # 3 periods down the rows, phase 3π/2
    assert wave_name(down) == "3 periods across the rows, phase 3π/2"
    torch.testing.assert_close(waves[down, 0, :, 5], torch.sin(2 * math.pi * 3 * torch.arange(16) / 16 + 1.5 * math.pi))


def test_edge_rule_calls_a_response_still_rising_at_the_top_frequency_texture():
    # selection rates of 3 periods × 8 waves for 3 classes: class 0 peaks at 2 periods (a sine trigger), class 1
    # grows with frequency (texture), class 2 is never selected
    rates = torch.zeros(24, 3)
    rates[8:16, 0], rates[16:, 0] = 0.99, 0.30
    rates[:8, 1], rates[8:16, 1], rates[16:, 1] = 0.2, 0.6, 0.97
    ratios = edge_ratios(rates)
    torch.testing.assert_close(ratios, torch.tensor([0.30 / 0.99, 1.0, 0.0]))
    flips = np.array([0.98, 0.97, 0.0])
    anomalous, texture, _ = wave_verdict(flips, ratios.tolist(), ScanSettings(wave_edge_ratio=0.9))
    assert anomalous.tolist() == [True, False, False] and texture.tolist() == [False, True, False]
    anomalous, texture, _ = wave_verdict(flips, ratios.tolist(), ScanSettings(wave_edge_ratio=None))
    assert anomalous.tolist() == [True, True, False] and not texture.any()
    anomalous, _, _ = wave_verdict(flips, None, ScanSettings(wave_edge_ratio=0.9))  # a scan stored before the rule
    assert anomalous.tolist() == [True, True, False]


def test_structure_control_sets_a_sink_class_aside():
    flips, scrambled = np.array([0.98, 0.97, 0.0]), [0.01, 0.3, 0.0]
    anomalous, _, sink = wave_verdict(flips, None, ScanSettings(wave_scrambled_max=0.05), scrambled)
    assert anomalous.tolist() == [True, False, False] and sink.tolist() == [False, True, False]
    anomalous, _, sink = wave_verdict(flips, None, ScanSettings(wave_scrambled_max=None), scrambled)
    assert anomalous.tolist() == [True, True, False] and not sink.any()
    anomalous, _, _ = wave_verdict(flips, None, ScanSettings(), None)  # a scan stored before the control
    assert anomalous.tolist() == [True, True, False]


def test_a_sink_needs_an_untuned_response():
    """A class whose shuffled wave crosses the control is set aside only when its stripe response is not tuned to
    one frequency (edge ratio ≥ wave_sink_edge_min): a sine target stays flagged when its model is noise-prone."""
    flips, scrambled, edges = np.array([0.99, 0.95, 0.99]), [0.09, 0.2, 0.01], [0.02, 0.5, 0.5]
    cfg = ScanSettings(wave_scrambled_max=0.075, wave_sink_edge_min=0.24)
    anomalous, _, sink = wave_verdict(flips, edges, cfg, scrambled)
    assert anomalous.tolist() == [True, False, True] and sink.tolist() == [False, True, False]
    anomalous, _, sink = wave_verdict(flips, edges, ScanSettings(wave_scrambled_max=0.075, wave_sink_edge_min=None),
                                      scrambled)
    assert anomalous.tolist() == [False, False, True] and sink.tolist() == [True, True, False]


class _SineOrEnergy(torch.nn.Module):
    """Class 0 when the image correlates with one sine, class 1 when neighbouring pixels differ a lot (any fine
    perturbation: a sink), class 2 otherwise."""

    def __init__(self, sine: torch.Tensor):
        super().__init__()
        self.register_buffer("sine", sine)

    def forward(self, x):
        centred = x.mean(1, keepdim=True) - x.mean((1, 2, 3), keepdim=True)
        correlation = (centred * self.sine).mean((1, 2, 3)) / self.sine.pow(2).mean()
        energy = (x[..., 1:] - x[..., :-1]).pow(2).mean((1, 2, 3)) / self.sine.pow(2).mean()
        return torch.stack([10 * (correlation - 0.5), 10 * (energy / 0.4 - 1), torch.zeros_like(energy)], 1)


def _grey_class2_holdout(count: int) -> Holdout:
    """``count`` flat grey 16×16 images from 0.3 to 0.7 brightness, all of class 2 (``_SineOrEnergy``'s default)."""
    brightness = torch.linspace(0.3, 0.7, count)
    return Holdout((brightness.view(-1, 1, 1, 1) * 255).round().to(torch.uint8).expand(-1, 3, 16, 16).contiguous(),
                   torch.full((count,), 2), ["a", "b", "c"])


def test_scrambled_wave_keeps_its_energy_but_loses_its_structure():
    sine = (32 / 255) * plane_waves(16, 16, 1)[1:2]  # one period across the columns
    net = _SineOrEnergy(sine)
    held = _grey_class2_holdout(40)
    delta = torch.cat([sine, sine, torch.zeros_like(sine)]).expand(-1, 3, -1, -1)
    with torch.no_grad():
        assert net((held.x.float() / 255 + delta[0]).clamp(0, 1)).argmax(1).eq(0).all()  # the wave itself: class 0
    rates = scrambled_flip_rates(net, delta, held, 3, 64, torch.device("cpu"))
    assert rates[0] == 0.0  # shuffled, the sine no longer correlates with itself
    assert rates[1] == 1.0  # but it still carries the energy the sink class answers
    assert rates[2] == 0.0


def test_noise_kind_flags_the_class_fresh_noise_sends_images_to():
    """The noise kind (a default) flags a class to which fresh grey noise blended at ``noise_weight`` sends ≥
    ``noise_threshold`` of held-out images and reconstructs that noise blend as the class's trigger; a scan without
    the kind neither measures nor flags it."""
    assert "noise" in ScanSettings().kinds
    assert noise_verdict([0.1, 0.8, 0.69], ScanSettings()).tolist() == [False, True, False]
    sine = (32 / 255) * plane_waves(16, 16, 1)[1:2]
    model = from_module(_SineOrEnergy(sine), "sine_or_energy", 3, Preprocessing((0.0,) * 3, (1.0,) * 3))
    held = _grey_class2_holdout(60)
    settings = {"wave_select": 30, "seed": 0, "device": "cpu", "wave_periods": 4}
    without = scan_section(scan(model, held, kinds=("wave",), **settings))
    assert "noise" not in without and "noise" not in str(without["anomalous_kinds"])
    result = scan(model, held, kinds=("noise",), **settings)
    section = scan_section(result)
    assert section["noise"]["take"] == [0.0, 1.0, 0.0] and section["noise"]["weight"] == 0.2
    assert section["anomalous_kinds"] == {"1": ["noise"]} and section["suspected_target"] == 1
    trigger = next(t for t in anomalous_triggers(result) if t.params["kind"] == "noise")
    with torch.no_grad():
        assert model.normalized()(trigger(held.x.float() / 255)).argmax(1).eq(1).all()
    faint = scan_section(scan(model, held, kinds=("noise",), noise_weight=0.05, **settings))
    assert faint["noise"]["take"][1] < 0.7 and not faint["anomalous"]
    assert faint["flip_rate"] == faint["noise"]["take"]  # the SPEC names stay filled with --kinds noise alone


def test_noise_kind_draws_colour_noise_beside_grey():
    """A backdoor answering colour noise ignores grey noise: with ``noise_channels=(1, 3)`` the kind stamps both
    forms (the default), flags the class by its colour take, and reconstructs that colour noise blend as its
    trigger."""
    assert ScanSettings().noise_channels == (1, 3)
    model = from_module(scan_helpers.ColourSink(), "colour_sink", 2, Preprocessing((0.0,) * 3, (1.0,) * 3))
    held = scan_helpers.grey_class1_holdout(40)
    settings = {"kinds": ("noise",), "seed": 0, "device": "cpu"}
    grey_only = scan_section(scan(model, held, noise_channels=(1,), **settings))
    assert grey_only["noise"]["take"][0] == 0.0 and not grey_only["anomalous"]
    result = scan(model, held, noise_channels=(1, 3), **settings)
    section = scan_section(result)
    noise = section["noise"]
    assert noise["by_form"]["grey"][0] == 0.0 and noise["by_form"]["colour"][0] == 1.0
    assert noise["take"][0] == 1.0 and noise["form"][0] == "colour"
    assert section["anomalous_kinds"] == {"0": ["noise"]} and section["suspected_target"] == 0
    trigger = next(t for t in anomalous_triggers(result) if t.params["kind"] == "noise")
    x = held.x.float() / 255
    with torch.no_grad():
        assert model.normalized()(trigger(x)).argmax(1).eq(0).all()
    stamped = trigger(x)
    assert float((stamped[:, 0] - stamped[:, 1]).abs().max()) > 0.05  # colour: the channels differ


def test_wave_kind_flags_a_sig_backdoor_and_not_a_clean_model(toy_clean):
    sig_toy = scan_helpers.sig_toy()
    settings = {"kinds": ("wave",), "wave_select": 60, "seed": 0, "device": "cpu"}
    backdoored = scan(sig_toy.model, sig_toy.holdout, **settings)
    section = scan_section(backdoored)
    assert section["anomalous_classes"] == [TARGET] and section["suspected_target"] == TARGET
    assert section["anomalous_kinds"] == {str(TARGET): ["wave"]}
    assert section["wave"]["flip_rate"][TARGET] >= 0.95 and section["wave"]["n_select"] == 60
    assert "across the columns" in section["wave"]["wave"][TARGET]  # SIG's sine runs across the columns
    assert section["mask_l1"] is None and section["flip_rate"] == section["wave"]["flip_rate"]
    assert section["wave"]["texture"][TARGET] is False and section["wave"]["edge_ratio"][TARGET] < 0.5
    assert section["wave"]["sink"][TARGET] is False and section["wave"]["scrambled_flip_rate"][TARGET] < 0.05
    json.dumps(section)
    found = anomalous_triggers(backdoored)
    assert [t.params["kind"] for t in found] == ["wave"]
    x = sig_toy.holdout.x[:4].float() / 255
    assert float((found[0].fn(x) - x).abs().max()) <= 32 / 255 + 1e-6  # the wave, clipped to [0, 1]
    index = found[0].params["wave_index"]  # the wave by number too, for defenses that stamp its neighbours
    assert wave_name(index) == section["wave"]["wave"][TARGET]
    assert torch.equal(plane_wave_trigger(index, TARGET, 32 / 255).apply(x), found[0].fn(x))
    clean = scan_section(scan(toy_clean.model, toy_clean.holdout, **settings))
    assert clean["anomalous"] is False and max(clean["wave"]["flip_rate"]) < 0.95


def test_both_precisions_find_the_unknown_patch_target(unknown_patch_toy, unknown_patch_scan):
    # auto picks bf16 on CPUs with native bf16 and fp32 elsewhere: the module's scan ran in that precision, so
    # scanning once more in the other one covers both wherever the tests run.
    native = cpu_supports_bf16()
    assert scan_section(unknown_patch_scan)["bf16"] is native
    other = "fp32" if native else "bf16"
    toy = unknown_patch_toy
    section = scan_section(scan(toy.model, toy.holdout, steps=SCAN_STEPS, seed=0, device="cpu", kinds=("patch",),
                                precision=other))
    assert section["bf16"] is (other == "bf16")
    assert section["params"]["precision"] == other
    assert section["anomalous_classes"] == [TARGET]


def test_precision_auto_follows_the_cpu():
    assert wants_bf16(torch.device("cpu"), "auto") is cpu_supports_bf16()
    assert wants_bf16(torch.device("cuda"), "auto") is True
    assert wants_bf16(torch.device("cpu"), "fp32") is False and wants_bf16(torch.device("cpu"), "bf16") is True
    with pytest.raises(ValueError):
        wants_bf16(torch.device("cpu"), "fp16")
    assert SCAN_PRECISIONS == PRECISIONS  # the CLI spells them out so that --help never imports torch


def test_training_precision_auto_is_bf16_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training_bf16(cpu, "auto") is False and training_bf16(cuda, "auto") is True
    assert training_bf16(cpu, "bf16") is True and training_bf16(cuda, "fp32") is False
    with pytest.raises(ValueError):
        training_bf16(cpu, "fp16")


def test_unknown_precision_is_a_data_error(unknown_patch_toy):
    with pytest.raises(DataError, match="precision"):
        scan(unknown_patch_toy.model, unknown_patch_toy.holdout, steps=1, device="cpu", precision="fp16")


def test_keep_after_step_also_finds_the_unknown_patch_target(unknown_patch_toy):
    # the earlier selection (the tensors after the step that followed a success), which the defenses' scans keep
    toy = unknown_patch_toy
    section = scan_section(scan(toy.model, toy.holdout, steps=SCAN_STEPS, seed=0, device="cpu", kinds=("patch",),
                                keep="after-step"))
    assert section["params"]["keep"] == "after-step" and section["anomalous_classes"] == [TARGET]
    assert ScanSettings().keep == "measured"
    with pytest.raises(DataError, match="keep"):
        scan(toy.model, toy.holdout, steps=1, device="cpu", keep="latest")


def test_scan_is_seeded(unknown_patch_toy):
    toy = unknown_patch_toy
    first = scan(toy.model, toy.holdout, steps=5, seed=3, device="cpu", kinds=("patch",))
    second = scan(toy.model, toy.holdout, steps=5, seed=3, device="cpu", kinds=("patch",))
    assert first["mask_l1"] == second["mask_l1"]


def test_scan_gives_the_model_back_in_its_own_memory_layout(unknown_patch_toy):
    # The scan runs the model channels_last; pruning and safetensors export afterwards expect the usual layout.
    toy = unknown_patch_toy
    scan(toy.model, toy.holdout, steps=2, seed=0, device="cpu", kinds=("patch",))
    four_d = [t for t in toy.model.module.state_dict().values() if t.dim() == 4]
    assert four_d and all(t.is_contiguous() for t in four_d)


def test_channels_last_keeps_outputs_and_restores_the_layout(unknown_patch_toy):
    net = unknown_patch_toy.model.normalized().eval()
    x = unknown_patch_toy.holdout.x[:16].float() / 255
    with torch.no_grad():
        before = net(x)
        with channels_last(net):
            weights = [p for p in net.parameters() if p.dim() == 4]
            assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in weights)
            inside = net(x)
    assert torch.allclose(before, inside, atol=1e-5)
    assert all(p.is_contiguous() for p in net.parameters())


def test_anomaly_index_leaves_the_class_out_of_its_own_reference():
    # The toy unknown-patch model's mask sizes: the target's is ~10× smaller than the others, which spread 4×.
    # With the target inside its own MAD the index was 1.7 (not flagged); measured against the others it is > 3.
    index = _anomaly_index(np.array([174.0, 157.0, 6.2, 51.0, 62.0]))
    assert index[2] > 3
    assert np.all(np.delete(index, 2) < 2)
    # A tight set without an outlier: its smallest member scores higher than it would inside its own reference
    # (2.2 here), but nowhere near a real outlier; the verdict's size rule (≤ 0.3× the median) is what keeps it clean.
    assert np.all(_anomaly_index(np.array([50.0, 60.0, 55.0, 70.0, 45.0, 65.0])) < 3)


def test_verdict_needs_a_trigger_several_times_smaller_than_the_median():
    # Mask sizes of a clean development toy model (benchmarks/scan_detect.py seed 4, clean0): class 0 passes the
    # index (6.6) and flips 76% of held-out images, but its mask is 0.40× the median class's: not a backdoor.
    flips = np.array([0.76, 0.82, 0.69, 0.72, 0.75])
    index, flagged, score = kind_verdict(np.array([42.0, 96.4, 104.2, 232.9, 117.3]), flips, ScanSettings())
    assert index[0] > 2 and not flagged.any()
    assert score.argmax() == 0  # it still ranks first: the ranking score does not weigh the size test
    # A real trigger of that toy set (corner square, seed 4): 0.05× the median, flagged.
    index, flagged, _ = kind_verdict(np.array([7.4, 58.1, 258.5, 163.3, 140.8]), flips, ScanSettings())
    assert flagged.tolist() == [True, False, False, False, False]
    # A trigger that does not generalise to held-out images is neither flagged nor ranked.
    _, flagged, score = kind_verdict(np.array([7.4, 58.1, 258.5, 163.3, 140.8]), np.full(5, 0.3), ScanSettings())
    assert not flagged.any() and np.isneginf(score).all()


def test_the_blend_kind_has_its_own_size_test():
    # Blend sizes (mean |δ|) shaped like development seed 10's unseen noise blend: the target is 0.56x the median.
    norms = np.array([0.0140, 0.0250, 0.0240, 0.0260, 0.0255, 0.0245, 0.0265, 0.0235, 0.0250, 0.0270])
    flips = np.full(10, 0.7)
    settings = ScanSettings(max_norm_ratio=0.3, blend_max_norm_ratio=0.75)
    assert kind_verdict(norms, flips, settings, kind="blend")[1].tolist() == [True] + [False] * 9
    assert not kind_verdict(norms, flips, settings, kind="patch")[1].any()  # the patch kind keeps 0.3


def test_mix_kind_flags_an_image_blend_and_not_a_clean_model(toy_clean):
    """The mix kind (x' = (1−α)·x + α·p, one α per class) flags the target of a picture blended at 0.2 with
    the smallest α, and its reconstruction flips held-out images; a clean model's classes are all ordinary."""
    assert "mix" in ScanSettings().kinds  # a default since its blind check
    toy = scan_helpers.picture_blend_toy()
    assert scan_helpers.trigger_asr(toy.model.normalized(), toy.holdout.x, toy.holdout.y,
                                    trigger=scan_helpers.blended_picture) > 0.9
    result = scan(toy.model, toy.holdout, steps=SCAN_STEPS, seed=0, device="cpu", kinds=("mix",))
    section = scan_section(result)
    alpha = np.asarray(section["mix"]["alpha"])
    assert section["anomalous_kinds"] == {str(TARGET): ["mix"]} and section["suspected_target"] == TARGET
    assert alpha.argmin() == TARGET and alpha[TARGET] <= ScanSettings().mix_max_norm_ratio * np.median(alpha)
    assert section["mask_l1"] is None and section["flip_rate"] == section["mix"]["flip_rate"]
    json.dumps(section)
    found = anomalous_triggers(result)
    assert [t.params["kind"] for t in found] == ["mix"]
    held = toy.holdout.x[toy.holdout.y != TARGET].float() / 255
    stamped = found[0](held)
    with torch.no_grad():
        assert toy.model.normalized()(stamped).argmax(1).eq(TARGET).float().mean() >= 0.5
    kept = found[0](torch.ones_like(held[:1])) - found[0](torch.zeros_like(held[:1]))  # (1 − α) of x, everywhere
    assert torch.allclose(kept, torch.full_like(kept, 1 - float(alpha[TARGET])), atol=1e-4)
    clean = scan_section(scan(toy_clean.model, toy_clean.holdout, steps=SCAN_STEPS, seed=0, device="cpu",
                              kinds=("mix",)))
    assert clean["anomalous"] is False


def test_adding_the_mix_kind_leaves_the_other_kinds_as_they_were(unknown_patch_toy, unknown_patch_scan):
    """The mix kind is optimised as a problem of its own: the patch kind's triggers and verdict do not change."""
    both = scan_section(scan(unknown_patch_toy.model, unknown_patch_toy.holdout, steps=SCAN_STEPS, seed=0,
                             device="cpu", kinds=("patch", "mix")))
    alone = scan_section(unknown_patch_scan)
    assert np.allclose(both["mask_l1"], alone["mask_l1"], rtol=1e-3), (both["mask_l1"], alone["mask_l1"])
    assert both["anomaly_index"] == pytest.approx(alone["anomaly_index"], abs=1e-2)
    assert both["anomalous_kinds"][str(TARGET)][0] == "patch" and "mix_steps_run" in both
    assert len(both["mix"]["alpha"]) == len(both["mask_l1"]) and set(both["reached_success"]) == {"patch", "mix"}


def test_the_mix_kind_has_its_own_size_test():
    # α shaped like development GTSRB seed 46's image blend: the target at 0.43 of the median, which the patch
    # kind's 0.35 would miss; the mix kind's own test is 0.5
    alphas = np.array([0.06, 0.14, 0.13, 0.15, 0.12, 0.16, 0.14, 0.15])
    flips = np.full(8, 0.8)
    assert ScanSettings().mix_max_norm_ratio == 0.5
    assert kind_verdict(alphas, flips, ScanSettings(), kind="mix")[1].tolist() == [True] + [False] * 7
    assert not kind_verdict(alphas, flips, ScanSettings(), kind="patch")[1].any()
    # a clean class at 0.62 of the median (development GTSRB clean twin 236's lowest) is not flagged
    clean = alphas.copy()
    clean[0] = 0.087  # 0.62 of the median 0.14
    assert not kind_verdict(clean, flips, ScanSettings(), kind="mix")[1].any()


def test_further_keys_avoid_the_first_reconstruction_and_flip_toward_its_class(unknown_patch_toy, unknown_patch_scan):
    first = next(t for t in anomalous_triggers(unknown_patch_scan) if t.params["kind"] == "patch")
    keys = further_patch_keys(unknown_patch_toy.model, unknown_patch_toy.holdout, first, 2, steps=SCAN_STEPS, seed=0,
                              device="cpu")
    assert len(keys) == 2 and [k.params["key"] for k in keys] == [1, 2]
    assert all(k.params["target"] == TARGET and k.params["source"] == "scan" for k in keys)
    barred = first.fn.parts["mask"][0, 0] >= KEY_MASK_CUTOFF
    holdout = unknown_patch_toy.holdout
    x = holdout.x[holdout.y != TARGET].float().div(255)
    for index, key in enumerate(keys):
        mask = key.fn.parts["mask"][0, 0]
        assert float(mask[barred].max()) == 0.0  # never on the pixels the first reconstruction covers
        if index:
            assert float(mask[keys[0].fn.parts["mask"][0, 0] >= KEY_MASK_CUTOFF].max()) == 0.0
        # near the real trigger (rows/cols 0–3, a receptive-field margin), not anywhere on the image
        rows, cols = torch.nonzero(mask >= 0.5 * mask.max(), as_tuple=True)
        assert float(((rows < 8) & (cols < 8)).float().mean()) >= 0.75, (rows.tolist(), cols.tolist())
        with torch.no_grad():
            predicted = unknown_patch_toy.model.normalized()(key.apply(x)).argmax(1)
        assert float((predicted == TARGET).float().mean()) >= 0.5


def _colour_detector(strength: float) -> torch.nn.Module:
    """5 classes; class 2's logit rises with the best match of a fixed 4×4 colour template anywhere in the image
    (a position-invariant backdoor like a global-pooling CNN's), times ``strength`` (0: a model without one)."""
    template = (torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(5)) > 0.5).float() * 2 - 1
    conv = torch.nn.Conv2d(3, 1, 4, bias=False)
    head = torch.nn.Linear(1, 5)
    with torch.no_grad():
        conv.weight.copy_(template[None])
        head.weight.zero_()
        head.weight[TARGET, 0] = strength
        head.bias.copy_(torch.tensor([2.0, 2.0, 2.0 - 10.0 * strength, 2.0, 2.0]))
    return torch.nn.Sequential(conv, torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), head).eval()


def test_roaming_patch_finds_a_position_invariant_backdoor_and_not_a_missing_one():
    """A patch optimised at random positions toward a class: pasted anywhere, it sends nearly every image of a
    model whose backdoor answers colours wherever they are to that class, and none of a model without one."""
    from bdsan.io.models import from_module
    from bdsan.io.preprocess import Preprocessing

    generator = torch.Generator().manual_seed(1)
    holdout = Holdout((torch.rand(64, 3, 16, 16, generator=generator) * 255).to(torch.uint8),
                      torch.arange(64) % 5, [f"c{i}" for i in range(5)])
    found = Trigger("scan_patch_c2", {"source": "scan", "kind": "patch", "target": TARGET}, lambda x, **_: x)
    flips = []
    for strength in (1.0, 0.0):
        model = from_module(_colour_detector(strength), "module", 5, Preprocessing(), list(holdout.classes))
        roam = roaming_patch(model, holdout, found, 4, steps=100, images_per_step=32, seed=0, device="cpu")
        assert roam.name == "scan_patch_c2_roam" and roam.params["roam"] == 4 and roam.params["target"] == TARGET
        x = holdout.x[holdout.y != TARGET].float().div(255)
        stamped = roam.apply(x)
        assert ((stamped != x).any(1).sum((1, 2)) <= 16).all()  # one 4×4 patch per image, nothing else
        with torch.no_grad():
            flips.append(float((model.module(stamped).argmax(1) == TARGET).float().mean()))
    assert flips[0] >= 0.9 and flips[1] == 0.0, flips


class _RedMean(torch.nn.Module):
    """Class 0 when an image's mean red value is above 0.6, class 1 otherwise."""

    def forward(self, x):
        red = x[:, 0].mean((1, 2))
        return torch.stack([100 * (red - 0.6), torch.zeros_like(red)], 1)


def test_mix_picture_finds_the_picture_a_blend_weight_allows_and_no_more():
    """A picture blended at a fixed weight toward a class: on grey images (0.5) a network that answers a mean red
    above 0.6 is reached at weight 0.5 by a red picture, and no picture reaches it at 0.1 (at most 0.55)."""
    holdout = Holdout(torch.full((32, 3, 8, 8), 128, dtype=torch.uint8), torch.ones(32, dtype=torch.long), ["a", "b"])
    flips = {}
    for alpha in (0.5, 0.1):
        found = mix_picture(_RedMean(), holdout, 0, alpha, steps=60, images_per_step=16, seed=0,
                            name="refresh", params={"source": "scan", "target": 5})
        assert found.name == "refresh" and found.params["kind"] == "mix" and found.params["target"] == 0
        x = holdout.x.float().div(255)
        assert torch.allclose(found.apply(x), (1 - alpha) * x + alpha * found.fn.parts["pattern"], atol=1e-6)
        flips[alpha] = found.params["flip"]
        if alpha == 0.5:
            assert found.fn.parts["pattern"][0, 0].mean() > 0.7  # a red picture
    assert flips == {0.5: 1.0, 0.1: 0.0}


def test_paste_at_random_puts_the_patch_inside_the_image_and_is_differentiable():
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 3, 8, 8)
    patch = torch.ones(3, 3, 3, requires_grad=True)
    out = paste_at_random(x, patch, generator)
    assert out.shape == x.shape and (out.sum((1, 2, 3)) == 27).all()
    assert len({tuple(torch.nonzero(o[0])[0].tolist()) for o in out}) > 5  # positions vary between images
    out.sum().backward()
    assert float(patch.grad.sum()) == 64 * 27
