"""The report object (SPEC §5) and its renderings: JSON and text (SARIF and JUnit for audit/scan)."""
from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from typing import Any

from . import __version__

SCHEMA = "bdsan.report/1"


@dataclass
class Report:
    """One run's results; every command fills the parts it owns and leaves the rest None/empty."""

    command: str
    seed: int = 0
    device: str = "cpu"
    model: dict | None = None
    holdout: dict | None = None
    audit_before: dict | None = None
    scan: dict | None = None
    defense: dict | None = None
    audit_after: dict | None = None
    audit_export: dict | None = None
    gates: list[dict] = field(default_factory=list)
    artifacts: list[dict] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    # In memory only, never serialised: the defended model before the guard's decision (benchmarks evaluate it to
    # show what a rolled-back defense would have shipped).
    defended: Any = field(default=None, repr=False, compare=False)
    # In memory only: the model a training command trained (trap-train's stage-1 network, before the replace).
    trained: Any = field(default=None, repr=False, compare=False)

    def add_gate(self, name: str, limit: float, value: float, passed: bool, **extra: Any) -> None:
        self.gates.append({"name": name, "limit": limit, "value": value, "passed": bool(passed), **extra})

    @property
    def gates_passed(self) -> bool:
        return all(g["passed"] for g in self.gates)

    def to_dict(self) -> dict:
        data = {"schema": SCHEMA, "bdsan_version": __version__, "command": self.command, "created": self.created,
                "seed": self.seed, "device": self.device, "model": self.model, "holdout": self.holdout,
                "audit_before": self.audit_before, "scan": self.scan, "defense": self.defense,
                "audit_after": self.audit_after, "audit_export": self.audit_export, "gates": self.gates,
                "artifacts": self.artifacts, "timings_s": self.timings_s, "warnings": self.warnings,
                "details": self.details, "exit_code": self.exit_code}
        return json_safe(data)


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN/inf → None, tuples → lists."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=False) + "\n"


def _header_lines(data: dict) -> list[str]:
    """The first lines of every text rendering: command, version, device, and the model when there is one."""
    lines = [f"bdsan {data['command']} — bdsan {data['bdsan_version']} on {data['device']}"]
    if data["model"]:
        m = data["model"]
        lines.append(f"model: {m.get('path') or '(in memory)'} [{m.get('format')}, {m.get('arch')}, "
                     f"{m.get('num_classes')} classes, {m.get('params') or 0:,} params]")
    return lines


