"""``run_cli`` fixture for CLI tests: ``run_cli(*argv, env=None) -> CliResult(code, stdout, stderr)``.

It runs ``bdsan.cli.main`` (real exit codes; click's CliRunner would bypass main's exception mapping).
See ``tests/cli_helpers.py``.
"""
from __future__ import annotations

import pytest
from cli_helpers import CliResult, invoke_main

__all__ = ["CliResult", "invoke_main"]


@pytest.fixture
def run_cli():
    """``run_cli(*argv, env=None) -> CliResult`` (``.code``, ``.stdout``, ``.stderr``, ``.json``, ``.output``)."""
    return invoke_main
