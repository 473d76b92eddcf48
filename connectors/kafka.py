"""The one place that talks to confluent-kafka about configuration, topics and errors.

- ``consumer_config`` / ``producer_config`` / ``admin`` build every client from a ``KafkaConnection``
  (connectors/kafka_conn.py: bootstrap servers, security, extra librdkafka keys; no network in them). Its
  settings override the product's tuning defaults; the call's overrides (the product's own keys) come last.
- ``ensure_topics`` creates topics with the given partitions and replication (brokers here run with
  ``auto.create.topics.enable=false``) and tolerates topics that already exist.
- ``check_reachable`` raises ``BrokerUnreachable`` with a one-line reason when no broker answers.
- ``classify(KafkaError)`` turns a librdkafka error into one of three typed exceptions:
  ``KafkaRetryError`` (transient: try again, maybe after aborting the transaction),
  ``KafkaDeadLetterError`` (this message can never be written: send it to the DLQ),
  ``KafkaFatalError`` (this client is unusable, e.g. fenced by a newer instance: stop; a consumer's is
  ``ConsumerFenced``, which a static member may answer with a new consumer).
- ``group_lag`` counts what a consumer group still has to read, as a ``read_committed`` reader sees it (the
  one lag function: loader drained check, ``status``'s router lag and DLQ count).
- DLQ header names of docs/CONTRACTS.md and ``dlq_headers``.
- Group membership (``consumer_config(..., instance=, cooperative=)``, ``claim_member``): a worker with a
  ``group.instance.id`` is a static member, so a restart within ``STATIC_SESSION_TIMEOUT_MS`` gets its partitions
  back with no rebalance; ``claim_member`` gives each worker of a host a stable, unique instance name.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from connectors.kafka_conn import KafkaConnection
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


class KafkaAuthenticationFailed(KafkaFatalError):
    """The broker refused the connection's SASL credentials."""


class ConsumerFenced(KafkaFatalError):
    """A static member fenced off by a join under its ``group.instance.id`` (librdkafka's only fatal consumer
    error): another live worker with the same name, or the member's own rejoin after its session timed out on
    the client side (a broker away longer than the session: seen after a restart of a single broker). A new
    consumer under the same name takes the member back; a real twin fences it again."""


def classify(err: KafkaError, context: str = "") -> BucketerKafkaError:
    """The typed exception for a librdkafka error (returned, so the caller decides to raise)."""
    text = f"{context}: {err.str()} [{err.name()}]" if context else f"{err.str()} [{err.name()}]"
    code = err.code()
    if code in _FATAL or (err.fatal() and not err.txn_requires_abort()):
        return KafkaFatalError(text, err)
    if code in _DEAD_LETTER:
        return KafkaDeadLetterError(text, err)
    return KafkaRetryError(text, err)


def consumer_error(err: KafkaError, context: str, *, missing_ok: bool = False) -> BucketerKafkaError | None:
    """The one reading of an error event a consumer's ``consume``/``poll`` hands back (router, loader, replay):
    None when there is nothing to report (the end of a partition; with ``missing_ok``, a topic or partition
    that does not exist yet, which librdkafka keeps asking about); raises ``KafkaFatalError`` when the client
    is unusable; else returns the classified error for the caller to report (librdkafka retries it itself)."""
    code = err.code()
    if code == KafkaError._PARTITION_EOF:
        return None
    exc = classify(err, context)
    if code in (KafkaError.FENCED_INSTANCE_ID, KafkaError._FATAL):
        raise ConsumerFenced(str(exc), err)
    if err.fatal() or isinstance(exc, KafkaFatalError):
        raise exc
    if missing_ok and code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION):
        return None
    return exc


def from_exception(exc: KafkaException, context: str = "") -> BucketerKafkaError:
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    if err is None:
        return KafkaRetryError(f"{context}: {exc}")
    return classify(err, context)


# A static member may be away this long (a restart: the process exits, the orchestrator starts it again, Python
# imports, the client joins) and still get its partitions back with no rebalance. The price: a static member that
# stops for good does not leave the group (librdkafka sends no LeaveGroup for one), so its partitions wait this
# long before they move to the other members.
STATIC_SESSION_TIMEOUT_MS = 30_000
DYNAMIC_SESSION_TIMEOUT_MS = 15_000


