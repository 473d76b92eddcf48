"""Process helpers for tests: find the processes a test started, by the directory they were given."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a Python child process that must import this checkout (its PYTHONPATH starts with
    the repository root), based on ``base`` (default: this process's environment)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def processes_using(directory: Path) -> list[int]:
    """Pids whose command line mentions ``directory`` (e.g. a Java broker started there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(directory).encode() in cmdline:
                found.append(int(entry.name))
    return found
