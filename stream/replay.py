"""``bucketer bootstrap``: fill the warehouse by replaying the reference topics and ``activityRelations``.

The counterpart of the anchor system's snapshot copy pipes: a new warehouse (or a new bucket layout, or a
bucket that has to be refilled) gets its raw rows straight from the source topic, without going through the
bucket topics again. Each message is routed by the router's own ``BatchRouter`` (same decoder, same bucket
rule, same retirements), but the ``Sink`` it writes to is the warehouse: rows are inserted with the loader's
SQL (stream/row_sql.py) into the raw bucket tables, only for the buckets asked for.

- The five reference topics are replayed first, always in full, into their tables with the loader's SQL
  (``insert_sql(table)``); a bad reference message is counted per table and reported, not dead-lettered again.
- The replay reads every partition from its first offset up to the end offsets seen at the start
  (``read_committed``), with no consumer group: it never moves the router's or the loader's offsets.
- Appending is idempotent: raw tables are ReplacingMergeTree on ``_version``, so rows already there (from the
  loader or an earlier bootstrap) collapse with the replayed ones under ``FINAL``.
- Bad input is counted per class and reported, not dead-lettered again (the live router already sent each
  one to the DLQ; ``dead_lettered`` says how many the replay met).
- At the end, the distribution check: per bucket the rows replayed, the live rows (FINAL, not deleted), their
  share, and — computed by ClickHouse itself — how many rows sit in a bucket other than
  ``cityHash64(segmentId) % N``, which must be 0.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from connectors.kafka import consumer_config, consumer_error
from connectors.kafka_conn import KafkaConnection
from connectors.model import bucket_sql
from connectors.topics import TopicNames
from connectors.warehouse import Warehouse, WarehouseError
from stream.buckets import raw_table
from stream.routing import BatchRouter
from stream.row_sql import insert_sql, problem

log = logging.getLogger("bucketer.bootstrap")


@dataclass
class BucketCheck:
    bucket: int
    replayed: int
    live_rows: int
    share: float
    misplaced: int


@dataclass
class BootstrapReport:
    messages: int = 0
    written: Counter[int] = field(default_factory=Counter)
    skipped_buckets: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    rejected: int = 0
    seconds: float = 0.0
    checks: list[BucketCheck] = field(default_factory=list)
    reference_messages: Counter[str] = field(default_factory=Counter)  # per reference table: messages read
    reference_bad: Counter[str] = field(default_factory=Counter)  # refused (the loader dead-lettered them)
    reference_live: dict[str, int] = field(default_factory=dict)  # live rows (FINAL, not deleted) at the end

    @property
    def ok(self) -> bool:
        return all(c.misplaced == 0 for c in self.checks)


class WarehouseSink:
    """A router ``Sink`` that inserts rows of the selected buckets into their raw tables on ``commit``."""

    exactly_once = False

    def __init__(self, wh: Warehouse, buckets: set[int], report: BootstrapReport) -> None:
        self._wh, self._buckets, self._report = wh, buckets, report
        self._columns, self._select = insert_sql("activityRelations")
        self._pending: dict[int, list[bytes]] = {}

    def open(self) -> None: ...
    def begin(self) -> None: ...
    def abort(self) -> None:
        self._pending.clear()

    def close(self) -> None: ...

    def write(self, bucket: int, key: bytes | None, value: bytes, headers: object = None) -> None:
        if bucket in self._buckets:
            self._pending.setdefault(bucket, []).append(value)
        else:
            self._report.skipped_buckets += 1

    def dead_letter(self, key: bytes | None, value: bytes | None, headers: object) -> None:
        # Counted by BatchCounts.dlq; the live router already dead-lettered this message.
        return None

    def commit(self, offsets: object = None, consumer: object = None) -> None:
        for bucket, values in sorted(self._pending.items()):
            self._insert(bucket, values)
        self._pending.clear()

    def _insert(self, bucket: int, values: list[bytes]) -> None:
        table = f"{raw_table(bucket)} ({self._columns})"
        try:
            self._wh.insert_json(table, self._select, values)
        except WarehouseError:
            # Keep what the warehouse takes; count (and log) what it refuses, one reason each.
            good = []
            for v in values:
                reason = problem(v, "activityRelations")
                if reason is None:
                    good.append(v)
                else:
                    self._report.rejected += 1
                    log.warning("bootstrap: bucket %d refused a message: %s", bucket, reason)
            if good:
                self._wh.insert_json(table, self._select, good)
            values = good
        self._report.written[bucket] += len(values)


Progress = Callable[[str, int, int], None]  # (topic, messages read so far, messages to read at most)


def read_topic(
    consumer: Consumer,
    topic: str,
    handle: Callable[[list[Message]], None],
    batch: int = 20_000,
    timeout: float = 30.0,
    progress: Progress | None = None,
    required: bool = True,
) -> int:
    """Read every partition of ``topic`` from its first offset up to the end offsets seen at the start (no
    consumer group, nothing committed), handing each batch of messages to ``handle``; returns messages read.
    A missing topic raises LookupError when ``required``, else reads nothing."""
    md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if md is None or md.error is not None or not md.partitions:
        if required:
            raise LookupError(f"topic {topic} not found")
        return 0
    ends: dict[int, int] = {}
    total = 0
    for p in md.partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
        if high > low:
            ends[p] = high
            total += high - low
    read = 0
    if progress:
        progress(topic, 0, total)
    if not ends:
        return 0
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    remaining = dict(ends)
    idle_deadline = time.monotonic() + timeout
    try:
        while remaining:
            msgs = []
            for m in consumer.consume(batch, timeout=0.5):
                err = m.error()
                if err is None:
                    msgs.append(m)
                elif (exc := consumer_error(err, f"replay {topic} [{m.partition()}]")) is not None:
                    log.warning("%s", exc)  # librdkafka retries; the idle deadline bounds the wait
            if not msgs:
                # Transaction markers and aborted records take offsets but yield no message; ask for positions.
                for tp in consumer.position([TopicPartition(topic, p) for p in list(remaining)]):
                    if tp.offset >= remaining.get(tp.partition, 0):
                        remaining.pop(tp.partition, None)
                if time.monotonic() > idle_deadline:
                    raise TimeoutError(
                        f"bootstrap: no progress for {timeout:.0f}s on {topic} with partitions "
                        f"{sorted(remaining)} not at their end offsets"
                    )
                continue
            idle_deadline = time.monotonic() + timeout
            wanted = []
            for m in msgs:
                part, off = m.partition() or 0, m.offset() or 0
                end = remaining.get(part)
                if end is not None and off < end:
                    wanted.append(m)
                    if off + 1 >= end:
                        remaining.pop(part)
            if wanted:
                handle(wanted)
            read += len(wanted)
            if progress:
                progress(topic, read, total)
    finally:
        consumer.unassign()
    if progress:
        progress(topic, total, total)
    return read


class ReferenceWriter:
    """Inserts reference-topic messages into their table with the loader's SQL; counts what it refuses."""

    def __init__(self, wh: Warehouse, table: str, report: BootstrapReport) -> None:
        self._wh, self._table, self._report = wh, table, report
        columns, self._select = insert_sql(table)
        self._target = f"{table} ({columns})"

    def __call__(self, msgs: list[Message]) -> None:
        values = [m.value() or b"" for m in msgs]
        self._report.reference_messages[self._table] += len(values)
        try:
            self._wh.insert_json(self._target, self._select, values)
            return
        except WarehouseError:
            pass
        good = []
        for v in values:
            reason = problem(v, self._table)
            if reason is None:
                good.append(v)
            else:
                # The loader already dead-lettered this one; count it, name it, never drop it silently.
                self._report.reference_bad[self._table] += 1
                log.warning("bootstrap: %s refused a message: %s", self._table, reason)
        if good:
            self._wh.insert_json(self._target, self._select, good)


