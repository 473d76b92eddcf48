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

Failures: a batch that cannot be committed is aborted and the consumer rewound to the batch start,
then retried (this also covers a broker stop/start); a fatal producer error (e.g. an expired
transaction) reopens the sink a few times before giving up. Rebalance callbacks only run inside
``consume()``, i.e. between batches, so a revoke never meets an open transaction; the group
generation travels with the offsets (KIP-447), so a zombie's commit is fenced. A stable
``transactional.id`` and ``group.instance.id`` per instance let a restarted router fence and abort its
killed predecessor at once (the member id includes the source topic, so one id never changes its
subscription; a cleanly stopped static member keeps its partitions until ``session_timeout_ms``, when
they move to the other routers of the group). ``stop()`` only sets a flag: the batch in hand is finished or aborted.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from connectors.kafka import (
    BucketerKafkaError,
    KafkaFatalError,
    check_reachable,
    classify,
    consumer_config,
)
from connectors.topics import TopicNames
from stream.routing import BatchRouter, RouterStats
from stream.sinks import Sink, make_sink

log = logging.getLogger("bucketer.router")


@dataclass(frozen=True)
class RouterConfig:
    bootstrap: str
    buckets: int = 10
    group: str = "bucketer-router"
    topic_prefix: str = ""
    sink: str = "kafka"
    partitions: int = 3            # of bucket topics (and the DLQ) when the router creates them
    replication: int = 1
    batch_size: int = 5000
    batch_time: float = 0.5        # seconds a batch may wait to fill
    exactly_once: bool = True
    until_idle: float | None = None
    progress_interval: float = 10.0
    instance_id: str = socket.gethostname()
    max_message_bytes: int = 1_000_000
    session_timeout_ms: int = 10_000
    max_sink_restarts: int = 5


class Router:
    def __init__(self, config: RouterConfig, sink_factory: Callable[[RouterConfig], Sink] = make_sink,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.topics = TopicNames(config.topic_prefix)
        self.stats = RouterStats(config.buckets)
        self._sink_factory, self._clock = sink_factory, clock
        self._stopping = False
        self._assigned_at = 0.0
        self._router = BatchRouter(config.buckets, config.max_message_bytes)

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        cfg = self.config
        check_reachable(cfg.bootstrap)
        sink = self._sink_factory(cfg)
        sink.open()
        consumer = Consumer(consumer_config(
            cfg.bootstrap, cfg.group, **{"group.instance.id": f"{self.topics.source}.{cfg.instance_id}",
                                         "session.timeout.ms": cfg.session_timeout_ms}))
        try:
            consumer.subscribe([self.topics.source], on_assign=self._on_assign,
                               on_revoke=self._on_revoke, on_lost=self._on_revoke)
            self._loop(consumer, sink)
        finally:
            try:
                sink.abort()
            except BucketerKafkaError as exc:  # the broker aborts it at transaction timeout anyway
                log.warning("abort on close failed: %s", exc)
            sink.close()
            consumer.close()
            log.info("router stopped: %s", self.stats.summary())

    def _loop(self, consumer: Consumer, sink: Sink) -> None:
        cfg = self.config
        last_input = last_progress = self._clock()
        restarts: list[float] = []
        while not self._stopping:
            msgs = consumer.consume(cfg.batch_size, timeout=cfg.batch_time)
            now = self._clock()
            if msgs:
                last_input = now
                try:
                    self._batch(msgs, consumer, sink)
                except KafkaFatalError as exc:
                    restarts = [t for t in restarts if now - t < 300] + [now]
                    if len(restarts) > cfg.max_sink_restarts:
                        raise
                    log.warning("sink unusable (%s); reopening it (%d)", exc, len(restarts))
                    sink.close()
                    sink.open()
            elif cfg.until_idle is not None and now - max(last_input, self._assigned_at) >= cfg.until_idle:
                log.info("no input for %.1fs: stopping", now - max(last_input, self._assigned_at))
                break
            if now - last_progress >= cfg.progress_interval:
                self.stats.lag = _lag(consumer)
                log.info("%s", self.stats.progress(now - last_progress))
                last_progress = now

    def _batch(self, msgs: list[Message], consumer: Consumer, sink: Sink) -> None:
        first: dict[tuple[str, int], int] = {}
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
            tp = (m.topic(), m.partition())
            if tp not in first:
                first[tp] = m.offset()
            last[tp] = m.offset()
            good.append(m)
        if not good:
            return
        sink.begin()
        try:
            counts = self._router.route(good, sink)
            sink.commit([TopicPartition(t, p, o + 1) for (t, p), o in last.items()], consumer)
        except BucketerKafkaError as exc:
            log.warning("batch of %d not committed (%s); aborting and replaying from %s",
                        len(good), exc, {f"{t}[{p}]": o for (t, p), o in first.items()})
            self.stats.aborts += 1
            self._abort(sink)
            _rewind(consumer, first)
            if isinstance(exc, KafkaFatalError):
                raise
            time.sleep(0.5)
            return
        self.stats.add(counts)

    def _abort(self, sink: Sink) -> None:
        deadline = self._clock() + 120
        while True:
            try:
                sink.abort()
                return
            except KafkaFatalError:
                return  # the sink is reopened; a new producer fences the old transaction
            except BucketerKafkaError as exc:
                if self._stopping or self._clock() > deadline:
                    raise KafkaFatalError(f"cannot abort the open transaction: {exc}") from None
                log.warning("abort failed (%s); retrying", exc)
                time.sleep(1.0)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_at = self._clock()
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))


def _rewind(consumer: Consumer, first: dict[tuple[str, int], int]) -> None:
    for (topic, partition), offset in first.items():
        try:
            consumer.seek(TopicPartition(topic, partition, offset))
        except Exception as exc:  # noqa: BLE001 - revoked meanwhile: its new owner starts at the commit
            log.warning("rewind %s [%d] to %d failed: %s", topic, partition, offset, exc)


def _lag(consumer: Consumer) -> int | None:
    try:
        total = 0
        for tp in consumer.position(consumer.assignment()):
            _, high = consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
            total += max(0, high - tp.offset) if tp.offset >= 0 else 0
        return total
    except Exception:  # noqa: BLE001 - lag is informational
        return None
