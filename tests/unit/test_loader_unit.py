"""The loader's contract with fake Kafka clients and a fake warehouse (no services): rows are written before
their offsets are committed, a failed insert commits nothing, bad messages are dead-lettered before the
commit, and only data errors are blamed on messages. A broker outage is ridden out on a fake clock: the
failure clock resets on any success (also when the broker is back but quiet), the deadline raises the real
Kafka error, and each state change is one log line. The progress line and the lag metric."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, TopicPartition
from fakes import FakeMessage
from prometheus_client import generate_latest

from connectors.kafka_conn import KafkaConnection
from connectors.sequin import commit_time
from connectors.topics import TopicNames
from connectors.warehouse import WarehouseError
from stream.loader import _CONSUME_MAX, Loader, LoaderConfig, LoaderError, LoaderStats, WarehouseUnavailable
from stream.metrics import registry_for

TOPICS = TopicNames(prefix="t.")
RECORD = {
    "activityId": "a",
    "memberId": "m",
    "platform": "git",
    "segmentId": "s",
    "sourceId": "x",
    "type": "t",
    "createdAt": "2025-01-01T00:00:00Z",
    "updatedAt": "2025-01-01T00:00:00Z",
    "timestamp": "2025-01-01T00:00:00Z",
}
GOOD = orjson.dumps({"action": "insert", "record": RECORD})


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []


class FakeConsumer:
    def __init__(self, log: Log, batches: list[list[FakeMessage]]) -> None:
        self.log, self.batches = log, list(batches)

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None) -> None:
        self.log.events.append(("subscribe", tuple(sorted(topics))))
        if on_assign is not None:
            on_assign(self, [TopicPartition(t, p) for t in topics for p in range(3)])

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        assert asynchronous is False
        self.log.events.append(("commit", tuple(sorted((tp.topic, tp.partition, tp.offset) for tp in offsets))))

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, OFFSET_INVALID) for tp in partitions]

    def assignment(self) -> list[TopicPartition]:
        return []

    def close(self) -> None:
        self.log.events.append(("close",))


class FakeProducer:
    def __init__(self, log: Log) -> None:
        self.log = log

    def produce(self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        self.log.events.append(("dlq", topic, value, dict(headers)["bucketer-error-class"].decode()))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        return 0


class FakeWarehouse:
    """Refuses any batch holding a value listed in ``bad`` with a data error (like the SQL's throwIf)."""

    def __init__(self, log: Log, bad: set[bytes] = frozenset(), down: bool = False) -> None:  # type: ignore[assignment]
        self.log, self.bad, self.down = log, bad, down

    def insert_json(self, table: str, select: str, data: list[bytes]) -> None:
        if self.down:
            raise WarehouseError("Code: 210. DB::NetException: Connection refused")
        if self.bad & set(data):
            raise WarehouseError("Code: 395. DB::Exception: a change message without its required fields")
        self.log.events.append(("insert", table.split(" ")[0], tuple(data)))

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        if self.down:
            raise WarehouseError("Connection refused")
        return [(1,)]


def loader_with(log: Log, batches: list[list[FakeMessage]], wh: FakeWarehouse, **cfg: Any) -> Loader:
    config = LoaderConfig(
        kafka=KafkaConnection.plain("unused:9092"), buckets=2, topics=TOPICS, poll_timeout=0.01, **cfg
    )
    return Loader(
        config,
        wh,  # type: ignore[arg-type]
        consumer_factory=lambda conf: FakeConsumer(log, batches),
        producer_factory=lambda conf: FakeProducer(log),
    )


def test_rows_are_inserted_before_their_offsets_are_committed() -> None:
    log = Log()
    b0, ref = TOPICS.bucket(0), TOPICS.reference("members")
    batches = [[FakeMessage(b0, 0, 10, GOOD), FakeMessage(b0, 1, 4, GOOD + b" "), FakeMessage(ref, 0, 7, b'{"m":1}')]]
    loader = loader_with(log, batches, FakeWarehouse(log))
    stats = loader.run(until_idle=0.05)
    inserts = [e for e in log.events if e[0] == "insert"]
    commits = [e for e in log.events if e[0] == "commit"]
    assert sorted(i[1] for i in inserts) == ["activityRelations_bucket_MV_ds_0", "members"]
    assert commits == [("commit", ((b0, 0, 11), (b0, 1, 5), (ref, 0, 8)))]
    assert max(log.events.index(i) for i in inserts) < log.events.index(commits[0])
    assert (stats.messages, stats.committed, stats.dead_lettered) == (3, 3, 0)
    assert log.events[-1] == ("close",)


def inserted_batches(batches: list[list[FakeMessage]]) -> list[int]:
    log = Log()
    loader_with(log, batches, FakeWarehouse(log)).run(until_idle=0.05)
    return [len(e[2]) for e in log.events if e[0] == "insert"]


def test_an_empty_poll_hands_the_batch_over_unless_the_poll_before_was_full() -> None:
    b0 = TOPICS.bucket(0)

    def msgs(first: int, n: int) -> list[FakeMessage]:
        return [FakeMessage(b0, 0, first + i, GOOD) for i in range(n)]

    # Caught up (a partial poll, then nothing): each batch goes as soon as a poll comes back empty.
    assert inserted_batches([msgs(0, 5), [], msgs(5, 5)]) == [5, 5]
    # A backlog (a full poll): one empty poll is a fetch in flight, so the batch waits for the next records;
    # two empty polls in a row still hand it over.
    full = _CONSUME_MAX
    assert inserted_batches([msgs(0, full), [], msgs(full, 5)]) == [full + 5]
    assert inserted_batches([msgs(0, full), [], [], msgs(full, 5)]) == [full, 5]


def test_a_failed_insert_commits_nothing() -> None:
    log = Log()
    loader = loader_with(
        log, [[FakeMessage(TOPICS.bucket(1), 0, 0, GOOD)]], FakeWarehouse(log, down=True), retry_backoff=(0.0,)
    )
    with pytest.raises(WarehouseUnavailable):
        loader.run(until_idle=0.05)
    assert not [e for e in log.events if e[0] == "commit"]
    assert log.events[-1] == ("close",)


def test_bad_messages_are_dead_lettered_before_the_commit_and_the_rest_inserted() -> None:
    log = Log()
    b1 = TOPICS.bucket(1)
    refused = orjson.dumps({"action": "insert", "record": {**RECORD, "activityId": "b"}})  # passes Python's check
    batch = [
        FakeMessage(b1, 0, 0, GOOD),
        FakeMessage(b1, 0, 1, b"{nope"),
        FakeMessage(b1, 0, 2, None),
        FakeMessage(b1, 0, 3, refused),
        FakeMessage(b1, 0, 4, GOOD + b"\n"),
    ]
    loader = loader_with(log, [batch], FakeWarehouse(log, bad={b"{nope", refused}))
    stats = loader.run(until_idle=0.05)
    letters = [e for e in log.events if e[0] == "dlq"]
    assert sorted((e[2], e[3]) for e in letters) == sorted(
        [(b"", "tombstone"), (b"{nope", "not_json"), (refused, "warehouse_rejected")]
    )
    assert all(e[1] == TOPICS.dlq for e in letters)
    inserted = [v for e in log.events if e[0] == "insert" for v in e[2]]
    assert sorted(inserted) == sorted([GOOD, GOOD + b"\n"])
    commit = next(e for e in log.events if e[0] == "commit")
    assert commit == ("commit", ((b1, 0, 5),))
    assert max(log.events.index(e) for e in letters) < log.events.index(commit)
    assert (stats.dead_lettered, stats.committed) == (3, 5)


# --- broker outages, on a fake clock ------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds <= 1.0
        self.t += max(seconds, 0.01)


WAIT_COORD = KafkaError(KafkaError._WAIT_COORD, "Commit failed: Waiting for coordinator")


class FlakyConsumer(FakeConsumer):
    """Each consume() takes one fake second and returns what ``script`` holds for that call; while ``down(t)``
    the broker refuses commits and probes (retriable errors, as librdkafka raises them in an outage)."""

    def __init__(self, log: Log, clock: FakeClock, script: dict[int, list[FakeMessage]], down: Any) -> None:
        super().__init__(log, [])
        self.clock, self.script, self.down, self.calls = clock, script, down, 0
        self.parts: list[TopicPartition] = []

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        self.clock.t += 1.0
        msgs = self.script.get(self.calls, [])
        self.calls += 1
        for m in msgs:
            if m.error() is None:
                self.parts = sorted({*self.parts, TopicPartition(m.topic(), m.partition())}, key=str)
        return msgs

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        if self.down(self.clock.t):
            self.log.events.append(("commit-failed", self.clock.t))
            raise KafkaException(WAIT_COORD)
        super().commit(offsets, asynchronous)

    def assignment(self) -> list[TopicPartition]:
        return list(self.parts)

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.log.events.append(("probe", self.clock.t))
        if self.down(self.clock.t):
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Broker transport failure"))
        return [TopicPartition(tp.topic, tp.partition, 0) for tp in partitions]

    def list_topics(self, timeout: float) -> Any:
        self.log.events.append(("probe", self.clock.t))
        if self.down(self.clock.t):
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Broker transport failure"))
        return None

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float, cached: bool) -> tuple[int, int]:
        return 0, 0


