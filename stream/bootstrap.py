"""``bucketer bootstrap``: fill raw buckets by replaying ``activityRelations`` from its beginning.

The counterpart of the anchor system's snapshot copy pipes: a new warehouse (or a new bucket layout, or a
bucket that has to be refilled) gets its raw rows straight from the source topic, without going through the
bucket topics again. Each message is routed by the router's own ``BatchRouter`` (same decoder, same bucket
rule, same retirements), but the ``Sink`` it writes to is the warehouse: rows are inserted with the loader's
SQL (stream/ingest.py) into the raw bucket tables, only for the buckets asked for.

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
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from connectors.kafka import consumer_config
from connectors.topics import TopicNames
from connectors.warehouse import Warehouse, WarehouseError
from stream.buckets import raw_table
from stream.ingest import insert_sql, problem
from stream.routing import BatchRouter

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


def replay(
    wh: Warehouse,
    bootstrap: str,
    buckets: int,
    only: list[int] | None = None,
    topics: TopicNames | None = None,
    batch: int = 20_000,
    timeout: float = 30.0,
) -> BootstrapReport:
    """Replay the source topic into the raw tables of ``only`` (default: all buckets); then check."""
    topics = topics or TopicNames()
    selected = set(range(buckets) if not only else only)
    bad = sorted(b for b in selected if not 0 <= b < buckets)
    if bad:
        raise ValueError(f"invalid bucket(s) {bad}: expected 0 to {buckets - 1}")
    report = BootstrapReport()
    sink = WarehouseSink(wh, selected, report)
    router = BatchRouter(buckets)
    started = time.monotonic()
    consumer = Consumer(consumer_config(bootstrap, "bucketer-bootstrap-unused", **{"enable.auto.commit": False}))
    try:
        md = consumer.list_topics(topics.source, timeout=timeout).topics.get(topics.source)
        if md is None or md.error is not None or not md.partitions:
            raise LookupError(f"source topic {topics.source} not found")
        ends: dict[int, int] = {}
        for p in md.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topics.source, p), timeout=timeout)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topics.source, p, OFFSET_BEGINNING) for p in ends])
        remaining = dict(ends)
        idle_deadline = time.monotonic() + timeout
        while remaining:
            msgs = [m for m in consumer.consume(batch, timeout=0.5) if m.error() is None]
            if not msgs:
                # Transaction markers and aborted records take offsets but yield no message; ask for positions.
                for tp in consumer.position([TopicPartition(topics.source, p) for p in list(remaining)]):
                    if tp.offset >= remaining.get(tp.partition, 0):
                        remaining.pop(tp.partition, None)
                if time.monotonic() > idle_deadline:
                    raise TimeoutError(
                        f"bootstrap: no progress for {timeout:.0f}s with partitions {sorted(remaining)} "
                        "not at their end offsets"
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
            counts = router.route(wanted, sink)  # type: ignore[arg-type]  # Message has the SourceMessage methods
            sink.commit()
            report.messages += len(wanted)
            report.dead_lettered.update(counts.dlq)
    finally:
        consumer.close()
    report.seconds = time.monotonic() - started
    report.checks = distribution(wh, buckets, selected, report.written)
    return report


def distribution(wh: Warehouse, buckets: int, selected: set[int], written: Counter[int]) -> list[BucketCheck]:
    """Per selected bucket: live rows, share of all live rows, and rows whose hash says another bucket."""
    live: dict[int, tuple[int, int]] = {}
    for b in sorted(selected):
        rows = wh.rows(
            f"SELECT count(), countIf(cityHash64(segmentId) % {buckets} != {b}) "
            f"FROM {raw_table(b)} FINAL WHERE _deleted = 0"
        )
        live[b] = (int(rows[0][0]), int(rows[0][1]))
    total = sum(n for n, _ in live.values()) or 1
    return [BucketCheck(b, written.get(b, 0), n, n / total, mis) for b, (n, mis) in live.items()]