def consumer_config(
    kafka: KafkaConnection,
    group: str,
    *,
    instance: str | None = None,
    cooperative: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """A group consumer's settings. ``instance``: its ``group.instance.id`` (static membership, with the longer
    session timeout a restart needs); ``cooperative``: the cooperative-sticky assignor (incremental rebalances:
    a member keeps the partitions it is not asked to give up, and its callbacks get only the changed ones)."""
    conf: dict[str, Any] = {
        "logger": LIBRDKAFKA_LOG,
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "enable.partition.eof": False,
        "session.timeout.ms": STATIC_SESSION_TIMEOUT_MS if instance else DYNAMIC_SESSION_TIMEOUT_MS,
        "max.poll.interval.ms": 120_000,
        "fetch.wait.max.ms": 100,
        "fetch.min.bytes": 262_144,
        "queued.max.messages.kbytes": 65_536,
    }
    if instance:
        conf["group.instance.id"] = instance
    if cooperative:
        conf["partition.assignment.strategy"] = "cooperative-sticky"
    conf.update(kafka.client_config())
    conf.update(overrides)
    return conf


class Member:
    """A worker's stable name among the workers of one group on this host: the ``explicit`` one
    (``--instance-id``, ``BUCKETER_INSTANCE_ID``) as given, else ``<host name>-<index>`` with the lowest index no
    other live worker of the group on this host holds. The index is held by an exclusive lock on a file
    (``lock_dir``/``<group>.<index>.lock``) until ``release()`` (or the process ends, even by SIGKILL), so two
    workers on one host never share a name, and a worker restarted on its host takes the index it had (the
    lowest free one: the others still hold theirs)."""

    MAX_INDEX = 256

    def __init__(self, group: str, explicit: str | None = None, lock_dir: Path | None = None) -> None:
        self._lock: IO[bytes] | None = None
        if explicit:
            self.name = explicit
            return
        folder = lock_dir or Path(os.environ.get("BUCKETER_LOCK_DIR") or tempfile.gettempdir()) / "bucketer-members"
        folder.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", group)
        for index in range(self.MAX_INDEX):
            f = open(folder / f"{safe}.{index}.lock", "ab")  # noqa: SIM115 - held open: the lock lives with it
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            self._lock = f
            self.name = f"{socket.gethostname()}-{index}"
            return
        raise RuntimeError(f"more than {self.MAX_INDEX} workers of group {group} on this host; give --instance-id")

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()  # closing the file drops its lock


def producer_config(kafka: KafkaConnection, transactional_id: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Idempotent producer; transactional when ``transactional_id`` is given. Keys are hashed with
    murmur2 (the Java client's partitioner), so one key always lands on one partition of a topic."""
    conf: dict[str, Any] = {
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
    conf.update(kafka.client_config())
    if transactional_id:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = 60_000
    conf.update(overrides)
    return conf


def ensure_bucket_topics(
    kafka: KafkaConnection,
    names: TopicNames,
    buckets: int,
    partitions: int | None,
    replication: int,
    timeout: float = 30.0,
    others: Sequence[str] = (),
) -> None:
    """Create the missing bucket topics (``bucket_partitions(buckets, partitions)`` each) and the DLQ plus
    ``others`` (``partitions``, else OTHER_PARTITIONS each). Existing topics are left as they are."""
    ensure_topics(kafka, names.buckets(buckets), bucket_partitions(buckets, partitions), replication, timeout)
    ensure_topics(kafka, [names.dlq, *others], partitions or OTHER_PARTITIONS, replication, timeout)


def admin(kafka: KafkaConnection, quiet: bool = False, **overrides: Any) -> AdminClient:
    conf: dict[str, Any] = {"logger": LIBRDKAFKA_LOG, **kafka.client_config(), **overrides}
    if quiet:
        conf["log_level"] = 0  # the caller reports the failure in one line
    return AdminClient(conf)


# Client errors that only say no broker answered; any other one (TLS, SASL) is the better reason to report.
_NO_ANSWER = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT, KafkaError._RESOLVE}
_AUTHENTICATION = {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED}


def check_reachable(kafka: KafkaConnection, timeout: float = 5.0) -> None:
    """Raise ``KafkaAuthenticationFailed`` when the broker refuses the credentials, else ``BrokerUnreachable``
    when no broker answers within ``timeout`` (naming a TLS or other client error when there was one)."""
    seen: list[KafkaError] = []
    client = admin(kafka, quiet=True, error_cb=seen.append)
    try:
        client.list_topics(timeout=timeout)
    except KafkaException as exc:
        client.poll(0)  # serves the client errors queued meanwhile to error_cb
        auth = next((e for e in seen if e.code() in _AUTHENTICATION), None)
        if auth is not None:
            raise KafkaAuthenticationFailed(
                f"Kafka at {kafka} refused the credentials ({kafka.redact(auth.str())})", auth
            ) from None
        # A TLS or other client error, else the first transport error (it says why: refused, handshake failed).
        other = next((e for e in seen if e.code() not in _NO_ANSWER), None) or next(
            (e for e in seen if e.code() == KafkaError._TRANSPORT), None
        )
        reason = f"{other.str()} [{other.name()}]" if other is not None else str(exc)
        raise BrokerUnreachable(f"cannot reach Kafka at {kafka} within {timeout:g}s ({kafka.redact(reason)})") from None


def ensure_topics(
    kafka: KafkaConnection,
    names: list[str],
    partitions: int,
    replication: int,
    timeout: float = 30.0,
    config: dict[str, str] | None = None,
) -> list[str]:
    """Create the missing topics (with topic ``config`` when given); returns the names created. Existing
    topics are left as they are."""
    client = admin(kafka)
    try:
        existing = set(client.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise BrokerUnreachable(
            f"cannot reach Kafka at {kafka} within {timeout:g}s ({kafka.redact(str(exc))})"
        ) from None
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


log = logging.getLogger("bucketer.kafka")


@dataclass(frozen=True)
class Lag:
    """What ``group_lag`` found. ``messages``: committed messages not yet committed by the group (exact when
    ``exact``; else partitions left unread at the timeout count as their offset span, an upper bound).
    ``pending``: offsets past a partition's last stable offset, i.e. in transactions still open during the
    count: at most that many messages may yet become visible. ``absent``: topics asked about that do not exist."""

    messages: int
    pending: int = 0
    exact: bool = True
    absent: tuple[str, ...] = ()

    @property
    def at_most(self) -> int:
        """An upper bound of what the group may still have to read (committed or about to be)."""
        return self.messages + self.pending


def lag_estimate(consumer: Any, partitions: list[TopicPartition] | None = None) -> int | None:
    """A cheap estimate of the messages a group has not committed on ``partitions`` (default: the consumer's
    assignment), from the worker's own consumer: per partition, the end its client can read to (the last stable
    offset for a read_committed client) minus the committed offset (the start of the partition when there is
    none). None when nothing is assigned or the broker cannot tell now.

    An estimate, not ``group_lag``'s count: on a topic written in transactions it counts the commit markers in
    the backlog, and one per partition whose last offset is a marker when the group committed last offset + 1
    (a worker that commits its position steps over it, as the loader does). It runs at every progress line
    and idle poll; an exact count opens two more clients and reads the backlog (0.25-0.5 s against a local
    broker even with nothing to read, measured for 3 and 30 partitions)."""
    try:
        parts = consumer.assignment() if partitions is None else partitions
        if not parts:
            return None
        total = 0
        for tp in consumer.committed(parts, timeout=5):
            if tp.error is not None:
                return None
            low, high = consumer.get_watermark_offsets(tp, timeout=2, cached=False)
            total += max(0, high - (tp.offset if tp.offset >= 0 else low))
        return total
    except (KafkaException, AttributeError):  # informational: a broker away (or a test's fake) means unknown
        return None


def group_lag(
    kafka: KafkaConnection,
    group: str | None,
    topics: Sequence[str],
    timeout: float = 10.0,
    until: Mapping[tuple[str, int], int] | None = None,
) -> Lag:
    """Messages on ``topics`` that a ``read_committed`` consumer of ``group`` still has to read: per partition,
    the committed messages from the group's committed offset (the low watermark when it has none, or for every
    partition when ``group`` is None: then it counts all the committed messages) up to the high watermark taken
    at the start.

    They are counted by reading, because offsets over-count a topic written in transactions: every commit or
    abort marker takes an offset (the last offset of a partition written transactionally is a marker, so a
    drained partition has high - committed = 1) and aborted records stay in the log. Only that span is read: a
    drained partition costs nothing or its one marker. The reader is assigned, never subscribed: it joins no
    group and commits nothing (the group's offsets are only read). A partition is done at its end-of-partition
    event (a read_committed reader gets it at the last stable offset: what lies beyond is ``pending``), or at a
    message or position at or past the start's high watermark. What is not read within ``timeout`` counts as
    its offset span (logged). ``until``: only these partitions, each up to this offset instead of its high
    watermark (what a drain that took the ends earlier still waits for)."""
    # Offsets and committed positions through a read_uncommitted client: its high watermark is the log's end
    # (a read_committed one would report the last stable offset and hide open transactions).
    meta = Consumer(consumer_config(kafka, group or "bucketer-lag-unused", **{"isolation.level": "read_uncommitted"}))
    try:
        md = meta.list_topics(timeout=timeout).topics
        parts: list[TopicPartition] = []
        absent: list[str] = []
        for topic in dict.fromkeys(topics):
            info = md.get(topic)
            if info is None or info.error is not None:
                absent.append(topic)
            else:
                parts += [TopicPartition(topic, p) for p in sorted(info.partitions)]
        spans: dict[tuple[str, int], tuple[int, int]] = {}  # (topic, partition) -> (start, end) offsets
        for tp in _committed(meta, parts, timeout) if group and parts else parts:
            if until is not None and (tp.topic, tp.partition) not in until:
                continue
            low, high = meta.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout)
            if until is not None:
                high = min(high, until[(tp.topic, tp.partition)])
            start = max(low, tp.offset) if tp.offset >= 0 else low
            if start < high:
                spans[(tp.topic, tp.partition)] = (start, high)
    except KafkaException as exc:
        raise from_exception(exc, f"lag of {group or 'the topics'}") from None
    finally:
        meta.close()
    if not spans:
        return Lag(0, absent=tuple(absent))
    reader = Consumer(
        consumer_config(
            kafka,
            "bucketer-lag-unused",
            **{
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                "fetch.min.bytes": 1,
                "fetch.max.bytes": 64 << 20,
            },
        )
    )
    try:
        return _read_spans(reader, spans, timeout, tuple(absent))
    except KafkaException as exc:
        raise from_exception(exc, f"lag of {group or 'the topics'}") from None
    finally:
        reader.close()


def _committed(consumer: Consumer, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
    """The group's committed offsets; retriable errors (a coordinator still loading, moving) are retried
    until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = consumer.committed(parts, timeout=max(1.0, deadline - time.monotonic()))
            failed = next((tp for tp in got if tp.error is not None), None)
            if failed is None or failed.error is None:
                return list(got)
            exc = classify(failed.error, f"committed offset of {failed.topic} [{failed.partition}]")
        except KafkaException as raised:
            exc = from_exception(raised, "committed offsets")
        if not isinstance(exc, KafkaRetryError) or time.monotonic() + 0.2 >= deadline:
            raise exc
        time.sleep(0.2)


def _read_spans(
    consumer: Consumer, spans: dict[tuple[str, int], tuple[int, int]], timeout: float, absent: tuple[str, ...]
) -> Lag:
    counted = dict.fromkeys(spans, 0)
    pending = 0
    left = dict(spans)

    def done(key: tuple[str, int]) -> None:
        left.pop(key, None)
        consumer.pause([TopicPartition(*key)])

    consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in spans.items()])
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for m in consumer.consume(10_000, timeout=0.2):
            key = (m.topic() or "", m.partition() or 0)
            if key not in left:
                continue
            end, offset, err = left[key][1], m.offset() or 0, m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    pending += max(0, end - offset)  # beyond the last stable offset: open transactions
                    done(key)
                    continue
                exc = classify(err, f"count {key[0]} [{key[1]}]")
                if isinstance(exc, KafkaFatalError):
                    raise exc
                log.debug("lag count: %s", exc)
            elif offset < end:
                counted[key] += 1
            else:
                done(key)
        if left:
            for tp in consumer.position([TopicPartition(*key) for key in left]):
                if tp.offset >= left[(tp.topic, tp.partition)][1]:
                    done((tp.topic, tp.partition))
    unread = 0
    if left:
        positions = {
            (tp.topic, tp.partition): tp.offset for tp in consumer.position([TopicPartition(*k) for k in left])
        }
        for key, (start, end) in left.items():
            unread += end - max(start, positions.get(key, start))
        log.warning(
            "lag: %d partitions not read to the end within %.0fs; their remaining %d offsets count as messages "
            "(an upper bound)",
            len(left),
            timeout,
            unread,
        )
    return Lag(sum(counted.values()) + unread, pending, exact=not left, absent=absent)


def dlq_headers(error_class: str, detail: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        (H_ERROR_CLASS, error_class.encode()),
        (H_ERROR_DETAIL, detail.encode("utf-8", "replace")[:1000]),
        (H_SOURCE_TOPIC, topic.encode()),
        (H_SOURCE_PARTITION, str(partition).encode()),
        (H_SOURCE_OFFSET, str(offset).encode()),
    ]
