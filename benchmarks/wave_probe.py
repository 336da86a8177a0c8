"""Wave probe: every plane wave's flip rates, per class, on the scan's held-out split, at several amplitudes.

The scan's ``wave`` kind keeps, per class, only the wave that flipped most of its selection images and reports that
wave's held-out flip. This probe keeps the whole table (wave × class) for the harness models of ``--seeds`` (cached:
nothing is trained when ``scan_detect.py`` made them), so rules on frequency or amplitude can be compared offline
on development seeds before a blind one is read.

    python benchmarks/wave_probe.py --data /work/shared/data/cifar10.npz --seeds 8 9 10 11 \
        --seed-attacks 8:sig,unseen_sine 10:blend_noise,unseen_blend,sig,unseen_sine --out bench_out/wave-probe.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scan_detect import zoo_jobs

from bdsan.detectors.scan import ScanSettings, _plane_waves, _split_for_scan, _torch_classifier, wave_name
from bdsan.device import channels_last, precision_autocast, wants_bf16
from bdsan.io.data import to_float


@torch.no_grad()
def wave_table(net, images: torch.Tensor, labels: torch.Tensor, waves: torch.Tensor, num_classes: int,
               bf16: bool, batch_size: int = 512) -> torch.Tensor:
    """W×K: fraction of ``images`` of other classes that wave w sends to class k (in bf16 where the scan is)."""
    count = len(images)
    hits = torch.zeros(len(waves), num_classes)
    pairs = len(waves) * count
    for start in range(0, pairs, batch_size):
        pair = torch.arange(start, min(start + batch_size, pairs))
        wave, image = pair // count, pair % count
        with precision_autocast(torch.device("cpu"), bf16):
            predicted = net((images[image] + waves[wave]).clamp(0, 1)).argmax(1)
        moved = predicted != labels[image]
        hits.index_put_((wave[moved], predicted[moved]), torch.ones(int(moved.sum())), accumulate=True)
    others = (count - torch.bincount(labels, minlength=num_classes)).clamp_min(1)
    return hits / others


def tables_at(net, opt, held, amplitude: float, cfg: ScanSettings, num_classes: int, bf16: bool) -> dict:
    """The selection (``wave_select`` optimisation images) and held-out tables of every wave at ``amplitude``/255."""
    waves = amplitude / 255 * _plane_waves(*held.x.shape[2:], cfg.wave_periods)
    select = wave_table(net, to_float(opt.x[:cfg.wave_select]), opt.y[:cfg.wave_select], waves, num_classes, bf16)
    flips = wave_table(net, to_float(held.x), held.y, waves, num_classes, bf16)
    return {"select": select.tolist(), "held": flips.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed-attacks", nargs="+", required=True, metavar="SEED:ATTACK,ATTACK",
                        help="e.g. 8:sig,unseen_sine 10:blend_noise,sig (the attacks scan_detect.py trained)")
    parser.add_argument("--clean-per-seed", type=int, default=3)
    parser.add_argument("--amplitudes", type=float, nargs="+", default=[32.0], help="in 1/255")
    parser.add_argument("--cache", default=".cache/bdsan-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from bdsan.train.zoo import load_dataset
    data = load_dataset(args.data)
    cfg = ScanSettings()
    bf16 = wants_bf16(torch.device("cpu"), cfg.precision)
    rows = []
    for entry in args.seed_attacks:
        seed_text, _, names = entry.partition(":")
        seed = int(seed_text)
        job_args = argparse.Namespace(recipe="cpu", epochs=None, attacks=[n for n in names.split(",") if n],
                                      n_train=20000, clean_per_seed=args.clean_per_seed, target=0,
                                      cache=args.cache, test_n=2000)
        for job in zoo_jobs(seed, job_args, data):
            started = time.perf_counter()
            opt, held = _split_for_scan(job["holdout"], cfg.eval_fraction, seed)
            net = _torch_classifier(job["model"], torch.device("cpu"))
            with channels_last(net):
                tables = {str(a): tables_at(net, opt, held, a, cfg, job["model"].num_classes, bf16)
                          for a in args.amplitudes}
            rows.append({"seed": seed, "attack": job["attack"], "target": job["target"],
                         "implant_asr": job["implant_asr"], "bf16": bf16, "tables": tables,
                         "wave_names": [wave_name(i) for i in range(8 * cfg.wave_periods)]})
            print(seed, job["attack"], round(time.perf_counter() - started, 1), "s", flush=True)
            args.out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
