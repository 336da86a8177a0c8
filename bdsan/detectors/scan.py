"""Trigger reverse-engineering for unknown triggers (Neural-Cleanse-style, ALGORITHMS.md §5 "scan").

For every candidate target class t three triggers are optimised: patch and blend with all classes stacked into one
batched problem (each step forwards (2K)×B stamped images, chunked by ``batch_size``), then mix, all classes, as a
second one:

* ``patch``: x' = (1−m)·x + m·p with m = sigmoid(a) (1×H×W) and p = sigmoid(b) (C×H×W); loss = CE(f(x'), t)
  + λ_t·mean(m). A real patch backdoor needs a far smaller mask for its target than any clean class needs.
* ``blend``: x' = clip(x + δ), δ = ε·tanh(d) (C×H×W, full image); loss = CE + λ_t·mean(|δ|). Covers blended and
  additive triggers (noise blends, low-frequency) that no small mask reproduces. It does not single out SIG: a
  sine of amplitude 40/255 is larger than the universal perturbation any class has (BENCHMARKS.md, scan).
* ``mix`` (a default since its blind check: BENCHMARKS.md, "The mix kind"): x' = (1−α)·x + α·p, one
  α = sigmoid(a) per class (a constant full-image mask) and p = sigmoid(b) (C×H×W); loss = CE + λ_t·α. The form
  of an image-blend attack (a fixed picture blended at 0.2), whose key is too large for the blend kind's small δ
  and spread over the whole image, where a patch mask finds cheaper local answers for clean classes
  (BENCHMARKS.md, "Natural-image blends"). Optimised as a problem of its own, after patch and blend, so that it
  leaves their triggers as they were.

A fourth kind, ``wave`` (a default since it passed a blind test), is searched, not optimised: SIG's own family, per
class the grey plane wave (rows or columns, 1–``wave_periods`` periods, four phases, amplitude ``wave_amplitude``)
that flips most of ``wave_select`` optimisation images to the class. Class t is anomalous for it when its wave
flips ≥ ``wave_threshold`` (0.9) of the held-out images (an absolute rule: BENCHMARKS.md, "the best plane wave")
and the class's response is not texture: a class whose best wave at the band's top frequency selects ≥
``wave_edge_ratio`` (0.75) of what its best wave selects responds to fine texture (CIFAR's deer and cat: still rising
at 12 periods), where a sine trigger peaks at its own frequency (BENCHMARKS.md, "the wave kind's edge rule"),
and the response needs the wave's structure: the same wave with its pixels shuffled (same values, no structure; the
mean of ``SCRAMBLE_DRAWS`` shuffles) must send under ``wave_scrambled_max`` of the held-out images to the class. A
class that collects images under any perturbation of that energy, with a response not tuned to one frequency (edge
ratio ≥ ``wave_sink_edge_min``), is a sink (GTSRB's most frequent class, speed limit 50), not a sine trigger
(BENCHMARKS.md, "the wave kind's structure control", "blind GTSRB seed 4"). A fourth kind, ``noise`` (a default
since its blind check: BENCHMARKS.md, "Noise by dose"; colour draws beside grey since "Colour noise"), is searched
too: per class, the share of held-out images that fresh grey or colour noise blended at ``noise_weight`` sends to
it, anomalous at ≥ ``noise_threshold`` (:mod:`bdsan.detectors.noise`).

λ_t adapts per trigger (raised ×1.5 after ``patience`` steps at ≥ ``success`` flip rate, lowered ÷1.5^1.5 after
``patience`` steps below it); the smallest trigger that reached ``success`` on a batch is kept, as it was when that
success was measured (``keep="measured"``, the default since blind seed 11; ``"after-step"``, the tensors after the
optimiser step that followed, shrunk by the size penalty, is what the defenses' scans and the benchmarks before it
used). Optimisation sees
only the ``opt`` part of the holdout; flip rates are measured on the other part (images it never saw). The passes
run in bf16 where ``precision`` asks (``auto``: CUDA and CPUs with native bf16, 2.3–2.6× faster on an AMX CPU with
the same verdicts on the development models; BENCHMARKS.md, "Scan precision").

Verdict [ours]: per kind, anomaly index a_t = (median(n_¬t) − n_t) / (1.4826·MAD(n_¬t)) of the log trigger norms n,
with the other classes' norms n_¬t as reference (low side only: a suspiciously *small* trigger). Class t is
anomalous for a kind when a_t > ``anomaly_threshold`` (2, as Neural Cleanse), its held-out flip rate ≥
``flip_threshold`` (0.5), and n_t ≤ ``max_norm_ratio``·median(n) (0.35: about three times smaller than a typical
class, which keeps MAD from over-reacting with few classes; 0.3 was chosen on development toy scans, where real
triggers measured 0.05–0.25 of the median and the clean classes that passed the index 0.36–0.46, and 0.35 after the
suite's noise blend missed it by a hair on CIFAR seeds 9 and 12, patch masks 0.30 of the median; BENCHMARKS.md).
The blend kind's size test has its own ratio, ``blend_max_norm_ratio``, also 0.3: 0.75 was tried (noise-blend
targets measured 0.40–0.70 of the median on development CIFAR models) and flagged a clean twin whose class-9 blend
measured 0.73 (BENCHMARKS.md, "Seeds 10 (development) and 11 (blind)").
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..device import PRECISIONS, channels_last, precision_autocast, resolve_device, wants_bf16
from ..errors import DataError, ModelRefused
from ..io.data import Holdout, stratified_split, to_float
from ..io.models import LoadedModel
from .noise import noise_forms, noise_verdict
from .triggers import Trigger
from .waves import best_waves, edge_ratios, plane_waves, wave_name, wave_rates, wave_verdict

log = logging.getLogger("bdsan.scan")

KINDS = ("patch", "blend", "wave", "noise", "mix")
DEFAULT_KINDS = KINDS  # every kind since the mix kind's blind check
OPTIMISED_KINDS = ("patch", "blend", "mix")
MIX_ALPHA_INIT = -2.0  # the mix kind's initial α logit: sigmoid(−2) ≈ 0.12
SCRAMBLE_DRAWS = 4  # pixel shuffles averaged by the wave kind's structure control
MAD_TO_SIGMA = 1.4826


@dataclass
class ScanSettings:
    """Hyper-parameters of the scan; every field is reported in the scan section."""

    steps: int = 200
    images_per_step: int = 16
    lr: float = 0.1
    mask_init: float = -1.0
    init_cost: float = 1.0
    success: float = 0.9
    patience: int = 5
    early_stop_patience: int = 40
    blend_epsilon: float = 0.5
    eval_fraction: float = 0.5
    anomaly_threshold: float = 2.0
    flip_threshold: float = 0.5
    max_norm_ratio: float = 0.35  # 0.3 before blind seed 13 (BENCHMARKS.md, "the wave kind's edge rule, and blind seed 12")
    # the blend kind's size test (BENCHMARKS.md, "Seeds 10 (development) and 11 (blind)": 0.75 gave a false positive)
    blend_max_norm_ratio: float = 0.3
    # the mix kind's size test: α ≤ this · the median class's α; the geometric middle of the development image- and
    # noise-blend targets' highest 0.438 and any other class's lowest 0.576 (BENCHMARKS.md, "The mix kind")
    mix_max_norm_ratio: float = 0.5
    # "measured": keep the tensors a successful batch's success was measured on (BENCHMARKS.md "Why the noise
    # blend's reconstruction did not generalise"; the default since blind seed 11); "after-step": as they are after
    # the optimiser step that followed (the default before; the defenses' scans keep it)
    keep: str = "measured"
    kinds: tuple[str, ...] = DEFAULT_KINDS
    # the wave kind: no optimisation, a search over grey plane waves (BENCHMARKS.md, "the best plane wave")
    wave_amplitude: float = 32 / 255
    wave_periods: int = 12
    wave_select: int = 200
    wave_threshold: float = 0.9  # 0.95 before the edge rule (BENCHMARKS.md, "the wave kind's edge rule")
    # a class whose best wave at the band's top frequency selects ≥ this share of what its best wave selects is
    # texture, not a trigger (BENCHMARKS.md, "the wave kind's edge rule"); None: no edge rule
    wave_edge_ratio: float | None = 0.75
    # a class to which the best wave with its pixels shuffled still sends ≥ this share of held-out images is a sink,
    # not a sine trigger; between the development sines' highest 0.030 and GTSRB's sink class's lowest 0.181 (blind
    # GTSRB sines reached 0.074: BENCHMARKS.md, "the wave kind's structure control", "blind GTSRB seed 4"); None: off
    wave_scrambled_max: float | None = 0.075
    # ... and whose response is not tuned to one frequency: its edge ratio ≥ this (the geometric middle of GTSRB's
    # sine targets' highest 0.17 and its sink class's lowest 0.33; BENCHMARKS.md, "blind GTSRB seed 4"); None: the
    # shuffled flip alone decides
    wave_sink_edge_min: float | None = 0.24
    # the noise kind (bdsan.detectors.noise): fresh grey noise blended at this weight (the noise-blend family's
    # published 0.2), ``noise_draws`` draws; a class taking ≥ ``noise_threshold`` of held-out images is anomalous
    # (development: noise-blend targets 0.98–1.00, every other class ≤ 0.455; blind: 0.994–1.000 and ≤ 0.433;
    # BENCHMARKS.md, "Noise by dose")
    noise_weight: float = 0.2
    noise_draws: int = 3
    # noise forms by channels drawn: 1 grey, 3 colour (one value per pixel and channel); a class's take is the
    # larger form's (a colour-noise backdoor ignores grey noise: development targets 0.000 and 0.013 under grey, 1.000
    # under colour; clean classes ≤ 0.19 under colour; blind 4/4 noise blends, 0/5 twins; BENCHMARKS.md "Colour noise")
    noise_channels: tuple[int, ...] = (1, 3)
    noise_threshold: float = 0.7
    precision: str = "auto"


class TriggerBank:
    """K triggers per kind (patch, blend, mix) as stacked tensors; :meth:`parts` gives them in pixel space."""

    def __init__(self, kinds: tuple[str, ...], num_classes: int, shape: tuple[int, int, int], epsilon: float,
                 mask_init: float, generator: torch.Generator, device: torch.device):
        channels, height, width = shape
        self.kinds, self.k, self.epsilon = kinds, num_classes, epsilon
        self.params: dict[str, list[torch.Tensor]] = {}
        if "patch" in kinds:
            mask = torch.full((num_classes, 1, height, width), mask_init) + 0.1 * torch.randn(
                num_classes, 1, height, width, generator=generator)
            pattern = 2.0 * torch.randn(num_classes, channels, height, width, generator=generator)
            self.params["patch"] = [mask.to(device).requires_grad_(), pattern.to(device).requires_grad_()]
        if "blend" in kinds:
            delta = 0.05 * torch.randn(num_classes, channels, height, width, generator=generator)
            self.params["blend"] = [delta.to(device).requires_grad_()]
        if "mix" in kinds:
            alpha = torch.full((num_classes, 1, 1, 1), MIX_ALPHA_INIT)
            pattern = 2.0 * torch.randn(num_classes, channels, height, width, generator=generator)
            self.params["mix"] = [alpha.to(device).requires_grad_(), pattern.to(device).requires_grad_()]

    def tensors(self) -> list[torch.Tensor]:
        return [t for kind in self.kinds for t in self.params[kind]]

    def parts(self, kind: str) -> dict[str, torch.Tensor]:
        """The trigger in pixel space: ``mask``/``pattern`` (patch; mix: a 1×1×1 mask) or ``delta`` (blend),
        K-stacked."""
        if kind in ("patch", "mix"):
            mask, pattern = self.params[kind]
            return {"mask": torch.sigmoid(mask), "pattern": torch.sigmoid(pattern)}
        return {"delta": self.epsilon * torch.tanh(self.params["blend"][0])}

    def norms(self, kind: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-class size: mean mask value (patch; mix: α) or mean |δ| (blend)."""
        if kind in ("patch", "mix"):
            return parts["mask"].flatten(1).mean(1)
        return parts["delta"].abs().flatten(1).mean(1)


