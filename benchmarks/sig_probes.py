"""Development probes: can any reference-free statistic single out SIG's target class? (BENCHMARKS.md, scan)

Each probe runs on harness models from the cache (same arguments as ``scan_detect.py``), on the model's 5% clean
holdout split in two halves (optimise on one, measure on the other), and prints one line per model with a value per
class. Meant for the development pair (SIG seed 1, clean twin seed 101), never for the evaluation seeds.

* ``margin``: MM-BD's statistic — per class, the largest logit margin (own logit − best other) any input in
  [0,1] reaches, by gradient ascent from ``--restarts`` random images per class.
* ``stripes``: a per-class stripes perturbation (a value per column plus one per row, shared by the channels:
  SIG's sine is one such) at a *fixed* L∞ budget, maximising the target's cross-entropy; held-out flip rate and
  median target margin.
* ``feature``: Neural Cleanse in feature space — per class a channel mask and a per-channel value (within the
  channel's clean range) at the output of ``--layer``; the smallest mask (in channels) that flips ≥ 90% of a batch.
* ``threshold``: how SIG's own sine acts as its amplitude grows (5–40/255), and per-class universal perturbations
  at L∞ 4, 8 and 16/255 (maximising the target's cross-entropy): held-out flip rates.
* ``collapse``: clean unlearning (RNP's first step, Li et al. ICML'23): gradient *ascent* on the clean half, BN
  frozen, until held-out clean accuracy falls under ``--collapse-acc``; the share of held-out images each class
  then receives. A backdoor is a shortcut that clean unlearning does not touch: does the model collapse onto it?
* ``spectral``: per class a universal perturbation at L∞ ``--eps``; its share of spectral power in its 4 strongest
  frequency bins, and its held-out flip rate when reduced to its 2/4/8 strongest bins (SIG's trigger is one sine).
* ``units``: the final layer. Per class the largest *selective* weight W_tj − max_{s≠t} W_sj of a penultimate unit,
  and whether that unit is quiet (activity at or under the median unit's) on the class's own clean images: a
  backdoor's units fire on the trigger, not on the target's images. Also the pooled units SIG's real sine excites.
* ``sines``: SIG's family instead of a free-form perturbation — per class the grey plane wave (rows, columns and,
  unless ``--axis-only``, diagonals; 1..``--frequencies`` periods; four phases) at each fixed ``--amplitudes`` that
  flips most of ``--select`` images of one half to the class, and its flip rate on the other half.
* ``controls``: the suite's full-image triggers beside controls of the same strength (other noise seeds, the
  transposed stripes and sine, another frequency): the class each sends most images to, and its rate.

    python benchmarks/sig_probes.py --data /work/shared/data/cifar10.npz --probe margin \\
        --models sig:0.1:1 badnets_grid:0.0:101
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from bdsan.allocator import keep_freed_memory
from bdsan.detectors.metrics import trigger_metrics
from bdsan.detectors.scan import _anomaly_index
from bdsan.detectors.triggers import get_trigger
from bdsan.io.data import to_float
from bdsan.train.zoo import RECIPES, Attack, load_dataset, train_backdoored


def margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Own logit minus the best other logit, per row."""
    own = logits.gather(1, target[:, None]).squeeze(1)
    return own - logits.scatter(1, target[:, None], -1e9).max(1).values


def probe_margin(net, k: int, shape, args, **_) -> dict:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(k * args.restarts, *shape, generator=generator).requires_grad_()
    target = torch.arange(k).repeat_interleave(args.restarts)
    optimizer = torch.optim.Adam([z], lr=0.05)
    best = torch.full((k * args.restarts,), -1e9)
    for _ in range(args.steps):
        value = margin(net(torch.sigmoid(z)), target)
        optimizer.zero_grad()
        (-value.sum()).backward()
        optimizer.step()
        best = torch.maximum(best, value.detach())
    margins = best.view(k, args.restarts).max(1).values.numpy()
    return {"max margin": margins, "high-side index": _anomaly_index(1.0 / np.maximum(margins, 1e-3))}


