"""The Tinybird sink of the router (``--sink tinybird``): bucket n -> data source
``activityRelations_bucket_MV_ds_{n}`` through the Events API (connectors/tinybird_api.py).

Contract (the ``Sink`` seam of stream/sinks.py, TINYBIRD.md):
- ``write`` appends the original Sequin value bytes (retirements included) as one NDJSON line to the
  buffer of its data source. A worker thread per data source sends a buffer when it reaches
  ``max_batch_bytes`` or is ``linger`` seconds old: one request in flight per data source (so its lines
  stay in order), at most ``max_concurrent_requests`` across data sources, never more than
  ``max_requests_per_second`` per data source, gzip when the body is big enough to gain from it.
- Failures: 429 -> that data source waits ``Retry-After`` (else ``X-RateLimit-Reset``, else backoff)
  before its next request; 5xx/timeouts -> capped exponential backoff with jitter, retried; 413 -> the
  batch is split in halves; 400/403/404 -> stop with a clear error; 422 -> logged loudly with the
  response and stop (no blind retry). Retries of one request that fail for ``unreachable_deadline``
  seconds (429s aside) stop the sink too: "Tinybird unreachable". A stop is sticky: the sink refuses to
  commit or reopen, so no later offset is ever committed past undelivered rows. Quarantined rows are counted and logged.
- Offsets (``AckTracker``): each router batch is a checkpoint; ``commit`` seals it with its offsets, sends
  the buffers at once, waits until every line of the batch was acknowledged (200) and commits, per source
  partition, the offsets of the longest acknowledged prefix of checkpoints. (Waiting per batch keeps the
  committed offset current, which is what the router's ``--until-idle`` reads to know it caught up; the
  data sources of one batch are still sent in parallel, each with its own retries.)
  ``close`` flushes, waits (bounded) and commits what was acknowledged; it raises ``TinybirdSinkError`` if the
  sink stopped and nothing reported it yet (so a run ending idle still exits with the error). A crash
  re-sends, never loses.
- ``interrupt()`` (the router's stop, from a signal handler): every wait and retry ends within ~0.25 s,
  the pending ``commit`` raises ``SinkRetryError`` (the batch stays uncommitted and is replayed by
  the next run) and ``close`` commits only what was already acknowledged, without waiting.
- Errors are the seam's own (connectors/sink_errors.py): a stop is ``TinybirdSinkError``, a
  ``SinkFatalError`` (the router ends with its one-line reason); an interrupted wait is a
  ``SinkRetryError``. Only what really is Kafka (the DLQ producer, the offset commit) raises Kafka errors.
- Settings: ``TinybirdSettings`` (url, token as a ``Secret`` that never prints, data source naming,
  request sizes, rates, timeouts, backoff, unreachable deadline) is the ``tinybird`` part of the router's
  config (``RouterConfig.tinybird``); the bucket count is the router's, passed to ``TinybirdSink``.
- Bad input goes to the DLQ Kafka topic through the ``dlq`` sink, never to Tinybird.
"""

from __future__ import annotations

import gzip
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition

from connectors.kafka import BucketerKafkaError, from_exception
from connectors.sink_errors import SinkFatalError, SinkRetryError
from connectors.tinybird_api import (
    Secret,
    TinybirdClient,
    TinybirdError,
    TinybirdPartialWrite,
    TinybirdRetryable,
    TinybirdTooLarge,
)

log = logging.getLogger("bucketer.tinybird")
Headers = list[tuple[str, bytes]] | None


