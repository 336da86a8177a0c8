"""ASR floor: how often a clean model, trained like the harness's backdoored ones, predicts the target anyway.

A defended model cannot be expected to fall below what a model that never saw the trigger does: on a 73%-accurate
CPU-recipe model a quarter of stamped images are misclassified, and some of those land on the target by chance or
because the trigger itself looks like the target. For each clean twin (``bdsan.train.zoo``, poison rate 0, the
same cache as ``benchmarks/run.py`` and ``benchmarks/scan_detect.py``) and each attack, this measures the attack's
ASR on the test slice with the attack's own trigger, next to the twin's clean accuracy and the rate at which it
predicts the target for the same images without any trigger.

    python benchmarks/asr_floor.py --data /work/shared/data/cifar10.npz --seeds 101 --out bench_out/asr-floor
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

import extra_triggers  # noqa: F401  (registers the benchmark-only attacks)
import torch

from bdsan.allocator import keep_freed_memory
from bdsan.train.zoo import (
    AUGMENTS,
    Attack,
    attack_metrics,
    load_dataset,
    recipe_with,
    train_backdoored,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="benchmark .npz")
    parser.add_argument("--attacks", nargs="+", default=["badnets_grid", "blend_noise", "sig", "trojan_patch"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[101], help="clean-twin training seeds")
    parser.add_argument("--recipe", default="cpu")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (as run.py --epochs)")
    parser.add_argument("--augment", choices=sorted(AUGMENTS), default=None,
                        help="override the recipe's training augmentation: crop+flip, or crop alone (datasets "
                             "with mirror-image class pairs, GTSRB)")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--test-n", type=int, default=2000, help="evaluate on x_test[offset:offset + N] (0 = to the end)")
    parser.add_argument("--offset", type=int, default=0,
                        help="0: the tables' test slice; 5000: the development slice of benchmarks/probe.py")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--cache", default=".cache/bdsan-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_out/asr-floor"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data)
    window = slice(args.offset, args.offset + args.test_n if args.test_n else None)
    x, y = data.x_test[window], data.y_test[window]
    recipe = recipe_with(args.recipe, args.epochs, args.augment)
    rows = []
    for seed in args.seeds:
        twin = train_backdoored(data, Attack.parse("badnets_grid", rate=0.0, target=args.target), recipe,
                                n_train=args.n_train or None, seed=seed, cache_dir=args.cache or None)
        net = twin.model.normalized().eval()
        for text in args.attacks:
            attack = Attack.parse(text, rate=0.1, target=args.target)
            metrics = attack_metrics(net, x, y, attack, data.num_classes)
            rows.append({"seed": seed, "attack": attack.label, "ca": metrics["ca"], "asr": metrics["asr"],
                         "ra": metrics["ra"], "untriggered": metrics["untriggered"],
                         "target_recall": metrics["target_recall"], "n_target": metrics["n_target"],
                         "train_s": round(twin.train_seconds, 1),
                         "cached": twin.from_cache})
            print(json.dumps(rows[-1]), flush=True)
    lines = [(f"date {dt.datetime.now(dt.timezone.utc).isoformat(timespec='minutes')}, "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
              f"recipe {args.recipe} ({recipe.epochs} epochs), n_train {args.n_train}, test x_test[{window.start}:{window.stop or ''}], "
              f"target {args.target}"),
             "", ("| clean twin seed | attack trigger | CA | ASR (floor) | RA | target rate without trigger "
                  "| target recall |"),
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['attack']} | {r['ca']:.3f} | {r['asr']:.3f} | {r['ra']:.3f} "
              f"| {r['untriggered']:.3f} | {r['target_recall']:.3f} (of {r['n_target']}) |" for r in rows]
    text = "\n".join(lines) + "\n"
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    keep_freed_memory()  # as the CLI does (BENCHMARKS.md, "CPU memory allocator")
    main()
