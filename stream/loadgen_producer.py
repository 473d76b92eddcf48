"""Producing the load generator's messages to Kafka: topic set-up, a rate limit, progress and a summary.

Contract:
- ``ensure_topics`` creates the six Sequin topics (with the prefix) when missing; an existing topic is
  left as it is. The broker may have auto-create off.
- ``LoadProducer(settings).run(config)`` produces every message of ``generate(config)`` in order (same key
  -> same partition, so the changes of one row stay in order), waits until each is acknowledged by the
  broker and returns the generator's ``Summary``. A delivery failure raises ``LoadgenError``.
- The rate limit is an average over the run (messages per second); ``None`` means as fast as possible.
- Time is injected (``clock``/``sleep``) so the rate limit is testable without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from connectors.kafka_conn import KafkaConnection
from connectors.topics import REFERENCE_TABLES, SOURCE, TopicNames
from stream.loadgen import LoadgenConfig, LoadGenerator, Summary

TABLES = (SOURCE, *REFERENCE_TABLES)


class LoadgenError(RuntimeError):
    """A one-line reason why the load could not be produced."""


@dataclass(frozen=True)
class ProducerSettings:
    kafka: KafkaConnection
    topic_prefix: str = ""
    partitions: int = 3
    replication_factor: int = 1
    rate: float | None = None  # messages per second, None = unlimited
    timeout: float = 30.0


def ensure_topics(settings: ProducerSettings) -> list[str]:
    """Create the six topics if missing; return their names. Raises LoadgenError if the broker refuses."""
    names = TopicNames(settings.topic_prefix)
    topics = [names.source] + [names.reference(t) for t in REFERENCE_TABLES]
    admin = AdminClient({**settings.kafka.client_config(), "socket.timeout.ms": 10_000, "log_level": 2})
    new = [NewTopic(t, settings.partitions, settings.replication_factor) for t in topics]
    futures = admin.create_topics(new, operation_timeout=settings.timeout, request_timeout=settings.timeout)
    for name, fut in futures.items():
        try:
            fut.result(settings.timeout + 5)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise LoadgenError(f"cannot create topic {name} on {settings.kafka}: {exc}") from None
    return topics


class RateLimiter:
    """Keeps the average rate at or under ``rate`` per second by sleeping when ahead of schedule."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate, self.clock, self.sleep = rate, clock, sleep
        self.start: float | None = None
        self.sent = 0

    def acquire(self) -> None:
        if self.rate is None:
            return
        now = self.clock()
        if self.start is None:
            self.start = now
        due = self.start + self.sent / self.rate
        if due > now:
            self.sleep(due - now)
        self.sent += 1


class LoadProducer:
    """Produces one generated load. Use as a context manager (the producer is flushed on exit)."""

    def __init__(self, settings: ProducerSettings, limiter: RateLimiter | None = None) -> None:
        self.settings = settings
        self.limiter = limiter or RateLimiter(settings.rate)
        self.names = TopicNames(settings.topic_prefix)
        self.failures: list[str] = []
        self.acked = 0
        self._producer: Producer | None = None

    def __enter__(self) -> LoadProducer:
        self._producer = Producer(
            {
                **self.settings.kafka.client_config(),
                "enable.idempotence": True,
                "linger.ms": 20,
                "compression.type": "lz4",
                "batch.size": 1_000_000,
                "message.max.bytes": 2_000_000,
                "log_level": 3,
            }
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._producer is not None:
            self._producer.flush(self.settings.timeout)
            self._producer = None

    def topic(self, table: str) -> str:
        return self.names.source if table == SOURCE else self.names.reference(table)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failures.append(f"{msg.topic()}: {err}")
        else:
            self.acked += 1

    def run(self, config: LoadgenConfig, on_progress: Callable[[int], None] | None = None) -> Summary:
        assert self._producer is not None, "use LoadProducer as a context manager"
        gen = LoadGenerator(config)
        producer = self._producer
        for n, (table, key, value) in enumerate(gen, 1):
            self.limiter.acquire()
            while True:
                try:
                    producer.produce(self.topic(table), value=value, key=key, on_delivery=self._delivered)
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
            if self.failures:
                raise LoadgenError(f"delivery failed: {self.failures[0]}")
            if on_progress is not None and (n % 500 == 0 or n == gen.total):
                on_progress(n)
        remaining = producer.flush(self.settings.timeout)
        if self.failures:
            raise LoadgenError(f"delivery failed: {self.failures[0]}")
        if remaining:
            raise LoadgenError(
                f"{remaining} messages not acknowledged by {self.settings.kafka} after {self.settings.timeout}s"
            )
        return gen.summary


def expected_total(config: LoadgenConfig) -> int:
    """How many messages ``config`` produces (reference records included), without producing them."""
    return LoadGenerator(config).total