def replay(
    wh: Warehouse,
    kafka: KafkaConnection,
    buckets: int,
    only: list[int] | None = None,
    topics: TopicNames | None = None,
    batch: int = 20_000,
    timeout: float = 30.0,
    progress: Progress | None = None,
) -> BootstrapReport:
    """Replay the five reference topics in full into their tables, then the source topic into the raw tables
    of ``only`` (default: all buckets); then check the distribution and count the live rows per table."""
    topics = topics or TopicNames()
    selected = set(range(buckets) if not only else only)
    bad = sorted(b for b in selected if not 0 <= b < buckets)
    if bad:
        raise ValueError(f"invalid bucket(s) {bad}: expected 0 to {buckets - 1}")
    report = BootstrapReport()
    sink = WarehouseSink(wh, selected, report)
    router = BatchRouter(buckets)
    started = time.monotonic()

    def route(msgs: list[Message]) -> None:
        counts = router.route(msgs, sink)  # type: ignore[arg-type]  # Message has the SourceMessage methods
        sink.commit()
        report.messages += len(msgs)
        report.dead_lettered.update(counts.dlq)

    consumer = Consumer(consumer_config(kafka, "bucketer-bootstrap-unused", **{"enable.auto.commit": False}))
    try:
        for table, topic in topics.references().items():
            report.reference_messages[table] += 0
            read_topic(consumer, topic, ReferenceWriter(wh, table, report), batch, timeout, progress, required=False)
        try:
            read_topic(consumer, topics.source, route, batch, timeout, progress)
        except LookupError:
            raise LookupError(f"source topic {topics.source} not found") from None
    finally:
        consumer.close()
    report.seconds = time.monotonic() - started
    report.checks = distribution(wh, buckets, selected, report.written)
    for table in topics.references():
        report.reference_live[table] = int(wh.rows(f"SELECT count() FROM {table} FINAL WHERE _deleted = 0")[0][0])
    return report


def distribution(wh: Warehouse, buckets: int, selected: set[int], written: Counter[int]) -> list[BucketCheck]:
    """Per selected bucket: live rows, share of all live rows, and rows whose hash says another bucket."""
    live: dict[int, tuple[int, int]] = {}
    for b in sorted(selected):
        rows = wh.rows(
            f"SELECT count(), countIf({bucket_sql('segmentId', buckets)} != {b}) "
            f"FROM {raw_table(b)} FINAL WHERE _deleted = 0"
        )
        live[b] = (int(rows[0][0]), int(rows[0][1]))
    total = sum(n for n, _ in live.values()) or 1
    return [BucketCheck(b, written.get(b, 0), n, n / total, mis) for b, (n, mis) in live.items()]
