"""Compare scan verdict rules offline on stored scans (the wave kind included), without re-scanning.

``rescore_scan.py`` compares anomaly-*index* rules for the optimised kinds; this compares *verdict* rules: the size
test's ratio per kind, whether two kinds pointing at the same class suffice, the wave kind's threshold, edge rule and
structure control. The per-class trigger sizes, flip rates, wave flips, edge ratios and shuffled-wave flips in
``results.json``
(``benchmarks/scan_detect.py``) do not depend on the verdict. Choose a rule on
development scans, write it down, then report it on scans of models it was not chosen on.

    python benchmarks/verdict_rules.py bench_out/scan-cifar-dev10-measured/results.json --detail
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scan_detect import roc_auc, tpr_at_fpr

from bdsan.detectors.noise import noise_verdict
from bdsan.detectors.scan import ScanSettings, _anomaly_index, kind_verdict, suspect_among
from bdsan.detectors.waves import wave_verdict


@dataclass(frozen=True)
class Rule:
    """A verdict: per-kind size ratios (``None``: no size test) and the two-kinds-agree clause."""

    patch_ratio: float | None = ScanSettings.max_norm_ratio
    blend_ratio: float | None = ScanSettings.blend_max_norm_ratio
    agree: bool = False  # also anomalous: patch and blend both give the class index > threshold and flip ≥ 0.5
    wave_edge: float | None = ScanSettings.wave_edge_ratio  # the wave kind's edge rule (scans that stored edge ratios)
    wave_threshold: float = ScanSettings.wave_threshold
    wave_scrambled: float | None = ScanSettings.wave_scrambled_max  # the structure control (scans that stored it)
    wave_sink_edge: float | None = ScanSettings.wave_sink_edge_min  # a sink's response is not tuned: edge ratio ≥
    noise: float | None = ScanSettings.noise_threshold  # the noise kind (scans that stored its takes; None: off)


_DEFAULT = ScanSettings()
RULES = {f"scan default (size ≤ {_DEFAULT.max_norm_ratio:g} (patch) and {_DEFAULT.blend_max_norm_ratio:g} (blend)"
         f"·median; wave flip ≥ {_DEFAULT.wave_threshold:g}, edge rule {_DEFAULT.wave_edge_ratio:g}, shuffled wave < "
         f"{_DEFAULT.wave_scrambled_max:g} or edge ratio < {_DEFAULT.wave_sink_edge_min:g}; noise kind: fresh noise "
         f"blended at {_DEFAULT.noise_weight:g} takes ≥ {_DEFAULT.noise_threshold:g})": Rule(),
         "without the noise kind (the default before 2026-12-07 midday)": Rule(noise=None),
         "wave: structure control by the shuffled flip alone (2026-12-05 to blind GTSRB seed 4)": Rule(
             wave_sink_edge=None),
         "wave: no structure control (the wave rule before 2026-12-05)": Rule(wave_scrambled=None),
         "patch size ≤ 0.3·median (before seed 13)": Rule(patch_ratio=0.3),
         "blend size ≤ 0.5·median": Rule(blend_ratio=0.5),
         "blend size ≤ 0.75·median": Rule(blend_ratio=0.75),
         "blend without size test": Rule(blend_ratio=None),
         "two kinds agree (size tests waived then)": Rule(agree=True),
         "wave: no edge rule": Rule(wave_edge=None),
         "wave: flip ≥ 0.95": Rule(wave_threshold=0.95),
         "wave: flip ≥ 0.95, no edge rule (the wave rule before 2026-12-04 evening)": Rule(
             wave_edge=None, wave_threshold=0.95, wave_scrambled=None),
         "all as before 2026-12-04 evening (patch 0.3, wave ≥ 0.95, no edge rule)": Rule(
             patch_ratio=0.3, wave_edge=None, wave_threshold=0.95, wave_scrambled=None, noise=None)}


def kind_tables(run: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(sizes, held-out flips) per optimised kind of one stored scan."""
    tables = {}
    if run.get("mask_l1"):
        tables["patch"] = np.asarray(run["mask_l1"]), np.asarray(run["patch_flip"])
    if run.get("blend"):
        tables["blend"] = np.asarray(run["blend"]["mean_abs_delta"]), np.asarray(run["blend"]["flip_rate"])
    return tables


