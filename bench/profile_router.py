"""Profile ``bucketer route`` at full speed with py-spy (the bench extra); prints and writes a summary.

    .venv/bin/python -m bench.profile_router --bootstrap HOST:PORT [--count 300000] [--at-least-once] --out NAME

Fills a fresh source topic with loadgen traffic (as bench_router), then runs the router under
``py-spy record --idle -r 200 -f raw`` until it exits by itself (``--until-idle``). The raw stacks go to
``bench/_work/NAME.txt`` and a summary to ``bench/NAME.md``: the share of the router thread's samples
(idle waits included: waiting in ``consume`` or a transaction call is time too) whose stack passes through
each of the hot-path functions, and the functions with the most samples at the top of the stack.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys

from bench.bench_faust import command, outputs
from bench.bench_router import sequin_messages
from bench.common import BENCH_DIR, REPO, WORK_DIR, unique_prefix
from bench.kafka_run import delete_prefix, prepare

# (label, a substring of a py-spy frame "function (file:line)") for the shares table, in hot-path order.
MARKERS = (
    ("in C, called from the loop itself (consume: fetch wait + message objects)", "@loop"),
    ("routing a batch (stream/routing.py route)", "route (stream/routing.py"),
    ("  decode (connectors/sequin.py)", "decode (connectors/sequin.py"),
    ("  valid_timestamp", "valid_timestamp (connectors/sequin.py"),
    ("  produce (stream/sinks.py write)", "write (stream/sinks.py"),
    ("  replay of a routed batch into the sink (stream/routing.py RecordedBatch.replay)", "replay (stream/routing.py"),
    ("batch bookkeeping (stream/router.py _batch, outside route)", "_batch (stream/router.py"),
    ("waiting for the previous batch's commit (router _settle: what pipelining left)", "_settle (stream/router"),
    ("transaction calls (send_offsets + commit, waited on in the watchdog)", "_watched (stream/sinks.py"),
    ("  sink.commit (send_offsets + commit_transaction)", "commit (stream/sinks.py"),
    ("begin_transaction", "begin (stream/sinks.py"),
    ("at-least-once flush / drain / settle", "flush (stream/sinks.py"),
    ("  settle (pipelined at least once)", "settle (stream/sinks.py"),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--count", type=int, default=300_000)
    ap.add_argument("--at-least-once", action="store_true")
    ap.add_argument("--out", required=True, help="name of the summary (bench/NAME.md)")
    args = ap.parse_args(argv)
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    msgs = sequin_messages(args.count)
    contender = "router-alo" if args.at_least_once else "router-eos"
    prefix = unique_prefix("prof")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    raw = WORK_DIR / f"{args.out}.txt"
    try:
        prepare(args.bootstrap, prefix, msgs, outputs(prefix, contender, 10))
        cmd = [pyspy, "record", "--idle", "-r", "200", "-f", "raw", "-o", str(raw), "--"]
        cmd += command(contender, args.bootstrap, prefix, 10, idle=2.0)
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    finally:
        delete_prefix(args.bootstrap, prefix)
    text = summarize(raw, contender, args.count, " ".join(cmd[:7]) + " -- bucketer route ...")
    (BENCH_DIR / f"{args.out}.md").write_text(text)
    print(text)
    return 0


def summarize(raw: os.PathLike[str], contender: str, count: int, cmd: str) -> str:
    total = 0
    inclusive: collections.Counter[str] = collections.Counter()
    top: collections.Counter[str] = collections.Counter()
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if "_loop (stream/router.py" not in stack:
                continue  # the router thread only (librdkafka's own threads are not Python)
            samples = int(n)
            total += samples
            frames = stack.split(";")
            top[frames[-1]] += samples
            if "_loop (stream/router.py" in frames[-1] or "_turn (stream/router.py" in frames[-1]:
                frames.append("@loop")
            for label, marker in MARKERS:
                if any(marker in fr for fr in frames):
                    inclusive[label] += samples
    rows = [
        f"# py-spy profile: {contender}, {count:,} loadgen messages, 10 buckets",
        "",
        f"- command: `{cmd}`; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (shared machine)",
        f"- {total:,} samples of the router thread (200/s, idle included); a row counts the samples whose stack "
        "passes through it (nested rows overlap their parent).",
        "",
        "| where | share |",
        "|---|---:|",
    ]
    rows += [f"| {label} | {100 * inclusive[label] / max(total, 1):.1f}% |" for label, _ in MARKERS]
    rows += ["", "Top of stack (self time):", "", "| frame | share |", "|---|---:|"]
    rows += [f"| `{fr}` | {100 * n / max(total, 1):.1f}% |" for fr, n in top.most_common(12)]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
