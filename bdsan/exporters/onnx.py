"""Verified ONNX export: torch.onnx (dynamo) → onnx.checker (full) → onnxruntime parity → atomic rename.

Parity (SPEC §3.1: a failed check is exit 1 and leaves no file). For every checked image i, with PyTorch
logits z_i (float32, CPU) and onnxruntime logits o_i:

    scaled_diff_i = max_j |z_ij - o_ij| / max(1, max_j |z_ij|)

The check passes when ``max_i scaled_diff_i <= atol`` (an absolute tolerance for logits of magnitude ≤ 1,
a relative one above) **and** the argmax agreement ``>= min_agreement``, where image i agrees when
``argmax o_i == argmax z_i`` or the two classes are tied within the tolerance in PyTorch itself
(``z_i[argmax z_i] - z_i[argmax o_i] <= atol * max(1, max_j |z_ij|)``; counted as ``ties``, and
``agreement_strict`` reports plain argmax equality).
The images are the holdout when one is given, else 64 seeded uniform-random [0,1] images of the export size.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import GateFailed, ModelRefused, OutputError, RunFailed
from ..io.archs import list_archs
from ..io.data import Holdout, to_float
from ..io.metadata import PREPROCESSING_BAKED, build_metadata
from ..io.models import LoadedModel, sha256_file
from ..io.preprocess import Normalized

log = logging.getLogger(__name__)

MIN_OPSET = 18
RANDOM_PARITY_IMAGES = 64
ONNX_SIZE_LIMIT = 2**31 - 1  # protobuf's 2 GiB limit on a single-file model
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


# --- quiet export ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def captured_output() -> Iterator[io.StringIO]:
    """Send everything printed to stdout/stderr (Python and C level) into a buffer.

    The dynamo exporter prints progress and, on failure, pages of graph dumps; ``--format json`` must print
    nothing but JSON, so both the Python streams and file descriptors 1 and 2 are redirected.
    """
    buffer = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in (1, 2):
                try:
                    saved_fds.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
                except OSError:  # no such descriptor (embedded interpreters): Python-level capture suffices
                    pass
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                yield buffer
        finally:
            for fd, saved in saved_fds:
                os.dup2(saved, fd)
                os.close(saved)
            sink.seek(0)
            buffer.write(sink.read().decode("utf-8", errors="replace"))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def exporter_reason(exc: BaseException) -> str:
    """The useful part of a torch.onnx error: the underlying exception and the user code line that raised it."""
    text = _ANSI.sub("", str(exc))
    lines = [line.rstrip() for line in text.splitlines()]
    reason = ""
    if "## Exception summary" in lines:
        rest = lines[lines.index("## Exception summary") + 1:]
        reason = next((line.strip() for line in rest if line.strip()), "")
    if not reason:
        reason = next((line.strip() for line in lines if line.strip()), type(exc).__name__)
    if "The following call raised this error:" in lines:
        where = lines[lines.index("The following call raised this error:") + 1:][:2]
        reason += " — at " + " ".join(part.strip() for part in where if part.strip())
    return reason[:600]


# --- export ------------------------------------------------------------------------------------------------

def export_input_size(model: LoadedModel, holdout: Holdout | None, input_size: int | None = None) -> tuple[int, int]:
    """(H, W) of the exported graph: the holdout's images, else ``input_size``, else the preprocessing's, else
    224 for torchvision architectures and 32 for bdsan's CIFAR-scale ones."""
    if holdout is not None:
        return holdout.image_size
    size = input_size or model.preprocessing.input_size
    if size is None:
        own = {"cifar_resnet18", "preact_resnet18", "small_resnet", "tiny_cnn"}
        size = 32 if model.arch in own or model.arch not in list_archs() else 224
    return int(size), int(size)


