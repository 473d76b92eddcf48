"""The Kafka figures of ``/v0/status`` (stream.status.KafkaFigures) on the real broker: read at most once per TTL
(a message dead-lettered within the TTL shows only after it), again at once when the bucket count changes, and a
broker that is away costs one timeout per TTL, not one per call. The clock is injected, so nothing sleeps; the
counts come from the messages the test produces, not from the product's lag code."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Producer
from kafkatools import create_topics, unique

from bucketer.localkafka import free_port
from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from stream.status import KafkaFigures


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def dead_letter(bootstrap: str, topics: TopicNames, n: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        producer.produce(topics.dlq, key=b"k%d" % i, value=b"{}")
    assert producer.flush(30) == 0


def new_topics(bootstrap: str) -> TopicNames:
    topics = TopicNames(unique("figures") + ".")
    create_topics(bootstrap, [topics.source, topics.dlq])
    return topics


def test_figures_are_read_once_per_ttl(bootstrap: str) -> None:
    topics = new_topics(bootstrap)
    dead_letter(bootstrap, topics, 2)
    clock = Clock()
    figures = KafkaFigures(KafkaConnection(bootstrap), topics, unique("router"), None, ttl=5.0, clock=clock)
    assert figures(3) == ((2, 0, None), None, 0.0)
    dead_letter(bootstrap, topics, 3)
    clock.t += 4.9
    (dlq, _, _), error, age = figures(3)
    assert (dlq, error, figures.readings) == (2, None, 1)  # within the TTL: the last reading, not Kafka
    assert abs(age - 4.9) < 1e-9
    clock.t += 0.1
    assert figures(3) == ((5, 0, None), None, 0.0) and figures.readings == 2  # past it: Kafka again
    dead_letter(bootstrap, topics, 1)
    assert figures(3)[0][0] == 5 and figures.readings == 2
    assert figures(4)[0][0] == 6 and figures.readings == 3  # another bucket count: read again at once


def test_a_broker_away_costs_one_timeout_per_ttl() -> None:
    clock = Clock()
    away = KafkaConnection(f"127.0.0.1:{free_port()}")
    figures = KafkaFigures(away, TopicNames(unique("away") + "."), ttl=5.0, timeout=1.0, clock=clock)
    (dlq, lag, loader), error, _ = figures(2)
    assert (dlq, lag, loader) == (None, None, None) and error, error
    t0 = time.monotonic()
    clock.t += 4.0
    assert figures(2)[1] == error and figures.readings == 1
    assert time.monotonic() - t0 < 0.5  # the kept failure, no new timeout
    clock.t += 1.0
    figures(2)
    assert figures.readings == 2


def test_v0_status_reads_kafka_at_most_once_per_kafka_ttl_s(bootstrap: str, tmp_path: Path) -> None:
    """Two apps on one real chdb warehouse and the broker: with a long kafka_ttl_s the second /v0/status shows
    the first reading (kafka_age_s > 0) though more was dead-lettered since; with kafka_ttl_s=0 each reads."""
    from connectors.warehouse import EmbeddedWarehouse
    from stream.api import ApiConfig, create_app
    from stream.schema import ensure_schema

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    topics = new_topics(bootstrap)
    dead_letter(bootstrap, topics, 1)
    data = tmp_path / "wh"
    with EmbeddedWarehouse(data) as wh:
        ensure_schema(wh, 2)
    connect: Callable[[], EmbeddedWarehouse] = lambda: EmbeddedWarehouse(data)  # noqa: E731
    kafka = KafkaConnection(bootstrap)
    cached = create_app(connect, ApiConfig(kafka=kafka, topic_prefix=topics.prefix, kafka_ttl_s=3600))
    fresh = create_app(connect, ApiConfig(kafka=kafka, topic_prefix=topics.prefix, kafka_ttl_s=0))
    try:

        def status(app: object) -> dict:
            r = TestClient(app).get("/v0/status")  # type: ignore[arg-type]
            assert r.status_code == 200, r.text
            return r.json()

        first = status(cached)
        assert (first["dlq_messages"], first["kafka_error"], first["kafka_age_s"]) == (1, None, 0.0)
        assert status(fresh)["dlq_messages"] == 1
        dead_letter(bootstrap, topics, 2)
        again = status(cached)
        assert again["dlq_messages"] == 1 and again["kafka_age_s"] > 0
        assert cached.state.kafka_figures.readings == 1
        assert status(fresh)["dlq_messages"] == 3 and fresh.state.kafka_figures.readings == 2
    finally:
        cached.state.pool.close()
        fresh.state.pool.close()
