"""Benchmark harness: backdoored models (trained and cached) × defenses through the real sanitize pipeline.

For every seed and attack it trains (or loads from the cache) a backdoored model on a subset of the dataset's
training split, with a clean holdout (never poisoned) carved out of that subset; every defense then runs through
``bdsan.sanitize.pipeline.sanitize`` — the code path of ``bdsan sanitize`` — and the model it writes is evaluated on
the dataset's **test** split with the **attack's own trigger** (CA, ASR, RA; SPEC §4 conventions). The suite audit
of the pipeline's verify split is recorded beside it. Nothing here reads the test split before evaluation.

Writes ``results.json`` (every run, after each one), ``results.md`` (mean ± std over seeds) and ``asr.png``.

    python benchmarks/run.py --data /work/shared/data/cifar10.npz --recipe cpu --n-train 10000 \\
        --attacks badnets_grid blend_noise sig trojan_patch wanet --defenses none ft fmp --out bench_out/cifar10
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import extra_triggers  # noqa: F401  (registers the benchmark-only attacks)
import torch

from bdsan.allocator import keep_freed_memory
from bdsan.charts import bar_chart
from bdsan.device import describe_device, resolve_device
from bdsan.io.data import stratified_split
from bdsan.report import defense_trigger_sources, json_safe
from bdsan.sanitize.mirror import FLIP_MODES
from bdsan.train.zoo import (
    AUGMENTS,
    RECIPES,
    Attack,
    Dataset,
    attack_metrics,
    load_dataset,
    synthetic_dataset,
    train_backdoored,
)

log = logging.getLogger("bdsan.bench")

METRICS = ("ca", "asr", "ra", "untriggered", "target_recall")


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return describe_device(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def parse_params(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``["fmp.rank_images=64"]`` → ``{"fmp": {"rank_images": "64"}}``."""
    params: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--param {pair!r}: expected method.key=value")
        params.setdefault(method, {})[name] = value
    return params


