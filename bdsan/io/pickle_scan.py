"""List what a pickle would import, without unpickling it (SPEC §8): ``pickletools.genops`` only reads opcodes."""
from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# Globals that only rebuild tensors and plain containers (torch's weights_only allowlist, read when available).
_FALLBACK_SAFE = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                  "torch._tensor._rebuild_from_type_v2", "torch.Size", "torch.device", "builtins.set",
                  "builtins.frozenset", "builtins.bytearray", "builtins.complex", "builtins.slice", "_codecs.encode"}

# numpy arrays inside checkpoints (BackdoorBench bundles keep index arrays): data, never code.
NUMPY_DATA_GLOBALS = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                      "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}


def _torch_safe_globals() -> set[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals()) | _FALLBACK_SAFE
    except Exception:  # noqa: BLE001 — private torch API: fall back to the short list
        return set(_FALLBACK_SAFE)


def is_safe_global(name: str) -> bool:
    """True for the tensor-rebuilding and container globals ``torch.load(weights_only=True)`` accepts."""
    return (name in _torch_safe_globals() or name in NUMPY_DATA_GLOBALS
            or (name.startswith("torch.") and name.endswith("Storage"))
            or name.startswith("numpy.dtypes."))


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


@dataclass
class PickleScan:
    """The globals found in one file's pickles, in first-seen order."""

    globals: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def unsafe(self) -> list[str]:
        return [name for name in self.globals if not is_safe_global(name)]

    def add(self, name: str) -> None:
        module, _, attr = name.rpartition(".")
        name = f"{_PY2_MODULES.get(module, module)}.{attr}"
        if name not in self.globals:
            self.globals.append(name)


def scan_pickle_bytes(data: bytes, scan: PickleScan | None = None) -> PickleScan:
    """Globals imported by every pickle in ``data`` (a legacy torch file holds several, followed by raw bytes)."""
    scan = scan or PickleScan()
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        start = stream.tell()
        try:
            _scan_one(stream, scan)
        except Exception as exc:  # noqa: BLE001 — raw tensor bytes after the pickles, or a damaged pickle
            if start == 0:
                scan.error = f"not a readable pickle: {exc}"
            break
    return scan


def _scan_one(stream: io.BytesIO, scan: PickleScan) -> None:
    """One pickle up to its STOP. STACK_GLOBAL takes module and name from the two strings pushed before it."""
    strings: list[str] = []
    memo: dict[int, str] = {}
    memo_count = 0
    previous_string: str | None = None
    for opcode, arg, _pos in pickletools.genops(stream):
        name = opcode.name
        pushed: str | None = None
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            scan.add(f"{module}.{attr}")
        elif name in _STRING_OPS:
            pushed = str(arg)
        elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            index = memo_count if name == "MEMOIZE" else int(arg)
            memo_count += 1
            if previous_string is not None:
                memo[index] = previous_string
            pushed = previous_string  # memoizing leaves the string on the stack
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = memo.get(int(arg))
        elif name == "STACK_GLOBAL":
            scan.add(f"{strings[-2]}.{strings[-1]}" if len(strings) >= 2 else "<unresolved STACK_GLOBAL>")
        elif name == "STOP":
            return
        if pushed is not None and name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            strings.append(pushed)
        previous_string = pushed


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def scan_file(path: str | Path) -> PickleScan:
    """Globals of a raw pickle file, or of every ``.pkl`` member of a torch zip archive."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        scan = PickleScan()
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith(".pkl") and not member.endswith(".debug_pkl"):
                    scan_pickle_bytes(archive.read(member), scan)
        return scan
    return scan_pickle_bytes(path.read_bytes())
