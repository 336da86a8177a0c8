"""Scan benchmark: does ``bdsan scan`` tell backdoored models from clean twins, without labelled references?

Toy/CPU scale: tiny_cnn on generated gratings (``bdsan.train.fixtures.train_toy_model``, 5 classes, 1000 training
images, 10% poison), several seeds × attacks — including triggers outside the suite (a random-colour patch in the
top-left corner, a random patch at a random position, a blend of unseen noise) — plus clean twins trained the same
way. Per model: the implanted trigger's real ASR on the clean holdout (models whose implant failed, ASR < 0.5, are
reported but left out of the positives), the scan verdict, its ranking score (max anomaly index over classes whose
reconstructed trigger flips ≥ 50% of held-out images) and its time. Detection: ROC-AUC of the score and TPR at
≤ 5% FPR, plus the verdict's own TPR/FPR. Each model is also audited with the built-in suite on the same holdout
(as ``audit --scan`` does), so the suite's largest ASR and the ``audit --scan`` gate are reported as detectors too.

CIFAR scale (``--data cifar10.npz``): the harness's models (``bdsan.train.zoo``, same recipe and cache as
``benchmarks/run.py``) for each ``--attacks`` entry — ``random_patch`` (a 4×4 random-colour patch at a seeded random
position), ``unseen_blend`` (a noise blend with a noise seed the suite does not use) and ``unseen_sine`` (SIG's sine
along the rows, 5 periods) are outside the suite — and
clean twins (poison rate 0, other seeds); the implant ASR is measured on ``x_test[:--test-n]``, the scan runs on the
model's 5% clean holdout, as ``bdsan scan MODEL --holdout H`` would.

``--defend`` (toy only) also runs ``unlearn``, ``ft`` and ``fmp`` on each backdoored model's fit split (via the method registry,
as the pipeline does) and measures CA and real-trigger ASR on a fresh generated test set.

    python benchmarks/scan_detect.py --seeds 0 1 --out bench_out/scan --threads 2 [--defend]
    python benchmarks/scan_detect.py --data /work/shared/data/cifar10.npz --seeds 0 --clean-per-seed 3 \
        --out bench_out/scan-cifar
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import time
from pathlib import Path

import extra_triggers  # noqa: F401  (registers the benchmark-only attacks)
import torch

from bdsan.allocator import keep_freed_memory
from bdsan.detectors.audit import audit, gate_max_asr
from bdsan.detectors.scan import ScanSettings, scan, scan_section
from bdsan.io.data import Holdout, split_holdout
from bdsan.train.fixtures import corner_square, top_left_patch, train_toy_model
from bdsan.train.loop import predict
from bdsan.train.synthetic import make_synthetic
from bdsan.train.zoo import AUGMENTS

NUM_CLASSES = 5


def random_patch(seed: int):
    """A 4×4 random-colour patch at a seeded random position (not in the suite)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    colours = (torch.rand(3, 4, 4, generator=generator) > 0.5).float()
    top, left = (int(v) for v in torch.randint(0, 28, (2,), generator=generator))

    def stamp(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, :, top:top + 4, left:left + 4] = colours.to(x)
        return x
    return stamp, {"top": top, "left": left}


