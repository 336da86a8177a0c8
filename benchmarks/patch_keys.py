"""Where the scan's patch reconstructions lie relative to a real patch trigger (BENCHMARKS.md "Keys of a patch the
suite does not know").

For one cached harness model backdoored with a ``patch:`` attack: the scan (patch kind, the defenses' settings) on
the fit half of its holdout, then ``further_patch_keys`` toward the scan's suspected class — each key barred from
the pixels of the earlier ones — and for every reconstruction its mask size, the share of its mask inside the real
patch and within 2 px of it, its strongest pixels, and the share of the development images (``--dev``, as
``probe.py``) of other classes it sends to that class, next to the real patch's.

    python benchmarks/patch_keys.py --data /work/shared/data/cifar10.npz --seed 1 --n-train 45000 --epochs 20 \\
        --attack "patch:side=4,top=21,left=13,content=random,seed=1010" --keys 5
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from bdsan.allocator import keep_freed_memory
from bdsan.detectors.keys import further_patch_keys
from bdsan.detectors.scan import scan
from bdsan.io.data import split_holdout, to_float
from bdsan.train.zoo import RECIPES, Attack, load_dataset, train_backdoored


def describe(mask: torch.Tensor, top: int, left: int, side: int) -> dict:
    """A 1×1×H×W mask against the real patch's box: size, shares inside / within 2 px, strongest pixels."""
    m = mask[0, 0].cpu()
    near = m[max(0, top - 2):top + side + 2, max(0, left - 2):left + side + 2].sum()
    strongest = m.flatten().topk(6)
    return {"mask_l1": round(float(m.sum()), 2),
            "inside": round(float(m[top:top + side, left:left + side].sum() / m.sum()), 3),
            "within_2px": round(float(near / m.sum()), 3),
            "strongest": [(int(i) // m.shape[1], int(i) % m.shape[1], round(float(v), 2))
                          for v, i in zip(strongest.values, strongest.indices)]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--attack", required=True, help="a patch: attack, as run.py's --attacks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=20000, help="training subset size (0 = the whole split)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--recipe", default="cpu", choices=sorted(RECIPES))
    parser.add_argument("--dev", default="5000:7000", help="development slice, or 'rest' as probe.py")
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cache", default=".cache/bdsan-bench")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from probe import _dev_images  # benchmarks/ is on sys.path when this file runs as a script

    data = load_dataset(args.data)
    attack = Attack.parse(args.attack)
    params = dict(attack.params)
    top, left, side = int(params["top"]), int(params["left"]), int(params["side"])
    recipe = RECIPES[args.recipe] if args.epochs is None else replace(RECIPES[args.recipe], epochs=args.epochs)
    backdoored = train_backdoored(data, attack, recipe, n_train=args.n_train or None, seed=args.seed,
                                  device=torch.device("cpu"), cache_dir=args.cache)
    model = backdoored.model
    fit, _ = split_holdout(backdoored.holdout, 0.5, args.seed)  # the pipeline's fit half
    x_dev, y_dev = _dev_images(data, args.dev, args.n_train, args.seed)
    result = scan(model, fit, steps=args.steps, seed=args.seed, device="cpu", kinds=("patch",), keep="after-step",
                  max_norm_ratio=0.3)
    target = result["suspected_target"]
    first = next(t for t in result["reconstructed"] if t.params["target"] == target)
    keys = further_patch_keys(model, fit, first, args.keys, steps=args.steps, seed=args.seed, device="cpu")
    x = to_float(x_dev[y_dev != target])
    net = model.normalized().eval()
    rows = []
    with torch.no_grad():
        for trigger in [first, *keys] + [attack.build_trigger()]:
            rate = float((net(trigger.apply(x)).argmax(1) == target).float().mean())
            row = {"trigger": trigger.name, "dev_rate": round(rate, 3)}
            if getattr(trigger.fn, "parts", None) is not None:
                row |= describe(trigger.fn.parts["mask"], top, left, side)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    keep_freed_memory()
    main()
