"""The loader's contract with fake Kafka clients and a fake warehouse (no services): rows are written before
their offsets are committed, a failed insert commits nothing, bad messages are dead-lettered before the
commit, and only data errors are blamed on messages."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from connectors.warehouse import WarehouseError
from stream.loader import _CONSUME_MAX, Loader, LoaderConfig, WarehouseUnavailable

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


class Msg:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None, key: bytes | None = b"k"):
        self._t, self._p, self._o, self._v, self._k = topic, partition, offset, value, key

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes | None:
        return self._v

    def key(self) -> bytes | None:
        return self._k


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []


class FakeConsumer:
    def __init__(self, log: Log, batches: list[list[Msg]]) -> None:
        self.log, self.batches = log, list(batches)

    def subscribe(self, topics: list[str], on_revoke: Any = None) -> None:
        self.log.events.append(("subscribe", tuple(sorted(topics))))

    def consume(self, num_messages: int, timeout: float) -> list[Msg]:
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        assert asynchronous is False
        self.log.events.append(("commit", tuple(sorted((tp.topic, tp.partition, tp.offset) for tp in offsets))))

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


def loader_with(log: Log, batches: list[list[Msg]], wh: FakeWarehouse, **cfg: Any) -> Loader:
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
    batches = [[Msg(b0, 0, 10, GOOD), Msg(b0, 1, 4, GOOD + b" "), Msg(ref, 0, 7, b'{"m":1}')]]
    loader = loader_with(log, batches, FakeWarehouse(log))
    stats = loader.run(until_idle=0.05)
    inserts = [e for e in log.events if e[0] == "insert"]
    commits = [e for e in log.events if e[0] == "commit"]
    assert sorted(i[1] for i in inserts) == ["activityRelations_bucket_MV_ds_0", "members"]
    assert commits == [("commit", ((b0, 0, 11), (b0, 1, 5), (ref, 0, 8)))]
    assert max(log.events.index(i) for i in inserts) < log.events.index(commits[0])
    assert (stats.messages, stats.committed, stats.dead_lettered) == (3, 3, 0)
    assert log.events[-1] == ("close",)


def inserted_batches(batches: list[list[Msg]]) -> list[int]:
    log = Log()
    loader_with(log, batches, FakeWarehouse(log)).run(until_idle=0.05)
    return [len(e[2]) for e in log.events if e[0] == "insert"]


def test_an_empty_poll_hands_the_batch_over_unless_the_poll_before_was_full() -> None:
    b0 = TOPICS.bucket(0)

    def msgs(first: int, n: int) -> list[Msg]:
        return [Msg(b0, 0, first + i, GOOD) for i in range(n)]

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
        log, [[Msg(TOPICS.bucket(1), 0, 0, GOOD)]], FakeWarehouse(log, down=True), retry_backoff=(0.0,)
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
        Msg(b1, 0, 0, GOOD),
        Msg(b1, 0, 1, b"{nope"),
        Msg(b1, 0, 2, None),
        Msg(b1, 0, 3, refused),
        Msg(b1, 0, 4, GOOD + b"\n"),
    ]
    loader = loader_with(log, [batch], FakeWarehouse(log, bad={b"{nope", refused}))
    stats = loader.run(until_idle=0.05)
    letters = [e for e in log.events if e[0] == "dlq"]
    assert sorted((e[2], e[3]) for e in letters) == sorted(
        [(b"", "invalid-message"), (b"{nope", "invalid-message"), (refused, "warehouse-rejected")]
    )
    assert all(e[1] == TOPICS.dlq for e in letters)
    inserted = [v for e in log.events if e[0] == "insert" for v in e[2]]
    assert sorted(inserted) == sorted([GOOD, GOOD + b"\n"])
    commit = next(e for e in log.events if e[0] == "commit")
    assert commit == ("commit", ((b1, 0, 5),))
    assert max(log.events.index(e) for e in letters) < log.events.index(commit)
    assert (stats.dead_lettered, stats.committed) == (3, 5)
