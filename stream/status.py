"""What ``bucketer status`` shows: per bucket the live raw rows (FINAL), the cleaned rows, the bucket's share of
all raw rows, the cleaned snapshotId and its age; the DLQ's message count and the router's lag (when a Kafka
bootstrap is given). ``collect()`` gathers it; rendering lives in the CLI.

Kafka figures come from offsets only (no message is read): the DLQ count is the sum over its partitions of
high − low watermark; the router lag is the sum over the source topic's partitions of high watermark − the
router group's committed offset (the whole partition when the group has committed nothing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from connectors.topics import TopicNames
from connectors.warehouse import Warehouse
from stream.buckets import cleaned_table, raw_table
from stream.enrich import REBUILD_LOG
from stream.schedule import ScheduleConfig, next_slot
from stream.schema import bucket_count

log = logging.getLogger("bucketer.status")


@dataclass(frozen=True)
class BucketStatus:
    bucket: int
    raw_rows: int
    cleaned_rows: int
    share: float
    snapshot_id: datetime | None
    snapshot_age_s: float | None  # since the start of the snapshot's hour (snapshotId)
    rebuilt_at: datetime | None = None  # when the last rebuild finished (bucketer_rebuilds)
    rebuilt_age_s: float | None = None  # since that rebuild finished
    rebuild_seconds: float | None = None  # how long it took
    next_rebuild: datetime | None = None  # the next slot of the default staggered schedule


@dataclass(frozen=True)
class Status:
    buckets: list[BucketStatus]
    raw_total: int
    cleaned_total: int
    generated_at: datetime
    dlq_messages: int | None = None
    router_lag: int | None = None
    kafka_error: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["generated_at"] = self.generated_at.isoformat()
        for b in out["buckets"]:
            for k in ("snapshot_id", "rebuilt_at", "next_rebuild"):
                b[k] = b[k].isoformat() if b[k] else None
        return out


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.year <= 1970:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def warehouse_status(
    wh: Warehouse, buckets: int | None = None, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> Status:
    n = buckets or bucket_count(wh)
    if not n:
        raise LookupError("the warehouse has no bucketer schema yet (run the pipeline or `bucketer enrich` first)")
    logged = bool(
        wh.rows(
            "SELECT 1 FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
            {"t": REBUILD_LOG},
        )
    )
    last = (
        "(SELECT argMax(tuple(finishedAt, seconds), finishedAt) FROM {log} WHERE bucket = {b})"
        if logged
        else "tuple(toDateTime64(0, 3, 'UTC'), 0.0)"
    )
    parts = [
        f"SELECT {b} AS b, (SELECT count() FROM {raw_table(b)} FINAL) AS raw, "
        f"(SELECT count() FROM {cleaned_table(b)} FINAL) AS cleaned, "
        f"(SELECT max(snapshotId) FROM {cleaned_table(b)}) AS snap, " + last.format(log=REBUILD_LOG, b=b) + " AS last"
        for b in range(n)
    ]
    # ORDER BY after a UNION ALL binds to its last SELECT only: order the whole union from outside.
    rows = wh.rows("SELECT * FROM (" + " UNION ALL ".join(parts) + ") ORDER BY b")
    total = sum(int(r[1]) for r in rows)
    at = now()
    schedule = ScheduleConfig(buckets=n)
    out = []
    for b, raw, cleaned, snap, (finished, seconds) in rows:
        snap_at, done_at = _utc(snap), _utc(finished)
        out.append(
            BucketStatus(
                int(b),
                int(raw),
                int(cleaned),
                (int(raw) / total) if total else 0.0,
                snap_at,
                (at - snap_at).total_seconds() if snap_at else None,
                done_at,
                (at - done_at).total_seconds() if done_at else None,
                float(seconds) if done_at else None,
                next_slot(int(b), at, schedule),
            )
        )
    return Status(out, total, sum(s.cleaned_rows for s in out), at)


def kafka_figures(
    bootstrap: str, topics: TopicNames, router_group: str, timeout: float = 10.0
) -> tuple[int | None, int | None]:
    """(DLQ messages, router lag); None for a topic that does not exist."""
    from confluent_kafka import Consumer, TopicPartition

    from connectors.kafka import consumer_config

    consumer = Consumer(consumer_config(bootstrap, router_group))
    try:
        md = consumer.list_topics(timeout=timeout).topics

        def partitions(topic: str) -> list[TopicPartition] | None:
            meta = md.get(topic)
            if meta is None or meta.error is not None:
                return None
            return [TopicPartition(topic, p) for p in meta.partitions]

        dlq = None
        dlq_parts = partitions(topics.dlq)
        if dlq_parts is not None:
            dlq = count_committed(bootstrap, dlq_parts, timeout)
        lag = None
        src_parts = partitions(topics.source)
        if src_parts is not None:
            lag = 0
            for tp in consumer.committed(src_parts, timeout=timeout):
                low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
                lag += max(0, high - (tp.offset if tp.offset >= 0 else low))
        return dlq, lag
    finally:
        consumer.close()


def count_committed(bootstrap: str, parts: list[Any], timeout: float = 10.0) -> int:
    """Committed messages in ``parts``, counted by reading them (``read_committed``).

    The offset span (high - low watermark) over-counts a topic written in transactions: every commit or abort
    marker takes an offset, and aborted records stay in the log. The DLQ is written inside the router's
    transactions, so its messages are counted by reading them up to the high watermarks seen at the start. A
    DLQ too large to read within ``timeout`` is reported as its offset span, an upper bound (logged)."""
    from confluent_kafka import Consumer, TopicPartition

    from connectors.kafka import consumer_config

    consumer = Consumer(
        consumer_config(
            bootstrap,
            "bucketer-status-unused",
            **{"isolation.level": "read_committed", "enable.auto.commit": False, "fetch.max.bytes": 64 << 20},
        )
    )
    try:
        ends: dict[int, int] = {}
        span = 0
        for tp in parts:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            if high > low:
                ends[tp.partition] = high
                span += high - low
        if not ends:
            return 0
        topic = parts[0].topic
        consumer.assign(
            [
                TopicPartition(topic, p, low)
                for p, low in (
                    (p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[0]) for p in ends
                )
            ]
        )
        count, deadline = 0, time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            msgs = consumer.consume(10_000, timeout=0.2)
            count += sum(1 for m in msgs if m.error() is None)
            for tp in consumer.position([TopicPartition(topic, p) for p in list(ends)]):
                if tp.offset >= ends[tp.partition]:
                    ends.pop(tp.partition)
        if ends:
            log.warning(
                "status: DLQ too large to count within %.0fs; showing its offset span %d (an upper bound)",
                timeout,
                span,
            )
            return span
        return count
    finally:
        consumer.close()


def collect(
    wh: Warehouse,
    buckets: int | None = None,
    bootstrap: str | None = None,
    topics: TopicNames | None = None,
    router_group: str = "bucketer-router",
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Status:
    status = warehouse_status(wh, buckets, now)
    if not bootstrap:
        return status
    try:
        dlq, lag = kafka_figures(bootstrap, topics or TopicNames(), router_group)
    except Exception as exc:  # status still shows the warehouse when Kafka is away
        return Status(
            status.buckets,
            status.raw_total,
            status.cleaned_total,
            status.generated_at,
            kafka_error=" ".join(str(exc).split())[:200],
        )
    return Status(status.buckets, status.raw_total, status.cleaned_total, status.generated_at, dlq, lag)
