"""The one place that talks to confluent-kafka about configuration, topics and errors.

- ``consumer_config`` / ``producer_config`` build every client config (no network in them).
- ``ensure_topics`` creates topics with the given partitions and replication (brokers here run with
  ``auto.create.topics.enable=false``) and tolerates topics that already exist.
- ``check_reachable`` raises ``BrokerUnreachable`` with a one-line reason when no broker answers.
- ``classify(KafkaError)`` turns a librdkafka error into one of three typed exceptions:
  ``KafkaRetryError`` (transient: try again, maybe after aborting the transaction),
  ``KafkaDeadLetterError`` (this message can never be written: send it to the DLQ),
  ``KafkaFatalError`` (this client is unusable, e.g. fenced by a newer instance: stop).
- DLQ header names of docs/CONTRACTS.md and ``dlq_headers``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from connectors.lograte import RepeatFilter
from connectors.topics import OTHER_PARTITIONS, TopicNames, bucket_partitions

# librdkafka's own log lines, through the product's logging; a run of similar lines shows once per 30 s.
LIBRDKAFKA_LOG = logging.getLogger("bucketer.librdkafka")
LIBRDKAFKA_LOG.addFilter(RepeatFilter(30.0))
H_ERROR_CLASS = "bucketer-error-class"
H_ERROR_DETAIL = "bucketer-error-detail"
H_SOURCE_TOPIC = "bucketer-source-topic"
H_SOURCE_PARTITION = "bucketer-source-partition"
H_SOURCE_OFFSET = "bucketer-source-offset"
H_DERIVED = "bucketer-derived"
RETIREMENT_HEADERS = [(H_DERIVED, b"retirement")]

# Errors that no retry of the same record fixes.
_DEAD_LETTER = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,
    KafkaError.INVALID_MSG_SIZE,
}
_FATAL = {
    KafkaError._FATAL,
    KafkaError._FENCED,
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.FENCED_INSTANCE_ID,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.SASL_AUTHENTICATION_FAILED,
}


class BucketerKafkaError(RuntimeError):
    def __init__(self, message: str, error: KafkaError | None = None) -> None:
        super().__init__(message)
        self.error = error

    @property
    def abortable(self) -> bool:
        """The open transaction must be aborted (librdkafka's txn_requires_abort)."""
        return bool(self.error is not None and self.error.txn_requires_abort())


class KafkaRetryError(BucketerKafkaError):
    """Transient: retry (after aborting the transaction when ``abortable``)."""


class KafkaDeadLetterError(BucketerKafkaError):
    """The record itself cannot be written; dead-letter it."""


class KafkaFatalError(BucketerKafkaError):
    """The client is unusable (fenced, unauthorised, misconfigured); stop the worker."""


class BrokerUnreachable(KafkaFatalError):
    """No broker answered at the bootstrap address."""


def classify(err: KafkaError, context: str = "") -> BucketerKafkaError:
    """The typed exception for a librdkafka error (returned, so the caller decides to raise)."""
    text = f"{context}: {err.str()} [{err.name()}]" if context else f"{err.str()} [{err.name()}]"
    code = err.code()
    if code in _FATAL or (err.fatal() and not err.txn_requires_abort()):
        return KafkaFatalError(text, err)
    if code in _DEAD_LETTER:
        return KafkaDeadLetterError(text, err)
    return KafkaRetryError(text, err)


def from_exception(exc: KafkaException, context: str = "") -> BucketerKafkaError:
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    if err is None:
        return KafkaRetryError(f"{context}: {exc}")
    return classify(err, context)


def consumer_config(bootstrap: str, group: str, **overrides: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "logger": LIBRDKAFKA_LOG,
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "enable.partition.eof": False,
        "session.timeout.ms": 15_000,
        "max.poll.interval.ms": 120_000,
        "fetch.wait.max.ms": 100,
        "fetch.min.bytes": 262_144,
        "queued.max.messages.kbytes": 65_536,
    }
    conf.update(overrides)
    return conf


def producer_config(bootstrap: str, transactional_id: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Idempotent producer; transactional when ``transactional_id`` is given. Keys are hashed with
    murmur2 (the Java client's partitioner), so one key always lands on one partition of a topic."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "logger": LIBRDKAFKA_LOG,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "linger.ms": 20,
        "batch.num.messages": 10_000,
        "compression.type": "lz4",
        "message.timeout.ms": 60_000,
        "queue.buffering.max.messages": 500_000,
        "queue.buffering.max.kbytes": 262_144,
        "delivery.report.only.error": True,
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = 60_000
    conf.update(overrides)
    return conf


def ensure_bucket_topics(
    bootstrap: str,
    names: TopicNames,
    buckets: int,
    partitions: int | None,
    replication: int,
    timeout: float = 30.0,
    others: Sequence[str] = (),
) -> None:
    """Create the missing bucket topics (``bucket_partitions(buckets, partitions)`` each) and the DLQ plus
    ``others`` (``partitions``, else OTHER_PARTITIONS each). Existing topics are left as they are."""
    ensure_topics(bootstrap, names.buckets(buckets), bucket_partitions(buckets, partitions), replication, timeout)
    ensure_topics(bootstrap, [names.dlq, *others], partitions or OTHER_PARTITIONS, replication, timeout)


def admin(bootstrap: str, quiet: bool = False) -> AdminClient:
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": LIBRDKAFKA_LOG}
    if quiet:
        conf["log_level"] = 0  # the caller reports the failure in one line
    return AdminClient(conf)


def check_reachable(bootstrap: str, timeout: float = 5.0) -> None:
    try:
        admin(bootstrap, quiet=True).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerUnreachable(f"cannot reach Kafka at {bootstrap} within {timeout:g}s ({exc})") from None


def ensure_topics(
    bootstrap: str,
    names: list[str],
    partitions: int,
    replication: int,
    timeout: float = 30.0,
    config: dict[str, str] | None = None,
) -> list[str]:
    """Create the missing topics (with topic ``config`` when given); returns the names created. Existing
    topics are left as they are."""
    client = admin(bootstrap)
    try:
        existing = set(client.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise BrokerUnreachable(f"cannot reach Kafka at {bootstrap} within {timeout:g}s ({exc})") from None
    missing = [n for n in names if n not in existing]
    if not missing:
        return []
    futures = client.create_topics(
        [NewTopic(n, partitions, replication, config=config or {}) for n in missing],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    for name, fut in futures.items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise from_exception(exc, f"create topic {name}") from None
    return missing


def dlq_headers(error_class: str, detail: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        (H_ERROR_CLASS, error_class.encode()),
        (H_ERROR_DETAIL, detail.encode("utf-8", "replace")[:1000]),
        (H_SOURCE_TOPIC, topic.encode()),
        (H_SOURCE_PARTITION, str(partition).encode()),
        (H_SOURCE_OFFSET, str(offset).encode()),
    ]
