"""Errors that carry their exit code (SPEC §3.1); only ``cli.py`` turns them into exits."""
from __future__ import annotations

EXIT_OK = 0
EXIT_GATE = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_RUN = 4
EXIT_INTERRUPTED = 130


class BdsanError(Exception):
    """Base error: a message a user can act on, an optional hint, and the exit code."""

    exit_code = EXIT_RUN

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(BdsanError):
    """A bad option or argument combination."""

    exit_code = EXIT_USAGE


class InputError(BdsanError):
    """Input refused or invalid (exit 3)."""

    exit_code = EXIT_INPUT


class ModelRefused(InputError):
    """Unreadable, unsafe or mismatched model file."""


class DataError(InputError):
    """Bad holdout or suspect data."""


class OutputError(InputError):
    """Output path exists, is not writable, or would overwrite an input."""


class GateFailed(BdsanError):
    """A quality gate failed (exit 1): ASR, accuracy drop, scan anomaly or export parity."""

    exit_code = EXIT_GATE


class RunFailed(BdsanError):
    """The run itself failed (exit 4): out of memory, divergence, exporter error."""

    exit_code = EXIT_RUN


class ExportFailed(RunFailed):
    """The exporter could not convert the model."""
