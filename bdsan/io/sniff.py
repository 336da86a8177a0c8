"""Recognise a model file by its bytes, never by its extension (SPEC §2.1)."""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from ..errors import ModelRefused

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch"          # torch.save zip archive (state dict, bundle or pickled module: the pickle decides)
TORCHSCRIPT = "torchscript"  # zip archive with code/ and constants.pkl
PICKLE = "pickle"            # legacy (pre-1.6) torch.save file or any raw pickle stream
ONNX = "onnx"

SUPPORTED = "safetensors, PyTorch .pt/.pth/.bin (zip or legacy), BackdoorBench attack_result.pt, ONNX"


def sniff_format(path: str | Path) -> str:
    """One of the format constants above; ``ModelRefused`` for anything else (with what was seen)."""
    path = Path(path)
    if not path.exists():
        raise ModelRefused(f"model file not found: {path}")
    if path.is_dir():
        raise ModelRefused(f"{path} is a directory, not a model file",
                           hint="pass the weights file inside it, e.g. DIR/model.safetensors")
    size = path.stat().st_size
    if size == 0:
        raise ModelRefused(f"{path}: empty file")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _sniff_zip(path)
    if len(head) >= 9 and head[8:9] == b"{":
        return _check_safetensors_header(path, head, size)
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # PROTO opcode: a pickle
        return PICKLE
    if head[0] == 0x08 and _looks_like_onnx(path):  # ModelProto field 1 (ir_version) as a varint
        return ONNX
    if _looks_like_pickle(path):  # protocol 0/1 pickles have no PROTO header
        return PICKLE
    raise ModelRefused(f"{path}: not a recognised model format (first bytes {head[:8].hex(' ')})",
                       hint=f"supported: {SUPPORTED}")


def _sniff_zip(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelRefused(f"{path}: damaged zip archive ({exc})") from None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return TORCHSCRIPT
    if any(n.endswith("data.pkl") for n in names):
        return TORCH_ZIP
    raise ModelRefused(f"{path}: a zip archive but not a PyTorch checkpoint (no data.pkl)",
                       hint=f"supported: {SUPPORTED}")


def _check_safetensors_header(path: Path, head: bytes, size: int) -> str:
    """safetensors = u64 little-endian header length, a JSON header, then the raw tensor bytes."""
    header_len = struct.unpack("<Q", head[:8])[0]
    if header_len > size - 8:
        raise ModelRefused(f"{path}: truncated or corrupt safetensors file (header claims {header_len:,} bytes, "
                           f"file has {size - 8:,} after the length)")
    with open(path, "rb") as handle:
        handle.seek(8)
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError:
        raise ModelRefused(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise ModelRefused(f"{path}: corrupt safetensors header (not a JSON object)")
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + header_len + end > size:
        raise ModelRefused(f"{path}: truncated safetensors file ({size:,} bytes, tensors need "
                           f"{8 + header_len + end:,})")
    return SAFETENSORS


def _looks_like_pickle(path: Path) -> bool:
    """True when the file opens with one complete pickle (read opcode by opcode, nothing executed)."""
    import pickletools

    try:
        with open(path, "rb") as handle:
            return any(op.name == "STOP" for op, _, _ in pickletools.genops(handle))
    except Exception:  # noqa: BLE001 — garbage fails to parse
        return False


def _looks_like_onnx(path: Path) -> bool:
    """Confirm a protobuf ModelProto with a graph (onnx.load parses data, it runs nothing)."""
    try:
        import onnx
    except ImportError:
        return True  # the loader reports the missing package
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 — any parse failure means "not ONNX"
        return False
    return len(model.graph.node) > 0
