"""KafkaSink without a broker: a transactional call that never returns is abandoned, not waited on. The router
on an in-memory consumer and sink: the seam's own errors (``SinkRetryError``: abort, back off, replay, no
reopen; ``SinkFatalError``: stop with the reason) are handled without posing as Kafka errors."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import TopicPartition
from fakes import FakeMessage
from test_router_unit import TOPIC, FlakySink, MemoryConsumer

from connectors.kafka import KafkaFatalError
from connectors.kafka_conn import KafkaConnection
from connectors.sink_errors import SinkFatalError, SinkRetryError
from connectors.topics import TopicNames
from stream.router import Router, RouterConfig
from stream.sinks import KafkaSink


class HangingProducer:
    def __init__(self) -> None:
        self.release = threading.Event()

    def send_offsets_to_transaction(self, offsets: object, meta: object, timeout: float) -> None:
        self.release.wait(60)  # ignores its timeout, as librdkafka did after a broker restart

    def commit_transaction(self, timeout: float) -> None:
        raise AssertionError("commit must not be called after a stuck send_offsets_to_transaction")


class FakeConsumer:
    def consumer_group_metadata(self) -> object:
        return object()


def test_stuck_transactional_call_abandons_the_producer() -> None:
    sink = KafkaSink(KafkaConnection.plain("127.0.0.1:1"), TopicNames("t."), 2, transactional_id="tx", timeout=1.0)
    hanging = HangingProducer()
    sink._producer = hanging  # type: ignore[assignment]
    start = time.monotonic()
    with pytest.raises(KafkaFatalError, match="abandoning the producer"):
        sink.commit([], FakeConsumer())  # type: ignore[arg-type]
    assert time.monotonic() - start < 10
    sink.close()  # must not touch the client whose call is still running
    assert sink._abandoned == [hanging] and sink._producer is None
    hanging.release.set()


# --- the router and the seam's own errors (connectors/sink_errors.py) ---------------------------------


class RetryingSink(FlakySink):
    """Not Kafka: its first ``failures`` commits raise SinkRetryError (the target said "later")."""

    exactly_once = False

    def __init__(self, failures: int) -> None:
        super().__init__([])
        self.failures = failures
        self.attempts: list[float] = []

    def commit(self, offsets: list[TopicPartition], consumer: MemoryConsumer) -> None:
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.failures:
            raise SinkRetryError("target busy; try again")
        super().commit(offsets, consumer)


class ClosingConsumer(MemoryConsumer):
    def __init__(self, logs: list[list[FakeMessage]]) -> None:
        super().__init__(logs)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def one_partition(n: int) -> ClosingConsumer:
    return ClosingConsumer([[FakeMessage(TOPIC, 0, i, b"{}", f"k{i}".encode()) for i in range(n)], []])


def test_a_sink_retry_error_is_aborted_and_replayed_with_backoff_without_reopening() -> None:
    consumer, sink = one_partition(10), RetryingSink(failures=3)
    cfg = RouterConfig(
        kafka=KafkaConnection.plain("memory"),
        buckets=10,
        batch_size=100,
        until_idle=0.2,
        retry_backoff=0.3,
        retry_backoff_cap=0.6,
    )
    Router(cfg, sink_factory=lambda _: sink, consumer_factory=lambda _: consumer).run()  # type: ignore[arg-type,return-value]
    assert [o[2] for o in sink.out] == [f"k{i}".encode() for i in range(10)]  # each once, in order
    assert consumer.committed_of[0] == 10 and consumer.closed
    assert sink.opens == 1 and sink.aborts >= 3  # the sink stays open: a retry is not a reopen
    gaps = [b - a for a, b in zip(sink.attempts, sink.attempts[1:], strict=False)]
    assert len(gaps) == 3
    assert gaps[0] >= 0.29 and gaps[1] >= 0.59 and gaps[2] >= 0.59  # 0.3, doubled, capped at 0.6
    assert gaps[2] < 3


def test_a_sink_retry_error_backoff_ends_with_a_stop() -> None:
    consumer, sink = one_partition(10), RetryingSink(failures=1000)
    cfg = RouterConfig(
        kafka=KafkaConnection.plain("memory"), buckets=10, batch_size=100, retry_backoff=30, retry_backoff_cap=30
    )
    router = Router(cfg, sink_factory=lambda _: sink, consumer_factory=lambda _: consumer)  # type: ignore[arg-type,return-value]
    runner = threading.Thread(target=router.run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 10
    while not sink.attempts and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # now inside the 30 s backoff
    asked = time.monotonic()
    router.stop()
    runner.join(5)
    assert not runner.is_alive() and time.monotonic() - asked < 1
    assert len(sink.attempts) == 1 and sink.out == [] and consumer.committed_of == [-1001, -1001]


def test_a_sink_fatal_error_from_close_is_raised_and_the_consumer_still_closes() -> None:
    class StoppedOnClose(FlakySink):
        def close(self) -> None:
            raise SinkFatalError("target went away: 5 rows not acknowledged")

    consumer, sink = one_partition(5), StoppedOnClose([])
    cfg = RouterConfig(kafka=KafkaConnection.plain("memory"), buckets=10, batch_size=100, until_idle=0.1)
    router = Router(cfg, sink_factory=lambda _: sink, consumer_factory=lambda _: consumer)  # type: ignore[arg-type,return-value]
    with pytest.raises(SinkFatalError, match="not acknowledged"):
        router.run()
    assert consumer.closed  # leaves the group now, not after the session timeout


def test_a_failing_abort_of_a_non_kafka_sink_reopens_it_and_loses_nothing() -> None:
    class AbortFails(RetryingSink):
        def abort(self) -> None:
            self.aborts += 1
            if self.aborts == 1:
                raise SinkRetryError("abort: target busy")
            self.staged = []

    consumer, sink = one_partition(10), AbortFails(failures=1)
    cfg = RouterConfig(
        kafka=KafkaConnection.plain("memory"), buckets=10, batch_size=100, until_idle=0.2, retry_backoff=0.01
    )
    Router(cfg, sink_factory=lambda _: sink, consumer_factory=lambda _: consumer).run()  # type: ignore[arg-type,return-value]
    assert [o[2] for o in sink.out] == [f"k{i}".encode() for i in range(10)]
    assert sink.opens == 2 and consumer.committed_of[0] == 10
