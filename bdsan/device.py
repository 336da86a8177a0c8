"""Device selection and the CUDA speed settings (bf16 autocast, channels_last)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import UsageError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without CUDA is a usage error."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine", hint="use --device cpu")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    if spec == "cpu":
        return torch.device("cpu")
    raise UsageError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N")


def describe_device(device: torch.device) -> str:
    """Human label for reports, e.g. ``cuda:0 (NVIDIA H100)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


PRECISIONS = ("auto", "bf16", "fp32")


def cpu_supports_bf16() -> bool:
    """True when this CPU runs bf16 convolutions natively (oneDNN with AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str, name: str = "precision") -> None:
    """A ``ValueError`` naming ``name`` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def wants_bf16(device: torch.device, precision: str) -> bool:
    """``precision`` for passes that only rank or search (FMP's ranking, the scan): ``auto`` is bf16 on CUDA and on
    CPUs that run it natively (about 2× faster there; an emulated bf16 would be slower than fp32), else fp32."""
    check_precision(precision)
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16())
    return precision == "bf16"


def training_bf16(device: torch.device, precision: str) -> bool:
    """``precision`` for passes that train (the harness's loop, unlearn's fine-tuning): ``auto`` is bf16 on CUDA only.

    On a 2-core Xeon with AMX, unlearn's fine-tuning (batches of 128) ran 1.2–1.7× slower in bf16 than in fp32 with
    the same CA/ASR (measured with another job on the cores; BENCHMARKS.md, "Unlearn in bf16 on the CPU");
    ``bf16``/``fp32`` as asked, as in :func:`wants_bf16`."""
    return device.type == "cuda" if precision == "auto" else wants_bf16(device, precision)


def precision_autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16``, else fp32 (no autocast)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@contextlib.contextmanager
def channels_last(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``module`` with channels_last weights, then give its 4-D tensors back the layout they had.

    Convolutions pick the weight's layout, so inputs need no conversion. On the CPU (oneDNN) it makes the scan's
    forward + input-gradient passes about 1.3× faster with the same outputs (to 1e-8; BENCHMARKS.md, "Scan and training with channels_last weights");
    on CUDA it is the usual speed setting. Restoring matters: the same module is pruned and exported afterwards.
    """
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.dim() == 4]
    was_contiguous = all(t.is_contiguous() for t in tensors)
    module.to(memory_format=torch.channels_last)
    try:
        yield module
    finally:
        if was_contiguous:
            module.to(memory_format=torch.contiguous_format)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to the device; channels_last on CUDA."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model
