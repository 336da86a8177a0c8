"""Development diagnosis: weights interpolated between a delivered model and its defended one (WiSE-FT-style).

θ(α) = (1 − α)·θ_delivered + α·θ_defended for every float tensor (BatchNorm running statistics too), measured at
several α: clean accuracy and the ASR of the attack's own trigger on development images, and the ASR of the trigger
the defense *found* (``--found``, a suite trigger name) — a step back that keeps the found trigger removed need not
keep the real one removed. Two sources of models:

    # a cached benchmark model (as probe.py; the development slice of the test split)
    python benchmarks/interpolate.py --data /work/shared/data/gtsrb32.npz --epochs 40 --n-train 0 --augment crop \\
        --seed 15 --attack sig --dev 1500:
    # the tests' toy model (corner_square planted; the suite's badnets_square is what the audit finds)
    python benchmarks/interpolate.py --toy --found badnets_square
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

ALPHAS = (0.0, 0.25, 0.5, 0.625, 0.75, 0.875, 1.0)


def _asr(model, x: torch.Tensor, y: torch.Tensor, stamp, target: int) -> float:
    others = y != target
    with torch.no_grad():
        return float((model(stamp(x[others])).argmax(1) == target).float().mean())


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", action="store_true", help="the tests' toy model instead of a cached benchmark model")
    parser.add_argument("--data")
    parser.add_argument("--attack")
    parser.add_argument("--recipe", default="cpu")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=0)
    parser.add_argument("--augment", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dev", default="5000:7000")
    parser.add_argument("--cache", default=".cache/bdsan-bench")
    parser.add_argument("--defense", default="unlearn")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--found", default=None, help="also measure this suite trigger's ASR toward the same target")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bdsan.detectors.triggers import get_trigger
    from bdsan.io.data import split_holdout, to_float
    from bdsan.sanitize.context import Context
    from bdsan.sanitize.pipeline import sanitize
    from bdsan.sanitize.registry import get_method

    params = dict(p.split("=", 1) for p in args.param)
    if args.toy:
        from bdsan.train.fixtures import corner_square, train_toy_model

        toy = train_toy_model(poison_rate=0.1, seed=args.seed)
        fit, verify = split_holdout(toy.holdout, 0.5, args.seed)
        delivered = copy.deepcopy(toy.model).normalized().eval()
        known = [get_trigger(args.found)] if args.found else []
        ctx = Context(seed=args.seed, known_triggers=known, max_acc_drop=5.0)
        defaults = {"epochs": 2, "scan": "never", "bn": "reestimate-augmented"}
        defended = get_method(args.defense, **(defaults | params)).run(copy.deepcopy(delivered), fit, ctx).model
        x, y, stamp, target = to_float(verify.x), verify.y, corner_square, 0
    else:
        import probe  # benchmarks/ is on sys.path when this file runs as a script

        data, attack, backdoored = probe.cached_model(args, torch.device("cpu"))
        report = sanitize(backdoored.model, backdoored.holdout, args.defense, params, None, seed=args.seed,
                          device=torch.device("cpu"), max_acc_drop=3.0, progress=lambda *a: None)
        delivered, defended = backdoored.model.normalized().eval(), report.defended.normalized().eval()
        x, y = probe._dev_images(data, args.dev, args.n_train, args.seed)
        x = to_float(x)
        stamp, target = attack.build_trigger().apply, attack.target
    found = get_trigger(args.found).apply if args.found else None
    start, end = delivered.state_dict(), defended.state_dict()
    mixed = copy.deepcopy(defended)
    rows = []
    for alpha in ALPHAS:
        mixed.load_state_dict({k: (1 - alpha) * start[k] + alpha * v if v.is_floating_point() else v
                               for k, v in end.items()})
        mixed.eval()
        with torch.no_grad():
            ca = float((mixed(x).argmax(1) == y).float().mean())
        row = {"alpha": alpha, "ca": round(100 * ca, 2), "asr": round(100 * _asr(mixed, x, y, stamp, target), 2)}
        if found is not None:
            row["asr_found"] = round(100 * _asr(mixed, x, y, found, target), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