def flaky_loader(
    log: Log, clock: FakeClock, script: dict[int, list[FakeMessage]], down: Any, **cfg: Any
) -> tuple[Loader, FlakyConsumer]:
    consumer = FlakyConsumer(log, clock, script, down)
    settings: dict[str, Any] = {"commit_backoff": (0.5, 1.0), "outage_deadline": 30.0, "probe_interval": 2.0}
    settings.update(cfg)
    config = LoaderConfig(
        kafka=KafkaConnection.plain("unused:9092"), buckets=2, topics=TOPICS, poll_timeout=0.01, **settings
    )
    loader = Loader(
        config,
        FakeWarehouse(log),  # type: ignore[arg-type]
        clock=clock,
        consumer_factory=lambda conf: consumer,
        producer_factory=lambda conf: FakeProducer(log),
        sleep=clock.sleep,
    )
    return loader, consumer


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage().split(" (")[0].split(" after")[0]
        for r in caplog.records
        if r.name == "bucketer.loader" and r.levelno >= logging.WARNING and "loader: broker" in r.getMessage()
    ]


def test_a_quiet_healthy_broker_resets_the_failure_clock(caplog: pytest.LogCaptureFixture) -> None:
    # An outage with nothing to commit (only a consumer error says so), then the broker is back but quiet for
    # 90 s, then a second short outage, again only seen as a consumer error. Only the probe can tell the broker
    # came back in between: a failure clock left running since the first outage would give up at once on the
    # second one (100 s > the 30 s deadline).
    caplog.set_level(logging.INFO, logger="bucketer.loader")
    log, clock = Log(), FakeClock()
    b0 = TOPICS.bucket(0)
    down_msg = [FakeMessage.failed(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))]
    script = {0: down_msg, 100: down_msg, 110: [FakeMessage(b0, 0, 0, GOOD)]}
    loader, _ = flaky_loader(log, clock, script, lambda t: t < 10 or 100 <= t < 106)
    stats = loader.run(until_idle=100)
    assert ("commit", ((b0, 0, 1),)) in log.events
    assert stats.outages == 2 and (stats.messages, stats.committed) == (1, 1)
    assert outage_lines(caplog) == [
        "loader: broker unreachable, retrying",
        "loader: broker back",
        "loader: broker unreachable, retrying",
        "loader: broker back",
    ]
    # Both outages ended on a probe, before any message came.
    probes = [e[1] for e in log.events if e[0] == "probe"]
    assert any(10 <= t < 20 for t in probes) and any(106 <= t < 110 for t in probes)