def unseen_blend(x: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """Blend with uniform noise from a seed the suite does not use (4242)."""
    noise = torch.rand(1, 1, *x.shape[-2:], generator=torch.Generator().manual_seed(4242)).to(x)
    return (1 - alpha) * x + alpha * noise


def attacks(seed: int) -> list[tuple[str, object, int, dict]]:
    patch, where = random_patch(seed)
    return [("corner_square", corner_square, 0, {}), ("top_left_patch", top_left_patch, 2, {}),
            ("random_patch", patch, (seed + 1) % NUM_CLASSES, where), ("unseen_blend", unseen_blend, 1, {})]


def real_asr(model, holdout: Holdout, trigger, target: int) -> float:
    keep = holdout.y != target
    predicted = predict(model, holdout.x[keep], transform=trigger)
    return float((predicted == target).float().mean())


def roc_auc(positives: list[float], negatives: list[float]) -> float:
    """Probability a positive outranks a negative (ties count half)."""
    if not positives or not negatives:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def tpr_at_fpr(positives: list[float], negatives: list[float], max_fpr: float = 0.05) -> float:
    """Best TPR over thresholds whose FPR ≤ ``max_fpr`` (score > threshold is flagged)."""
    best = 0.0
    for threshold in sorted(set(positives + negatives + [float("-inf")])):
        fpr = sum(n > threshold for n in negatives) / max(1, len(negatives))
        if fpr <= max_fpr:
            best = max(best, sum(p > threshold for p in positives) / max(1, len(positives)))
    return best


def defend(toy, trigger, target: int, seed: int, methods: list[str]) -> dict:
    """Run each method on the fit split (as the pipeline would) and measure CA / real-trigger ASR on fresh data."""
    import copy

    from bdsan.sanitize.context import Context
    from bdsan.sanitize.registry import get_method

    test_x, test_y = make_synthetic(1000, NUM_CLASSES, 32, seed=seed + 2000)
    fit, _ = split_holdout(toy.holdout, 0.5, seed)
    rows = {}
    for name in ["none", *methods]:
        model = copy.deepcopy(toy.model).normalized()
        started = time.perf_counter()
        if name != "none":
            ctx = Context(device=torch.device("cpu"), seed=seed, batch_size=256, max_acc_drop=3.0)
            model = get_method(name).run(model, fit, ctx).model
        keep = test_y != target
        rows[name] = {"ca": float((predict(model, test_x) == test_y).float().mean()),
                      "asr": float((predict(model, test_x[keep], transform=trigger) == target).float().mean()),
                      "time_s": round(time.perf_counter() - started, 2)}
    return rows


def suite_gate(model, holdout: Holdout, args) -> dict:
    """The built-in suite on the scan's holdout, as ``audit --scan`` runs it: the largest ASR over triggers and
    targets, and whether the ``--max-asr`` gate fails on it."""
    result = audit(model, holdout, device=args.device)
    passed, failing, highest = gate_max_asr(result, args.max_asr)
    return {"suite_asr": round(highest, 4), "suite_failed": not passed, "suite_failing": failing}


def toy_jobs(seed: int, args):
    """Toy models of one seed: the four attacks, then the clean twins (each trained here, in seconds)."""
    jobs = [(name, trigger, target, where, 0.1) for name, trigger, target, where in attacks(seed)]
    jobs += [(f"clean{i}", None, None, {}, 0.0) for i in range(args.clean_per_seed)]
    for index, (name, trigger, target, where, rate) in enumerate(jobs):
        started = time.perf_counter()
        kwargs = {"trigger": trigger, "target": target} if trigger is not None else {}
        toy = train_toy_model(poison_rate=rate, seed=seed * 100 + index, **kwargs)
        asr = real_asr(toy.model.normalized(), toy.holdout, trigger, target) if trigger is not None else None
        yield {"attack": name, "target": target, "where": where, "model": toy.model, "holdout": toy.holdout,
               "implant_asr": asr, "train_s": round(time.perf_counter() - started, 1), "toy": toy, "trigger": trigger}


def zoo_attacks(seed: int, names: list[str]) -> list[str]:
    """The harness attacks plus, for ``random_patch``, a 4×4 random-colour patch at a seeded random position, for
    ``unseen_blend``, the noise blend with a noise seed the suite does not use and, for ``unseen_sine``, SIG's sine
    turned to run down the rows, with 5 periods (the suite's and the sweep's sines run across the columns)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    top, left = (int(v) for v in torch.randint(0, 29, (2,), generator=generator))
    outside = {"random_patch": f"patch:side=4,top={top},left={left},content=random,seed={1000 + seed}",
               "unseen_blend": "blend_noise:seed=4242", "unseen_sine": "sig:axis=rows,frequency=5"}
    return [outside.get(name, name) for name in names]


def zoo_jobs(seed: int, args, data):
    """Harness models (``bdsan.train.zoo``, cached) of one seed: each attack, then clean twins (poison rate 0)."""
    from bdsan.train.zoo import Attack, attack_metrics, recipe_with, train_backdoored

    recipe = recipe_with(args.recipe, args.epochs, args.augment)
    specs = [(text, 0.1, seed) for text in zoo_attacks(seed, args.attacks)]
    specs += [("badnets_grid", 0.0, seed + 100 * (i + 1)) for i in range(args.clean_per_seed)]
    for text, rate, model_seed in specs:
        attack = Attack.parse(text, rate=rate, target=args.target)
        backdoored = train_backdoored(data, attack, recipe, n_train=args.n_train or None, seed=model_seed,
                                      cache_dir=args.cache or None)
        model = backdoored.model
        model.module.eval()
        asr = None
        if rate > 0:
            n = args.test_n or len(data.y_test)
            asr = attack_metrics(model.normalized(), data.x_test[:n], data.y_test[:n], attack, data.num_classes)["asr"]
        yield {"attack": attack.label if rate > 0 else f"clean (seed {model_seed})",
               "target": attack.target if rate > 0 else None, "where": dict(attack.params), "model": model,
               "holdout": backdoored.holdout, "implant_asr": asr, "train_s": round(backdoored.train_seconds, 1)}


def add_probe_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """The options of a probe over cached harness models (``wave_probe.py``, ``noise_probe.py``): which seeds and
    attacks, trained as by this script."""
    parser.add_argument("--data")
    parser.add_argument("--seed-attacks", nargs="+", default=[], metavar="SEED:ATTACK,ATTACK",
                        help=f"e.g. {example} (the attacks scan_detect.py trained)")
    parser.add_argument("--clean-per-seed", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="as scan_detect.py --epochs (GTSRB: 40)")
    parser.add_argument("--augment", default=None, help="as scan_detect.py --augment (crop-trained GTSRB: crop)")
    parser.add_argument("--n-train", type=int, default=20000, help="as scan_detect.py --n-train (GTSRB: 0)")
    parser.add_argument("--test-n", type=int, default=2000, help="as scan_detect.py --test-n (GTSRB: 2275)")
    parser.add_argument("--cache", default=".cache/bdsan-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)


def split_attacks(text: str) -> list[str]:
    """``blend_noise,sig:axis=rows,frequency=5`` → the attack texts: a comma starts a new attack only where a name
    follows it (``name``, ``name:…``), not a parameter (``key=value``)."""
    return [n for n in re.split(r",(?=[A-Za-z_]\w*(?::|,|$))", text) if n]


def probe_jobs(args, data):
    """(seed, job) for every model of ``args.seed_attacks`` and its clean twins (:func:`zoo_jobs`, cached)."""
    for entry in args.seed_attacks:
        seed_text, _, names = entry.partition(":")
        seed = int(seed_text)
        job_args = argparse.Namespace(recipe="cpu", epochs=args.epochs, augment=args.augment,
                                      attacks=split_attacks(names), n_train=args.n_train,
                                      clean_per_seed=args.clean_per_seed, target=0, cache=args.cache,
                                      test_n=args.test_n)
        for job in zoo_jobs(seed, job_args, data):
            yield seed, job


def scan_run(job: dict, seed: int, args) -> dict:
    """Scan one model (and, with ``--defend`` on a toy model that implanted, run the defenses): its results row."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    kinds = ({"kinds": tuple(args.kinds)} if args.kinds else {}) | ({"keep": args.keep} if args.keep else {})
    if args.blend_ratio is not None:
        kinds["blend_max_norm_ratio"] = args.blend_ratio
    if args.mix_ratio is not None:
        kinds["mix_max_norm_ratio"] = args.mix_ratio
    if args.noise_channels:
        kinds["noise_channels"] = tuple(args.noise_channels)
    section = scan_section(scan(job["model"], job["holdout"], steps=args.steps, seed=seed, device=args.device,
                                precision=args.precision, **kinds))
    scan_wall, scan_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    scores = [s for s in section["score"] if s is not None]
    run = {"seed": seed, "attack": job["attack"], "target": job["target"], "where": job["where"],
           "backdoored": job["target"] is not None, "implant_asr": job["implant_asr"],
           "train_s": job["train_s"], "scan_wall_s": round(scan_wall, 1), "scan_cpu_s": round(scan_cpu, 1),
           "score": max(scores) if scores else -10.0, "anomalous": section["anomalous"],
           "suspected_target": section["suspected_target"], "anomalous_classes": section["anomalous_classes"],
           "anomalous_kinds": section["anomalous_kinds"], "steps_run": section["steps_run"],
           "bf16": section.get("bf16"),
           "mask_l1": section.get("mask_l1"), "patch_index": section.get("anomaly_index"),
           "patch_flip": section.get("flip_rate"), "blend": section.get("blend"), "mix": section.get("mix"),
           "wave": section.get("wave"),
           "noise": section.get("noise")}
    asr = job["implant_asr"]
    if args.defend and "toy" in job and asr is not None and asr >= 0.5:
        run["defenses"] = defend(job["toy"], job["trigger"], job["target"], seed, args.methods)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="toy", help="'toy' (generated gratings, tiny_cnn) or a benchmark .npz "
                                                      "(harness models: --recipe, --n-train, cached)")
    parser.add_argument("--attacks", nargs="*", default=["badnets_grid", "blend_noise", "sig", "trojan_patch",
                                                         "random_patch", "unseen_blend"],
                        help="with --data NPZ: harness attacks; random_patch/unseen_blend/unseen_sine are outside "
                             "the suite "
                             "(none: only the clean twins)")
    parser.add_argument("--recipe", default="cpu")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (as run.py --epochs)")
    parser.add_argument("--augment", choices=sorted(AUGMENTS), default=None,
                        help="override the recipe's training augmentation (as run.py --augment)")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--test-n", type=int, default=2000, help="test images for the implant ASR (--data NPZ)")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--cache", default=".cache/bdsan-bench")
    parser.add_argument("--steps", type=int, default=200, help="scan steps")
    parser.add_argument("--kinds", nargs="+", default=None, help="scan kinds (default: the scan's default)")
    parser.add_argument("--noise-channels", type=int, nargs="+", default=None,
                        help="the noise kind's forms by channels drawn (1 grey, 3 colour; default: ScanSettings')")
    parser.add_argument("--keep", default=None, choices=("after-step", "measured"),
                        help="the scan's ScanSettings.keep: which trigger tensors a successful batch keeps (default: "
                             "the scan's, measured; after-step before 2026-12-04)")
    parser.add_argument("--mix-ratio", type=float, default=None,
                        help="the mix kind's size test, ScanSettings.mix_max_norm_ratio")
    parser.add_argument("--blend-ratio", type=float, default=None,
                        help="the blend kind's size test, ScanSettings.blend_max_norm_ratio (default: the scan's, 0.3)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="the scan's precision (auto: bf16 on CUDA and on CPUs with native bf16)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--clean-per-seed", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_out/scan"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--defend", action="store_true", help="toy only: also run --methods on each backdoored model")
    parser.add_argument("--methods", nargs="+", default=["unlearn", "ft", "fmp"])
    parser.add_argument("--max-asr", type=float, default=0.2, help="the suite gate of `audit --scan` (its default)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a results.json of an earlier run: models it holds (same seed and attack) are not "
                             "scanned again, its scan fields are kept and only the suite audit is added")
    parser.add_argument("--train-only", action="store_true",
                        help="only train (and cache) the models, scanning nothing: a blind seed's models can be made "
                             "before its verdict rule is fixed")
    parser.add_argument("--summarise", type=Path, default=None, metavar="RESULTS_JSON",
                        help="only print the summary of an earlier run's results.json (nothing is trained or scanned)")
    args = parser.parse_args()
    if args.summarise:
        args.out = args.summarise.parent
        summarise(json.loads(args.summarise.read_text()), args)
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    earlier = {(r["seed"], r["attack"]): r for r in json.loads(args.reuse.read_text())} if args.reuse else {}
    if args.data != "toy":
        from bdsan.train.zoo import load_dataset
        data = load_dataset(args.data)
    for seed in args.seeds:
        for job in (toy_jobs(seed, args) if args.data == "toy" else zoo_jobs(seed, args, data)):
            if args.train_only:
                print(json.dumps({"attack": job["attack"], "seed": seed, "train_s": job["train_s"]}), flush=True)
                continue
            suite = suite_gate(job["model"], job["holdout"], args)
            key = (seed, job["attack"])
            run = (earlier[key] if key in earlier else scan_run(job, seed, args)) | suite
            runs.append(run)
            print(json.dumps({k: run[k] for k in ("attack", "seed", "implant_asr", "score", "anomalous",
                                                  "suspected_target", "suite_asr", "scan_wall_s", "scan_cpu_s")}
                             | ({"defenses": run["defenses"]} if "defenses" in run else {})), flush=True)
            (args.out / "results.json").write_text(json.dumps(runs, indent=1))
    if not args.train_only:
        summarise(runs, args)


def verdict_first_score(run: dict) -> float:
    """The scan's verdict, then its score: every model the scan flags ranks above every model it does not (the
    wave kind flags without an anomaly index; BENCHMARKS.md, "the best plane wave")."""
    return run["score"] + 1000.0 * run["anomalous"]


def gate_margin(run: dict, max_asr: float, anomaly_threshold: float) -> float:
    """How far past its limit the most-exceeded gate of ``audit --scan`` is: max(suite ASR / ``max_asr``, scan score
    / ``anomaly_threshold``), read from the report's gates (value / limit); > 1 means the gate fails there. It has
    no parameter of its own: both limits are the product's defaults."""
    return max(run["suite_asr"] / max_asr, run["score"] / anomaly_threshold)


def gate_summary(positives: list[dict], negatives: list[dict], max_asr: float) -> str:
    """``audit --scan`` as a detector: the gate fails on the suite (largest ASR above ``max_asr``) or on the scan.
    Two rankings: the suite gate first, then the scan's score (every model the suite fails above every model it
    passes); and the gate margin (:func:`gate_margin`)."""
    def combined(r: dict) -> float:
        return r["score"] + 1000.0 * r["suite_failed"]

    def flagged(r: dict) -> bool:
        return r["suite_failed"] or r["anomalous"]

    threshold = ScanSettings().anomaly_threshold
    pos, neg = [combined(r) for r in positives], [combined(r) for r in negatives]
    margin = ([gate_margin(r, max_asr, threshold) for r in positives],
              [gate_margin(r, max_asr, threshold) for r in negatives])
    suite_pos = sum(r["suite_failed"] for r in positives)
    suite_neg = sum(r["suite_failed"] for r in negatives)
    suite = [r["suite_asr"] for r in positives], [r["suite_asr"] for r in negatives]
    return "\n".join([
        (f"audit --scan (suite gate --max-asr {max_asr:g}, then the scan): ROC-AUC {roc_auc(pos, neg):.3f}, "
         f"TPR at ≤5% FPR {tpr_at_fpr(pos, neg):.2f}; gate fails on {sum(map(flagged, positives))}/"
         f"{len(positives)} backdoored, {sum(map(flagged, negatives))}/{len(negatives)} clean "
         f"(suite alone: {suite_pos}/{len(positives)} and {suite_neg}/{len(negatives)})"),
        (f"audit --scan gate margin (max of suite ASR / {max_asr:g}, scan score / {threshold:g}): "
         f"ROC-AUC {roc_auc(*margin):.3f}, TPR at ≤5% FPR {tpr_at_fpr(*margin):.2f}; backdoored "
         f"{_span(margin[0])}, clean {_span(margin[1])}"),
        f"suite max ASR as the score: ROC-AUC {roc_auc(*suite):.3f}, TPR at ≤5% FPR {tpr_at_fpr(*suite):.2f}"])


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}" if values else "none"


