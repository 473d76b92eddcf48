"""The loader: bucket topics and reference topics → raw bucket tables and reference tables.

``Loader(config, warehouse).run()`` consumes (read_committed, manual commits) the N bucket topics and the five
reference topics, collects message values per target table, and flushes when a batch reaches
``max_rows`` messages or ``max_bytes`` bytes, or is ``max_wait`` seconds old, or when the input is drained
(a poll brought nothing: caught up, so waiting longer only adds latency; after a full poll, which means a
backlog, it takes two empty polls, so a fetch in flight does not cut a catch-up batch short). A flush hands
each table's message bytes to ClickHouse as they are (``Warehouse.insert_json`` with the SQL of
stream/row_sql.py: the engine parses the JSON) and only then commits the next offsets. On the embedded
warehouse a flush that spans several raw buckets is parsed in one query into an in-memory stage that each
bucket table then takes its rows from (planning the parsing SELECT costs tens of milliseconds, which per
bucket table used to dominate a flush). A crash before the commit replays the batch, which is harmless: rows
are versioned (ReplacingMergeTree on ``_version``), so a replay leaves ``FINAL`` unchanged.

Bad messages never stop the loader and are never dropped silently: when an insert fails on its data (a
ClickHouse parse/type/throwIf error, ``DATA_ERRORS``), ``row_sql.classify_problem`` names the bad messages and
their DLQ class, the rest is inserted again, and if the warehouse still refuses, the batch is split in halves
until the refused message is alone. Any other failure is retried (``retry_backoff``) and then raised, never
blamed on a message. Each
refused message goes to the DLQ topic with the reason (headers of CONTRACTS.md) and is counted in
``stats.dead_lettered``; DLQ deliveries are confirmed before the commit. If the warehouse itself is down (a
probe query fails) the loader raises without committing.

A broker outage (a commit refused as retriable, a retriable consumer error) is ridden out: the inserted batch's
offsets are kept and their commit retried with ``commit_backoff`` while reading goes on, one line is logged
when the broker becomes unreachable and one when it is back, and while failing with nothing to commit the
broker is probed every ``probe_interval`` so a quiet but healthy broker ends the outage too (any success
resets the failure clock). Only ``outage_deadline`` seconds of failure without a success raise LoaderError,
with the real Kafka error. Time spent failing never counts as idle.

Every ``progress_interval`` a line reports messages/s, the group's read_committed lag
(``connectors.kafka.lag_estimate``, also ``stats.lag`` for the metrics), messages loaded and rows inserted. On
start, a warehouse without raw rows whose group already committed bucket offsets gets a one-line hint to run
``bucketer bootstrap``.

``stop()`` only sets a flag; ``run()`` then flushes, commits (a refused commit is retried for ``stop_grace``
seconds, then left: the rows are in) and closes. ``run(until_idle=S)`` returns after S seconds without new
messages (batch use, tests).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from connectors.kafka import (
    KafkaRetryError,
    Member,
    classify,
    consumer_config,
    consumer_error,
    dlq_headers,
    from_exception,
    lag_estimate,
    producer_config,
)
from connectors.kafka_conn import KafkaConnection
from connectors.sequin import commit_time
from connectors.topics import TopicNames
from connectors.warehouse import SupportsJsonParts, Warehouse, WarehouseError
from stream.buckets import bucket_of_raw, raw_table
from stream.cdc import RESOLVE_KIND, TOAST_BYTES, Item, Resolver, inspect
from stream.row_sql import classify_problem, insert_sql
from stream.schema import stage_columns

log = logging.getLogger("bucketer.loader")
ACTIVITY = "activityRelations"
# ClickHouse error codes that blame the data (parse errors, types, ranges, our throwIf): bisect and dead-letter.
# Any other failure (too many parts, memory, a lost connection) is retried, never blamed on a message.
DATA_ERRORS = frozenset({6, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117, 131, 321, 395, 407, 691})


def is_data_error(exc: BaseException) -> bool:
    return isinstance(exc, WarehouseError) and exc.code in DATA_ERRORS


_CONSUME_MAX = 10_000  # messages per consume() call


@dataclass(frozen=True)
class LoaderConfig:
    kafka: KafkaConnection
    buckets: int
    group: str = "bucketer-loader"
    topics: TopicNames = field(default_factory=TopicNames)
    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    max_wait: float = 1.0
    poll_timeout: float = 0.2
    drained_after: float = 0.02  # a pending batch is handed over after a poll this long brings nothing
    consumer_overrides: Mapping[str, Any] = field(default_factory=dict)
    # With an instance id (--instance-id, BUCKETER_INSTANCE_ID): static membership under that name and
    # cooperative-sticky assignment: a restarted loader gets its partitions back with no rebalance; a joining one
    # takes only the partitions it is given, the others go on loading the rest (on_revoke gets only those).
    # Without one, a dynamic eager member as before: `run` with a static+cooperative loader did not finish after
    # a broker restart (commits waiting for the coordinator, tests/integration/test_broker_bounce.py; not solved).
    instance_id: str | None = None
    # Waits before retrying an insert that failed for a reason other than its data (then: give up, no commit).
    retry_backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    # A broker outage (failed commits, retriable consumer errors, failed probes) is ridden out this long, then
    # run() raises LoaderError. The failure clock starts at the first failure and is reset by any success.
    outage_deadline: float = 300.0
    commit_backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)
    probe_interval: float = 2.0  # while failing with nothing to commit, ask the broker this often if it is back
    stop_grace: float = 10.0  # after stop(), a commit the broker refuses is retried this long, then left
    progress_interval: float = 10.0  # seconds between progress lines (and lag updates)


@dataclass
class LoaderStats:
    messages: int = 0  # read from Kafka
    committed: int = 0  # read, inserted or dead-lettered, and their offsets committed
    inserted: dict[str, int] = field(default_factory=dict)
    dead_lettered: int = 0
    dlq: Counter[str] = field(default_factory=Counter)  # dead letters by class (docs/CONTRACTS.md)
    flushes: int = 0
    lag: int | None = None  # read_committed lag of the group on its assigned partitions (last progress line)
    outages: int = 0  # times the broker became unreachable and the loader rode it out
    cdc: Any = None  # stream/cdc.py CdcStats: toast values, key-only deletes, updates without old values

    def progress(self, seconds: float, read_before: int) -> str:
        rate = (self.messages - read_before) / seconds if seconds > 0 else 0.0
        return (
            f"load: {rate:.0f} msg/s lag={'?' if self.lag is None else self.lag} loaded={self.committed} "
            f"rows={sum(self.inserted.values())} dlq={self.dead_lettered} flushes={self.flushes}"
        )


@dataclass(frozen=True)
class Origin:
    topic: str
    partition: int
    offset: int
    key: bytes | None


@dataclass
class _Pending:
    """One table's share of a batch. Where each value came from is kept in flat arrays, not in the Message
    objects: 100k live Messages (garbage-collector-tracked) make every GC pass slower."""

    topic: str
    values: list[bytes] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    partitions: array = field(default_factory=lambda: array("i"))
    offsets: array = field(default_factory=lambda: array("q"))

    def origin(self, i: int) -> Origin:
        return Origin(self.topic, self.partitions[i], self.offsets[i], self.keys[i])


class LoaderError(RuntimeError):
    """The loader cannot go on; nothing of the current batch was committed (it will be replayed)."""


class WarehouseUnavailable(LoaderError):
    """The warehouse does not answer."""


class DeadLetterFailed(LoaderError):
    """A dead letter could not be delivered, so its offset must not be committed."""


class Loader:
    loop_beat: float | None = None  # time.monotonic() as the loop last turned (stream/metrics.py Health)

    def __init__(
        self,
        config: LoaderConfig,
        warehouse: Warehouse,
        clock: Callable[[], float] = time.monotonic,
        consumer_factory: Callable[[dict[str, Any]], Any] = Consumer,
        producer_factory: Callable[[dict[str, Any]], Any] = Producer,
        sleep: Callable[[float], None] = time.sleep,
        after_flush: Callable[[Warehouse, dict[int | None, datetime]], object] | None = None,
    ) -> None:
        """``consumer_factory``/``producer_factory`` build the Kafka clients from their config (tests pass fakes);
        ``clock``/``sleep`` drive the batch timers, backoffs and the outage deadline. ``after_flush(warehouse,
        marks)`` runs after a batch's inserts and before its offsets are committed (the cleaned buckets'
        maintenance, stream/incremental.py; ``marks``: ``_landed``): if it fails, the batch is not committed and
        is replayed."""
        self._after_flush = after_flush
        self.config = config
        self.warehouse = warehouse
        self.clock = clock
        self._sleep = sleep
        self._consumer_factory, self._producer_factory = consumer_factory, producer_factory
        self.stats = LoaderStats()
        self._stop = False
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._targets: dict[str, tuple[str, str]] = {}  # topic -> (table, kind)
        for n in range(config.buckets):
            self._targets[config.topics.bucket(n)] = (raw_table(n), ACTIVITY)
        for table, topic in config.topics.references().items():
            self._targets[topic] = (table, table)
        self._targets[config.topics.resolve] = (RESOLVE_KIND, RESOLVE_KIND)
        self._sql = {kind: insert_sql(kind) for _, kind in self._targets.values() if kind != RESOLVE_KIND}
        self._resolver = Resolver(warehouse)
        self.stats.cdc = self._resolver.stats
        self._part_sql = insert_sql(ACTIVITY, part=True)
        self._stage = f"bucketer_loader_stage_{uuid.uuid4().hex[:12]}"
        self._pending: dict[str, _Pending] = {}
        self._offsets: dict[tuple[str, int], int] = {}
        self._bytes = 0
        self._count = 0
        self._batch_started: float | None = None
        self._dlq_errors: list[str] = []
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: tuple[Future[None], list[TopicPartition], int] | None = None
        self._batch_messages = 0
        # Offsets of inserted batches whose commit failed (broker away): kept, merged, retried with backoff.
        self._uncommitted: dict[tuple[str, int], int] = {}
        self._uncommitted_messages = 0
        self._failing_since: float | None = None
        self._next_commit = 0.0
        self._next_probe = 0.0
        self._commit_attempts = 0
        self._client_errors: list[KafkaError] = []
        self._last_busy = self._assignment_changed = 0.0
        self._assigned: set[tuple[str, int]] = set()
        self._member: Member | None = None
        # stream/migration.py: a new topic -> table mapping of the bucket topics, and the hold of the flip.
        self._retarget: tuple[dict[str, str], threading.Event] | None = None
        self._hold: threading.Event | None = None
        self._held = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop = True

    @property
    def failing(self) -> bool:
        """Kafka is failing right now (an outage being ridden out)."""
        return self._failing_since is not None

    def run(self, until_idle: float | None = None) -> LoaderStats:
        cfg = self.config
        overrides = {
            "topic.metadata.refresh.interval.ms": 2000,
            "max.partition.fetch.bytes": 16 << 20,
            "fetch.max.bytes": 64 << 20,
            # A synchronous commit waits this long for a missing coordinator: bounded, so an outage blocks the
            # loop (progress lines, probes, the deadline) for seconds, not the default minute per attempt.
            "socket.timeout.ms": 10_000,
            # Client-level errors (all brokers down) come here, not through consume(): the loop handles them.
            "error_cb": self._client_errors.append,
            **cfg.consumer_overrides,
        }
        self._member = Member(cfg.group, cfg.instance_id) if cfg.instance_id else None
        instance = f"loader.{self._member.name}" if self._member else None
        conf = consumer_config(cfg.kafka, cfg.group, instance=instance, cooperative=bool(instance), **overrides)
        self._consumer = self._consumer_factory(conf)
        # A dead letter may wait out a broker outage as long as the loader does.
        dlq_settings: dict[str, Any] = {"message.timeout.ms": int(max(60.0, cfg.outage_deadline) * 1000)}
        self._producer = self._producer_factory(
            producer_config(cfg.kafka, on_delivery=self._on_dlq_delivery, **dlq_settings)
        )
        # One insert runs in the background while the next batch is read; its offsets wait with it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader-insert")
        try:
            self._consumer.subscribe(list(self._targets), on_assign=self._on_assign, on_revoke=self._on_revoke)
            self._history_hint(self._consumer)
            self._last_busy = self._assignment_changed = last_progress = self.clock()
            read_before = 0
            backlog = False
            while not self._stop:
                self.loop_beat = time.monotonic()  # /healthz (stream/metrics.py Health): the loop turns
                if self._retarget is not None or self._hold is not None:
                    self._migration_step()
                    if self._hold is not None:
                        continue
                # While a batch waits, poll briefly: an empty poll means the input is drained. While an insert
                # runs, poll briefly too, so its offsets are committed soon after it ends, not a long poll later.
                busy = self._offsets or self._inflight is not None
                timeout = min(cfg.poll_timeout, cfg.drained_after) if busy else cfg.poll_timeout
                msgs = self._consumer.consume(num_messages=_CONSUME_MAX, timeout=timeout)
                if self._client_errors:
                    self._client_error()
                drained = False
                if msgs:
                    self._take(msgs)
                    self._busy()
                    # A full consume means a backlog: then one empty poll is more likely a fetch still in
                    # flight than the end of the input, and handing over there would split the batch.
                    backlog = len(msgs) >= _CONSUME_MAX
                elif self._offsets:
                    drained, backlog = not backlog, False
                if self._reap(wait=False):
                    self._busy()
                if self._uncommitted and self.clock() >= self._next_commit:
                    self._commit_pending()
                    self._busy()
                elif self._failing_since is not None and not self._uncommitted and self.clock() >= self._next_probe:
                    self._probe_kafka()
                # Hand over a full or old batch, and one as soon as the input is drained (caught up).
                if self._due() or drained:
                    self._dispatch()  # may first wait for the previous insert
                    self._busy()
                now = self.clock()
                if now - last_progress >= cfg.progress_interval:
                    if self._failing_since is None:
                        self.stats.lag = lag_estimate(self._consumer)
                    log.info("%s", self.stats.progress(now - last_progress, read_before))
                    last_progress, read_before = now, self.stats.messages
                if until_idle is not None and self.idle(until_idle):
                    break
            self.flush()
            self._drain_commits()
            if self._failing_since is None and self._consumer is not None:
                self.stats.lag = lag_estimate(self._consumer)
        except BaseException:
            self._close()
            raise
        self._close()
        return self.stats

    def _close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._inflight = None
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(10)
        if consumer is not None:
            consumer.close()
        member, self._member = self._member, None
        if member is not None:
            member.release()

    def retarget(self, targets: Mapping[str, str]) -> threading.Event:
        """Map the bucket topics to ``targets`` (topic -> raw table) from the next loop on: what was read under
        the old mapping is flushed and committed first, then the subscription is replaced. The event is set
        once done. (stream/migration.py)"""
        done = threading.Event()
        self._retarget = (dict(targets), done)
        return done

    def hold(self) -> threading.Event:
        """Flush, commit and stop reading until ``resume()``; the event is set once held."""
        self._held.clear()
        self._hold = threading.Event()
        return self._held

    def resume(self) -> None:
        self._hold = None

    def _migration_step(self) -> None:
        if self._retarget is not None:
            (targets, done), self._retarget = self._retarget, None
            self.flush()
            self._targets = {t: v for t, v in self._targets.items() if v[1] != ACTIVITY}
            self._targets.update({topic: (table, ACTIVITY) for topic, table in targets.items()})
            assert self._consumer is not None
            self._consumer.subscribe(list(self._targets), on_assign=self._on_assign, on_revoke=self._on_revoke)
            log.info("loader: bucket topics now land in %s", ", ".join(sorted(set(targets.values()))))
            done.set()
        if self._hold is not None:
            if not self._held.is_set():
                self.flush()
                self._held.set()
            self._busy()
            time.sleep(0.05)

    def _busy(self) -> None:
        self._last_busy = self.clock()

    def idle(self, seconds: float) -> bool:
        """Idle for ``seconds``: everything read is written and committed, and for that long no message came,
        no batch ended, the assignment did not change and Kafka did not fail (an outage is not idleness: the
        input may be waiting on the broker that is away; nor is the wait for a rejoin after it). Without any
        partition assigned (more loaders than partitions, or a rebalance that does not end) it takes
        ``max(30, seconds)``. Never time spent waiting for an insert: a slow insert must not end a run while
        input is still coming."""
        if self._offsets or self._inflight is not None or self._uncommitted or self._failing_since is not None:
            return False
        quiet = self.clock() - max(self._last_busy, self._assignment_changed)
        return quiet >= (seconds if self._assigned else max(30.0, seconds))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned |= {(tp.topic, tp.partition) for tp in partitions}
        self._assignment_changed = self.clock()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned -= {(tp.topic, tp.partition) for tp in partitions}
        self._assignment_changed = self.clock()
        # Before partitions go to another loader, write and commit what was read from them. While closing
        # (the executor is gone) nothing more can be written: what is left is replayed, which is harmless.
        if self._executor is None:
            return
        self.flush()
        if self._uncommitted:
            self._commit_pending()

    # --- intake ----------------------------------------------------------------------------------------------

    def _take(self, msgs: list[Message]) -> None:
        # The hot loop: a few C calls per message, no parsing; the value bytes go to ClickHouse as they are.
        targets, pending, offsets = self._targets, self._pending, self._offsets
        if self._batch_started is None:
            self._batch_started = self.clock()
        taken = size = 0
        for m in msgs:
            err = m.error()
            if err is not None:
                self._consumer_error(err)
                continue
            # A message without an error always has its topic, partition and offset.
            topic: str = m.topic()  # type: ignore[assignment]
            partition: int = m.partition()  # type: ignore[assignment]
            offset: int = m.offset()  # type: ignore[assignment]
            offsets[(topic, partition)] = offset + 1
            taken += 1
            value = m.value()
            if not value:
                self._dead_letter(
                    "tombstone", "empty value (tombstone)", Origin(topic, partition, offset, m.key()), b""
                )
                continue
            table = targets[topic][0]
            p = pending.get(table)
            if p is None:
                p = pending[table] = _Pending(topic)
            p.values.append(value)
            p.keys.append(m.key())
            p.partitions.append(partition)
            p.offsets.append(offset)
            size += len(value)
        if taken and self._failing_since is not None and not self._uncommitted:
            self._recovered()
        self.stats.messages += taken
        self._batch_messages += taken
        self._bytes += size
        self._count = sum(len(p.values) for p in pending.values())

    def _consumer_error(self, err: KafkaError) -> None:
        # A bucket topic not created yet is not an outage: the router creates it with its first message.
        exc = consumer_error(err, "loader consume", missing_ok=True)
        if exc is not None:
            self._outage(str(exc))

    def _client_error(self) -> None:
        """Errors of the client as a whole (error_cb): all brokers down starts an outage (the probe then sees it
        through), a fatal error stops the loader; the rest (one connection closed, ...) librdkafka retries."""
        errors, self._client_errors = self._client_errors, []
        for err in errors:
            if err.fatal():
                raise classify(err, "loader")
            if err.code() == KafkaError._ALL_BROKERS_DOWN:
                self._outage(str(classify(err, "loader")))
            else:
                log.debug("loader: %s", err.str())

    def _due(self) -> bool:
        if not self._offsets:
            return False
        if self._count >= self.config.max_rows or self._bytes >= self.config.max_bytes:
            return True
        started = self._batch_started
        return started is not None and self.clock() - started >= self.config.max_wait

    # --- flush -----------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Insert every pending message, then commit the offsets after them; returns when done."""
        self._dispatch()
        self._reap(wait=True)

    def _dispatch(self) -> None:
        """Start inserting the current batch in the background (after the previous one is committed)."""
        if not self._offsets or self._executor is None:
            return
        self._reap(wait=True)
        pending, self._pending = self._pending, {}
        offsets = self._commit_offsets()
        self._offsets = {}
        self._bytes = self._count = 0
        self._batch_started = None
        self._inflight = (self._executor.submit(self._write, pending), offsets, self._batch_messages)
        self._batch_messages = 0

    def _commit_offsets(self) -> list[TopicPartition]:
        """The offsets to commit for the current batch: after its last message, or the consumer's position when
        that is further. Every message before the position was handed to this loader and is in this batch or an
        earlier one; the position also steps over the transaction marker that ends a routed batch, so a drained
        loader's committed offset is the end of the partition (its read_committed lag 0, not 1 per partition)."""
        offsets = dict(self._offsets)
        try:
            positions = self._consumer.position([TopicPartition(t, p) for t, p in offsets]) if self._consumer else []
        except KafkaException:  # no position known: the offsets after the messages
            positions = []
        for tp in positions:
            key = (tp.topic, tp.partition)
            if tp.error is None and key in offsets and tp.offset > offsets[key]:
                offsets[key] = tp.offset
        return [TopicPartition(t, p, o) for (t, p), o in offsets.items()]

    def _write(self, pending: dict[str, _Pending]) -> None:
        landed = self._landed(pending) if self._after_flush is not None else {}
        special = self._take_special(pending)
        todo = [(table, p) for table, p in pending.items() if p.values]
        buckets = [(table, p) for table, p in todo if self._kind(table) == ACTIVITY]
        if len(buckets) > 1 and isinstance(self.warehouse, SupportsJsonParts):
            done = self._insert_parsed_once(self.warehouse, buckets)
            todo = [(table, p) for table, p in todo if table not in done]
        for table, p in todo:
            self._insert(table, p)
        if special:  # after the batch's ordinary rows: they may be the stored versions these resolve against
            self._resolver.apply(special, self._dead_letter)
        self._confirm_dlq()
        if self._after_flush is not None:
            self._after_flush(self.warehouse, landed)

    def _landed(self, pending: dict[str, _Pending]) -> dict[int | None, datetime]:
        """The batch's freshness marks: per raw bucket (None: a reference table, which every bucket reads) the
        newest Sequin ``commit_timestamp`` among the last message of each partition in the batch (a partition's
        messages arrive in commit order; across partitions this may under-state, never over-state). The resolve
        topic and the migration's inbox name no bucket and give no mark."""
        marks: dict[int | None, datetime] = {}
        for table, p in pending.items():
            if not p.values:
                continue
            kind = self._kind(table)
            bucket: int | None
            if kind == ACTIVITY:
                if (bucket := bucket_of_raw(table)) is None:
                    continue
            elif kind == RESOLVE_KIND:
                continue
            else:
                bucket = None
            last = {part: i for i, part in enumerate(p.partitions)}
            stamps = [t for i in last.values() if (t := commit_time(p.values[i])) is not None]
            if stamps:
                newest = max(stamps)
                marks[bucket] = max(newest, marks.get(bucket, newest))
        return marks

    def _take_special(self, pending: dict[str, _Pending]) -> list[Item]:
        """Take out of ``pending`` the messages resolved against the warehouse (stream/cdc.py): values
        ``"unchanged_toast"``, key-only deletes of reference tables, and the whole resolve topic. A byte scan finds
        the candidates; only those are parsed here."""
        items: list[Item] = []
        for table, p in pending.items():
            kind = self._kind(table)
            values = p.values
            if kind == RESOLVE_KIND:
                scan: Iterable[int] = range(len(values))
            elif kind == ACTIVITY:  # the hot path: one C substring search per message
                scan = [i for i, v in enumerate(values) if TOAST_BYTES in v]
            else:
                scan = [i for i, v in enumerate(values) if TOAST_BYTES in v or b"delete" in v]
            found = [(i, s) for i in scan if (s := inspect(kind, values[i])) is not None]
            if not found:
                continue
            items += [Item(table, kind, s, p.origin(i), p.values[i]) for i, s in found]
            taken = {i for i, _ in found}
            keep = [i for i in range(len(p.values)) if i not in taken]
            p.values = [p.values[i] for i in keep]
            p.keys = [p.keys[i] for i in keep]
            p.partitions = array("i", (p.partitions[i] for i in keep))
            p.offsets = array("q", (p.offsets[i] for i in keep))
        return items

    def _insert_parsed_once(self, wh: SupportsJsonParts, buckets: list[tuple[str, _Pending]]) -> set[str]:
        """The fast path for a batch spanning several raw buckets: ClickHouse parses every message of the batch
        in one query (planning that SELECT costs tens of ms, per INSERT) into an in-memory stage, and each bucket
        table takes its share from there. Returns the tables written; on any failure the rest go through
        ``_insert`` (retries, and the bisection that finds bad messages). A table written twice is harmless:
        rows are versioned."""
        columns, select = self._part_sql
        stage = self._stage
        done: set[str] = set()
        try:
            with wh.json_parts([p.values for _, p in buckets]) as source:
                self.warehouse.command(
                    f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} ({stage_columns()}) ENGINE = Memory"
                )
                self.warehouse.command(f"TRUNCATE TABLE {stage}")
                self.warehouse.command(
                    f"INSERT INTO {stage} ({columns}, `_part`) " + select.replace("{source}", source)
                )
                for i, (table, p) in enumerate(buckets):
                    self.warehouse.command(
                        f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {stage} WHERE _part = {i}"
                    )
                    self.stats.inserted[table] = self.stats.inserted.get(table, 0) + len(p.values)
                    done.add(table)
                self.warehouse.command(f"TRUNCATE TABLE {stage}")
        except WarehouseError as exc:
            level = logging.INFO if is_data_error(exc) else logging.WARNING
            log.log(
                level, "loader: one-parse insert of %d buckets failed (%s); inserting table by table", len(buckets), exc
            )
        return done

    def _reap(self, wait: bool) -> bool:
        """Commit the offsets of the background insert once it has succeeded (True); re-raise its failure."""
        if self._inflight is None:
            return False
        future, offsets, messages = self._inflight
        if not wait and not future.done():
            return False
        self._inflight = None
        future.result()  # raises the insert's error: nothing of that batch is committed
        self.stats.flushes += 1
        for tp in offsets:
            self._uncommitted[(tp.topic, tp.partition)] = tp.offset
        self._uncommitted_messages += messages
        self._commit_pending()
        return True

    def _commit_pending(self) -> bool:
        """Commit the offsets of every inserted batch. A retriable failure (broker away) keeps them for a retry
        with backoff (the rows are inserted; a replay would be harmless, a lost offset is not needed); past
        ``outage_deadline`` of continuous failure, or on a fatal error, raises LoaderError."""
        if not self._uncommitted or self._consumer is None:
            return not self._uncommitted
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._uncommitted.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            err = from_exception(exc, "loader commit")
            if not isinstance(err, KafkaRetryError):
                raise LoaderError(str(err)) from None
            self._outage(str(err))
            backoff = self.config.commit_backoff
            self._next_commit = self.clock() + backoff[min(self._commit_attempts, len(backoff) - 1)]
            self._commit_attempts += 1
            return False
        self._uncommitted = {}
        self.stats.committed += self._uncommitted_messages
        self._uncommitted_messages = 0
        self._commit_attempts = 0
        self._recovered()
        return True

    def _drain_commits(self) -> None:
        """At the end of run(): keep retrying the pending commit, bounded by ``outage_deadline`` (and after a
        stop() by ``stop_grace``: the rows are in the warehouse, so leaving the offsets uncommitted only means
        those messages are read and inserted again by the next loader, which changes nothing under FINAL)."""
        give_up = self.clock() + self.config.stop_grace if self._stop else None
        while self._uncommitted and not self._commit_pending():
            if give_up is not None and self.clock() >= give_up:
                log.warning(
                    "loader: stopping with %d loaded messages not committed (broker away); they will be read "
                    "again and their rows written again, which changes nothing",
                    self._uncommitted_messages,
                )
                return
            self._sleep(max(0.0, min(1.0, self._next_commit - self.clock())))

    def _outage(self, reason: str) -> None:
        """A retriable Kafka failure: one line when the loader starts failing (the later reasons at debug
        level), LoaderError once it has been failing for ``outage_deadline`` without a success in between."""
        now = self.clock()
        if self._failing_since is None:
            self._failing_since = now
            self._next_probe = now + self.config.probe_interval
            self.stats.outages += 1
            log.warning(
                "loader: broker unreachable, retrying (%s); gives up after %.0fs",
                reason,
                self.config.outage_deadline,
            )
        else:
            log.debug("loader: still failing: %s", reason)
        self._busy()
        if now - self._failing_since >= self.config.outage_deadline:
            waiting = (
                f"; {self._uncommitted_messages} loaded messages not committed (their rows are in the warehouse; "
                "a restart reads them again, harmlessly)"
                if self._uncommitted
                else ""
            )
            raise LoaderError(f"Kafka unreachable for {now - self._failing_since:.0f}s (last error: {reason}){waiting}")

    def _recovered(self) -> None:
        """Any success (a commit, messages, an answered probe) ends the outage and resets the failure clock."""
        if self._failing_since is not None:
            log.warning("loader: broker back after %.0fs", self.clock() - self._failing_since)
            self._busy()  # idleness counts from here, not from before the outage
        self._failing_since = None

    def _probe_kafka(self) -> None:
        """While failing with nothing to commit, the broker may be back but quiet (no input, no commit to
        retry): ask the group coordinator (or, before any assignment, any broker) whether it answers."""
        consumer = self._consumer
        if consumer is None:
            return
        self._next_probe = self.clock() + self.config.probe_interval
        try:
            assigned = consumer.assignment()
            if assigned:
                answers = consumer.committed(assigned, timeout=min(2.0, self.config.probe_interval))
                failed = next((tp.error for tp in answers if tp.error is not None), None)
                if failed is not None:
                    raise KafkaException(failed)
            else:
                consumer.list_topics(timeout=min(2.0, self.config.probe_interval))
        except KafkaException as exc:
            err = from_exception(exc, "loader probe")
            if not isinstance(err, KafkaRetryError):
                raise LoaderError(str(err)) from None
            self._outage(str(err))
            return
        self._recovered()

    def _history_hint(self, consumer: Consumer) -> None:
        """One line when this data dir holds no raw rows but the group already committed offsets on the bucket
        topics: the loader resumes there, so the history before them is not read into this warehouse (a new or
        wiped data dir); ``bucketer bootstrap`` replays it."""
        buckets = [t for t, (_, kind) in self._targets.items() if kind == ACTIVITY]
        try:
            counts = " + ".join(f"(SELECT count() FROM {self._targets[t][0]})" for t in buckets)
            if int(self.warehouse.rows(f"SELECT {counts}")[0][0]) > 0:
                return
            md = consumer.list_topics(timeout=5).topics
            parts = [TopicPartition(t, p) for t in buckets if t in md for p in md[t].partitions]
            committed = consumer.committed(parts, timeout=5) if parts else []
            done = sum(1 for tp in committed if tp.offset > 0)
        except (KafkaException, WarehouseError, IndexError, ValueError) as exc:
            log.debug("loader: cannot check the group's history (%s)", exc)
            return
        if done > 0:
            log.warning(
                "loader: this data dir holds no rows, but group %r already committed offsets on %d bucket partitions, "
                "so the messages before them are not read again: run `bucketer bootstrap` to load the history",
                self.config.group,
                done,
            )

    def _kind(self, table: str) -> str:
        return ACTIVITY if table.startswith("activityRelations_bucket_") else table

    def _try(self, table: str, values: list[bytes]) -> WarehouseError | None:
        columns, select = self._sql[self._kind(table)]
        try:
            self.warehouse.insert_json(f"{table} ({columns})", select, values)
        except WarehouseError as exc:
            return exc
        self.stats.inserted[table] = self.stats.inserted.get(table, 0) + len(values)
        return None

    def _insert(self, table: str, p: _Pending) -> None:
        if not p.values:
            return
        err = self._try(table, p.values)
        for wait in self.config.retry_backoff:
            if err is None or is_data_error(err):
                break
            log.warning("loader: insert into %s failed (%s); retrying in %.1fs", table, err, wait)
            time.sleep(wait)
            err = self._try(table, p.values)
        if err is None:
            return
        if not is_data_error(err):
            raise WarehouseUnavailable(f"insert into {table} keeps failing ({err}); nothing committed")
        # The slow path: find the messages the warehouse cannot take.
        self._probe()
        kind = self._kind(table)
        good_v: list[bytes] = []
        good_o: list[Origin] = []
        for i, v in enumerate(p.values):
            found = classify_problem(v, kind)
            if found is None:
                good_v.append(v)
                good_o.append(p.origin(i))
            else:
                self._dead_letter(found[0], found[1], p.origin(i), v)
        self._bisect(table, good_v, good_o)

    def _bisect(self, table: str, values: list[bytes], origins: list[Origin]) -> None:
        if not values:
            return
        err = self._try(table, values)
        if err is None:
            return
        if not is_data_error(err):
            raise WarehouseUnavailable(f"insert into {table} failed ({err}); nothing committed")
        if len(values) == 1:
            self._dead_letter("warehouse_rejected", str(err), origins[0], values[0])
            return
        mid = len(values) // 2
        self._bisect(table, values[:mid], origins[:mid])
        self._bisect(table, values[mid:], origins[mid:])

    def _probe(self) -> None:
        try:
            self.warehouse.rows("SELECT 1")
        except WarehouseError as exc:
            raise WarehouseUnavailable(f"the warehouse does not answer ({exc}); nothing committed") from exc

    # --- dead letters ----------------------------------------------------------------------------------------

    def _dead_letter(self, error_class: str, reason: str, origin: Origin, value: bytes | None) -> None:
        log.warning(
            "loader: dead-lettering %s/%d/%d: %s",
            origin.topic,
            origin.partition,
            origin.offset,
            reason,
            extra={"topic": origin.topic, "partition": origin.partition, "offset": origin.offset},
        )
        assert self._producer is not None, "dead letters need a running loader"
        headers = dlq_headers(error_class, reason, origin.topic, origin.partition, origin.offset)
        self._producer.produce(
            self.config.topics.dlq,
            value=value or b"",
            key=origin.key,
            headers=cast("list[tuple[str, str | bytes | None]]", headers),
        )
        self._producer.poll(0)
        self.stats.dead_lettered += 1
        self.stats.dlq[error_class] += 1

    def _on_dlq_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._dlq_errors.append(err.str())

    def _confirm_dlq(self) -> None:
        if self._producer is None:
            return
        # Delivery waits out a broker outage (the producer's message timeout is as long as the outage deadline).
        left = self._producer.flush(max(30.0, self.config.outage_deadline))
        if left or self._dlq_errors:
            errors, self._dlq_errors = self._dlq_errors, []
            raise DeadLetterFailed(
                f"could not deliver {left or len(errors)} dead letter(s) "
                f"({'; '.join(errors[:3]) or 'timeout'}); nothing committed"
            )
