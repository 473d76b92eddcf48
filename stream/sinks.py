"""Where routed records go: the ``Sink`` seam of the router, and its default, ``KafkaSink``.

The router drives a sink batch by batch, never concurrently::

    sink.open()                              # once, before the consumer joins (network happens here)
    loop:
        sink.begin()                         # a batch starts (a Kafka transaction for exactly-once)
        sink.write(bucket, key, value, headers)      # each routed record, original bytes
        sink.dead_letter(key, value, headers)        # each bad input (DLQ headers of CONTRACTS.md)
        sink.commit(offsets, consumer)       # make the batch durable, THEN the source offsets
        # or, on a BucketerKafkaError from commit: sink.abort(); the router rewinds the consumer
    sink.close()

A sink may also have ``commit_later(offsets, consumer)``: ``commit`` in two parts, the consumer's part at once
and the wait on the broker as a returned call, which the router runs in a thread of its own while it reads and
routes the next batch (stream/router.py); the sink is still used by one thread at a time.

``commit`` is where the delivery guarantee lives. ``exactly_once`` sinks commit records and offsets
atomically (Kafka transactions: ``send_offsets_to_transaction`` + ``commit_transaction``). Others
must first wait until every record of the batch is acknowledged and only then call
``consumer.commit(offsets, asynchronous=False)`` (at-least-once: a crash in between replays the
batch). A sink's errors say what the router does next:

- the sink's own (connectors/sink_errors.py, re-exported here): ``SinkRetryError`` (batch not durable,
  the sink is fine: the router aborts it and replays it after a backoff), ``SinkFatalError`` (stopped
  for good: the router stops at once with its one-line reason, the batch uncommitted);
- Kafka's (connectors/kafka.py), raised by Kafka clients only: ``KafkaRetryError`` (the router aborts and
  replays the batch, after the same backoff), ``KafkaFatalError`` (the producer is unusable: the router
  closes and reopens the sink a few times, then gives up).

A sink may have ``interrupt()``: the router's ``stop()`` calls it (from a signal handler) so that no retry
or wait outlives a stop. ``abort`` forgets what was written since ``begin`` where it can.

``make_sink(config)`` builds the sink named by ``RouterConfig.sink``: ``KafkaSink``, or with "tinybird"
a ``connectors.tinybird.TinybirdSink`` from ``RouterConfig.tinybird`` (``TinybirdSettings``) whose DLQ
is an at-least-once ``KafkaSink`` (the DLQ stays a Kafka topic whatever the sink).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from connectors.kafka import (
    BucketerKafkaError,
    KafkaFatalError,
    KafkaRetryError,
    classify,
    ensure_bucket_topics,
    from_exception,
    producer_config,
)
from connectors.kafka_conn import KafkaConnection
from connectors.sink_errors import SinkError, SinkFatalError, SinkRetryError
from connectors.topics import TopicNames

if TYPE_CHECKING:
    from stream.router import RouterConfig

log = logging.getLogger("bucketer.sink")
Headers = list[tuple[str, bytes]] | None


class Sink(Protocol):
    exactly_once: bool

    def open(self) -> None: ...
    def begin(self) -> None: ...
    def write(self, bucket: int, key: bytes | None, value: bytes, headers: Headers = None) -> None: ...
    def dead_letter(self, key: bytes | None, value: bytes | None, headers: Headers) -> None: ...
    def commit(self, offsets: list[TopicPartition], consumer: Consumer) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


__all__ = [
    "Headers",
    "KafkaSink",
    "Sink",
    "SinkError",
    "SinkFatalError",
    "SinkRetryError",
    "interrupt_sink",
    "make_sink",
]


def interrupt_sink(sink: object) -> None:
    """Ask a sink to give up waiting (retries, backoff, acknowledgements) because the router stops:
    its pending ``commit`` raises a ``SinkRetryError`` (the batch stays uncommitted and is replayed
    later) and ``close`` does not wait. Sinks without an ``interrupt()`` are left alone."""
    interrupt = getattr(sink, "interrupt", None)
    if callable(interrupt):
        interrupt()


class KafkaSink:
    """Bucket topics ``activityRelations_bucket_{b}`` and the DLQ on Kafka; transactional when
    ``transactional_id`` is set, else an idempotent producer committing offsets after delivery."""

    def __init__(
        self,
        kafka: KafkaConnection,
        topics: TopicNames,
        buckets: int,
        *,
        transactional_id: str | None,
        partitions: int | None = None,
        replication: int = 1,
        timeout: float = 20.0,
        producer_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.exactly_once = transactional_id is not None
        self._kafka, self._names, self._buckets = kafka, topics, buckets
        self._topics = topics.buckets(buckets)
        self._conf = producer_config(kafka, transactional_id, **(producer_overrides or {}))
        self._conf["error_cb"] = self._on_client_error
        if not self.exactly_once:
            self._conf["on_delivery"] = self._on_delivery_error
        self._partitions, self._replication, self._timeout = partitions, replication, timeout
        self._producer: Producer | None = None
        self._in_txn = False
        self._stuck = False
        self._abandoned: list[Producer] = []  # clients whose call never returned; never destroyed
        self._failed: list[KafkaError] = []

    def open(self) -> None:
        ensure_bucket_topics(
            self._kafka, self._names, self._buckets, self._partitions, self._replication, 10.0, [self._names.resolve]
        )
        self._producer = Producer(self._conf)
        self._in_txn = False
        if self.exactly_once:
            self._retrying("init_transactions", lambda t: self._p.init_transactions(t))

    @property
    def _p(self) -> Producer:
        assert self._producer is not None, "KafkaSink used before open()"
        return self._producer

    def begin(self) -> None:
        self._failed.clear()
        if self.exactly_once:
            try:
                self._p.begin_transaction()
            except KafkaException as exc:
                raise from_exception(exc, "begin_transaction") from None
            self._in_txn = True

    def write(self, bucket: int, key: bytes | None, value: bytes, headers: Headers = None) -> None:
        try:  # the hot path: one produce call, no headers for forwarded originals
            if headers is None:
                self._producer.produce(self._topics[bucket], value, key)  # type: ignore[union-attr]
            else:
                self._producer.produce(  # type: ignore[union-attr]
                    self._topics[bucket],
                    value,
                    key,
                    headers=headers,  # type: ignore[arg-type]
                )
        except (BufferError, KafkaException, AttributeError):
            self._produce(self._topics[bucket], key, value, headers)

    def dead_letter(self, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        self._produce(self._names.dlq, key, value, headers)

    def write_resolve(self, key: bytes | None, value: bytes) -> None:
        """To the resolve topic, in the batch's transaction (stream/cdc.py): what the loader resolves by key."""
        self._produce(self._names.resolve, key, value, None)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        while True:
            try:
                self._p.produce(topic, value, key, headers=headers)  # type: ignore[arg-type]
                return
            except BufferError:
                self._p.poll(0.05)  # local queue full: serve delivery reports, then retry
            except KafkaException as exc:
                raise from_exception(exc, f"produce to {topic}") from None

    def commit(self, offsets: list[TopicPartition], consumer: Consumer) -> None:
        self.commit_later(offsets, consumer)()

    def commit_later(self, offsets: list[TopicPartition], consumer: Consumer) -> Callable[[], None]:
        """``commit`` in two parts: what needs the consumer runs now, in the caller's thread (the group
        metadata, i.e. the generation the batch was read under); the returned call waits on the broker and may
        run in another thread while the caller reads and decodes the next batch (stream/router.py). Nothing
        else may use the sink until that call has returned."""
        if self.exactly_once:
            meta = consumer.consumer_group_metadata()

            def finish() -> None:
                self._retrying(
                    "send_offsets_to_transaction", lambda t: self._p.send_offsets_to_transaction(offsets, meta, t)
                )
                self._retrying("commit_transaction", lambda t: self._p.commit_transaction(t))
                self._in_txn = False

            return finish

        def finish_at_least_once() -> None:
            self.flush()
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                raise from_exception(exc, "commit offsets") from None

        return finish_at_least_once

    def flush(self) -> None:
        """Wait until every record is acknowledged (bounded by message.timeout.ms); raise on failures."""
        deadline = time.monotonic() + self._conf["message.timeout.ms"] / 1000 + 10
        while self._p.flush(1.0) > 0:
            if time.monotonic() > deadline:
                raise KafkaRetryError("flush: records still undelivered after message.timeout.ms")
        if self._failed:
            first = self._failed[0]
            raise classify(first, f"{len(self._failed)} record(s) not delivered")

    def abort(self) -> None:
        if self.exactly_once and self._in_txn:
            self._retrying("abort_transaction", lambda t: self._p.abort_transaction(t), budget=10.0)
            self._in_txn = False
        self._failed.clear()

    def close(self) -> None:
        if self._producer is not None:
            if self._stuck:  # a call still runs in a watchdog thread: keep the client alive, untouched
                self._abandoned.append(self._producer)
            else:
                if not self.exactly_once:
                    self._producer.flush(5.0)
                self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer = None  # librdkafka closes the client when the last reference goes
            self._in_txn = self._stuck = False

    def _retrying(self, what: str, call: Any, budget: float | None = None) -> None:
        """Call a transactional API, repeating it on retriable errors for ``budget`` seconds (librdkafka:
        a timed-out commit_transaction resumes when called again)."""
        deadline = time.monotonic() + (budget or self._timeout)
        while True:
            try:
                self._watched(what, call, min(10.0, max(0.1, deadline - time.monotonic())))
                return
            except KafkaException as exc:
                err: BucketerKafkaError = from_exception(exc, what)
                retriable = bool(err.error is not None and err.error.retriable())
                if isinstance(err, KafkaFatalError) or err.abortable or not retriable or time.monotonic() > deadline:
                    raise err from None
                log.warning("%s: %s; retrying", what, err)
                time.sleep(0.2)

    def _watched(self, what: str, call: Any, timeout: float) -> None:
        """Run ``call(timeout)`` with a watchdog: after a broker restart librdkafka's
        send_offsets_to_transaction was seen to block far beyond its timeout. A call still running
        past ``timeout + 5`` s makes the producer unusable (KafkaFatalError): the router opens a new one
        with the same transactional.id, which fences this one and ends its call."""
        outcome: list[BaseException | None] = []

        def target() -> None:
            try:
                call(timeout)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome.append(exc)

        worker = threading.Thread(target=target, name=f"kafka-{what}", daemon=True)
        worker.start()
        worker.join(timeout + 5.0)
        if worker.is_alive():
            self._stuck = True
            raise KafkaFatalError(f"{what} did not return within {timeout + 5:.0f}s; abandoning the producer")
        if outcome and outcome[0] is not None:
            raise outcome[0]

    def _on_delivery_error(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._failed.append(err)
            log.warning(
                "delivery to %s [%s] failed: %s",
                msg.topic(),
                msg.partition(),
                err.str(),
                extra={"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()},
            )

    def _on_client_error(self, err: KafkaError) -> None:
        log.debug("kafka client: %s", err.str())


def make_sink(config: RouterConfig) -> Sink:
    """The sink named by ``config.sink``: "kafka" (the default) or "tinybird" (``config.tinybird``)."""
    names = TopicNames(config.topic_prefix)
    if config.sink == "kafka":
        txn_id = f"bucketer-router.{config.topic_prefix}{config.group}.{config.instance_id}"
        return KafkaSink(
            config.kafka,
            names,
            config.buckets,
            transactional_id=txn_id if config.exactly_once else None,
            partitions=config.partitions,
            replication=config.replication,
        )
    if config.sink == "tinybird":
        # Imported here, not at the top: it pulls in httpx (~0.2 s), which the Kafka path never needs.
        from connectors.tinybird import TinybirdSink

        if config.tinybird is None:
            raise SinkFatalError("the tinybird sink needs --tinybird-url and BUCKETER_TINYBIRD_TOKEN")
        dlq = KafkaSink(
            config.kafka,
            names,
            0,
            transactional_id=None,
            partitions=config.partitions,
            replication=config.replication,
        )
        return TinybirdSink(config.tinybird, config.buckets, dlq)
    raise ValueError(f"unknown sink {config.sink!r}; expected kafka or tinybird")
