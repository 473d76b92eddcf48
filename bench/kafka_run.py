"""Run one Kafka worker process over a prepared source topic and measure how fast it moved the messages.

Method (the same for every contender, so ratios compare like with like):

1. ``prepare(bootstrap, prefix, msgs, outputs)`` creates ``{prefix}activityRelations`` (3 partitions) and
   fills it with the messages **before** the worker starts; it pre-creates the output topics with
   ``message.timestamp.type=LogAppendTime``, so the broker stamps every output record when it is appended.
2. ``run_worker(argv, …)`` starts the worker, polls the outputs' end offsets (read_committed) until they
   hold at least as many records as the input and stop growing, then sends SIGTERM.
3. The outputs are read back with ``isolation.level=read_committed``: their count must cover the input
   (else the run is an error, not a number), and the rate is the number of records appended after the
   first append millisecond divided by (last append − first append), scaled to input messages
   (retirements add outputs). Start-up, group join and the first batch are therefore excluded, for
   every contender alike; the wall time including start-up is reported too.
4. CPU seconds (user+system of the worker tree) from the first poll that sees output to the end, over
   the messages output in that stretch (end offsets), and peak RSS.
   On a shared machine, messages per CPU-second is steadier than messages per second.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from bench.common import REPO, PeakRss

SOURCE = "activityRelations"
PARTITIONS = 3
LOG_APPEND = {"message.timestamp.type": "LogAppendTime"}


class RunError(RuntimeError):
    """A run that produced no valid measurement (worker died, output incomplete, timeout)."""


@dataclass(frozen=True)
class RunResult:
    inputs: int
    outputs: int
    msgs_per_s: float  # input messages per second, first output append -> last output append
    wall_s: float  # worker start -> outputs complete (start-up included)
    cpu_s: float  # worker CPU seconds from the first poll that saw output to completion
    cpu_msgs: float  # input messages routed in that stretch (from end offsets)
    peak_rss_mb: float
    coarse: bool = False  # too few messages for a rate between appends (smoke runs)
    exit_s: float = float("nan")  # worker start -> its own exit, less its idle wait (run_worker(idle=...))

    @property
    def msgs_per_exit_s(self) -> float:
        """Input messages / (process start to exit, less the idle wait): start-up and group join included."""
        return self.inputs / self.exit_s if self.exit_s > 0 else float("nan")

    @property
    def msgs_per_cpu_s(self) -> float:
        return self.cpu_msgs / self.cpu_s if self.cpu_s > 0 and self.cpu_msgs > 0 else float("nan")


def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def create_topics(
    bootstrap: str, names: list[str], partitions: int = PARTITIONS, config: dict[str, str] | None = None
) -> None:
    client = admin(bootstrap)  # kept alive until the futures resolve
    futures = client.create_topics(
        [NewTopic(n, partitions, 1, config=config or {}) for n in names], operation_timeout=30
    )
    for name, fut in futures.items():
        try:
            fut.result()
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RunError(f"cannot create topic {name}: {exc}") from None
    _wait_metadata(bootstrap, names)


def _wait_metadata(bootstrap: str, names: list[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    client = admin(bootstrap)
    while time.monotonic() < deadline:
        md = client.list_topics(timeout=5)
        if all(n in md.topics and not md.topics[n].error and md.topics[n].partitions for n in names):
            return
        time.sleep(0.1)
    raise RunError(f"topics not visible in metadata after {timeout:.0f}s")


def delete_prefix(bootstrap: str, prefix: str) -> None:
    client = admin(bootstrap)
    names = [t for t in client.list_topics(timeout=10).topics if t.startswith(prefix)]
    if names:
        for fut in client.delete_topics(names, operation_timeout=30).values():
            try:
                fut.result()
            except KafkaException:
                pass


def prepare(
    bootstrap: str,
    prefix: str,
    msgs: list[tuple[bytes, bytes | None]],
    outputs: list[str],
    out_partitions: int = PARTITIONS,
) -> None:
    """Create and fill the source topic; create the (LogAppendTime) output topics."""
    create_topics(bootstrap, [f"{prefix}{SOURCE}"])
    create_topics(bootstrap, outputs, partitions=out_partitions, config=LOG_APPEND)
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.size": 1048576,
            "queue.buffering.max.kbytes": 1048576,
            "partitioner": "murmur2_random",
        }
    )
    topic = f"{prefix}{SOURCE}"
    failed: list[str] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(str(err))

    for key, value in msgs:
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60) or failed:
        raise RunError(f"could not fill {topic}: {failed[:3] or 'flush timed out'}")


def _end_offsets(client: AdminClient, tps: list[TopicPartition]) -> int:
    from confluent_kafka import IsolationLevel

    req = {tp: OffsetSpec.latest() for tp in tps}
    futs = client.list_offsets(req, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=10)
    return sum(f.result().offset for f in futs.values())


def _partitions(bootstrap: str, topics: list[str]) -> list[TopicPartition]:
    md = admin(bootstrap).list_topics(timeout=10)
    return [TopicPartition(t, p) for t in topics for p in md.topics[t].partitions]


def read_outputs(bootstrap: str, topics: list[str], timeout: float = 120.0) -> tuple[int, list[int]]:
    """(record count, sorted LogAppendTime timestamps in ms) of everything committed in ``topics``."""
    tps = [TopicPartition(tp.topic, tp.partition, 0) for tp in _partitions(bootstrap, topics)]
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.max.bytes": 52428800,
        }
    )
    consumer.assign(tps)
    stamps: list[int] = []
    done: set[tuple[str, int]] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(done) < len(tps):
            if time.monotonic() > deadline:
                raise RunError(f"reading the outputs back took over {timeout:.0f}s")
            for m in consumer.consume(10000, 1.0):
                err = m.error()
                if err is None:
                    stamps.append(m.timestamp()[1])
                elif err.code() == err._PARTITION_EOF:
                    done.add((m.topic(), m.partition()))
                else:
                    raise RunError(f"reading {m.topic()}: {err}")
    finally:
        consumer.close()
    stamps.sort()
    return len(stamps), stamps


def run_worker(
    argv: list[str],
    bootstrap: str,
    outputs: list[str],
    inputs: int,
    timeout: float = 600.0,
    settle: float = 1.5,
    log_path: Path | None = None,
    idle: float | None = None,
) -> RunResult:
    """Start ``argv`` (cwd = the repository), wait until ``outputs`` hold the routed input, measure, stop.

    With ``idle`` the worker exits by itself after that many seconds without input (``--until-idle``): it is
    waited for, not stopped, and ``exit_s`` is its start to exit less ``idle``."""
    client = admin(bootstrap)
    tps = _partitions(bootstrap, outputs)
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    exited_at: list[float] = []  # when the worker exited, seen by a thread blocked in wait()
    waiter = threading.Thread(target=lambda: (proc.wait(), exited_at.append(time.monotonic())), daemon=True)
    waiter.start()
    cpu_first: float | None = None
    total_first = 0
    try:
        with PeakRss(proc.pid) as rss:
            last, last_change = -1, time.monotonic()
            while True:
                now = time.monotonic()
                if now - started > timeout:
                    raise RunError(
                        f"{Path(argv[2] if len(argv) > 2 else argv[0]).name}: "
                        f"outputs incomplete after {timeout:.0f}s ({max(last, 0)} of ≥{inputs})"
                    )
                if proc.poll() is not None:
                    if idle is not None and last >= inputs:
                        break  # finished and exited by itself before the outputs were seen settled
                    raise RunError(
                        f"worker exited with code {proc.returncode} before finishing"
                        + (f"; see {log_path}" if log_path else "")
                    )
                try:
                    total = _end_offsets(client, tps)
                except KafkaException:  # e.g. NOT_LEADER right after topic creation: ask again
                    time.sleep(0.2)
                    continue
                if total > 0 and cpu_first is None:
                    cpu_first, total_first = rss.cpu_seconds(), total
                if total != last:
                    last, last_change = total, now
                elif total >= inputs and now - last_change >= settle:
                    break
                time.sleep(0.1)
            wall = last_change - started
            cpu = rss.cpu_seconds() - (cpu_first or 0.0)
            exit_s = float("nan")
            if idle is not None:
                waiter.join(idle + 60)
                if not exited_at:
                    raise RunError(f"worker did not exit within {idle + 60:.0f}s of finishing")
                exit_s = exited_at[0] - started - idle
                if proc.returncode != 0:
                    raise RunError(f"worker exited with code {proc.returncode}")
            else:
                _stop(proc)
            peak = rss.peak_mb
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if log_path:
            log.close()  # type: ignore[union-attr]
    count, stamps = read_outputs(bootstrap, outputs)
    if count < inputs:
        raise RunError(f"only {count} committed output records for {inputs} inputs")
    first, end = stamps[0], stamps[-1]
    after_first = sum(1 for s in stamps if s > first)
    # A run too small to span several appends (one batch) gives no rate between appends: fall back to
    # everything over the span plus one millisecond, flagged as coarse.
    coarse = after_first < count // 10
    if coarse:
        rate = inputs / ((end - first + 1) / 1000.0)
    else:
        rate = after_first / ((end - first) / 1000.0) * (inputs / count)
    # CPU per message over the same stretch: outputs seen between the first poll with output and the end.
    cpu_msgs = max(last - total_first, 0) * inputs / count
    return RunResult(inputs, count, rate, wall, cpu, cpu_msgs, peak, coarse, exit_s)


def _stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
