"""``bucketer rebucket --to M --strategy gradual``: N → M buckets while ``bucketer run`` keeps ingesting and serving.

Design (the hard part is correctness; every step below is idempotent, so "run it again" is always the recovery)
-----------------------------------------------------------------------------------------------------------

Where it runs. The migration runs INSIDE the process that holds the warehouse and runs the router and the
loader (``bucketer run``), as a thread started through its HTTP API (``POST /v0/rebucket``); the CLI only asks
and draws the progress (``GET /v0/rebucket``). That process owns N: the router, the loader and the API are told
in-process, and the warehouse's recorded N changes in one place (``ensure_schema(M, allow_change=True)``).

One mapping the loader can always use: the inbox. ``activityRelations_bucket_rebucket_inbox`` is a Null table
of the raw layout with one materialized view per bucket of the CURRENT layout (``WHERE cityHash64(segmentId) %
N = n`` → raw bucket n) and, while the new layout is built, one per bucket of the NEXT layout (``% M = m`` →
``<raw m>__next``). During the migration the loader maps every bucket topic (0..max(N, M)-1) to the inbox, so a
message lands in the right bucket whatever layout the router used for it, and every landed row (versions and
delete markers alike) reaches both layouts in the same INSERT. Nothing is ever routed by the loader from the
topic number while the topics carry a mixture.

Phases (recorded durably in ``bucketer_migration``: id, N, M, path, phase, the switch positions):

1. ``prepared``: bucket topics 0..M-1 exist; ``<raw m>__next`` (empty) and the inbox with both view sets exist.
2. ``copied``: the loader was retargeted to the inbox (it first flushes and commits what it read under the old
   mapping), then every next raw table was filled ``INSERT … SELECT * FROM <raw> WHERE hash % M = m`` — all
   versions and delete markers. A row landed before the retarget is in the raw tables the copy reads; one landed
   after reaches the next tables through the inbox views; one in both is the same version twice (harmless under
   ``FINAL``). Never truncated while live, so a resumed copy only repeats itself. Path: M = k·N copies each new
   bucket from its one parent (b splits into b, b+N, …); otherwise (10→16, 20→10) each new bucket is recomputed
   from all N raw tables — the slower path, same guarantees.
3. ``switched``: the router switches at a transaction boundary (``RouterSwitch``, the one hook in
   stream/router.py): the first batch routed by M also writes, IN the same Kafka transaction as its output and
   its source offsets, a control record per source partition (compacted ``<prefix>bucketer_control``) with the
   first offset routed by M. So every message before it was routed by N and every one after by M, exactly once,
   surviving SIGKILL: a restarted router reads the control topic before its first batch and routes by the
   latest switch.
4. ``flipped``: the loader pauses (flush, commit, hold); the cleaned buckets of the new layout are copied from
   the maintained cleaned buckets (``WHERE hash % M = m``, versions and tombstones kept); verify: live raw rows
   (``FINAL``) and a hash of their identities and versions are equal in both layouts, no row is misplaced, and
   the cleaned live rows agree; then, with the API's readers held back for the few renames (``READERS``), each
   bucket table is renamed aside and its next table into place, the views (union, routing, project_buckets)
   and the recorded N are redefined for M, buckets ≥ M dropped, the inbox views repointed to the M layout, the
   activity index rebuilt for M (stream/cdc.py); the maintenance (stream/incremental.py) is set up anew for M
   with no correction round in between and no reconciliation (the split cleaned buckets are current and
   verified), and the loader resumes (still on the inbox) as soon as its queues exist.
   ``flipping`` is recorded before the first rename: a process killed inside the flip finishes it when it starts
   again (``recover``, before anything reads the views), so a reader never meets a mixture after a restart.
5. ``done``: once the loader has committed past every bucket partition's end as it was after the switch (all
   N-routed messages are loaded), it is retargeted to topics 0..M-1 → raw 0..M-1 directly and the inbox is
   dropped.

``--abort`` before the flip: the router switches back to N (again recorded), the loader stays on the inbox until
drained, the next tables are dropped: a consistent N. After the flip the migration only goes forward.

Readers: before the flip every reader reads the N layout, which receives every row; after it the M layout.
A delete that arrives mid-move reaches both layouts through the inbox, so the move never resurrects it.

Limits (said, not hidden): one ``bucketer run`` process (its router and loader); routers/loaders in other
processes of a group and a ClickHouse server without a running process are not handled (``gradual`` refuses
there); the router must be exactly-once (Kafka transactions); the loader is paused for the flip (the split of
the cleaned buckets, the verification, the renames, the index rebuild), so ingestion latency spikes then, and
the cleaned buckets are less fresh while the maintenance is set up anew (bench/bench_rebucket.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from connectors.kafka import consumer_config, ensure_bucket_topics, ensure_topics, group_lag
from connectors.model import SORT_KEY, bucket_sql
from connectors.topics import TopicNames
from stream.buckets import cleaned_table, raw_table
from stream.routing import BatchRouter
from stream.schema import bucket_count, ensure_schema

log = logging.getLogger("bucketer.migration")

STATE_TABLE = "bucketer_migration"
INBOX = "activityRelations_bucket_rebucket_inbox"  # the loader's _kind() sees it as a raw bucket
NEXT = "__next"
OLD = "__old"
ACTIVE = ("started", "prepared", "copied", "switched", "flipping", "flipped", "aborting")
# A test hook: the migration thread stops dead after recording this phase (SIGKILL tests), never in production.
STALL_ENV = "BUCKETER_TEST_MIGRATION_STALL"


class MigrationError(RuntimeError):
    """The migration was refused or cannot go on; the warehouse stays on a consistent N."""


@dataclass
class MigrationState:
    id: str
    old: int
    new: int
    path: str  # "split" (M = k·N: each new bucket from its one parent) or "recompute" (from all N raw tables)
    phase: str = "started"
    positions: dict[str, int] = field(default_factory=dict)  # "topic/partition" -> first offset routed by M
    started_at: float = field(default_factory=time.time)
    error: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)  # not durable: the phase's bar

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def path_for(old: int, new: int) -> str:
    return "split" if new > old and new % old == 0 else "recompute"


# --- durable state -----------------------------------------------------------------------------------------


def _state_ddl() -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} (key String, value String, at DateTime64(6, 'UTC') "
        f"DEFAULT now64(6)) ENGINE = ReplacingMergeTree(at) ORDER BY key"
    )


def read_state(wh: Any) -> MigrationState | None:
    """The last migration recorded in the warehouse (active or finished), or None."""
    have = wh.rows(
        "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
        {"t": STATE_TABLE},
    )
    if not have or not have[0][0]:
        return None
    rows = wh.rows(f"SELECT value FROM {STATE_TABLE} FINAL WHERE key = 'current'")
    if not rows:
        return None
    data = json.loads(rows[0][0])
    data.pop("progress", None)
    return MigrationState(**data)


def write_state(wh: Any, st: MigrationState) -> None:
    wh.command(_state_ddl())
    value = json.dumps({k: v for k, v in st.as_json().items() if k != "progress"})
    # Strictly later than the row before it, whatever the clock: ReplacingMergeTree(at) keeps the latest.
    wh.command(
        f"INSERT INTO {STATE_TABLE} (key, value, at) SELECT 'current', {{v:String}}, "
        f"greatest(now64(6), (SELECT max(at) FROM {STATE_TABLE}) + toIntervalMicrosecond(1))",
        {"v": value},
    )


# --- the inbox: hash-routed landing for the loader ----------------------------------------------------------


def _view(layout: str, m: int) -> str:
    return f"bucketer_rebucket_{layout}_{m}"


def _drop_views(wh: Any, layout: str) -> None:
    names = wh.rows(
        "SELECT name FROM system.tables WHERE database = currentDatabase() AND startsWith(name, {p:String})",
        {"p": f"bucketer_rebucket_{layout}_"},
    )
    for (name,) in names:
        wh.command(f"DROP TABLE IF EXISTS `{name}` SYNC")


def _inbox_views(wh: Any, layout: str, buckets: int, suffix: str) -> None:
    """One materialized view per bucket from the inbox into ``<raw m><suffix>`` (``% buckets = m``)."""
    for m in range(buckets):
        wh.command(
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {_view(layout, m)} TO {raw_table(m)}{suffix} AS "
            f"SELECT * FROM {INBOX} WHERE {bucket_sql('segmentId', buckets)} = {m}"
        )


def ensure_inbox(wh: Any, current: int, nxt: int | None) -> None:
    """The inbox, routing to the current layout (and to the next tables while they are built). Idempotent."""
    wh.command(f"CREATE TABLE IF NOT EXISTS {INBOX} AS {raw_table(0)} ENGINE = Null")
    _inbox_views(wh, "cur", current, "")
    if nxt is not None:
        _inbox_views(wh, "next", nxt, NEXT)


def drop_inbox(wh: Any) -> None:
    _drop_views(wh, "next")
    _drop_views(wh, "cur")
    wh.command(f"DROP TABLE IF EXISTS {INBOX} SYNC")


def inbox_targets(topics: TopicNames, count: int) -> dict[str, str]:
    """The loader's mapping while migrating: every bucket topic 0..count-1 → the inbox."""
    return {t: INBOX for t in topics.buckets(count)}


