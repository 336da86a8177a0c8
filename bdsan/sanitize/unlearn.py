"""Unlearn — trigger-informed purification (ALGORITHMS.md §7.9 [ours]).

Removes a backdoor with the triggers bdsan *found*, never the real one: the suite triggers the fit-split audit
flagged (``ctx.known_triggers``) and, with ``scan=auto`` unless one of those fired at backdoor strength (net ASR ≥
0.9), ``bdsan scan`` run on the fit split (its anomalous classes' patch and blend, and with ``scan_wave`` the class's
plane wave, stamped at a random phase with ``wave_phase=random``). For each patch the scan found, ``scan_roam`` adds
a 4×4 patch optimised at random positions toward its class (kept when it flips at least half of its images) and
``scan_keys`` (opt-in) further reconstructions on pixels the first does not cover; ``roam_audit`` (experimental)
adds a roaming patch toward each class a suite patch was flagged for when the scan does not run. With
``scan_mix_kind`` (opt-in) the scan's mix kind is searched too, and with ``mix_refresh`` every epoch of the
fine-tuning first optimises a fresh picture toward each mix-flagged class (or, nothing flagged, the suspect class)
against the model as it is then, blended at ``mix_refresh_scale`` (2) × the scan's median class's α, and stamps it
from then on (for image blends).

1. **Prune** (``prune_schedule=fewest``): among the ``prune_ratio`` (1/64) of each conv layer's channels the found
   triggers excite most (FMP's ``rank=triggers`` on ``prune_images`` fit images), zero the fewest — most excited
   first, by doubling then bisection — that take the triggers' target rate on the fit images to within ``fewest_z``
   standard errors of the input model's own untriggered rate into those targets (``fewest_reference``). Within two
   standard errors of that floor the pruned model is returned (``stop_at_floor=auto``: only with re-estimated
   BatchNorm statistics), else fine-tuning starts from it.
2. **Fine-tune** ``epochs`` with the found triggers stamped on ``stamp_fraction`` of each batch with their *true*
   labels (``stamped_loss``; full-image triggers scaled by ``strength_min``–``strength_max``), the clean part kept by
   ``regularizer`` (``distill``: KL to the input model's softened outputs, ``distill_mode``; or L2-SP) on top of
   its cross-entropy (``clean_ce=false``: distilled only); ``mix_distill`` also distils mixes of pairs of clean
   images (``mix_kind``: convex blends or pasted boxes) toward the input model's answers, leaving out those it
   answers with a suspected target (``mix_target``); ``mix_stamp`` of those mixes carry a found trigger and are
   held to the input model's answer on the same mix without it.
   BatchNorm (``bn=auto``): the delivered statistics are kept, with a calibrated lr (``frozen_statistics_lr``), when
   every found trigger toward the primary target is a suite patch the fit audit flagged; otherwise they are
   re-estimated at every checkpoint from augmented fit images stamped like the training batches (``bn_stamped``).
   With re-estimated statistics and fewer than ``few_per_class`` (5) fit-train images per class — GTSRB's 5% holdout
   has 2 — nothing is pruned, pasted-box mixes are distilled (``mix_distill=auto``) and ``few_stamp_fraction`` (0.2
   with the mixes, 0.1 without) of the clean rows is stamped.
3. **Guard**: among the pruned state and the epochs within ``--max-acc-drop`` on fit-val, keep the latest whose
   found-trigger target rate on stamped fit-val images (``objective``) ties with the lowest (``select``: within one
   standard error of the difference, each SE taken with one success and one failure added;
   ``earliest-within-diff-se`` keeps the earliest of them instead).

Every default was chosen by measurement on CIFAR-10 benchmark models (the ``few_per_class`` rule on GTSRB's);
README.md ("Sanitizing a model", "Scanning for unknown triggers") gives each option's effect and BENCHMARKS.md the
rows, including the alternatives kept selectable. ``precision=auto``: bf16 autocast on CUDA, fp32 on the CPU
(bf16 ran slower there).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..device import channels_last, check_precision, precision_autocast, training_bf16
from ..io.data import Holdout, to_float
from ..train.augment import augment_images, boxmix_pairs, mixup_pairs
from ..train.loop import predict
from .batchnorm import ShiftedStatistics, check_bn_mode, checkpoint_bn, set_training
from .context import Context, DefenseResult
from .fmp import ChannelMask, class_balanced_batch, conv_bn_pairs, select_channels, trigger_response
from .found_triggers import (
    ROAM_MIN_FLIP,
    found_by_scan,
    gather_triggers,
    is_full_image,
    is_reconstructed,
    neighbour_waves,
    scan_mode,
    stamp_leading,
    stamped_like_training,
)
from .guard import FitValGuard
from .losses import DISTILL_MODES, cap_targets, distillation, frozen_copy, suppress_targets, teacher_targets
from .registry import register_method

# select mode → (the guard's tie rule, which tied state it keeps); "lowest" has no SE, so only exact ties
SELECT_RULES = {"latest-within-se": ("lowest-se", "latest"), "latest-within-diff-se": ("difference", "latest"),
                "earliest-within-diff-se": ("difference", "earliest"), "lowest": ("lowest-se", "latest")}
SELECT_MODES = tuple(SELECT_RULES)
STAMPED_LOSSES = ("ce", "consistency")
STAMP_MODES = ("all", "patches")
MIX_TARGETS = ("drop", "cap", "suppress")
MIX_KINDS = ("blend", "box")
MIX_REFRESH_ALPHAS = ("median", "own")
OBJECTIVES = ("target-rate", "triggered-error")
WAVE_PHASES = ("random", "found")
PRUNE_SCHEDULES = ("at-once", "fewest")
FEWEST_REFERENCES = ("floor", "best")
DEFAULT_LR = 0.01
FEW_MIX_DISTILL = 1.0  # mix_distill=auto below few_per_class fit-train images per class
FEW_STAMP_FRACTION = 0.1  # few_stamp_fraction=auto without mixes (BENCHMARKS.md "Unlearn without pruning …")
FEW_STAMP_FRACTION_MIXED = 0.2  # … and with them: the stamped share of all rows kept ("… the unlearning's share kept")
FROZEN_STEP = 1e-4  # with frozen statistics: the median conv layer's first step, relative to its weights' norm


@register_method("unlearn", "Fine-tune with found triggers (suite + scan) stamped on clean images, true labels")
@dataclass
class Unlearn:
    """Fine-tune with found triggers (suite + scan) stamped on clean images, true labels."""

    epochs: int = 10
    lr: float | str = "auto"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    min_steps_per_epoch: int = 10
    stamp_fraction: float = 0.5
    jitter: int = 1
    strength_min: float = 1.0
    strength_max: float = 1.0
    regularizer: str = "distill"
    distill_weight: float = 1.0
    temperature: float = 2.0
    distill_mode: str = "all"
    mix_distill: float | str = "auto"
    mix_target: str = "drop"
    mix_kind: str = "box"
    mix_stamp: float = 0.0
    l2_weight: float = 0.01
    scan: bool | str = "auto"
    scan_steps: int = 300
    scan_all_classes: bool = False
    scan_wave: bool = True
    # the noise kind too: default since its blind check (BENCHMARKS.md "Colour noise"; FMP too, D-BR opt-in)
    scan_noise_kind: bool = True
    # the mix kind (a full-image blend toward an optimised picture, for image blends): opt-in, development only
    scan_mix_kind: bool = False
    # each epoch, a fresh picture toward each mix-flagged class against the model as it is then, blended at twice the
    # median class's α (chosen on two development image blends; opt-in after its blind check: BENCHMARKS.md "Fresh
    # pictures each epoch")
    mix_refresh: bool = False
    mix_refresh_steps: int = 100
    mix_refresh_alpha: str = "median"
    mix_refresh_scale: float = 2.0
    scan_keys: int = 0
    scan_roam: int = 4
    roam_audit: bool = False
    wave_phase: str = "random"
    wave_strength_min: float = 1.0
    wave_strength_max: float = 1.0
    wave_neighbours: int = 0
    augment: bool = True
    fit_val_fraction: float = 0.1
    bn: str = "auto"
    bn_stamped: bool = True
    select: str = "latest-within-diff-se"
    stamped_loss: str = "ce"
    clean_ce: bool = True
    prune_ratio: float = 1 / 64
    prune_images: int = 256
    prune_schedule: str = "fewest"
    fewest_z: float = 1.0
    fewest_reference: str = "floor"
    floor_se_images: int = 0
    stop_at_floor: bool | str = "auto"
    few_per_class: float = 5.0
    few_stamp_fraction: float | str = "auto"
    stamp: str = "all"
    objective: str = "target-rate"
    precision: str = "auto"

    def __post_init__(self):
        self.scan = scan_mode(self.scan)
        check_bn_mode(self.bn, shift=True, auto=True)
        if self.lr != "auto" and (isinstance(self.lr, str) or self.lr <= 0):
            raise ValueError(f"lr must be auto or a number > 0, got {self.lr!r}")
        if self.stop_at_floor not in (True, False, "auto"):
            raise ValueError(f"stop_at_floor must be true, false or auto, got {self.stop_at_floor!r}")
        if self.regularizer not in ("distill", "l2", "none"):
            raise ValueError("regularizer must be distill, l2 or none")
        check_precision(self.precision)
        if self.mix_distill != "auto" and (isinstance(self.mix_distill, str) or self.mix_distill < 0 or
                                           (self.mix_distill > 0 and self.regularizer != "distill")):
            raise ValueError("mix_distill must be auto or a number ≥ 0, and > 0 only with regularizer=distill")
        if self.mix_kind not in MIX_KINDS:
            raise ValueError(f"mix_kind must be one of {', '.join(MIX_KINDS)}")
        if self.mix_target not in MIX_TARGETS:
            raise ValueError(f"mix_target must be one of {', '.join(MIX_TARGETS)}")
        if not 0 <= self.mix_stamp < 1 or (self.mix_stamp > 0 and self.mix_distill == 0):
            raise ValueError("mix_stamp must be in [0, 1), and > 0 only with mix_distill")
        if self.distill_mode not in DISTILL_MODES:
            raise ValueError(f"distill_mode must be one of {', '.join(DISTILL_MODES)}")
        if not 0 < self.stamp_fraction < 1 or self.epochs < 0 or self.batch_size < 2:
            raise ValueError("need 0 < stamp_fraction < 1, epochs ≥ 0, batch_size ≥ 2")
        if self.select not in SELECT_MODES:
            raise ValueError(f"select must be one of {', '.join(SELECT_MODES)}")
        if not self.clean_ce and self.regularizer != "distill":
            raise ValueError("clean_ce=false needs regularizer=distill: the clean images would be left unconstrained")
        if self.stamped_loss not in STAMPED_LOSSES:
            raise ValueError(f"stamped_loss must be one of {', '.join(STAMPED_LOSSES)}")
        if not 0 < self.strength_min <= self.strength_max:
            raise ValueError("need 0 < strength_min ≤ strength_max")
        if not 0 < self.wave_strength_min <= self.wave_strength_max:
            raise ValueError("need 0 < wave_strength_min ≤ wave_strength_max")
        if self.mix_refresh_alpha not in MIX_REFRESH_ALPHAS:
            raise ValueError(f"mix_refresh_alpha must be one of {', '.join(MIX_REFRESH_ALPHAS)}")
        if self.mix_refresh_steps < 1 or self.mix_refresh_scale <= 0:
            raise ValueError("need mix_refresh_steps ≥ 1 and mix_refresh_scale > 0")
        if min(self.wave_neighbours, self.scan_keys, self.scan_roam, self.floor_se_images) < 0:
            raise ValueError("wave_neighbours, scan_keys, scan_roam and floor_se_images must be ≥ 0")
        if self.few_stamp_fraction != "auto" and (isinstance(self.few_stamp_fraction, str) or
                                                  not 0 < self.few_stamp_fraction < 1):
            raise ValueError("few_stamp_fraction must be auto or in (0, 1)")
        if self.few_per_class < 0:
            raise ValueError("need few_per_class ≥ 0")
        if not 0.0 <= self.prune_ratio < 1.0 or self.prune_images < 1:
            raise ValueError("need 0 ≤ prune_ratio < 1 and prune_images ≥ 1")
        if self.prune_schedule not in PRUNE_SCHEDULES:
            raise ValueError(f"prune_schedule must be one of {', '.join(PRUNE_SCHEDULES)}")
        if self.fewest_reference not in FEWEST_REFERENCES:
            raise ValueError(f"fewest_reference must be one of {', '.join(FEWEST_REFERENCES)}")
        if self.stamp not in STAMP_MODES:
            raise ValueError(f"stamp must be one of {', '.join(STAMP_MODES)}")
        if self.wave_phase not in WAVE_PHASES:
            raise ValueError(f"wave_phase must be one of {', '.join(WAVE_PHASES)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")

    def _measure(self, model: nn.Module, fit_val: Holdout, triggers: list, targets: dict[str, int | None],
                 batch_size: int) -> tuple[float | None, float]:
        """(guard objective, its binomial standard error — 0 with ``select=lowest``) on the stamped fit-val images."""
        # the triggered error is the target rate with no target known: every wrong answer counts
        value, n = _target_rate(model, fit_val, triggers, targets if self.objective == "target-rate" else {},
                                batch_size)
        if self.select == "lowest" or n == 0 or value is None or math.isnan(value):
            return value, 0.0
        if SELECT_RULES[self.select][0] == "difference":  # one success and one failure added: no zero SE at 0 or 1
            value_adjusted = (value * n + 1) / (n + 2)
            return value, math.sqrt(value_adjusted * (1 - value_adjusted) / (n + 2))
        return value, math.sqrt(value * (1 - value) / n)

    @property
    def _strength(self) -> tuple[float, float]:
        return self.strength_min, self.strength_max

    @property
    def _wave_strength(self) -> tuple[float, float]:
        return self.wave_strength_min, self.wave_strength_max

    @property
    def _random_phase(self) -> bool:
        return self.wave_phase == "random"

    def run(self, model: nn.Module, fit: Holdout, ctx: Context) -> DefenseResult:
        started = time.perf_counter()
        model = model.to(ctx.device).eval()
        fit = fit.to(ctx.device)
        train, fit_val = ctx.fit_val_split(fit, self.fit_val_fraction)
        timings: dict[str, float] = {}
        scan_started = time.perf_counter()
        triggers, sources, scan_summary = gather_triggers(model, train, ctx, self.scan, self.scan_steps,
                                                          self.scan_all_classes, self.scan_wave, self.scan_keys,
                                                          self.scan_roam, self.roam_audit,
                                                          noise=self.scan_noise_kind, mix=self.scan_mix_kind)
        if scan_summary is not None:
            timings["scan"] = round(time.perf_counter() - scan_started, 3)
        tie, pick = SELECT_RULES[self.select]
        guard = FitValGuard(fit_val, ctx.max_acc_drop, ctx.batch_size, tie=tie, pick=pick)
        guard.start(model)
        details = {"fit_train": len(train), "fit_val": len(fit_val), "triggers": sources, "scan": scan_summary}
        if not triggers:
            details["note"] = "no trigger known or found: the model is returned unchanged"
            details["guard"] = guard.details()
            return DefenseResult(model, details)
        stamped = self._stamped(triggers, train)
        targets = _trigger_targets(ctx, triggers)
        judged = triggers if self.objective == "target-rate" else stamped
        stamped = stamped + neighbour_waves(stamped, self.wave_neighbours)  # stamped only: not pruned by, not judged

        def measure(state: nn.Module) -> tuple[float | None, float]:
            return self._measure(state, fit_val, judged, targets, ctx.batch_size)

        guard.history[0]["objective"] = measure(model)[0]
        suspected = _suspected_targets(ctx, sources)
        details["suspected_targets"] = suspected
        details["stamped_triggers"] = [t.name for t in stamped]
        teacher = frozen_copy(model) if self.regularizer == "distill" or self.stamped_loss == "consistency" else None
        floors = _target_rates(model, fit, triggers, targets, ctx.batch_size, stamped=False)
        settings = self._settings(model, fit, train, triggers, targets, floors, ctx.batch_size)
        details["statistics"] = settings
        mask, enough = None, False
        if settings["prune_ratio"] > 0:
            prune_started = time.perf_counter()
            floor = _mean_rate(floors)
            mask, details["pruned"], rates = self._prune(model, train, fit, triggers, targets, floor, ctx)
            after = _mean_rate(rates)
            objective, objective_se = measure(model)
            accepted = guard.check(model, "pruned", objective=objective, objective_se=objective_se)
            at_floor = _at_floor(after, floor, se_images=self.floor_se_images)
            enough = settings["stop_at_floor"] and accepted and at_floor
            details["pruned"] |= {"target_rate_fit": after[0], "untriggered_rate_fit": floor[0], "n_fit": after[1],
                                  "at_floor": at_floor,
                                  "by_trigger": [{"name": name, "target": targets.get(name), "target_rate_fit": rate,
                                                  "untriggered_rate_fit": untriggered}
                                                 for (name, rate, _), (_, untriggered, _) in zip(rates, floors)]}
            timings["prune"] = round(time.perf_counter() - prune_started, 3)
        epochs_log = []
        if enough:
            details["note"] = ("pruning alone took the found triggers' target rate on the fit images to the input "
                               "model's own untriggered rate: not fine-tuned")
        elif stamped:
            ft_started = time.perf_counter()
            if settings["lr"] is None:
                x, y = to_float(train.x[:self.batch_size]), train.y[:self.batch_size]
                settings["lr"], settings["relative_step_per_lr"] = frozen_statistics_lr(model, x, y)
            with channels_last(model):  # faster convolutions (oneDNN, CUDA); the layout is given back afterwards
                epochs_log = self._finetune(model, train, stamped, suspected, guard, measure, ctx, teacher, mask,
                                            settings["bn"], settings["lr"], settings["stamp_fraction"],
                                            settings["mix_distill"], median_alpha=_median_mix_alpha(scan_summary))
            timings["finetune"] = round(time.perf_counter() - ft_started, 3)
        else:
            details["note"] = ("only full-image triggers found: pruned, not fine-tuned (fine-tuning without them "
                               "re-estimates BatchNorm on clean images, which brought a pruned SIG backdoor back)"
                               if mask is not None else "only full-image triggers found and prune_ratio=0: nothing "
                               "to stamp or prune; the model is returned unchanged")
        selected = guard.restore_best(model)
        model.eval()
        details.update({"epochs": epochs_log, "guard": guard.details() | {"selected": selected},
                        "timings_s": timings | {"total": round(time.perf_counter() - started, 3)}})
        if mask is not None:
            details["hard_pruned"] = {name: chans for name, chans in details["pruned"]["layers"].items() if chans}
        return DefenseResult(model, details)

    def _settings(self, model: nn.Module, fit: Holdout, train: Holdout, triggers: list,
                  targets: dict[str, int | None], floors: list[tuple[str, float, int]], batch_size: int) -> dict:
        """The BatchNorm mode, learning rate and stop rule this model gets (``bn``/``lr``/``stop_at_floor`` auto).

        ``bn=auto``: the primary target is that of the found trigger whose target rate on the fit images exceeds
        its untriggered rate the most; when every found trigger toward it is a suite patch the fit audit flagged,
        the delivered statistics are kept (``frozen``), else — a full-image trigger, or one only the scan found —
        re-estimated (``reestimate-augmented``). ``lr=auto``: 0.01, or with frozen
        statistics None — ``frozen_statistics_lr`` calibrates it on the model about to be fine-tuned.
        ``stop_at_floor=auto``: stop at the floor only when the statistics are re-estimated (that re-estimation is
        what fine-tuning after pruning cost: BENCHMARKS.md "BatchNorm statistics after pruning"), and not with
        ``mix_refresh`` and a mix picture found. With re-estimated
        statistics and fewer than ``few_per_class`` fit-train images per class (GTSRB's 5% holdout: 2), nothing is
        pruned (BENCHMARKS.md "Unlearn without pruning and a tenth of each batch stamped"), ``mix_distill=auto``
        distils mixes and ``few_stamp_fraction=auto`` stamps a fifth of the clean rows with them, a tenth without
        ("Mixes with the unlearning's share kept")."""
        out: dict = {}
        bn = self.bn
        if bn == "auto":
            rates = _target_rates(model, fit, triggers, targets, batch_size)
            net = [rate - untriggered for (_, rate, _), (_, untriggered, _) in zip(rates, floors)]
            primary = targets.get(triggers[max(range(len(triggers)), key=lambda i: net[i])].name)
            example = to_float(train.x[:8] if len(train) else fit.x[:8])
            toward = [t for t in triggers if targets.get(t.name) == primary]
            full = [t.name for t in toward if is_full_image(t, example)]
            scanned = [t.name for t in toward if found_by_scan(t)]
            bn = "frozen" if not full and not scanned else "reestimate-augmented"
            out |= {"primary_target": primary, "toward_primary": [t.name for t in toward], "full_image": full,
                    "from_scan": scanned}
        lr = self.lr if self.lr != "auto" else (None if bn == "frozen" else DEFAULT_LR)  # None: calibrated later
        # with mix_refresh and a picture found, fine-tuning always runs: the floor is measured on the found picture,
        # which pruning silences while the real blend still fires (BENCHMARKS.md "Fresh pictures each epoch")
        refresh = self.mix_refresh and any(is_reconstructed(t, "mix") for t in triggers)
        stop = self.stop_at_floor if self.stop_at_floor != "auto" else bn != "frozen" and not refresh
        per_class = len(train) / max(1, fit.num_classes)
        few = bn != "frozen" and per_class < self.few_per_class
        mix = self.mix_distill if self.mix_distill != "auto" else (
            FEW_MIX_DISTILL if few and self.regularizer == "distill" else 0.0)
        few_stamp = self.few_stamp_fraction if self.few_stamp_fraction != "auto" else (
            FEW_STAMP_FRACTION_MIXED if mix > 0 else FEW_STAMP_FRACTION)
        return {"bn": bn, "lr": lr, "stop_at_floor": stop, "fit_train_per_class": round(per_class, 2),
                "few_images_per_class": few, "prune_ratio": 0.0 if few else self.prune_ratio,
                "stamp_fraction": few_stamp if few else self.stamp_fraction, "mix_distill": mix} | out

    def _mix_answers(self, teacher: nn.Module, mixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     clean_answers: torch.Tensor, labels: torch.Tensor, suspected: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the input model's logits on the mixes, the mixes to distil on). A mix of two images is a blend, and a
        blend backdoor answers part of it, so a suspected target's share is limited (``mix_target``): ``cap`` at
        what the model gives the two mixed images (``clean_answers``: its logits on the clean rows); ``suppress``
        to none unless one of them is of that class; ``drop`` the mixes it answers with a suspected target neither
        image is of, the others kept as they are."""
        mixes, first, second = mixed
        answers = teacher(mixes).float()
        rows = torch.ones(len(answers), dtype=torch.bool, device=answers.device)
        if self.mix_target == "suppress":
            return suppress_targets(answers, suspected, labels[first], labels[second]), rows
        if self.mix_target == "drop":
            top = answers.argmax(1)
            leaked = torch.isin(top, torch.tensor(suspected, device=top.device, dtype=top.dtype))
            return answers, ~(leaked & (top != labels[first]) & (top != labels[second]))
        return cap_targets(answers, suspected, self.temperature, clean_answers[first], clean_answers[second]), rows

    def _bn_stamp(self, triggers: list, fraction: float):
        """generator → the batch transform that stamps BN re-estimation batches as the training batches are."""
        return lambda generator: stamped_like_training(triggers, fraction, generator, self.jitter,
                                                       self._strength, wave_phase=self._random_phase,
                                                       wave_strength=self._wave_strength)

    def _stamped(self, triggers: list, train: Holdout) -> list:
        """The found triggers stamped while fine-tuning: all, or with ``stamp=patches`` the patch ones only."""
        if self.stamp == "all" or not len(train):
            return list(triggers)
        example = to_float(train.x[:8])
        return [t for t in triggers if not is_full_image(t, example)]

    def _prune(self, model: nn.Module, train: Holdout, fit: Holdout, triggers: list, targets: dict[str, int | None],
               floor: tuple[float | None, int], ctx: Context) -> tuple[ChannelMask, dict, list[tuple[str, float, int]]]:
        """Zero the ``prune_ratio`` of each conv layer's channels that the found triggers excite most (FMP's
        ``rank=triggers`` ranking on ``prune_images`` class-balanced fit images); the mask keeps them at zero.

        ``prune_schedule=fewest``: of those channels, only the fewest — most excited first, across layers — whose
        target rate on the fit images is within ``fewest_z`` standard errors of the reference (``fewest_reference``:
        the untriggered floor, or the lower of it and the rate with every candidate pruned), by doubling 1, 2, 4, …
        to bracket the count, then bisection (the rate is taken to fall as channels are added); all of them when no
        smaller count does. Returns (mask, summary, each found trigger's target rate on the fit images)."""
        x_rank, _ = class_balanced_batch(train, self.prune_images, ctx.seed + 17)
        order, pairs = conv_bn_pairs(model, x_rank[:2])
        modules = dict(model.named_modules())
        layers = [(name, modules[name]) for name in order]
        scores = trigger_response(model, layers, x_rank, triggers, bf16=training_bf16(ctx.device, self.precision))
        selection = select_channels(scores, self.prune_ratio, 0)
        ranked = sorted(((name, c) for name, chans in selection.items() for c in chans),
                        key=lambda nc: (float(scores[nc[0]]["accuracy"][nc[1]]), nc))
        fewest = self.prune_schedule == "fewest"
        original = {k: v.detach().clone() for k, v in model.state_dict().items()} if fewest else None
        steps: dict[int, tuple[float | None, int]] = {}
        last: list = []  # (size, mask, rate) of the state the model is in

        def prune(size: int) -> tuple[float | None, int]:
            if original is not None:  # the fewest search goes back to fewer channels: start from the input weights
                model.load_state_dict(original)
            mask, rates = self._prune_step(model, fit, triggers, targets, self._chosen(ranked, selection, size),
                                           pairs, ctx.batch_size)
            steps[size] = _mean_rate(rates)
            last[:] = [size, mask, rates]
            return steps[size]

        def rate(size: int) -> tuple[float | None, int]:
            return steps[size] if size in steps else prune(size)

        count = len(ranked)
        if fewest and count:
            reference = floor
            if self.fewest_reference == "best" and rate(count)[0] is not None and floor[0] is not None:
                reference = min(floor, steps[count], key=lambda r: r[0])  # what pruning every candidate reaches

            def down(size: int) -> bool:
                return _at_floor(rate(size), reference, self.fewest_z, self.floor_se_images)

            low, high = 0, count  # the rate is above the reference at `low`; `high` is the answer unless a smaller is
            for size in _doubling(count):
                if down(size):
                    high = size
                    break
                low = size
            while high - low > 1:
                middle = (low + high) // 2
                if down(middle):
                    high = middle
                else:
                    low = middle
            count = high
        if not last or last[0] != count:
            prune(count)
        _, mask, rates = last
        summary = {"ratio": self.prune_ratio, "schedule": self.prune_schedule, "rank_images": len(x_rank),
                   "n_pruned": count, "n_selected": len(ranked),
                   "n_channels": sum(len(s["accuracy"]) for s in scores.values()),
                   "layers": self._chosen(ranked, selection, count)}
        if fewest:
            summary["steps"] = [{"n": n, "target_rate_fit": rate} for n, (rate, _) in steps.items()]
        return mask, summary, rates

    @staticmethod
    def _chosen(ranked: list[tuple[str, int]], selection: dict[str, list[int]], size: int) -> dict[str, list[int]]:
        """The first ``size`` ranked channels, per layer (every selected layer present)."""
        return {name: sorted(c for n, c in ranked[:size] if n == name) for name in selection}

    @staticmethod
    def _prune_step(model: nn.Module, fit: Holdout, triggers: list, targets: dict[str, int | None],
                    chosen: dict[str, list[int]], pairs: dict[str, str | None], batch_size: int
                    ) -> tuple[ChannelMask, list[tuple[str, float, int]]]:
        """Zero ``chosen`` and measure each found trigger's target rate on ``fit``."""
        mask = ChannelMask(model, chosen, pairs, zero_biases=True)
        mask.apply()
        return mask, _target_rates(model, fit, triggers, targets, batch_size)

    def _finetune(self, model: nn.Module, train: Holdout, triggers: list, suspected: list[int], guard: FitValGuard,
                  measure, ctx: Context, teacher: nn.Module | None, mask: ChannelMask | None, bn: str,
                  lr: float, stamp_fraction: float, mix_share: float, median_alpha: float | None = None
                  ) -> list[dict]:
        device = ctx.device
        bf16 = training_bf16(device, self.precision)
        triggers = list(triggers)  # mix_refresh adds to it; the BN stamping below sees the same list
        pictures = [t for t in triggers if is_reconstructed(t, "mix")] if self.mix_refresh else []
        generator = ctx.generator(offset=31)
        mix_generator = ctx.generator(offset=37)  # its own stream: the other draws stay as without mixes
        mix = mixup_pairs if self.mix_kind == "blend" else boxmix_pairs
        augment = ctx.augmentation(self.augment)
        consistency = self.stamped_loss == "consistency"
        anchor = [p.detach().clone() for p in model.parameters()] if self.regularizer == "l2" else None
        batch = min(self.batch_size, max(2, len(train)))
        steps_per_epoch = max(self.min_steps_per_epoch, math.ceil(len(train) / batch))
        total = self.epochs * steps_per_epoch
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay if anchor is None else 0.0, nesterov=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
        log = []
        step = 0
        shift = None
        bn_stamp = self._bn_stamp(triggers, stamp_fraction) if self.bn_stamped else None
        if bn == "reestimate-shift":
            shift = ShiftedStatistics(train, ctx.batch_size, augment, ctx.seed * 1_000_003 + 41,
                                      transform_for=bn_stamp)
            shift.start(model)
        for epoch in range(1, self.epochs + 1):
            refreshed = self._refresh_pictures(model, train, pictures, triggers, epoch, ctx.seed, bf16, median_alpha)
            set_training(model, bn)
            sums = {"ce": 0.0, "reg": 0.0}
            for _ in range(steps_per_epoch):
                index = torch.randint(len(train), (batch,), generator=generator).to(device)
                x, y = to_float(train.x[index]), train.y[index]
                x = augment_images(x, generator, augment)
                inputs, n_stamped = stamp_leading(x, triggers, stamp_fraction, generator, self.jitter,
                                                  self._strength, wave_phase=self._random_phase,
                                                  wave_strength=self._wave_strength)
                mixed = _mixed(x[n_stamped:], mix_share, mix_generator, mix)
                if mixed is not None:  # the student sees mix_stamp of them stamped, the teacher none
                    shown = stamp_leading(mixed[0], triggers, self.mix_stamp, mix_generator, self.jitter,
                                          self._strength, wave_phase=self._random_phase,
                                          wave_strength=self._wave_strength)[0] if self.mix_stamp else mixed[0]
                    inputs = torch.cat([inputs, shown])
                with precision_autocast(device, bf16):
                    logits = model(inputs).float()
                if mixed is not None:
                    logits, mixed_logits = logits[:len(x)], logits[len(x):]
                teacher_logits = rows = None
                if teacher is not None:
                    with torch.no_grad(), precision_autocast(device, bf16):  # the clean images, stamped rows too
                        teacher_logits = teacher(x if consistency else x[n_stamped:]).float()
                    clean_answers = teacher_logits[n_stamped:] if consistency else teacher_logits
                    teacher_logits, rows = teacher_targets(
                        teacher_logits, y if consistency else y[n_stamped:], suspected, self.distill_mode)
                if consistency:  # stamped rows: the input model's answer on the same image without the trigger
                    kept = rows[:n_stamped]
                    consistent = (distillation(logits[:n_stamped][kept], teacher_logits[:n_stamped][kept],
                                               self.temperature) * int(kept.sum())) if kept.any() else 0.0
                    ce = (F.cross_entropy(logits[n_stamped:], y[n_stamped:], reduction="sum") + consistent) / len(x)
                    teacher_logits, rows = teacher_logits[n_stamped:], rows[n_stamped:]
                elif self.clean_ce:
                    ce = F.cross_entropy(logits, y)
                else:  # the clean rows only distilled: no hard labels for them
                    ce = F.cross_entropy(logits[:n_stamped], y[:n_stamped], reduction="sum") / len(x)
                reg = torch.zeros((), device=device)
                if self.regularizer == "distill" and rows.any():
                    reg = self.distill_weight * distillation(logits[n_stamped:][rows], teacher_logits[rows],
                                                             self.temperature)
                elif anchor is not None:
                    reg = self.l2_weight * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                if mixed is not None:  # the input model's answers between the fit images, kept too
                    with torch.no_grad(), precision_autocast(device, bf16):
                        answers, kept = self._mix_answers(teacher, mixed, clean_answers, y[n_stamped:], suspected)
                    if kept.any():
                        reg = reg + self.distill_weight * distillation(mixed_logits[kept], answers[kept],
                                                                       self.temperature)
                optimizer.zero_grad(set_to_none=True)
                (ce + reg).backward()
                optimizer.step()
                if mask is not None:
                    mask.apply()
                scheduler.step()
                step += 1
                sums["ce"] += float(ce.detach())
                sums["reg"] += float(reg.detach())
                ctx.report("unlearn", step, total)
            if shift is not None:
                shift.checkpoint(model)
            else:
                checkpoint_bn(model, bn, train, ctx.batch_size, augment, generator,
                              transform=bn_stamp(generator) if bn_stamp else None)
            model.eval()
            objective, objective_se = measure(model)
            guard.check(model, f"epoch {epoch}", objective=objective, objective_se=objective_se)
            log.append({"epoch": epoch, "ce": sums["ce"] / steps_per_epoch, "reg": sums["reg"] / steps_per_epoch,
                        f"{self.objective}_fit_val": objective} | ({"mix_refresh": refreshed} if pictures else {}))
        return log

    def _refresh_pictures(self, model: nn.Module, train: Holdout, pictures: list, triggers: list, epoch: int,
                          seed: int, bf16: bool, median_alpha: float | None) -> list[dict]:
        """``mix_refresh``: for each of the scan's mix triggers, a fresh picture toward its class optimised against
        ``model`` as it is now (``mix_picture``), blended at ``mix_refresh_scale`` × ``mix_refresh_alpha``:
        ``median`` — the scan's median class's α (``median_alpha``: the weight at which a picture reaches an
        ordinary class) — or ``own``, the trigger's; added to ``triggers`` when it sends at least ``ROAM_MIN_FLIP``
        of its images there. Returns what was tried."""
        from ..detectors.keys import mix_picture

        tried = []
        model.eval()
        for number, found in enumerate(pictures):
            target = int(found.params["target"])
            others = train.subset(torch.nonzero(train.y != target).flatten())
            own = float(found.fn.parts["mask"].flatten()[0])
            alpha = self.mix_refresh_scale * ((median_alpha or own) if self.mix_refresh_alpha == "median" else own)
            if not len(others) or alpha >= 1:
                continue
            picture = mix_picture(model, others, target, alpha, steps=self.mix_refresh_steps,
                                  seed=seed * 1_000_003 + 53 * epoch + number, bf16=bf16,
                                  name=f"{found.name}_refresh{epoch}", params=found.params | {"refresh": epoch})
            kept = picture.params["flip"] >= ROAM_MIN_FLIP
            if kept:
                triggers.append(picture)
            tried.append({"name": picture.name, "alpha": round(alpha, 4), "flip": picture.params["flip"],
                          "kept": kept})
        return tried


def frozen_statistics_lr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cap: float = DEFAULT_LR
                         ) -> tuple[float, float]:
    """(lr, median relative step per unit lr): the learning rate at which one cross-entropy step on ``x``, ``y``
    with BatchNorm in eval mode changes the median conv layer's weights by ``FROZEN_STEP`` of their norm, at most
    ``cap``. Without batch statistics the weights are no longer scale-free, and how far a step moves them depends
    on the model: at lr 0.01 the first step was 1e-3 of the norm on the 86% CPU benchmark models (which diverged
    there; at lr 0.001 they did not) and 6e-5 on the toy test model (where lr 0.001 left 41% ASR)."""
    set_training(model, "frozen")
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    ratios = [float(m.weight.grad.norm() / norm) for m in model.modules()
              if isinstance(m, nn.Conv2d) and m.weight.grad is not None and (norm := m.weight.detach().norm()) > 0]
    model.zero_grad(set_to_none=True)
    model.eval()
    per_lr = statistics.median(ratios) if ratios else 0.0
    return (min(cap, FROZEN_STEP / per_lr) if per_lr > 0 else cap), per_lr