def summarise(runs: list[dict], args) -> None:
    positives = [r for r in runs if r["backdoored"] and (r["implant_asr"] or 0) >= 0.5]
    failed = [r for r in runs if r["backdoored"] and (r["implant_asr"] or 0) < 0.5]
    negatives = [r for r in runs if not r["backdoored"]]
    pos, neg = [r["score"] for r in positives], [r["score"] for r in negatives]
    verdict_first = [verdict_first_score(r) for r in positives], [verdict_first_score(r) for r in negatives]
    lines = [(f"date {dt.datetime.now(dt.timezone.utc).isoformat(timespec='minutes')}, "
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads"),
             "", ("| attack | seed | implant ASR | score | anomalous (kinds) | best wave flip | suspected (target) "
                  "| suite max ASR | scan wall s | scan CPU s |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        asr = "—" if r["implant_asr"] is None else f"{r['implant_asr']:.2f}"
        wave = r.get("wave") and max(r["wave"]["flip_rate"])
        kinds = ", ".join(sorted({kind for found in r.get("anomalous_kinds", {}).values() for kind in found}))
        lines.append(f"| {r['attack']} | {r['seed']} | {asr} "
                     f"| {r['score']:.2f} | {r['anomalous']} ({kinds}) "
                     f"| {'—' if not wave else f'{wave:.2f}'} | {r['suspected_target']} ({r['target']}) "
                     f"| {r.get('suite_asr', '—')} | {r['scan_wall_s']} | {r['scan_cpu_s']} |")
    correct = sum(r["anomalous"] and r["suspected_target"] == r["target"] for r in positives)
    lines += ["", (f"backdoored (implant ASR ≥ 0.5): {len(positives)}, failed implants: {len(failed)}, "
                   f"clean: {len(negatives)}"),
              f"ROC-AUC (score): {roc_auc(pos, neg):.3f}; TPR at ≤5% FPR: {tpr_at_fpr(pos, neg):.2f}",
              (f"ROC-AUC (verdict first, then score): {roc_auc(*verdict_first):.3f}; "
               f"TPR at ≤5% FPR: {tpr_at_fpr(*verdict_first):.2f}"),
              (f"verdict: flagged {sum(r['anomalous'] for r in positives)}/{len(positives)} backdoored "
               f"({correct} with the right target), {sum(r['anomalous'] for r in negatives)}/{len(negatives)} clean"),
              (f"scan time per model: median wall {sorted(r['scan_wall_s'] for r in runs)[len(runs) // 2]} s, "
               f"median CPU {sorted(r['scan_cpu_s'] for r in runs)[len(runs) // 2]} s")]
    if all("suite_failed" in r for r in runs):
        lines += [gate_summary(positives, negatives, args.max_asr)]
    defended = [r for r in runs if "defenses" in r]
    if defended:
        lines += ["", "| attack | seed | " + " | ".join(f"{m} CA / ASR" for m in defended[0]["defenses"]) + " |",
                  "|---|---|" + "---|" * len(defended[0]["defenses"])]
        for r in defended:
            lines.append(f"| {r['attack']} | {r['seed']} | " + " | ".join(
                f"{v['ca']:.3f} / {v['asr']:.3f}" for v in r["defenses"].values()) + " |")
    text = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    keep_freed_memory()  # as the CLI does (BENCHMARKS.md, "CPU memory allocator")
    main()