def render_text(report: Report) -> str:
    """Plain text for people: a header, then whatever sections the command filled."""
    data = report.to_dict()
    lines = _header_lines(data)
    for key, value in data["details"].items():
        if key == "export" and isinstance(value, dict) and "parity" in value:
            lines.extend(render_export_lines(value))
        else:
            lines.append(f"{key}: {value}")
    for key, title in AUDIT_SECTIONS:
        if data.get(key):
            lines.extend(render_audit_table(data[key], title, _max_asr_limit(data), _class_names(data)))
    if data.get("scan"):
        lines.extend(render_scan_table(data["scan"], _class_names(data)))
    for gate in data["gates"]:
        status = "PASS" if gate["passed"] else "FAIL"
        lines.append(f"gate {gate['name']}: {status} (value {gate['value']}, limit {gate['limit']})")
    for artifact in data["artifacts"]:
        lines.append(f"wrote {artifact['path']} ({artifact.get('bytes', 0):,} bytes)")
    for warning in data["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines) + "\n"


def render_export_lines(export: dict) -> list[str]:
    """``bdsan export``'s parity check (and slim summary) in a few lines."""
    parity = export["parity"]
    lines = [f"export: {export.get('format', 'onnx')}"
             + (f", opset {export['opset']}, input {export.get('input_shape')}" if "opset" in export else "")
             + (", preprocessing baked into the graph" if export.get("preprocessing_baked") else ""),
             f"parity vs PyTorch on {parity.get('inputs', '')} (n={parity['n']}"
             + (f", {parity['provider']}" if parity.get("provider") else "") + "): "
             f"max |Δlogit| {parity['max_abs_diff']:.3g} (scaled {parity['max_scaled_diff']:.3g}, atol {parity['atol']:g}), "
             f"argmax agreement {parity['agreement']:.4f} (min {parity['min_agreement']:g})"]
    slim = export.get("slim")
    if slim:
        before, after = slim["before"], slim["after"]
        lines.append(f"slim: {slim['channels_removed_total']} dead channels removed; params {before['params']:,} → "
                     f"{after['params']:,}, FLOPs {before['flops']:,} → {after['flops']:,}, ONNX bytes "
                     f"{before.get('onnx_bytes', 0):,} → {after.get('onnx_bytes', 0):,}")
    if export.get("written") is False:
        lines.append("no file written")
    return lines


# --- audit sections: text table, SARIF 2.1.0, JUnit XML ----------------------------------------------------------

AUDIT_SECTIONS = (("audit_before", "audit"), ("audit_after", "audit after the defense"),
                  ("audit_export", "audit of the exported file"))


def _max_asr_limit(data: dict) -> float | None:
    return next((g["limit"] for g in data.get("gates", []) if g["name"] == "max_asr"), None)


def _class_names(data: dict) -> list[str] | None:
    return (data.get("holdout") or {}).get("classes") or None


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _class_label(index: int | None, names: list[str] | None) -> str:
    if index is None:
        return "—"
    return f"{index} ({names[index]})" if names and index < len(names) and names[index] != str(index) else str(index)


def render_audit_table(audit: dict, title: str = "audit", max_asr: float | None = None,
                       class_names: list[str] | None = None) -> list[str]:
    """Lines for one audit section: clean accuracy, then one row per trigger."""
    lines = [f"{title}: clean accuracy {_pct(audit.get('ca'))} on {audit.get('n', 0)} images"
             + (f", known target {_class_label(audit['target'], class_names)}" if audit.get("target") is not None
                else "")]
    per_class = audit.get("per_class_ca") or []
    if per_class:
        lines.append("  per class: " + ", ".join(f"{_class_label(i, class_names)} {_pct(v)}"
                                                 for i, v in enumerate(per_class) if v is not None))
    if audit.get("classes_skipped"):
        lines.append("  classes without images (skipped): " + ", ".join(map(str, audit["classes_skipped"])))
    triggers = audit.get("triggers") or []
    if triggers:
        lines.append(f"  {'trigger':18s} {'ASR':>7s}  {'target':12s} {'net ASR':>7s} {'RA':>7s}  result")
        for t in triggers:
            asr = t.get("asr_max")
            result = "" if max_asr is None or asr is None else ("FAIL" if asr > max_asr else "PASS")
            lines.append(f"  {t['name']:18s} {_pct(asr):>7s}  {_class_label(t.get('suspected_target'), class_names):12s}"
                         f" {_pct(t.get('asr_net')):>7s} {_pct(t.get('ra')):>7s}  {result}")
    sweep = audit.get("sweep") or []
    if sweep:
        lines.append(f"  sweep (strongest of each family's variants, on {sweep[0].get('n', 0)} images):")
    for row in _sweep_rows(audit):
        asr = row.get("asr_max")
        result = "" if max_asr is None or asr is None else ("FAIL" if asr > max_asr else "PASS")
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
        lines.append(f"  {row['name']:18s} {_pct(asr):>7s}  {_class_label(row.get('suspected_target'), class_names):12s}"
                     f" {_pct(row.get('asr_net')):>7s} {_pct(row.get('ra')):>7s}  {result}  {row['variant']}({params})"
                     f" best of {row['variants']}")
    return lines


def _sweep_rows(audit: dict) -> list[dict]:
    """Each sweep family's strongest variant as a trigger-like row named ``sweep:<family>``."""
    rows = []
    for family in audit.get("sweep") or []:
        best = family.get("best") or {}
        rows.append({**best, "name": f"sweep:{family['family']}", "variant": best.get("name", ""),
                     "variants": family.get("variants", 0), "params": best.get("params", {})})
    return rows


def _gated_rows(audit: dict) -> list[dict]:
    """What the max_asr gate reads: every trigger, then every sweep family."""
    return list(audit.get("triggers") or []) + _sweep_rows(audit)


MIX_NAME = "mix (a full-image blend toward a picture, as an image-blend backdoor)"


def render_scan_table(scan: dict, class_names: list[str] | None = None) -> list[str]:
    """Lines for the scan section: per class the reconstructed trigger sizes, held-out flip rates, anomaly index."""
    verdict = ("ANOMALOUS: class(es) " + ", ".join(_class_label(c, class_names) for c in scan["anomalous_classes"])
               if scan.get("anomalous") else "no anomalous class")
    lines = [(f"scan: {verdict}; suspected target {_class_label(scan.get('suspected_target'), class_names)} "
              f"({scan.get('steps_run')} steps, {scan.get('time_s', 0):.1f} s, {scan.get('n_opt')} images optimised, "
              f"{scan.get('n_eval')} held out)")]
    blend, wave, noise = scan.get("blend") or {}, scan.get("wave") or {}, scan.get("noise") or {}
    mix = scan.get("mix") or {}
    lines.append(f"  {'class':12s} {'mask px':>8s} {'flip':>7s} {'anomaly':>8s}" +
                 (f"  {'blend |δ|':>9s} {'flip':>7s} {'anomaly':>8s}" if blend else "") +
                 (f"  {'mix α':>6s} {'flip':>7s} {'anomaly':>8s}" if mix else "") +
                 (f"  {'noise take':>10s}" if noise else "") +
                 (f"  {'wave flip':>9s}  best wave" if wave else ""))
    for cls in range(len(scan.get("flip_rate") or [])):
        row = f"  {_class_label(cls, class_names):12s} "
        row += (f"{scan['mask_l1'][cls]:8.1f} {_pct(scan['flip_rate'][cls]):>7s} {scan['anomaly_index'][cls]:8.2f}"
                if scan.get("mask_l1") else f"{'—':>8s} {'—':>7s} {'—':>8s}")
        if blend:
            row += (f"  {blend['mean_abs_delta'][cls]:9.4f} {_pct(blend['flip_rate'][cls]):>7s} "
                    f"{blend['anomaly_index'][cls]:8.2f}")
        if mix:
            row += f"  {mix['alpha'][cls]:6.3f} {_pct(mix['flip_rate'][cls]):>7s} {mix['anomaly_index'][cls]:8.2f}"
        if noise:
            row += f"  {_pct(noise['take'][cls]):>10s}"
        if wave:
            row += f"  {_pct(wave['flip_rate'][cls]):>9s}  {wave['wave'][cls]}"
            row += _set_aside(wave, cls, (scan.get("params") or {}).get("wave_threshold", 0.0))
        lines.append(row + ("  ANOMALOUS" if cls in scan.get("anomalous_classes", []) else ""))
    return lines


def _set_aside(wave: dict, cls: int, threshold: float) -> str:
    """Why a class whose wave flips ≥ ``threshold`` is not flagged: texture (edge rule), sink (structure control)."""
    if wave["flip_rate"][cls] < threshold:
        return ""
    notes = []
    if cls < len(wave.get("texture") or []) and wave["texture"][cls]:
        notes.append(" (texture: still rising at the top frequency)")
    if cls < len(wave.get("sink") or []) and wave["sink"][cls]:
        notes.append(f" (sink: {_pct(wave['scrambled_flip_rate'][cls])} with its pixels shuffled)")
    return "".join(notes)


def _scan_message(scan: dict, names: list[str] | None) -> str:
    target = scan.get("suspected_target")
    found = (scan.get("anomalous_kinds") or {}).get(str(target), [])
    if found == ["wave"]:
        wave = scan["wave"]
        shuffled = _shuffled_note(wave, target, scan["params"])
        return (f"A grey plane wave ({wave['wave'][target]}, amplitude "
                f"{255 * scan['params']['wave_amplitude']:.0f}/255) sends {_pct(wave['flip_rate'][target])} of "
                f"held-out images to class {_class_label(target, names)}{shuffled} (anomalous "
                f"classes: {scan.get('anomalous_classes')}); the model likely has a sine-like (SIG) backdoor, unless "
                f"models trained on trusted data of the same kind react to this wave too (a natural stripe class).")
    if "noise" in found and not {"patch", "blend"} & set(found):
        noise = scan["noise"]
        form = (noise.get("form") or ["grey"] * (target + 1))[target]
        return (f"Fresh {form} noise blended at {noise['weight']:.0%} sends {_pct(noise['take'][target])} of held-out "
                f"images to class {_class_label(target, names)} (anomalous classes: {scan.get('anomalous_classes')}); "
                f"the model likely has a noise-blend backdoor (clean benchmark models' noise sinks took at most 46%).")
    kinds = ", ".join(MIX_NAME if kind == "mix" else kind for kind in found if kind not in ("wave", "noise"))
    kinds = kinds or "patch/blend"
    return (f"Trigger reverse-engineering found an anomalously small {kinds} trigger for class "
            f"{_class_label(target, names)} (anomalous classes: {scan.get('anomalous_classes')}); "
            f"the model likely has a backdoor with an unknown trigger.")


def _shuffled_note(wave: dict, target: int, params: dict) -> str:
    """", its pixels shuffled only X%" where the scan measured the structure control (scans before it did not); where
    the shuffled wave crossed ``wave_scrambled_max``, the class was kept because its response is tuned."""
    shuffled = wave.get("scrambled_flip_rate")
    if not shuffled:
        return ""
    limit = params.get("wave_scrambled_max")
    if limit is not None and shuffled[target] >= limit:
        return (f", its pixels shuffled {_pct(shuffled[target])} (but the response is tuned to one frequency: edge "
                f"ratio {wave['edge_ratio'][target]:.2f})")
    return f", its pixels shuffled only {_pct(shuffled[target])}"


def _final_audit(data: dict) -> dict | None:
    """The audit that decides: of the shipped file, else after the defense, else the only one."""
    return data.get("audit_export") or data.get("audit_after") or data.get("audit_before")


def _artifact_uri(path: str | None) -> str:
    """Repository-relative URI for code scanning when the model sits under the working directory."""
    import os
    from pathlib import Path

    if not path:
        return "model"
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path(os.getcwd()).resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def render_sarif(report: Report) -> str:
    """SARIF 2.1.0 for GitHub code scanning: one rule per trigger audited, one result per trigger above
    ``--max-asr``, located at the model file."""
    import hashlib

    data = report.to_dict()
    audit = _final_audit(data) or {}
    limit = _max_asr_limit(data)
    model = data.get("model") or {}
    uri = _artifact_uri(model.get("path"))
    triggers = _gated_rows(audit)
    names = _class_names(data)
    rules, results = [], []
    for index, t in enumerate(triggers):
        rule_id = f"bdsan/backdoor/{t['name'].replace(':', '/')}"
        params = ", ".join(f"{k}={v}" for k, v in t.get("params", {}).items())
        rules.append({"id": rule_id, "name": f"BackdoorTrigger_{t['name'].replace(':', '_')}",
                      "shortDescription": {"text": f"Backdoor trigger '{t['name']}' flips predictions"},
                      "fullDescription": {"text": f"Attack success rate of the '{t['name']}' trigger ({params}) "
                                                  "on the clean holdout is above the --max-asr gate."},
                      "help": {"text": "A high attack success rate means the model maps inputs carrying this "
                                       "trigger to one class: a likely backdoor. Sanitize it with `bdsan sanitize` "
                                       "or do not ship it."},
                      "defaultConfiguration": {"level": "error"},
                      "properties": {"tags": ["security", "backdoor", "ml-model"], "precision": "medium",
                                     "security-severity": "8.0"}})
        asr = t.get("asr_max")
        if limit is None or asr is None or asr <= limit:
            continue
        target = _class_label(t.get("suspected_target"), names)
        fingerprint = hashlib.sha256(f"{model.get('sha256', '')}:{t['name']}".encode()).hexdigest()
        results.append({
            "ruleId": rule_id, "ruleIndex": index, "level": "error",
            "message": {"text": f"Trigger {t['name']} sends {_pct(asr)} of non-target holdout images to class "
                                f"{target} (limit {_pct(limit)}; net of the no-trigger rate {_pct(t.get('asr_net'))};"
                                f" robust accuracy {_pct(t.get('ra'))}; clean accuracy {_pct(audit.get('ca'))})."},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri},
                                                "region": {"startLine": 1}}}],
            "partialFingerprints": {"bdsanModelTrigger/v1": fingerprint},
            "properties": {"asr_max": asr, "suspected_target": t.get("suspected_target"),
                           "asr_net": t.get("asr_net"), "ra": t.get("ra"), "params": t.get("params", {})}})
    scan = data.get("scan")
    if scan:
        rules.append({"id": "bdsan/scan/anomalous-class", "name": "ScanAnomalousClass",
                      "shortDescription": {"text": "A reverse-engineered trigger is anomalously small"},
                      "fullDescription": {"text": "bdsan scan optimises the smallest trigger that sends held-out "
                                                  "images to each class; one far smaller than the others (MAD "
                                                  "anomaly index) that also fires on unseen images flags a backdoor."},
                      "help": {"text": "Look at the scan PNGs (bdsan scan --out-dir), then sanitize the model "
                                       "(bdsan sanitize --method unlearn) or do not ship it."},
                      "defaultConfiguration": {"level": "error"},
                      "properties": {"tags": ["security", "backdoor", "ml-model"], "precision": "medium",
                                     "security-severity": "8.0"}})
        if scan.get("anomalous"):
            fingerprint = hashlib.sha256(f"{model.get('sha256', '')}:scan".encode()).hexdigest()
            results.append({
                "ruleId": "bdsan/scan/anomalous-class", "ruleIndex": len(rules) - 1, "level": "error",
                "message": {"text": _scan_message(scan, names)},
                "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri}, "region": {"startLine": 1}}}],
                "partialFingerprints": {"bdsanModelTrigger/v1": fingerprint},
                "properties": {"suspected_target": scan.get("suspected_target"),
                               "anomalous_classes": scan.get("anomalous_classes"),
                               "anomaly_index": scan.get("anomaly_index"), "flip_rate": scan.get("flip_rate")}})
    sarif = {"version": "2.1.0", "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
             "runs": [{"tool": {"driver": {"name": "bdsan", "version": data["bdsan_version"],
                                           "semanticVersion": data["bdsan_version"],
                                           "informationUri": "https://github.com/bdsan/bdsan", "rules": rules}},
                       "results": results,
                       "invocations": [{"executionSuccessful": True, "exitCode": data["exit_code"]}],
                       "properties": {"command": data["command"], "clean_accuracy": audit.get("ca"),
                                      "max_asr": limit, "model_sha256": model.get("sha256")}}]}
    return json.dumps(json_safe(sarif), indent=2) + "\n"


