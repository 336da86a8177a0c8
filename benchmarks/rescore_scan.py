"""Re-score stored scan results with another anomaly-index rule, without re-scanning.

The scan's per-class trigger sizes and held-out flip rates (``results.json`` of ``benchmarks/scan_detect.py``) do not
depend on the verdict, so index rules can be compared offline: choose on a development run, then report on the
evaluation run.

    python benchmarks/rescore_scan.py bench_out/scan-toy-dev/results.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scan_detect import roc_auc, tpr_at_fpr
from verdict_rules import kind_tables

from bdsan.detectors.scan import MAD_TO_SIGMA, ScanSettings, _anomaly_index, kind_verdict


def index_all(norms: np.ndarray, floor: float) -> np.ndarray:
    """The class inside its own reference (Neural Cleanse's rule, on log sizes; the scan's rule before 977eaa2)."""
    logs = np.log(np.maximum(norms, 1e-12))
    median = np.median(logs)
    return (median - logs) / max(MAD_TO_SIGMA * np.median(np.abs(logs - median)), floor)


# name: (index rule, MAD floor, size-gated score, size ratio of the verdict's size test)
RULES = {"all, floor 0.05": (index_all, 0.05, False, 0.5),
         "leave-one-out, floor 0.05": (_anomaly_index, 0.05, False, 0.5)}
RULES |= {f"leave-one-out, floor {f}": (_anomaly_index, f, False, 0.5) for f in (0.1, 0.2, 0.3, 0.5)}
RULES |= {f"all, floor {f}": (index_all, f, False, 0.5) for f in (0.1, 0.2, 0.3, 0.5)}
RULES["leave-one-out, floor 0.05, size-gated score"] = (_anomaly_index, 0.05, True, 0.5)
RULES |= {f"leave-one-out, floor 0.05, size ratio {r}": (_anomaly_index, 0.05, False, r)
          for r in (0.4, 0.35, 0.3, 0.25, 0.2)}


def rescore(run: dict, rule, floor: float, threshold: float = 2.0, flip_min: float = 0.5, ratio: float = 0.5,
            size_gated: bool = False):
    """(score, anomalous, suspected) of one stored run under ``rule``.

    ``size_gated``: the ranking score first takes classes that also pass the verdict's size test
    (norm ≤ ``ratio`` × median), and ranks the others 100 lower (the scan's score ignores the size test)."""
    best, flagged, suspected = -np.inf, False, None
    settings = ScanSettings(anomaly_threshold=threshold, flip_threshold=flip_min, max_norm_ratio=ratio,
                            blend_max_norm_ratio=ratio)
    for kind, (norms, flips) in kind_tables(run).items():
        _, anomalous, usable = kind_verdict(norms, flips, settings, index=rule(norms, floor), kind=kind)
        if size_gated:
            usable = np.where(norms <= ratio * np.median(norms), usable, usable - 100)
        if usable.max() > best:
            best, suspected = float(usable.max()), int(usable.argmax())
        flagged |= bool(anomalous.any())
    return (best if np.isfinite(best) else -10.0), flagged, suspected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files of scan_detect.py")
    args = parser.parse_args()
    runs = [r for path in args.results for r in json.loads(Path(path).read_text())]
    positives = [r for r in runs if r["backdoored"] and (r["implant_asr"] or 0) >= 0.5]
    negatives = [r for r in runs if not r["backdoored"]]
    print(f"{len(positives)} backdoored, {len(negatives)} clean")
    print("| rule | ROC-AUC | TPR@5%FPR | flagged backdoored (right target) | flagged clean |")
    print("|---|---|---|---|---|")
    for name, (rule, floor, gated, ratio) in RULES.items():
        pos = [rescore(r, rule, floor, ratio=ratio, size_gated=gated) for r in positives]
        neg = [rescore(r, rule, floor, ratio=ratio, size_gated=gated) for r in negatives]
        right = sum(f and s == r["target"] for (_, f, s), r in zip(pos, positives))
        print(f"| {name} | {roc_auc([p[0] for p in pos], [n[0] for n in neg]):.3f} "
              f"| {tpr_at_fpr([p[0] for p in pos], [n[0] for n in neg]):.2f} "
              f"| {sum(p[1] for p in pos)}/{len(pos)} ({right}) | {sum(n[1] for n in neg)}/{len(neg)} |")


if __name__ == "__main__":
    main()
