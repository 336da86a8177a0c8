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
        return _clean(data)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf → None, tuples → lists."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=False) + "\n"


def render_text(report: Report) -> str:
    """Plain text for people: a header, then whatever sections the command filled."""
    data = report.to_dict()
    lines = [f"bdsan {data['command']} — bdsan {data['bdsan_version']} on {data['device']}"]
    if data["model"]:
        m = data["model"]
        lines.append(f"model: {m.get('path')} [{m.get('format')}, {m.get('arch')}, {m.get('num_classes')} classes, "
                     f"{m.get('params'):,} params]")
    for key, value in data["details"].items():
        lines.append(f"{key}: {value}")
    for gate in data["gates"]:
        status = "PASS" if gate["passed"] else "FAIL"
        lines.append(f"gate {gate['name']}: {status} (value {gate['value']}, limit {gate['limit']})")
    for artifact in data["artifacts"]:
        lines.append(f"wrote {artifact['path']} ({artifact.get('bytes', 0):,} bytes)")
    for warning in data["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines) + "\n"
