"""Triggers a defense may use without ever seeing the real one: the fit-split audit's flagged suite triggers
(``ctx.known_triggers``) plus, when asked, the scan's reconstructions on the fit images (issue 9)."""
from __future__ import annotations

import time

from torch import nn

from ..io.data import Holdout
from ..io.models import from_module
from ..io.preprocess import Preprocessing
from .context import Context

SCAN_MODES = ("auto", "always", "never")


def scan_mode(value: bool | str) -> str:
    """``scan`` parameter: auto (only when the audit flagged no trigger), always, never; true/false accepted."""
    if isinstance(value, bool):
        return "always" if value else "never"
    if value not in SCAN_MODES:
        raise ValueError("scan must be auto (when the audit found no trigger), always or never")
    return value


def gather_triggers(model: nn.Module, train: Holdout, ctx: Context, mode: str, steps: int,
                    all_classes: bool = False) -> tuple[list, list[dict], dict | None]:
    """(triggers, where each came from, scan summary or None): the audit's, then the scan's when ``mode`` says."""
    triggers = list(ctx.known_triggers)
    sources = [{"name": t.name, "source": "audit"} for t in triggers]
    summary = None
    if mode == "always" or (mode == "auto" and not triggers):
        found, summary = scan_fit_split(model, train, ctx, steps, all_classes)
        triggers += found
        sources += [{"name": t.name, "source": "scan", "target": t.params["target"], "kind": t.params["kind"]}
                    for t in found]
    return triggers, sources, summary


def scan_fit_split(model: nn.Module, train: Holdout, ctx: Context, steps: int, all_classes: bool = False
                   ) -> tuple[list, dict]:
    """Run the scan on fit images; return its reconstructed triggers worth using and a summary.

    Without ``all_classes``: the anomalous classes' triggers, or — when none is anomalous and the audit knew no
    trigger — the most suspicious class's (a weak scan signal is still the best lead a small holdout gives).
    """
    from ..detectors.scan import anomalous_triggers, scan, scan_section

    started = time.perf_counter()
    loaded = from_module(model, "module", train.num_classes, Preprocessing(), list(train.classes))
    result = scan(loaded, train, steps=steps, batch_size=ctx.batch_size, device=ctx.device, seed=ctx.seed)
    model.eval()
    if all_classes:
        found = list(result["reconstructed"])
    else:
        found = anomalous_triggers(result)
        if not found and not ctx.known_triggers and result["suspected_target"] is not None:
            found = [t for t in result["reconstructed"] if t.params["target"] == result["suspected_target"]]
    section = scan_section(result)
    summary = {k: section[k] for k in ("suspected_target", "anomalous", "anomalous_classes", "anomaly_index",
                                       "flip_rate", "mask_l1", "steps_run", "time_s") if k in section}
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return found, summary
