"""Option precedence (SPEC §3.2): command line > BDSAN_* environment > --config file > defaults.

click gives the first three levels: each option reads ``BDSAN_<OPTION>`` (set by ``BdsanCommand``) and the
config file becomes click's ``default_map``. A config file holds ``option-name = value`` pairs (the long option
name, dashes or underscores) that apply to every command that has the option, and optional per-command tables
(``[audit]``, ``[sanitize]`` …) that win over the top level for that command. Relative paths resolve against the
config file's directory.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from .errors import UsageError

PATH_OPTIONS = {"holdout", "out", "report", "arch_file", "trigger_image", "trigger_mask", "data", "suspect",
                "preview"}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML file; keys normalised to underscores, path values made absolute."""
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
    return _normalise(data, path.resolve().parent)


def _normalise(data: dict, base: Path) -> dict[str, Any]:
    resolved: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if isinstance(value, dict):
            resolved[name] = _normalise(value, base)
            continue
        if isinstance(value, str) and name in PATH_OPTIONS:
            candidate = Path(value).expanduser()
            value = str(candidate if candidate.is_absolute() else base / candidate)
        resolved[name] = value
    return resolved


def option_names(command: click.Command) -> dict[str, str]:
    """Config/env name (long flag without dashes, underscores) → click parameter name, for one command."""
    names: dict[str, str] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or not param.name:
            continue
        names[param.name] = param.name
        for opt in param.opts:
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = param.name
    return names


def default_map_for(group: click.Group, values: dict[str, Any], source: str = "--config") -> dict[str, dict]:
    """click ``default_map`` for every command of ``group``; unknown keys are a usage error (typos)."""
    commands = dict(group.commands)
    sections = {k: v for k, v in values.items() if isinstance(v, dict)}
    top = {k: v for k, v in values.items() if not isinstance(v, dict)}
    unknown_sections = sorted(set(sections) - set(commands))
    if unknown_sections:
        raise UsageError(f"{source}: no command named {', '.join(unknown_sections)}")
    known = set().union(*(option_names(c) for c in commands.values())) if commands else set()
    unknown = sorted(k for k in top if k not in known and k != "config")
    for name, section in sections.items():
        unknown += sorted(f"{name}.{k}" for k in section if k not in option_names(commands[name]))
    if unknown:
        raise UsageError(f"{source}: unknown option(s) {', '.join(unknown)}",
                         hint="keys are long option names, e.g. max-asr = 0.1 or [audit] max-asr = 0.1")
    default_map: dict[str, dict] = {}
    for name, command in commands.items():
        names = option_names(command)
        merged = {names[k]: v for k, v in top.items() if k in names}
        merged.update({names[k]: v for k, v in sections.get(name, {}).items()})
        if merged:
            default_map[name] = merged
    return default_map


def env_var_name(param: click.Option) -> str | None:
    """``--batch-size`` → ``BDSAN_BATCH_SIZE``; ``-o/--report`` → ``BDSAN_REPORT``; ``--format`` → ``BDSAN_FORMAT``."""
    long = [opt for opt in param.opts if opt.startswith("--")]
    if not long:
        return f"BDSAN_{param.name.upper()}" if param.name else None
    return "BDSAN_" + long[0][2:].replace("-", "_").upper()


def find_config_arg(argv: list[str]) -> str | None:
    """The ``--config`` value from raw argv (it must be known before click parses), else BDSAN_CONFIG."""
    for index, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return os.environ.get("BDSAN_CONFIG") or None
