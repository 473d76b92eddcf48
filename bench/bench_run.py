"""Peak memory and end-to-end rate of ``bucketer route`` and ``bucketer run`` at full speed.

Each contender is the real CLI in its own process, fed a backlog of loadgen traffic (all six topics, ~1.3 KB
activity messages) that is already on the broker, so it runs flat out; it exits by ``--until-idle``. The
process tree's RSS is sampled every 50 ms (bench.common.PeakRss). ``bucketer run`` holds the router, the
loader and the scheduler in one process with the embedded ClickHouse engine (chdb), so its peak includes the
engine's memory. Rates are input messages / wall time including start-up and the idle wait, so they are a
lower bound (the router's own rate is in the router section).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import PeakRss, Report, broker, unique_prefix

BUCKETER = [sys.executable, "-m", "bucketer.cli"]
IDLE = 3.0


def produce(bootstrap: str, prefix: str, count: int) -> None:
    subprocess.run(
        [
            *BUCKETER,
            "loadgen",
            "--bootstrap",
            bootstrap,
            "--count",
            str(count),
            "--seed",
            "5",
            "--topic-prefix",
            prefix,
            "--quiet",
        ],
        check=True,
        capture_output=True,
    )


def measure(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS MB, wall seconds) of one CLI run."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakRss(proc.pid) as rss:
        _, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed: {err[-500:]}")
    return rss.peak_mb, time.monotonic() - started - IDLE


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200_000, help="activity messages per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.count, args.repeats = 20_000, 1
    report = Report("run", "Peak memory of bucketer route and bucketer run at full speed")
    results: dict[str, list[tuple[float, float]]] = {"route": [], "run": []}
    with broker() as bootstrap:
        for _ in range(args.repeats):
            prefix = unique_prefix("mem")
            produce(bootstrap, prefix, args.count)
            results["route"].append(
                measure(
                    [
                        *BUCKETER,
                        "route",
                        "--bootstrap",
                        bootstrap,
                        "--topic-prefix",
                        prefix,
                        "--group",
                        prefix + "router",
                        "--until-idle",
                        str(IDLE),
                    ]
                )
            )
            prefix = unique_prefix("mem")
            produce(bootstrap, prefix, args.count)
            with tempfile.TemporaryDirectory() as data:
                results["run"].append(
                    measure(
                        [
                            *BUCKETER,
                            "run",
                            "--bootstrap",
                            bootstrap,
                            "--topic-prefix",
                            prefix,
                            "--data-dir",
                            str(Path(data) / "wh"),
                            "--until-idle",
                            str(IDLE),
                        ]
                    )
                )
    rows = [
        "| command | peak RSS MB (median) | runs MB | input msg/s incl. start-up (median) |",
        "|---|---:|---:|---:|",
    ]
    medians = {}
    for name, samples in results.items():
        peak = report.measure("peak RSS", [p for p, _ in samples], "MB", command=name)
        rate = report.measure("rate", [args.count / s for _, s in samples], "msg/s", command=name)
        medians[name] = peak
        rows.append(f"| bucketer {name} | {peak:,.0f} | {', '.join(f'{p:,.0f}' for p, _ in samples)} | {rate:,.0f} |")
    report.ratio("bucketer route peak RSS / 300 MB", medians["route"], 300, target=1, higher_is_better=False)
    report.notes += [
        f"{args.count:,} activity messages (plus the reference topics) per run, already on the broker; "
        f"{args.repeats} run(s) per command, 10 buckets, exactly once.",
        "bucketer run includes the embedded ClickHouse engine (chdb) in the same process; there is no RSS "
        "target for it in the issue, the figure is what to provision.",
    ]
    report.save("\n".join(rows))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