def test_an_outage_keeps_the_batch_and_commits_it_when_the_broker_is_back(caplog: pytest.LogCaptureFixture) -> None:
    # Batches keep coming while commits fail for 20 s (< the 30 s deadline): the offsets of every inserted batch
    # are kept, merged and committed once; one line when the broker goes, one when it is back.
    caplog.set_level(logging.INFO, logger="bucketer.loader")
    log, clock = Log(), FakeClock()
    b0, b1 = TOPICS.bucket(0), TOPICS.bucket(1)
    script = {i * 3: [FakeMessage(b0, 0, i, GOOD), FakeMessage(b1, 2, 10 + i, GOOD)] for i in range(8)}
    loader, _ = flaky_loader(log, clock, script, lambda t: 2 <= t < 22)
    stats = loader.run(until_idle=5)
    commits = [e[1] for e in log.events if e[0] == "commit"]
    assert commits[-1] == ((b0, 0, 8), (b1, 2, 18))
    assert len([e for e in log.events if e[0] == "commit-failed"]) > 3
    inserted = [v for e in log.events if e[0] == "insert" for v in e[2]]
    assert len(inserted) == 16
    assert (stats.messages, stats.committed, stats.outages) == (16, 16, 1)
    assert outage_lines(caplog) == ["loader: broker unreachable, retrying", "loader: broker back"]


