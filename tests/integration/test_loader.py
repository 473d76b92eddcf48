"""Loader end to end on the real broker and the embedded warehouse: Sequin messages on bucket and reference
topics become rows; deletes and retirements vanish from FINAL; replays change nothing; bad messages reach the
DLQ with a reason. Expected rows are computed here in Python from the messages themselves."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from kafkatools import create_topics, drain, unique, wait_until

from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from connectors.warehouse import EmbeddedWarehouse, WarehouseError
from stream.buckets import bucket_of, raw_table
from stream.loader import Loader, LoaderConfig, LoaderStats
from stream.schema import ensure_schema

N = 4
TEXT = (
    "activityId",
    "conversationId",
    "memberId",
    "objectMemberId",
    "objectMemberUsername",
    "organizationId",
    "parentId",
    "platform",
    "segmentId",
    "username",
    "sourceId",
    "type",
    "sourceParentId",
    "channel",
    "pullRequestReviewState",
)
NUMBERS = {"sentimentScore": -1, "gitInsertions": 0, "gitDeletions": 0, "score": -1, "isContribution": 0}
TIMES = ("createdAt", "updatedAt", "timestamp")


# --- an independent model of what the warehouse must hold -----------------------------------------------------


def ms(value: Any) -> int:
    """Unix milliseconds of an ISO-8601 text or integer microseconds, truncated."""
    if isinstance(value, int):
        return value // 1000
    dt = datetime.fromisoformat(value)
    return int(dt.timestamp()) * 1000 + dt.microsecond // 1000


def expected_row(record: dict[str, Any]) -> tuple[Any, ...]:
    out: list[Any] = [record.get(c) or "" for c in TEXT]
    for c, default in NUMBERS.items():
        v = record.get(c)
        out.append(default if v is None else int(v))
    out += [ms(record[c]) for c in TIMES]
    return tuple(out)


def live_rows(messages: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    """ReplacingMergeTree semantics written out: per sort key the highest (updatedAt ms, is delete) wins."""
    best: dict[tuple[Any, ...], tuple[tuple[int, int], dict[str, Any], bool]] = {}
    for msg in messages:
        rec = msg["record"]
        key = (
            rec["segmentId"],
            ms(rec["timestamp"]),
            rec["type"],
            rec["platform"],
            rec.get("channel") or "",
            rec["sourceId"],
        )
        deleted = msg["action"] == "delete"
        version = (ms(rec["updatedAt"]), int(deleted))
        if key not in best or version >= best[key][0]:
            best[key] = (version, rec, deleted)
    return {expected_row(rec) for _, rec, deleted in best.values() if not deleted}


ROW_SQL = (
    "SELECT "
    + ", ".join(TEXT + tuple(NUMBERS))
    + ", "
    + ", ".join(f"toUnixTimestamp64Milli({c})" for c in TIMES)
    + " FROM {t} FINAL"
)


# --- fixtures and helpers -------------------------------------------------------------------------------------


@pytest.fixture
def topics(bootstrap: str) -> TopicNames:
    names = TopicNames(prefix=unique("ld") + ".")
    create_topics(bootstrap, names.buckets(N) + list(names.references().values()) + [names.dlq], partitions=2)
    return names


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[EmbeddedWarehouse]:
    with EmbeddedWarehouse(tmp_path / "data") as wh:
        ensure_schema(wh, N)
        yield wh


def produce(bootstrap: str, items: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for topic, key, value, headers in items:
        p.produce(topic, key=key, value=value, headers=headers or None)
    assert p.flush(30) == 0


def load(
    bootstrap: str,
    topics: TopicNames,
    wh: EmbeddedWarehouse,
    expect_messages: int,
    group: str | None = None,
    max_rows: int = 1000,
) -> LoaderStats:
    """Run a loader in a thread until it has read and flushed ``expect_messages`` messages (deadline 60s)."""
    cfg = LoaderConfig(
        kafka=KafkaConnection.plain(bootstrap),
        buckets=N,
        group=group or unique("loader"),
        topics=topics,
        max_rows=max_rows,
        max_wait=0.3,
    )
    loader = Loader(cfg, wh)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            loader.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    try:
        wait_until(
            lambda: errors or loader.stats.committed >= expect_messages,
            60,
            f"{expect_messages} messages loaded and committed",
        )
    finally:
        loader.stop()
        t.join(30)
    assert not t.is_alive(), "the loader did not stop within 30s"
    if errors:
        raise errors[0]
    assert loader.stats.messages == expect_messages
    return loader.stats


def activity(seg: str, n: int, **over: Any) -> dict[str, Any]:
    rec = {
        "activityId": str(uuid.uuid4()),
        "segmentId": seg,
        "memberId": f"m{n}",
        "platform": "github",
        "type": "authored-commit",
        "channel": f"https://github.com/acme/r{n}",
        "sourceId": f"src{n}",
        "timestamp": "2025-05-01T12:00:00.123999Z",
        "createdAt": "2025-05-01T12:00:00.000000Z",
        "updatedAt": "2025-05-01T12:00:03.120000Z",
        "gitInsertions": 12,
        "gitDeletions": 3,
        "sentimentScore": None,
        "score": 2,
        "isContribution": True,
        "conversationId": None,
        "organizationId": "org1",
        "pullRequestReviewState": None,
    }
    rec.update(over)
    return rec


def change(
    action: str, record: dict[str, Any], commit_ts: str = "2025-06-01T00:00:00.000000Z", **meta: Any
) -> dict[str, Any]:
    return {
        "action": action,
        "changes": None,
        "record": record,
        "metadata": {
            "table_schema": "public",
            "table_name": "x",
            "commit_timestamp": commit_ts,
            "commit_lsn": 1,
            "commit_idx": 0,
            "idempotency_key": "k",
            **meta,
        },
    }


def on_topics(topics: TopicNames, msgs: list[dict[str, Any]]) -> list[tuple[str, bytes | None, bytes | None, Any]]:
    out = []
    for m in msgs:
        rec = m["record"]
        headers = [("bucketer-derived", b"retirement")] if m["metadata"].get("bucketer") else []
        out.append(
            (topics.bucket(bucket_of(rec["segmentId"], N)), rec["activityId"].encode(), orjson.dumps(m), headers)
        )
    return out


def final_rows(wh: EmbeddedWarehouse) -> dict[int, set[tuple[Any, ...]]]:
    return {n: set(wh.rows(ROW_SQL.format(t=raw_table(n)))) for n in range(N)}


# --- tests ----------------------------------------------------------------------------------------------------


def test_bucket_topics_to_raw_tables_deletes_retirements_and_replay(bootstrap, topics, warehouse) -> None:
    segs = [str(uuid.uuid4()) for _ in range(12)]
    msgs: list[dict[str, Any]] = []
    for i, seg in enumerate(segs):
        msgs.append(change("insert", activity(seg, i)))
    # Integer unix microseconds instead of ISO text, and a `read` (backfill) row.
    msgs.append(
        change(
            "read",
            activity(segs[0], 100, timestamp=1746100800987654, createdAt=1746100800000000, updatedAt=1746100801000999),
        )
    )
    # A plain delete, with the old row.
    gone = activity(segs[1], 101)
    msgs += [change("insert", gone), change("delete", gone)]
    # A router retirement of a row whose segment moved away.
    moved = activity(segs[2], 102)
    msgs += [
        change("insert", moved),
        change("delete", moved, bucketer={"derived": "retirement", "reason": "segment_move", "source": "t/0/1"}),
    ]
    # An update: a later updatedAt replaces the row; an older straggler arriving last does not.
    v1 = activity(segs[3], 103, score=1)
    v2 = dict(v1, score=5, updatedAt="2025-05-02T00:00:00.000000Z")
    msgs += [change("insert", v1), change("update", v2), change("insert", v1)]
    # A delete arriving before its insert (same updatedAt) still wins.
    early = activity(segs[4], 104)
    msgs += [change("delete", early), change("insert", early)]
    # Nulls and missing optional fields become defaults.
    bare = {
        k: v
        for k, v in activity(segs[5], 105).items()
        if k not in ("channel", "gitInsertions", "score", "isContribution", "organizationId")
    }
    msgs.append(change("insert", bare))

    produce(bootstrap, on_topics(topics, msgs))
    expected = live_rows(msgs)
    assert len(expected) == 12 + 3  # + read, v2 (replaced v1), bare; gone, moved and early are deleted
    by_bucket = {n: {r for r in expected if bucket_of(r[TEXT.index("segmentId")], N) == n} for n in range(N)}

    stats = load(bootstrap, topics, warehouse, len(msgs))
    assert stats.dead_lettered == 0
    assert final_rows(warehouse) == by_bucket
    # Spot checks in plain words: ms truncation and defaults.
    read_row = next(r for r in expected if r[TEXT.index("memberId")] == "m100")
    assert read_row[-1] == 1746100800987  # timestamp: .987654 -> .987
    bare_row = next(r for r in expected if r[TEXT.index("memberId")] == "m105")
    assert bare_row[len(TEXT) : len(TEXT) + 5] == (-1, 0, 3, -1, 0)

    # Replay everything twice more with fresh consumer groups: raw rows pile up, FINAL does not change.
    raw_before = sum(warehouse.rows(f"SELECT count() FROM {raw_table(n)}")[0][0] for n in range(N))
    load(bootstrap, topics, warehouse, len(msgs))
    load(bootstrap, topics, warehouse, len(msgs))
    raw_after = sum(warehouse.rows(f"SELECT count() FROM {raw_table(n)}")[0][0] for n in range(N))
    assert raw_after >= raw_before  # merges may fold duplicates; what matters is FINAL
    assert final_rows(warehouse) == by_bucket
    assert sum(warehouse.rows(f"SELECT count() FROM {raw_table(n)} FINAL")[0][0] for n in range(N)) == 15


def test_committed_offsets_resume_without_rereading(bootstrap, topics, warehouse) -> None:
    seg = str(uuid.uuid4())
    group = unique("loader")
    first = [change("insert", activity(seg, i)) for i in range(5)]
    produce(bootstrap, on_topics(topics, first))
    load(bootstrap, topics, warehouse, 5, group=group)
    second = [change("insert", activity(seg, i)) for i in range(5, 8)]
    produce(bootstrap, on_topics(topics, second))
    # The same group resumes after its committed offsets: exactly the 3 new messages are read.
    stats = load(bootstrap, topics, warehouse, 3, group=group)
    assert stats.messages == 3
    assert final_rows(warehouse)[bucket_of(seg, N)] == live_rows(first + second)


def ref(action: str, record: dict[str, Any], commit_ts: str = "2025-06-01T00:00:00.000000Z") -> dict[str, Any]:
    return change(action, record, commit_ts)


def test_reference_tables_flags_and_key_only_delete(bootstrap, topics, warehouse) -> None:
    t0 = "2025-01-01T00:00:00.000000Z"
    members = [
        {
            "id": "m-bot",
            "attributes": {"isBot": {"default": True, "github": True}},
            "displayName": "bot",
            "updatedAt": t0,
        },
        {"id": "m-team", "attributes": {"isTeamMember": {"default": True}}, "displayName": "t", "updatedAt": t0},
        {
            "id": "m-org",
            "attributes": {"isOrganization": {"default": True}, "isBot": {"default": False}},
            "displayName": "o",
            "updatedAt": t0,
        },
        {"id": "m-plain", "attributes": None, "displayName": "p", "joinedAt": None, "updatedAt": t0},
    ]
    repos = [
        {
            "id": "r1",
            "url": "https://github.com/a/b",
            "segmentId": "s1",
            "insightsProjectId": "p1",
            "enabled": True,
            "excluded": None,
            "archived": True,
            "deletedAt": None,
            "updatedAt": t0,
        },
        {
            "id": "r2",
            "url": "https://github.com/a/c",
            "segmentId": "s1",
            "insightsProjectId": "p1",
            "enabled": False,
            "updatedAt": t0,
        },
    ]
    r1_delete = {"id": "r1", **{k: None for k in repos[0] if k != "id"}}  # no REPLICA IDENTITY FULL
    projects = [
        {
            "id": "p1",
            "name": "Alpha",
            "slug": "alpha",
            "segmentId": str(uuid.uuid4()),
            "enabled": True,
            "deletedAt": None,
            "updatedAt": t0,
        },
        {
            "id": "p2",
            "name": "Beta",
            "slug": "beta",
            "segmentId": str(uuid.uuid4()),
            "enabled": False,
            "deletedAt": None,
            "updatedAt": t0,
        },
        {
            "id": "p3",
            "name": "Gamma",
            "slug": "gamma",
            "segmentId": str(uuid.uuid4()),
            "enabled": True,
            "deletedAt": "2025-01-02T00:00:00Z",
            "updatedAt": t0,
        },
    ]
    orgs = [{"id": "o1", "displayName": "Acme", "location": "Bucharest, Romania", "country": None, "updatedAt": t0}]
    integrations = [{"id": "i1", "platform": "gerrit", "segmentId": "s1", "deletedAt": None, "updatedAt": t0}]
    items: list[tuple[str, bytes | None, bytes | None, Any]] = []
    for table, recs in (
        ("members", members),
        ("repositories", repos),
        ("insightsProjects", projects),
        ("organizations", orgs),
        ("integrations", integrations),
    ):
        items += [(topics.reference(table), r["id"].encode(), orgjson(ref("insert", r)), []) for r in recs]
    items.append((topics.reference("repositories"), b"r1", orgjson(ref("delete", r1_delete)), []))
    produce(bootstrap, items)
    load(bootstrap, topics, warehouse, len(items))

    flags = set(warehouse.rows("SELECT id, isBot, isTeamMember, isOrganization FROM members FINAL"))
    assert flags == {("m-bot", 1, 0, 0), ("m-team", 0, 1, 0), ("m-org", 0, 0, 1), ("m-plain", 0, 0, 0)}
    assert (
        orjson.loads(warehouse.rows("SELECT attributes FROM members FINAL WHERE id = 'm-bot'")[0][0])
        == members[0]["attributes"]
    )
    assert warehouse.rows("SELECT id, enabled, excluded, archived FROM repositories FINAL") == [("r2", 0, 0, 0)]
    assert warehouse.rows("SELECT displayName, location, country FROM organizations FINAL") == [
        ("Acme", "Bucharest, Romania", "")
    ]
    assert warehouse.rows("SELECT platform FROM integrations FINAL") == [("gerrit",)]

    # project -> bucket: the enabled, not deleted project only, and the bucket is bucket_of its segment.
    alpha = warehouse.rows("SELECT bucketId, segmentId FROM project_buckets(project = 'alpha')")
    assert alpha == [(bucket_of(projects[0]["segmentId"], N), projects[0]["segmentId"])]
    for slug in ("beta", "gamma", "no-such-project"):
        assert warehouse.rows(f"SELECT bucketId FROM project_buckets(project = '{slug}')") == []


def orgjson(obj: Any) -> bytes:
    return orjson.dumps(obj)


def test_bad_messages_go_to_the_dlq_and_good_ones_are_loaded(bootstrap, topics, warehouse) -> None:
    seg = str(uuid.uuid4())
    topic = topics.bucket(bucket_of(seg, N))
    good = [change("insert", activity(seg, i)) for i in range(6)]
    no_id = change("insert", {k: v for k, v in activity(seg, 50).items() if k != "activityId"})
    bad_score = change("insert", activity(seg, 51, score="lots"))
    bad_time = change("insert", activity(seg, 52, timestamp="yesterday"))
    bad: list[tuple[bytes | None, str]] = [
        (b"{not json", "not JSON"),
        (b"", "tombstone"),
        (orjson.dumps(no_id), "activityId"),
        (orjson.dumps(bad_score), "score"),
        (orjson.dumps(bad_time), "timestamp"),
        (b'{"action":"insert","record":{}}{"a":1}', ""),
    ]
    items = [(topic, b"k", orjson.dumps(good[0]), [])]
    items += [(topic, b"bad", value, []) for value, _ in bad]
    items += [(topic, b"k", orjson.dumps(m), []) for m in good[1:]]
    produce(bootstrap, items)
    stats = load(bootstrap, topics, warehouse, len(items))

    assert stats.dead_lettered == len(bad)
    assert final_rows(warehouse)[bucket_of(seg, N)] == live_rows(good)
    letters = drain(bootstrap, [topics.dlq], expected=len(bad), timeout=30)
    assert len(letters) == len(bad)
    for letter in letters:
        headers = dict(letter.headers() or [])
        assert headers["bucketer-source-topic"] == topic.encode()
        assert int(headers["bucketer-source-offset"]) >= 1
        assert headers["bucketer-error-detail"]
    values = sorted(letter.value() or b"" for letter in letters)
    assert values == sorted(v or b"" for v, _ in bad)
    details = {letter.value(): dict(letter.headers())["bucketer-error-detail"].decode() for letter in letters}
    for value, word in bad:
        assert word in details[value or b""], (value, details[value or b""])


def test_routing_view_rejects_invalid_bucket_ids(warehouse) -> None:
    for n in range(N):
        assert warehouse.rows(f"SELECT count() FROM activityRelations_bucket_routing(bucketId = {n})") == [(0,)]
    for bad in (N, -1, 1000):
        with pytest.raises(WarehouseError, match="invalid bucketId"):
            warehouse.rows(f"SELECT count() FROM activityRelations_bucket_routing(bucketId = {bad})")


def test_routing_view_reads_the_named_bucket_only(warehouse) -> None:
    from stream.buckets import cleaned_table
    from stream.schema import ACTIVITY_NAMES, CLEANED_EXTRA

    cols = list(ACTIVITY_NAMES) + [c[0] for c in CLEANED_EXTRA]
    now = datetime(2025, 1, 1, tzinfo=UTC)
    for n in range(N):
        row = {c: "" for c in cols} | {
            "createdAt": now,
            "updatedAt": now,
            "timestamp": now,
            "snapshotId": now,
            "activityId": f"a{n}",
            "sentimentScore": 0,
            "gitInsertions": 0,
            "gitDeletions": 0,
            "score": 0,
            "isContribution": 0,
            "gitChangedLines": 0,
        }
        # distinct raw identities (sourceId): the cleaned bucket keeps one row per identity
        warehouse.insert(
            cleaned_table(n), cols, [[(row | {"sourceId": f"s{i}"})[c] for c in cols] for i in range(n + 1)]
        )
    for n in range(N):
        assert warehouse.rows(
            f"SELECT DISTINCT activityId, count() OVER () FROM activityRelations_bucket_routing(bucketId = {n})"
        ) == [(f"a{n}", n + 1)]
    assert warehouse.rows("SELECT count() FROM activityRelations_deduplicated_cleaned_bucket_union") == [
        (sum(range(1, N + 1)),)
    ]


class DownWarehouse:
    """A warehouse that has gone away: every call fails."""

    def __init__(self, real: EmbeddedWarehouse) -> None:
        self.real = real
        self.calls = 0

    def insert_json(self, table: str, select: str, data: Any) -> None:
        self.calls += 1
        raise WarehouseError("connection refused (simulated)")

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        raise WarehouseError("connection refused (simulated)")


def test_nothing_is_committed_when_the_warehouse_is_down(bootstrap, topics, warehouse) -> None:
    from confluent_kafka import Consumer, TopicPartition

    from stream.loader import WarehouseUnavailable

    seg = str(uuid.uuid4())
    msgs = [change("insert", activity(seg, i)) for i in range(4)]
    produce(bootstrap, on_topics(topics, msgs))
    group = unique("loader")
    down = DownWarehouse(warehouse)
    cfg = LoaderConfig(
        kafka=KafkaConnection.plain(bootstrap),
        buckets=N,
        group=group,
        topics=topics,
        max_wait=0.3,
        retry_backoff=(0.1, 0.1),
    )
    with pytest.raises(WarehouseUnavailable):
        Loader(cfg, down).run(until_idle=30)  # type: ignore[arg-type]
    assert down.calls == 3  # the first try and two retries, then it gives up without committing
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        topic = topics.bucket(bucket_of(seg, N))
        committed = probe.committed([TopicPartition(topic, p) for p in range(2)], timeout=10)
    finally:
        probe.close()
    assert all(tp.offset < 0 for tp in committed), committed  # no offset stored for the group
    assert final_rows(warehouse)[bucket_of(seg, N)] == set()
    # The same group against a working warehouse gets every message again.
    stats = load(bootstrap, topics, warehouse, len(msgs), group=group)
    assert stats.dead_lettered == 0
    assert final_rows(warehouse)[bucket_of(seg, N)] == live_rows(msgs)


class Recording:
    """The embedded warehouse, recording every statement the loader runs through it."""

    def __init__(self, real: EmbeddedWarehouse) -> None:
        self.real = real
        self.statements: list[str] = []

    def command(self, sql: str, params: Any = None) -> None:
        self.statements.append(sql)
        self.real.command(sql, params)

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.real.rows(sql, params)

    def insert_json(self, table: str, select: str, data: Any) -> None:
        self.statements.append(f"INSERT INTO {table} {select}")
        self.real.insert_json(table, select, data)

    def json_parts(self, parts: Any) -> Any:
        return self.real.json_parts(parts)

    def parses(self) -> int:
        return sum("JSONExtract" in s for s in self.statements)


def segments_in_every_bucket() -> list[str]:
    segs: dict[int, str] = {}
    while len(segs) < N:
        seg = str(uuid.uuid4())
        segs.setdefault(bucket_of(seg, N), seg)
    return [segs[b] for b in range(N)]


def test_a_batch_over_several_buckets_is_parsed_once(bootstrap, topics, warehouse) -> None:
    msgs = [change("insert", activity(seg, i)) for seg in segments_in_every_bucket() for i in range(5)]
    produce(bootstrap, on_topics(topics, msgs))
    rec = Recording(warehouse)
    stats = load(bootstrap, topics, rec, len(msgs), max_rows=10_000)  # type: ignore[arg-type]

    for b, rows in final_rows(warehouse).items():
        assert rows == live_rows([m for m in msgs if bucket_of(m["record"]["segmentId"], N) == b])
    assert rec.parses() == stats.flushes  # one JSON parse per flush, however many buckets it spans
    fanned = [s for s in rec.statements if s.startswith("INSERT INTO activityRelations_bucket_") and "_part = " in s]
    assert len(fanned) >= 2  # at least one flush took several bucket tables from the stage
    assert stats.inserted == {raw_table(b): 5 for b in range(N)}


def test_a_bad_message_in_a_several_bucket_batch_is_found_and_the_rest_loaded(bootstrap, topics, warehouse) -> None:
    segs = segments_in_every_bucket()
    good = [change("insert", activity(seg, i)) for seg in segs for i in range(3)]
    bad = change("insert", activity(segs[2], 9, timestamp="yesterday"))
    items = on_topics(topics, good[:6]) + on_topics(topics, [bad]) + on_topics(topics, good[6:])
    produce(bootstrap, items)
    rec = Recording(warehouse)
    stats = load(bootstrap, topics, rec, len(items), max_rows=10_000)  # type: ignore[arg-type]

    assert stats.dead_lettered == 1
    for b, rows in final_rows(warehouse).items():
        assert rows == live_rows([m for m in good if bucket_of(m["record"]["segmentId"], N) == b])
    (letter,) = drain(bootstrap, [topics.dlq], expected=1, timeout=30)
    assert letter.value() == orjson.dumps(bad)
    assert b"timestamp" in dict(letter.headers() or [])["bucketer-error-detail"]
