"""Triggers a defense may use without ever seeing the real one: the fit-split audit's flagged suite triggers
(``ctx.known_triggers``) plus, when asked, the scan's reconstructions on the fit images (issue 9)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from torch import nn

from ..io.data import Holdout, to_float
from ..io.models import from_module
from ..io.preprocess import Preprocessing
from .context import Context

SCAN_MODES = ("auto", "if-none", "always", "never")
FULL_IMAGE_PIXELS = 0.25  # a trigger that changes at least this share of the pixels is a full-image one (blend, SIG)
# scan=auto skips the scan only when the fit audit flagged a trigger this strong (net ASR): the suite triggers that
# matched a planted backdoor scored 0.978–0.988 on the CPU benchmark models, natural flips of clean 86% models (a
# noise blend to frog) 0.50–0.60 — one of those kept the scan from running on a backdoor the suite does not know
SCAN_SKIP_NET_ASR = 0.9
# a roaming patch (``roam``) is used only when it sent at least this share of the last steps' images to the class:
# backdoored 86% CIFAR-10 models answer one anywhere (95.7–99.8%), a clean twin does not (3.5%), nor does a network
# whose backdoor is tied to one place (the tests' tiny_cnn: 0%)
ROAM_MIN_FLIP = 0.5
# the optimised kinds of the defenses' fit-split scan: every unlearn/D-BR/FMP number was measured with these two
DEFENSE_SCAN_KINDS = ("patch", "blend")


def scan_mode(value: bool | str) -> str:
    """``scan`` parameter: auto (unless the audit flagged a trigger at net ASR ≥ ``SCAN_SKIP_NET_ASR``), if-none
    (only when the audit flagged no trigger at all: the earlier auto), always, never; true/false accepted."""
    if isinstance(value, bool):
        return "always" if value else "never"
    if value not in SCAN_MODES:
        raise ValueError("scan must be auto (unless the audit found a backdoor-strength trigger), if-none (when the "
                         "audit found no trigger), always or never")
    return value


def audit_found_backdoor(ctx: Context) -> bool:
    """Did the fit audit flag a trigger at backdoor strength (net ASR ≥ ``SCAN_SKIP_NET_ASR``)? A known trigger
    with no recorded evidence (handed in by a caller, not by the pipeline's audit) counts as one."""
    evidence = {e["name"]: e.get("asr_net") for e in ctx.trigger_evidence}
    return any((evidence.get(t.name) if evidence.get(t.name) is not None else 1.0) >= SCAN_SKIP_NET_ASR
               for t in ctx.known_triggers)


def gather_triggers(model: nn.Module, train: Holdout, ctx: Context, mode: str, steps: int,
                    all_classes: bool = False, wave: bool = False, keys: int = 0, roam: int = 0,
                    roam_audit: bool = False, noise: bool = False, mix: bool = False
                    ) -> tuple[list, list[dict], dict | None]:
    """(triggers, where each came from, scan summary or None): the audit's, then the scan's when ``mode`` says
    (``scan_mode``). ``roam_audit``: when the scan does not run, a ``roam``×``roam`` roaming patch toward each class
    a suite patch was flagged for at backdoor strength (``roam_from_audit``)."""
    triggers = list(ctx.known_triggers)
    sources = [{"name": t.name, "source": "audit"} for t in triggers]
    summary = None
    if mode == "always" or (mode == "auto" and not audit_found_backdoor(ctx)) or (mode == "if-none" and not triggers):
        found, summary = scan_fit_split(model, train, ctx, steps, all_classes, wave, keys, roam, noise, mix)
        triggers += found
        sources += [{"name": t.name, "source": "scan", "target": t.params["target"], "kind": t.params["kind"]}
                    for t in found]
    elif roam > 0 and roam_audit and triggers:
        found, summary = roam_from_audit(model, train, ctx, roam, steps)
        triggers += found
        sources += [{"name": t.name, "source": "audit-roam", "target": t.params["target"], "kind": "patch"}
                    for t in found]
    return triggers, sources, summary


def roam_from_audit(model: nn.Module, train: Holdout, ctx: Context, side: int, steps: int) -> tuple[list, dict]:
    """Roaming patches (``roaming_patch``) toward each class a suite *patch* was flagged for at backdoor strength
    (net ASR ≥ ``SCAN_SKIP_NET_ASR``), one per class, kept when they flip at least ``ROAM_MIN_FLIP``: a network
    backdoored with a random-colour patch elsewhere can fire on a suite patch too (on a blind 86% model the suite's
    ``four_corner`` reached net ASR 0.988 on the fit images), and the scan does not run then. Their ``source`` is the
    audit's, so ``bn=auto`` treats them as suite patches. Returns (kept, summary)."""
    from ..detectors.keys import roaming_patch

    started = time.perf_counter()
    loaded = from_module(model, "module", train.num_classes, Preprocessing(), list(train.classes))
    evidence = {e["name"]: e for e in ctx.trigger_evidence}
    example = to_float(train.x[:8])
    classes: dict[int, str] = {}
    for trigger in ctx.known_triggers:
        entry = evidence.get(trigger.name) or {}
        target = entry.get("suspected_target")
        if (target is not None and (entry.get("asr_net") or 0.0) >= SCAN_SKIP_NET_ASR
                and not is_full_image(trigger, example)):
            classes.setdefault(int(target), trigger.name)
    tried = [roaming_patch(loaded, train, SimpleNamespace(name=name, params={"target": target, "kind": "patch",
                                                                             "source": "audit"}),
                           side, steps=steps, device=ctx.device, seed=ctx.seed)
             for target, name in classes.items()]
    model.eval()
    kept, roam_summary = _kept_roaming(tried, started)
    return kept, {"skipped": "the fit audit flagged a trigger at backdoor strength: no scan", "roam": roam_summary}


def _kept_roaming(tried: list, started: float) -> tuple[list, dict]:
    """(the roaming patches that flip at least ``ROAM_MIN_FLIP``, the summary of every one tried since ``started``)."""
    tried = [t for t in tried if t is not None]
    found = [{"name": t.name, "flip": t.params["flip"], "kept": t.params["flip"] >= ROAM_MIN_FLIP} for t in tried]
    return ([t for t in tried if t.params["flip"] >= ROAM_MIN_FLIP],
            {"found": found, "seconds": round(time.perf_counter() - started, 3)})


def scan_fit_split(model: nn.Module, train: Holdout, ctx: Context, steps: int, all_classes: bool = False,
                   wave: bool = False, keys: int = 0, roam: int = 0, noise: bool = False, mix: bool = False
                   ) -> tuple[list, dict]:
    """Run the scan on fit images; return its reconstructed triggers worth using and a summary.

    Without ``all_classes``: the anomalous classes' triggers, or — when none is anomalous and the audit knew no
    trigger — the most suspicious class's (a weak scan signal is still the best lead a small holdout gives; with
    ``mix`` its mix picture too).
    ``wave``: search the scan's ``wave`` kind too; a class's best plane wave is used only where it flagged the
    class (every class has a best wave, most of them mean nothing). ``noise``: search the noise kind too (grey and
    colour noise blended at 0.2); a flagged class's noise blend is used, as a wave is. ``mix``: optimise the mix
    kind too (a full-image blend toward a picture); a flagged class's is used. ``keys``: for each patch among them, up to
    that many further patches toward its class on pixels it does not cover (``further_patch_keys``). ``roam``:
    for each patch among them, a ``roam``×``roam`` patch toward its class optimised and stamped at random positions
    (``roaming_patch``), kept when it flips at least ``ROAM_MIN_FLIP`` of its images.
    """
    from ..detectors.keys import further_patch_keys, roaming_patch
    from ..detectors.scan import anomalous_triggers, scan, scan_section

    started = time.perf_counter()
    loaded = from_module(model, "module", train.num_classes, Preprocessing(), list(train.classes))
    # patch and blend with the selection and size tests every unlearn/D-BR/FMP number was measured with; the
    # detection scan's later defaults (keep=measured, patch size test 0.35) were chosen for detection
    kinds = DEFENSE_SCAN_KINDS + (("wave",) if wave else ()) + (("noise",) if noise else ()) + (("mix",) if mix else ())
    result = scan(loaded, train, steps=steps, batch_size=ctx.batch_size, device=ctx.device, seed=ctx.seed,
                  kinds=kinds, keep="after-step", max_norm_ratio=0.3, blend_max_norm_ratio=0.3,
                  noise_channels=(1, 3))
    model.eval()
    usable = [t for t in result["reconstructed"] if t.params["kind"] in DEFENSE_SCAN_KINDS or t.params["anomalous"]]
    if all_classes:
        found = usable
    else:
        found = anomalous_triggers(result)
        if not found and not ctx.known_triggers and result["suspected_target"] is not None:
            # with ``mix`` the suspect's mix picture too (development: BENCHMARKS.md "Fresh pictures each epoch")
            found = [t for t in result["reconstructed"] if t.params["target"] == result["suspected_target"]
                     and (t in usable or mix and t.params["kind"] == "mix")]
        # a class the mix kind flagged gets its patch and blend too, as an unflagged suspect does (development)
        mixed = {t.params["target"] for t in found if t.params["kind"] == "mix"}
        found += [t for t in usable if t.params["target"] in mixed and t not in found
                  and t.params["kind"] in DEFENSE_SCAN_KINDS]
    if keys > 0:
        keys_started = time.perf_counter()
        found += [key for trigger in found if trigger.params["kind"] == "patch"
                  for key in further_patch_keys(loaded, train, trigger, keys, steps=steps, device=ctx.device,
                                                seed=ctx.seed)]
        model.eval()
    if roam > 0:
        roam_started = time.perf_counter()
        kept, roam_summary = _kept_roaming(
            [roaming_patch(loaded, train, trigger, roam, steps=steps, device=ctx.device, seed=ctx.seed)
             for trigger in found if trigger.params["kind"] == "patch" and "key" not in trigger.params], roam_started)
        found += kept
        model.eval()
    section = scan_section(result)
    summary = {k: section[k] for k in ("suspected_target", "anomalous", "anomalous_classes", "anomalous_kinds",
                                       "anomaly_index", "flip_rate", "mask_l1", "steps_run", "time_s")
               if k in section}
    if wave:
        summary["wave"] = {k: section["wave"][k] for k in ("flip_rate", "wave", "edge_ratio", "scrambled_flip_rate")}
    if mix:
        summary["mix"] = {k: section["mix"][k] for k in ("alpha", "flip_rate", "anomaly_index")}
    if noise:
        summary["noise"] = {k: section["noise"][k] for k in ("take", "form")}
    if keys > 0:
        summary["keys"] = {"found": [t.name for t in found if "key" in t.params],
                           "seconds": round(time.perf_counter() - keys_started, 3)}
    if roam > 0:
        summary["roam"] = roam_summary
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return found, summary


def stamp_leading(x: torch.Tensor, triggers: list, fraction: float, generator: torch.Generator, jitter: int = 0,
                  strength: tuple[float, float] = (1.0, 1.0), jitter_suite: bool = False,
                  wave_phase: bool = False, wave_strength: tuple[float, float] | None = None
                  ) -> tuple[torch.Tensor, int]:
    """(images, n): the first n = round(``fraction``·len(x)) (at least 1 when ``fraction`` > 0) images of a
    random batch each stamped with one randomly chosen trigger, labels untouched. Reconstructed *patch* triggers
    are shifted by up to ``jitter`` px (roll, stamp, roll back): the scan locates a patch only to a pixel or so;
    suite triggers and blends are stamped exactly, as found (a shifted noise blend is a different pattern) —
    unless ``jitter_suite``: then suite *patches* (changing < 25% of the pixels) are shifted too (D-BR's randomised
    variants, ALGORITHMS §3b.2; the shift wraps around the border).

    ``strength`` (lo, hi): a *full-image* trigger's change to each image (stamped − clean; a blend's alpha, SIG's
    amplitude) is scaled by a factor drawn uniformly from [lo, hi] per image; patch triggers are left as found.

    ``wave_phase``: the scan's plane waves are stamped at a random phase (the same roll, over the whole image), not
    at the one of four the scan chose: a model trained on a sine also answers it shifted (BENCHMARKS.md "Unlearn
    with the scan's wave kind").

    ``wave_strength`` (lo, hi): the scan's plane waves are scaled by this range instead of ``strength`` (the scan
    searches at one amplitude, 32/255; a trigger may be stronger)."""
    n = max(1, round(fraction * len(x))) if fraction > 0 and triggers else 0
    if n == 0:
        return x, 0
    choice = torch.randint(len(triggers), (n,), generator=generator)
    out = x.clone()
    for index, trigger in enumerate(triggers):
        rows = torch.nonzero(choice == index).flatten().to(x.device)
        if not len(rows):
            continue
        is_wave = is_reconstructed(trigger, "wave")
        scale = wave_strength if wave_strength is not None and is_wave else strength
        if jitter > 0 and (is_reconstructed(trigger, "patch") or jitter_suite and not is_full_image(trigger, x[rows[:1]])):
            dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
            out[rows] = _stamped_shifted(trigger, x[rows], dy, dx)
        elif wave_phase and is_wave:  # a whole-period roll of the wave: its phase
            dy, dx = (int(torch.randint(size, (1,), generator=generator)) for size in x.shape[-2:])
            out[rows] = _scaled(x[rows], _stamped_shifted(trigger, x[rows], dy, dx), scale, generator)
        else:
            out[rows] = _scaled(x[rows], trigger.apply(x[rows]), scale, generator)
    return out, n


def neighbour_waves(triggers: list, count: int) -> list:
    """For each of the scan's plane waves among ``triggers``: the same wave (axis, phase, amplitude, target) at up to
    ``count`` periods fewer and more per image (at least one period). The scan finds a sine's axis and class but
    not always its frequency (6 periods for a 5-period trigger on two of four models: BENCHMARKS.md "Unlearn's wave
    at more than the scan's amplitude")."""
    from ..detectors.waves import WAVES_PER_FREQUENCY, plane_wave_trigger

    waves = [t.params for t in triggers if is_reconstructed(t, "wave") and "wave_index" in t.params]
    return [plane_wave_trigger(wave["wave_index"] + step * WAVES_PER_FREQUENCY, wave["target"], wave["amplitude"])
            for wave in waves for step in range(-count, count + 1)
            if step and wave["wave_index"] + step * WAVES_PER_FREQUENCY >= 0]


def _stamped_shifted(trigger, x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``trigger`` stamped ``dy``/``dx`` px further down/right (roll, stamp, roll back; wraps around the border)."""
    shifted = torch.roll(x, shifts=(-dy, -dx), dims=(2, 3))
    return torch.roll(trigger.apply(shifted), shifts=(dy, dx), dims=(2, 3))


def _scaled(clean: torch.Tensor, stamped: torch.Tensor, strength: tuple[float, float], generator: torch.Generator
            ) -> torch.Tensor:
    """``clean + s·(stamped − clean)`` with s ~ U[lo, hi] per image, for triggers that change most pixels."""
    lo, hi = strength
    if lo == hi == 1.0 or (stamped != clean).any(dim=1).float().mean() < FULL_IMAGE_PIXELS:
        return stamped
    factor = (lo + (hi - lo) * torch.rand(len(clean), 1, 1, 1, generator=generator)).to(clean)
    return (clean + factor * (stamped - clean)).clamp_(0.0, 1.0)


def stamped_like_training(triggers: list, fraction: float, generator: torch.Generator, jitter: int = 0,
                          strength: tuple[float, float] = (1.0, 1.0), jitter_suite: bool = False,
                          wave_phase: bool = False, wave_strength: tuple[float, float] | None = None):
    """Batch → batch stamped as the fine-tuning batches are: for BN re-estimation (``bn_stamped``)."""
    return lambda x: stamp_leading(x, triggers, fraction, generator, jitter, strength, jitter_suite, wave_phase,
                                   wave_strength)[0]


def is_full_image(trigger, example: torch.Tensor) -> bool:
    """Is ``trigger`` a full-image one (a blend, SIG): the scan's blend reconstructions, or a trigger that changes at
    least ``FULL_IMAGE_PIXELS`` of ``example``'s pixels (a reconstructed patch's soft mask touches every pixel a
    little, so the scan's own ``kind`` decides for those)."""
    if found_by_scan(trigger):
        return trigger.params.get("kind") != "patch"
    return bool((trigger.apply(example) != example).any(dim=1).float().mean() >= FULL_IMAGE_PIXELS)


def found_by_scan(trigger) -> bool:
    """Is ``trigger`` one of the scan's reconstructions (not a suite trigger the audit flagged)?"""
    return (getattr(trigger, "params", None) or {}).get("source") == "scan"


def is_reconstructed(trigger, kind: str) -> bool:
    """Is ``trigger`` the scan's reconstruction of ``kind``?"""
    return found_by_scan(trigger) and trigger.params.get("kind") == kind