def test_past_the_deadline_the_real_kafka_error_is_raised_and_nothing_committed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bucketer.loader")
    log, clock = Log(), FakeClock()
    b0 = TOPICS.bucket(0)
    loader, _ = flaky_loader(log, clock, {0: [FakeMessage(b0, 0, 0, GOOD)]}, lambda t: t >= 1, outage_deadline=30.0)
    with pytest.raises(LoaderError, match=r"Kafka unreachable for 3\ds .*Waiting for coordinator") as caught:
        loader.run(until_idle=5)
    assert "1 loaded messages not committed" in str(caught.value)
    assert 30 <= clock.t < 40
    assert not [e for e in log.events if e[0] == "commit"]
    assert log.events[-1] == ("close",)
    assert outage_lines(caplog) == ["loader: broker unreachable, retrying"]  # once, not per retry


def test_no_input_during_an_outage_is_not_idleness() -> None:
    # Nothing to commit, the broker away for 25 s, until_idle 5: the loader waits for the broker (and gives up
    # only past the deadline), it does not call an outage "idle" and exit 0.
    log, clock = Log(), FakeClock()
    script = {0: [FakeMessage.failed(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))]}
    loader, _ = flaky_loader(log, clock, script, lambda t: t < 25)
    loader.run(until_idle=5)
    assert clock.t >= 29  # back at 25 (seen on the probe of the poll that ended then), then 5 idle seconds
    log2, clock2 = Log(), FakeClock()
    loader2, _ = flaky_loader(log2, clock2, script, lambda t: True, outage_deadline=12.0)
    with pytest.raises(LoaderError, match="Broker transport failure"):
        loader2.run(until_idle=5)


def test_a_stop_during_an_outage_leaves_the_commit_after_the_grace(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bucketer.loader")
    log, clock = Log(), FakeClock()
    b0 = TOPICS.bucket(0)
    loader, consumer = flaky_loader(
        log, clock, {0: [FakeMessage(b0, 0, 0, GOOD)]}, lambda t: t >= 2, stop_grace=3.0, outage_deadline=300.0
    )
    real_consume = consumer.consume

    def consume(num_messages: int, timeout: float) -> list[FakeMessage]:
        if clock.t >= 10:
            loader.stop()
        return real_consume(num_messages, timeout)

    consumer.consume = consume  # type: ignore[method-assign]
    stats = loader.run()
    assert clock.t < 20 and stats.committed == 0 and stats.messages == 1
    assert [e for e in log.events if e[0] == "insert"]
    assert any("not committed" in r.getMessage() for r in caplog.records)


# --- progress line and lag metric ---------------------------------------------------------------------------


class LaggingConsumer(FlakyConsumer):
    """Committed offset 3 and a read_committed end of 10 on every assigned partition."""

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, 3) for tp in partitions]

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float, cached: bool) -> tuple[int, int]:
        return 0, 10