def verdict(run: dict, rule: Rule) -> tuple[float, set[int], int | None]:
    """(ranking score, anomalous classes, suspect) of one stored scan under ``rule``, through the scan's own
    :func:`kind_verdict`; the score is the scan's (the largest index among classes whose trigger flips ≥ the flip
    threshold) and so is the suspect (among flagged classes the highest per-class score, then the best wave)."""
    cfg = ScanSettings(max_norm_ratio=math.inf if rule.patch_ratio is None else rule.patch_ratio,
                       blend_max_norm_ratio=math.inf if rule.blend_ratio is None else rule.blend_ratio,
                       wave_edge_ratio=rule.wave_edge, wave_threshold=rule.wave_threshold,
                       wave_scrambled_max=rule.wave_scrambled, wave_sink_edge_min=rule.wave_sink_edge,
                       noise_threshold=ScanSettings.noise_threshold if rule.noise is None else rule.noise)
    flagged: set[int] = set()
    evidence = {}
    tables = kind_tables(run)
    waves = np.asarray(run["wave"]["flip_rate"]) if run.get("wave") else None
    num_classes = len(waves) if waves is not None else len(next(iter(tables.values()))[0])
    scores = np.full(num_classes, -np.inf)
    for kind, (norms, flips) in tables.items():
        index, anomalous, ranking = kind_verdict(norms, flips, cfg, kind=kind)
        evidence[kind] = (index > cfg.anomaly_threshold) & (flips >= cfg.flip_threshold)
        flagged |= set(np.nonzero(anomalous)[0].tolist())
        scores = np.maximum(scores, ranking)
    if rule.agree and len(evidence) == 2:
        flagged |= set(np.nonzero(evidence["patch"] & evidence["blend"])[0].tolist())
    if waves is not None:
        flagged |= set(np.nonzero(wave_verdict(waves, run["wave"].get("edge_ratio"), cfg,
                                               run["wave"].get("scrambled_flip_rate"))[0])[0].tolist())
    if rule.noise is not None and run.get("noise"):
        flagged |= set(np.nonzero(noise_verdict(run["noise"]["take"], cfg))[0].tolist())
    suspect = suspect_among(flagged, scores, waves if waves is not None else np.zeros(num_classes)) if flagged else None
    score = float(scores.max()) if np.isfinite(scores).any() else -10.0
    return score, flagged, suspect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files of scan_detect.py")
    parser.add_argument("--detail", action="store_true", help="per model: each kind's target-class statistics")
    parser.add_argument("--structure", action="store_true",
                        help="per model: the wave kind's structure control (target, strongest other wave class)")
    parser.add_argument("--noise", action="store_true", help="per model: the noise kind's takes (target, other)")
    parser.add_argument("--noise-from", nargs="*", default=[], type=Path,
                        help="noise_probe.py --scan-noise files: the scan's noise kind for stored scans made "
                             "before it (matched by seed and attack)")
    args = parser.parse_args()
    runs = [r for path in args.results for r in json.loads(Path(path).read_text())]
    probed = {(row["seed"], row["attack"]): row["scan_noise"] for path in args.noise_from
              for row in json.loads(path.read_text()) if "scan_noise" in row}
    runs = [run if run.get("noise") else run | {"noise": probed.get((run["seed"], run["attack"]))} for run in runs]
    if args.detail:
        print_detail(runs)
    if args.structure:
        print_structure(runs)
    if args.noise:
        print_noise(runs)
    print_rules(runs)


