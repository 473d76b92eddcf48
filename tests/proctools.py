"""Process helpers for tests: find the processes a test started, by the directory they were given."""

from __future__ import annotations

from pathlib import Path


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
