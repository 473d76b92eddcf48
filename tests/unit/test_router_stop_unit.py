"""Router stop plumbing (issue 16 item 4): ``stop()`` interrupts a sink waiting on its target (the batch
is abandoned uncommitted), and a ``SinkFatalError`` stops the router at once instead of reopening."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import TopicPartition
from fakes import FakeMessage
from test_router_unit import TOPIC, FlakySink, MemoryConsumer

from connectors.kafka import KafkaRetryError
from connectors.kafka_conn import KafkaConnection
from stream.router import Router, RouterConfig
from stream.sinks import SinkFatalError


class WaitingSink(FlakySink):
    """Commit waits for its target until interrupted (like a sink retrying an unreachable target)."""

    def __init__(self) -> None:
        super().__init__([])
        self.interrupted = threading.Event()
        self.waiting = threading.Event()

    def interrupt(self) -> None:
        self.interrupted.set()

    def commit(self, offsets: list[TopicPartition], consumer: MemoryConsumer) -> None:
        self.waiting.set()
        if not self.interrupted.wait(30):
            raise AssertionError("never interrupted")
        raise KafkaRetryError("stopped before the target acknowledged the batch")


class FatalSink(FlakySink):
    def commit(self, offsets: list[TopicPartition], consumer: MemoryConsumer) -> None:
        raise SinkFatalError("target unreachable for 180s")


def config() -> RouterConfig:
    return RouterConfig(kafka=KafkaConnection.plain("memory"), buckets=10, batch_size=10, until_idle=30)


def test_stop_interrupts_a_waiting_sink_and_commits_nothing() -> None:
    consumer = MemoryConsumer([[FakeMessage(TOPIC, 0, i, b"{}") for i in range(20)], []])
    sink = WaitingSink()
    router = Router(config(), sink_factory=lambda _: sink, consumer_factory=lambda _: consumer)  # type: ignore[arg-type,return-value]
    runner = threading.Thread(target=router.run, daemon=True)
    runner.start()
    assert sink.waiting.wait(10)
    asked = time.monotonic()
    router.stop()
    runner.join(10)
    assert not runner.is_alive() and time.monotonic() - asked < 5
    assert sink.out == [] and sink.opens == 1  # abandoned, not reopened
    assert consumer.committed_of == [-1001, -1001]


def test_a_sink_fatal_error_stops_the_router_without_reopening() -> None:
    consumer = MemoryConsumer([[FakeMessage(TOPIC, 0, i, b"{}") for i in range(20)], []])
    sink = FatalSink([])
    router = Router(config(), sink_factory=lambda _: sink, consumer_factory=lambda _: consumer)  # type: ignore[arg-type,return-value]
    with pytest.raises(SinkFatalError, match="unreachable"):
        router.run()
    assert sink.opens == 1
    assert consumer.committed_of == [-1001, -1001]
