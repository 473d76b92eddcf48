"""Where and when a benchmark ran, and its results: ``bench/RESULTS.md`` sections and ``bench/results.json``.

- ``machine()``: CPU model, cores, memory, OS, Python, versions of the packages that matter, git commit.
- ``Report``: one benchmark's results. ``Report.save()`` replaces that benchmark's entry in
  ``bench/results.json`` (machine-readable, drawn by ``python -m bench``) and its section in
  ``bench/RESULTS.md`` (human-readable, between ``<!-- bench:NAME:begin/end -->`` markers). Re-running a
  benchmark replaces, never appends. Both files are shared by all benchmarks and written under an
  exclusive file lock. The format is described in bench/README.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_JSON = BENCH_DIR / "results.json"
WORK_DIR = BENCH_DIR / "_work"  # git-ignored scratch space
FORMAT_VERSION = 1
PACKAGES = ("confluent-kafka", "chdb", "faust-streaming", "aiokafka", "orjson", "clickhouse-cityhash")


# -- where and when -------------------------------------------------------------------------------------
def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    """A description of this machine and software, stored with every result."""
    versions: dict[str, str] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    with contextlib.suppress(Exception):
        import confluent_kafka

        versions["librdkafka"] = confluent_kafka.libversion()[0]
    with contextlib.suppress(Exception):
        from bucketer.localkafka import KAFKA_VERSION

        versions["kafka-broker"] = KAFKA_VERSION
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def machine_line(m: dict[str, Any]) -> str:
    pk = m["packages"]
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']}, Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in pk.items())
        + f"; commit {m['commit']}{' (+uncommitted changes)' if m['dirty'] else ''}; "
        f"load average at start {m['loadavg_at_start'][0]}"
    )


def command_line() -> str:
    """The exact command that is running, as someone would type it in the repository root."""
    argv = (
        [Path(sys.executable).name if sys.executable else "python", *sys.orig_argv[1:]]
        if hasattr(sys, "orig_argv")
        else ["python", *sys.argv]
    )
    if argv and argv[0].startswith("python"):
        argv[0] = ".venv/bin/python"
    env = f"BENCH_BOOTSTRAP={os.environ['BENCH_BOOTSTRAP']} " if os.environ.get("BENCH_BOOTSTRAP") else ""
    return env + shlex.join(argv)


# -- medians ---------------------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: list[float]) -> str:
    """``min–max`` of the samples, for the tables."""
    return f"{min(values):,.0f}–{max(values):,.0f}" if values else "–"


# -- reporting ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked() -> Iterator[None]:
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    with open(WORK_DIR / "results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_section(name: str, body: str, path: Path = RESULTS_MD) -> None:
    """Write ``body`` as the section named ``name`` of RESULTS.md, replacing the previous one if any."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    with _locked():
        text = (
            path.read_text()
            if path.exists()
            else (
                "# Benchmark results\n\nWritten by `make bench` (`python -m bench`); each benchmark owns one "
                "section and re-running it replaces that section. Plots: `bench/*.png`; raw numbers: "
                "`bench/results.json`. How to read and extend: `bench/README.md`.\n\n"
            )
        )
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            tail = rest.split(end, 1)[1].lstrip("\n")
            text = f"{head}{block}\n{tail}" if tail else f"{head}{block}"
        else:
            text = f"{text.rstrip()}\n\n{block}"
        _atomic_write(path, text)


def load_results(path: Path = RESULTS_JSON) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("format") != FORMAT_VERSION:
        data = {"format": FORMAT_VERSION, "benchmarks": {}}
    return data


def replace_entry(name: str, entry: dict[str, Any], path: Path = RESULTS_JSON) -> None:
    with _locked():
        data = load_results(path)
        data["benchmarks"][name] = entry
        _atomic_write(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


@dataclass
class Report:
    """One benchmark's results; see bench/README.md for the format of ``results.json``."""

    name: str
    title: str
    command: str = field(default_factory=command_line)
    started: str = field(default_factory=utc_now)
    machine: dict[str, Any] = field(default_factory=machine)
    status: str = "ok"  # ok | partial | failed | blocked
    notes: list[str] = field(default_factory=list)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    ratios: list[dict[str, Any]] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)

    def measure(self, metric: str, samples: list[float], unit: str, **params: Any) -> float:
        """Record the samples of one measurement; returns their median."""
        value = median(samples)
        self.measurements.append(
            {"metric": metric, "unit": unit, "value": value, "samples": list(samples), "params": params}
        )
        return value

    def ratio(
        self,
        name: str,
        numerator: float,
        denominator: float,
        target: float | None = None,
        higher_is_better: bool = True,
        unit: str = "×",
    ) -> float:
        """A figure against its target: by default a ratio (``unit`` ×); with ``unit=" s"`` an absolute value
        (numerator, denominator 1.0) held against an absolute target."""
        value = numerator / denominator if denominator else float("nan")
        met = None
        if target is not None and value == value:
            met = value >= target if higher_is_better else value <= target
        self.ratios.append(
            {
                "name": name,
                "value": value,
                "target": target,
                "higher_is_better": higher_is_better,
                "met": met,
                "unit": unit,
            }
        )
        return value

    def figure(
        self,
        fig_id: str,
        title: str,
        kind: str,
        x_label: str,
        y_label: str,
        series: list[dict[str, Any]],
        log_y: bool = False,
    ) -> None:
        """A plot for ``python -m bench``: kind "line" (numeric x) or "bar" (x = category labels).

        Each series is ``{"label": str, "x": [...], "y": [...], "lo": [...]?, "hi": [...]?}``
        (lo/hi: sample min/max drawn as error bars)."""
        self.figures.append(
            {
                "id": fig_id,
                "title": title,
                "kind": kind,
                "x_label": x_label,
                "y_label": y_label,
                "series": series,
                "log_y": log_y,
            }
        )

    def entry(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "status": self.status,
            "date": self.started,
            "finished": utc_now(),
            "command": self.command,
            "machine": self.machine,
            "notes": self.notes,
            "measurements": self.measurements,
            "ratios": self.ratios,
            "figures": self.figures,
        }

    def ratio_table(self) -> str:
        if not self.ratios:
            return ""
        rows = ["| ratio | measured | target | met |", "|---|---:|---:|:---:|"]
        for r in self.ratios:
            unit = r.get("unit", "×")
            target = (
                "–"
                if r["target"] is None
                else f"{'≥' if r['higher_is_better'] else '≤'} {r['target']:g}{'' if unit == '×' else unit}"
            )
            met = {True: "yes", False: "**no**", None: "–"}[r["met"]]
            value = f"{r['value']:.2f}{unit}" if r["value"] == r["value"] else "–"
            rows.append(f"| {r['name']} | {value} | {target} | {met} |")
        return "\n".join(rows)

    def save(self, body: str) -> None:
        """Replace this benchmark's entry in results.json and its section in RESULTS.md."""
        head = [
            f"## {self.title}",
            "",
            f"- status: **{self.status}**",
            f"- date: {self.started} (UTC)",
            f"- machine: {machine_line(self.machine)}",
            f"- command: `{self.command}`",
            "",
        ]
        notes = ["Notes:", "", *(f"- {n}" for n in self.notes)] if self.notes else []
        replace_entry(self.name, self.entry())
        replace_section(self.name, "\n".join([*head, body.rstrip(), "", *notes, "", self.ratio_table()]))
