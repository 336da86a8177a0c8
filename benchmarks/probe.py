"""Development probe: one cached benchmark model × one defense variant, measured on a *development* test slice.

Recipe choices are made here, never on the tables' test slice: the model comes from the harness cache (same
training arguments as ``run.py``), the defense runs through ``bdsan.sanitize.pipeline.sanitize`` with nothing
written (``out_dir=None``), and the defended model — before any rollback, so the variant's own effect shows — is
measured on ``x_test[5000:7000]`` (disjoint from the ``x_test[:2000]`` that ``run.py`` reports on), or on the
slice ``--dev START:END`` gives (GTSRB's test split has 2,275 images: ``--dev 1500:``, on development seeds), or —
``--dev rest``, for models trained on a subset — on the training images outside the model's subset (never seen in
training, never in the holdout, not in any test split).

    python benchmarks/probe.py --data /work/shared/data/cifar10.npz --n-train 20000 --attack blend_noise \\
        --defense unlearn --param regularizer=l2
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace

import torch

from bdsan.allocator import keep_freed_memory
from bdsan.device import resolve_device
from bdsan.report import json_safe
from bdsan.sanitize.mirror import FLIP_MODES
from bdsan.train.zoo import (
    AUGMENTS,
    RECIPES,
    Attack,
    attack_metrics,
    load_dataset,
    recipe_with,
    split_training_subset,
    train_backdoored,
)

DEV = "5000:7000"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--attack", required=True, help="NAME[:mode][:key=value,...] as in run.py")
    parser.add_argument("--defense", required=True)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--recipe", default="cpu", choices=sorted(RECIPES))
    parser.add_argument("--n-train", type=int, default=20000, help="training subset size (0 = the whole split)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (as run.py --epochs)")
    parser.add_argument("--augment", choices=sorted(AUGMENTS), default=None,
                        help="override the recipe's training augmentation: crop+flip, or crop alone (datasets "
                             "with mirror-image class pairs, GTSRB)")
    parser.add_argument("--dev", default=DEV, metavar="START:END",
                        help="development test slice (END may be empty), or 'rest': the training images outside "
                             "--n-train's subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout-n", type=int, default=0,
                        help="give the defense only a stratified subset of the model's holdout (as run.py's)")
    parser.add_argument("--max-acc-drop", type=float, default=3.0)
    parser.add_argument("--fit-fraction", type=float, default=0.5,
                        help="share of the holdout the defense fits on (sanitize --fit-fraction)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", default=".cache/bdsan-bench")
    parser.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                        help="also measure ASR with the attack's trigger at other parameter values, e.g. alpha=0.1,0.3")
    parser.add_argument("--known-trigger", action="store_true",
                        help="diagnosis: the attack's own trigger joins the suite the pipeline audits, as a user's "
                             "--trigger-image would (an upper bound for what a found trigger can give)")
    parser.add_argument("--flip", choices=FLIP_MODES, default="auto",
                        help="sanitize's flip: may the defense's augmentation flip images (auto: the mirror check)")
    parser.add_argument("--details", action="store_true", help="print the defense's details (epochs, triggers)")
    parser.add_argument("--prune-curve", action="store_true",
                        help="with unlearn's prune_schedule=fewest: measure every count of channels, 1 to all")
    parser.add_argument("--per-epoch", action="store_true",
                        help="also measure every state the fit-val guard checks (each epoch) on the development images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data, attack, backdoored = cached_model(args, device)
    if args.holdout_n:
        from run import limit_holdout  # benchmarks/ is on sys.path when this file runs as a script

        limit_holdout(backdoored, args.holdout_n, args.seed)
    params = dict(p.split("=", 1) for p in args.param)
    x_dev, y_dev = _dev_images(data, args.dev, args.n_train, args.seed)
    x_dev, y_dev = x_dev.to(device), y_dev.to(device)

    def dev(model) -> dict:
        return attack_metrics(model.normalized().to(device).eval(), x_dev, y_dev, attack, data.num_classes)

    from bdsan.sanitize.pipeline import sanitize

    if args.prune_curve:  # every count, and none reaches the floor, so the search walks them all
        from bdsan.sanitize import unlearn

        unlearn._doubling = lambda count: list(range(1, count + 1))
        params["fewest_z"] = "-1e9"
    trajectory = _watch_guard(lambda model: attack_metrics(model, x_dev, y_dev, attack, data.num_classes)) \
        if args.per_epoch else None
    started = time.perf_counter()
    from bdsan.detectors.triggers import DEFAULT_SUITE

    triggers = list(DEFAULT_SUITE) + [attack.build_trigger()] if args.known_trigger else None
    report = sanitize(backdoored.model, backdoored.holdout, args.defense, params, None, seed=args.seed, triggers=triggers,
                      device=device, max_acc_drop=args.max_acc_drop, fit_fraction=args.fit_fraction, flip=args.flip,
                      progress=lambda *a: None)
    seconds = time.perf_counter() - started
    data_out = report.to_dict()
    result = {"attack": attack.label, "defense": args.defense, "params": params, "fit_fraction": args.fit_fraction, "seconds": round(seconds, 1),
              "known_trigger": args.known_trigger,
              "before": dev(backdoored.model), "after": dev(report.defended),
              "rolled_back": bool((data_out["defense"].get("guard") or {}).get("rolled_back")),
              "augmentation": data_out["defense"].get("augmentation"),
              "selected": ((data_out["defense"].get("details") or {}).get("guard") or {}).get("selected")}
    if trajectory is not None:
        result["per_epoch"] = trajectory
    print(json.dumps(json_safe({k: result[k] for k in ("attack", "defense", "params", "known_trigger", "fit_fraction", "seconds",
                                                  "rolled_back", "selected", "augmentation")})))
    for phase in ("before", "after"):
        m = result[phase]
        print(f"  dev {phase:6s}: CA {100 * m['ca']:.1f}  ASR {100 * m['asr']:.1f}  RA {100 * m['ra']:.1f}  "
              f"target rate without trigger {100 * m['untriggered']:.1f}  "
              f"target recall {100 * m['target_recall']:.1f} (of {m['n_target']})")
    if args.sweep:
        result["sweep"] = _sweep(args.sweep, attack, [backdoored.model, report.defended], x_dev, y_dev,
                                 data.num_classes)
    if args.details:
        print(json.dumps(json_safe(data_out["defense"]["details"]), indent=1)[:6000])
    return result


def cached_model(args, device: torch.device):
    """(dataset, attack, backdoored model) for ``args.data/attack/recipe/epochs/augment/n_train/seed/cache``: the
    harness's cached model (trained and cached on a miss, exactly as run.py would)."""
    data = load_dataset(args.data)
    attack = Attack.parse(args.attack)
    recipe = recipe_with(args.recipe, args.epochs, args.augment)
    backdoored = train_backdoored(data, attack, recipe, n_train=args.n_train or None, seed=args.seed,
                                  device=device, cache_dir=args.cache)
    return data, attack, backdoored