def _mixed(clean: torch.Tensor, share: float, generator: torch.Generator, mix
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(``share`` × len(clean) mixes of pairs of the batch's clean images by ``mix`` — ``mixup_pairs`` or
    ``boxmix_pairs`` —, the rows each was made from): anchors between the few fit images, distilled toward the input
    model; None when off or too few rows."""
    count = round(share * len(clean))
    return mix(clean, count, generator) if count and len(clean) >= 2 else None


def _suspected_targets(ctx: Context, sources: list[dict]) -> list[int]:
    """Target classes the fit-split audit or the scan pointed at (for ``distill_mode=suppress-target``)."""
    targets = {e.get("suspected_target") for e in ctx.trigger_evidence} | {s.get("target") for s in sources}
    return sorted(int(t) for t in targets if t is not None)


def _doubling(count: int) -> list[int]:
    """1, 2, 4, … below ``count``, then ``count`` (empty for 0)."""
    sizes = [2 ** k for k in range(max(count, 1).bit_length()) if 2 ** k < count]
    return sizes + [count] if count else []


def _at_floor(rate: tuple[float | None, int], floor: tuple[float | None, int], z: float = 2.0,
              se_images: int = 0) -> bool:
    """Is the pruned model's target rate with the triggers within ``z`` standard errors of the input model's rate
    into the same targets without them (the rate no trigger removal goes below)? ``se_images``: the standard
    errors are computed on at least that many images, so a small fit split does not widen the slack."""
    (p, n), (f, m) = rate, floor
    if p is None or f is None or not n or not m or math.isnan(p) or math.isnan(f):
        return False
    n, m = max(n, se_images), max(m, se_images)
    return p <= f + z * math.sqrt(p * (1 - p) / n + f * (1 - f) / m)


def _median_mix_alpha(scan_summary: dict | None) -> float | None:
    """The fit-split scan's median class's mix α (None without the mix kind)."""
    alphas = ((scan_summary or {}).get("mix") or {}).get("alpha")
    return statistics.median(alphas) if alphas else None


def _trigger_targets(ctx: Context, triggers: list) -> dict[str, int | None]:
    """Each found trigger's suspected target: the fit audit's for suite triggers, the scan's class for its own."""
    audit = {e["name"]: e.get("suspected_target") for e in ctx.trigger_evidence}
    return {t.name: audit.get(t.name, (getattr(t, "params", None) or {}).get("target")) for t in triggers}


def _target_rate(model: nn.Module, fit_val: Holdout, triggers: list, targets: dict[str, int | None],
                 batch_size: int, stamped: bool = True) -> tuple[float | None, int]:
    """(mean over triggers of the share of stamped fit-val images of other classes predicted as the trigger's
    suspected target — the ASR the guard can see —, images judged). A trigger without a known target counts its
    triggered error instead (``objective=triggered-error`` passes no targets). None when there is no trigger (the
    guard then keeps the latest acceptable state). ``stamped=False``: the same images without the trigger (the
    model's own rate into those targets)."""
    if not triggers:
        return None, 0
    return _mean_rate(_target_rates(model, fit_val, triggers, targets, batch_size, stamped))


def _mean_rate(rates: list[tuple[str, float, int]]) -> tuple[float, int]:
    """(the mean of per-trigger rates, images judged in all)."""
    return sum(r for _, r, _ in rates) / len(rates), sum(n for _, _, n in rates)


@torch.no_grad()
def _target_rates(model: nn.Module, fit_val: Holdout, triggers: list, targets: dict[str, int | None],
                  batch_size: int, stamped: bool = True) -> list[tuple[str, float, int]]:
    """Per trigger: (its name, its target rate as in ``_target_rate``, images judged); NaN on no images."""
    if not len(fit_val):
        return [(trigger.name, float("nan"), 0) for trigger in triggers]
    rates = []
    for trigger in triggers:
        target = targets.get(trigger.name)
        rows = fit_val.y != target if target is not None else torch.ones_like(fit_val.y, dtype=torch.bool)
        predicted = predict(model, fit_val.x[rows], batch_size, transform=trigger.apply if stamped else None)
        wrong = predicted == target if target is not None else predicted != fit_val.y[rows]
        rates.append((trigger.name, float(wrong.float().mean()) if len(predicted) else 0.0, len(predicted)))
    return rates