@dataclass(frozen=True)
class TinybirdSettings:
    """Where and how the router's Tinybird sink sends (``RouterConfig.tinybird``). The token is a
    ``Secret`` and left out of the repr, so a logged or printed config never shows it."""

    url: str
    token: Secret = field(repr=False)
    datasource_template: str = "activityRelations_bucket_MV_ds_{n}"
    max_batch_bytes: int = 4_000_000  # per request, well under the 10 MB limit
    linger: float = 0.5  # seconds a partly filled batch waits
    max_concurrent_requests: int = 8
    max_requests_per_second: float = 100.0  # per data source
    timeout: float = 30.0  # per request
    backoff_base: float = 0.25
    backoff_cap: float = 30.0
    gzip_min_bytes: int = 4096
    close_timeout: float = 60.0
    unreachable_deadline: float = 180.0  # seconds of failed retries (5xx, timeouts, refused) before a stop

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the Tinybird URL must start with http:// or https://, not {self.url!r}")
        if not isinstance(self.token, Secret) or not self.token:
            raise ValueError("the Tinybird token must be a non-empty Secret (BUCKETER_TINYBIRD_TOKEN)")
        if "{n}" not in self.datasource_template:
            raise ValueError(f"datasource_template {self.datasource_template!r} must contain {{n}} (the bucket)")
        positive = {
            "max_batch_bytes": self.max_batch_bytes,
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_requests_per_second": self.max_requests_per_second,
            "timeout": self.timeout,
            "backoff_base": self.backoff_base,
            "backoff_cap": self.backoff_cap,
            "unreachable_deadline": self.unreachable_deadline,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"tinybird {name} must be > 0, not {value!r}")
        for name, value in {"linger": self.linger, "close_timeout": self.close_timeout}.items():
            if not value >= 0:
                raise ValueError(f"tinybird {name} must be >= 0, not {value!r}")

    def datasource(self, bucket: int) -> str:
        return self.datasource_template.format(n=bucket)


class DeadLetterSink(Protocol):
    """What the Tinybird sink needs of its DLQ (an at-least-once ``stream.sinks.KafkaSink``)."""

    def open(self) -> None: ...
    def begin(self) -> None: ...
    def dead_letter(self, key: bytes | None, value: bytes | None, headers: Headers) -> None: ...
    def flush(self) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


class TinybirdSinkError(SinkFatalError):
    """The sink stopped (configuration error, partial write, undeliverable rows); restart replays."""


class Checkpoint:
    """The lines of one router batch and, once sealed, the source offsets that batch completes."""

    __slots__ = ("pending", "bytes", "offsets", "discarded")

    def __init__(self) -> None:
        self.pending = 0  # lines not yet acknowledged
        self.bytes = 0  # their bytes
        self.offsets: list[TopicPartition] | None = None
        self.discarded = False