def _onnx_program(module: nn.Module, example: torch.Tensor, opset: int):
    """torch.onnx.export (dynamo) with a dynamic batch axis; every exporter failure becomes a refused model."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with captured_output() as output:
        try:
            program = torch.onnx.export(module, (example,), None, dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: batch},), external_data=False, optimize=True,
                                        verbose=False, report=False)
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise RunFailed(f"out of memory while exporting to ONNX: {exc}") from exc
        except Exception as exc:  # the exporter's many error types all mean "cannot convert this model"
            log.debug("exporter output:\n%s", output.getvalue())
            raise ModelRefused(f"the ONNX exporter cannot convert this model: {exporter_reason(exc)}",
                               hint="the model must be traceable by torch.export (no data-dependent Python "
                                    "control flow); export safetensors instead, or --debug for details") from exc
    log.debug("exporter output:\n%s", output.getvalue())
    return program


def build_onnx_model(model: LoadedModel, input_hw: tuple[int, int], *, bake_preprocessing: bool = False,
                     opset: int = MIN_OPSET, extra_metadata: dict[str, str] | None = None):
    """The checked ``onnx.ModelProto`` with bdsan metadata (not yet written anywhere)."""
    import onnx

    if model.module is None:
        raise ModelRefused(f"{model.path}: already an ONNX model; export from the PyTorch weights")
    if opset < MIN_OPSET:
        raise ModelRefused(f"opset {opset} is too old: bdsan exports with opset ≥ {MIN_OPSET}")
    module = copy.deepcopy(model.module).float().cpu().eval()
    if bake_preprocessing:
        module = Normalized(module, model.preprocessing).eval()
    channels = len(model.preprocessing.mean)
    example = torch.rand(2, channels, *input_hw, generator=torch.Generator().manual_seed(0))
    program = _onnx_program(module, example, opset)
    proto = program.model_proto
    metadata = build_metadata(model.arch, model.num_classes, model.preprocessing, model.classes, model.sha256,
                              extra_metadata)
    metadata[PREPROCESSING_BAKED] = "true" if bake_preprocessing else "false"
    metadata["bdsan.input_shape"] = json.dumps(["batch", channels, *input_hw])
    metadata["bdsan.input_range"] = "[0,1] pixels" if bake_preprocessing else "(x - mean) / std of [0,1] pixels"
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "bdsan"
    if proto.ByteSize() > ONNX_SIZE_LIMIT:
        raise ModelRefused(f"the model is {proto.ByteSize() / 2**30:.1f} GiB; a single-file ONNX holds at most 2 GiB",
                           hint="export safetensors instead")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ModelRefused(f"the exported ONNX graph fails onnx.checker: {exc}") from exc
    return proto


def parity_inputs(holdout: Holdout | None, channels: int, input_hw: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """[0,1] float CPU images for the parity check: the holdout, else seeded random ones."""
    if holdout is not None:
        return to_float(holdout.x.cpu())
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(RANDOM_PARITY_IMAGES, channels, *input_hw, generator=generator)


@torch.no_grad()
def torch_logits(module: nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """float32 CPU reference logits of a [0,1]-input module (a copy: the caller's module keeps its device/mode)."""
    module = copy.deepcopy(module).float().cpu().eval()
    return torch.cat([module(pixels[i:i + batch_size]).float() for i in range(0, len(pixels), batch_size)])


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, atol: float, min_agreement: float) -> dict:
    """The parity numbers (module docstring): max |Δ|, max scaled |Δ|, argmax agreement, passed."""
    reference, candidate = reference.double(), candidate.double()
    if reference.shape != candidate.shape:
        return {"n": len(reference), "max_abs_diff": float("inf"), "max_scaled_diff": float("inf"),
                "agreement": 0.0, "atol": atol, "min_agreement": min_agreement, "passed": False,
                "reason": f"output shape {tuple(candidate.shape)} != PyTorch's {tuple(reference.shape)}"}
    diff = (reference - candidate).abs()
    scale = reference.abs().amax(dim=1).clamp(min=1.0)
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_scaled = float((diff.amax(dim=1) / scale).max()) if diff.numel() else 0.0
    top_ref, top_cand = reference.argmax(1), candidate.argmax(1)
    same = top_ref == top_cand
    # a flip between two classes whose PyTorch logits are within the tolerance is a tie, not a disagreement
    margin = reference.gather(1, top_ref[:, None])[:, 0] - reference.gather(1, top_cand[:, None])[:, 0]
    tie = ~same & (margin <= atol * scale)
    agreement = float((same | tie).double().mean()) if len(reference) else 1.0
    finite = bool(torch.isfinite(candidate).all())
    passed = finite and max_scaled <= atol and agreement >= min_agreement
    return {"n": len(reference), "max_abs_diff": max_abs, "max_scaled_diff": max_scaled,
            "max_abs_logit": float(reference.abs().max()) if reference.numel() else 0.0,
            "agreement": agreement, "agreement_strict": float(same.double().mean()) if len(reference) else 1.0,
            "ties": int(tie.sum()), "atol": atol, "min_agreement": min_agreement, "passed": passed}


