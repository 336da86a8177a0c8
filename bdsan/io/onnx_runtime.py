"""Run an exported ONNX classifier with onnxruntime, behind the same interface as a torch model.

``OnnxClassifier(path, device)`` takes [0,1] float N×C×H×W torch tensors and returns logits as a torch
tensor on the input's device, so audits read the artifact that ships exactly as they read a torch model.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelRefused
from .metadata import PREPROCESSING_BAKED, read_preprocessing
from .preprocess import Preprocessing

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'bdsan[cpu]' (or 'bdsan[gpu]' for onnxruntime-gpu; never both)"


def import_onnxruntime():
    """``import onnxruntime`` with an actionable error when it is missing."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ModelRefused(f"onnxruntime is not installed, so ONNX models cannot be run ({exc})",
                           hint=INSTALL_HINT) from None
    return onnxruntime


def _providers(ort, device: torch.device) -> list:
    """CUDA first when the device is CUDA and this onnxruntime build has it; CPU always as the fallback."""
    providers: list = []
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            index = device.index if device.index is not None else torch.cuda.current_device()
            # TF32 off: exported logits are compared with PyTorch's float32 ones.
            providers.append(("CUDAExecutionProvider", {"device_id": str(index), "use_tf32": "0"}))
        else:
            log.warning("onnxruntime has no CUDAExecutionProvider (is the CPU build installed?); "
                        "running the ONNX model on CPU — install 'bdsan[gpu]' for CUDA")
    providers.append("CPUExecutionProvider")
    return providers


class OnnxClassifier:
    """An onnxruntime session that maps [0,1] pixel tensors to logits.

    Normalisation: when the file says ``bdsan.preprocessing_baked = true`` the graph normalises itself and
    pixels go in as they are; otherwise ``(x - mean) / std`` is applied here, with ``preprocessing`` when
    given, else the file's ``bdsan.preprocessing`` metadata, else none.
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = None,
                 preprocessing: Preprocessing | None = None, batch_size: int = 256):
        ort = import_onnxruntime()
        self.path = str(path)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = batch_size
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: onnxruntime's warnings go to stderr, not through logging
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        try:
            self.session = ort.InferenceSession(self.path, sess_options=options,
                                                providers=_providers(ort, self.device))
        except Exception as exc:  # a corrupt or unsupported file is refused input
            raise ModelRefused(f"{self.path}: onnxruntime cannot load this model: {exc}") from exc
        self.provider: str = self.session.get_providers()[0]
        if self.device.type == "cuda" and self.provider != "CUDAExecutionProvider":
            log.warning("ONNX model runs on %s, not CUDA", self.provider)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.baked = self.metadata.get(PREPROCESSING_BAKED, "false").lower() == "true"
        self.preprocessing = preprocessing or read_preprocessing(self.metadata) or Preprocessing()
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ModelRefused(f"{self.path}: expected one image input, the graph has {len(inputs)}")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_shape = list(inputs[0].shape)  # symbolic dims are strings, e.g. ['batch', 3, 32, 32]
        last = outputs[0].shape[-1] if outputs[0].shape else None
        self.num_classes: int | None = last if isinstance(last, int) else None
        if self.baked:
            self._mean = self._std = None
        else:
            self._mean = np.asarray(self.preprocessing.mean, dtype=np.float32).reshape(1, -1, 1, 1)
            self._std = np.asarray(self.preprocessing.std, dtype=np.float32).reshape(1, -1, 1, 1)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(H, W) when the graph fixes them."""
        height, width = self.input_shape[-2:] if len(self.input_shape) == 4 else (None, None)
        return (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def predict_numpy(self, pixels: np.ndarray) -> np.ndarray:
        """[0,1] float32 N×C×H×W numpy → logits numpy, batch by batch."""
        outputs = []
        for start in range(0, len(pixels), self.batch_size):
            batch = np.asarray(pixels[start:start + self.batch_size], dtype=np.float32)
            if self._mean is not None:
                batch = (batch - self._mean) / self._std
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            outputs.append(self.session.run([self.output_name], {self.input_name: batch})[0])
        if not outputs:
            return np.zeros((0, self.num_classes or 0), dtype=np.float32)
        return np.concatenate(outputs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.detach().to(device="cpu", dtype=torch.float32).numpy()
        return torch.from_numpy(self.predict_numpy(pixels)).to(x.device)

    def __repr__(self) -> str:
        return f"OnnxClassifier({self.path!r}, provider={self.provider}, baked={self.baked})"
