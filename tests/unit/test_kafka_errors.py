"""Kafka errors become typed exceptions in one place: retry, dead-letter or fatal."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from connectors.kafka import (
    KafkaDeadLetterError,
    KafkaFatalError,
    KafkaRetryError,
    classify,
    consumer_config,
    dlq_headers,
    from_exception,
    producer_config,
)
from connectors.kafka_conn import KafkaConnection


@pytest.mark.parametrize(
    "code,kind",
    [
        (KafkaError._TIMED_OUT, KafkaRetryError),
        (KafkaError._TRANSPORT, KafkaRetryError),
        (KafkaError.NOT_COORDINATOR, KafkaRetryError),
        (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaRetryError),
        (KafkaError.MSG_SIZE_TOO_LARGE, KafkaDeadLetterError),
        (KafkaError.INVALID_RECORD, KafkaDeadLetterError),
        (KafkaError._FENCED, KafkaFatalError),
        (KafkaError.PRODUCER_FENCED, KafkaFatalError),
        (KafkaError.FENCED_INSTANCE_ID, KafkaFatalError),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaFatalError),
    ],
)
def test_classification(code: int, kind: type) -> None:
    exc = classify(KafkaError(code), "ctx")
    assert type(exc) is kind
    assert str(exc).startswith("ctx: ")
    assert type(from_exception(KafkaException(KafkaError(code)))) is kind


def test_fatal_flag_wins_unless_the_transaction_can_be_aborted() -> None:
    assert type(classify(KafkaError(KafkaError._TIMED_OUT, "x", fatal=True))) is KafkaFatalError
    abortable = classify(KafkaError(KafkaError._TIMED_OUT, "x", txn_requires_abort=True))
    assert type(abortable) is KafkaRetryError and abortable.abortable


def test_configs() -> None:
    c = consumer_config(KafkaConnection.plain("b:1"), "g", **{"session.timeout.ms": 6000})
    assert (c["isolation.level"], c["enable.auto.commit"], c["session.timeout.ms"]) == ("read_committed", False, 6000)
    p = producer_config(KafkaConnection.plain("b:1"), "tx")
    assert (p["transactional.id"], p["enable.idempotence"], p["partitioner"]) == ("tx", True, "murmur2_random")
    assert "transactional.id" not in producer_config(KafkaConnection.plain("b:1"))


def test_dlq_headers_name_the_contract() -> None:
    h = dict(dlq_headers("not_json", "bad ✓", "t", 2, 41))
    assert h == {
        "bucketer-error-class": b"not_json",
        "bucketer-error-detail": "bad ✓".encode(),
        "bucketer-source-topic": b"t",
        "bucketer-source-partition": b"2",
        "bucketer-source-offset": b"41",
    }


def test_one_reading_of_consumer_errors() -> None:
    """Router, loader and replay share consumer_error: nothing to report at a partition's end; a missing
    topic only when asked to care; a fatal error raises; anything else comes back to be reported."""
    from confluent_kafka import KafkaError

    from connectors.kafka import KafkaFatalError, KafkaRetryError, consumer_error

    assert consumer_error(KafkaError(KafkaError._PARTITION_EOF), "c") is None
    missing = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
    assert consumer_error(missing, "c", missing_ok=True) is None
    assert consumer_error(missing, "c") is not None
    transport = consumer_error(KafkaError(KafkaError._TRANSPORT), "consume t [0]")
    assert isinstance(transport, KafkaRetryError) and "consume t [0]" in str(transport)
    with pytest.raises(KafkaFatalError):
        consumer_error(KafkaError(KafkaError._FENCED, fatal=True), "c")
    with pytest.raises(KafkaFatalError):
        consumer_error(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED), "c")
