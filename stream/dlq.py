"""Dead letters you can act on: list them, and send them back to where they came from once the cause is fixed.

The dead-letter topic (``<prefix>activityRelations_dlq``) holds every message the router or a loader could not
take, with the original key and bytes and the headers of docs/CONTRACTS.md (error class, detail, source topic,
partition and offset). A dead letter whose source is the source topic was refused by the router; one whose
source is a bucket or reference topic, by a loader.

``redrive`` produces the selected dead letters to their source topic again (original key and value, plus a
``bucketer-redriven-from`` header naming the dead letter), so a fixed worker reprocesses them. What it sent is
recorded in the compacted topic ``<prefix>activityRelations_dlq_redriven`` (key ``<partition>:<offset>`` of the
dead letter) in the same Kafka transaction as the messages themselves: a redrive that dies half way sends
nothing of its open transaction, and a second redrive skips everything the first committed. The transactional
id is the same for every redrive of one topic prefix, so a second redrive started while one runs fences it
(the first fails and sends nothing more); it reads the record only after taking over, so it sees what the first
committed.

Dead letters without their original bytes cannot be redriven and are counted as skipped: a Kafka tombstone
(the original value was null) and a message over the size limit (kept as an empty value, see the router).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, Producer

from connectors.kafka import (
    H_ERROR_CLASS,
    H_ERROR_DETAIL,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
    consumer_config,
    ensure_topics,
    from_exception,
    producer_config,
)
from connectors.kafka_conn import KafkaConnection
from connectors.topics import OTHER_PARTITIONS, TopicNames
from stream.replay import read_topic

log = logging.getLogger("bucketer.dlq")

H_REDRIVEN_FROM = "bucketer-redriven-from"
# A transaction holds at most this many redriven messages (and as many records of them).
REDRIVE_CHUNK = 5_000
SAMPLES = 3


def redrive_topic(topics: TopicNames) -> str:
    return f"{topics.dlq}_redriven"


@dataclass(frozen=True)
class DeadLetter:
    partition: int  # in the DLQ topic
    offset: int
    timestamp: datetime | None  # when it was dead-lettered (the DLQ message's timestamp)
    key: bytes | None
    value: bytes
    error_class: str
    detail: str
    source_topic: str
    source_partition: int | None
    source_offset: int | None
    stage: str  # "router" (source topic) or "loader" (bucket and reference topics)

    @property
    def ref(self) -> str:
        """The record key of this dead letter in the redrive topic."""
        return f"{self.partition}:{self.offset}"

    @property
    def redrivable(self) -> bool:
        return bool(self.value) and bool(self.source_topic)


def _headers(m: Message) -> dict[str, str]:
    out: dict[str, str] = {}
    pairs: list[tuple[str, bytes | str | None]] = list(m.headers() or [])  # type: ignore[arg-type]
    for k, v in pairs:  # a list of (name, value) pairs
        if isinstance(v, bytes):
            out[k] = v.decode("utf-8", "replace")
        elif v is not None:
            out[k] = str(v)
    return out


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def dead_letter_of(m: Message, topics: TopicNames) -> DeadLetter:
    h = _headers(m)
    kind, ms = m.timestamp()
    source = h.get(H_SOURCE_TOPIC, "")
    return DeadLetter(
        partition=m.partition() or 0,
        offset=m.offset() or 0,
        timestamp=datetime.fromtimestamp(ms / 1000, UTC) if kind and ms > 0 else None,
        key=m.key(),  # type: ignore[arg-type]
        value=m.value() or b"",  # type: ignore[arg-type]
        error_class=h.get(H_ERROR_CLASS, "unknown"),
        detail=h.get(H_ERROR_DETAIL, ""),
        source_topic=source,
        source_partition=_int(h.get(H_SOURCE_PARTITION)),
        source_offset=_int(h.get(H_SOURCE_OFFSET)),
        stage="router" if source == topics.source else "loader",
    )


def _reader(kafka: KafkaConnection, group: str) -> Consumer:
    return Consumer(consumer_config(kafka, group, **{"fetch.max.bytes": 64 << 20}))


def read_dead_letters(kafka: KafkaConnection, topics: TopicNames, timeout: float = 30.0) -> Iterator[DeadLetter]:
    """Every committed dead letter, up to the end offsets seen at the start (nothing committed)."""
    out: list[DeadLetter] = []
    consumer = _reader(kafka, "bucketer-dlq-reader")
    try:
        read_topic(consumer, topics.dlq, lambda ms: out.extend(dead_letter_of(m, topics) for m in ms), timeout=timeout)
    except LookupError:
        raise LookupError(f"no dead-letter topic {topics.dlq}") from None
    finally:
        consumer.close()
    yield from out


def redriven_refs(kafka: KafkaConnection, topics: TopicNames, timeout: float = 30.0) -> set[str]:
    """The dead letters a committed redrive already sent (their ``partition:offset``)."""
    refs: set[str] = set()

    def take(ms: list[Message]) -> None:
        for m in ms:
            key = m.key()
            if key is not None and m.value() is not None:
                refs.add(key.decode() if isinstance(key, bytes) else str(key))

    consumer = _reader(kafka, "bucketer-dlq-reader")
    try:
        read_topic(consumer, redrive_topic(topics), take, timeout=timeout, required=False)
    finally:
        consumer.close()
    return refs


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command looks at: by error class (any of them) and not older than ``since``."""

    classes: frozenset[str] = frozenset()
    since: datetime | None = None

    def __call__(self, d: DeadLetter) -> bool:
        if self.classes and d.error_class not in self.classes:
            return False
        return not (self.since is not None and (d.timestamp is None or d.timestamp < self.since))