class AckTracker:
    """Which source offsets may be committed: those of the longest acknowledged prefix of checkpoints."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._queue: deque[Checkpoint] = deque()
        self.pending_bytes = 0

    def open(self) -> Checkpoint:
        with self.cond:
            ckpt = Checkpoint()
            self._queue.append(ckpt)
            return ckpt

    def added(self, ckpt: Checkpoint, nbytes: int) -> None:
        with self.cond:
            ckpt.pending += 1
            ckpt.bytes += nbytes
            self.pending_bytes += nbytes

    def acked(self, owners: list[Checkpoint], sizes: list[int]) -> None:
        with self.cond:
            for ckpt, n in zip(owners, sizes, strict=True):
                ckpt.pending -= 1
                if not ckpt.discarded:
                    ckpt.bytes -= n
                    self.pending_bytes -= n
            self.cond.notify_all()

    def seal(self, ckpt: Checkpoint, offsets: list[TopicPartition]) -> None:
        with self.cond:
            ckpt.offsets = list(offsets)
            self.cond.notify_all()

    def discard(self, ckpt: Checkpoint) -> None:
        """An aborted batch: the router replays it, so its offsets are never committed from here."""
        with self.cond:
            if ckpt.offsets is None and ckpt in self._queue:
                self._queue.remove(ckpt)
                self.pending_bytes -= ckpt.bytes
                ckpt.bytes = 0
                ckpt.discarded = True  # its lines may still be sent (harmless duplicates); acks then go nowhere
                self.cond.notify_all()

    def take_committable(self) -> list[TopicPartition]:
        """Pop the acknowledged sealed prefix; the offsets to commit, latest per partition."""
        out: dict[tuple[str, int], TopicPartition] = {}
        with self.cond:
            while self._queue and self._queue[0].offsets is not None and self._queue[0].pending <= 0:
                for tp in self._queue.popleft().offsets or []:
                    out[(tp.topic, tp.partition)] = tp
        return list(out.values())

    def acknowledged(self) -> dict[tuple[str, int], int]:
        """Per source partition, the offset up to which (exclusive) everything was acknowledged."""
        out: dict[tuple[str, int], int] = {}
        with self.cond:
            for ckpt in self._queue:
                if ckpt.offsets is None or ckpt.pending > 0:
                    break
                out.update({(tp.topic, tp.partition): tp.offset for tp in ckpt.offsets})
        return out

    def outstanding(self) -> int:
        with self.cond:
            return sum(1 for c in self._queue if c.pending > 0 or c.offsets is not None)


class SourceWorker:
    """Buffers and sends the lines of one data source, one request at a time."""

    def __init__(self, sink: TinybirdSink, datasource: str) -> None:
        self.sink, self.datasource, self.cfg = sink, datasource, sink.settings
        self.cond = threading.Condition()
        self.lines: list[bytes] = []
        self.owners: list[Checkpoint] = []
        self.size = 0
        self.since = 0.0
        self.flush_now = False
        self.stopping = False
        self.not_before = 0.0
        self.thread = threading.Thread(target=self._run, name=f"tinybird-{datasource}", daemon=True)
        self.thread.start()

    def add(self, line: bytes, owner: Checkpoint) -> None:
        with self.cond:
            if not self.lines:
                self.since = self.sink.clock()
            self.lines.append(line)
            self.owners.append(owner)
            self.size += len(line) + 1
            if self.size >= self.cfg.max_batch_bytes:
                self.cond.notify()

    def flush(self) -> None:
        with self.cond:
            self.flush_now = True
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def _take(self) -> tuple[list[bytes], list[Checkpoint]] | None:
        with self.cond:
            while True:
                if self.stopping or self.sink.fatal is not None or self.sink.interrupted.is_set():
                    return None
                if self.lines:
                    age = self.sink.clock() - self.since
                    if self.flush_now or self.size >= self.cfg.max_batch_bytes or age >= self.cfg.linger:
                        break
                    self.cond.wait(max(0.005, self.cfg.linger - age))
                else:
                    self.flush_now = False
                    self.cond.wait(0.5)
            # cut at max_batch_bytes so one request stays under the limit
            n, size = 0, 0
            while n < len(self.lines) and (n == 0 or size + len(self.lines[n]) + 1 <= self.cfg.max_batch_bytes):
                size += len(self.lines[n]) + 1
                n += 1
            lines, owners = self.lines[:n], self.owners[:n]
            del self.lines[:n], self.owners[:n]
            self.size -= size
            self.since = self.sink.clock()
            if not self.lines:
                self.flush_now = False
            return lines, owners

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._deliver(*batch)
            except TinybirdError as exc:
                self.sink.fail(self.datasource, exc)
                return
            except _Stopped:
                return
            except Exception as exc:  # noqa: BLE001 - a bug must stop the sink, never be swallowed silently
                log.exception("tinybird worker for %s crashed", self.datasource)
                self.sink.fail(self.datasource, TinybirdError(f"worker crashed: {type(exc).__name__}: {exc}"))
                return

    def _deliver(self, lines: list[bytes], owners: list[Checkpoint]) -> None:
        parts = [(lines, owners)]
        while parts:
            part_lines, part_owners = parts.pop(0)
            try:
                self._post(part_lines)
            except TinybirdTooLarge as exc:
                if len(part_lines) == 1:
                    raise TinybirdError(
                        f"{self.datasource}: one row of {len(part_lines[0])} bytes is over the "
                        f"request limit ({exc.status})",
                        exc.status,
                        exc.body,
                    ) from None
                mid = len(part_lines) // 2
                self.sink.count(self.datasource, "splits")
                parts[0:0] = [(part_lines[:mid], part_owners[:mid]), (part_lines[mid:], part_owners[mid:])]
                continue
            self.sink.tracker.acked(part_owners, [len(x) + 1 for x in part_lines])

    def _post(self, lines: list[bytes]) -> None:
        body = b"\n".join(lines) + b"\n"
        gzipped = len(body) >= self.cfg.gzip_min_bytes
        if gzipped:
            packed = gzip.compress(body, compresslevel=5)
            gzipped = len(packed) < len(body) * 0.9
            body = packed if gzipped else body
        attempt, failing_since = 0, None
        while True:
            self._pace()
            try:
                with self.sink.slots:
                    # the requests-per-second spacing counts from the moment the request really starts
                    self.not_before = max(self.not_before, self.sink.clock() + 1.0 / self.cfg.max_requests_per_second)
                    result = self.sink.client.post_events(self.datasource, body, gzipped)
            except TinybirdRetryable as exc:
                attempt += 1
                if exc.status != 429:  # a 429 is an answer: Tinybird is there
                    now = self.sink.clock()
                    failing_since = now if failing_since is None else failing_since
                    if now - failing_since >= self.cfg.unreachable_deadline:
                        raise TinybirdError(
                            f"Tinybird unreachable at {self.cfg.url} for {now - failing_since:.0f}s "
                            f"(unreachable_deadline {self.cfg.unreachable_deadline:g}s; last: {exc}); "
                            "nothing after the last acknowledged batch was committed, a restart re-sends it"
                        ) from None
                delay = exc.delay if exc.delay is not None else self.sink.backoff(attempt)
                self.not_before = max(self.not_before, self.sink.clock() + delay)
                self.sink.count(self.datasource, "throttled" if exc.status == 429 else "retries")
                log.warning("%s: %s; retry %d in %.2fs", self.datasource, exc, attempt, delay)
                continue
            except TinybirdPartialWrite as exc:
                log.error(
                    "%s: PARTIAL WRITE (422), not retried (a retry may duplicate rows); "
                    "%d rows in the request; response: %s",
                    self.datasource,
                    len(lines),
                    exc.body,
                )
                raise
            self.sink.count(self.datasource, "requests")
            self.sink.count(self.datasource, "rows", len(lines))
            if result.quarantined_rows:
                self.sink.count(self.datasource, "quarantined", result.quarantined_rows)
                log.warning(
                    "%s: %d of %d rows quarantined (see %s_quarantine)",
                    self.datasource,
                    result.quarantined_rows,
                    len(lines),
                    self.datasource,
                )
            return

    def _pace(self) -> None:
        """Wait for this data source's next slot: Retry-After and the requests-per-second limit."""
        while True:
            if self.stopping or self.sink.fatal is not None or self.sink.interrupted.is_set():
                raise _Stopped
            wait = self.not_before - self.sink.clock()
            if wait <= 0:
                break
            self.sink.sleep(min(wait, 0.25))


