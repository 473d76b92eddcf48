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

Failures: a batch that cannot be committed is aborted (or, when even that fails, the producer is
dropped and a new one with the same ``transactional.id`` fences it); then every assigned partition
seeks to its committed offset and the batch is replayed. Each attempt is bounded (about 20 s), so the
consumer keeps polling and a broker stop/start is ridden out; more than ``max_sink_restarts`` fatal
sink errors in 5 minutes stop the router. Rebalance callbacks only run inside
``consume()``, i.e. between batches, so a revoke never meets an open transaction; the group
generation travels with the offsets (KIP-447), so a zombie's commit is fenced. A stable
``transactional.id`` per instance (``instance_id``, default the host name) lets a restarted router
fence and abort its killed predecessor's open transaction at once; its partitions move after
``session_timeout_ms``. ``static_membership`` (off by default: after a broker restart a static member
was seen to stay unassigned) would also skip that rebalance. ``stop()`` only sets a flag: the batch in
hand is finished or aborted.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from connectors.kafka import (
    BrokerUnreachable,
    BucketerKafkaError,
    KafkaFatalError,
    check_reachable,
    classify,
    consumer_config,
)
from connectors.topics import TopicNames
from stream.routing import BatchRouter, RouterStats
from stream.sinks import Sink, SinkFatalError, interrupt_sink, make_sink

log = logging.getLogger("bucketer.router")


@dataclass(frozen=True)
class RouterConfig:
    bootstrap: str
    buckets: int = 10
    group: str = "bucketer-router"
    topic_prefix: str = ""
    sink: str = "kafka"
    partitions: int | None = None  # per bucket topic it creates; None: connectors.topics.bucket_partitions
    replication: int = 1
    batch_size: int = 10_000
    batch_time: float = 0.25  # seconds a batch may wait to fill (bench_latency: 0.25 beat 0.5 at 1k-20k/s)
    exactly_once: bool = True
    until_idle: float | None = None
    progress_interval: float = 10.0
    instance_id: str = socket.gethostname()
    max_message_bytes: int = 1_000_000
    session_timeout_ms: int = 6_000
    static_membership: bool = False
    max_sink_restarts: int = 5


