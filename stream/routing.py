"""Routing of one batch (pure of Kafka clients: messages in, ``Sink`` calls out) and the router's counters.

``BatchRouter.route(messages, sink)`` decodes each message (connectors/sequin.py), writes the original
key and value bytes to the bucket of its segmentId, the retirement of an old row (if any) to the old
row's bucket first, and bad input to the DLQ. It returns the batch's ``BatchCounts``; the router adds
them to ``RouterStats`` only once the batch is committed, so the counters never count a replay twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from connectors.kafka import RETIREMENT_HEADERS, dlq_headers
from connectors.sequin import BadMessage, decode
from stream.buckets import bucket_of
from stream.sinks import Headers, Sink


class SourceMessage(Protocol):
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...


@dataclass
class BatchCounts:
    buckets: list[int]
    retirements: int = 0
    old_values_unknown: int = 0
    resolve: int = 0  # copies sent to the resolve topic: key-only deletes, updates without old values
    dlq: Counter[str] = field(default_factory=Counter)


class BatchRouter:
    def __init__(self, buckets: int, max_message_bytes: int = 1_000_000, cache_size: int = 100_000) -> None:
        self.buckets = buckets
        self.max_message_bytes = max_message_bytes
        self._cache: dict[str, int] = {}
        self._cache_size = cache_size

    def bucket(self, segment_id: str) -> int:
        b = self._cache.get(segment_id)
        if b is None:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            b = self._cache[segment_id] = bucket_of(segment_id, self.buckets)
        return b

    def route(self, messages: Iterable[SourceMessage], sink: Sink) -> BatchCounts:
        counts = BatchCounts([0] * self.buckets)
        per_bucket = counts.buckets
        write = sink.write
        cache = self._cache
        limit = self.max_message_bytes
        resolve = getattr(sink, "write_resolve", None)  # the resolve topic (stream/cdc.py); Kafka sinks only
        for m in messages:
            value = m.value()
            try:
                if value is not None and len(value) > limit:
                    raise BadMessage("too_large", f"{len(value)} bytes > {limit}")
                change = decode(value, m.topic(), m.partition(), m.offset())
            except BadMessage as bad:
                self.dead_letter(m, bad, sink, counts)
                continue
            if not change.segment_id:  # a key-only delete: the loader finds its bucket by activityId
                if resolve is None:
                    self.dead_letter(
                        m, BadMessage("key_only_delete", "needs the resolve topic (sink kafka)"), sink, counts
                    )
                else:
                    resolve(m.key(), value)
                    counts.resolve += 1
                continue
            retirement = change.retirement
            if retirement is not None:
                old = self.bucket(retirement.segment_id)
                write(old, m.key(), retirement.value, RETIREMENT_HEADERS)
                per_bucket[old] += 1
                counts.retirements += 1
            elif change.old_values_unknown:
                counts.old_values_unknown += 1
                if resolve is not None:  # the loader retires the old row if its sort key differs (stream/cdc.py)
                    resolve(m.key(), value)
                    counts.resolve += 1
            b = cache.get(change.segment_id)
            if b is None:
                b = self.bucket(change.segment_id)
            write(b, m.key(), value)  # type: ignore[arg-type]  # value is bytes once decoded
            per_bucket[b] += 1
        return counts

    @staticmethod
    def dead_letter(m: SourceMessage, bad: BadMessage, sink: Sink, counts: BatchCounts) -> None:
        value = m.value()
        if bad.error_class == "too_large":
            value = b""  # cannot be written anywhere as is; the headers say where it is
        headers = dlq_headers(bad.error_class, bad.detail, m.topic(), m.partition(), m.offset())
        sink.dead_letter(m.key(), value, headers)
        counts.dlq[bad.error_class] += 1


class RecordedBatch:
    """A sink stand-in that keeps a batch's sink calls, in order, for ``replay`` into the real sink later: the
    router routes the next batch this way while the current one's transaction commits (stream/router.py).
    ``resolve``: the real sink has ``write_resolve`` (so key-only deletes go there, not to the DLQ)."""

    exactly_once = True

    def __init__(self, resolve: bool) -> None:
        self.calls: list[tuple[int, bytes | None, bytes | None, Headers]] = []  # bucket; -1 DLQ, -2 resolve
        self.write_resolve = self._resolve if resolve else None

    def write(self, bucket: int, key: bytes | None, value: bytes, headers: Headers = None) -> None:
        self.calls.append((bucket, key, value, headers))

    def dead_letter(self, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        self.calls.append((-1, key, value, headers))

    def _resolve(self, key: bytes | None, value: bytes) -> None:
        self.calls.append((-2, key, value, None))

    def replay(self, sink: Sink) -> None:
        write, dead_letter = sink.write, sink.dead_letter
        resolve = getattr(sink, "write_resolve", None)
        for bucket, key, value, headers in self.calls:
            if bucket >= 0:
                write(bucket, key, value, headers)  # type: ignore[arg-type]  # routed values are bytes
            elif bucket == -1:
                dead_letter(key, value, headers)
            else:
                resolve(key, value)  # type: ignore[misc]  # recorded only when the sink has it


class RouterStats:
    """Committed totals, and the progress line."""

    def __init__(self, buckets: int) -> None:
        self.buckets = [0] * buckets
        self.retirements = 0
        self.old_values_unknown = 0
        self.resolve = 0
        self.dlq: Counter[str] = Counter()
        self.aborts = 0
        self.lag: int | None = None
        self._since_progress = 0

    @property
    def routed(self) -> int:
        return sum(self.buckets)

    def add(self, c: BatchCounts) -> None:
        for i, n in enumerate(c.buckets):
            self.buckets[i] += n
        self.retirements += c.retirements
        self.old_values_unknown += c.old_values_unknown
        self.resolve += c.resolve
        self.dlq.update(c.dlq)
        self._since_progress += sum(c.buckets) + sum(c.dlq.values())

    def summary(self) -> str:
        dlq = " ".join(f"{k}={v}" for k, v in sorted(self.dlq.items()))
        return (
            f"routed={self.routed} retirements={self.retirements} "
            f"updates_without_old_values={self.old_values_unknown} "
            f"dlq={sum(self.dlq.values())}{f' ({dlq})' if dlq else ''} aborted_batches={self.aborts}"
        )

    def progress(self, elapsed: float) -> str:
        rate = self._since_progress / elapsed if elapsed > 0 else 0.0
        self._since_progress = 0
        per = " ".join(f"{i}:{n}" for i, n in enumerate(self.buckets))
        lag = "?" if self.lag is None else str(self.lag)
        return f"route: {rate:.0f} msg/s lag={lag} {self.summary()} buckets=[{per}]"
