"""KafkaSink without a broker: a transactional call that never returns is abandoned, not waited on."""

from __future__ import annotations

import threading
import time

import pytest

from connectors.kafka import KafkaFatalError
from connectors.topics import TopicNames
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
    sink = KafkaSink("127.0.0.1:1", TopicNames("t."), 2, transactional_id="tx", timeout=1.0)
    hanging = HangingProducer()
    sink._producer = hanging  # type: ignore[assignment]
    start = time.monotonic()
    with pytest.raises(KafkaFatalError, match="abandoning the producer"):
        sink.commit([], FakeConsumer())  # type: ignore[arg-type]
    assert time.monotonic() - start < 10
    sink.close()  # must not touch the client whose call is still running
    assert sink._abandoned == [hanging] and sink._producer is None
    hanging.release.set()
