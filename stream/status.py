"""What ``bucketer status`` shows: per bucket the live raw rows (FINAL), the cleaned rows, the bucket's share of
all raw rows, the cleaned snapshotId and its age; the DLQ's message count and the router's lag (when a Kafka
a Kafka connection is given). ``collect()`` gathers it; rendering lives in the CLI.

Kafka figures count messages as a ``read_committed`` consumer sees them (``connectors.kafka.group_lag``): the
DLQ count is every committed message of the DLQ; the router lag the committed messages of the source topic past
the router group's committed offsets (the whole partition when the group has committed nothing). Transaction
markers and aborted records are not messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from connectors.warehouse import Warehouse
from stream.buckets import cleaned_table, raw_table
from stream.enrich import REBUILD_LOG
from stream.incremental import maintenance_status
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
    # Incremental maintenance (stream/incremental.py; None in hourly mode): the newest change applied to the
    # cleaned bucket, how far behind now that is, and how many rows the last reconciliation found different.
    freshness: datetime | None = None
    freshness_lag_s: float | None = None
    reconcile_differing: int | None = None


@dataclass(frozen=True)
class Status:
    buckets: list[BucketStatus]
    raw_total: int
    cleaned_total: int
    generated_at: datetime
    dlq_messages: int | None = None
    router_lag: int | None = None
    kafka_error: str | None = None
    loader_lag: int | None = None
    notes: list[str] = field(default_factory=list)
    migration: dict[str, Any] | None = None  # the last gradual rebucket (stream/migration.py), if any
    # How old the Kafka figures (DLQ count, router and loader lag, kafka_error) are, seconds: None when read for
    # this status; a server (/v0/status) reads them at most every few seconds (KafkaFigures).
    kafka_age_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["generated_at"] = self.generated_at.isoformat()
        for b in out["buckets"]:
            for k in ("snapshot_id", "rebuilt_at", "next_rebuild", "freshness"):
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
    fresh = {f.bucket: f for f in maintenance_status(wh, n, at)}
    out = []
    for b, raw, cleaned, snap, (finished, seconds) in rows:
        snap_at, done_at = _utc(snap), _utc(finished)
        f = fresh.get(int(b))
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
                f.freshness if f else None,
                f.lag_seconds if f else None,
                f.differing if f else None,
            )
        )
    return Status(out, total, sum(s.cleaned_rows for s in out), at)


def kafka_figures(
    kafka: KafkaConnection,
    topics: TopicNames,
    router_group: str,
    timeout: float = 10.0,
    loader_group: str | None = None,
    buckets: int = 0,
) -> tuple[int | None, int | None, int | None]:
    """(DLQ messages, router lag, loader lag); None for a topic that does not exist (loader lag: when no
    ``loader_group`` is given). All counted as a read_committed reader sees them (connectors.kafka.group_lag):
    the DLQ and the bucket topics are written inside the router's transactions, so their offset spans would
    count commit markers and aborted records too."""
    from connectors.kafka import group_lag  # Kafka's client only when Kafka figures are asked for

    dlq = group_lag(kafka, None, [topics.dlq], timeout)
    lag = group_lag(kafka, router_group, [topics.source], timeout)
    loader = None
    if loader_group is not None and buckets:
        found = group_lag(kafka, loader_group, topics.buckets(buckets), timeout)
        loader = None if len(found.absent) == buckets else found.messages
    return (None if dlq.absent else dlq.messages), (None if lag.absent else lag.messages), loader


class KafkaFigures:
    """``kafka_figures`` read again at most every ``ttl`` seconds (a few Kafka round trips each, a timeout
    when Kafka is away; the status page asks every second or so): a call answers the last reading and its age.
    A failed reading is kept for ``ttl`` too (its error as ``kafka_error``), so a broker that is away costs one
    timeout per interval, not one per call. Calls during a reading wait for it rather than starting another."""

    def __init__(
        self,
        kafka: KafkaConnection,
        topics: TopicNames,
        router_group: str = "bucketer-router",
        loader_group: str | None = "bucketer-loader",
        ttl: float = 5.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._args = (kafka, topics, router_group, loader_group, timeout)
        self._ttl, self._clock = ttl, clock
        self._lock = threading.Lock()
        self._at: float | None = None
        self._buckets = -1
        self._last: tuple[tuple[int | None, int | None, int | None], str | None] = ((None, None, None), None)
        self.readings = 0  # Kafka readings made (for tests and logs)

    def __call__(self, buckets: int) -> tuple[tuple[int | None, int | None, int | None], str | None, float]:
        """((DLQ messages, router lag, loader lag), the error of a failed reading or None, age in seconds)."""
        kafka, topics, router_group, loader_group, timeout = self._args
        with self._lock:
            now = self._clock()
            if self._at is None or now - self._at >= self._ttl or buckets != self._buckets:
                self.readings += 1
                try:
                    figures = kafka_figures(kafka, topics, router_group, timeout, loader_group, buckets)
                    self._last = (figures, None)
                except Exception as exc:  # noqa: BLE001 - status still shows the warehouse when Kafka is away
                    self._last = ((None, None, None), " ".join(str(exc).split())[:200])
                self._at, self._buckets = self._clock(), buckets
            return self._last[0], self._last[1], max(0.0, now - self._at)


def collect(
    wh: Warehouse,
    buckets: int | None = None,
    kafka: KafkaConnection | None = None,
    topics: TopicNames | None = None,
    router_group: str = "bucketer-router",
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    loader_group: str | None = "bucketer-loader",
    figures: KafkaFigures | None = None,
) -> Status:
    """The warehouse's status with the Kafka figures: from ``figures`` (a cache, its age as ``kafka_age_s``)
    when given, else read now from ``kafka`` (none when neither is given)."""
    from stream.migration import read_state

    state = read_state(wh)
    status = replace(warehouse_status(wh, buckets, now), migration=state.as_json() if state is not None else None)
    if figures is not None:
        (dlq, lag, loader), error, age = figures(len(status.buckets))
        return replace(
            status, dlq_messages=dlq, router_lag=lag, kafka_error=error, loader_lag=loader, kafka_age_s=round(age, 3)
        )
    if kafka is None:
        return status
    try:
        dlq, lag, loader = kafka_figures(
            kafka, topics or TopicNames(), router_group, loader_group=loader_group, buckets=len(status.buckets)
        )
    except Exception as exc:  # status still shows the warehouse when Kafka is away
        return Status(
            status.buckets,
            status.raw_total,
            status.cleaned_total,
            status.generated_at,
            kafka_error=" ".join(str(exc).split())[:200],
            migration=status.migration,
        )
    return Status(
        status.buckets,
        status.raw_total,
        status.cleaned_total,
        status.generated_at,
        dlq,
        lag,
        loader_lag=loader,
        migration=status.migration,
    )
