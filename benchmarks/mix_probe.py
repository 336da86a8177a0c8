"""Mix probe: the scan's patch kind with one mask value per class (x' = (1−α)·x + α·p, a full-image blend toward
an optimised picture p), the form of an image-blend attack, on cached harness models and their clean twins. It
measured the mix kind's development table (BENCHMARKS.md, "The mix kind") before the scan had the kind; the scan's
own ``mix`` kind draws its picture's initial values differently (``scan_detect.py --kinds … mix`` runs it).

    PYTHONPATH=benchmarks python benchmarks/mix_probe.py --data /work/shared/data/cifar10.npz \
        --seed-attacks 50:blend_image:source=gtsrb32,index=0 --clean-per-seed 0 --out bench_out/mix-probe.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scan_detect import add_probe_arguments, probe_jobs

import bdsan.detectors.scan as scan_module
from bdsan.detectors.scan import MIX_ALPHA_INIT, TriggerBank, scan, scan_section


class MixBank(TriggerBank):
    """The patch kind's mask as one value per class (a constant full-image mask)."""

    def __init__(self, kinds, num_classes, shape, epsilon, mask_init, generator, device):
        super().__init__(kinds, num_classes, shape, epsilon, mask_init, generator, device)
        if "patch" in kinds:
            mask = torch.full((num_classes, 1, 1, 1), MIX_ALPHA_INIT)
            self.params["patch"][0] = mask.to(device).requires_grad_()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(parser, "50:blend_image:source=gtsrb32,index=0")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from bdsan.train.zoo import load_dataset
    data = load_dataset(args.data)
    scan_module.TriggerBank = MixBank
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(row["seed"], row["attack"]) for row in rows}
    for seed, job in probe_jobs(args, data):
        if (seed, job["attack"]) in done:
            continue
        started = time.perf_counter()
        section = scan_section(scan(job["model"], job["holdout"], kinds=("patch",), steps=args.steps, seed=seed,
                                    device="cpu"))
        alpha = np.asarray(section["mask_l1"])
        rows.append({"seed": seed, "attack": job["attack"], "target": job["target"],
                     "implant_asr": job["implant_asr"], "alpha": alpha.tolist(), "flip": section["flip_rate"],
                     "index": section["anomaly_index"], "anomalous": section["anomalous_classes"],
                     "time_s": round(time.perf_counter() - started, 1)})
        t = job["target"]
        median = float(np.median(alpha))
        print(seed, job["attack"][:40], "target", t,
              "α/median", None if t is None else round(alpha[t] / median, 3),
              "lowest", int(alpha.argmin()), round(float(alpha.min() / median), 3),
              "flagged", section["anomalous_classes"], rows[-1]["time_s"], "s", flush=True)
        args.out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
