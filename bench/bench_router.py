"""Router throughput against a fair ceiling, quiet and under CPU contention.

    .venv/bin/python -m bench.bench_router [--quick] [--count 500000] [--repeats 3] [--phases quiet,contention]

Every contender is a process started on the same pre-filled source topic (realistic loadgen traffic:
~1.35 KB Sequin activityRelations messages, 3.7% bad input, ~6% updates that retire an old row) on the same
broker in the same run, and exits by itself after ``--until-idle`` seconds without input
(bench/kafka_run.py ``run_worker(idle=...)``). Two rates per run, both for every contender alike:

- **process**: input messages / (process start to exit, less the idle wait): start-up, group join and the
  last commit included;
- **append**: the broker's LogAppendTime stamps of the outputs (read back read_committed): records after
  the first append millisecond / (last - first append), scaled to input messages (as bench_faust).

Contenders (each the median of ``--repeats``, round-robin, each repeat starting one further along):

- ``passthrough``: THE ceiling, a pipelined plain copy (bench/passthrough.py: consume 5000, produce each,
  ``poll(0)``, commit asynchronously, no flush per batch, one flush at the end);
- ``passthrough-flush``: the same copy flushing after every batch (a lowered ceiling, the old row);
- ``router-eos`` / ``router-alo``: ``bucketer route`` with its defaults (exactly once) / ``--at-least-once``.

The ``contention`` phase runs the same trials with one CPU-bound process (a Python busy loop) beside the
broker, as on a shared host. Ratios are taken within one phase of one run; the load average (``uptime``)
is recorded next to every phase.

Targets: router exactly once >= 0.8x the pipelined ceiling, at least once >= 0.95x; under contention the
exactly-once ratio within 0.1 of the quiet one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import traceback
from collections import defaultdict
from collections.abc import Iterator

from bench.bench_faust import command, outputs, rotated
from bench.common import WORK_DIR, Report, broker, spread, unique_prefix
from bench.kafka_run import RunError, RunResult, delete_prefix, prepare, run_worker

CONTENDERS = ("passthrough", "passthrough-flush", "router-eos", "router-alo")
LABELS = {
    "passthrough": "passthrough, pipelined (the ceiling)",
    "passthrough-flush": "passthrough, flush per batch (lowered ceiling)",
    "router-eos": "bucketer route (exactly once, default)",
    "router-alo": "bucketer route --at-least-once",
}
IDLE = 3.0
BAD_FRACTION = 0.037


def sequin_messages(count: int, seed: int = 1) -> list[tuple[bytes, bytes | None]]:
    from stream.loadgen import LoadgenConfig, generate

    cfg = LoadgenConfig(count=count, seed=seed, bad_fraction=BAD_FRACTION)
    return [(g.key, g.value) for g in generate(cfg) if g.topic == "activityRelations"]


@contextlib.contextmanager
def burner(on: bool) -> Iterator[None]:
    """One CPU-bound process beside the broker (a busy loop), for the contention phase."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def run_one(bootstrap: str, contender: str, msgs: list[tuple[bytes, bytes | None]], tag: str) -> RunResult:
    prefix = unique_prefix(contender.replace("-", ""))
    out = outputs(prefix, contender, 10)
    try:
        prepare(bootstrap, prefix, msgs, out)
        log = WORK_DIR / f"router-{contender}-{tag}.log"
        return run_worker(
            command(contender, bootstrap, prefix, 10, idle=IDLE),
            bootstrap,
            out,
            len(msgs),
            timeout=120 + len(msgs) / 2000,
            log_path=log,
            idle=IDLE,
        )
    finally:
        delete_prefix(bootstrap, prefix)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few messages, one repeat, quiet only")
    ap.add_argument("--count", type=int, help="messages per run (default 500000; quick 5000)")
    ap.add_argument("--repeats", type=int, help="repeats, median reported (default 3; quick 1)")
    ap.add_argument("--phases", help="comma-separated: quiet,contention (default both; quick quiet)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    args = ap.parse_args(argv)
    count = args.count or (5000 if args.quick else 500_000)
    repeats = args.repeats or (1 if args.quick else 3)
    phases = tuple((args.phases or ("quiet" if args.quick else "quiet,contention")).split(","))
    contenders = tuple(c for c in args.contenders.split(",") if c)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    report = Report("router", "Router vs the Kafka ceiling (pipelined passthrough), quiet and under contention")
    msgs = sequin_messages(count)
    avg = sum(len(v or b"") for _, v in msgs) / len(msgs)
    results: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    errors: dict[tuple[str, str], str] = {}
    loads: dict[str, list[str]] = defaultdict(list)
    with broker() as bootstrap:
        # Untimed: the first group join on a fresh broker also creates __consumer_offsets and __transaction_state.
        for c in ("passthrough", "router-eos"):
            with contextlib.suppress(RunError):
                run_one(bootstrap, c, msgs[:2000], "warmup")
        for phase in phases:
            with burner(phase == "contention"):
                loads[phase].append(uptime())
                for rep in range(repeats):
                    for c in rotated(contenders, rep):
                        if (c, phase) in errors:
                            continue
                        try:
                            r = run_one(bootstrap, c, msgs, phase)
                        except (RunError, Exception) as exc:  # noqa: BLE001 - recorded as the finding
                            errors[(c, phase)] = f"{type(exc).__name__}: {exc}"
                            traceback.print_exc()
                            continue
                        results[(c, phase)].append(r)
                        print(
                            f"bench_router: {phase:10s} {c:18s} process {r.msgs_per_exit_s:9,.0f} msg/s "
                            f"append {r.msgs_per_s:9,.0f} msg/s cpu {r.msgs_per_cpu_s:9,.0f} msg/CPU-s "
                            f"rss {r.peak_rss_mb:4.0f} MB ({uptime()})",
                            file=sys.stderr,
                            flush=True,
                        )
                loads[phase].append(uptime())
    write_report(report, count, avg, repeats, phases, contenders, results, errors, loads)
    return 0


def uptime() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def write_report(
    report: Report,
    count: int,
    avg: float,
    repeats: int,
    phases: tuple[str, ...],
    contenders: tuple[str, ...],
    results: dict[tuple[str, str], list[RunResult]],
    errors: dict[tuple[str, str], str],
    loads: dict[str, list[str]],
) -> None:
    body = [
        f"{count:,} loadgen messages of ~{avg:,.0f} bytes ({BAD_FRACTION:.1%} bad), source 3 partitions; router to "
        "10 bucket topics x 3 partitions, passthrough to 1 topic x 3; every contender a process exiting by itself "
        f"after {IDLE:g} s idle; median of {repeats}, round-robin.",
        "",
    ]
    for phase in phases:
        body += [
            f"### {phase}" + (" (one CPU-bound busy loop beside the broker)" if phase == "contention" else ""),
            "",
            f"Load average before / after the phase: {' / '.join(loads.get(phase, []))}.",
            "",
            "| contender | process msg/s (median) | range | append msg/s (median) | range | msg per CPU-s "
            "| peak RSS MB | outputs/inputs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        proc: dict[str, float] = {}
        app: dict[str, float] = {}
        for c in contenders:
            rs = results.get((c, phase), [])
            if not rs:
                body.append(f"| {LABELS[c]} | – | – | – | – | – | – | {errors.get((c, phase), 'not run')} |")
                continue
            proc[c] = report.measure("process_msgs_per_s", [r.msgs_per_exit_s for r in rs], "msg/s", c=c, p=phase)
            app[c] = report.measure("append_msgs_per_s", [r.msgs_per_s for r in rs], "msg/s", c=c, p=phase)
            cpu = report.measure("msgs_per_cpu_s", [r.msgs_per_cpu_s for r in rs], "msg/CPU-s", c=c, p=phase)
            rss = max(r.peak_rss_mb for r in rs)
            body.append(
                f"| {LABELS[c]} | {proc[c]:,.0f} | {spread([r.msgs_per_exit_s for r in rs])} | {app[c]:,.0f} "
                f"| {spread([r.msgs_per_s for r in rs])} | {cpu:,.0f} | {rss:.0f} "
                f"| {rs[0].outputs / rs[0].inputs:.3f} |"
            )
        body.append("")
        for c, target in (("router-eos", 0.8), ("router-alo", 0.95), ("passthrough-flush", None)):
            if c in proc and "passthrough" in proc:
                report.ratio(f"{phase}: {c} / pipelined passthrough (process)", proc[c], proc["passthrough"], target)
                report.ratio(f"{phase}: {c} / pipelined passthrough (append)", app[c], app["passthrough"], target)
    for (c, phase), e in errors.items():
        report.status = "partial"
        report.notes.append(f"{c} ({phase}) failed: {e} (log: bench/_work/router-{c}-{phase}.log)")
    report.notes.append(
        "process = input messages / (process start to exit − the idle wait), start-up and group join included; "
        "append = broker LogAppendTime rate of the outputs between first and last append (start-up excluded)."
    )
    report.notes.append(
        "The pipelined passthrough commits its offsets before its records are acknowledged: it guarantees "
        "nothing on a crash. It is the ceiling of what confluent-kafka moves here, not a design to copy."
    )
    report.notes.append(
        "The machine has 2 cores shared with the broker, this benchmark's poller and (this session) other "
        "engineers' work; ratios within one phase of one run are what count, absolute rates move with the load."
    )
    report.save("\n".join(body))


if __name__ == "__main__":
    raise SystemExit(main())
