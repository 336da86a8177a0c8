"""Which class does a trigger push a clean model toward by itself? Per class k: the share of a clean twin's holdout
images of other classes predicted as k with the trigger stamped, and without it (the twin's *holdout*, from the
training split: no test image is read). Used to pick an attack target the trigger does not favour naturally.

    python benchmarks/sine_pushes.py --data /work/shared/data/cifar10.npz --seed 100 --epochs 20 --n-train 0 \\
        --attack "sig:axis=rows,frequency=5"
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from bdsan.train.loop import predict
from bdsan.train.zoo import RECIPES, Attack, load_dataset, train_backdoored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--attack", required=True, help="the trigger, NAME[:key=value,...]")
    parser.add_argument("--seed", type=int, default=100, help="the clean twin's training seed")
    parser.add_argument("--recipe", default="cpu")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=20000, help="0 = the whole training split")
    parser.add_argument("--cache", default=".cache/bdsan-bench")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    recipe = RECIPES[args.recipe] if args.epochs is None else replace(RECIPES[args.recipe], epochs=args.epochs)
    twin = train_backdoored(data, Attack.parse("badnets_grid", rate=0.0), recipe, n_train=args.n_train or None,
                            seed=args.seed, cache_dir=args.cache)
    net = twin.model.normalized().eval()
    x, y = twin.holdout.x, twin.holdout.y
    clean = predict(net, x, 256)
    stamped = predict(net, x, 256, transform=Attack.parse(args.attack).build_trigger())
    print(f"clean twin seed {args.seed}, {len(y)} holdout images, trigger {args.attack}")
    for k, name in enumerate(data.classes):
        others = y != k
        print(f"{k} {name:12s} stamped → k {(stamped[others] == k).float().mean():.3f}   "
              f"clean → k {(clean[others] == k).float().mean():.3f}")


if __name__ == "__main__":
    main()
