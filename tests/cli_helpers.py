"""Run ``bdsan.cli.main(argv)`` in-process like the console script, with its real exit code (SPEC §3.1).

click's ``CliRunner.invoke(cli, ...)`` bypasses ``main()``, which maps exceptions to exit codes, so CLI tests use
``invoke_main`` (or the ``run_cli`` fixture from ``tests/cli/conftest.py``)::

    from cli_helpers import invoke_main
    result = invoke_main("inspect", str(path), "--format", "json")
    assert result.code == 0 and result.json["details"]["inspect"]["safe"]

Every ``BDSAN_*`` variable of the developer's environment is removed during the run; pass ``env={...}`` to set some.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def invoke_main(*argv: str, env: dict[str, str] | None = None) -> CliResult:
    from bdsan.cli import main

    saved = {k: v for k, v in os.environ.items() if k.startswith("BDSAN_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        for key in [k for k in os.environ if k.startswith("BDSAN_")]:
            del os.environ[key]
        os.environ.update(saved)
    return CliResult(code, out.getvalue(), err.getvalue())
