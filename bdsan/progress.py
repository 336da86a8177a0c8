"""Progress bars on stderr: on for a terminal, off when piped or with ``--quiet``."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def progress_bar(total: int | None, desc: str, unit: str = "it") -> tqdm:
    """A tqdm bar on stderr; use as a context manager and call ``update``."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=_quiet or not sys.stderr.isatty())