def direct_targets(topics: TopicNames, buckets: int) -> dict[str, str]:
    return {topics.bucket(n): raw_table(n) for n in range(buckets)}


# --- verification --------------------------------------------------------------------------------------------

_IDENTITY = ", ".join(("activityId", *SORT_KEY, "_version"))


def fingerprint(wh: Any, tables: Iterable[str], identity: str = _IDENTITY) -> tuple[int, int]:
    """(live rows, order-free hash of their identities and versions) over ``tables`` read ``FINAL``."""
    rows = digest = 0
    for t in tables:
        n, h = wh.rows(f"SELECT count(), sum(cityHash64({identity})) FROM {t} FINAL")[0]
        rows, digest = rows + int(n), (digest + int(h or 0)) % 2**64
    return rows, digest


def misplaced(wh: Any, tables: list[str], buckets: int) -> int:
    return sum(
        int(wh.rows(f"SELECT countIf({bucket_sql('segmentId', buckets)} != {m}) FROM {t}")[0][0])
        for m, t in enumerate(tables)
    )


# --- the router's side -----------------------------------------------------------------------------------------


def control_topic(topics: TopicNames) -> str:
    return topics.control


class RouterSwitch:
    """The router's hook (``Router._batch`` calls ``begin_batch`` once per transaction, after ``begin``).

    ``request(m, migration)`` asks for a switch; the next batch is routed by M and carries, in its transaction,
    the control records (per source partition: the first offset routed by M). A record is written again in
    every later batch of the same partition until a batch has committed (same value: the topic is compacted),
    so an aborted first batch cannot lose it. On the first batch of a (re)started router the control topic is
    read: the latest switch it records is the layout to route by."""

    def __init__(self, router: Any) -> None:
        self._router = router
        self._wanted: tuple[int, str] | None = None
        self._loaded = router._consumer_factory is not None  # an in-memory consumer (unit tests): no broker
        self.buckets = router.config.buckets
        self.migration: str | None = None
        self.positions: dict[str, int] = {}  # partitions whose record is committed
        self._unconfirmed: dict[str, int] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    def ensure_loaded(self) -> None:
        """The layout recorded on the control topic read, once: by the router's first batch, or by a migration
        step that asks which layout the router is on before that (an --abort right after a restart found the
        configured N, did not switch back, and the router then loaded the recorded M)."""
        with self._load_lock:
            if not self._loaded:
                self._load()
                self._loaded = True

    @property
    def pending(self) -> bool:
        return self._wanted is not None

    # called from the migration thread
    def request(self, buckets: int, migration: str) -> None:
        with self._lock:
            self._wanted = (buckets, migration)

    def confirmed(self, buckets: int, migration: str) -> bool:
        """The router routes by ``buckets`` for ``migration`` and a batch under it has committed."""
        with self._lock:
            return self.buckets == buckets and self.migration == migration and bool(self.positions)

    def settled(self, current: BatchRouter, parts: Iterable[tuple[str, int]]) -> bool:
        """``begin_batch`` has nothing to do for a batch of these partitions: the recorded layout is loaded, no
        switch is asked for, no record is unconfirmed, and either no migration ever switched this router or
        ``current`` routes by its N and every partition's record has committed. The router may then route such
        a batch before the previous batch's transaction has committed (stream/router.py)."""
        if not self._loaded:
            return False
        with self._lock:
            if self._wanted is not None or self._unconfirmed:
                return False
            if self.migration is None:
                return True
            return current.buckets == self.buckets and all(f"{t}/{p}" in self.positions for t, p in parts)

    # called from the router thread, inside the batch's transaction
    def begin_batch(
        self, current: BatchRouter, sink: Any, msgs: list[Any], parts: Iterable[tuple[str, int]] | None = None
    ) -> BatchRouter:
        """``parts``: the batch's (topic, partition)s, when the caller has them: once each has its record the
        batch's messages are not looked at (a switch long done costs nothing per message)."""
        self.ensure_loaded()
        with self._lock:
            if self._unconfirmed and self._router._failures == 0:  # the batch that wrote them committed
                self.positions.update(self._unconfirmed)
                self._unconfirmed = {}
            if self._wanted is not None:
                buckets, migration = self._wanted
                self._wanted = None
                if (buckets, migration) != (self.buckets, self.migration):
                    self.buckets, self.migration = buckets, migration
                    self.positions, self._unconfirmed = {}, {}
            if self.migration is None:
                return current
            router = current if current.buckets == self.buckets else self._retarget(current, sink)
            first: dict[str, int] = {}
            if parts is None or any(f"{t}/{p}" not in self.positions for t, p in parts):
                for m in msgs:
                    first.setdefault(f"{m.topic()}/{m.partition()}", m.offset())
            for key, offset in first.items():
                if key not in self.positions:
                    self._unconfirmed.setdefault(key, offset)
            for key, offset in self._unconfirmed.items():
                value = {"migration": self.migration, "to": self.buckets, "offset": offset}
                sink._produce(self._topic, key.encode(), json.dumps(value).encode(), None)
            return router

    def idle(self, consumer: Any, sink: Any, msgs: list[Any]) -> None:
        """Between batches with nothing read (``msgs`` empty) and a switch asked for: switch now, in a transaction
        of its own that holds only the control records and the unchanged source offsets (the consumer's
        positions: every message before them is routed and committed). An idle source must not stall it."""
        r = self._router
        if msgs or self._wanted is None or r._failures or r._broken or r._rewind_needed:
            return
        assigned = consumer.assignment()
        if not assigned:
            return
        try:
            at = {(tp.topic, tp.partition): tp.offset for tp in consumer.position(assigned)}
            unknown = [tp for tp in assigned if at.get((tp.topic, tp.partition), -1) < 0]
            for tp in consumer.committed(unknown, timeout=10) if unknown else []:
                at[(tp.topic, tp.partition)] = tp.offset
            for tp in assigned:
                if at.get((tp.topic, tp.partition), -1) < 0:  # never read, never committed: the first one kept
                    at[(tp.topic, tp.partition)] = consumer.get_watermark_offsets(tp, timeout=10)[0]
            sink.begin()
            r._router = self.begin_batch(r._router, sink, [])
            with self._lock:
                for (topic, part), offset in at.items():
                    key = f"{topic}/{part}"
                    if key not in self.positions and key not in self._unconfirmed:
                        self._unconfirmed[key] = offset
                        value = {"migration": self.migration, "to": self.buckets, "offset": offset}
                        sink._produce(self._topic, key.encode(), json.dumps(value).encode(), None)
            sink.commit([TopicPartition(t, p, o) for (t, p), o in at.items()], consumer)
        except Exception as exc:  # the next idle poll (or batch) tries again; the records are rewritten
            log.warning("router: the idle switch was not committed (%s); retrying", exc)
            try:
                sink.abort()
            except Exception:  # noqa: BLE001 - a new transaction of the same producer resolves it
                pass
            return
        with self._lock:
            self.positions.update(self._unconfirmed)
            self._unconfirmed = {}

    @property
    def _topic(self) -> str:
        return control_topic(self._router.topics)

    def _retarget(self, current: BatchRouter, sink: Any) -> BatchRouter:
        n = self.buckets
        stats = self._router.stats
        stats.buckets.extend([0] * (n - len(stats.buckets)))
        # The Kafka sink's bucket topics (created by the migration's first phase).
        sink._topics = self._router.topics.buckets(n)
        log.info("router: routing by %d buckets from this batch on (migration %s)", n, self.migration)
        return BatchRouter(n, current.max_message_bytes)

    def _load(self) -> None:
        """The latest switch recorded on the control topic (none: route by the configured N)."""
        records = read_control(self._router.config.kafka, self._router.topics)
        source = self._router.topics.source + "/"
        mine = {k: v for k, v in records.items() if k.startswith(source)}
        if not mine:
            return
        latest = max(mine.values(), key=lambda v: v.get("at", 0))
        with self._lock:  # begin_batch retargets the BatchRouter and the sink when this N is not the configured one
            self.buckets, self.migration = int(latest["to"]), str(latest["migration"])
            self.positions = {k: int(v["offset"]) for k, v in mine.items() if v["migration"] == self.migration}
        log.info("router: the control topic records a switch to %d buckets", int(latest["to"]))


