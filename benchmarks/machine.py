"""What machine a benchmark ran on, for the BENCHMARKS.md header."""
from __future__ import annotations

import platform
import subprocess


def cpu_model() -> str:
    """The CPU's model name from lscpu, else what platform knows."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"