def render_junit(report: Report) -> str:
    """JUnit XML: one test case per trigger (failure when its ASR is above ``--max-asr``)."""
    import xml.etree.ElementTree as ET

    data = report.to_dict()
    audit = _final_audit(data) or {}
    limit = _max_asr_limit(data)
    names = _class_names(data)
    triggers = _gated_rows(audit)
    failing = [t for t in triggers if limit is not None and t.get("asr_max") is not None and t["asr_max"] > limit]
    scan = data.get("scan")
    tests = len(triggers) + (1 if scan else 0)
    failures = len(failing) + (1 if scan and scan.get("anomalous") else 0)
    suites = ET.Element("testsuites", name="bdsan", tests=str(tests), failures=str(failures))
    suite = ET.SubElement(suites, "testsuite", name=f"bdsan {data['command']}", tests=str(tests),
                          failures=str(failures), errors="0", skipped="0",
                          time=f"{audit.get('seconds', 0.0) or 0.0:.3f}", timestamp=data["created"])
    properties = ET.SubElement(suite, "properties")
    for key, value in (("model", (data.get("model") or {}).get("path")), ("clean_accuracy", audit.get("ca")),
                       ("max_asr", limit), ("images", audit.get("n"))):
        ET.SubElement(properties, "property", name=key, value=str(value))
    for t in triggers:
        case = ET.SubElement(suite, "testcase", classname=f"bdsan.{data['command']}", name=t["name"], time="0")
        summary = (f"ASR {_pct(t.get('asr_max'))} to class {_class_label(t.get('suspected_target'), names)}, "
                   f"net {_pct(t.get('asr_net'))}, RA {_pct(t.get('ra'))}")
        if t in failing:
            failure = ET.SubElement(case, "failure", type="BackdoorTrigger",
                                    message=f"{summary} (limit {_pct(limit)})")
            failure.text = json.dumps({"params": t.get("params"), "asr": t.get("asr")})
        else:
            ET.SubElement(case, "system-out").text = summary
    if scan:
        case = ET.SubElement(suite, "testcase", classname=f"bdsan.{data['command']}", name="scan",
                             time=f"{scan.get('time_s', 0.0) or 0.0:.3f}")
        if scan.get("anomalous"):
            failure = ET.SubElement(case, "failure", type="ScanAnomalousClass", message=_scan_message(scan, names))
            keys = ("anomalous_kinds", "anomaly_index", "flip_rate", "mask_l1", "wave")
            failure.text = json.dumps({k: scan[k] for k in keys if k in scan}, ensure_ascii=False)
        else:
            ET.SubElement(case, "system-out").text = (
                f"no anomalous class (suspected target {_class_label(scan.get('suspected_target'), names)})")
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