def _stamp(kind: str, parts: dict[str, torch.Tensor], rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply trigger rows ``rows`` (one per image) of one kind to images ``x`` in [0,1] (noise, mix: patch-form)."""
    if kind in ("patch", "noise", "mix"):
        mask, pattern = parts["mask"][rows], parts["pattern"][rows]
        return (1 - mask) * x + mask * pattern
    return (x + parts["delta"][rows]).clamp(0, 1)


def _anomaly_index(norms: np.ndarray, mad_floor: float = 0.05) -> np.ndarray:
    """Low-side MAD anomaly index on log norms: how many robust standard deviations a trigger's size lies *below*
    the median of the *other* classes' sizes. Sizes are scale quantities (a backdoor's trigger is several times
    smaller, not a fixed amount), and on the log scale one huge clean class no longer inflates the MAD. Leaving the
    class out of its own reference matters with few classes: with 5, a target 10× smaller than the rest otherwise
    widens the MAD it is measured against (index 1.7 instead of 3.6 on the toy unknown-patch model)."""
    logs = np.log(np.maximum(norms, 1e-12))
    count = len(logs)
    if count < 3:
        return np.zeros(count)
    others = np.stack([np.delete(logs, t) for t in range(count)])
    median = np.median(others, axis=1)
    mad = np.maximum(MAD_TO_SIGMA * np.median(np.abs(others - median[:, None]), axis=1), mad_floor)
    return (median - logs) / mad


def _split_for_scan(holdout: Holdout, eval_fraction: float, seed: int) -> tuple[Holdout, Holdout]:
    eval_index, opt_index = stratified_split(holdout.y, eval_fraction, seed + 7919, holdout.num_classes)
    return holdout.subset(opt_index), holdout.subset(eval_index)


def _torch_classifier(model: LoadedModel, device: torch.device) -> torch.nn.Module:
    if model.module is None:
        raise ModelRefused(f"{model.path}: scan needs gradients through the model; ONNX models cannot be scanned",
                           hint="scan the PyTorch/safetensors weights the ONNX file was exported from")
    net = model.normalized().to(device).eval()
    return net


@contextlib.contextmanager
def frozen_classifier(model: LoadedModel, device: torch.device) -> Iterator[torch.nn.Module]:
    """The model's normalised network in eval mode with channels_last weights and no parameter gradients (only the
    triggers are optimised); its parameters' ``requires_grad`` and layout are given back afterwards."""
    net = _torch_classifier(model, device)
    requires_grad = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        with channels_last(net):
            yield net
    finally:
        for p, flag in zip(net.parameters(), requires_grad):
            p.requires_grad_(flag)