@dataclass
class ClassSummary:
    stage: str
    error_class: str
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, d: DeadLetter) -> None:
        self.count += 1
        if d.timestamp is not None:
            self.first = d.timestamp if self.first is None else min(self.first, d.timestamp)
            self.last = d.timestamp if self.last is None else max(self.last, d.timestamp)
        if len(self.samples) < SAMPLES:
            self.samples.append(
                {
                    "detail": d.detail,
                    "source": f"{d.source_topic}/{d.source_partition}/{d.source_offset}",
                    "dlq": f"{d.partition}:{d.offset}",
                }
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "error_class": self.error_class,
            "count": self.count,
            "first": self.first.isoformat() if self.first else None,
            "last": self.last.isoformat() if self.last else None,
            "samples": self.samples,
        }


def summarize(letters: Iterable[DeadLetter], select: Selection = Selection()) -> list[ClassSummary]:
    """Counts by (stage, class) with first/last time and a few samples, largest first."""
    out: dict[tuple[str, str], ClassSummary] = {}
    for d in letters:
        if select(d):
            out.setdefault((d.stage, d.error_class), ClassSummary(d.stage, d.error_class)).add(d)
    return sorted(out.values(), key=lambda s: (-s.count, s.stage, s.error_class))


@dataclass
class RedriveReport:
    selected: int = 0
    already: int = 0  # sent by an earlier redrive
    skipped: Counter[str] = field(default_factory=Counter)  # no original bytes, by class
    sent: Counter[str] = field(default_factory=Counter)  # by source topic
    dry_run: bool = False

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())


ProducerFactory = Callable[[dict[str, Any]], Producer]


def redrive(
    kafka: KafkaConnection,
    topics: TopicNames,
    select: Selection = Selection(),
    *,
    dry_run: bool = False,
    timeout: float = 30.0,
    producer_factory: ProducerFactory = Producer,
) -> RedriveReport:
    """Send the selected dead letters back to their source topics, each at most once across redrives."""
    report = RedriveReport(dry_run=dry_run)
    producer: Producer | None = None
    if not dry_run:
        ensure_topics(kafka, [redrive_topic(topics)], OTHER_PARTITIONS, 1, config={"cleanup.policy": "compact"})
        producer = producer_factory(producer_config(kafka, transactional_id=f"bucketer-dlq-redrive.{topics.dlq}"))
        try:
            producer.init_transactions(timeout)  # fences a redrive still running, before we read what was sent
        except KafkaException as exc:
            raise from_exception(exc, "redrive: init transactions") from None
    done = redriven_refs(kafka, topics, timeout)
    todo: list[DeadLetter] = []
    for d in read_dead_letters(kafka, topics, timeout):
        if not select(d):
            continue
        report.selected += 1
        if d.ref in done:
            report.already += 1
        elif not d.redrivable:
            report.skipped[d.error_class] += 1
        else:
            todo.append(d)
    if producer is None:
        report.sent.update(d.source_topic for d in todo)
        return report
    for start in range(0, len(todo), REDRIVE_CHUNK):
        chunk = todo[start : start + REDRIVE_CHUNK]
        try:
            producer.begin_transaction()
            for d in chunk:
                producer.produce(
                    d.source_topic,
                    value=d.value,
                    key=d.key,
                    headers=[(H_REDRIVEN_FROM, f"{topics.dlq}/{d.partition}/{d.offset}".encode())],
                )
                producer.produce(
                    redrive_topic(topics),
                    key=d.ref.encode(),
                    value=f"{d.source_topic}/{d.error_class}/{datetime.now(UTC).isoformat()}".encode(),
                )
                producer.poll(0)
            producer.commit_transaction(timeout)
        except KafkaException as exc:
            try:
                producer.abort_transaction(timeout)
            except KafkaException:
                pass
            raise from_exception(exc, f"redrive: {report.total_sent} sent, then the transaction failed") from None
        report.sent.update(d.source_topic for d in chunk)
        log.info("dlq: redrove %d dead letters (%d in all)", len(chunk), report.total_sent)
    return report


class ClassCounts:
    """Dead letters per error class in the DLQ topic, read again at most every ``ttl`` seconds (the status page
    asks every few seconds; a large DLQ is not re-read each time). A failed read keeps the last counts."""

    def __init__(self, kafka: KafkaConnection, topics: TopicNames, ttl: float = 30.0, timeout: float = 10.0) -> None:
        self._kafka, self._topics, self._ttl, self._timeout = kafka, topics, ttl, timeout
        self._at: float | None = None
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, int]:
        with self._lock:
            now = time.monotonic()
            if self._at is None or now - self._at >= self._ttl:
                self._at = now
                try:
                    letters = read_dead_letters(self._kafka, self._topics, self._timeout)
                    self._counts = dict(Counter(d.error_class for d in letters))
                except LookupError:
                    self._counts = {}
                except Exception as exc:  # noqa: BLE001 - informational: keep the last counts
                    log.warning("dlq: could not count the dead letters: %s", exc)
            return dict(self._counts)
