"""A rolling restart of two routers in one group (issue 14): the pause in output, static vs dynamic membership.

    .venv/bin/python -m bench.bench_restart [--quick] [--repeats 3] [--rate 2000] [--duration 40]

One broker for the run; per trial fresh topics and a fresh group, the two modes alternating (static first):

- a source topic of ``--partitions`` (6) partitions, 10 bucket topics stamped ``LogAppendTime``;
- two ``bucketer route`` processes (exactly once, their defaults) named ``a`` and ``b`` (``--instance-id``, so
  both modes have the same ``transactional.id``\\s): **static** is the default (``group.instance.id``),
  **dynamic** adds ``--dynamic-membership``;
- a producer process (bench/latency_probe.py) sends ``--rate`` Sequin inserts/s for ``--duration`` s, event
  ``seq`` to partition ``seq % partitions``, each with its sequence number in ``sourceId``;
- a ``read_committed`` reader (a thread here, assigned every bucket partition) notes when each event arrives.

After ``WARM`` s of steady traffic, router a gets SIGTERM; once it has exited it is started again with the same
name; when it has logged its assignment and every source partition delivers events produced after that, the
same for b. Then the producer finishes and every event must arrive (else it is reported lost).

Measured over the restart window (a's SIGTERM to b consuming again): **pause** = the longest gap between
consecutive arrivals in all bucket topics (what a downstream reader sees stop), also by broker append time;
**partition stall** = the longest gap of any one source partition's events; end-to-end latency (produced ->
arrived, read_committed) p50/p99 of the events produced in the window, against the steady p99 before it;
the rebalances the other router saw (its ``revoked`` lines); lost and duplicated events in the bucket topics.
"""

from __future__ import annotations

import argparse
import array
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import REPO, WORK_DIR, Report, broker, unique_prefix
from bench.kafka_run import LOG_APPEND, create_topics
from bench.latency_probe import SEQ_DIGITS, pct

BUCKETS = 10
WARM = 8.0
MODES = ("static", "dynamic")


class RouterProc:
    """One ``bucketer route`` process; its stderr goes to a file the bench reads for its log lines."""

    def __init__(self, bootstrap: str, prefix: str, name: str, dynamic: bool, log: Path) -> None:
        self.name, self.log, self.prefix = name, log, prefix
        cmd = [sys.executable, "-m", "bucketer", "route", "--bootstrap", bootstrap, "--topic-prefix", prefix]
        cmd += ["--group", f"{prefix}router", "--buckets", str(BUCKETS), "--instance-id", name, "--progress", "3600"]
        with log.open("w") as err:
            self.proc = subprocess.Popen([*cmd, *(["--dynamic-membership"] if dynamic else [])], cwd=REPO, stderr=err)

    def lines(self, what: str) -> int:
        return sum(f"router INFO {what} {self.prefix}" in line for line in self.log.read_text().splitlines())

    def partitions(self) -> set[int]:
        """The source partitions of its last assignment."""
        mine = [line for line in self.log.read_text().splitlines() if f"router INFO assigned {self.prefix}" in line]
        return {int(p) for p in re.findall(r"\[(\d+)\]", mine[-1])} if mine else set()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"router {self.name} did not stop within {timeout:.0f}s (log {self.log})") from None