def print_rules(runs: list[dict]) -> None:
    """The table of :data:`RULES` over stored scans: ROC-AUC with flagged models first, TPR, verdicts."""
    positives = [r for r in runs if r["backdoored"] and (r["implant_asr"] or 0) >= 0.5]
    negatives = [r for r in runs if not r["backdoored"]]
    print(f"{len(positives)} backdoored, {len(negatives)} clean")
    print("| rule | ROC-AUC verdict first | TPR@5%FPR | flagged backdoored (suspect = target) | flagged clean |")
    print("|---|---|---|---|---|")
    for name, rule in RULES.items():
        pos = [verdict(r, rule) for r in positives]
        neg = [verdict(r, rule) for r in negatives]
        first = [s + 1000.0 * bool(f) for s, f, _ in pos], [s + 1000.0 * bool(f) for s, f, _ in neg]
        right = sum(suspect == r["target"] for (_, _, suspect), r in zip(pos, positives))
        print(f"| {name} | {roc_auc(*first):.3f} | {tpr_at_fpr(*first):.2f} "
              f"| {sum(bool(f) for _, f, _ in pos)}/{len(pos)} ({right}) "
              f"| {sum(bool(f) for _, f, _ in neg)}/{len(neg)} |")


def print_detail(runs: list[dict]) -> None:
    """Per model and optimised kind: the class with the largest index, its index, flip and size ÷ median."""
    print("| model | kind | top class | index | flip | size ÷ median | 2nd index | best wave (class) |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        waves = np.asarray(run["wave"]["flip_rate"]) if run.get("wave") else None
        wave = "—" if waves is None else f"{waves.max():.3f} ({int(waves.argmax())})"
        for kind, (norms, flips) in kind_tables(run).items():
            index = _anomaly_index(norms)
            order = np.argsort(-index)
            top = int(order[0])
            print(f"| {run['attack']} | {kind} | {top} | {index[top]:.2f} | {flips[top]:.2f} "
                  f"| {norms[top] / np.median(norms):.2f} | {index[order[1]]:.2f} | {wave} |")


def print_structure(runs: list[dict]) -> None:
    """Per model: the target's wave flip and shuffled-wave flip, the other class with the strongest wave (flip,
    shuffled flip, edge ratio), and the sum of the shuffled-wave flips over all classes with the target's share."""
    print("| model | target: wave / shuffled | strongest other class: wave / shuffled (edge ratio) "
          "| shuffled sum | target's share |")
    print("|---|---|---|---|---|")
    for run in runs:
        wave = run.get("wave") or {}
        if wave.get("scrambled_flip_rate") is None:
            continue
        flips, shuffled = np.asarray(wave["flip_rate"]), np.asarray(wave["scrambled_flip_rate"])
        ratios, target = np.asarray(wave["edge_ratio"]), run["target"] if run["backdoored"] else None
        others = np.where(np.arange(len(flips)) == target, -1.0, flips)
        other = int(others.argmax())
        cell = "—" if target is None else f"{flips[target]:.3f} / {shuffled[target]:.3f}"
        share = "—" if target is None else f"{shuffled[target] / max(shuffled.sum(), 1e-9):.2f}"
        print(f"| {run['attack']} | {cell} | {other}: {flips[other]:.3f} / {shuffled[other]:.3f} "
              f"({ratios[other]:.2f}) | {shuffled.sum():.2f} | {share} |")


def print_noise(runs: list[dict]) -> None:
    """Per model that stored the noise kind: the target's take and the largest take of any other class."""
    print("| model | noise take: target | largest take of any other class |")
    print("|---|---|---|")
    for run in runs:
        if not run.get("noise"):
            continue
        takes, target = np.asarray(run["noise"]["take"]), run["target"] if run["backdoored"] else None
        others = np.where(np.arange(len(takes)) == target, -1.0, takes)
        cell = "—" if target is None else f"{takes[target]:.3f}"
        print(f"| {run['attack']} | {cell} | {others.max():.3f} (class {int(others.argmax())}) |")


if __name__ == "__main__":
    main()