AUDIT_RENDERERS = {".sarif": render_sarif, ".xml": render_junit}


# --- sanitize: before / after / export side by side ------------------------------------------------------------

def defense_trigger_sources(details: dict) -> tuple[list[dict], dict | None]:
    """(the triggers a defense used, where each came from; its fit-split scan summary or None), wherever the
    method keeps them (unlearn and D-BR at the top of their details, FMP under ``finetune``)."""
    finetune = details.get("finetune") if isinstance(details.get("finetune"), dict) else {}
    sources = details.get("triggers") or finetune.get("trigger_sources") or []
    scan = details.get("scan") or finetune.get("scan")
    return (sources if isinstance(sources, list) else []), (scan if isinstance(scan, dict) else None)


def _statistics_line(statistics: dict, names: list[str] | None) -> str:
    """How unlearn treated BatchNorm (``bn=auto`` says why), its lr and its stop rule, in one line."""
    why = ""
    if "primary_target" in statistics:
        target = _class_label(statistics["primary_target"], names)
        full = statistics.get("full_image") or []
        scanned = statistics.get("from_scan") or []
        why = (f" (a full-image trigger points at {target}: {', '.join(full)})" if full
               else f" (a trigger only the scan found points at {target}: {', '.join(scanned)})" if scanned
               else f" (every found trigger toward {target} is a suite patch)")
    lr = statistics.get("lr")
    line = f"BatchNorm statistics: {statistics.get('bn')}{why}; lr {'-' if lr is None else f'{lr:.3g}'}; "
    if statistics.get("few_images_per_class"):
        return line + (f"{statistics.get('fit_train_per_class', 0):.3g} fit-train images per class: nothing pruned, "
                       f"{statistics.get('stamp_fraction', 0):.0%} of each batch stamped")
    return line + f"{'stops' if statistics.get('stop_at_floor') else 'fine-tunes'} after pruning at the floor"


