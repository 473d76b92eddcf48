"""The router: Sequin changes on ``activityRelations`` -> ``activityRelations_bucket_{cityHash64(segmentId) % N}``.

``Router(config).run()`` consumes the source topic in a consumer group, batch by batch (count and
time bounded), and for every message:

- a good change (connectors/sequin.py): its **original key and value bytes** go to the bucket of its
  segmentId; an update that moves the sort key also sends the router-made retirement of the old row
  to the old row's bucket (header ``bucketer-derived: retirement``);
- bad input: the original key and bytes go to the DLQ with the headers of docs/CONTRACTS.md.

Nothing is dropped and nothing crashes the worker. Then the batch is committed through the sink
(stream/sinks.py, the seam for ``--sink tinybird``): by default a Kafka transaction holding the
records **and** the source offsets (exactly once for ``read_committed`` readers); with
``exactly_once=False`` an idempotent producer whose offsets are committed after delivery (at least
once, faster). Keys are partitioned by the Java client's murmur2 hash, so all changes of one activity
land on one partition of a bucket topic, in source order, whatever the source partitioning.

Failures: a batch that cannot be committed (a retriable Kafka error, or the sink's ``SinkRetryError``)
is aborted (or, when even that fails, the producer is dropped and a new one with the same
``transactional.id`` fences it); then, after a capped exponential backoff (``retry_backoff`` doubling
per consecutive failure up to ``retry_backoff_cap``), every assigned partition seeks to its committed
offset and the batch is replayed. Each attempt is bounded (about 20 s), so the consumer keeps polling
and a broker stop/start is ridden out; more than ``max_sink_restarts`` fatal Kafka producer errors in
5 minutes stop the router (counted with them: a static member fenced, ``ConsumerFenced``, rejoins with a new
consumer under its name; a broker away past the session fences the member's own rejoin). A ``SinkFatalError``
(e.g. Tinybird refusing the token, or unreachable past its deadline) stops the router at once with its one-line
reason, the batch in hand uncommitted.
Pipelined commits: with a sink that has ``commit_later`` (KafkaSink) the wait on the broker (offsets to the
transaction, commit: every record acknowledged, then the end marker) runs in a thread while this thread reads
and routes the next batch into a ``RecordedBatch``; that batch is written, in a transaction of its own, only once
the previous one has committed (bench_router's profile: 32% of the router's time was this wait). If the previous
commit failed, or the group rebalanced while it ran, the batch read meanwhile is dropped and read again from the
committed offsets. The first batch, a sink without ``commit_later`` (Tinybird) and a gradual rebucket's switch
take the plain path (route, commit, wait).
Rebalance callbacks only run inside ``consume()``, so a revoke never meets a transaction still being written;
one may meet a commit in flight, whose offsets carry the generation the batch was read in (KIP-447): a moved
generation fences that commit (it is aborted and replayed), and a zombie's commit is fenced the same way. A stable
``transactional.id`` per instance (``instance_id``; default ``connectors.kafka.Member``'s host name and index)
lets a restarted router fence and abort its killed predecessor's open transaction at once. With
``static_membership`` (the default) that name is its ``group.instance.id``: a router restarted within the
session timeout gets its partitions back with no rebalance, and the other routers never pause. The assignor
stays eager (not cooperative-sticky): a rebalance then revokes everything between batches, when no
transaction is open, while a cooperative member keeps routing during a rebalance and its offsets sent to a
transaction then may be refused (the generation moved), aborting batches. ``stop()`` sets a flag and interrupts a
sink waiting on its target: the batch in hand is finished or abandoned uncommitted. With ``until_idle`` a
broker outage is not idleness: idle time counts again from the broker's return (the input may be waiting there).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from connectors.kafka import (
    BrokerUnreachable,
    BucketerKafkaError,
    ConsumerFenced,
    KafkaFatalError,
    KafkaRetryError,
    Member,
    check_reachable,
    consumer_config,
    consumer_error,
    group_lag,
    lag_estimate,
)
from connectors.kafka_conn import KafkaConnection
from connectors.sink_errors import SinkError, SinkFatalError, SinkRetryError
from connectors.topics import TopicNames
from stream.routing import BatchCounts, BatchRouter, RecordedBatch, RouterStats
from stream.sinks import Sink, interrupt_sink, make_sink

if TYPE_CHECKING:  # only a type here: connectors.tinybird pulls in httpx, which the Kafka path never needs
    from connectors.tinybird import TinybirdSettings

log = logging.getLogger("bucketer.router")


@dataclass(frozen=True)
class RouterConfig:
    kafka: KafkaConnection
    buckets: int = 10
    group: str = "bucketer-router"
    topic_prefix: str = ""
    sink: str = "kafka"
    partitions: int | None = None  # per bucket topic it creates; None: connectors.topics.bucket_partitions
    replication: int = 1
    batch_size: int = 10_000
    batch_time: float = 0.25  # seconds a batch may wait to fill (bench_latency: 0.25 beat 0.5 at 1k-20k/s)
    # Under backlog (a batch came back full) the next one may be twice as large, up to this: fewer transactions
    # per message while catching up; back to batch_size as soon as a batch comes back short (caught up).
    # 20k, not 40k: with pipelined commits one batch sits in the producer while the next is routed, and 40k put
    # the peak RSS at ~380 MB (bench_router; 20k: ~300 MB, for ~5% less throughput in trials).
    backlog_batch_size: int = 20_000
    exactly_once: bool = True
    until_idle: float | None = None
    progress_interval: float = 10.0
    instance_id: str | None = None  # None: connectors.kafka.Member's "<host>-<index>", claimed at run()
    max_message_bytes: int = 1_000_000
    session_timeout_ms: int | None = None  # None: connectors.kafka.consumer_config's (static or dynamic)
    static_membership: bool = True
    max_sink_restarts: int = 5
    retry_backoff: float = 0.2  # seconds before replaying a batch that failed once; doubles per failure
    retry_backoff_cap: float = 5.0
    tinybird: TinybirdSettings | None = None  # the target of sink="tinybird" (connectors/tinybird.py)

    def __post_init__(self) -> None:
        if self.sink not in ("kafka", "tinybird"):
            raise ValueError(f"unknown sink {self.sink!r}; expected kafka or tinybird")
        if self.sink == "tinybird" and self.tinybird is None:
            raise ValueError("sink tinybird needs its settings (--tinybird-url, BUCKETER_TINYBIRD_TOKEN)")
        if self.retry_backoff < 0 or self.retry_backoff_cap < self.retry_backoff:
            raise ValueError(f"retry_backoff {self.retry_backoff} / cap {self.retry_backoff_cap} out of order")


@dataclass
class _Committing:
    """A batch whose transaction commits in a thread while the router reads and routes the next one."""

    thread: threading.Thread
    outcome: list[BaseException | None]
    size: int  # messages in it
    first: Message  # its first message (for the log; the batch itself is not kept: memory)
    counts: BatchCounts
    rebalances: int  # Router._rebalances when it was read
    sink: Sink


class Router:
    loop_beat: float | None = None  # time.monotonic() as the loop last turned (stream/metrics.py Health)

    def __init__(
        self,
        config: RouterConfig,
        sink_factory: Callable[[RouterConfig], Sink] = make_sink,
        clock: Callable[[], float] = time.monotonic,
        consumer_factory: Callable[[dict[str, object]], Consumer] | None = None,
    ) -> None:
        """``consumer_factory`` (tests: an in-memory consumer) takes the consumer config; by default a
        confluent-kafka Consumer, after checking that the broker answers."""
        self.config = config
        self._consumer_factory = consumer_factory
        self.topics = TopicNames(config.topic_prefix)
        self.stats = RouterStats(config.buckets)
        self._sink_factory, self._clock = sink_factory, clock
        self._stopping = False
        self._sink: Sink | None = None
        self._assigned_at = 0.0
        self._broken = False  # the sink must be closed and reopened before the next batch
        self._rewind_needed = False  # the consumer must seek to the committed offsets first
        self._fatal_times: list[float] = []
        self._failures = 0  # batches in a row not committed: the backoff before the next replay
        self._retry_at = 0.0  # time.monotonic() before which no replay starts
        self._router = BatchRouter(config.buckets, config.max_message_bytes)
        self._static = False
        self._away: float | None = None  # clock() when the broker was found away; None: it answers
        self._session_s = 0.0  # the consumer's session timeout, once run() has built it
        self._committing: _Committing | None = None  # the batch committing in the background (_batch)
        self._rebalances = 0  # assignments and revocations so far
        from stream.migration import RouterSwitch  # the gradual rebucket's switch (stream/migration.py)

        self.switch = RouterSwitch(self)

    def stop(self) -> None:
        """Stop after the batch in hand; a sink waiting on its target is interrupted (the batch is
        then abandoned uncommitted and replayed later). Safe to call from a signal handler."""
        self._stopping = True
        if self._sink is not None:
            interrupt_sink(self._sink)

    def run(self) -> None:
        if self._consumer_factory is None:
            check_reachable(self.config.kafka)
        self._static = self.config.static_membership
        member = Member(self.config.group, self.config.instance_id)
        try:
            self.config = replace(self.config, instance_id=member.name)
            self._run()
        finally:
            member.release()

    def _run(self) -> None:
        cfg = self.config
        sink = self._sink = self._sink_factory(cfg)
        if self._stopping:
            interrupt_sink(sink)
        sink.open()
        session = cfg.session_timeout_ms or (None if self._static else 6_000)  # dynamic: the old 6 s
        extra: dict[str, object] = (
            {} if session is None else {"session.timeout.ms": session, "heartbeat.interval.ms": session // 3}
        )
        instance = f"{self.topics.source}.{cfg.instance_id}" if self._static else None
        conf = consumer_config(cfg.kafka, cfg.group, instance=instance, error_cb=self._client_error, **extra)
        self._session_s = conf["session.timeout.ms"] / 1000
        consumer: Consumer | None = self._join(conf)
        try:
            while consumer is not None:
                try:
                    self._loop(consumer, sink)
                    break
                except ConsumerFenced as exc:
                    # Raised between batches (no transaction open): the batch in hand is replayed by the new
                    # consumer from the committed offsets. A real twin under this name fences it again, and the
                    # fatal count stops the router.
                    self._count_fatal(exc)
                    log.warning("%s: rejoining the group under the same name with a new consumer", exc)
                    old, consumer = consumer, None
                    with contextlib.suppress(KafkaException, RuntimeError):
                        old.close()
                    consumer = self._join(conf)
        finally:
            try:
                if not self._broken:
                    self._abort(sink)  # if it fails, the next instance (same transactional.id) aborts it
                sink.close()  # may raise the sink's stop (SinkFatalError) nothing reported yet
            finally:
                if consumer is not None:
                    consumer.close()
                log.info("router stopped: %s", self.stats.summary())

    def _join(self, conf: dict[str, object]) -> Consumer:
        consumer = self._consumer_factory(conf) if self._consumer_factory else Consumer(conf)
        consumer.subscribe(
            [self.topics.source], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )
        return consumer

    def _loop(self, consumer: Consumer, sink: Sink) -> None:
        try:
            self._turn(consumer, sink)
        finally:
            self._settle()  # a batch still committing in the background is waited for, its outcome taken

    def _turn(self, consumer: Consumer, sink: Sink) -> None:
        cfg = self.config
        started = last_input = last_progress = self._clock()
        size = cfg.batch_size
        while not self._stopping:
            self.loop_beat = time.monotonic()  # /healthz (stream/metrics.py Health): the loop turns
            if (self._broken or self._rewind_needed) and (wait := self._retry_at - time.monotonic()) > 0:
                time.sleep(min(wait, 0.1))  # backing off before the replay; a stop ends it within 0.1 s
                continue
            msgs = consumer.consume(size, timeout=cfg.batch_time)
            now = self._clock()
            if self._broken or self._rewind_needed:
                # Messages fetched before the rewind are dropped here: the rewind fetches them again.
                if not self._recover(consumer, sink):
                    time.sleep(1.0)
            elif msgs:
                last_input = now
                self._batch(msgs, consumer, sink)
                full = len(msgs) >= size
                size = min(size * 2, max(cfg.batch_size, cfg.backlog_batch_size)) if full else cfg.batch_size
            elif not self._settle():  # nothing read: the batch in the background settles before any idle decision
                continue  # it failed (or partitions moved): the next turn rewinds
            elif self.switch.pending:  # a gradual rebucket's switch, on an idle source
                self.switch.idle(consumer, sink, msgs)
            elif cfg.until_idle is not None and now - max(last_input, self._assigned_at) >= cfg.until_idle:
                # An outage is not idleness: the input may be waiting on the broker that is away, so idleness
                # counts again from its return (a static member keeps its partitions through an outage, so no
                # rejoin restarts the count as it did for a dynamic one).
                if self._away is not None:
                    self._probe(consumer)
                elif self._caught_up(consumer, now - max(started, self._assigned_at)):
                    log.info("no input for %.1fs and nothing left to read: stopping", now - last_input)
                    break
                last_input = now  # input is pending (a slow first fetch, a loading coordinator): wait on
            if now - last_progress >= cfg.progress_interval:
                self.stats.lag = lag_estimate(consumer)
                log.info("%s", self.stats.progress(now - last_progress))
                last_progress = now

    def _batch(self, msgs: list[Message], consumer: Consumer, sink: Sink) -> None:
        last: dict[tuple[str, int], int] = {}
        good = []
        for m in msgs:
            err = m.error()
            if err is not None:
                if (exc := consumer_error(err, f"consume {m.topic()} [{m.partition()}]")) is not None:
                    log.warning("%s", exc, extra={"topic": m.topic(), "partition": m.partition()})
                continue
            last[(m.topic(), m.partition())] = m.offset()  # type: ignore[index,assignment]
            good.append(m)
        if not good:
            return
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
        commit_later = getattr(sink, "commit_later", None)
        if commit_later is None or not self.switch.settled(self._router, last):
            if not self._settle():
                return  # the batch before failed, or the group rebalanced: this one is read again (the rewind)
            try:
                sink.begin()
                self._router = self.switch.begin_batch(self._router, sink, good, last)  # N -> M here, if asked
                counts = self._router.route(good, sink)  # type: ignore[arg-type]
                sink.commit(offsets, consumer)
            except SinkFatalError:
                raise  # stopped for good: run() aborts the batch (uncommitted) and closes the sink
            except (BucketerKafkaError, SinkRetryError) as exc:
                self._failed(exc, len(good), good[0], sink)
                return
            self._committed(counts)
            return
        # Pipelined: route this batch aside while the previous one's transaction commits, then write it in a
        # transaction of its own, whose commit runs in the background while the next batch is read and routed.
        recorded = RecordedBatch(resolve=getattr(sink, "write_resolve", None) is not None)
        counts = self._router.route(good, recorded)  # type: ignore[arg-type]
        if not self._settle():
            return
        try:
            sink.begin()
            recorded.replay(sink)
            finish = commit_later(offsets, consumer)  # the group metadata: the generation this batch was read in
        except SinkFatalError:
            raise
        except (BucketerKafkaError, SinkRetryError) as exc:
            self._failed(exc, len(good), good[0], sink)
            return
        outcome: list[BaseException | None] = []

        def commit() -> None:
            try:
                finish()
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the router's thread by _settle
                outcome.append(exc)

        thread = threading.Thread(target=commit, name="router-commit", daemon=True)
        self._committing = _Committing(thread, outcome, len(good), good[0], counts, self._rebalances, sink)
        thread.start()

    def _settle(self) -> bool:
        """Wait for the batch committing in the background, if any, and take its outcome. True: the next batch
        may follow on (nothing failed, no rebalance since that batch was read); False: the router rewinds."""
        c, self._committing = self._committing, None
        if c is None:
            return not (self._broken or self._rewind_needed)
        c.thread.join()  # bounded: each transactional call is (KafkaSink._retrying, _watched)
        exc = c.outcome[0] if c.outcome else RuntimeError("the commit thread ended without an outcome")
        if exc is None:
            self._committed(c.counts)
            if self._rebalances != c.rebalances:
                # Partitions moved while it committed: positions taken then may predate the commit, so what was
                # read meanwhile is dropped and read again from the committed offsets.
                self._rewind_needed = True
                return False
            return True
        if isinstance(exc, (BucketerKafkaError, SinkRetryError)) and not isinstance(exc, SinkFatalError):
            self._failed(exc, c.size, c.first, c.sink)
            return False
        raise exc

    def _committed(self, counts: BatchCounts) -> None:
        self._failures = 0
        self._broker_back()  # a committed batch: it answers
        self.stats.add(counts)

    def _failed(self, exc: BucketerKafkaError | SinkRetryError, size: int, first: Message, sink: Sink) -> None:
        """A batch not committed: abort it, then replay from the committed offsets after a backoff."""
        cfg = self.config
        if self._stopping:
            self._abort(sink)
            log.info("stopping: batch of %d abandoned uncommitted (replayed on the next run)", size)
            return
        self.stats.aborts += 1
        self._rewind_needed = True
        # a sink's retry leaves it usable: abort the batch; a Kafka error may need a new producer
        reopen = isinstance(exc, BucketerKafkaError) and not exc.abortable
        self._broken = reopen or not self._abort(sink)
        self._failures += 1
        delay = min(cfg.retry_backoff_cap, cfg.retry_backoff * 2 ** min(self._failures - 1, 30))
        self._retry_at = time.monotonic() + delay
        where = f"{first.topic()}[{first.partition()}]@{first.offset()}"
        log.warning(
            "batch of %d from %s not committed (%s); %s, then replaying from the committed offsets in %.2fs",
            size,
            where,
            exc,
            "reopening the sink" if self._broken else "aborted",
            delay,
            extra={"topic": first.topic(), "partition": first.partition(), "offset": first.offset()},
        )
        if isinstance(exc, KafkaFatalError):
            self._count_fatal(exc)

    def _abort(self, sink: Sink) -> bool:
        try:
            sink.abort()
            return True
        except (BucketerKafkaError, SinkError) as exc:
            log.warning("abort failed: %s", exc)
            return False

    def _count_fatal(self, exc: KafkaFatalError) -> None:
        now = self._clock()
        self._fatal_times = [t for t in self._fatal_times if now - t < 300] + [now]
        if len(self._fatal_times) > self.config.max_sink_restarts:
            raise KafkaFatalError(f"the sink or consumer failed fatally {len(self._fatal_times)} times in 5 min: {exc}")

    def _recover(self, consumer: Consumer, sink: Sink) -> bool:
        """Reopen a broken sink (a new transactional producer fences the old one and resolves its open
        transaction), then seek every assigned partition to its committed offset. False: try again later."""
        try:
            if self._broken:
                sink.close()
                sink.open()
                self._broken = False
            assigned = consumer.assignment()
            if assigned:
                committed = consumer.committed(assigned, timeout=10)
                failed = [tp for tp in committed if tp.error is not None]
                if failed:  # never guess a position: seeking to the start would duplicate output
                    log.warning("committed offsets unavailable (%s); will retry", failed[0].error)
                    return False
                for tp in committed:  # no commit yet: the group starts from the beginning (earliest)
                    consumer.seek(
                        TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                    )
            self._rewind_needed = False
            log.info("recovered: replaying from the committed offsets")
            return True
        except SinkFatalError:
            raise
        except KafkaFatalError as exc:
            log.warning("recovery failed: %s", exc)
            if not isinstance(exc, BrokerUnreachable):
                self._count_fatal(exc)
            return False
        except (BucketerKafkaError, SinkRetryError, KafkaException) as exc:
            log.warning("recovery failed, will retry: %s", exc)
            return False

    def _caught_up(self, consumer: Consumer, running: float) -> bool:
        """Idle means caught up: committed offsets at the end of every assigned partition (or, with no
        partitions at all, none assigned for a long while: more routers than partitions). "A long while" covers
        twice the session timeout: a join waits up to one for a static member that left for good (it sends no
        LeaveGroup) before the group rebalances (measured: 29 s for the next router of a group under another
        name). A broker that does not answer is an outage (see ``_client_error``), never caught up."""
        assigned = consumer.assignment()
        if not assigned:
            return running >= max(30.0, 2 * self._session_s, self.config.until_idle or 0.0)
        if lag_estimate(consumer) == 0:
            return True
        # The offset estimate counts transaction markers (a source topic written transactionally, e.g. by
        # ``bucketer dlq redrive``, ends each partition with one): read what is really left, once per idle spell.
        try:
            lag = group_lag(self.config.kafka, self.config.group, sorted({tp.topic for tp in assigned}))
        except KafkaRetryError as exc:
            self._broker_away(str(exc))
            return False
        return lag.exact and lag.messages == 0

    def _client_error(self, err: KafkaError) -> None:
        """The consumer's errors as a whole (error_cb, served inside ``consume()``): all brokers down starts an
        outage, which ``_probe`` ends; the rest (one connection closed, ...) librdkafka retries itself."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._broker_away(err.str())
        else:
            log.debug("router: %s", err.str())

    def _broker_away(self, reason: str) -> None:
        if self._away is None:
            self._away = self._clock()
            log.warning("router: broker unreachable (%s); an outage is not idleness", reason)

    def _probe(self, consumer: Consumer) -> None:
        """In an outage, while idle: does the group coordinator (or, with nothing assigned, any broker) answer?"""
        try:
            assigned = consumer.assignment()
            if assigned:
                failed = [tp for tp in consumer.committed(assigned, timeout=2) if tp.error is not None]
                if failed:
                    return
            else:
                consumer.list_topics(timeout=2)
        except KafkaException:
            return
        self._broker_back()

    def _broker_back(self) -> None:
        if self._away is not None:
            log.warning("router: broker back after %.0fs", self._clock() - self._away)
            self._away = None

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_at = self._clock()
        self._rebalances += 1
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_at = self._clock()  # unassigned from now: "none assigned for a long while" restarts
        self._rebalances += 1
        log.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))
