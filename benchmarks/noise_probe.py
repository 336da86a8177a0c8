"""Noise probe: how a model answers random noise of growing strength, per class, on the scan's held-out split.

A noise-blend backdoor answers any grey noise with its target; a clean CIFAR-10 model has a natural noise sink
(frog) too. This probe records, for the harness models of each ``--seed-attacks`` entry and its clean twins (cached:
nothing is trained when ``scan_detect.py`` made them), the share of held-out images of other classes that each class
takes under i.i.d. grey uniform noise added at several amplitudes (``add``) and blended toward uniform noise at
several weights (``lerp``, the attack's own form) and toward colour noise (``lerpc``), three seeded draws each;
forms missing from a row already in ``--out`` are added to it, so that a rule on the dose–response can be
chosen on development models before a blind one is read. ``--analyse`` prints the per-model table.

    PYTHONPATH=benchmarks python benchmarks/noise_probe.py --data /work/shared/data/cifar10.npz \
        --seed-attacks 43:blend_noise,unseen_blend --clean-per-seed 2 --out bench_out/noise-probe.json
    PYTHONPATH=benchmarks python benchmarks/noise_probe.py --analyse --out bench_out/noise-probe.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scan_detect import add_probe_arguments, probe_jobs

from bdsan.detectors.noise import class_takes
from bdsan.detectors.scan import ScanSettings, _split_for_scan, _torch_classifier, scan, scan_section
from bdsan.device import channels_last, wants_bf16
from bdsan.io.data import to_float

ADD_AMPLITUDES = (4, 8, 16, 24, 32, 48)  # in 1/255: x + a·u, u ~ U(-1, 1) per pixel, grey
LERP_WEIGHTS = (0.05, 0.1, 0.15, 0.2)  # (1 - w)·x + w·u, u ~ U(0, 1) per pixel, grey
LERP_COLOUR_WEIGHTS = (0.1, 0.15, 0.2)  # the same with u drawn per pixel and channel (colour noise)
STRUCTURED_WEIGHT = 0.2  # the structured forms: pink (1/f) noise, a held-out image as key, flat grey
DRAWS = 3
NOISE_SEED = 7717  # neither attack's noise seed (20240601, 4242)
CPU = torch.device("cpu")


def pink_noise(draws: int, channels: int, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``draws`` × ``channels`` × H × W noise with a natural image's 1/f amplitude spectrum, mapped to [0, 1]
    (mean 0.5 and a uniform draw's standard deviation, clipped)."""
    white = torch.randn((draws, channels, *shape), generator=generator)
    fy = torch.fft.fftfreq(shape[0])[:, None]
    fx = torch.fft.rfftfreq(shape[1])[None, :]
    radius = (fy ** 2 + fx ** 2).sqrt()
    spectrum = torch.fft.rfft2(white) / radius.clamp_min(1 / max(shape))
    spectrum[..., 0, 0] = 0
    field = torch.fft.irfft2(spectrum, s=shape)
    field = (field - field.mean((-2, -1), keepdim=True)) / field.std((-2, -1), keepdim=True)
    return (0.5 + 12 ** -0.5 * field).clamp(0, 1)


def probe(net, held, num_classes: int, bf16: bool, have: dict | None = None) -> dict:
    """The mean per-class take of every noise form and strength (keys ``add:A``, ``lerp:W`` and, with colour noise,
    ``lerpc:W``), and of no noise; forms already in ``have`` are kept, not measured again."""
    generator = torch.Generator().manual_seed(NOISE_SEED)
    draws = [torch.rand((1, 1, *held.x.shape[2:]), generator=generator) for _ in range(DRAWS)]
    colour = torch.Generator().manual_seed(NOISE_SEED + 1)
    colour_draws = [torch.rand((1, held.x.shape[1], *held.x.shape[2:]), generator=colour) for _ in range(DRAWS)]

    def mean_take(perturb_with, noises=draws) -> list[float]:
        takes = [class_takes(net, held, num_classes, perturb_with(u), 512, CPU, bf16) for u in noises]
        return torch.stack(takes).mean(0).tolist()

    def lerp(w):
        return lambda u: lambda x: torch.lerp(x, u.expand_as(x), w)

    forms = {"none": lambda: class_takes(net, held, num_classes, lambda x: x, 512, CPU, bf16).tolist()}
    for amplitude in ADD_AMPLITUDES:
        forms[f"add:{amplitude}"] = lambda a=amplitude: mean_take(
            lambda u: lambda x: (x + a / 255 * (2 * u - 1)).clamp(0, 1))
    for weight in LERP_WEIGHTS:
        forms[f"lerp:{weight}"] = lambda w=weight: mean_take(lerp(w))
    for weight in LERP_COLOUR_WEIGHTS:
        forms[f"lerpc:{weight}"] = lambda w=weight: mean_take(lerp(w), colour_draws)
    channels, shape = held.x.shape[1], tuple(held.x.shape[2:])
    pink = torch.Generator().manual_seed(NOISE_SEED + 2)
    pink_colour = list(pink_noise(DRAWS, channels, shape, pink)[:, None])
    pink_grey = list(pink_noise(DRAWS, 1, shape, pink)[:, None])
    keys = [to_float(held.x[i:i + 1]) for i in torch.randperm(len(held), generator=pink)[:DRAWS].tolist()]
    w = STRUCTURED_WEIGHT
    forms[f"pink:{w}"] = lambda: mean_take(lerp(w), pink_colour)
    forms[f"pinkg:{w}"] = lambda: mean_take(lerp(w), pink_grey)
    forms[f"image:{w}"] = lambda: mean_take(lerp(w), keys)
    forms[f"flat:{w}"] = lambda: mean_take(lerp(w), [torch.full((1, 1, *shape), 0.5)])
    have = have or {}
    return {key: have[key] if key in have else measure() for key, measure in forms.items()}


