"""Running the project's command-line entry points as a user would, and checking their errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_module(module: str, *args, stdin: str | None = None, timeout: float = 900,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` in a fresh interpreter from the repository root."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), **(env or {})})


def assert_user_error(proc: subprocess.CompletedProcess, *needles) -> str:
    """Exit 2 with exactly one stderr line `error: ...` mentioning every needle, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]
