"""The built-in suite, trigger by trigger, on one harness model: where does the `--max-asr` gate fail, and where to?

The model comes from the harness cache (same training arguments as ``run.py``; ``--attack clean`` is the clean twin,
poison rate 0). Each suite trigger is audited (``bdsan.detectors.audit``) on the model's whole 5% holdout, on the
pipeline's verify split of it (what ``sanitize``'s audits read) and on the whole test split: ``asr_max``, the class
it goes to, ``asr_net`` (net of that class's untriggered rate) and the ASR into ``--target``.

    python benchmarks/suite_breakdown.py --data /work/shared/data/cifar10.npz --epochs 20 --n-train 0 \\
        --attack clean --seed 100 --out bench_out/suite-clean100.json
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from bdsan.detectors.audit import audit
from bdsan.io.data import Holdout, split_holdout
from bdsan.train.zoo import RECIPES, Attack, load_dataset, train_backdoored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--attack", default="clean", help="a harness attack, or 'clean' for a clean twin")
    parser.add_argument("--seed", type=int, required=True, help="the model's training seed")
    parser.add_argument("--recipe", default="cpu", choices=sorted(RECIPES))
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (as run.py --epochs)")
    parser.add_argument("--n-train", type=int, default=20000, help="training subset size (0 = the whole split)")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--cache", default=".cache/bdsan-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the result here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    recipe = RECIPES[args.recipe] if args.epochs is None else replace(RECIPES[args.recipe], epochs=args.epochs)
    clean = args.attack == "clean"
    attack = Attack.parse("badnets_grid" if clean else args.attack, rate=0.0 if clean else 0.1, target=args.target)
    model = train_backdoored(data, attack, recipe, n_train=args.n_train or None, seed=args.seed,
                             cache_dir=args.cache or None)
    _, verify = split_holdout(model.holdout, 0.5, args.seed)
    splits = {"holdout": model.holdout, "verify": verify,
              "test": Holdout(data.x_test, data.y_test, list(data.classes), f"{data.name}:test")}
    result = {"attack": args.attack, "seed": args.seed, "train_seconds": round(model.train_seconds, 1),
              "from_cache": model.from_cache, "splits": {}}
    print("| split | images | CA | trigger | ASR max | to class | ASR net | ASR into target |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, images in splits.items():
        report = audit(model.model, images, device="cpu")
        rows = {t["name"]: {"asr_max": t["asr_max"], "class": t["suspected_target"], "asr_net": t["asr_net"],
                            "asr_target": t["asr"][args.target]} for t in report["triggers"]}
        result["splits"][name] = {"n": report["n"], "ca": report["ca"], "triggers": rows}
        for trigger, row in rows.items():
            print(f"| {name} | {report['n']} | {report['ca']:.3f} | {trigger} | {row['asr_max']:.3f} "
                  f"| {data.classes[row['class']]} ({row['class']}) | {row['asr_net']:.3f} | {row['asr_target']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
