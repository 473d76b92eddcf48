"""The loader: bucket topics and reference topics → raw bucket tables and reference tables.

``Loader(config, warehouse).run()`` consumes (read_committed, manual commits) the N bucket topics and the five
reference topics, collects message values per target table, and flushes when a batch reaches
``max_rows`` messages or ``max_bytes`` bytes, or is ``max_wait`` seconds old, or when the input is drained
(a poll brought nothing: caught up, so waiting longer only adds latency; after a full poll, which means a
backlog, it takes two empty polls, so a fetch in flight does not cut a catch-up batch short). A flush hands
each table's message bytes to ClickHouse as they are (``Warehouse.insert_json`` with the SQL of
stream/ingest.py: the engine parses the JSON) and only then commits the next offsets. On the embedded
warehouse a flush that spans several raw buckets is parsed in one query into an in-memory stage that each
bucket table then takes its rows from (planning the parsing SELECT costs tens of milliseconds, which per
bucket table used to dominate a flush). A crash before the commit replays the batch, which is harmless: rows
are versioned (ReplacingMergeTree on ``_version``), so a replay leaves ``FINAL`` unchanged.

Bad messages never stop the loader and are never dropped silently: when an insert fails on its data (a
ClickHouse parse/type/throwIf error, ``DATA_ERRORS``), ``ingest.problem`` names the bad messages, the rest is
inserted again, and if the warehouse still refuses, the batch is split in halves until the refused message is
alone. Any other failure is retried (``retry_backoff``) and then raised, never blamed on a message. Each
refused message goes to the DLQ topic with the reason (headers of CONTRACTS.md) and is counted in
``stats.dead_lettered``; DLQ deliveries are confirmed before the commit. If the warehouse itself is down (a
probe query fails) the loader raises without committing.

``stop()`` only sets a flag; ``run()`` then flushes,
commits and closes. ``run(until_idle=S)`` returns after S seconds without new messages (batch use, tests).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from array import array
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from connectors.kafka import KafkaRetryError, classify, consumer_config, dlq_headers, from_exception, producer_config
from connectors.topics import TopicNames
from connectors.warehouse import SupportsJsonParts, Warehouse, WarehouseError
from stream.buckets import raw_table
from stream.ingest import insert_sql, problem
from stream.schema import stage_columns

log = logging.getLogger(__name__)
ACTIVITY = "activityRelations"
# ClickHouse error codes that blame the data (parse errors, types, ranges, our throwIf): bisect and dead-letter.
# Any other failure (too many parts, memory, a lost connection) is retried, never blamed on a message.
DATA_ERRORS = frozenset({6, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117, 131, 321, 395, 407, 691})
_CODE = re.compile(r"Code: (\d+)")


def is_data_error(exc: BaseException) -> bool:
    m = _CODE.search(str(exc))
    return m is not None and int(m.group(1)) in DATA_ERRORS


_CONSUME_MAX = 10_000  # messages per consume() call


@dataclass(frozen=True)
class LoaderConfig:
    bootstrap: str
    buckets: int
    group: str = "bucketer-loader"
    topics: TopicNames = field(default_factory=TopicNames)
    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    max_wait: float = 1.0
    poll_timeout: float = 0.2
    drained_after: float = 0.02  # a pending batch is handed over after a poll this long brings nothing
    consumer_overrides: Mapping[str, Any] = field(default_factory=dict)
    # Waits before retrying an insert that failed for a reason other than its data (then: give up, no commit).
    retry_backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    # A broker outage (failed commits, retriable consumer errors) is ridden out this long, then run() raises.
    outage_deadline: float = 300.0
    commit_backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)


@dataclass
class LoaderStats:
    messages: int = 0  # read from Kafka
    committed: int = 0  # read, inserted or dead-lettered, and their offsets committed
    inserted: dict[str, int] = field(default_factory=dict)
    dead_lettered: int = 0
    flushes: int = 0


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
    def __init__(
        self,
        config: LoaderConfig,
        warehouse: Warehouse,
        clock: Callable[[], float] = time.monotonic,
        consumer_factory: Callable[[dict[str, Any]], Any] = Consumer,
        producer_factory: Callable[[dict[str, Any]], Any] = Producer,
        after_flush: Callable[[Warehouse], object] | None = None,
    ) -> None:
        """``consumer_factory``/``producer_factory`` build the Kafka clients from their config (tests pass fakes).
        ``after_flush(warehouse)`` runs after a batch's inserts and before its offsets are committed (the cleaned
        buckets' maintenance, stream/incremental.py): if it fails, the batch is not committed and is replayed."""
        self._after_flush = after_flush
        self.config = config
        self.warehouse = warehouse
        self.clock = clock
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
        self._sql = {kind: insert_sql(kind) for _, kind in self._targets.values()}
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
        self._commit_attempts = 0
        self._error_state: str | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop = True

    def run(self, until_idle: float | None = None) -> LoaderStats:
        cfg = self.config
        overrides = {
            "topic.metadata.refresh.interval.ms": 2000,
            "max.partition.fetch.bytes": 16 << 20,
            "fetch.max.bytes": 64 << 20,
            **cfg.consumer_overrides,
        }
        self._consumer = self._consumer_factory(consumer_config(cfg.bootstrap, cfg.group, **overrides))
        self._producer = self._producer_factory(producer_config(cfg.bootstrap, on_delivery=self._on_dlq_delivery))
        # One insert runs in the background while the next batch is read; its offsets wait with it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader-insert")
        try:
            self._consumer.subscribe(list(self._targets), on_revoke=self._on_revoke)
            last_busy = self.clock()
            backlog = False
            while not self._stop:
                # While a batch waits, poll briefly: an empty poll means the input is drained. While an insert
                # runs, poll briefly too, so its offsets are committed soon after it ends, not a long poll later.
                busy = self._offsets or self._inflight is not None
                timeout = min(cfg.poll_timeout, cfg.drained_after) if busy else cfg.poll_timeout
                msgs = self._consumer.consume(num_messages=_CONSUME_MAX, timeout=timeout)
                drained = False
                if msgs:
                    self._take(msgs)
                    last_busy = self.clock()
                    # A full consume means a backlog: then one empty poll is more likely a fetch still in
                    # flight than the end of the input, and handing over there would split the batch.
                    backlog = len(msgs) >= _CONSUME_MAX
                elif self._offsets:
                    drained, backlog = not backlog, False
                if self._reap(wait=False):
                    last_busy = self.clock()
                if self._uncommitted and self.clock() >= self._next_commit:
                    self._commit_pending()
                    last_busy = self.clock()
                # Hand over a full or old batch, and one as soon as the input is drained (caught up).
                if self._due() or drained:
                    self._dispatch()  # may first wait for the previous insert
                    last_busy = self.clock()
                # Idle means S seconds of empty polls with everything written and committed, never time spent
                # waiting for an insert (a slow insert must not end the run while input is still coming).
                if (
                    until_idle is not None
                    and not self._offsets
                    and self._inflight is None
                    and not self._uncommitted
                    and self.clock() - last_busy >= until_idle
                ):
                    break
            self.flush()
            self._drain_commits()
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

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
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
                    "invalid-message", "empty value (tombstone)", Origin(topic, partition, offset, m.key()), b""
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
        if err.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION):
            log.debug("loader: %s", err.str())
            return
        exc = classify(err, "loader consume")
        if err.fatal():
            raise exc
        self._outage(str(exc))

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
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._offsets.items()]
        self._offsets = {}
        self._bytes = self._count = 0
        self._batch_started = None
        self._inflight = (self._executor.submit(self._write, pending), offsets, self._batch_messages)
        self._batch_messages = 0

    def _write(self, pending: dict[str, _Pending]) -> None:
        todo = [(table, p) for table, p in pending.items() if p.values]
        buckets = [(table, p) for table, p in todo if self._kind(table) == ACTIVITY]
        if len(buckets) > 1 and isinstance(self.warehouse, SupportsJsonParts):
            done = self._insert_parsed_once(self.warehouse, buckets)
            todo = [(table, p) for table, p in todo if table not in done]
        for table, p in todo:
            self._insert(table, p)
        self._confirm_dlq()
        if self._after_flush is not None:
            self._after_flush(self.warehouse)

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
        """At the end of run(): keep retrying the pending commit (bounded by ``outage_deadline``)."""
        while self._uncommitted and not self._commit_pending():
            time.sleep(max(0.0, min(1.0, self._next_commit - self.clock())))

    def _outage(self, reason: str) -> None:
        """Log a failure once per state change; raise past the outage deadline."""
        now = self.clock()
        if self._failing_since is None:
            self._failing_since = now
        state = reason.split("[")[-1]
        if state != self._error_state:
            self._error_state = state
            log.warning("loader: %s; retrying (gives up after %.0fs)", reason, self.config.outage_deadline)
        if now - self._failing_since >= self.config.outage_deadline:
            raise LoaderError(f"Kafka unavailable for {now - self._failing_since:.0f}s: {reason}")

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning("loader: Kafka is back after %.0fs", self.clock() - self._failing_since)
        self._failing_since = None
        self._error_state = None

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
            reason = problem(v, kind)
            if reason is None:
                good_v.append(v)
                good_o.append(p.origin(i))
            else:
                self._dead_letter("invalid-message", reason, p.origin(i), v)
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
            self._dead_letter("warehouse-rejected", str(err), origins[0], values[0])
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
        log.warning("loader: dead-lettering %s/%d/%d: %s", origin.topic, origin.partition, origin.offset, reason)
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

    def _on_dlq_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._dlq_errors.append(err.str())

    def _confirm_dlq(self) -> None:
        if self._producer is None:
            return
        left = self._producer.flush(30)
        if left or self._dlq_errors:
            errors, self._dlq_errors = self._dlq_errors, []
            raise DeadLetterFailed(
                f"could not deliver {left or len(errors)} dead letter(s) "
                f"({'; '.join(errors[:3]) or 'timeout'}); nothing committed"
            )
