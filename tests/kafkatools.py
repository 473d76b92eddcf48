"""Small helpers shared by the integration tests: unique names, topic creation, bounded waits, draining."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import Consumer, KafkaException, Message
from confluent_kafka.admin import AdminClient, NewTopic

T = TypeVar("T")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll until ``predicate()`` is truthy; fail the test with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def create_topics(bootstrap: str, names: list[str], partitions: int = 1, timeout: float = 30) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names], operation_timeout=timeout)
    for name, fut in futures.items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise AssertionError(f"could not create topic {name}: {exc}") from exc


def drain(
    bootstrap: str,
    topics: list[str],
    expected: int | None = None,
    timeout: float = 30,
    idle: float = 2.0,
    isolation: str = "read_committed",
) -> list[Message]:
    """Read ``topics`` from the beginning with a fresh group until ``expected`` messages arrived (or, with
    no expectation, until ``idle`` seconds pass without one). Always bounded by ``timeout``."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("drain"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
            "enable.partition.eof": False,
        }
    )
    consumer.subscribe(topics)
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if expected is not None and len(out) >= expected:
                # Linger briefly so an over-delivery (a duplicate) is seen too.
                extra = consumer.consume(1000, timeout=idle / 2)
                out.extend(m for m in extra if m.error() is None)
                break
            batch = consumer.consume(1000, timeout=0.5)
            msgs = [m for m in batch if m.error() is None]
            if msgs:
                out.extend(msgs)
                last = time.monotonic()
            elif expected is None and time.monotonic() - last > idle:
                break
    finally:
        consumer.close()
    return out