def test_progress_line_and_lag_metric(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bucketer.loader")
    log, clock = Log(), FakeClock()
    b0 = TOPICS.bucket(0)
    consumer = LaggingConsumer(
        log, clock, {0: [FakeMessage(b0, 0, 0, GOOD), FakeMessage(b0, 1, 0, GOOD)]}, lambda t: False
    )
    config = LoaderConfig(kafka=KafkaConnection.plain("unused:9092"), buckets=2, topics=TOPICS, progress_interval=5.0)
    loader = Loader(
        config,
        FakeWarehouse(log),  # type: ignore[arg-type]
        clock=clock,
        consumer_factory=lambda conf: consumer,
        producer_factory=lambda conf: FakeProducer(log),
        sleep=clock.sleep,
    )
    stats = loader.run(until_idle=12)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("load: ")]
    assert 2 <= len(lines) <= 3  # every 5 fake seconds over ~14
    assert lines[0].startswith("load: 0 msg/s lag=14 loaded=2 rows=2 dlq=0")  # 2 msgs over 5 s rounds to 0
    assert stats.lag == 14  # two partitions, 10 - 3 each
    text = generate_latest(registry_for(loader=loader)).decode()
    assert "bucketer_loader_lag_messages 14.0" in text
    assert "bucketer_loader_outages_total 0.0" in text
    # Unknown lag (the broker cannot tell) is no gauge at all, not a misleading 0.
    assert "bucketer_loader_lag_messages" not in generate_latest(registry_for(loader=_Stats(LoaderStats()))).decode()


class _Stats:
    def __init__(self, stats: LoaderStats) -> None:
        self.stats = stats


def with_commit(value: bytes, stamp: str) -> bytes:
    return value[:-1] + b',"metadata":{"commit_timestamp":"' + stamp.encode() + b'"}}'


def test_each_flush_hands_the_newest_commit_time_per_bucket_after_its_inserts() -> None:
    log = Log()
    b0, b1, ref = TOPICS.bucket(0), TOPICS.bucket(1), TOPICS.reference("members")
    batches = [
        [
            FakeMessage(b0, 0, 1, with_commit(GOOD, "2025-05-01T12:00:01.5Z")),
            FakeMessage(b0, 0, 2, with_commit(GOOD, "2025-05-01T12:00:02Z")),  # the partition's last: newest
            FakeMessage(b0, 1, 1, with_commit(GOOD, "2025-05-01T11:59:00Z")),
            FakeMessage(b1, 0, 1, GOOD),  # no commit_timestamp: no mark
            FakeMessage(ref, 0, 1, with_commit(b'{"m":1}', "2025-05-01T12:00:09.25+00:00")),
        ]
    ]
    config = LoaderConfig(kafka=KafkaConnection.plain("unused:9092"), buckets=2, topics=TOPICS, poll_timeout=0.01)
    calls: list[dict[int | None, datetime]] = []

    def after_flush(wh: Any, marks: dict[int | None, datetime]) -> None:
        assert any(e[0] == "insert" for e in log.events)  # after the batch's inserts, before its commit
        assert not any(e[0] == "commit" for e in log.events)
        calls.append(marks)

    Loader(
        config,
        FakeWarehouse(log),  # type: ignore[arg-type]
        consumer_factory=lambda conf: FakeConsumer(log, batches),
        producer_factory=lambda conf: FakeProducer(log),
        after_flush=after_flush,
    ).run(until_idle=0.05)
    assert calls == [
        {
            0: datetime(2025, 5, 1, 12, 0, 2, tzinfo=UTC),
            None: datetime(2025, 5, 1, 12, 0, 9, 250000, tzinfo=UTC),
        }
    ]


def test_commit_time_is_read_from_the_bytes_and_refuses_what_is_not_a_timestamp() -> None:
    assert commit_time(b'{"metadata": {"commit_timestamp" : "2025-05-01T12:00:03.121004Z"}}') == datetime(
        2025, 5, 1, 12, 0, 3, 121004, tzinfo=UTC
    )
    assert commit_time(b'{"metadata":{"commit_timestamp":"2025-05-01T12:00:03"}}') == datetime(
        2025, 5, 1, 12, 0, 3, tzinfo=UTC
    )
    for bad in (
        b'{"metadata":{}}',
        b'{"metadata":{"commit_timestamp":null}}',
        b'{"metadata":{"commit_timestamp":"yesterday"}}',
        b'{"record":{"note":"\\"commit_timestamp\\":\\"2025-05-01T12:00:03Z\\""}}',  # a string value
    ):
        assert commit_time(bad) is None, bad