def split_defense(spec: str, params: dict[str, dict[str, str]]) -> tuple[str, dict[str, str]]:
    """``fmp:recipe=paper`` → ``("fmp", {...--param fmp.* ..., "recipe": "paper"})``: one method, several rows."""
    method, _, extra = spec.partition(":")
    merged = dict(params.get(method, {}))
    for pair in filter(None, extra.split(",")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--defenses {spec!r}: expected NAME[:key=value,...]")
        merged[key.strip()] = value.strip()
    return method, merged


def load_defenses(defenses: list[str], params: dict[str, dict[str, str]]) -> None:
    """Build every requested method once before any model trains: a misspelt name or parameter fails in seconds,
    not after an hour of training, and the method modules are imported from the code as it is at the start (a
    file edited while a model trains is not picked up half-way)."""
    import bdsan.sanitize.pipeline
    import bdsan.train.trap
    from bdsan.errors import UsageError
    from bdsan.sanitize.registry import get_method

    for defense in defenses:
        if defense != "none":
            method, method_params = split_defense(defense, params)
            try:
                if method == TRAP_TRAIN:
                    trap, method_params = split_trap_params(method_params)
                    bdsan.train.trap.TrapSettings(**trap)
                    method = "trap-replace"
                get_method(method, **method_params)
            except (UsageError, ValueError, TypeError) as exc:
                raise SystemExit(f"--defenses {defense!r}: {exc}") from None


TRAP_TRAIN = "trap-train"  # not a sanitize method: a trapped twin trained on the same poisoned data, then replaced
TRAP_FIELDS = ("recon_weight", "tv_weight", "stem_ce_scale", "stem_end")


def split_trap_params(params: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """``trap-train``'s parameters: the trap stage's (``TRAP_FIELDS``, typed) and the replace stage's (the rest, and
    ``stem_end``: both stages cut the network at the same place)."""
    trap = {k: (v if k == "stem_end" else float(v)) for k, v in params.items() if k in TRAP_FIELDS}
    return trap, {k: v for k, v in params.items() if k not in TRAP_FIELDS or k == "stem_end"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True,
                        help="benchmark .npz (x_train/y_train/x_test/y_test) or 'synthetic' (generated gratings)")
    parser.add_argument("--attacks", nargs="+", default=["badnets_grid"],
                        help="suite triggers, each NAME[:all2all|clean_label][:key=value,...]")
    parser.add_argument("--rate", type=float, default=0.1, help="poison rate (fraction of the training subset)")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--defenses", nargs="+", default=["none", "ft", "fmp"],
                        help="methods, each NAME[:key=value,...] (e.g. fmp:recipe=paper beside fmp)")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="defense hyper-parameter, e.g. fmp.rank_images=64")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument("--arch", default=None, help="override the recipe's architecture")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's peak learning rate")
    parser.add_argument("--train-batch-size", type=int, default=None, help="override the recipe's batch size")
    parser.add_argument("--augment", choices=sorted(AUGMENTS), default=None,
                        help="override the recipe's training augmentation: crop+flip, or crop alone (datasets "
                             "with mirror-image class pairs, GTSRB)")
    parser.add_argument("--flip", choices=FLIP_MODES, default="auto",
                        help="sanitize's flip: may the defense's augmentation flip images (auto: the mirror check)")
    parser.add_argument("--n-train", type=int, default=0, help="training subset size (0 = the whole split)")
    parser.add_argument("--holdout-fraction", type=float, default=0.05,
                        help="clean holdout = this fraction of the training subset, never poisoned")
    parser.add_argument("--holdout-n", type=int, default=0,
                        help="give the defenses only a stratified N-image subset of the holdout (0 = all), e.g. "
                             "200 of a 20,000-image subset = a 1%% holdout on the same cached models")
    parser.add_argument("--test-n", type=int, default=0, help="evaluate on the first N test images (0 = all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-asr", type=float, default=0.2)
    parser.add_argument("--max-acc-drop", type=float, default=3.0)
    parser.add_argument("--fit-fraction", type=float, default=0.5,
                        help="share of the holdout the defenses fit on, the rest verifies (sanitize --fit-fraction)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=256, help="pipeline batch size (audits, defenses)")
    parser.add_argument("--out", default="bench_out", help="directory for results.json, results.md, asr.png")
    parser.add_argument("--cache", default=".cache/bdsan-bench", help="backdoored-model cache ('' = none)")
    parser.add_argument("--synthetic-n", type=int, default=1000, help="training images for --data synthetic")
    parser.add_argument("--synthetic-classes", type=int, default=5)
    return parser


def run_defense(backdoored, defense: str, params: dict, args, device: torch.device, seed: int) -> dict:
    """One defense through the real pipeline; returns the sanitized model and what the report says."""
    from bdsan.io.models import load_model
    from bdsan.sanitize.pipeline import sanitize

    model = copy.deepcopy(backdoored.model)
    with tempfile.TemporaryDirectory(prefix="bdsan-bench-") as tmp:
        out_dir = Path(tmp) / "out"
        started = time.perf_counter()
        report = sanitize(model, backdoored.holdout, defense, params, out_dir, max_asr=args.max_asr,
                          max_acc_drop=args.max_acc_drop, seed=seed, device=device, fit_fraction=args.fit_fraction,
                          flip=args.flip)
        seconds = time.perf_counter() - started
        data = report.to_dict()
        defense_info = data.get("defense") or {}
        weights = [a["path"] for a in data["artifacts"] if str(a["path"]).endswith(".safetensors")
                   and not a.get("role")]  # the sanitized model, not a copy of the input
        if weights:
            path = Path(weights[0]) if Path(weights[0]).is_absolute() else out_dir / weights[0]
            sanitized = load_model(path)
            sanitized.module.to(device).eval()
        elif (defense_info.get("guard") or {}).get("rolled_back"):
            sanitized = backdoored.model  # the guard rolled back: what the user keeps is the input model
        else:
            raise RuntimeError(f"{defense}: the pipeline wrote no .safetensors ({data['artifacts']})")
    rolled_back = bool((defense_info.get("guard") or {}).get("rolled_back"))
    return {"model": sanitized, "unguarded_model": report.defended if rolled_back else None, "seconds": seconds, "exit_code": data["exit_code"],
            "timings_s": data["timings_s"], "gates": data["gates"],
            "holdout_split": {k: data["holdout"][k] for k in ("fit", "verify")},
            "guard": defense_info.get("guard"), "params": defense_info.get("params"),
            "augmentation": defense_info.get("augmentation"),
            "suite_before": _suite_summary(data.get("audit_before")),
            "suite_after": _suite_summary(data.get("audit_after")),
            "details_summary": _details_summary(defense_info.get("details") or {}),
            "known_triggers": [{k: e.get(k) for k in ("name", "suspected_target", "asr_net")}  # the fit audit's
                               for e in (defense_info.get("fit_audit") or {}).get("known_triggers") or []]}


def limit_holdout(backdoored, holdout_n: int, seed: int) -> None:
    """``--holdout-n``: give the defenses only a stratified ``holdout_n``-image subset of the model's holdout."""
    holdout = backdoored.holdout
    if holdout_n and holdout_n < len(holdout):
        keep, _ = stratified_split(holdout.y.cpu(), holdout_n / len(holdout), seed, holdout.num_classes)
        backdoored.holdout = holdout.subset(keep.to(holdout.y.device))


def trapped_twin(data: Dataset, attack: Attack, recipe, args, device: torch.device, seed: int, trap: dict):
    """The stage-1 Trap and Replace model on the same poisoned data, recipe and holdout as the backdoored model
    (cached like it), and ``{"trapped": its test metrics …}`` for the row (whose "before" stays the normal model's,
    so the CA drop is against normal training, SPEC §7)."""
    log.info("[seed %d] %s: training the trapped twin", seed, attack.label)
    trapped = train_backdoored(data, attack, recipe, n_train=args.n_train or None,
                               holdout_fraction=args.holdout_fraction, seed=seed, device=device,
                               cache_dir=args.cache or None, trap=trap)
    trapped.model.module.to(device).eval()
    limit_holdout(trapped, args.holdout_n, seed)
    metrics = evaluate(trapped.model, data, attack, args.test_n)
    log.info("[seed %d] %s: trapped twin CA %.3f ASR %.3f (train %.0fs%s)", seed, attack.label, metrics["ca"],
             metrics["asr"], trapped.train_seconds, ", cached" if trapped.from_cache else "")
    return trapped, {"trapped": {"metrics": metrics, "train_seconds": trapped.train_seconds,
                                 "model_key": trapped.key, "from_cache": trapped.from_cache,
                                 "details": trapped.details}}


def _suite_summary(audit: dict | None) -> dict | None:
    """The pipeline's verify-split suite audit, reduced to CA and the strongest trigger."""
    if not audit:
        return None
    triggers = audit.get("triggers") or []
    strongest = max(triggers, key=lambda t: t.get("asr_max") or 0.0, default=None)
    return {"ca": audit.get("ca"), "n": audit.get("n"),
            "max_asr": strongest.get("asr_max") if strongest else None,
            "max_trigger": strongest.get("name") if strongest else None}


def _details_summary(details: dict) -> dict:
    """What the tables need from a defense's details: sizes, pruning, and the state its guard kept."""
    keep = ("n_pruned", "n_channels", "fit_train", "fit_val", "statistics")
    summary = {k: details[k] for k in keep if k in details}
    if isinstance(details.get("guard"), dict) and "selected" in details["guard"]:
        summary["selected"] = details["guard"]["selected"]
        summary["guard_history"] = [{k: h[k] for k in ("label", "ca_fit_val", "objective", "objective_se", "accepted")
                                     if k in h} for h in details["guard"].get("history") or []]
    if isinstance(details.get("finetune"), dict) and "known_trigger_fraction" in details["finetune"]:  # FMP
        summary["stamped_fraction"] = details["finetune"]["known_trigger_fraction"]
    if details.get("epochs"):  # the per-epoch log of unlearn, D-BR, trap-replace
        summary["epochs"] = details["epochs"]
    if isinstance(details.get("pruned"), dict):
        summary["pruned"] = {k: details["pruned"][k] for k in ("n_pruned", "target_rate_fit", "untriggered_rate_fit",
                                                               "at_floor", "by_trigger") if k in details["pruned"]}
    sources, scan = defense_trigger_sources(details)
    if sources:  # which triggers the defense used, and where each came from
        summary["triggers"] = sources
    if scan is not None:
        summary["scan"] = {k: scan[k] for k in ("suspected_target", "anomalous_kinds", "wave", "keys", "roam",
                                                  "seconds") if k in scan}
    return summary


def evaluate(model, data: Dataset, attack: Attack, test_n: int) -> dict:
    x, y = data.x_test, data.y_test
    if test_n:
        x, y = x[:test_n], y[:test_n]
    network = model.normalized()
    device = next(network.parameters()).device
    return attack_metrics(network, x.to(device), y.to(device), attack, data.num_classes)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = (synthetic_dataset(args.synthetic_n, max(200, args.synthetic_n // 2), args.synthetic_classes)
            if args.data == "synthetic" else load_dataset(args.data))
    recipe = RECIPES[args.recipe]
    overrides = {k: v for k, v in {"arch": args.arch, "epochs": args.epochs, "lr": args.lr,
                                   "batch_size": args.train_batch_size,
                                   "augment": AUGMENTS.get(args.augment)}.items() if v is not None}
    recipe = replace(recipe, **overrides)
    attacks = [Attack.parse(text, rate=args.rate, target=args.target) for text in args.attacks]
    params = parse_params(args.param)
    load_defenses(args.defenses, params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"schema": "bdsan.bench/1", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]) if args.argv is None
               else "python benchmarks/run.py " + " ".join(args.argv),
               "machine": machine_description(device), "torch": torch.__version__, "dataset": data.name,
               "dataset_fingerprint": data.fingerprint, "recipe": recipe.__dict__, "n_train": args.n_train,
               "holdout_fraction": args.holdout_fraction, "holdout_n": args.holdout_n, "test_n": args.test_n or len(data.y_test),
               "max_asr": args.max_asr, "max_acc_drop": args.max_acc_drop, "fit_fraction": args.fit_fraction,
               "params": params, "runs": []}
    for seed in args.seeds:
        for attack in attacks:
            log.info("[seed %d] %s: training %s", seed, attack.label, recipe.arch)
            backdoored = train_backdoored(data, attack, recipe, n_train=args.n_train or None,
                                          holdout_fraction=args.holdout_fraction, seed=seed, device=device,
                                          cache_dir=args.cache or None)
            backdoored.model.module.to(device).eval()
            limit_holdout(backdoored, args.holdout_n, seed)
            before = evaluate(backdoored.model, data, attack, args.test_n)
            log.info("[seed %d] %s: CA %.3f ASR %.3f RA %.3f (train %.0fs%s)", seed, attack.label, before["ca"],
                     before["asr"], before["ra"], backdoored.train_seconds, ", cached" if backdoored.from_cache else "")
            base = {"seed": seed, "attack": attack.label, "attack_config": attack.to_dict(), "model_key": backdoored.key,
                    "train_seconds": backdoored.train_seconds, "from_cache": backdoored.from_cache,
                    "poisoned": backdoored.poisoned, "holdout": len(backdoored.holdout),
                    "precision": backdoored.details.get("precision") or backdoored.config["recipe"]["precision"],
                    "before": before}
            for defense in args.defenses:
                if defense == "none":
                    results["runs"].append({**base, "defense": "none", "after": before, "defense_seconds": 0.0})
                else:
                    log.info("[seed %d] %s: %s …", seed, attack.label, defense)
                    try:
                        method, method_params = split_defense(defense, params)
                        defended, trap_info = backdoored, {}
                        if method == TRAP_TRAIN:
                            trap, method_params = split_trap_params(method_params)
                            defended, trap_info = trapped_twin(data, attack, recipe, args, device, seed, trap)
                            method = "trap-replace"
                        outcome = run_defense(defended, method, method_params, args, device, seed)
                    except Exception as exc:  # a failing defense is a result, not the end of the benchmark
                        log.exception("%s failed", defense)
                        results["runs"].append({**base, "defense": defense, "error": f"{type(exc).__name__}: {exc}"})
                        write_outputs(results, out)
                        continue
                    after = evaluate(outcome.pop("model"), data, attack, args.test_n)
                    unguarded = outcome.pop("unguarded_model")
                    if unguarded is not None:  # what the defense produced before the guard rejected it
                        outcome["after_unguarded"] = evaluate(unguarded, data, attack, args.test_n)
                        log.info("[seed %d] %s: %s (rolled back) had reached CA %.3f ASR %.3f", seed, attack.label,
                                 defense, outcome["after_unguarded"]["ca"], outcome["after_unguarded"]["asr"])
                    log.info("[seed %d] %s: %s → CA %.3f ASR %.3f RA %.3f (%.0fs, exit %s)", seed, attack.label,
                             defense, after["ca"], after["asr"], after["ra"], outcome["seconds"],
                             outcome["exit_code"])
                    results["runs"].append({**base, "defense": defense, "after": after,
                                            "defense_seconds": outcome.pop("seconds"), **outcome, **trap_info})
                write_outputs(results, out)
    write_outputs(results, out)
    return results


# --- outputs ---------------------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _mean_std_text(mean_std: tuple[float, float | None], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std
    if math.isnan(mean):
        return "—"
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def summarize(results: dict) -> list[dict]:
    """One row per (attack, defense), over seeds, in run order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in results["runs"]:
        groups.setdefault((run["attack"], run["defense"]), []).append(run)
    rows = []
    for (attack, defense), runs in groups.items():
        ok = [r for r in runs if "after" in r]
        row = {"attack": attack, "defense": defense, "seeds": [r["seed"] for r in runs],
               "errors": [r["error"] for r in runs if "error" in r]}
        for when in ("before", "after"):
            for metric in METRICS:
                row[f"{metric}_{when}"] = _mean_std([r[when].get(metric) for r in ok])
        row["train_seconds"] = _mean_std([r["train_seconds"] for r in runs])  # a cached model's: from its meta.json
        row["train_cached"] = any(r["from_cache"] for r in runs)
        row["defense_seconds"] = _mean_std([r["defense_seconds"] for r in ok])
        row["suite_max_asr_after"] = _mean_std([(r.get("suite_after") or {}).get("max_asr") for r in ok])
        unguarded = [r["after_unguarded"] for r in ok if r.get("after_unguarded")]
        row["unguarded_ca"] = _mean_std([u["ca"] for u in unguarded])
        row["unguarded_asr"] = _mean_std([u["asr"] for u in unguarded])
        row["rolled_back"] = sum(bool((r.get("guard") or {}).get("rolled_back")) for r in ok)
        row["exit_codes"] = [r.get("exit_code", 0) for r in ok]
        rows.append(row)
    return rows


def render_markdown(results: dict) -> str:
    lines = [f"Dataset `{results['dataset']}`, {results['recipe']['arch']} ({results['recipe']['epochs']} epochs), "
             f"training subset {results['n_train'] or 'all'}, holdout {100 * results['holdout_fraction']:g}% of it"
             + (f" (defenses given {results['holdout_n']} of those images)" if results.get("holdout_n") else "")
             + (f", fit fraction {results['fit_fraction']:g}" if results.get("fit_fraction", 0.5) != 0.5 else "") + ", "
             f"test images {results['test_n']}; seeds {sorted({r['seed'] for r in results['runs']})}.",
             f"Machine: {results['machine']}. Created {results['created']}.", "",
             ("CA / ASR / RA in % on the test split with the attack's own trigger (mean ± std over seeds). "
              "Suite ASR = strongest suite trigger in the pipeline's verify-split audit after the defense. "
              "Defense s = whole `sanitize` pipeline (audits, defense, export, export audit)."), "",
             ("| attack | defense | CA before | CA after | ASR before | ASR after | RA before | RA after "
              "| suite ASR after | train s | defense s | notes |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = summarize(results)
    for run_row in summary:
        row = {k: v for k, v in run_row.items()}

        def cell(key: str, scale: float = 100.0, digits: int = 1, row: dict = row) -> str:
            return _mean_std_text(row[key], scale, digits)

        notes = []
        if row["errors"]:
            notes.append("failed: " + "; ".join(row["errors"])[:120])
        if row["rolled_back"]:
            reached = (f" (had reached CA {cell('unguarded_ca')}, ASR {cell('unguarded_asr')})"
                       if not math.isnan(row["unguarded_ca"][0]) else "")
            notes.append(f"rolled back ×{row['rolled_back']}{reached}")
        if any(code not in (0, None) for code in row["exit_codes"]):
            notes.append("exit " + ",".join(str(c) for c in row["exit_codes"]))
        suite = "—" if row["defense"] == "none" else cell("suite_max_asr_after")
        train = cell("train_seconds", 1, 0) + (" (cached)" if row["train_cached"] else "")
        lines.append(f"| {row['attack']} | {row['defense']} | {cell('ca_before')} | {cell('ca_after')} | "
                     f"{cell('asr_before')} | {cell('asr_after')} | {cell('ra_before')} | {cell('ra_after')} | "
                     f"{suite} | {train} | {cell('defense_seconds', 1, 0)} | "
                     f"{' '.join(notes)} |")
    lines += ["", ("Untriggered = non-target test images predicted as the target *without* the trigger (no trigger "
                   "removal goes below it); target recall = CA on the target class's own test images."), "",
              "| attack | defense | untriggered before | untriggered after | target recall before | target recall after |",
              "|---|---|---|---|---|---|"]
    for row in summary:
        cells = [_mean_std_text(row[key]) for key in ("untriggered_before", "untriggered_after", "target_recall_before",
                                                   "target_recall_after")]
        lines.append(f"| {row['attack']} | {row['defense']} | " + " | ".join(cells) + " |")
    trapped = [r for r in results["runs"] if r.get("trapped")]
    if trapped:
        lines += ["", ("Trapped twins (`trap-train`, stage 1 only: the same poisoned data and recipe plus the "
                       "reconstruction decoder), test split, per seed:"), "",
                  "| seed | attack | normal CA | trapped CA | trapped ASR | trapped untriggered | trapped train s |",
                  "|---|---|---|---|---|---|---|"]
        for run in trapped:
            m = run["trapped"]["metrics"]
            lines.append(f"| {run['seed']} | {run['attack']} | {100 * run['before']['ca']:.1f} | {100 * m['ca']:.1f} | "
                         f"{100 * m['asr']:.1f} | {100 * m['untriggered']:.1f} | "
                         f"{run['trapped']['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out: Path) -> None:
    from bdsan.atomic import write_text_atomic

    rows = summarize(results)
    results = {**results, "summary": [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()} for row in rows]}
    write_text_atomic(out / "results.json", json.dumps(json_safe(results), indent=2) + "\n")
    write_text_atomic(out / "results.md", render_markdown(results))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    if attacks:
        series = []
        for defense in defenses:
            values = []
            for attack in attacks:
                match = [r for r in rows if r["attack"] == attack and r["defense"] == defense]
                mean = match[0]["asr_after"][0] if match else math.nan
                values.append(None if math.isnan(mean) else mean)
            label = "none (backdoored)" if defense == "none" else defense
            series.append((label, values))
        bar_chart(out / "asr.png", attacks, series, ylabel="ASR (attack trigger, test split)",
                  title=f"ASR before (none) and after each defense — {results['dataset']}, {results['recipe']['arch']}",
                  limit=results["max_asr"], limit_label=f"gate {100 * results['max_asr']:g}%")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("bdsan").setLevel(logging.INFO)
    return run(args)


if __name__ == "__main__":
    keep_freed_memory()  # as the CLI does (BENCHMARKS.md, "CPU memory allocator")
    main()