def scan(model: LoadedModel, holdout: Holdout, *, steps: int = 200, batch_size: int = 256, device=None,
         seed: int = 0, progress=None, sample_images: int = 8, **settings) -> dict:
    """Reverse-engineer one trigger per class and kind and flag classes whose trigger is anomalous.

    Returns the SPEC §5 ``scan`` section (JSON-safe) plus two non-JSON keys that :func:`scan_section` drops:
    ``reconstructed`` (list of :class:`bdsan.detectors.triggers.Trigger`, one per class and kind, anomalous
    ones first) and ``images`` (file name → PNG bytes of each trigger and of it stamped on sample images).
    """
    cfg = ScanSettings(steps=steps, **settings)
    if unknown_kinds(cfg.kinds) or not cfg.kinds:
        raise DataError(f"scan kinds must be among {KINDS}, got {cfg.kinds}")
    if cfg.keep not in ("after-step", "measured"):
        raise DataError(f"scan keep must be after-step or measured, got {cfg.keep!r}")
    if cfg.precision not in PRECISIONS:
        raise DataError(f"scan precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    started = time.perf_counter()
    device = resolve_device(device)
    bf16 = wants_bf16(device, cfg.precision)
    holdout = holdout.to(device)
    num_classes = model.num_classes
    if holdout.num_classes and holdout.num_classes != num_classes:
        log.warning("holdout has %d classes, model %d", holdout.num_classes, num_classes)
    if len(holdout) < 2 * num_classes:
        raise DataError(f"scan needs at least 2 holdout images per class; got {len(holdout)} for {num_classes}")
    opt, held = _split_for_scan(holdout, cfg.eval_fraction, seed)
    with frozen_classifier(model, device) as net:
        bank, trace = _optimise_groups(net, opt, num_classes, cfg, batch_size, seed, device, progress, bf16)
        if "wave" in cfg.kinds:
            bank["wave"], trace["wave"] = _wave_search(net, opt, num_classes, cfg, batch_size, device, bf16)
        flip = {kind: _flip_rates(net, bank[kind], kind, held, num_classes, batch_size, device, bf16)
                for kind in cfg.kinds if kind != "noise"}
        if "noise" in cfg.kinds:
            flip["noise"], trace["noise"], bank["noise"] = noise_forms(net, held, num_classes, cfg, seed,
                                                                       batch_size, device, bf16)
        if "wave" in cfg.kinds:
            trace["wave"]["scrambled_flip_rate"] = scrambled_flip_rates(
                net, bank["wave"]["delta"], held, num_classes, batch_size, device, bf16, seed)
    trace["bf16"] = bf16
    result = _verdict(bank, flip, cfg, holdout, model, opt, held, trace)
    result["reconstructed"] = _make_triggers(bank, result, cfg)
    result["images"] = _render_pngs(bank, result, held, sample_images)
    result["time_s"] = round(time.perf_counter() - started, 3)
    return result


def _optimise_groups(net, opt: Holdout, num_classes: int, cfg: ScanSettings, batch_size: int, seed: int,
                     device: torch.device, progress, bf16: bool = False) -> tuple[dict, dict]:
    """The optimised kinds in two problems: patch and blend together (as every verdict before the mix kind was
    measured), then mix on its own, so that adding it leaves the others' triggers as they were. The trace's
    ``reached_success`` is per kind; ``steps_run`` is the first problem's (``mix_steps_run`` the mix kind's)."""
    first = tuple(kind for kind in cfg.kinds if kind in OPTIMISED_KINDS and kind != "mix")
    groups = [group for group in (first, ("mix",) if "mix" in cfg.kinds else ()) if group]
    bank: dict = {}
    trace: dict = {"steps_run": 0, "reached_success": {}}
    for number, group in enumerate(groups):
        offset = number * cfg.steps
        report = (lambda done, _total, o=offset: progress(o + done, len(groups) * cfg.steps)) if progress else None
        part, part_trace = _optimise(net, opt, num_classes, replace(cfg, kinds=group), batch_size, seed, device,
                                     report, bf16)
        bank |= part
        for index, kind in enumerate(group):
            trace["reached_success"][kind] = part_trace["reached_success"][index * num_classes:(index + 1) * num_classes]
        if number == 0:
            trace["steps_run"] = part_trace["steps_run"]
        if group == ("mix",):
            trace["mix_steps_run"] = part_trace["steps_run"]
    return bank, trace


def _optimise(net, opt: Holdout, num_classes: int, cfg: ScanSettings, batch_size: int, seed: int,
              device: torch.device, progress, bf16: bool = False) -> tuple[dict, dict]:
    """The batched Neural-Cleanse loop over all classes and kinds; returns the best trigger parts per kind."""
    generator = torch.Generator().manual_seed(seed)
    channels, height, width = opt.x.shape[1:]
    bank = TriggerBank(cfg.kinds, num_classes, (channels, height, width), cfg.blend_epsilon, cfg.mask_init,
                       generator, device)
    optimizer = torch.optim.Adam(bank.tensors(), lr=cfg.lr, betas=(0.5, 0.9))
    kinds = cfg.kinds
    n_kinds = len(kinds)
    total = n_kinds * num_classes
    cost = torch.full((total,), cfg.init_cost, device=device)
    up = torch.zeros(total, dtype=torch.long, device=device)
    down = torch.zeros(total, dtype=torch.long, device=device)
    best_norm = torch.full((total,), math.inf, device=device)
    with torch.no_grad():
        best = {kind: {name: t.detach().clone() for name, t in bank.parts(kind).items()} for kind in kinds}
    last_improved = 0
    per_step = min(cfg.images_per_step, len(opt))
    targets_all = torch.arange(total, device=device) % num_classes  # trigger row r targets class r % K
    step = 0
    for step in range(1, cfg.steps + 1):
        index = torch.randint(len(opt), (per_step,), generator=generator).to(device)
        x = to_float(opt.x[index])
        y = opt.y[index]
        # (trigger row, image) pairs, flattened; chunked forward/backward accumulates gradients.
        rows = torch.arange(total, device=device).repeat_interleave(per_step)
        images = torch.arange(per_step, device=device).repeat(total)
        keep = y[images] != targets_all[rows]
        rows, images = rows[keep], images[keep]
        optimizer.zero_grad(set_to_none=True)
        hits = torch.zeros(total, device=device)
        counts = torch.bincount(rows, minlength=total).float().clamp_min(1)
        for start in range(0, len(rows), batch_size):
            chunk_rows, chunk_images = rows[start:start + batch_size], images[start:start + batch_size]
            stamped, targets = [], []
            order = []
            for kind_index, kind in enumerate(kinds):
                parts = bank.parts(kind)
                sel = (chunk_rows // num_classes) == kind_index
                if sel.any():
                    stamped.append(_stamp(kind, parts, chunk_rows[sel] % num_classes, x[chunk_images[sel]]))
                    targets.append(targets_all[chunk_rows[sel]])
                    order.append(chunk_rows[sel])
            batch, target, row_of = torch.cat(stamped), torch.cat(targets), torch.cat(order)
            with precision_autocast(device, bf16):
                logits = net(batch)
            losses = F.cross_entropy(logits.float(), target, reduction="none")
            (losses / counts[row_of]).sum().backward()
            with torch.no_grad():
                hits.index_add_(0, row_of, (logits.argmax(1) == target).float())
        # The size penalty: λ_r · norm_r, summed over rows (each row's CE is already a per-row mean).
        norms = torch.cat([bank.norms(kind, bank.parts(kind)) for kind in kinds])
        (cost * norms).sum().backward()
        # keep=measured: the tensors (and sizes) this batch's success was measured on, before the step shrinks them
        measured = ({kind: {n: t.detach().clone() for n, t in bank.parts(kind).items()} for kind in kinds}
                    if cfg.keep == "measured" else None)
        norms = norms.detach()
        optimizer.step()
        with torch.no_grad():
            success = hits / counts
            if measured is None:
                norms = torch.cat([bank.norms(kind, bank.parts(kind)) for kind in kinds])
            improved = (success >= cfg.success) & (norms < best_norm * 0.99)
            if improved.any():
                last_improved = step
                for kind_index, kind in enumerate(kinds):
                    rows_k = torch.nonzero(improved[kind_index * num_classes:(kind_index + 1) * num_classes]).flatten()
                    if len(rows_k):
                        kept = bank.parts(kind) if measured is None else measured[kind]
                        for name, tensor in kept.items():
                            best[kind][name][rows_k] = tensor[rows_k].detach()
                best_norm = torch.where(improved, norms, best_norm)
            cost, up, down = adapt_cost(cost, up, down, success >= cfg.success, cfg.patience)
        if progress:
            progress(step, cfg.steps)
        if step - last_improved >= cfg.early_stop_patience and bool(torch.isfinite(best_norm).all()):
            break
    with torch.no_grad():
        # A class that never reached the success rate keeps its final trigger (its flip rate will say so).
        final = {kind: bank.parts(kind) for kind in kinds}
        for kind_index, kind in enumerate(kinds):
            never = ~torch.isfinite(best_norm[kind_index * num_classes:(kind_index + 1) * num_classes])
            for name in best[kind]:
                best[kind][name][never] = final[kind][name][never].detach()
    trace = {"steps_run": step, "final_cost": cost.tolist(),
             "reached_success": torch.isfinite(best_norm).tolist()}
    return best, trace


def adapt_cost(cost: torch.Tensor, up: torch.Tensor, down: torch.Tensor, reached: torch.Tensor, patience: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neural Cleanse's size-penalty schedule, per trigger: λ ×1.5 after ``patience`` steps in a row at the success
    rate, ÷1.5^1.5 after ``patience`` steps below it; returns (cost, up, down) counters."""
    up = torch.where(reached, up + 1, torch.zeros_like(up))
    down = torch.where(reached, torch.zeros_like(down), down + 1)
    raise_cost, lower_cost = up >= patience, down >= patience
    cost = torch.where(raise_cost, cost * 1.5, torch.where(lower_cost, cost / 1.5 ** 1.5, cost))
    return cost, torch.where(raise_cost, torch.zeros_like(up), up), torch.where(lower_cost, torch.zeros_like(down), down)


def _wave_search(net, opt: Holdout, num_classes: int, cfg: ScanSettings, batch_size: int, device: torch.device,
                 bf16: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The ``wave`` kind: per class, the grey plane wave of amplitude ``wave_amplitude`` that sends the most of
    ``wave_select`` optimisation images of other classes to it (SIG's trigger family; no optimisation). Returns the
    chosen waves as blend-like parts, their selection rates and each class's edge ratio."""
    waves = cfg.wave_amplitude * plane_waves(*opt.x.shape[2:], cfg.wave_periods).to(device)
    count = min(cfg.wave_select, len(opt))  # opt is shuffled (stratified_split): its head is a random sample
    rates = wave_rates(net, to_float(opt.x[:count]), opt.y[:count], waves, num_classes, batch_size, device, bf16)
    return {"delta": best_waves(rates, opt.x.shape[1:], cfg).to(device)}, {
        "selection_flip_rate": rates.max(0).values.tolist(), "n_select": count,
        "wave": [wave_name(int(b)) for b in rates.argmax(0)], "wave_index": rates.argmax(0).tolist(),
        "edge_ratio": edge_ratios(rates).tolist()}


def scrambled_flip_rates(net, delta: torch.Tensor, held: Holdout, num_classes: int, batch_size: int,
                         device: torch.device, bf16: bool = False, seed: int = 0,
                         draws: int = SCRAMBLE_DRAWS) -> list[float]:
    """Per class t: the held-out flip rate to t of its wave ``delta[t]`` with the pixels shuffled (the same values,
    no structure), the mean over ``draws`` seeded shuffles. A sine trigger needs its structure; a sink class takes
    images under any perturbation of that energy (BENCHMARKS.md, "the wave kind's structure control")."""
    generator = torch.Generator().manual_seed(seed + 104729)
    height, width = delta.shape[-2:]
    total = np.zeros(num_classes)
    for _ in range(draws):
        order = torch.randperm(height * width, generator=generator).to(delta.device)
        shuffled = delta.flatten(2)[:, :, order].reshape(delta.shape)
        total += _flip_rates(net, {"delta": shuffled}, "wave", held, num_classes, batch_size, device, bf16)
    return (total / draws).tolist()


@torch.no_grad()
def _flip_rates(net, parts: dict[str, torch.Tensor], kind: str, held: Holdout, num_classes: int, batch_size: int,
                device: torch.device, bf16: bool = False) -> list[float]:
    """Per class t: fraction of held-out images with label ≠ t predicted t once trigger t is stamped."""
    rows = torch.arange(num_classes, device=device).repeat_interleave(len(held))
    images = torch.arange(len(held), device=device).repeat(num_classes)
    keep = held.y[images] != rows
    rows, images = rows[keep], images[keep]
    hits = torch.zeros(num_classes, device=device)
    for start in range(0, len(rows), batch_size):
        r, i = rows[start:start + batch_size], images[start:start + batch_size]
        with precision_autocast(device, bf16):
            predicted = net(_stamp(kind, parts, r, to_float(held.x[i]))).argmax(1)
        hits.index_add_(0, r, (predicted == r).float())
    counts = torch.bincount(rows, minlength=num_classes).float()
    return torch.where(counts > 0, hits / counts.clamp_min(1), torch.zeros_like(hits)).tolist()


def unknown_kinds(kinds) -> list[str]:
    """The names in ``kinds`` that are not scan kinds (the CLI checks them before any work, the API here)."""
    return [kind for kind in kinds if kind not in KINDS]


def suspect_among(flagged, scores, wave_flips) -> int:
    """The suspected target among flagged classes: the highest patch/blend score, then the best wave flip."""
    return max(sorted(flagged), key=lambda cls: (scores[cls], wave_flips[cls]))


def kind_verdict(norms: np.ndarray, flips: np.ndarray, cfg: ScanSettings, index: np.ndarray | None = None,
                 kind: str = "patch") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One kind's per-class trigger sizes and held-out flip rates → (anomaly index, anomalous, ranking score).

    Anomalous: index > ``anomaly_threshold``, flip ≥ ``flip_threshold`` and size ≤ ratio·median size, the ratio
    being ``max_norm_ratio`` (patch), ``blend_max_norm_ratio`` (blend) or ``mix_max_norm_ratio`` (mix). The
    ranking score is the index where the trigger generalises (flip ≥ ``flip_threshold``), else −∞. ``index``
    replaces :func:`_anomaly_index` (``benchmarks/rescore_scan.py`` compares index rules this way)."""
    index = _anomaly_index(norms) if index is None else index
    generalises = flips >= cfg.flip_threshold
    ratio = {"blend": cfg.blend_max_norm_ratio, "mix": cfg.mix_max_norm_ratio}.get(kind, cfg.max_norm_ratio)
    small = norms <= ratio * float(np.median(norms))
    return index, (index > cfg.anomaly_threshold) & generalises & small, np.where(generalises, index, -np.inf)


def _verdict(bank: dict, flip: dict, cfg: ScanSettings, holdout: Holdout, model: LoadedModel, opt: Holdout,
             held: Holdout, trace: dict) -> dict:
    num_classes = model.num_classes
    height, width = holdout.image_size
    section: dict = {"kinds": list(cfg.kinds), "n": len(holdout), "n_opt": len(opt), "n_eval": len(held),
                     "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
                     "steps_run": trace["steps_run"], "bf16": trace["bf16"], "reached_success": {}}
    if "mix_steps_run" in trace:
        section["mix_steps_run"] = trace["mix_steps_run"]
    scores = np.full(num_classes, -np.inf)
    anomalous_classes: set[int] = set()
    flagged_kinds: dict[int, list[str]] = {}
    for kind in cfg.kinds:
        flips = np.asarray(flip[kind])
        if kind == "wave":  # an absolute test: no size to compare, every class has a best wave
            flagged, texture, sink = wave_verdict(flips, trace["wave"]["edge_ratio"], cfg,
                                                  trace["wave"]["scrambled_flip_rate"])
            section["wave"] = {"flip_rate": [float(v) for v in flips], **trace["wave"],
                               "texture": [bool(v) for v in texture], "sink": [bool(v) for v in sink]}
        elif kind == "noise":  # absolute too: the share fresh noise sends to each class
            flagged = noise_verdict(flips, cfg)
            section["noise"] = {"take": [float(v) for v in flips], **trace["noise"], "weight": cfg.noise_weight,
                                "draws": cfg.noise_draws, "threshold": cfg.noise_threshold}
        if kind in ("wave", "noise"):
            for cls in np.nonzero(flagged)[0]:
                anomalous_classes.add(int(cls))
                flagged_kinds.setdefault(int(cls), []).append(kind)
            continue
        parts = bank[kind]
        if kind == "patch":
            norms = parts["mask"].flatten(1).sum(1).cpu().numpy()  # mask L1 in pixels
        elif kind == "mix":
            norms = parts["mask"].flatten(1).mean(1).cpu().numpy()  # α
        else:
            norms = parts["delta"].abs().flatten(1).mean(1).cpu().numpy()  # mean |δ| per pixel and channel
        index, flagged, kind_scores = kind_verdict(norms, flips, cfg, kind=kind)
        for cls in np.nonzero(flagged)[0]:
            anomalous_classes.add(int(cls))
            flagged_kinds.setdefault(int(cls), []).append(kind)
        scores = np.maximum(scores, kind_scores)
        section["reached_success"][kind] = [bool(v) for v in trace["reached_success"][kind]]
        if kind == "patch":
            section["mask_l1"] = [float(v) for v in norms]
            section["mask_fraction"] = [float(v) / (height * width) for v in norms]
            section["flip_rate"] = [float(v) for v in flips]
            section["anomaly_index"] = [float(v) for v in index]
        elif kind == "mix":
            section["mix"] = {"alpha": [float(v) for v in norms], "flip_rate": [float(v) for v in flips],
                              "anomaly_index": [float(v) for v in index]}
        else:
            section["blend"] = {"mean_abs_delta": [float(v) for v in norms], "flip_rate": [float(v) for v in flips],
                                "anomaly_index": [float(v) for v in index]}
    if "patch" not in cfg.kinds:  # the SPEC names stay meaningful with --kinds blend (or wave)
        fallback = section.get("blend") or section.get("mix") or {
            "flip_rate": section.get("wave", {}).get("flip_rate") or section["noise"]["take"],
            "anomaly_index": [None] * num_classes}
        section["mask_l1"], section["flip_rate"] = None, fallback["flip_rate"]
        section["anomaly_index"] = fallback["anomaly_index"]
    if anomalous_classes:  # the suspect is a flagged class: the highest score, then the best wave
        suspected = suspect_among(anomalous_classes, scores, flip.get("wave", [0.0] * num_classes))
    else:
        suspected = int(np.argmax(scores)) if np.isfinite(scores).any() else None
    section["score"] = [float(v) if np.isfinite(v) else None for v in scores]
    section["suspected_target"] = suspected
    section["anomalous_classes"] = sorted(anomalous_classes)
    section["anomalous_kinds"] = {str(k): v for k, v in sorted(flagged_kinds.items())}
    section["anomalous"] = bool(anomalous_classes)
    section["classes"] = list(holdout.classes)
    return section


def _make_triggers(bank: dict, section: dict, cfg: ScanSettings) -> list:
    """One bdsan Trigger per class and kind (anomalous ones first) applying the reconstructed trigger."""
    anomalous = {int(k): v for k, v in section["anomalous_kinds"].items()}
    triggers = []
    for kind in cfg.kinds:
        parts = {name: tensor.detach().clone() for name, tensor in bank[kind].items()}
        for cls in range(len(next(iter(parts.values())))):
            trigger_parts = {name: tensor[cls:cls + 1] for name, tensor in parts.items()}
            params = {"source": "scan", "kind": kind, "target": cls, "anomalous": kind in anomalous.get(cls, [])}
            if kind == "wave":  # which plane wave, so that a defense can stamp its neighbours too
                params |= {"wave_index": section["wave"]["wave_index"][cls], "amplitude": cfg.wave_amplitude}
            triggers.append(Trigger(f"scan_{kind}_class{cls}", params, ReconstructedTrigger(kind, trigger_parts)))
    triggers.sort(key=lambda t: not t.params["anomalous"])
    return triggers


class ReconstructedTrigger:
    """Callable ``fn(x)`` for a Trigger: stamps a reconstructed trigger on [0,1] NCHW images of any size/device."""

    def __init__(self, kind: str, parts: dict[str, torch.Tensor]):
        self.kind, self.parts = kind, {name: tensor.cpu() for name, tensor in parts.items()}

    def __call__(self, x: torch.Tensor, **_params) -> torch.Tensor:
        size = x.shape[-2:]
        parts = {}
        for name, tensor in self.parts.items():
            tensor = tensor.to(x.device, x.dtype)
            if tuple(tensor.shape[-2:]) != tuple(size):
                tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
            parts[name] = tensor
        rows = torch.zeros(len(x), dtype=torch.long, device=x.device)
        return _stamp(self.kind, parts, rows, x).clamp(0, 1)


def _png(array: np.ndarray, scale: int) -> bytes:
    """H×W×3 float [0,1] → PNG bytes, upscaled (nearest) so 32-px triggers are visible."""
    from PIL import Image

    image = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def _render_pngs(bank: dict, section: dict, held: Holdout, sample_images: int) -> dict[str, bytes]:
    """Per class and kind: ``<kind>_class<t>_trigger.png`` (patch: pattern·mask | mask; blend: 0.5+δ) and
    ``<kind>_class<t>_stamped.png`` (a row of sample held-out images with the trigger stamped)."""
    height, width = held.image_size
    scale = max(1, 128 // max(height, width))
    samples = to_float(held.x[:sample_images])
    pngs: dict[str, bytes] = {}
    for kind in section["kinds"]:
        parts = bank[kind]
        num_classes = len(next(iter(parts.values())))
        for cls in range(num_classes):
            if kind in ("patch", "noise", "mix"):
                mask, pattern = parts["mask"][cls], parts["pattern"][cls]
                view = torch.cat([pattern * mask, mask.expand_as(pattern)], dim=2)
            else:
                delta = parts["delta"][cls]
                view = 0.5 + delta / (2 * max(float(delta.abs().max()), 1e-6))
            pngs[f"{kind}_class{cls}_trigger.png"] = _png(view.permute(1, 2, 0).float().cpu().numpy(), scale)
            if len(samples):
                rows = torch.full((len(samples),), cls, dtype=torch.long, device=samples.device)
                stamped = _stamp(kind, parts, rows, samples)
                strip = torch.cat(list(stamped), dim=2)
                pngs[f"{kind}_class{cls}_stamped.png"] = _png(strip.permute(1, 2, 0).float().cpu().numpy(), scale)
    return pngs


def scan_section(result: dict) -> dict:
    """The JSON-safe scan section: ``result`` without the Trigger objects and PNG bytes."""
    return {k: v for k, v in result.items() if k not in ("reconstructed", "images")}


def anomalous_triggers(result: dict) -> list:
    """The reconstructed triggers of anomalous classes (the kinds that flagged them)."""
    return [t for t in result.get("reconstructed", []) if t.params.get("anomalous")]


def write_scan_images(result: dict, out_dir, force: bool = False) -> list:
    """Write the scan's PNGs into a new directory atomically; returns the written paths (final locations)."""
    from pathlib import Path

    from ..atomic import atomic_dir

    out_dir = Path(out_dir)
    names = sorted(result.get("images", {}))
    with atomic_dir(out_dir, force=force) as tmp:
        for name in names:
            (tmp / name).write_bytes(result["images"][name])
    return [out_dir / name for name in names]