class _Stopped(Exception):
    pass


class TinybirdSink:
    """The router's sink for Tinybird (see the module docstring). ``exactly_once`` is False."""

    exactly_once = False

    def __init__(
        self,
        settings: TinybirdSettings,
        buckets: int,
        dlq: DeadLetterSink | None = None,
        *,
        client_factory: Callable[[TinybirdSettings], TinybirdClient] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, not {buckets}")
        self.settings, self.buckets, self.dlq = settings, buckets, dlq
        self.clock, self.sleep = clock, sleep
        self._rng = rng or random.Random()
        self._client_factory = client_factory or (lambda c: TinybirdClient(c.url, c.token, c.timeout))
        self.tracker = AckTracker()
        self.stats: dict[str, Counter[str]] = {}
        self.fatal: TinybirdError | None = None
        self._fatal_reported = False
        self._stats_lock = threading.Lock()
        self._client: TinybirdClient | None = None
        self._workers: dict[int, SourceWorker] = {}
        self._current: Checkpoint | None = None
        self._consumer: Consumer | None = None
        self.slots = threading.BoundedSemaphore(settings.max_concurrent_requests)
        self.interrupted = threading.Event()

    def __repr__(self) -> str:
        return f"TinybirdSink(url={self.settings.url!r}, buckets={self.buckets}, token=***)"

    def interrupt(self) -> None:
        """The router stops: end every wait and retry (see the module docstring). Signal-safe: only
        sets an event, takes no lock; every wait polls it at least every 0.25 s."""
        self.interrupted.set()

    # --- the Sink seam --------------------------------------------------------------------------------
    def open(self) -> None:
        self._raise_if_failed()
        self._client = self._client_factory(self.settings).__enter__()
        if self.dlq is not None:
            self.dlq.open()

    @property
    def client(self) -> TinybirdClient:
        assert self._client is not None, "TinybirdSink used before open()"
        return self._client

    def begin(self) -> None:
        self._raise_if_failed()
        self._current = self.tracker.open()
        if self.dlq is not None:
            self.dlq.begin()

    def write(self, bucket: int, key: bytes | None, value: bytes, headers: Headers = None) -> None:
        if self._current is None:
            self.begin()
        assert self._current is not None
        if b"\n" in value:  # NDJSON: one message per line (Sequin's JSON is compact; be safe anyway)
            value = orjson.dumps(orjson.loads(value))
        worker = self._workers.get(bucket)
        if worker is None:
            if not 0 <= bucket < self.buckets:
                raise ValueError(f"bucket {bucket} out of range 0..{self.buckets - 1}")
            worker = self._workers[bucket] = SourceWorker(self, self.settings.datasource(bucket))
        self.tracker.added(self._current, len(value) + 1)
        worker.add(value, self._current)

    def dead_letter(self, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        if self.dlq is None:
            raise TinybirdSinkError("bad input but no DLQ sink configured")
        self.dlq.dead_letter(key, value, headers)

    def commit(self, offsets: list[TopicPartition], consumer: Consumer) -> None:
        """Send what is buffered now, wait until every line of this batch (and before) is acknowledged,
        then commit the offsets. Data sources are sent in parallel, each batch is acknowledged before its
        offsets are committed; a stop (4xx) raises instead."""
        self._raise_if_failed()
        if self.dlq is not None:
            self.dlq.flush()
        if self._current is None:
            self._current = self.tracker.open()
        ckpt, self._current = self._current, None
        self.tracker.seal(ckpt, offsets)
        self._consumer = consumer
        for w in self._workers.values():
            w.flush()
        with self.tracker.cond:
            while ckpt.pending > 0 and self.fatal is None and not self.interrupted.is_set():
                self.tracker.cond.wait(0.2)
            abandoned = ckpt.pending > 0
        self._raise_if_failed()
        if abandoned:
            raise SinkRetryError("stopped before Tinybird acknowledged the batch; it stays uncommitted")
        self._commit_ready(consumer)

    def abort(self) -> None:
        if self._current is not None:
            self.tracker.discard(self._current)
            self._current = None
        if self.dlq is not None:
            self.dlq.abort()

    def close(self) -> None:
        """Flush every buffer, wait (bounded) for the acknowledgements, commit them, stop the workers."""
        if self._current is not None:
            self.abort()
        for w in self._workers.values():
            w.flush()
        deadline = self.clock() + self.settings.close_timeout
        with self.tracker.cond:
            while (
                self.tracker.pending_bytes > 0
                and self.fatal is None
                and not self.interrupted.is_set()
                and self.clock() < deadline
            ):
                self.tracker.cond.wait(0.1)
            undelivered = self.tracker.pending_bytes
        if self._consumer is not None:
            try:
                self._commit_ready(self._consumer)
            except BucketerKafkaError as exc:  # not committed: a restart re-sends (duplicates, no loss)
                log.warning("final commit failed: %s", exc)
        for w in self._workers.values():
            w.stop()
        for w in self._workers.values():
            w.thread.join(5.0)
        self._workers.clear()
        if undelivered > 0 and self.fatal is None and self.interrupted.is_set():
            log.warning(
                "stopped with %d bytes not acknowledged by Tinybird: not committed, re-sent next run", undelivered
            )
        elif undelivered > 0 and self.fatal is None:
            self.fatal = TinybirdError(
                f"{undelivered} bytes not acknowledged by Tinybird within "
                f"{self.settings.close_timeout}s; restart to re-send them"
            )
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.dlq is not None:
            self.dlq.close()
        self._consumer = None
        if self.fatal is not None and not self._fatal_reported:
            self._fatal_reported = True  # once: the worker's own close after a failed reopen stays quiet
            raise TinybirdSinkError(f"tinybird sink stopped: {self.fatal}")

    # --- helpers --------------------------------------------------------------------------------------
    def acknowledged(self) -> dict[tuple[str, int], int]:
        """Per source partition, the offset below which every message was acknowledged (not yet popped)."""
        return self.tracker.acknowledged()

    def _commit_ready(self, consumer: Consumer) -> None:
        offsets = self.tracker.take_committable()
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            raise from_exception(exc, "commit offsets") from None

    def fail(self, datasource: str, exc: TinybirdError) -> None:
        if self.fatal is None:
            self.fatal = exc
            log.error("tinybird sink stopped on %s: %s", datasource, exc)
        with self.tracker.cond:
            self.tracker.cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self.fatal is not None:
            self._fatal_reported = True
            raise TinybirdSinkError(f"tinybird sink stopped: {self.fatal}")

    def backoff(self, attempt: int) -> float:
        ceiling = min(self.settings.backoff_cap, self.settings.backoff_base * (2 ** (attempt - 1)))
        return ceiling * (0.5 + self._rng.random() / 2)

    def count(self, datasource: str, what: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats.setdefault(datasource, Counter())[what] += n