def read_control(kafka: Any, topics: TopicNames, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """Every key of the control topic with its latest value (read_committed), {} when there is no topic."""
    topic = control_topic(topics)
    consumer = Consumer(
        consumer_config(kafka, f"bucketer-control-{uuid.uuid4().hex[:8]}", **{"enable.auto.commit": False})
    )
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for p in meta.partitions:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if hi <= lo:
                continue
            consumer.assign([TopicPartition(topic, p, lo)])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None:
                    pos = consumer.position([TopicPartition(topic, p)])[0].offset
                    if pos >= hi:
                        break
                    continue
                if msg.error() is None and msg.key() is not None and msg.value():
                    value = json.loads(msg.value())
                    value["at"] = msg.offset()
                    out[msg.key().decode()] = value
                if msg.offset() + 1 >= hi:
                    break
        return out
    finally:
        consumer.close()


# --- the loader's side ---------------------------------------------------------------------------------------


def committed_offsets(
    kafka: Any, group: str, tps: list[TopicPartition], timeout: float = 10.0
) -> dict[tuple[str, int], int]:
    consumer = Consumer(consumer_config(kafka, group, **{"enable.auto.commit": False}))
    try:
        return {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(tps, timeout=timeout)}
    finally:
        consumer.close()


def end_offsets(kafka: Any, topic_names: list[str], timeout: float = 10.0) -> list[TopicPartition]:
    consumer = Consumer(consumer_config(kafka, f"bucketer-ends-{uuid.uuid4().hex[:8]}"))
    try:
        out = []
        for topic in topic_names:
            meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
            for p in meta.partitions if meta is not None and meta.error is None else ():
                _lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                out.append(TopicPartition(topic, p, hi))
        return out
    finally:
        consumer.close()


# --- the migration ----------------------------------------------------------------------------------------------


def recover(wh: Any) -> MigrationState | None:
    """At process start, before anything reads the views: a flip that a SIGKILL interrupted is finished (the
    renames are idempotent), so readers never meet a mixture. Returns the active migration, if any."""
    st = read_state(wh)
    if st is None or not st.active:
        return None
    if st.phase == "flipping":
        log.warning("migration %s: finishing the flip to %d buckets a stop interrupted", st.id, st.new)
        _swap_tables(wh, st)
        _finish_flip(wh, st)
    return st


def _swap_tables(wh: Any, st: MigrationState) -> None:
    """Each raw and cleaned bucket < M: the N table aside (``__old``), the next one into place. Resumable: a
    bucket whose ``__old`` exists is done (or half done: the second rename finishes it)."""
    existing = {r[0] for r in wh.rows("SELECT name FROM system.tables WHERE database = currentDatabase()")}
    for m in range(st.new):
        for table in (raw_table(m), cleaned_table(m)):
            old, nxt = table + OLD, table + NEXT
            if nxt not in existing:
                continue  # already in place (or never built: verified before flipping)
            if old in existing:
                if table in existing:  # recreated empty by a restart between the renames: not ours
                    if int(wh.rows(f"SELECT count() FROM {table}")[0][0]) == 0:
                        wh.command(f"DROP TABLE {table} SYNC")
                    else:
                        continue
                wh.command(f"RENAME TABLE {nxt} TO {table}")
            elif table in existing:
                wh.command(f"RENAME TABLE {table} TO {old}, {nxt} TO {table}")
            else:
                wh.command(f"RENAME TABLE {nxt} TO {table}")


def _finish_flip(wh: Any, st: MigrationState) -> None:
    ensure_schema(wh, st.new, allow_change=True)  # the views and the recorded N, together, for M
    for n in range(st.new, st.old):
        wh.command(f"DROP TABLE IF EXISTS {raw_table(n)} SYNC")
        wh.command(f"DROP TABLE IF EXISTS {cleaned_table(n)} SYNC")
    for m in range(max(st.new, st.old)):
        wh.command(f"DROP TABLE IF EXISTS {raw_table(m)}{OLD} SYNC")
        wh.command(f"DROP TABLE IF EXISTS {cleaned_table(m)}{OLD} SYNC")
    ensure_inbox(wh, st.new, None)
    st.phase = "flipped"
    write_state(wh, st)


class Gate:
    """Readers share it; the flip takes it alone (waiting for the readers in flight, holding back new ones)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._closed = False

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._closed)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._closed)
            self._closed = True
            self._cond.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


# The API's readers of this process (stream/api.py) pass through it; the flip's renames hold it alone.
READERS = Gate()


def _alive(pipeline: Any) -> bool:
    return not pipeline._stopping.is_set() and not pipeline._errors


class Migration:
    """One gradual migration, driven in the process running the pipeline (``Pipeline``: router, loader,
    maintainer, topics). ``start()`` runs it in a thread; ``state`` is what the API shows."""

    def __init__(self, pipeline: Any, to: int | None, abort: bool = False) -> None:
        self.pipeline = pipeline
        self.to, self.abort = to, abort
        self.state: MigrationState | None = None
        self.thread: threading.Thread | None = None
        self.error: str | None = None

    # --- driving

    def start(self) -> MigrationState:
        with self.pipeline.connect() as wh:
            st = read_state(wh)
            n = bucket_count(wh)
            if st is not None and st.active:
                if self.to is not None and self.to != st.new and not self.abort:
                    raise MigrationError(
                        f"migration {st.id} to {st.new} buckets is under way; run it again with --to {st.new}, "
                        f"or --abort"
                    )
            elif self.abort:
                raise MigrationError("no migration is under way: nothing to abort")
            else:
                if n is None or self.to is None:
                    raise MigrationError("no bucketer schema or no --to")
                if self.to == n:
                    raise MigrationError(f"the warehouse already has {n} buckets")
                router = self.pipeline.router
                if router is None or not router.config.exactly_once or router.config.sink != "kafka":
                    raise MigrationError("gradual needs the exactly-once Kafka router of this process")
                st = MigrationState(uuid.uuid4().hex[:12], n, self.to, path_for(n, self.to))
                write_state(wh, st)
            if self.abort and st.phase in ("flipping", "flipped"):
                raise MigrationError(f"migration {st.id} has flipped to {st.new} buckets: it can only go on")
        self.state = st
        self.thread = threading.Thread(target=self._run, name="bucketer-migration", daemon=True)
        self.thread.start()
        return st

    def _run(self) -> None:
        st = self.state
        assert st is not None
        try:
            with self.pipeline.connect() as wh:
                if self.abort or st.phase == "aborting":
                    self._abort(wh, st)
                else:
                    self._forward(wh, st)
        except BaseException as exc:  # reported through the API; the warehouse stays on a consistent N
            log.error("migration %s failed in phase %s: %s", st.id, st.phase, exc)
            st.error = str(exc)
            self.error = str(exc)

    def _mark(self, wh: Any, st: MigrationState, phase: str) -> None:
        st.phase = phase
        write_state(wh, st)
        log.info("migration %s: %s", st.id, phase)
        if os.environ.get(STALL_ENV) == phase:
            log.warning("migration %s: stalled after %s (%s)", st.id, phase, STALL_ENV)
            threading.Event().wait()

    def _bar(self, st: MigrationState, phase: str, done: int, total: int) -> None:
        st.progress = {"phase": phase, "done": done, "total": total}

    def _forward(self, wh: Any, st: MigrationState) -> None:
        p = self.pipeline
        if st.phase == "started":
            self._prepare(wh, st)
            self._mark(wh, st, "prepared")
        if st.phase == "prepared":
            self._retarget(inbox_targets(p.topics, max(st.old, st.new)))
            self._copy(wh, st)
            self._mark(wh, st, "copied")
        if st.phase == "copied":
            self._switch(st.new, st.id)
            st.positions = dict(p.router.switch.positions)
            self._mark(wh, st, "switched")
        if st.phase in ("switched", "flipping"):
            self._flip(wh, st)
        if st.phase == "flipped":
            self._drain(wh, st, st.new)
            self._mark(wh, st, "done")
        st.progress = {"phase": "done", "done": 1, "total": 1}

    def _prepare(self, wh: Any, st: MigrationState) -> None:
        p = self.pipeline
        cfg = p.config
        ensure_bucket_topics(cfg.kafka, p.topics, st.new, cfg.partitions, 1)
        ensure_topics(cfg.kafka, [control_topic(p.topics)], 1, 1, config={"cleanup.policy": "compact"})
        for m in range(st.new):
            wh.command(f"CREATE TABLE IF NOT EXISTS {raw_table(m)}{NEXT} AS {raw_table(0)}")
        ensure_inbox(wh, st.old, st.new)

    def _retarget(self, targets: dict[str, str]) -> None:
        loader = self.pipeline.loader
        done = loader.retarget(targets)
        while not done.wait(0.2):
            if not _alive(self.pipeline):
                raise MigrationError("the loader stopped")

    def _split(self, wh: Any, st: MigrationState, name: Callable[[int], str], phase: str) -> None:
        """``<name(m)>__next`` gets every row (all versions, delete markers) of the N tables in its hash range:
        from its one parent on the split path, from all N tables on the recompute path."""
        for m in range(st.new):
            parents = [m % st.old] if st.path == "split" else range(st.old)
            for n in parents:
                wh.command(
                    f"INSERT INTO {name(m)}{NEXT} SELECT * FROM {name(n)} WHERE {bucket_sql('segmentId', st.new)} = {m}"
                )
            self._bar(st, phase, m + 1, st.new)

    def _copy(self, wh: Any, st: MigrationState) -> None:
        self._split(wh, st, raw_table, "copy")

    def _switch(self, buckets: int, migration: str) -> None:
        switch = self.pipeline.router.switch
        switch.request(buckets, migration)
        self._bar(self.state, "switch", 0, 1)  # type: ignore[arg-type]
        while not switch.confirmed(buckets, migration):  # the router's next committed batch
            if not _alive(self.pipeline):
                raise MigrationError("the router stopped before it switched")
            time.sleep(0.05)
        self._bar(self.state, "switch", 1, 1)  # type: ignore[arg-type]

    def _flip(self, wh: Any, st: MigrationState) -> None:
        p = self.pipeline
        loader, maintainer = p.loader, p.maintainer
        held = loader.hold()
        while not held.wait(0.2):
            if not _alive(p):
                raise MigrationError("the loader stopped")
        try:
            lock = maintainer._lock if maintainer is not None else threading.Lock()
            with lock:  # no correction or reconciliation of the cleaned buckets meanwhile
                if st.phase == "switched":
                    if maintainer is not None:
                        maintainer.correct(wh)  # the old cleaned buckets current with all that landed first
                    self._build_cleaned(wh, st)
                    self._verify(wh, st)
                    _drop_views(wh, "next")
                    _drop_views(wh, "cur")
                    with READERS.exclusive():
                        self._mark(wh, st, "flipping")
                        _swap_tables(wh, st)
                        _finish_flip(wh, st)
                else:  # a flip interrupted inside this process (recover() handles a restart)
                    with READERS.exclusive():
                        _swap_tables(wh, st)
                        _finish_flip(wh, st)
                p.buckets = st.new
                if maintainer is not None:
                    # Still under the lock: a round starting between the swap and this would read M buckets'
                    # tables with the state of N (the fresh-clone CI failed on it, KeyError 'bucket/10'). The
                    # loader resumes as soon as the queues' views exist for M (relayout calls it), before the
                    # index backfill: the raw tables, the views and the activity index are M's by then.
                    self._bar(st, "maintenance", 0, 1)
                    maintainer.relayout(wh, st.new, resume=loader.resume)
        finally:
            loader.resume()
        self._bar(st, "flip", 1, 1)

    def _build_cleaned(self, wh: Any, st: MigrationState) -> None:
        for m in range(st.new):  # built fresh: nothing writes them but this (the loader is held)
            wh.command(f"DROP TABLE IF EXISTS {cleaned_table(m)}{NEXT} SYNC")
            wh.command(f"CREATE TABLE {cleaned_table(m)}{NEXT} AS {cleaned_table(0)}")
        self._split(wh, st, cleaned_table, "cleaned")

    def _verify(self, wh: Any, st: MigrationState) -> None:
        self._bar(st, "verify", 0, 1)
        old_raw = [raw_table(n) for n in range(st.old)]
        new_raw = [raw_table(m) + NEXT for m in range(st.new)]
        before, after = fingerprint(wh, old_raw), fingerprint(wh, new_raw)
        wrong = misplaced(wh, new_raw, st.new)
        ident = ", ".join(("activityId", *SORT_KEY))
        c_before = fingerprint(wh, [cleaned_table(n) for n in range(st.old)], ident)
        c_after = fingerprint(wh, [cleaned_table(m) + NEXT for m in range(st.new)], ident)
        if before != after or wrong or c_before != c_after:
            raise MigrationError(
                f"verification failed: {after[0]} live raw rows in the new layout, {before[0]} in the old, "
                f"{wrong} misplaced, cleaned {c_after[0]} vs {c_before[0]}; nothing was flipped"
            )
        self._bar(st, "verify", 1, 1)

    def _drain(self, wh: Any, st: MigrationState, buckets: int) -> None:
        """Wait until the loader has committed past the end, as it is now, of every bucket partition (the
        router has switched, so every message routed by the old layout is behind that end), then map topics
        0..buckets-1 to their raw tables directly and drop the inbox."""
        p = self.pipeline
        cfg = p.config
        ends = [tp for tp in end_offsets(cfg.kafka, p.topics.buckets(max(st.old, st.new))) if tp.offset > 0]
        while True:
            committed = committed_offsets(
                cfg.kafka, cfg.loader_group, [TopicPartition(t.topic, t.partition) for t in ends]
            )
            behind = [tp for tp in ends if committed.get((tp.topic, tp.partition), -1) < tp.offset]
            if behind:
                # A partition whose tail is aborted records and transaction markers (a router SIGKILLed
                # mid-transaction, then nothing more routed there: topics M.. after an --abort) is never
                # committed past by the loader, which receives no message there: count what is really left.
                left = group_lag(
                    cfg.kafka,
                    cfg.loader_group,
                    sorted({tp.topic for tp in behind}),
                    until={(tp.topic, tp.partition): tp.offset for tp in behind},
                )
                if left.exact and left.at_most == 0:
                    behind = []
            self._bar(st, "drain", len(ends) - len(behind), len(ends))
            if not behind:
                break
            if not _alive(p):
                raise MigrationError("the loader stopped")
            time.sleep(0.2)
        self._retarget(direct_targets(p.topics, buckets))
        drop_inbox(wh)
        for m in range(max(st.old, st.new)):
            wh.command(f"DROP TABLE IF EXISTS {raw_table(m)}{NEXT} SYNC")
            wh.command(f"DROP TABLE IF EXISTS {cleaned_table(m)}{NEXT} SYNC")

    def _abort(self, wh: Any, st: MigrationState) -> None:
        self._mark(wh, st, "aborting")
        p = self.pipeline
        p.router.switch.ensure_loaded()
        if p.router.switch.buckets != st.old:
            self._switch(st.old, st.id + "-abort")
        ensure_inbox(wh, st.old, None)
        _drop_views(wh, "next")
        self._drain(wh, st, st.old)
        self._mark(wh, st, "aborted")


def attach(pipeline: Any, wh: Any, st: MigrationState | None) -> None:
    """At pipeline start with a migration under way: the loader maps every bucket topic to the inbox (the topics
    may carry a mixture of layouts), until the migration (run again) drains and retargets it."""
    if st is None or st.phase == "started":
        return
    count = max(st.old, st.new)
    ensure_inbox(wh, bucket_count(wh) or st.old, st.new if st.phase in ("prepared", "copied", "switched") else None)
    pipeline.loader.retarget(inbox_targets(pipeline.topics, count))


Progress = Callable[[dict[str, Any]], None]


class Controller:
    """The migration endpoint of a running pipeline (``/v0/rebucket``, stream/api.py): one migration at a time."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.current: Migration | None = None
        self._lock = threading.Lock()

    def start(self, to: int | None, abort: bool) -> dict[str, Any]:
        with self._lock:
            if self.current is not None and self.current.thread is not None and self.current.thread.is_alive():
                if abort == self.current.abort:
                    return self.report()
                raise MigrationError("a migration step is running in this process; wait for it (or restart)")
            self.current = Migration(self.pipeline, to, abort)
            self.current.start()
            return self.report()

    def report(self) -> dict[str, Any]:
        m = self.current
        if m is None or m.state is None:
            with self.pipeline.connect() as wh:
                st = read_state(wh)
            return {"migration": st.as_json() if st else None, "running": False, "error": None}
        running = m.thread is not None and m.thread.is_alive()
        return {"migration": m.state.as_json(), "running": running, "error": m.error}