class Arrivals:
    """A read_committed reader of every bucket partition, in a thread: per event its first arrival (wall time)
    and append time, how many copies arrived; every arrival time, for the gaps."""

    def __init__(self, bootstrap: str, topics: list[str], tag: str, count: int) -> None:
        from confluent_kafka import Consumer, TopicPartition

        from connectors.topics import bucket_partitions

        self.marker, self.count = f'"sourceId":"{tag}-'.encode(), count
        self.first, self.appended = array.array("d", bytes(8 * count)), array.array("d", bytes(8 * count))
        self.copies = array.array("i", bytes(4 * count))
        self.times: list[float] = []  # every arrival (duplicates too), in order
        self.appends: list[float] = []
        self.seen = 0
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "bench-restart-reader",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 20,
            }
        )
        n = bucket_partitions(BUCKETS, None)
        self._consumer.assign([TopicPartition(t, p, 0) for t in topics for p in range(n)])
        self._thread = threading.Thread(target=self._run, name="arrivals", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        marker, width = self.marker, len(self.marker)
        while not self._stop.is_set():
            msgs = self._consumer.consume(2000, timeout=0.05)
            now = time.time()
            for m in msgs:
                value = m.value()
                at = value.find(marker) if m.error() is None and value else -1
                if at < 0:
                    continue
                seq = int(value[at + width : at + width + SEQ_DIGITS])
                appended = m.timestamp()[1] / 1000.0
                if not self.copies[seq]:
                    self.first[seq], self.appended[seq] = now, appended
                    self.seen += 1
                self.copies[seq] += 1
                self.times.append(now)
                self.appends.append(appended)

    def flowing(self, first_seq: int, partitions: int) -> bool:
        """Every source partition delivered an event at or past ``first_seq``."""
        fresh = set()
        for seq in range(max(0, first_seq), self.count):
            if self.copies[seq]:
                fresh.add(seq % partitions)
                if len(fresh) == partitions:
                    return True
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest gap between consecutive times in [start, end] (the gap across each edge included)."""
    inside = sorted(t for t in times if start <= t <= end)
    before = [t for t in times if t < start]
    after = [t for t in times if t > end]
    edges = [max(before)] if before else [start]
    edges += inside + ([min(after)] if after else [end])
    return max(b - a for a, b in zip(edges, edges[1:], strict=False))


def trial(bootstrap: str, mode: str, rate: float, duration: float, partitions: int, out: Path) -> dict[str, float]:
    from connectors.kafka import ensure_topics
    from connectors.kafka_conn import KafkaConnection
    from connectors.topics import TopicNames, bucket_partitions

    prefix = unique_prefix(f"restart-{mode}")
    names = TopicNames(prefix)
    create_topics(bootstrap, names.buckets(BUCKETS), bucket_partitions(BUCKETS, None), config=LOG_APPEND)
    create_topics(bootstrap, [names.source], partitions)
    ensure_topics(KafkaConnection.plain(bootstrap), [names.dlq], 1, 1)
    count, tag = int(rate * duration), f"rs{os.getpid() % 1000}{mode[0]}{int(time.time()) % 100000}"
    dyn = mode == "dynamic"
    routers = {n: RouterProc(bootstrap, prefix, n, dyn, out / f"{prefix}{n}.0.log") for n in ("a", "b")}
    reader = Arrivals(bootstrap, names.buckets(BUCKETS), tag, count)
    times_file = out / f"{prefix}produced.bin"
    try:
        wait(lambda: all(r.lines("assigned") for r in routers.values()), 90, "both routers assigned")
        producer = subprocess.Popen(
            [sys.executable, "-m", "bench.latency_probe", bootstrap, names.source, tag, str(rate), str(count)]
            + [str(times_file), str(partitions)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        wait(lambda: reader.seen > 0, 60, "the first event routed")
        started = time.time()  # about when the producer's clock started (it builds its events first)
        time.sleep(WARM)
        window = [time.time()]
        downs, other_revokes, others = [], 0, []
        for name, other in (("a", "b"), ("b", "a")):
            revoked_before, theirs = routers[other].lines("revoked"), routers[other].partitions()
            term = time.time()
            if routers[name].stop() != 0:
                raise RuntimeError(f"router {name} exited non-zero on SIGTERM (log {routers[name].log})")
            routers[name] = RouterProc(bootstrap, prefix, name, dyn, out / f"{prefix}{name}.1.log")
            wait(lambda n=name: routers[n].lines("assigned") > 0, 90, f"router {name} assigned again")
            back = time.time()
            downs.append(back - term)
            # Consuming again: every source partition delivers events produced after the restarted one's join
            # (the producer's schedule says which: event seq is sent at about started + seq / rate).
            after = int((back - started) * rate) + 1
            wait(lambda f=after: reader.flowing(f, partitions), 90, f"all partitions after {name}'s restart")
            other_revokes += routers[other].lines("revoked") - revoked_before
            others.append((term, time.time(), theirs))
        window.append(time.time())
        if producer.wait(duration + 60) != 0:
            raise RuntimeError("the producer failed")
        if window[1] > started + duration:
            raise RuntimeError(f"the restarts took {window[1] - window[0]:.0f}s, past the produced traffic")
        wait(lambda: reader.seen == count, 60, "every event arrived", fail=False)
        codes = [r.stop() for r in routers.values()]
        if any(codes):
            raise RuntimeError(f"routers exited {codes} at the end")
    finally:
        for r in routers.values():
            if r.proc.poll() is None:
                r.proc.kill()
        reader.close()
    produced = array.array("d")
    produced.frombytes(times_file.read_bytes())
    return summarize(reader, produced, window, partitions, downs, other_revokes, others)


def summarize(
    reader: Arrivals,
    produced: array.array,
    window: list[float],
    partitions: int,
    downs: list[float],
    revokes: int,
    others: list[tuple[float, float, set[int]]],
) -> dict[str, float]:
    """``others``: per restart (its start, its end, the source partitions of the router not restarting)."""
    t0, t1 = window
    count = reader.count
    by_partition = [
        [reader.first[s] for s in range(p, count, partitions) if reader.copies[s]] for p in range(partitions)
    ]
    lat_window = sorted(
        reader.first[s] - produced[s] for s in range(count) if reader.copies[s] and t0 <= produced[s] <= t1
    )
    steady = sorted(
        reader.first[s] - produced[s] for s in range(count) if reader.copies[s] and produced[0] + 2 <= produced[s] < t0
    )
    return {
        "pause_s": longest_gap(reader.times, t0, t1),
        "pause_append_s": longest_gap(reader.appends, t0, t1),
        "steady_gap_s": longest_gap(reader.times, produced[0] + 2, t0),
        "partition_stall_s": max(longest_gap(times, t0, t1) for times in by_partition),
        "other_stall_s": max(longest_gap(by_partition[p], a, b) for a, b, theirs in others for p in theirs),
        "p50_window_ms": 1000 * (pct(lat_window, 50) or float("nan")),
        "p99_window_ms": 1000 * (pct(lat_window, 99) or float("nan")),
        "p99_steady_ms": 1000 * (pct(steady, 99) or float("nan")),
        "restart_a_s": downs[0],
        "restart_b_s": downs[1],
        "window_s": t1 - t0,
        "other_router_revokes": float(revokes),
        "lost": float(sum(1 for s in range(count) if not reader.copies[s])),
        "duplicated": float(sum(max(0, c - 1) for c in reader.copies)),
        "events": float(count),
    }


def wait(cond, limit: float, what: str, fail: bool = True) -> None:  # noqa: ANN001
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            if fail:
                raise RuntimeError(f"timed out after {limit:.0f}s waiting for {what}")
            return
        time.sleep(0.05)


METRICS = [  # (key, label, unit)
    ("pause_s", "output pause (longest gap, all bucket topics, read_committed)", "s"),
    ("pause_append_s", "output pause by broker append time", "s"),
    ("partition_stall_s", "longest stall of one source partition", "s"),
    ("other_stall_s", "longest stall of a partition of the router not restarting", "s"),
    ("p50_window_ms", "end-to-end p50, events produced in the restart window", "ms"),
    ("p99_window_ms", "end-to-end p99, events produced in the restart window", "ms"),
    ("p99_steady_ms", "end-to-end p99, steady traffic before the restart", "ms"),
    ("steady_gap_s", "longest gap in steady traffic before the restart", "s"),
    ("restart_a_s", "router a: SIGTERM -> assigned again", "s"),
    ("restart_b_s", "router b: SIGTERM -> assigned again", "s"),
    ("window_s", "restart window (a's SIGTERM -> b consuming again)", "s"),
    ("other_router_revokes", "rebalances seen by the router not restarting (revoked lines, both restarts)", ""),
    ("lost", "events lost (never in a bucket topic)", ""),
    ("duplicated", "events duplicated in the bucket topics", ""),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--partitions", type=int, default=6)
    args = ap.parse_args(argv)
    repeats, duration = (1, 30.0) if args.quick else (args.repeats, args.duration)
    report = Report("restart", "Rolling restart of two routers: output pause, static vs dynamic membership")
    out = WORK_DIR / "restart"
    out.mkdir(parents=True, exist_ok=True)
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with broker() as bootstrap:
        for i in range(repeats):
            for mode in MODES:
                load = os.getloadavg()[0]
                result = trial(bootstrap, mode, args.rate, duration, args.partitions, out)
                result["loadavg"] = load
                samples[mode].append(result)
                print(mode, i, {k: round(v, 3) for k, v in result.items()}, flush=True)
    med: dict[str, dict[str, float]] = {m: {} for m in MODES}
    for mode in MODES:
        for key, _label, unit in METRICS:
            values = [s[key] for s in samples[mode]]
            med[mode][key] = report.measure(key, values, unit, mode=mode, rate=args.rate, partitions=args.partitions)
    report.ratio("output pause: static / dynamic", med["static"]["pause_s"], med["dynamic"]["pause_s"], 1.0, False)
    report.ratio(
        "other router's stall: static / dynamic",
        med["static"]["other_stall_s"],
        med["dynamic"]["other_stall_s"],
        1.0,
        False,
    )
    report.ratio(
        "window p99: static / dynamic", med["static"]["p99_window_ms"], med["dynamic"]["p99_window_ms"], 1.0, False
    )
    for mode in MODES:
        report.ratio(f"{mode}: window p99 / steady p99", med[mode]["p99_window_ms"], med[mode]["p99_steady_ms"])
    lost = sum(s["lost"] + s["duplicated"] for m in MODES for s in samples[m])
    report.notes += [
        f"{args.rate:.0f} events/s for {duration:.0f} s per trial into {args.partitions} source partitions, "
        f"{BUCKETS} buckets; {repeats} trials per mode, alternating static/dynamic on one broker; the first "
        f"{WARM:.0f} s are steady traffic, then a then b is restarted (SIGTERM, wait for the exit, start again).",
        "load average (1 min) at each trial's start: "
        + ", ".join(f"{m} {s['loadavg']:.2f}" for m in MODES for s in samples[m]),
        "every event arrived exactly once in every trial (read_committed)"
        if lost == 0
        else f"**{lost:.0f} events lost or duplicated** over all trials: see the lost/duplicated rows",
    ]
    report.figure(
        "restart_pause",
        "Rolling restart of two routers: pause in output",
        "bar",
        "",
        "seconds",
        [
            {
                "label": label,
                "x": list(MODES),
                "y": [med[m][key] for m in MODES],
                "lo": [min(s[key] for s in samples[m]) for m in MODES],
                "hi": [max(s[key] for s in samples[m]) for m in MODES],
            }
            for key, label in (
                ("pause_s", "output pause"),
                ("partition_stall_s", "longest partition stall"),
                ("other_stall_s", "stall of the other router's partitions"),
            )
        ],
    )
    rows = ["| measure | static (median, range) | dynamic (median, range) |", "|---|---:|---:|"]
    for key, label, unit in METRICS:
        cells = []
        for m in MODES:
            values = [s[key] for s in samples[m]]
            digits = 0 if unit in ("ms", "") else 2
            cells.append(f"{med[m][key]:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})")
        rows.append(f"| {label}{f' ({unit})' if unit else ''} | {cells[0]} | {cells[1]} |")
    report.save("\n".join(rows))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
