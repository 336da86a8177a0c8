"""The sanitize flow shared by every method (SPEC §1, §3–§5; STYLE "the pipeline owns the flow").

split holdout → audit before (verify) → fit-split audit (known triggers) → method.run (fit only) → audit after
(verify) → guard (roll back when CA fell too far) → export ONNX + safetensors into an atomic directory → audit
the exported ONNX with onnxruntime → gates judged on the artifact that ships → report.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

import torch

from ..atomic import atomic_dir, write_text_atomic
from ..device import describe_device, resolve_device
from ..errors import EXIT_GATE, EXIT_OK, GateFailed, ModelRefused, OutputError, RunFailed, UsageError
from ..io.data import Holdout, split_holdout
from ..io.models import LoadedModel, sha256_file
from ..io.preprocess import Normalized, Preprocessing
from ..report import Report, render_json
from .context import Context
from .guard import verify_check
from .mirror import FLIP_MODES, resolve_flip
from .registry import get_method

log = logging.getLogger("bdsan.sanitize")

KNOWN_TRIGGER_MIN_NET_ASR = 0.5


def verify_uncertainty(n: int) -> float:
    """About two standard errors (p = 0.5), in points, of an accuracy measured on ``n`` images: the report warns
    when this reaches ``--max-acc-drop`` (measured: a 4.9-point test-set drop read as 1.0 on a 100-image verify
    split, 3.1 read as 0.8 on 250 images; BENCHMARKS.md "1% holdout")."""
    return 100 / max(n, 1) ** 0.5


def sanitize(model: LoadedModel, holdout: Holdout, method: str, params: dict | None = None,
             out_dir: str | Path | None = None, *, max_asr: float = 0.2, max_acc_drop: float = 3.0, seed: int = 0,
             device: str | torch.device | None = None, force: bool = False, fit_fraction: float = 0.5,
             batch_size: int = 256, triggers: list | None = None, target: int | None = None,
             slim: bool | None = None, bake_preprocessing: bool = False, timings: dict | None = None,
             progress=None, command: str = "sanitize", details: dict | None = None,
             save_input: str | None = None, flip: str = "auto") -> Report:
    """Defend ``model`` with ``method`` on the fit split and prove the result on the verify split.

    ``out_dir`` receives ``model.onnx``, ``model.safetensors`` and ``report.json`` atomically (None: nothing is
    written, the ONNX audit is skipped). ``slim`` exports hard-pruned channels physically removed (default: when
    the method reports ``hard_pruned`` channels). The report's ``exit_code`` is 1 when a gate failed.
    ``command``/``details``: the report's command name and extra ``details`` (``bdsan trap-train`` runs its
    replace stage through here and records its training stage there); ``save_input``: also write the input model
    into ``out_dir`` under this file name (trap-train's stage-1 model exists nowhere else), after the artifacts.
    ``flip``: may the method's augmentation flip images horizontally — ``on``, ``off``, or ``auto``: only when the
    input model is as accurate on flipped fit images as on the originals (``mirror.resolve_flip``; GTSRB's
    mirror-image sign pairs are why).
    """
    device = resolve_device(device)
    timings_s = dict(timings or {})
    total_start = time.perf_counter()
    method_obj = get_method(method, **(params or {}))  # usage errors before any work
    if flip not in FLIP_MODES:
        raise UsageError(f"flip must be one of {', '.join(FLIP_MODES)}, got {flip!r}")
    if model.module is None:
        raise ModelRefused(f"{model.path}: ONNX models can be audited and exported, not defended",
                           hint="give the PyTorch weights (safetensors / .pt) to sanitize")
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        check_output(out_path, force, model, holdout)
    from ..detectors.audit import audit
    from ..detectors.triggers import resolve_triggers

    report = Report(command, seed=seed, device=describe_device(device), details=dict(details or {}))
    report.model = model.info()
    trigger_objects = resolve_triggers(triggers)

    with _phase(timings_s, "split"):
        holdout = holdout.to(device)
        fit, verify = split_holdout(holdout, fit_fraction, seed)
    if verify_uncertainty(len(verify)) >= max_acc_drop:
        needed = (f"{int((100 / max_acc_drop) ** 2) + 1} or more verify images" if max_acc_drop > 0
                  else "many more verify images")
        report.warnings.append(
            f"the verify split has only {len(verify)} images: the clean-accuracy drop it measures is uncertain by "
            f"about ±{verify_uncertainty(len(verify)):.0f} points, as large as --max-acc-drop {max_acc_drop:g}; "
            f"{needed} (a larger holdout) make the guard and the gates trustworthy")
    report.holdout = {"path": holdout.path, "n": len(holdout), "fit": len(fit), "verify": len(verify),
                      "fit_fraction": fit_fraction, "classes": list(holdout.classes),
                      "fit_class_counts": fit.class_counts(), "verify_class_counts": verify.class_counts()}

    with _phase(timings_s, "audit_before"):
        report.audit_before = audit(model, verify, triggers=trigger_objects, target=target, batch_size=batch_size,
                                    device=device)
    with _phase(timings_s, "fit_audit"):
        fit_audit = audit(model, fit, triggers=trigger_objects, target=target, batch_size=batch_size, device=device)
    by_name = {t.name: t for t in trigger_objects}
    evidence = [{"name": t["name"], "params": t["params"], "suspected_target": t["suspected_target"],
                 "asr_net": t["asr_net"], "asr_max": t["asr_max"]}
                for t in fit_audit["triggers"] if (t.get("asr_net") or 0.0) >= KNOWN_TRIGGER_MIN_NET_ASR]
    input_module = model.module
    working = Normalized(copy.deepcopy(input_module), model.preprocessing).to(device)
    with _phase(timings_s, "mirror_check"):
        augmentation = resolve_flip(flip, working, fit, batch_size)
    ctx = Context(device=device, seed=seed, batch_size=batch_size, max_acc_drop=max_acc_drop,
                  progress=progress or _ProgressBars(),
                  known_triggers=[by_name[e["name"]] for e in evidence], trigger_evidence=evidence,
                  flip=augmentation["flip"])
    with _phase(timings_s, "defense"):
        try:
            result = method_obj.run(working, fit, ctx)
        except torch.cuda.OutOfMemoryError as exc:
            raise RunFailed(f"out of memory during {method}: {exc}", hint="try a smaller --batch-size") from exc
    defended = _as_loaded(model, result.model)
    report.defended = defended
    params_used = dataclasses.asdict(method_obj)

    with _phase(timings_s, "audit_after"):
        report.audit_after = audit(defended, verify, triggers=trigger_objects, target=target, batch_size=batch_size,
                                   device=device)
    guard = verify_check(report.audit_before["ca"], report.audit_after["ca"], max_acc_drop)
    guard["stage"] = "verify" if guard["rolled_back"] else None
    if result.guard is not None:
        guard["fit_val"] = result.guard
        if result.guard.get("rolled_back") and not guard["rolled_back"]:
            # the method's own guard kept no checkpoint: what it returns is the input model
            guard.update(rolled_back=True, stage="fit_val", drop_points=result.guard.get("max_drop_points", 0.0))
    shipped = defended
    if guard["rolled_back"]:
        log.warning("guard (%s split): clean accuracy fell %.1f points (limit %.1f); rolled back to the input "
                    "weights", guard["stage"].replace("_", "-"), guard["drop_points"], max_acc_drop)
        shipped = model
    report.defense = {"method": method, "params": params_used, "guard": guard, "details": result.details,
                      "fit_audit": {"known_triggers": evidence, "min_net_asr": KNOWN_TRIGGER_MIN_NET_ASR,
                                    "ca_fit": fit_audit["ca"]}, "augmentation": augmentation}

    if out_path is not None:
        _export(report, shipped, defended, result.details, verify, out_path, force, guard, timings_s, device,
                batch_size, seed, slim, bake_preprocessing, trigger_objects, target, max_asr, max_acc_drop,
                save_input=(model, save_input) if save_input else None)
    else:
        _gates(report, report.audit_after if not guard["rolled_back"] else report.audit_before, "audit_after",
               max_asr, max_acc_drop, guard)
    timings_s["total"] = time.perf_counter() - total_start
    report.timings_s = {k: round(v, 3) for k, v in timings_s.items()}
    report.exit_code = EXIT_OK if report.gates_passed else EXIT_GATE
    if out_path is not None:  # the copy inside DIR carries the final timings and exit code too
        write_text_atomic(out_path / "report.json", render_json(report))
    return report


def _export(report: Report, shipped: LoadedModel, defended: LoadedModel, details: dict, verify: Holdout,
            out_path: Path, force: bool, guard: dict, timings_s: dict, device, batch_size: int, seed: int,
            slim: bool | None, bake_preprocessing: bool, triggers: list, target: int | None, max_asr: float,
            max_acc_drop: float, save_input: tuple[LoadedModel, str] | None = None) -> None:
    """Write the artifacts into an atomic directory and audit the exported ONNX (skipped after a rollback)."""
    from ..detectors.audit import audit
    from ..exporters.safetensors import export_safetensors

    with atomic_dir(out_path, force=force) as tmp:
        judged, judged_on = (report.audit_before, "audit_before (rolled back: input weights)") \
            if guard["rolled_back"] else (report.audit_after, "audit_after")
        if not guard["rolled_back"]:
            extra = {"bdsan.sanitized_by": report.defense["method"]}
            with _phase(timings_s, "export"):
                st_path = export_safetensors(shipped, tmp / "model.safetensors", extra_metadata=extra)
                report.artifacts.append(_artifact(st_path, "safetensors"))
                onnx_artifact = _export_onnx(report, shipped, details, verify, tmp, device, batch_size, seed, slim,
                                             bake_preprocessing, extra)
            if onnx_artifact is not None:
                onnx_file = tmp / "model.onnx"
                onnx_model = LoadedModel(None, shipped.arch, shipped.num_classes, shipped.preprocessing, "onnx",
                                         str(out_path / "model.onnx"), onnx_artifact["sha256"], shipped.classes,
                                         onnx_path=str(onnx_file))
                with _phase(timings_s, "audit_export"):
                    report.audit_export = audit(onnx_model, verify, triggers=triggers, target=target,
                                                batch_size=batch_size, device=device)
                judged, judged_on = report.audit_export, "audit_export"
        else:
            report.warnings.append("the clean-accuracy guard rolled back the defense; no model was exported")
        if save_input is not None:
            source, name = save_input
            path = export_safetensors(source, tmp / name, extra_metadata={"bdsan.role": "input, not sanitized"})
            report.artifacts.append({**_artifact(path, "safetensors"), "role": "input (not sanitized)"})
        _gates(report, judged, judged_on, max_asr, max_acc_drop, guard)
        report.details["out_dir"] = str(out_path)
        write_text_atomic(tmp / "report.json", render_json(report))


def _export_onnx(report: Report, model: LoadedModel, details: dict, verify: Holdout, tmp: Path, device,
                 batch_size: int, seed: int, slim: bool | None, bake_preprocessing: bool, extra: dict) -> dict | None:
    try:
        from ..exporters.onnx import export_onnx
    except ImportError as exc:  # the ONNX extra is missing: ship safetensors, say so, fail no gate silently
        report.warnings.append(f"ONNX export unavailable ({exc}); only safetensors written")
        return None
    kwargs = {"holdout": verify, "bake_preprocessing": bake_preprocessing, "device": device,
              "batch_size": batch_size, "seed": seed}
    use_slim = bool(details.get("hard_pruned")) if slim is None else slim
    try:
        if use_slim:
            from ..exporters.slim import export_slim_onnx

            try:
                artifact = export_slim_onnx(model, tmp / "model.onnx", **kwargs)
            except RunFailed as exc:
                report.warnings.append(f"slim export failed ({exc.message}); exported unpruned shapes instead")
                artifact = export_onnx(model, tmp / "model.onnx", extra_metadata=extra, **kwargs)
        else:
            artifact = export_onnx(model, tmp / "model.onnx", extra_metadata=extra, **kwargs)
    except GateFailed as exc:
        parity = getattr(exc, "details", {}).get("parity", {})
        report.add_gate("export_parity", parity.get("atol"), parity.get("max_scaled_diff"), False,
                        message=exc.message)
        return None
    report.add_gate("export_parity", artifact["parity"]["atol"], artifact["parity"]["max_scaled_diff"], True,
                    agreement=artifact["parity"]["agreement"])
    report.artifacts.append({**_artifact(tmp / "model.onnx", "onnx"),
                             **{k: artifact[k] for k in ("opset", "parity", "slim") if k in artifact}})
    return artifact


def _gates(report: Report, judged: dict, judged_on: str, max_asr: float, max_acc_drop: float, guard: dict) -> None:
    from ..detectors.audit import gate_max_asr

    passed, failing, highest = gate_max_asr(judged, max_asr)
    report.add_gate("max_asr", max_asr, highest, passed, judged_on=judged_on, failing=failing)
    drop = 100.0 * (report.audit_before["ca"] - judged["ca"])
    report.add_gate("max_acc_drop", max_acc_drop, guard["drop_points"] if guard["rolled_back"] else drop,
                    not guard["rolled_back"] and drop <= max_acc_drop + 1e-9, judged_on=judged_on,
                    unit="points", rolled_back=guard["rolled_back"])


def _artifact(path: Path, kind: str) -> dict:
    return {"path": path.name, "format": kind, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _as_loaded(model: LoadedModel, defended: torch.nn.Module) -> LoadedModel:
    """The defended [0,1]-input module as a LoadedModel (unwrapping bdsan's Normalized wrapper)."""
    if isinstance(defended, Normalized):
        module, preprocessing = defended.model, model.preprocessing
    else:  # a method that returns its own [0,1]-input model: no further normalisation
        module, preprocessing = defended, Preprocessing(input_size=model.preprocessing.input_size)
    return LoadedModel(module.eval(), model.arch, model.num_classes, preprocessing, "module", classes=model.classes,
                       sha256=model.sha256)


def check_output(out_path: Path, force: bool, model: LoadedModel | None = None, holdout: Holdout | None = None
                 ) -> None:
    """Refuse an existing DIR without --force, and any DIR that holds an input (inputs are never overwritten)."""
    if out_path.exists() and not out_path.is_dir():
        raise OutputError(f"--out {out_path} exists and is not a directory")
    if out_path.exists() and not force:
        raise OutputError(f"output directory already exists: {out_path}", hint="use --force to replace it")
    target = out_path.resolve()
    inputs = [("model", model.path), ("model", model.onnx_path)] if model is not None else []
    inputs += [("holdout", holdout.path)] if holdout is not None else []
    for label, path in inputs:
        if path and Path(path).exists():
            source = Path(path).resolve()
            if source == target or target in source.parents:
                raise OutputError(f"--out {out_path} contains the input {label} {path}; inputs are never overwritten")
    if not target.parent.exists():
        raise OutputError(f"the parent of --out does not exist: {target.parent}")


class _phase:
    """Context manager adding the elapsed seconds of a block to ``timings[name]``."""

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start
        return False


class _ProgressBars:
    """Default ``Context.progress``: one tqdm bar per phase on stderr (off when quiet or not a terminal)."""

    def __init__(self):
        self.bars: dict = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        from ..progress import progress_bar

        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = progress_bar(total, phase)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[phase]