def _augmentation_line(augmentation: dict) -> str:
    """Whether the defense's augmentation flipped images, and the mirror check behind ``--flip auto``."""
    used = "crop + flip" if augmentation.get("flip") else "crop only (no flips)"
    if augmentation.get("mode") != "auto":
        return f"augmentation: {used} (--flip {augmentation.get('mode')})"
    return (f"augmentation: {used} — the input model is right on {_pct(augmentation.get('accuracy'))} of the fit "
            f"images and {_pct(augmentation.get('accuracy_flipped'))} of their mirror images "
            f"({augmentation.get('lost')} lost, {augmentation.get('gained')} won)")


def render_sanitize_text(report: Report) -> str:
    """The sanitize report for people: audits side by side, the defense, gates, artifacts, timings."""
    data = report.to_dict()
    lines = _header_lines(data)
    if data["holdout"]:
        h = data["holdout"]
        lines.append(f"holdout: {h.get('path') or '(in memory)'} — {h.get('n')} images: {h.get('fit')} fit "
                     f"(defense), {h.get('verify')} verify (audits)")
    trap = (data.get("details") or {}).get("trap")
    if trap:
        last = (trap.get("epochs") or [{}])[-1]
        lines.append(f"trap stage: {len(trap.get('epochs') or [])} epochs on {trap['suspect']['n']} suspect images"
                     f"{' (resumed after epoch ' + str(trap['resumed_from_epoch']) + ')' if trap.get('resumed_from_epoch') else ''}"
                     f", decoder on the input of {trap['decoder_reads']}; last epoch: loss {last.get('loss', 0):.3f}, "
                     f"reconstruction MSE {last.get('recon_mse', 0):.4f}; 'before' below is the trapped model")
    names = _class_names(data)
    audits = [(title, data.get(key)) for key, title in (("audit_before", "before"), ("audit_after", "after"),
                                                        ("audit_export", "export"))]
    audits = [(title, a) for title, a in audits if a]
    if audits:
        limit = _max_asr_limit(data)
        lines.append("")
        lines.append(f"  {'(verify split)':24s}" + "".join(f"{title:>9s}" for title, _ in audits))
        lines.append(f"  {'clean accuracy':24s}" + "".join(f"{_pct(a.get('ca')):>9s}" for _, a in audits))
        for index, trigger in enumerate(audits[0][1].get("triggers") or []):
            row = [a["triggers"][index] if index < len(a.get("triggers") or []) else {} for _, a in audits]
            last = row[-1].get("asr_max")
            verdict = "" if limit is None or last is None else ("  FAIL" if last > limit else "")
            target = _class_label(trigger.get("suspected_target"), names)
            lines.append(f"  {('ASR ' + trigger['name'])[:24]:24s}" + "".join(f"{_pct(t.get('asr_max')):>9s}"
                                                                               for t in row)
                         + f"  (target {target}, RA {_pct(row[-1].get('ra'))}){verdict}")
    defense = data.get("defense")
    if defense:
        lines.append("")
        lines.append(f"defense: {defense['method']} — " + ", ".join(f"{k}={v}" for k, v in defense["params"].items()))
        details = defense.get("details") or {}
        if defense.get("augmentation"):
            lines.append("  " + _augmentation_line(defense["augmentation"]))
        if "n_pruned" in details:
            layers = details.get("layers") or []
            touched = sum(1 for layer in layers if layer.get("n_pruned"))
            lines.append(f"  pruned {details['n_pruned']} of {details.get('n_channels')} channels in {touched}/"
                         f"{len(layers)} conv layers (ranking on {details.get('rank_images')} fit images)")
        statistics = details.get("statistics")
        if isinstance(statistics, dict):
            lines.append("  " + _statistics_line(statistics, names))
        finetune = details.get("finetune") or {}
        if finetune.get("note"):
            lines.append(f"  fine-tune: {finetune['note']}")
        known = (defense.get("fit_audit") or {}).get("known_triggers") or []
        if known:
            lines.append("  triggers flagged on the fit split: " + ", ".join(
                f"{k['name']} → {_class_label(k.get('suspected_target'), names)}" for k in known))
        sources, scan = defense_trigger_sources(details)
        found = [t for t in sources if t.get("source") == "scan"]
        if found:
            lines.append("  triggers the scan reconstructed on the fit split: " + ", ".join(
                f"{t.get('kind')} → {_class_label(t.get('target'), names)}" for t in found))
        roaming = ((scan or {}).get("roam") or {}).get("found") or []
        if roaming:
            lines.append("  roaming patches: " + ", ".join(
                f"{r.get('name')} (flips {_pct(r.get('flip'))}, {'used' if r.get('kept') else 'not used'})"
                for r in roaming))
        refreshed = [entry for epoch in details.get("epochs") or [] for entry in epoch.get("mix_refresh") or []]
        if refreshed:
            lines.append(f"  fresh pictures each epoch (mix_refresh, weight {refreshed[0].get('alpha')}): flips "
                         + " → ".join(_pct(r.get("flip")) for r in refreshed)
                         + f"; {sum(bool(r.get('kept')) for r in refreshed)} used")
        guard = defense.get("guard") or {}
        if guard:
            lines.append(f"  guard: clean accuracy on verify {_pct(guard.get('ca_verify_before'))} → "
                         f"{_pct(guard.get('ca_verify_after'))} ({guard.get('drop_points', 0):+.1f} points drop, "
                         f"limit {guard.get('max_acc_drop')})" + (" — ROLLED BACK to the input weights"
                                                                  if guard.get("rolled_back") else ""))
    lines.append("")
    for gate in data["gates"]:
        status = "PASS" if gate["passed"] else "FAIL"
        value = gate["value"]
        value_text = f"{value:.4g}" if isinstance(value, float) else str(value)
        on = f" on {gate['judged_on']}" if gate.get("judged_on") else ""
        lines.append(f"gate {gate['name']}: {status} (value {value_text}, limit {gate['limit']}{on})")
    out_dir = data["details"].get("out_dir", "")
    for artifact in data["artifacts"]:
        lines.append(f"wrote {out_dir}/{artifact['path']} ({artifact.get('bytes', 0):,} bytes, sha256 "
                     f"{artifact.get('sha256', '')[:16]}…)")
    if data["timings_s"]:
        lines.append("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in data["timings_s"].items()))
    for warning in data["warnings"]:
        lines.append(f"warning: {warning}")
    lines.append(f"exit code {data['exit_code']}")
    return "\n".join(lines) + "\n"
