"""Diagnosis: how often a backdoored model answers mixes of two clean holdout images with its target.

A mix λ·xᵢ + (1 − λ)·xⱼ is itself a blend; a blend backdoor answers part of it (BENCHMARKS.md "Distilling between the
few fit images"). Reads the harness's cached model (trained on a miss, as run.py would).

    python benchmarks/mix_answers.py --data /work/shared/data/gtsrb32.npz --epochs 40 --augment crop --seed 15 \\
        --attacks blend_noise sig
"""
from __future__ import annotations

import argparse

import torch
from probe import cached_model

from bdsan.io.data import to_float
from bdsan.train.augment import mixup_pairs
from bdsan.train.zoo import AUGMENTS, RECIPES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--attacks", nargs="+", required=True)
    parser.add_argument("--recipe", default="cpu", choices=sorted(RECIPES))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--augment", choices=sorted(AUGMENTS), default=None)
    parser.add_argument("--n-train", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=".cache/bdsan-bench")
    parser.add_argument("--mixes", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for attack in args.attacks:
        _, parsed, backdoored = cached_model(argparse.Namespace(**vars(args), attack=attack), torch.device("cpu"))
        model = backdoored.model.normalized().eval()
        x = to_float(backdoored.holdout.x[backdoored.holdout.y != parsed.target])
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            rows = {"clean": model(x).softmax(1),
                    "mix, λ ~ U(0, 1)": model(mixup_pairs(x, args.mixes, generator)[0]).softmax(1),
                    "mix, λ = 0.5": model(0.5 * x + 0.5 * x[torch.randperm(len(x), generator=generator)]).softmax(1)}
        for name, probs in rows.items():
            print(f"{attack:12s} {name:18s} answered with the target: {100 * float((probs.argmax(1) == parsed.target).float().mean()):5.1f}%  "
                  f"mean target probability {float(probs[:, parsed.target].mean()):.3f}  ({len(probs)} images)")


if __name__ == "__main__":
    main()