def export_onnx(model: LoadedModel, out: str | Path, *, holdout: Holdout | None = None,
                bake_preprocessing: bool = False, atol: float = 1e-3, min_agreement: float = 0.999,
                opset: int = MIN_OPSET, input_size: int | None = None, device: str | torch.device | None = None,
                batch_size: int = 256, seed: int = 0, reference: nn.Module | None = None,
                extra_metadata: dict[str, str] | None = None) -> dict:
    """Export ``model`` to a single-file ONNX at ``out``, verified against PyTorch; returns the artifact dict.

    ``reference`` is the [0,1]-input module parity is measured against (default ``model.normalized()``; the slim
    export passes the unpruned model). Parity failure raises GateFailed; nothing is left at ``out`` on any error.
    """
    from ..io.onnx_runtime import OnnxClassifier

    out = Path(out)
    if model.path and out.exists() and out.resolve() == Path(model.path).resolve():
        raise OutputError(f"refusing to overwrite the input model {out}")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    input_hw = export_input_size(model, holdout, input_size)
    proto = build_onnx_model(model, input_hw, bake_preprocessing=bake_preprocessing, opset=opset,
                             extra_metadata=extra_metadata)
    timings["export"] = time.perf_counter() - start
    import onnx

    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
        start = time.perf_counter()
        pixels = parity_inputs(holdout, len(model.preprocessing.mean), input_hw, seed)
        expected = torch_logits(reference if reference is not None else model.normalized(), pixels, batch_size)
        session = OnnxClassifier(tmp, device=device, preprocessing=model.preprocessing, batch_size=batch_size)
        actual = session(pixels)
        parity = compare_logits(expected, actual, atol, min_agreement)
        parity["inputs"] = "holdout" if holdout is not None else f"{RANDOM_PARITY_IMAGES} random images (seed {seed})"
        parity["provider"] = session.provider
        del session
        timings["verify"] = time.perf_counter() - start
        if not parity["passed"]:
            error = GateFailed(
                f"ONNX parity failed: max |Δlogit| {parity['max_abs_diff']:.3g} (scaled {parity['max_scaled_diff']:.3g}"
                f", atol {atol:g}), argmax agreement {parity['agreement']:.4f} (min {min_agreement:g}) on "
                f"{parity['n']} images; no file written" + (f" — {parity['reason']}" if "reason" in parity else ""),
                hint="--atol / --min-agreement set the thresholds")
            error.details = {"parity": parity}
            raise error
        leftovers = [p for p in tmp.parent.glob(tmp.name + "*") if p != tmp] + list(tmp.parent.glob(out.name + ".data"))
        if leftovers:
            raise RunFailed(f"the exporter left external-data files: {', '.join(map(str, leftovers))}")
    return {"path": str(out), "format": "onnx", "sha256": sha256_file(out), "bytes": out.stat().st_size,
            "opset": opset, "input_shape": ["batch", len(model.preprocessing.mean), *input_hw],
            "preprocessing_baked": bake_preprocessing, "parity": parity,
            "timings_s": {k: round(v, 3) for k, v in timings.items()}}
