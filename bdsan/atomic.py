"""Atomic outputs (SPEC §3.3): write to a temporary name beside the target, rename when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


def check_writable_dir(directory: Path) -> None:
    if not directory.exists():
        raise OutputError(f"output directory does not exist: {directory}")
    if not directory.is_dir():
        raise OutputError(f"output directory is not a directory: {directory}")
    if not os.access(directory, os.W_OK):
        raise OutputError(f"output directory is not writable: {directory}")


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path in ``target``'s directory; rename onto ``target`` on success only."""
    target = Path(target)
    check_writable_dir(target.parent.resolve())
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) create 0600; outputs get the usual permissions
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; it becomes ``target`` only when the block succeeds.

    An existing ``target`` is refused unless ``force`` (then replaced only after success).
    """
    target = Path(target)
    if target.exists() and not force:
        raise OutputError(f"output directory already exists: {target}", hint="use --force to replace it")
    parent = target.parent.resolve()
    check_writable_dir(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
