"""Option precedence (SPEC §3.2): command line > BDSAN_* environment > --config file > defaults.

click gives the first three levels: each option reads ``BDSAN_<OPTION>`` (set by ``BdsanCommand``) and the
config file becomes click's ``default_map``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .errors import UsageError


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML file of ``option_name = value``; relative paths resolve against the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:
        raise UsageError(f"--config {path}: cannot parse: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    base = path.resolve().parent
    resolved = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if isinstance(value, str) and name in PATH_OPTIONS:
            candidate = Path(value).expanduser()
            value = str(candidate if candidate.is_absolute() else base / candidate)
        resolved[name] = value
    return resolved


PATH_OPTIONS = {"holdout", "out", "report", "arch_file", "trigger_image", "trigger_mask", "data", "suspect"}


def find_config_arg(argv: list[str]) -> str | None:
    """The ``--config`` value from raw argv (it must be known before click parses), else BDSAN_CONFIG."""
    import os

    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return os.environ.get("BDSAN_CONFIG")
