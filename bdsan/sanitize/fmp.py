"""FMP — Adversarial Feature Map Pruning (ALGORITHMS §1; ``retsuh-bqw/FMP, defense/fgsm-feature.py``).

Rank every conv output channel by how much clean accuracy collapses when an FGSM step maximally disturbs that
channel's activation map; zero the worst ``prune_ratio`` per layer; fine-tune on the fit split.
The per-channel FGSM runs for many channels in one backward pass: the ranking batch is replicated once per
channel, each replica's loss only reads its own channel, and in eval mode the replicas do not interact, so the
gradient of the summed loss w.r.t. replica j is exactly channel j's gradient.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..device import autocast, check_precision, precision_autocast, wants_bf16
from ..io.data import Holdout, to_float
from ..train.augment import augment_images
from .batchnorm import check_bn_mode, checkpoint_bn, set_training
from .context import Context, DefenseResult
from .found_triggers import gather_triggers, scan_mode, stamp_leading, stamped_like_training
from .guard import FitValGuard
from .losses import distillation, frozen_copy
from .registry import register_method

log = logging.getLogger("bdsan.sanitize")

RECIPES = ("bdsan", "paper")


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the layer of interest has produced its output."""


def activation(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of ``layer`` for input ``x``; the forward stops right after ``layer`` (no wasted compute)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        captured["out"] = output
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "out" not in captured:
        raise RuntimeError("layer was not reached in the forward pass")
    return captured["out"]


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> tuple[list[str], dict[str, str | None]]:
    """Conv layers in execution order, and for each the BatchNorm that normalises exactly its output.

    Found by tensor identity during one traced forward (not by module order): a BN is paired with a conv only
    when the BN's input *is* that conv's output. Pre-activation blocks add conv2 to the shortcut before the next
    BN, so their conv2 has no partner (None): its slice is zeroed and no BN is touched.
    """
    names = {module: name for name, module in model.named_modules()}
    order: list[str] = []
    produced: dict[int, str] = {}
    keep_alive: list[torch.Tensor] = []  # ids stay unique while the tensors live
    pairs: dict[str, str | None] = {}

    def conv_hook(module, inputs, output):
        name = names[module]
        if name not in pairs:
            order.append(name)
            pairs[name] = None
        produced[id(output)] = name
        keep_alive.append(output)

    def bn_hook(module, inputs):
        source = produced.get(id(inputs[0]))
        if source is not None and pairs.get(source) is None:
            pairs[source] = names[module]

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(bn_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return order, pairs


def _noisy_start(x: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """``clip(x + α·sign(u), 0, 1)``, ``u ~ U(−α, α)``: every pixel moves by ±α (ALGORITHMS §1 step 3)."""
    u = torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1
    return (x + alpha * torch.sign(u)).clamp_(0, 1)


RANKINGS = ("fgsm", "triggers")


def _score(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, replicas: int, bf16: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per replica: accuracy and mean logit margin (true logit − best other) on its adversarial batch."""
    with torch.no_grad(), precision_autocast(x_adv.device, bf16):
        logits = model(x_adv).float()
    logits = logits.view(replicas, len(y), -1)
    labels = y.view(1, -1).expand(replicas, -1)
    accuracy = (logits.argmax(-1) == labels).float().mean(1)
    true_logit = logits.gather(2, labels.unsqueeze(-1)).squeeze(-1)
    other = logits.scatter(2, labels.unsqueeze(-1), float("-inf")).amax(-1)
    return accuracy, (true_logit - other).mean(1)


def rank_channels(model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor, y: torch.Tensor, *,
                  alpha: float, epsilon: float, generator: torch.Generator, chunk_images: int = 2048,
                  progress=None, bf16: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Batched per-channel FGSM scores: {layer: {"accuracy": C, "margin": C}} (lower = more harmful).

    ``bf16``: run the passes under bf16 autocast (float64 inputs are never cast; the tests compare in float64)."""
    model.eval()
    x0 = _noisy_start(x, alpha, generator)
    n = len(x)
    per_chunk = max(1, chunk_images // max(1, n))
    scores = {}
    total = len(layers)
    for index, (name, layer) in enumerate(layers):
        with torch.no_grad(), precision_autocast(x.device, bf16):
            clean = activation(model, layer, x).float()
        channels_total = clean.shape[1]
        accuracy = torch.empty(channels_total, device=x.device)
        margin = torch.empty(channels_total, device=x.device)
        for start in range(0, channels_total, per_chunk):
            channels = torch.arange(start, min(channels_total, start + per_chunk), device=x.device)
            replicas = len(channels)
            x_rep = x0.repeat(replicas, 1, 1, 1).requires_grad_(True)
            with precision_autocast(x.device, bf16):
                out = activation(model, layer, x_rep)
            out = out.float().view(replicas, n, *out.shape[1:])
            own = out[torch.arange(replicas, device=x.device), :, channels]  # replicas × n × h × w
            target = clean[:, channels].transpose(0, 1)
            loss = (own - target).pow(2).mean(dim=(1, 2, 3)).sum()
            (grad,) = torch.autograd.grad(loss, x_rep)
            x_adv = (x_rep.detach() + epsilon * grad.sign()).clamp_(0, 1)
            del out, own, grad, x_rep
            accuracy[channels], margin[channels] = _score(model, x_adv, y, replicas, bf16)
        scores[name] = {"accuracy": accuracy.cpu(), "margin": margin.cpu()}
        if progress:
            progress("fmp ranking", index + 1, total)
    return scores


@torch.no_grad()
def trigger_response(model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor, triggers: list, *,
                     bf16: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Per channel, how strongly the found triggers drive it: z = (mean activation on stamped images − mean on
    clean ones) / clean standard deviation (spatial means per image), the largest over triggers. Returned negated in
    :func:`rank_channels`' format ({layer: {"accuracy": −z, "margin": −z}}, lower = more harmful), so
    :func:`select_channels` prunes the channels the triggers excite most."""
    model.eval()
    captured: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_hook(
        lambda m, i, o, name=name: captured.__setitem__(name, o.float().mean(dim=(2, 3)))) for name, layer in layers]
    stamped_means: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    try:
        with precision_autocast(x.device, bf16):
            model(x)
            clean = dict(captured)
            for trigger in triggers:  # one batched forward per trigger (few), all ranking images at once
                model(trigger.apply(x))
                for name, means in stamped_means.items():
                    means.append(captured[name].mean(0))
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for name, _ in layers:
        reference = clean[name]
        shift = torch.stack(stamped_means[name]) - reference.mean(0)  # triggers × C
        z = (shift / (reference.std(0) + 1e-6)).amax(0)
        scores[name] = {"accuracy": (-z).cpu(), "margin": (-z).cpu()}
    return scores


def reference_ranking(model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor, y: torch.Tensor, *,
                      alpha: float, epsilon: float, generator: torch.Generator, bf16: bool = False
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """One channel at a time, full forward per channel, as the release does: the baseline for tests and speed."""
    model.eval()
    x0 = _noisy_start(x, alpha, generator)
    scores = {}
    for name, layer in layers:
        captured: dict[str, torch.Tensor] = {}
        handle = layer.register_forward_hook(lambda m, i, o, store=captured: store.__setitem__("out", o))
        try:
            with torch.no_grad(), precision_autocast(x.device, bf16):
                model(x)
                clean = captured["out"].float()
            accuracy, margin = [], []
            for channel in range(clean.shape[1]):
                x_start = x0.clone().requires_grad_(True)
                with precision_autocast(x.device, bf16):
                    model(x_start)
                loss = F.mse_loss(captured["out"][:, channel].float(), clean[:, channel])
                (grad,) = torch.autograd.grad(loss, x_start)
                x_adv = (x0 + epsilon * grad.sign()).clamp(0, 1)
                acc, mar = _score(model, x_adv, y, 1, bf16)
                accuracy.append(acc[0])
                margin.append(mar[0])
        finally:
            handle.remove()
        scores[name] = {"accuracy": torch.stack(accuracy).cpu(), "margin": torch.stack(margin).cpu()}
    return scores


def select_channels(scores: dict[str, dict[str, torch.Tensor]], prune_ratio: float, min_per_layer: int
                    ) -> dict[str, list[int]]:
    """Per layer: the ``max(min_per_layer, floor(C·ratio))`` lowest-scoring channels (ties: lower margin, index).

    At least one channel per layer always survives.
    """
    selection = {}
    for name, score in scores.items():
        channels = len(score["accuracy"])
        count = min(channels - 1, max(int(min_per_layer), math.floor(channels * prune_ratio + 1e-9)))
        if count <= 0:
            selection[name] = []
            continue
        accuracy, margin = score["accuracy"].tolist(), score["margin"].tolist()
        order = sorted(range(channels), key=lambda c: (accuracy[c], margin[c], c))
        selection[name] = sorted(order[:count])
    return selection


def class_balanced_batch(data: Holdout, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``min(count, N)`` images, classes as balanced as the data allows: a seeded round-robin over classes."""
    generator = torch.Generator().manual_seed(seed)
    labels = data.y.cpu()
    shuffled = torch.randperm(len(labels), generator=generator)
    rank_in_class = torch.empty(len(labels), dtype=torch.long)
    for cls in labels.unique():
        members = shuffled[labels[shuffled] == cls]
        rank_in_class[members] = torch.arange(len(members))
    order = sorted(range(len(labels)), key=lambda i: (int(rank_in_class[i]), int(labels[i])))
    chosen = torch.tensor(order[:count], dtype=torch.long).to(data.x.device)
    return to_float(data.x[chosen]), data.y[chosen]


class ChannelMask:
    """Zeroes pruned channels (conv weight slice, conv bias, paired BN γ and β) and can re-apply it after steps."""

    def __init__(self, model: nn.Module, selection: dict[str, list[int]], pairs: dict[str, str | None],
                 zero_biases: bool):
        modules = dict(model.named_modules())
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, channels in selection.items():
            if not channels:
                continue
            conv = modules[name]
            index = torch.tensor(channels, device=conv.weight.device)
            self.entries.append((conv.weight, index))
            if conv.bias is not None and zero_biases:
                self.entries.append((conv.bias, index))
            bn_name = pairs.get(name)
            if bn_name is not None:
                bn = modules[bn_name]
                if bn.weight is not None:
                    self.entries.append((bn.weight, index))
                if bn.bias is not None and zero_biases:
                    self.entries.append((bn.bias, index))

    @torch.no_grad()
    def apply(self) -> None:
        for parameter, index in self.entries:
            parameter.index_fill_(0, index, 0.0)


def finetune_steps(n_train: int, batch_size: int, epochs: int, reference_images: int, max_passes: int
                   ) -> tuple[int, int, str]:
    """(steps, batch, note): the published epochs as optimiser steps for a small fit split (ALGORITHMS §0.6)."""
    batch = max(1, min(batch_size, n_train))
    per_epoch = math.ceil(n_train / batch)
    own = epochs * per_epoch
    published = epochs * math.ceil(reference_images / batch_size)
    cap = max(own, max_passes * per_epoch)
    steps = min(max(own, published), cap)
    note = (f"{epochs} epochs at the published scale ({reference_images} images, batch {batch_size}) = {published} "
            f"steps; fit-train has {n_train} images ({per_epoch} steps/epoch at batch {batch}); "
            f"capped at {max_passes} passes = {cap} steps → {steps} steps ({steps / per_epoch:.1f} passes)")
    return steps, batch, note


@register_method("fmp", "Adversarial Feature Map Pruning (ICLR'24): FGSM per feature map, prune, fine-tune")
@dataclass
class FMP:
    """Adversarial Feature Map Pruning (ICLR'24): FGSM per feature map, prune the weakest, fine-tune.

    ``recipe="bdsan"`` (default): 256-image class-balanced ranking, pruned channels kept dead (mask re-applied
    after every step, BN β and conv bias zeroed too), and — bdsan's addition, ALGORITHMS §7.9 — the triggers the
    pipeline's fit-split audit flagged (``ctx.known_triggers``) stamped on ``known_trigger_fraction`` of every
    fine-tuning batch with their true labels; unless the audit flagged one at backdoor strength (net ASR ≥ 0.9),
    ``scan=auto`` also reverse-engineers triggers on the fit images (``bdsan scan``) and uses those. ``recipe="paper"``:
    the release's 32-image ranking, a one-time zeroing of conv slice and BN γ only (fine-tuning may regrow them), no
    trigger knowledge, no scan. Fields set to None take the recipe's value. ``bn_stamped``: BN statistics re-estimated
    from batches stamped like the fine-tuning batches (measured: SIG 8.8% ASR at −2.1 points, rolled back by the verify
    guard → 3.7% at −0.5; blend 4.1% at −1.0; BENCHMARKS.md "BatchNorm statistics of stamped batches").
    ``rank="triggers"``: rank channels by how strongly the found triggers (audit, else scan) excite them
    (:func:`trigger_response`) instead of by FGSM; FGSM when no trigger was found. ``scan_wave``: the scan also
    searches the wave kind and a flagged class's plane wave is stamped (row-sine models: 98.1% → 5.1% and
    91.1% → 2.3% ASR; BENCHMARKS.md "Unlearn with the scan's wave kind"). ``scan_roam`` (4; paper 0): as in
    unlearn, a 4×4 patch optimised at random positions toward the class of a patch the scan found is ranked by and
    stamped too — on two fresh random-patch models 2.70 → 2.13% and 3.13 → 2.81% ASR for 0.08 / 0.05 more CA points
    (BENCHMARKS.md "Fresh random patches seeds 17 and 18"). ``scan_keys`` (0, opt-in): further reconstructions of
    such a patch. ``few_per_class`` (5; paper 0): below that many fit-train images per class at most
    ``few_trigger_fraction`` (0.1) of each batch is stamped (:meth:`stamp_fraction`).
    """

    recipe: str = "bdsan"
    rank_images: int | None = None
    alpha: float = 0.02
    epsilon: float = 0.06
    prune_ratio: float = 1 / 64
    min_per_layer: int = 0
    hard_prune: bool | None = None
    epochs: int = 10
    lr: float = 0.01
    lr_min: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 256
    reference_images: int = 2500
    max_passes: int = 50
    augment: bool = True
    chunk_images: int = 0
    fit_val_fraction: float = 0.1
    known_trigger_fraction: float | None = None
    scan: bool | str | None = None
    scan_steps: int = 300
    scan_wave: bool = True
    # the noise kind too: default since its blind check (BENCHMARKS.md "FMP with the noise kind …")
    scan_noise_kind: bool = True
    scan_keys: int = 0
    scan_roam: int | None = None
    rank_precision: str = "auto"
    rank: str = "fgsm"
    distill_weight: float | None = None
    temperature: float = 2.0
    bn: str | None = None
    bn_stamped: bool | None = None
    few_per_class: float | None = None
    few_trigger_fraction: float = 0.1

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        paper = self.recipe == "paper"
        if self.rank_images is None:
            self.rank_images = 32 if paper else 256
        if self.hard_prune is None:
            self.hard_prune = not paper
        if self.known_trigger_fraction is None:
            self.known_trigger_fraction = 0.0 if paper else 0.5
        if self.distill_weight is None:
            self.distill_weight = 0.0 if paper else 1.0
        if self.bn is None:
            self.bn = "train" if paper else "reestimate-augmented"
        if self.bn_stamped is None:
            self.bn_stamped = not paper
        if self.scan_roam is None:
            self.scan_roam = 0 if paper else 4
        if self.few_per_class is None:
            self.few_per_class = 0.0 if paper else 5.0
        check_bn_mode(self.bn)
        if self.rank not in RANKINGS:
            raise ValueError(f"rank must be one of {', '.join(RANKINGS)}, got {self.rank!r}")
        check_precision(self.rank_precision, "rank_precision")
        self.scan = scan_mode("never" if paper else "auto") if self.scan is None else scan_mode(self.scan)
        if not 0.0 <= self.known_trigger_fraction <= 1.0:
            raise ValueError(f"known_trigger_fraction must be in [0, 1], got {self.known_trigger_fraction}")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        if self.rank_images < 1 or self.epochs < 0 or self.batch_size < 1:
            raise ValueError("rank_images and batch_size must be ≥ 1, epochs ≥ 0")
        if min(self.scan_keys, self.scan_roam) < 0:
            raise ValueError("scan_keys and scan_roam must be ≥ 0")
        if not 0.0 <= self.few_trigger_fraction <= 1.0 or self.few_per_class < 0:
            raise ValueError("need 0 ≤ few_trigger_fraction ≤ 1 and few_per_class ≥ 0")

    def stamp_fraction(self, train: Holdout) -> tuple[float, float, bool]:
        """(share of each batch stamped, fit-train images per class, whether the few-images rule applied).

        Below ``few_per_class`` fit-train images per class (GTSRB's 5% holdout: 2) at most ``few_trigger_fraction``
        of each batch is stamped: on 87 images half-stamped batches cost a crop-trained GTSRB SIG model 6 development
        points, a tenth 1.9 at the same 0% ASR (BENCHMARKS.md "FMP with few images per class")."""
        per_class = len(train) / max(1, train.num_classes)
        few = per_class < self.few_per_class
        fraction = min(self.known_trigger_fraction, self.few_trigger_fraction) if few else self.known_trigger_fraction
        return fraction, per_class, few

    def run(self, model: nn.Module, fit: Holdout, ctx: Context) -> DefenseResult:
        timings = {}
        started = time.perf_counter()
        device = ctx.device
        model = model.to(device)
        fit = fit.to(device)
        train, fit_val = ctx.fit_val_split(fit, self.fit_val_fraction)
        fraction, per_class, few = self.stamp_fraction(train)
        guard = FitValGuard(fit_val, ctx.max_acc_drop, ctx.batch_size)
        model.eval()
        guard.start(model)
        timings["setup"] = time.perf_counter() - started

        triggers, sources, scan_summary = [], [], None
        if self.known_trigger_fraction > 0 or self.rank == "triggers":  # before pruning: the scan sees the model
            scan_started = time.perf_counter()
            triggers, sources, scan_summary = gather_triggers(model, train, ctx, self.scan, self.scan_steps,
                                                              wave=self.scan_wave, keys=self.scan_keys,
                                                              roam=self.scan_roam, noise=self.scan_noise_kind)
            if scan_summary is not None:
                timings["scan"] = time.perf_counter() - scan_started

        teacher = frozen_copy(model) if self.distill_weight > 0 else None  # the delivered model, unpruned

        started = time.perf_counter()
        x_rank, y_rank = class_balanced_batch(train, self.rank_images, ctx.seed + 17)
        order, pairs = conv_bn_pairs(model, x_rank[:2])
        modules = dict(model.named_modules())
        layers = [(name, modules[name]) for name in order]
        skipped_bn = [name for name in order if pairs[name] is None]
        if skipped_bn:
            log.info("fmp: %d conv(s) have no BN reading their output directly (pre-activation/residual sum); "
                     "their slices are zeroed, no BN touched: %s", len(skipped_bn), ", ".join(skipped_bn))
        chunk_images = self.chunk_images or (4096 if device.type == "cuda" else 1024)
        timings["setup"] += time.perf_counter() - started

        started = time.perf_counter()
        bf16 = wants_bf16(device, self.rank_precision)
        ranked_by = "triggers" if self.rank == "triggers" and triggers else "fgsm"
        if self.rank == "triggers" and not triggers:
            log.warning("fmp: rank=triggers, but neither the audit nor the scan found a trigger; ranking by FGSM")
        if ranked_by == "triggers":
            scores = trigger_response(model, layers, x_rank, triggers, bf16=bf16)
        else:
            scores = rank_channels(model, layers, x_rank, y_rank, alpha=self.alpha, epsilon=self.epsilon,
                                   generator=ctx.generator(1), chunk_images=chunk_images, progress=ctx.progress,
                                   bf16=bf16)
        selection = select_channels(scores, self.prune_ratio, self.min_per_layer)
        timings["ranking"] = time.perf_counter() - started

        mask = ChannelMask(model, selection, pairs, zero_biases=bool(self.hard_prune))
        mask.apply()
        guard.check(model, "pruned")

        started = time.perf_counter()
        steps, batch, steps_note = finetune_steps(len(train), self.batch_size, self.epochs, self.reference_images,
                                                  self.max_passes)
        losses = self._finetune(model, train, steps, batch, mask if self.hard_prune else None, guard, ctx, triggers,
                                fraction, teacher)
        selected = guard.restore_best(model)
        model.eval()
        timings["finetune"] = time.perf_counter() - started

        pruned_now = _count_dead(model, selection)
        details = {
            "recipe": self.recipe, "ranked_by": ranked_by,
            "rank_images": len(y_rank), "rank_bf16": bf16,
            "rank_class_counts": torch.bincount(y_rank, minlength=fit.num_classes).tolist(),
            "fit_train": len(train), "fit_val": len(fit_val),
            "layers": [{"name": name, "channels": len(scores[name]["accuracy"]), "bn": pairs[name],
                        "n_pruned": len(selection[name]), "pruned": selection[name],
                        "scores": [round(float(scores[name]["accuracy"][c]), 4) for c in selection[name]]}
                       for name in order],
            "n_pruned": sum(len(v) for v in selection.values()),
            "n_channels": sum(len(s["accuracy"]) for s in scores.values()),
            "bn_skipped": skipped_bn,
            "rank_accuracy_min_median": [float(torch.cat([s["accuracy"] for s in scores.values()]).min()),
                                         float(torch.cat([s["accuracy"] for s in scores.values()]).median())],
            "hard_prune": bool(self.hard_prune),
            "pruned_channels_still_zero": pruned_now,
            "finetune": {"steps": steps, "batch": batch, "note": steps_note, "loss_per_checkpoint": losses,
                         "known_triggers": [t.name for t in triggers], "trigger_sources": sources,
                         "scan": scan_summary,
                         "known_trigger_fraction": fraction if triggers else 0.0,
                         "fit_train_per_class": round(per_class, 2), "few_images_per_class": few,
                         "distill_weight": self.distill_weight, "bn": self.bn},
            "guard": guard.details() | {"selected": selected},
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
        if self.hard_prune:
            details["hard_pruned"] = {name: chans for name, chans in selection.items() if chans}
        return DefenseResult(model, details, guard=guard.summary())

    def _finetune(self, model: nn.Module, train: Holdout, steps: int, batch: int, mask: ChannelMask | None,
                  guard: FitValGuard, ctx: Context, triggers: list, fraction: float,
                  teacher: nn.Module | None = None) -> list[float]:
        """SGD + cosine to ``lr_min``, CE, crop+flip; guard check (after BN re-estimation) at every epoch mark.

        With ``triggers``, ``fraction`` (:meth:`stamp_fraction`) of each batch (after augmentation) carries one of them,
        labels unchanged, so the network unlearns the trigger → target shortcut. With ``distill_weight`` > 0 the
        unstamped images also match the delivered model's softened outputs (``teacher``, taken before pruning), which
        keeps clean accuracy on a few hundred images where plain cross-entropy overfits.
        """
        if steps == 0 or len(train) == 0:
            return []
        generator = ctx.generator(2)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=self.lr_min)
        checkpoints = {max(1, round(steps * (i + 1) / max(1, self.epochs))) for i in range(max(1, self.epochs))}
        device = train.device
        order = torch.empty(0, dtype=torch.long)
        cursor = 0
        losses, running = [], []
        bn_transform = (stamped_like_training(triggers, fraction, generator)
                        if self.bn_stamped and triggers else None)
        set_training(model, self.bn)
        for step in range(1, steps + 1):
            if cursor + batch > len(order):
                order, cursor = torch.randperm(len(train), generator=generator), 0
            index = order[cursor:cursor + batch].to(device)
            cursor += batch
            x = to_float(train.x[index])
            x = augment_images(x, generator, ctx.augmentation(self.augment))
            x, n_stamped = stamp_leading(x, triggers, fraction, generator)
            clean_rows = torch.arange(len(x), device=device) >= n_stamped
            with autocast(device):
                logits = model(x)
                loss = F.cross_entropy(logits, train.y[index])
                if teacher is not None and clean_rows.any():
                    with torch.no_grad():
                        teacher_logits = teacher(x[clean_rows])
                    loss = loss + self.distill_weight * distillation(logits[clean_rows], teacher_logits,
                                                                     self.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if mask is not None:
                mask.apply()
            running.append(float(loss.detach()))
            ctx.report("fmp fine-tune", step, steps)
            if step in checkpoints:
                checkpoint_bn(model, self.bn, train, ctx.batch_size, ctx.augmentation(self.augment), generator,
                              transform=bn_transform)
                model.eval()
                guard.check(model, f"step {step}")
                set_training(model, self.bn)
                losses.append(round(sum(running) / len(running), 4))
                running = []
        model.eval()
        return losses


def _count_dead(model: nn.Module, selection: dict[str, list[int]]) -> int:
    """How many selected channels still have an all-zero conv slice (all of them under ``hard_prune``)."""
    modules = dict(model.named_modules())
    dead = 0
    for name, channels in selection.items():
        if channels:
            weight = modules[name].weight.detach()
            dead += int((weight[channels].flatten(1).abs().sum(1) == 0).sum())
    return dead
