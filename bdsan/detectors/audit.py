"""The audit (SPEC §4, ALGORITHMS.md §5): clean accuracy and, per trigger, ASR for every target, net ASR and RA.

One forward pass of the holdout per trigger, in batches on the device; trigger stamping and metrics are tensor ops.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from ..device import autocast, prepare_model, resolve_device
from ..errors import DataError, UsageError
from ..io.data import Holdout, to_float
from ..io.models import LoadedModel
from ..progress import progress_bar
from .metrics import clean_metrics, trigger_metrics
from .triggers import Trigger, resolve_triggers, sweep_families

log = logging.getLogger(__name__)

Classifier = Callable[[torch.Tensor], torch.Tensor]


def classifier_for(model: LoadedModel, device: torch.device | str | None = None) -> Classifier:
    """[0,1] N×C×H×W → float logits on the same device: the normalised torch module in eval mode (bf16 autocast
    and channels_last on CUDA), or an onnxruntime session for ONNX files."""
    device = resolve_device(device)
    if model.module is None:
        from ..io.onnx_runtime import OnnxClassifier

        session = OnnxClassifier(model.onnx_path or model.path, device, model.preprocessing)
        if device.type == "cuda" and session.provider != "CUDAExecutionProvider":
            log.warning("auditing %s with %s, not CUDA", model.path, session.provider)
        return session
    module = prepare_model(model.normalized(), device).eval()
    channels_last = device.type == "cuda"

    @torch.inference_mode()
    def classify(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            return module(x).float()

    classify.module = module  # type: ignore[attr-defined]
    return classify


def _check_size(model: LoadedModel, holdout: Holdout) -> None:
    size = model.preprocessing.input_size
    if size and holdout.image_size != (size, size):
        raise DataError(f"holdout images are {holdout.image_size[0]}×{holdout.image_size[1]} but the model expects "
                        f"{size}×{size}", hint=f"pass --input-size {size} to resize the holdout")


def predict_all(classify: Classifier, holdout: Holdout, triggers: list[Trigger], batch_size: int,
                progress: bool = True) -> torch.Tensor:
    """Predictions (1 + T)×N: row 0 clean, row 1 + i with ``triggers[i]`` stamped. Each batch is converted to float
    once and then sent through the model clean and once per trigger."""
    n = len(holdout)
    predictions = torch.empty(1 + len(triggers), n, dtype=torch.long, device=holdout.device)
    with progress_bar(n * (1 + len(triggers)) if progress else 0, "audit", unit="img") as bar:
        for start in range(0, n, batch_size):
            x = to_float(holdout.x[start:start + batch_size])
            stop = start + len(x)
            predictions[0, start:stop] = classify(x).argmax(dim=1).to(holdout.device)
            bar.update(len(x))
            for row, trigger in enumerate(triggers, start=1):
                predictions[row, start:stop] = classify(trigger.apply(x)).argmax(dim=1).to(holdout.device)
                bar.update(len(x))
    return predictions


def sweep(classify: Classifier, holdout: Holdout, num_classes: int, target: int | None = None,
          batch_size: int = 256, max_images: int = 256) -> list[dict]:
    """ALGORITHMS.md §5 sweep: per family, the strongest variant (with its parameters) beside the canonical one.

    Runs on a stratified, fixed subsample of at most ``max_images`` images; several variants are stacked into one
    forward batch of about ``batch_size`` images.
    """
    if len(holdout) > max_images:
        from ..io.data import stratified_split

        keep, _ = stratified_split(holdout.y, max_images / len(holdout), seed=0, num_classes=holdout.num_classes)
        holdout = holdout.subset(keep.sort().values)
    x = to_float(holdout.x)
    height, width = holdout.image_size
    clean = clean_metrics(classify(x).argmax(dim=1).to(holdout.device), holdout.y, num_classes)
    families = sweep_families(height, width)
    per_forward = max(1, batch_size // len(x))
    results = []
    with progress_bar(sum(len(v) for _, v in families.values()) * len(x), "sweep", unit="img") as bar:
        for family, (canonical, variants) in families.items():
            rows = []
            for start in range(0, len(variants), per_forward):
                group = variants[start:start + per_forward]
                stacked = torch.cat([trigger.apply(x) for trigger in group])
                predictions = classify(stacked).argmax(dim=1).to(holdout.device).view(len(group), len(x))
                for trigger, pred in zip(group, predictions):
                    metrics = trigger_metrics(pred, holdout.y, num_classes, clean["base_rate"], target)
                    rows.append({"name": trigger.name, "params": trigger.params_at(height, width), **metrics})
                bar.update(len(stacked))
            best = max(rows, key=lambda r: -1.0 if r["asr_max"] is None else r["asr_max"])
            results.append({"family": family, "canonical": canonical, "variants": len(rows), "n": len(x),
                            "best": {k: v for k, v in best.items() if k != "asr"}})
    return results


def audit(model: LoadedModel, holdout: Holdout, *, triggers: list[str | Trigger] | None = None,
          target: int | None = None, batch_size: int = 256, device: torch.device | str | None = None,
          classifier: Classifier | None = None, run_sweep: bool = False, sweep_images: int = 256) -> dict:
    """Audit ``model`` on ``holdout`` (the verify split; ``bdsan audit`` passes the whole holdout).

    Returns the SPEC §5 audit object: ``ca``, ``per_class_ca``, ``base_rate``, ``n``, ``class_counts``,
    ``classes_skipped``, ``target`` and ``triggers`` (name, params at this image size, ``asr`` vector over targets,
    ``asr_max``, ``suspected_target``, ``asr_net``, ``ra``, ``n``). With ``target``, ``asr_max`` is ASR at it.
    ``classifier`` replaces the model's own forward pass (e.g. an already-built ONNX session). ``run_sweep`` adds
    ``sweep`` (see :func:`sweep`) on at most ``sweep_images`` images.
    """
    if len(holdout) == 0:
        raise DataError("the holdout has no images to audit")
    device = resolve_device(device) if device is not None else holdout.device
    if holdout.device != device:
        holdout = holdout.to(device)
    num_classes = model.num_classes or holdout.num_classes
    if target is not None and not 0 <= target < num_classes:
        raise UsageError(f"--target {target} is not a class of this model (0..{num_classes - 1})")
    if int(holdout.y.max()) >= num_classes:
        raise DataError(f"holdout labels go up to {int(holdout.y.max())} but the model has {num_classes} classes")
    _check_size(model, holdout)
    trigger_list = resolve_triggers(triggers)
    classify = classifier or classifier_for(model, device)
    started = time.perf_counter()
    predictions = predict_all(classify, holdout, trigger_list, batch_size)
    seconds = time.perf_counter() - started
    clean = clean_metrics(predictions[0], holdout.y, num_classes)
    height, width = holdout.image_size
    results = []
    for row, trigger in enumerate(trigger_list, start=1):
        metrics = trigger_metrics(predictions[row], holdout.y, num_classes, clean["base_rate"], target)
        results.append({"name": trigger.name, "params": trigger.params_at(height, width), **metrics})
    provider = getattr(classify, "provider", None)
    result = {**clean, "target": target, "triggers": results, "image_size": [height, width],
              "forward_images": len(holdout) * (1 + len(trigger_list)), "seconds": round(seconds, 4),
              **({"onnx_provider": provider} if provider else {})}
    if run_sweep:
        started = time.perf_counter()
        result["sweep"] = sweep(classify, holdout, num_classes, target, batch_size, sweep_images)
        result["sweep_seconds"] = round(time.perf_counter() - started, 4)
    return result


def gate_max_asr(audit_result: dict, max_asr: float) -> tuple[bool, list[str], float]:
    """(passed, names of triggers whose ASR is above ``max_asr``, the largest ASR seen); sweep families count as
    ``sweep:<family>`` with their strongest variant."""
    values = [(t["name"], t["asr_max"]) for t in audit_result.get("triggers", []) if t.get("asr_max") is not None]
    values += [(f"sweep:{f['family']}", f["best"]["asr_max"]) for f in audit_result.get("sweep") or []
               if f["best"].get("asr_max") is not None]
    failing = [name for name, value in values if value > max_asr]
    highest = max((value for _, value in values), default=0.0)
    return not failing, failing, highest