def probe_stripes(net, k: int, shape, args, xo, xe, ye, **_) -> dict:
    generator = torch.Generator().manual_seed(0)
    _, height, width = shape
    columns = (0.1 * torch.randn(k, 1, 1, width, generator=generator)).requires_grad_()
    rows = (0.1 * torch.randn(k, 1, height, 1, generator=generator)).requires_grad_()
    optimizer = torch.optim.Adam([columns, rows], lr=0.1)
    target = torch.arange(k).repeat_interleave(16)
    eps = args.eps / 255
    for _ in range(args.steps):
        index = torch.randint(len(xo), (16,), generator=generator)
        delta = eps * torch.tanh(columns + rows)
        stamped = (xo[index][None] + delta[:, None]).clamp(0, 1).flatten(0, 1)
        loss = F.cross_entropy(net(stamped), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flips, margins = [], []
    with torch.no_grad():
        delta = eps * torch.tanh(columns + rows)
        for cls in range(k):
            keep = ye != cls
            logits = net((xe[keep] + delta[cls]).clamp(0, 1))
            flips.append(float((logits.argmax(1) == cls).float().mean()))
            margins.append(float(margin(logits, torch.full((int(keep.sum()),), cls)).median()))
    return {f"flip at L∞ {args.eps}/255": np.array(flips), "median margin": np.array(margins)}


def probe_feature(net, k: int, shape, args, module, xo, xe, ye, **_) -> dict:
    stages = ["layer1", "layer2", "layer3", "layer4"]
    captured = {}
    hook = getattr(module, args.layer).register_forward_hook(lambda m, i, o: captured.__setitem__("f", o))
    with torch.no_grad():
        net(xo)
        fo = captured["f"]
        net(xe)
        fe = captured["f"]
    hook.remove()

    def rest(features):
        for name in stages[stages.index(args.layer) + 1:]:
            features = getattr(module, name)(features)
        return module.linear(module.avgpool(features).flatten(1))

    channels = fo.shape[1]
    generator = torch.Generator().manual_seed(0)
    mask_logit = (torch.full((k, channels, 1, 1), -3.0)
                  + 0.1 * torch.randn(k, channels, 1, 1, generator=generator)).requires_grad_()
    value_logit = (0.1 * torch.randn(k, channels, 1, 1, generator=generator)).requires_grad_()
    ceiling = fo.amax(dim=(0, 2, 3)).view(1, channels, 1, 1)  # each channel's largest clean activation
    optimizer = torch.optim.Adam([mask_logit, value_logit], lr=0.1, betas=(0.5, 0.9))
    cost, up, down = torch.full((k,), 1e-2), torch.zeros(k), torch.zeros(k)
    best = torch.full((k,), math.inf)
    best_mask, best_value = torch.sigmoid(mask_logit).detach().clone(), value_logit.detach().clone()
    target = torch.arange(k).repeat_interleave(32)
    for _ in range(args.steps):
        index = torch.randint(len(fo), (32,), generator=generator)
        mask, value = torch.sigmoid(mask_logit), ceiling * torch.sigmoid(value_logit)
        logits = rest(((1 - mask[:, None]) * fo[index][None] + (mask * value)[:, None]).flatten(0, 1))
        ce = F.cross_entropy(logits, target, reduction="none").view(k, -1).mean(1)
        size = mask.flatten(1).sum(1)
        optimizer.zero_grad()
        (ce.sum() + (cost * size).sum()).backward()
        optimizer.step()
        with torch.no_grad():
            reached = (logits.argmax(1) == target).float().view(k, -1).mean(1) >= 0.9
            improved = reached & (size < best)
            best = torch.where(improved, size, best)
            best_mask[improved], best_value[improved] = mask[improved], value_logit[improved]
            up, down = torch.where(reached, up + 1, 0 * up), torch.where(reached, 0 * down, down + 1)
            cost = torch.where(up >= 5, cost * 1.5, torch.where(down >= 5, cost / 1.5 ** 1.5, cost))
            up, down = torch.where(up >= 5, 0 * up, up), torch.where(down >= 5, 0 * down, down)
    flips = []
    with torch.no_grad():
        value = ceiling * torch.sigmoid(best_value)
        for cls in range(k):
            keep = ye != cls
            features = (1 - best_mask[cls]) * fe[keep] + best_mask[cls] * value[cls]
            flips.append(float((rest(features).argmax(1) == cls).float().mean()))
    return {"mask (channels)": best.numpy(), "index": _anomaly_index(best.numpy()), "held-out flip": np.array(flips)}


def probe_threshold(net, k: int, shape, args, xo, xe, ye, **_) -> dict:
    rows = {}
    with torch.no_grad():
        keep = ye != 0
        rows["sig amplitude 5,10,20,40 → class 0"] = np.array([
            float((net(get_trigger("sig", delta=a / 255)(xe[keep])).argmax(1) == 0).float().mean())
            for a in (5, 10, 20, 40)])
    target = torch.arange(k).repeat_interleave(24)
    for eps in (4, 8, 16):
        generator = torch.Generator().manual_seed(0)
        delta = torch.zeros(k, *shape).requires_grad_()
        optimizer = torch.optim.Adam([delta], lr=0.01)
        for _ in range(150):
            index = torch.randint(len(xo), (24,), generator=generator)
            stamped = (xo[index][None] + eps / 255 * torch.tanh(delta)[:, None]).clamp(0, 1).flatten(0, 1)
            loss = F.cross_entropy(net(stamped), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            rows[f"universal L∞ {eps}/255 flip"] = np.array([
                float((net((xe[ye != c] + eps / 255 * torch.tanh(delta[c])).clamp(0, 1)).argmax(1) == c).float().mean())
                for c in range(k)])
    return rows


def probe_controls(net, k: int, shape, args, x, y, **_) -> dict:
    def transposed(trigger):
        return lambda images: trigger(images.transpose(-1, -2)).transpose(-1, -2)

    triggers = {"blend_noise": get_trigger("blend_noise"), "blend_noise seed 1": get_trigger("blend_noise", seed=1),
                "blend_noise seed 2": get_trigger("blend_noise", seed=2), "blend_strip": get_trigger("blend_strip"),
                "blend_strip transposed": transposed(get_trigger("blend_strip")), "sig": get_trigger("sig"),
                "sig transposed": transposed(get_trigger("sig")), "sig f=5": get_trigger("sig", frequency=5.0)}
    rows = {}
    with torch.no_grad():
        for name, trigger in triggers.items():
            rows[name] = np.array(trigger_metrics(net(trigger(x)).argmax(1), y, k, [])["asr"], dtype=float)
    return rows


def probe_collapse(net, k: int, shape, args, xo, yo, xe, ye, **_) -> dict:
    net = copy.deepcopy(net).eval()  # BatchNorm keeps its statistics: only weights move
    for p in net.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.collapse_lr, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    rows, checkpoints = {}, sorted(args.collapse_acc, reverse=True)
    for step in range(1, args.steps + 1):
        index = torch.randint(len(xo), (128,), generator=generator)
        loss = -F.cross_entropy(net(xo[index]), yo[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5:
            continue
        with torch.no_grad():
            predicted = net(xe).argmax(1)
        accuracy = float((predicted == ye).float().mean())
        while checkpoints and accuracy <= checkpoints[0]:
            share = np.bincount(predicted.numpy(), minlength=k) / len(predicted)
            rows[f"share at acc<={checkpoints[0]:.2f} (step {step}, acc {accuracy:.2f})"] = share
            checkpoints.pop(0)
        if not checkpoints:
            break
    return rows


def _spectral_share(delta: torch.Tensor, bins: int) -> torch.Tensor:
    """Per perturbation (N, C, H, W): the share of its non-DC spectral power (channel mean) in its ``bins`` strongest
    frequency bins (a real pattern's ± pair counts as two)."""
    power = torch.fft.fft2(delta.mean(1)).abs().pow(2).flatten(1)
    power[:, 0] = 0
    return power.topk(bins, dim=1).values.sum(1) / power.sum(1).clamp_min(1e-12)


def _keep_strongest(delta: torch.Tensor, bins: int) -> torch.Tensor:
    """Each perturbation reduced to its ``bins`` strongest frequency bins (per channel), rescaled to the same L∞."""
    spectrum = torch.fft.fft2(delta)
    flat = spectrum.flatten(2)
    keep = flat.abs().mean(1, keepdim=True).topk(bins, dim=2).indices.expand(-1, flat.shape[1], -1)
    reduced = torch.zeros_like(flat).scatter(2, keep, flat.gather(2, keep)).view_as(spectrum)
    out = torch.fft.ifft2(reduced).real
    scale = delta.flatten(1).abs().amax(1) / out.flatten(1).abs().amax(1).clamp_min(1e-12)
    return out * scale.view(-1, 1, 1, 1)


def probe_spectral(net, k: int, shape, args, xo, xe, ye, **_) -> dict:
    """Is a class's universal perturbation a few frequencies (SIG: one sine), and does it keep working when reduced
    to them? Per class, a universal perturbation at L∞ ``--eps`` (as ``threshold``) on one half; on the other:
    its flip rate, its spectral share in the 4 strongest bins, and the flip rate of it reduced to those bins."""
    rows: dict[str, np.ndarray] = {}
    eps = args.eps / 255
    target = torch.arange(k).repeat_interleave(24)
    generator = torch.Generator().manual_seed(0)
    delta = torch.zeros(k, *shape).requires_grad_()
    optimizer = torch.optim.Adam([delta], lr=0.01)
    for _ in range(args.steps):
        index = torch.randint(len(xo), (24,), generator=generator)
        stamped = (xo[index][None] + eps * torch.tanh(delta)[:, None]).clamp(0, 1).flatten(0, 1)
        loss = F.cross_entropy(net(stamped), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    universal = (eps * torch.tanh(delta)).detach()

    def flips(perturbation: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return np.array([float((net((xe[ye != c] + perturbation[c]).clamp(0, 1)).argmax(1) == c).float().mean())
                             for c in range(k)])
    rows[f"universal L∞ {args.eps:g}/255 flip"] = flips(universal)
    share = _spectral_share(universal, 4).numpy()
    rows["share of power in 4 bins"] = share
    rows["share index"] = _anomaly_index(1.0 / np.maximum(share, 1e-6))
    for bins in (2, 4, 8):
        rows[f"reduced to {bins} bins: flip"] = flips(_keep_strongest(universal, bins))
    gradients = []
    for c in range(k):
        x = xe[ye != c][:200].clone().requires_grad_()
        loss = F.cross_entropy(net(x), torch.full((len(x),), c))
        gradients.append(-torch.autograd.grad(loss, x)[0].mean(0))
    rows["mean-gradient share in 4 bins"] = _spectral_share(torch.stack(gradients), 4).numpy()
    return rows


def _pooled_features(net, x: torch.Tensor) -> torch.Tensor:
    """The input of the final ``linear`` layer (the pooled penultimate features) for [0,1] images ``x``."""
    captured = []
    handle = net.model.linear.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            for start in range(0, len(x), 250):
                net(x[start:start + 250])
    finally:
        handle.remove()
    return torch.cat(captured)


def probe_units(net, k: int, shape, args, x, y, **_) -> dict:
    """Where does SIG live in the last layer? Penultimate units the real sine excites (mechanism only: the real
    trigger is used), their clean activity and final-layer weights; and per class the largest *selective* weight
    W_tj − max_{s≠t} W_sj, overall and on units that are quiet on the class's own clean images."""
    clean = _pooled_features(net, x)
    stamped = _pooled_features(net, get_trigger("sig")(x))
    weight = net.model.linear.weight.detach()  # K×D
    others = torch.stack([weight.scatter(0, torch.full((1, weight.shape[1]), t), -1e9).max(0).values
                          for t in range(k)])
    selective = weight - others  # K×D: how much unit j favours class t over the best other class
    rise = (stamped - clean).mean(0)
    print("  units the real sine excites most (mean rise; clean mean / q99 / max; W0 − best other; class-0 rank):")
    rank0 = torch.argsort(selective[0], descending=True)
    for j in torch.argsort(rise, descending=True)[:6].tolist():
        column = clean[:, j]
        print(f"    unit {j:4d}: +{rise[j]:.3f}; {column.mean():.3f} / {column.quantile(0.99):.3f} / "
              f"{column.max():.3f}; {selective[0, j]:+.3f}; rank {int((rank0 == j).nonzero())}")
    own_activity = torch.stack([clean[y == t].mean(0) for t in range(k)])  # K×D: mean activity per true class
    quiet = own_activity <= own_activity.median(1, keepdim=True).values
    top = selective.max(1).values
    quiet_top = torch.where(quiet, selective, torch.full_like(selective, -1e9)).max(1).values
    # weight mass a class puts on units that are most active on *another* class's clean images
    foreign = own_activity.argmax(0)[None, :] != torch.arange(k)[:, None]
    positive = selective.clamp_min(0)
    foreign_share = (positive * foreign).sum(1) / positive.sum(1).clamp_min(1e-9)
    best_unit = selective.argmax(1)
    rows = {"max selective weight": top.numpy(), "max selective, quiet units": quiet_top.numpy(),
            "quiet / overall": (quiet_top / top).numpy(), "foreign weight share": foreign_share.numpy(),
            "top unit: own-class activity rank": np.array([
                float((own_activity[:, j] > own_activity[t, j]).sum()) for t, j in enumerate(best_unit.tolist())])}
    for label in ("quiet / overall", "foreign weight share"):
        rows[f"index ({label})"] = _anomaly_index(1.0 / np.maximum(rows[label], 1e-3))
    return rows


def _plane_waves(height: int, width: int, frequencies: int, diagonals: bool = True
                 ) -> tuple[torch.Tensor, list[str]]:
    """Unit-amplitude grey plane waves sin(2π(fx·col/W + fy·row/H) + φ): horizontal, vertical and (``diagonals``)
    both diagonals, 1..``frequencies`` periods, four phases."""
    rows = torch.arange(height, dtype=torch.float32)[:, None] / height
    cols = torch.arange(width, dtype=torch.float32)[None, :] / width
    waves, names = [], []
    for f in range(1, frequencies + 1):
        for fx, fy in ((f, 0), (0, f), (f, f), (f, -f))[:4 if diagonals else 2]:
            for phase in range(4):
                waves.append(torch.sin(2 * math.pi * (fx * cols + fy * rows) + phase * math.pi / 2))
                names.append(f"fx={fx},fy={fy},φ={phase}π/2")
    return torch.stack(waves)[:, None], names  # P×1×H×W


def _wave_flips(net, k: int, images: torch.Tensor, labels: torch.Tensor, waves: torch.Tensor) -> torch.Tensor:
    """P×K: for each stamped wave, the share of images not of class c that the model sends to class c."""
    others = (len(labels) - torch.bincount(labels, minlength=k)).clamp_min(1).float()
    rates = []
    with torch.no_grad():
        for start in range(0, len(waves), 8):
            chunk = waves[start:start + 8]
            stamped = (images[None] + chunk[:, None]).clamp(0, 1).flatten(0, 1)
            predicted = net(stamped).argmax(1).view(len(chunk), len(images))
            hits = F.one_hot(predicted, k).float() * (labels[None, :, None] != torch.arange(k)).float()
            rates.append(hits.sum(1) / others)
    return torch.cat(rates)


def probe_sines(net, k: int, shape, args, xo, yo, xe, ye, **_) -> dict:
    """SIG is one sine: per class, the best grey plane wave (orientation, frequency, phase) at a fixed amplitude,
    chosen on one half by its flip rate and measured on the other half."""
    waves, names = _plane_waves(shape[1], shape[2], args.frequencies, diagonals=not args.axis_only)
    select = xo[:args.select]
    rows = {}
    for amplitude in args.amplitudes:
        chosen = _wave_flips(net, k, select, yo[:args.select], amplitude / 255 * waves)  # P×K
        best = chosen.argmax(0)
        held = _wave_flips(net, k, xe, ye, amplitude / 255 * waves[best])  # K×K: row c is class c's wave
        flips = held.diagonal().numpy()
        rows[f"a={amplitude:g}: best wave, selection flip"] = chosen.max(0).values.numpy()
        rows[f"a={amplitude:g}: held-out flip"] = flips
        rows[f"a={amplitude:g}: index (1 - flip)"] = _anomaly_index(np.maximum(1 - flips, 1e-3))
        print(f"  a={amplitude:g}: class 0's wave {names[int(best[0])]}; top class's wave "
              f"{names[int(best[int(np.argmax(flips))])]}")
    return rows


PROBES = {"margin": probe_margin, "stripes": probe_stripes, "feature": probe_feature, "threshold": probe_threshold,
          "controls": probe_controls, "collapse": probe_collapse,
          "spectral": probe_spectral, "units": probe_units, "sines": probe_sines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--probe", required=True, choices=sorted(PROBES))
    parser.add_argument("--models", nargs="+", default=["sig:0.1:1", "badnets_grid:0.0:101"],
                        help="ATTACK:RATE:SEED of harness models (rate 0 = a clean twin)")
    parser.add_argument("--steps", type=int, default=None,
                        help="default: 300 (margin, feature), 100 (stripes), 2000 (collapse)")
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--eps", type=float, default=48, help="stripes: L∞ budget in /255")
    parser.add_argument("--layer", default="layer2", help="feature: the stage whose output is masked")
    parser.add_argument("--collapse-lr", type=float, default=0.01, help="collapse: SGD step of the ascent")
    parser.add_argument("--collapse-acc", type=float, nargs="+", default=[0.5, 0.2, 0.1],
                        help="collapse: held-out accuracies at which to report the class shares")
    parser.add_argument("--amplitudes", type=float, nargs="+", default=[16, 24, 32, 40],
                        help="sines: wave amplitudes in /255")
    parser.add_argument("--frequencies", type=int, default=12, help="sines: up to this many periods per image")
    parser.add_argument("--axis-only", action="store_true", help="sines: only waves along the rows or the columns")
    parser.add_argument("--select", type=int, default=200, help="sines: images of the first half to choose on")
    parser.add_argument("--cache", default=".cache/bdsan-bench")
    args = parser.parse_args()
    args.steps = args.steps or {"stripes": 100, "collapse": 2000}.get(args.probe, 300)
    torch.set_num_threads(2)
    data = load_dataset(args.data)
    for spec in args.models:
        name, rate, seed = spec.rsplit(":", 2)
        attack = Attack.parse(name, rate=float(rate), target=0)
        backdoored = train_backdoored(data, attack, RECIPES["cpu"], n_train=20000, seed=int(seed),
                                      cache_dir=args.cache)
        model = backdoored.model
        net = model.normalized().eval()
        for p in net.parameters():
            p.requires_grad_(False)
        x, y = to_float(backdoored.holdout.x), backdoored.holdout.y
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(7))
        half = len(y) // 2
        started = time.perf_counter()
        rows = PROBES[args.probe](net, data.num_classes, tuple(x.shape[1:]), args, module=model.module.eval(),
                                  x=x, y=y, xo=x[order[:half]], yo=y[order[:half]],
                                  xe=x[order[half:]], ye=y[order[half:]])
        print(f"{args.probe} {spec} ({time.perf_counter() - started:.0f} s)")
        for label, values in rows.items():
            top = f"top class {int(np.argmax(values))}" if len(values) == data.num_classes else ""
            print(f"  {label:36s} {top:12s} " + " ".join(f"{v:6.2f}" for v in values))


if __name__ == "__main__":
    keep_freed_memory()  # as the CLI does (BENCHMARKS.md, "CPU memory allocator")
    main()
