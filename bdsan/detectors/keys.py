"""More triggers toward a class the scan or the suite found, for the defenses to stamp.

A network backdoored with a random-colour patch answers fragments of its colours at many positions, and the
scan's smallest reconstruction covers one of them: :func:`further_patch_keys` finds more such keys on pixels the
earlier ones leave free, :func:`roaming_patch` optimises a small patch that works at any position.
:func:`mix_picture` optimises a picture blended at a fixed weight toward a class against a network as it is now
(unlearn re-optimises one each epoch for a class the mix kind flagged).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..device import precision_autocast, resolve_device, wants_bf16
from ..io.data import Holdout, to_float
from ..io.models import LoadedModel
from .scan import ReconstructedTrigger, ScanSettings, TriggerBank, adapt_cost, frozen_classifier
from .triggers import Trigger

KEY_MASK_CUTOFF = 0.1  # further_patch_keys: a pixel an earlier key's mask covers this much is barred to the next


def further_patch_keys(model: LoadedModel, holdout: Holdout, trigger, count: int, *, steps: int = 300,
                       images_per_step: int = 64, device=None, seed: int = 0, precision: str = "auto") -> list:
    """Up to ``count`` more patch triggers toward the class of the reconstructed patch ``trigger``, each barred
    from the pixels the earlier ones cover (mask ≥ ``KEY_MASK_CUTOFF``), optimised one at a time on ``holdout``'s
    images of other classes with the scan's size penalty and schedule. A convolutional network backdoored with a
    4×4 random-colour patch answered 3-pixel fragments of its colours at many positions (five further keys of 3–4
    px, each sending 81–89% of development images to the target, on an 86% CIFAR-10 model: BENCHMARKS.md "Keys of a
    patch the suite does not know"); one reconstruction covers one of them. Stops at the first key that never
    reaches the success rate."""
    cfg = ScanSettings(steps=steps)
    device, bf16, target, others = _toward_class(holdout, trigger, device, precision)
    if not len(others):
        return []
    allowed = (trigger.fn.parts["mask"].to(device) < KEY_MASK_CUTOFF).float()
    keys = []
    with frozen_classifier(model, device) as net:
        for index in range(count):
            found = _optimise_key(net, others, target, allowed, cfg, images_per_step, seed + 1 + index, bf16)
            if found is None:
                break
            allowed = allowed * (found["mask"] < KEY_MASK_CUTOFF).float()
            keys.append(Trigger(f"{trigger.name}_key{index + 1}", dict(trigger.params) | {"key": index + 1},
                                ReconstructedTrigger("patch", found)))
    return keys


def roaming_patch(model: LoadedModel, holdout: Holdout, trigger, side: int, *, steps: int = 300,
                  images_per_step: int = 64, device=None, seed: int = 0, precision: str = "auto"):
    """A ``side``×``side`` patch toward the class of the reconstructed patch ``trigger`` whose colours are optimised
    at a random position per image (``holdout``'s images of other classes, Adam on logits, cross-entropy to the
    class), returned as a Trigger that pastes it at a random position per image. A global-pooling network backdoored
    with a random-colour patch answers a patch like this anywhere (two 86% CIFAR-10 models: 95.7% and 99.8% of the
    images to the target, averaged over every position; a clean twin 3.5%: BENCHMARKS.md "Fresh full-image models
    (seed 5)…"), where the scan's smallest reconstruction covers a 3-pixel fragment at one place. ``flip`` in its
    params: the share of the last 8 steps' images it sent to the class."""
    device, bf16, target, others = _toward_class(holdout, trigger, device, precision)
    height, width = others.x.shape[-2:]
    if not len(others) or side > min(height, width):
        return None
    generator = torch.Generator().manual_seed(seed)
    logits = (0.5 * torch.randn(others.x.shape[1], side, side, generator=generator)).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    batch = min(images_per_step, len(others))
    labels = torch.full((batch,), target, device=device)
    hits = torch.zeros((), device=device)  # images sent to the class in the last 8 steps (no sync per step)
    with frozen_classifier(model, device) as net:
        for step in range(steps):
            x = to_float(others.x[torch.randint(len(others), (batch,), generator=generator).to(device)])
            with precision_autocast(device, bf16):
                out = net(paste_at_random(x, torch.sigmoid(logits), generator)).float()
            loss = F.cross_entropy(out, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= steps - 8:
                hits += (out.argmax(1) == labels).sum()
    patch = torch.sigmoid(logits).detach().cpu()
    params = dict(trigger.params) | {"roam": side, "flip": round(float(hits) / (min(steps, 8) * batch), 4)}
    return Trigger(f"{trigger.name}_roam", params, _RoamingPatch(patch, seed))


def mix_picture(net: torch.nn.Module, others: Holdout, target: int, alpha: float, *, steps: int = 100,
                images_per_step: int = 64, seed: int = 0, bf16: bool = False, name: str = "mix_picture",
                params: dict | None = None):
    """A picture p that, blended as (1−``alpha``)·x + ``alpha``·p on ``others`` (images of classes other than
    ``target``, on ``net``'s device, [0,1] or uint8), sends them to ``target``: Adam on its logits (lr 0.1, a fresh
    seeded start), cross-entropy to the class, for ``steps`` steps. ``net`` is used as it is (eval mode is the
    caller's); only the picture gets gradients. Returns the mix-kind Trigger; ``flip`` in its params: the share of
    the last 8 steps' images it sent to the class."""
    device = others.x.device
    generator = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(1, *others.x.shape[1:], generator=generator)).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.1, betas=(0.5, 0.9))
    batch = min(images_per_step, len(others))
    labels = torch.full((batch,), target, device=device)
    hits = torch.zeros((), device=device)
    for step in range(steps):
        x = to_float(others.x[torch.randint(len(others), (batch,), generator=generator).to(device)])
        with precision_autocast(device, bf16):
            out = net((1 - alpha) * x + alpha * torch.sigmoid(logits)).float()
        (grad,) = torch.autograd.grad(F.cross_entropy(out, labels), [logits])
        logits.grad = grad
        optimizer.step()
        if step >= steps - 8:
            hits += (out.argmax(1) == labels).sum().detach()
    parts = {"mask": torch.full((1, 1, 1, 1), float(alpha)), "pattern": torch.sigmoid(logits).detach().cpu()}
    flip = round(float(hits) / (min(steps, 8) * batch), 4)
    return Trigger(name, dict(params or {}) | {"kind": "mix", "target": target, "flip": flip},
                   ReconstructedTrigger("mix", parts))


def _toward_class(holdout: Holdout, trigger, device, precision: str) -> tuple[torch.device, bool, int, Holdout]:
    """(device, bf16, the class of the found ``trigger``, ``holdout``'s images of other classes on the device)."""
    device = resolve_device(device)
    target = int(trigger.params["target"])
    others = holdout.to(device)
    return device, wants_bf16(device, precision), target, others.subset(torch.nonzero(others.y != target).flatten())


def paste_at_random(x: torch.Tensor, patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` (N×C×H×W) with ``patch`` (C×s×s) pasted at a random position per image (differentiable in ``patch``)."""
    n, _, height, width = x.shape
    side = patch.shape[-1]
    top = torch.randint(0, height - side + 1, (n,), generator=generator).to(x.device)
    left = torch.randint(0, width - side + 1, (n,), generator=generator).to(x.device)
    offsets = torch.arange(side, device=x.device)
    rows = (top[:, None] + offsets)[:, :, None].expand(n, side, side)
    cols = (left[:, None] + offsets)[:, None, :].expand(n, side, side)
    images = torch.arange(n, device=x.device)[:, None, None].expand(n, side, side)
    values = patch.to(x.device, x.dtype).permute(1, 2, 0)[None].expand(n, side, side, -1)
    return x.permute(0, 2, 3, 1).index_put((images, rows, cols), values).permute(0, 3, 1, 2)


class _RoamingPatch:
    """Callable ``fn(x)`` for a Trigger: pastes a fixed patch at a random position per image (seeded)."""

    def __init__(self, patch: torch.Tensor, seed: int):
        self.patch, self.generator = patch, torch.Generator().manual_seed(seed + 1)

    def __call__(self, x: torch.Tensor, **_params) -> torch.Tensor:
        return paste_at_random(x, self.patch, self.generator).contiguous()


def _optimise_key(net, others: Holdout, target: int, allowed: torch.Tensor, cfg: ScanSettings, images_per_step: int,
                  seed: int, bf16: bool) -> dict[str, torch.Tensor] | None:
    """One patch trigger toward ``target`` whose mask is zero outside ``allowed`` (1×1×H×W): the smallest that
    flipped ``cfg.success`` of a batch (as measured), or None when none did."""
    device = allowed.device
    generator = torch.Generator().manual_seed(seed)
    bank = TriggerBank(("patch",), 1, tuple(others.x.shape[1:]), cfg.blend_epsilon, cfg.mask_init, generator, device)
    optimizer = torch.optim.Adam(bank.tensors(), lr=cfg.lr, betas=(0.5, 0.9))
    cost = torch.full((1,), cfg.init_cost, device=device)
    up = torch.zeros(1, dtype=torch.long, device=device)
    down = torch.zeros(1, dtype=torch.long, device=device)
    best, best_norm, last_improved = None, math.inf, 0
    labels = torch.full((min(images_per_step, len(others)),), target, device=device)
    for step in range(1, cfg.steps + 1):
        x = to_float(others.x[torch.randint(len(others), (len(labels),), generator=generator).to(device)])
        parts = bank.parts("patch")
        mask, pattern = parts["mask"] * allowed, parts["pattern"]
        with precision_autocast(device, bf16):
            logits = net((1 - mask) * x + mask * pattern).float()
        norm = mask.mean()
        optimizer.zero_grad(set_to_none=True)
        (F.cross_entropy(logits, labels) + cost[0] * norm).backward()
        with torch.no_grad():
            reached = (logits.argmax(1) == labels).float().mean() >= cfg.success
            if bool(reached) and float(norm) < best_norm * 0.99:
                best, best_norm, last_improved = {"mask": mask.detach().clone(), "pattern": pattern.detach().clone()}, \
                    float(norm), step
        optimizer.step()
        cost, up, down = adapt_cost(cost, up, down, reached.view(1), cfg.patience)
        if best is not None and step - last_improved >= cfg.early_stop_patience:
            break
    return best