class Router:
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
        self._router = BatchRouter(config.buckets, config.max_message_bytes)

    def stop(self) -> None:
        """Stop after the batch in hand; a sink waiting on its target is interrupted (the batch is
        then abandoned uncommitted and replayed later). Safe to call from a signal handler."""
        self._stopping = True
        if self._sink is not None:
            interrupt_sink(self._sink)

    def run(self) -> None:
        cfg = self.config
        if self._consumer_factory is None:
            check_reachable(cfg.bootstrap)
        sink = self._sink = self._sink_factory(cfg)
        if self._stopping:
            interrupt_sink(sink)
        sink.open()
        extra: dict[str, object] = {
            "session.timeout.ms": cfg.session_timeout_ms,
            "heartbeat.interval.ms": max(500, cfg.session_timeout_ms // 3),
        }
        if cfg.static_membership:
            extra["group.instance.id"] = f"{self.topics.source}.{cfg.instance_id}"
        conf = consumer_config(cfg.bootstrap, cfg.group, **extra)
        consumer = self._consumer_factory(conf) if self._consumer_factory else Consumer(conf)
        try:
            consumer.subscribe(
                [self.topics.source], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
            )
            self._loop(consumer, sink)
        finally:
            if not self._broken:
                self._abort(sink)  # if it fails, the next instance (same transactional.id) aborts it
            sink.close()
            consumer.close()
            log.info("router stopped: %s", self.stats.summary())

    def _loop(self, consumer: Consumer, sink: Sink) -> None:
        cfg = self.config
        started = last_input = last_progress = self._clock()
        while not self._stopping:
            msgs = consumer.consume(cfg.batch_size, timeout=cfg.batch_time)
            now = self._clock()
            if self._broken or self._rewind_needed:
                # Messages fetched before the rewind are dropped here: the rewind fetches them again.
                if not self._recover(consumer, sink):
                    time.sleep(1.0)
            elif msgs:
                last_input = now
                self._batch(msgs, consumer, sink)
            elif cfg.until_idle is not None and now - max(last_input, self._assigned_at) >= cfg.until_idle:
                if self._caught_up(consumer, now - max(started, self._assigned_at)):
                    log.info("no input for %.1fs and nothing left to read: stopping", now - last_input)
                    break
                last_input = now  # input is pending (a slow first fetch, a loading coordinator): wait on
            if now - last_progress >= cfg.progress_interval:
                self.stats.lag = _lag(consumer)
                log.info("%s", self.stats.progress(now - last_progress))
                last_progress = now

    def _batch(self, msgs: list[Message], consumer: Consumer, sink: Sink) -> None:
        last: dict[tuple[str, int], int] = {}
        good = []
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    exc = classify(err, f"consume {m.topic()} [{m.partition()}]")
                    if isinstance(exc, KafkaFatalError):
                        raise exc
                    log.warning("%s", exc)
                continue
            last[(m.topic(), m.partition())] = m.offset()  # type: ignore[index,assignment]
            good.append(m)
        if not good:
            return
        try:
            sink.begin()
            counts = self._router.route(good, sink)  # type: ignore[arg-type]
            sink.commit([TopicPartition(t, p, o + 1) for (t, p), o in last.items()], consumer)
        except SinkFatalError:
            raise
        except BucketerKafkaError as exc:
            if self._stopping:
                self._abort(sink)
                log.info("stopping: batch of %d abandoned uncommitted (replayed on the next run)", len(good))
                return
            self.stats.aborts += 1
            self._rewind_needed = True
            self._broken = not exc.abortable or not self._abort(sink)
            where = ", ".join(f"{m.topic()}[{m.partition()}]@{m.offset()}" for m in good[:1])
            log.warning(
                "batch of %d from %s not committed (%s); %s, then replaying from the committed offsets",
                len(good),
                where,
                exc,
                "reopening the sink" if self._broken else "aborted",
            )
            if isinstance(exc, KafkaFatalError):
                self._count_fatal(exc)
            return
        self.stats.add(counts)

    def _abort(self, sink: Sink) -> bool:
        try:
            sink.abort()
            return True
        except BucketerKafkaError as exc:
            log.warning("abort failed: %s", exc)
            return False

    def _count_fatal(self, exc: KafkaFatalError) -> None:
        now = self._clock()
        self._fatal_times = [t for t in self._fatal_times if now - t < 300] + [now]
        if len(self._fatal_times) > self.config.max_sink_restarts:
            raise KafkaFatalError(f"the sink failed fatally {len(self._fatal_times)} times in 5 min: {exc}")

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
        except (BucketerKafkaError, KafkaException) as exc:
            log.warning("recovery failed, will retry: %s", exc)
            return False

    def _caught_up(self, consumer: Consumer, running: float) -> bool:
        """Idle means caught up: committed offsets at the end of every assigned partition (or, with no
        partitions at all, none assigned for a long while: more routers than partitions)."""
        if not consumer.assignment():
            return running >= max(30.0, self.config.until_idle or 0.0)
        return _lag(consumer) == 0

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_at = self._clock()
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_at = self._clock()  # unassigned from now: "none assigned for a long while" restarts
        log.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))


def _lag(consumer: Consumer) -> int | None:
    """Messages not yet committed on the assigned partitions; None when the broker cannot tell now."""
    try:
        total = 0
        for tp in consumer.committed(consumer.assignment(), timeout=5):
            if tp.error is not None:
                return None
            low, high = consumer.get_watermark_offsets(tp, timeout=2, cached=False)
            total += max(0, high - (tp.offset if tp.offset >= 0 else low))
        return total
    except Exception:  # noqa: BLE001 - lag is informational
        return None