def is_noise_blend(row: dict) -> bool:
    """A noise-blend attack (the suite's ``blend_noise`` at any seed or colour form)."""
    return row["target"] is not None and row["attack"].startswith("blend_noise")


def analyse(rows: list[dict]) -> None:
    """Per model and noise form: the class that takes most at the strongest noise, and its take at each strength;
    then per form the lowest take of grey and of colour noise-blend targets against every other class's highest."""
    keys = [k for k in rows[0]["table"] if k != "none"]
    print("| model | target | top class (at add:32) | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for row in rows:
        table = {k: np.asarray(v) for k, v in row["table"].items()}
        top = int(table["add:32"].argmax())
        print(f"| {row['seed']} {row['attack'][:28]} | {row['target']} | {top} | "
              + " | ".join(f"{table[k][top]:.2f}" for k in keys if k in table) + " |")
    print("\n| form | grey noise-blend targets: lowest | colour noise-blend targets: lowest | any other class: "
          "highest (model) |\n|---|---|---|---|")
    for key in keys:
        lows = {"grey": [], "colour": []}
        others = []
        for row in rows:
            if key not in row["table"]:
                continue
            takes = np.asarray(row["table"][key])
            target = row["target"] if is_noise_blend(row) else None
            if target is not None:
                lows["colour" if "channels=3" in row["attack"] else "grey"].append(takes[target])
            rest = np.delete(takes, target) if target is not None else takes
            others.append((rest.max(), f"{row['seed']} {row['attack'][:24]}"))
        cells = [f"{min(v):.3f} ({len(v)})" if v else "—" for v in lows.values()]
        high = max(others)
        print(f"| {key} | {cells[0]} | {cells[1]} | {high[0]:.3f} ({high[1]}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(parser, "43:blend_noise,unseen_blend")
    parser.add_argument("--analyse", action="store_true", help="only print the table of --out")
    parser.add_argument("--scan-noise", action="store_true",
                        help="add to each row of --out the scan's own noise kind (`scan_noise`: the section a "
                             "scan_detect.py run with --kinds … noise stores, same seed), for verdict_rules.py "
                             "--noise-from")
    parser.add_argument("--noise-channels", type=int, nargs="+", default=None,
                        help="with --scan-noise: the kind's forms by channels drawn (1 grey, 3 colour)")
    args = parser.parse_args()
    if args.analyse:
        analyse(json.loads(args.out.read_text()))
        return
    torch.set_num_threads(args.threads)
    from bdsan.train.zoo import load_dataset
    data = load_dataset(args.data)
    cfg = ScanSettings()
    bf16 = wants_bf16(CPU, cfg.precision)
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(row["seed"], row["attack"]): row for row in rows if "table" in row}
    for seed, job in probe_jobs(args, data):
        if args.scan_noise:
            row = next((row for row in rows if (row["seed"], row["attack"]) == (seed, job["attack"])), None)
            if row is None:
                row = {"seed": seed, "attack": job["attack"], "target": job["target"]}
                rows.append(row)
            channels = {"noise_channels": tuple(args.noise_channels)} if args.noise_channels else {}
            row["scan_noise"] = scan_section(scan(job["model"], job["holdout"], kinds=("noise",), seed=seed,
                                                  device="cpu", **channels))["noise"]
            args.out.write_text(json.dumps(rows))
            continue
        row = done.get((seed, job["attack"]))
        started = time.perf_counter()
        _, held = _split_for_scan(job["holdout"], cfg.eval_fraction, seed)
        net = _torch_classifier(job["model"], CPU)
        with channels_last(net):
            table = probe(net, held, job["model"].num_classes, bf16, row["table"] if row else None)
        if row is None:
            rows.append({"seed": seed, "attack": job["attack"], "target": job["target"],
                         "implant_asr": job["implant_asr"], "bf16": bf16, "table": table})
        else:
            row["table"] = table
        print(seed, job["attack"], round(time.perf_counter() - started, 1), "s", flush=True)
        args.out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