def _watch_guard(measure) -> list[dict]:
    """Wrap ``FitValGuard.check`` so that every state a defense offers its guard is also measured on the development
    images (printed as it goes); the guard's own decisions are unchanged."""
    from bdsan.sanitize.guard import FitValGuard

    original = FitValGuard.check
    trajectory: list[dict] = []

    def check(self, model, label, objective=None, objective_se=0.0):
        accepted = original(self, model, label, objective, objective_se)
        m = measure(model)
        entry = self.history[-1]
        trajectory.append({"label": label, "accepted": accepted, "objective": objective,
                           "ca_fit_val": entry["ca_fit_val"], "ca": m["ca"], "asr": m["asr"],
                           "untriggered": m["untriggered"]})
        print(f"  {label:>9s}: dev CA {100 * m['ca']:.1f}  ASR {100 * m['asr']:.1f}  "
              f"fit-val CA {100 * entry['ca_fit_val']:.1f}  objective {objective if objective is None else round(objective, 3)}"
              f"{'' if accepted else '  (rejected)'}", flush=True)
        return accepted

    FitValGuard.check = check
    _watch_pruning(measure, trajectory)
    return trajectory


def _watch_pruning(measure, trajectory: list[dict]) -> None:
    """Wrap unlearn's pruning step the same way: each step of ``prune_schedule=fewest`` is measured too."""
    from bdsan.sanitize.unlearn import Unlearn, _mean_rate

    original = Unlearn._prune_step

    def step(*args, **kwargs):
        mask, rates = original(*args, **kwargs)
        m = measure(args[0])
        n = sum(len(c) for c in args[4].values())
        rate = _mean_rate(rates)[0]
        trajectory.append({"label": f"prune {n}", "target_rate_fit": rate, "ca": m["ca"], "asr": m["asr"]})
        print(f"  prune {n:>3d}: dev CA {100 * m['ca']:.1f}  ASR {100 * m['asr']:.1f}  "
              f"fit target rate {100 * rate:.2f}", flush=True)
        return mask, rates

    Unlearn._prune_step = staticmethod(step)


def _sweep(spec: str, attack: Attack, models: list, x_dev: torch.Tensor, y_dev: torch.Tensor, num_classes: int
           ) -> list[dict]:
    """ASR before/after with the attack's trigger at each value of one parameter (printed as it goes)."""
    key, _, values = spec.partition("=")
    rows = []
    for value in values.split(","):
        variant = replace(attack, params=tuple(sorted((dict(attack.params) | {key: float(value)}).items())))
        trigger = variant.build_trigger()
        asr = [attack_metrics(m.normalized().to(x_dev.device).eval(), x_dev, y_dev, attack, num_classes,
                              trigger=trigger)["asr"] for m in models]
        rows.append({key: float(value), "asr_before": asr[0], "asr_after": asr[1]})
        print(f"  sweep {key}={value}: ASR before {100 * asr[0]:.1f}  after {100 * asr[1]:.1f}")
    return rows


def _dev_images(data, dev: str, n_train: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The development images: a test slice, or ('rest') the training images outside the seeded subset."""
    if dev == "rest":
        if not n_train or n_train >= len(data.y_train):
            raise SystemExit("--dev rest needs --n-train smaller than the training split")
        train_index, holdout_index = split_training_subset(data, n_train, 0.05, seed)
        unused = torch.ones(len(data.y_train), dtype=torch.bool)
        unused[train_index] = False
        unused[holdout_index] = False
        return data.x_train[unused], data.y_train[unused]
    start, _, end = dev.partition(":")
    dev_slice = slice(int(start or 0), int(end) if end else None)
    return data.x_test[dev_slice], data.y_test[dev_slice]


if __name__ == "__main__":
    keep_freed_memory()  # as the CLI does (BENCHMARKS.md, "CPU memory allocator")
    main()
