"""Wave probe: every plane wave's flip rates, per class, on the scan's held-out split, at several amplitudes.

The scan's ``wave`` kind keeps, per class, only the wave that flipped most of its selection images and reports that
wave's held-out flip. This probe keeps the whole table (wave × class, selection and held-out images, in the scan's precision) for the
harness models of each ``--seed-attacks`` entry and its clean twins (cached: nothing is trained when
``scan_detect.py`` made them), so rules on frequency or amplitude can be compared offline on development seeds before
a blind one is read. ``--analyse`` prints the edge rule's comparison (:func:`analyse`).

    PYTHONPATH=benchmarks python benchmarks/wave_probe.py --data /work/shared/data/cifar10.npz \
        --seed-attacks 8:sig,unseen_sine 10:blend_noise,unseen_blend,sig,unseen_sine --out bench_out/wave-probe.json
    PYTHONPATH=benchmarks python benchmarks/wave_probe.py --analyse --out bench_out/wave-probe.json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scan_detect import add_probe_arguments, probe_jobs
from verdict_rules import print_rules

from bdsan.detectors.scan import ScanSettings, _split_for_scan, _torch_classifier, scrambled_flip_rates
from bdsan.detectors.waves import (
    WAVES_PER_FREQUENCY,
    best_waves,
    plane_waves,
    wave_name,
    wave_rates,
    wave_verdict,
)
from bdsan.detectors.waves import edge_ratios as scan_edge_ratios
from bdsan.device import channels_last, wants_bf16
from bdsan.io.data import to_float


def tables_at(net, opt, held, amplitude: float, cfg: ScanSettings, num_classes: int, bf16: bool) -> dict:
    """The selection (``wave_select`` optimisation images) and held-out tables of every wave at ``amplitude``/255."""
    waves = amplitude / 255 * plane_waves(*held.x.shape[2:], cfg.wave_periods)
    cpu = torch.device("cpu")
    select = wave_rates(net, to_float(opt.x[:cfg.wave_select]), opt.y[:cfg.wave_select], waves, num_classes, 512,
                        cpu, bf16)
    flips = wave_rates(net, to_float(held.x), held.y, waves, num_classes, 512, cpu, bf16)
    return {"select": select.tolist(), "held": flips.tolist()}


def scrambled_at_scan_amplitude(net, opt, held, table: dict, cfg: ScanSettings, num_classes: int, seed: int,
                                bf16: bool) -> list[float]:
    """The scan's structure control for each class's best wave (by selection, at the scan's amplitude)."""
    delta = best_waves(torch.tensor(table["select"]), held.x.shape[1:], cfg)
    return scrambled_flip_rates(net, delta, held, num_classes, 512, torch.device("cpu"), bf16, seed)


def wave_scores(table: dict, edge_ratio: float | None) -> np.ndarray:
    """Per class, the held-out flip of its best wave by selection (as the scan's wave kind), or 0 where the edge
    rule calls the response texture: the class's best wave at the band's top frequency selects ≥ ``edge_ratio`` of
    what its best wave selects (a response still rising at the edge of the band; ``None``: no edge rule)."""
    select, held = np.asarray(table["select"]), np.asarray(table["held"])
    scores = held[select.argmax(0), np.arange(select.shape[1])]
    _, texture, _ = wave_verdict(scores, edge_ratios(table), replace(ScanSettings(), wave_edge_ratio=edge_ratio))
    return np.where(texture, 0.0, scores)


def edge_ratios(table: dict) -> np.ndarray:
    """The scan's :func:`bdsan.detectors.waves.edge_ratios` of a stored selection table."""
    return scan_edge_ratios(torch.tensor(table["select"])).numpy()


def analyse(rows: list[dict], amplitude: str) -> None:
    """Print, per rule, the wave-kind scores of the wave backdoors' targets against every other class's, and the
    edge ratios of the targets and of every other class whose best wave flips ≥ 0.8 of held-out images."""
    target_ratios, texture = [], []
    for row in rows:
        ratios, flips = edge_ratios(row["tables"][amplitude]), wave_scores(row["tables"][amplitude], None)
        for cls, (ratio, flip) in enumerate(zip(ratios, flips)):
            if row["target"] is not None and "sig" in row["attack"] and cls == row["target"]:
                target_ratios.append(round(float(ratio), 3))
            elif flip >= 0.8:
                texture.append((round(float(ratio), 3), round(float(flip), 3), row["seed"], row["attack"], cls))
    print(f"edge ratios: wave targets {sorted(target_ratios)}; other classes flipping ≥ 0.8: "
          f"{sorted(t[:2] for t in texture)} (classes {sorted({t[4] for t in texture})})")
    for edge_ratio in (None, 1.0, 0.95, 0.9, 0.8):
        targets, others = [], []
        for row in rows:
            scores = wave_scores(row["tables"][amplitude], edge_ratio)
            wave_attack = row["target"] is not None and "sig" in row["attack"]
            for cls, score in enumerate(scores):
                (targets if wave_attack and cls == row["target"] else others).append((score, row["seed"],
                                                                                      row["attack"], cls))
        low, high = min(targets), max(others)
        print(f"edge ratio {edge_ratio}: wave targets {min(t[0] for t in targets):.3f}–{max(t[0] for t in targets):.3f}"
              f" (lowest: seed {low[1]} {low[2]}), other classes ≤ {high[0]:.3f} (seed {high[1]} {high[2]} class "
              f"{high[3]}); above 0.95: {sum(o[0] >= 0.95 for o in others)}, 0.9: {sum(o[0] >= 0.9 for o in others)}")


def with_probe_fields(runs: list[dict], rows: list[dict]) -> list[dict]:
    """Stored scans with the probe's edge ratios and structure control (at the scan's amplitude) added to wave
    sections that lack them (scans before those rules): the same numbers the scan now computes (same selection and
    held-out images, same precision, same shuffles)."""
    amplitude = str(ScanSettings.wave_amplitude * 255)
    probe = {(row["seed"], row["attack"]): {"edge_ratio": edge_ratios(row["tables"][amplitude]).tolist()}
             | ({"scrambled_flip_rate": row["scrambled"]} if "scrambled" in row else {}) for row in rows}
    return [run | {"wave": probe.get((run["seed"], run["attack"]), {}) | run["wave"]} if run.get("wave") else run
            for run in runs]


def merged_probes(paths: list[Path]) -> list[dict]:
    """The rows of several probe files, one per (seed, attack); a model's later rows add their fields."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        for row in json.loads(path.read_text()):
            key = (row["seed"], row["attack"])
            merged[key] = merged.get(key, {}) | row
    return list(merged.values())


def print_structure(rows: list[dict]) -> None:
    """The structure control of the wave targets and of every other class whose best wave flips ≥ 0.8."""
    amplitude = str(ScanSettings.wave_amplitude * 255)
    targets, others = [], []
    for row in rows:
        if "scrambled" not in row:
            continue
        flips, ratios = wave_scores(row["tables"][amplitude], None), edge_ratios(row["tables"][amplitude])
        for cls, (flip, ratio, scrambled) in enumerate(zip(flips, ratios, row["scrambled"])):
            entry = (round(scrambled, 3), round(float(flip), 3), round(float(ratio), 2), row["seed"], row["attack"],
                     cls)
            if row["target"] is not None and "sig" in row["attack"] and cls == row["target"]:
                targets.append(entry)
            elif flip >= 0.8:
                others.append(entry)
    print("structure control (shuffled-wave flip, wave flip, edge ratio, seed, attack, class):")
    print("  wave targets:", sorted(targets, reverse=True))
    print("  other classes flipping ≥ 0.8:", sorted(others))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(parser, "8:sig,unseen_sine 10:blend_noise,sig")
    parser.add_argument("--amplitudes", type=float, nargs="+", default=[32.0], help="in 1/255")
    parser.add_argument("--analyse", action="store_true", help="only print the rules' comparison of --out")
    parser.add_argument("--also", nargs="*", default=[], type=Path,
                        help="with --analyse: more probe files; a model in several gets the fields of all (the later "
                             "file's rows added, e.g. a structure-control probe of some of --out's models)")
    parser.add_argument("--results", nargs="*", default=[], type=Path,
                        help="with --analyse: scan_detect.py results.json of the same models, scanned before the edge "
                             "rule; their verdict rules (verdict_rules.py) are printed with the probe's edge ratios")
    args = parser.parse_args()
    if args.analyse:
        rows = merged_probes([args.out, *args.also])
        for amplitude in rows[0]["tables"]:
            print(f"amplitude {amplitude}/255, {len(rows)} models")
            analyse(rows, amplitude)
        print_structure(rows)
        if args.results:
            print_rules(with_probe_fields([r for path in args.results for r in json.loads(path.read_text())], rows))
        return
    torch.set_num_threads(args.threads)
    from bdsan.train.zoo import load_dataset
    data = load_dataset(args.data)
    cfg = ScanSettings()
    bf16 = wants_bf16(torch.device("cpu"), cfg.precision)
    rows = []
    for seed, job in probe_jobs(args, data):
        started = time.perf_counter()
        opt, held = _split_for_scan(job["holdout"], cfg.eval_fraction, seed)
        net = _torch_classifier(job["model"], torch.device("cpu"))
        with channels_last(net):
            tables = {str(a): tables_at(net, opt, held, a, cfg, job["model"].num_classes, bf16)
                      for a in args.amplitudes}
            scan_table = tables.get(str(cfg.wave_amplitude * 255)) or tables_at(
                net, opt, held, cfg.wave_amplitude * 255, cfg, job["model"].num_classes, bf16)
            scrambled = scrambled_at_scan_amplitude(net, opt, held, scan_table, cfg, job["model"].num_classes,
                                                    seed, bf16)
        rows.append({"seed": seed, "attack": job["attack"], "target": job["target"],
                     "implant_asr": job["implant_asr"], "bf16": bf16, "tables": tables, "scrambled": scrambled,
                     "wave_names": [wave_name(i) for i in range(WAVES_PER_FREQUENCY * cfg.wave_periods)]})
        print(seed, job["attack"], round(time.perf_counter() - started, 1), "s", flush=True)
        args.out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
