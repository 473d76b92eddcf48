"""The load generator: deterministic per seed, Sequin-shaped, bad fraction honoured, content that exercises
the cleaning rules. The checks below re-derive everything from the produced bytes."""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from typing import Any

import pytest
from sequin_oracle import routable as decode
from sequin_oracle import valid_ts

from connectors.sequin import BadMessage
from connectors.sequin import decode as sequin_decode
from stream.loadgen import LoadgenConfig, LoadGenerator, generate
from stream.loadgen_producer import RateLimiter

TABLES = {"activityRelations", "members", "organizations", "repositories", "insightsProjects", "integrations"}
ACTIVITY_COLUMNS = {
    "activityId",
    "conversationId",
    "createdAt",
    "updatedAt",
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
    "timestamp",
    "sourceParentId",
    "channel",
    "sentimentScore",
    "gitInsertions",
    "gitDeletions",
    "score",
    "isContribution",
    "pullRequestReviewState",
}
METADATA_KEYS = {
    "table_schema",
    "table_name",
    "commit_timestamp",
    "commit_lsn",
    "commit_idx",
    "idempotency_key",
    "record_pks",
    "consumer",
    "database",
}


@pytest.fixture(scope="module")
def run() -> tuple[list[Any], LoadGenerator]:
    gen = LoadGenerator(LoadgenConfig(count=12_000, seed=7, segments=40, bad_fraction=0.05))
    return list(gen), gen


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a = list(generate(LoadgenConfig(count=800, seed=11)))
    b = list(generate(LoadgenConfig(count=800, seed=11)))
    c = list(generate(LoadgenConfig(count=800, seed=12)))
    assert a == b
    assert len(a) == LoadGenerator(LoadgenConfig(count=800, seed=11)).total
    assert a != c
    assert sum(x.topic == "activityRelations" for x in a) == 800


def test_config_is_validated() -> None:
    for bad in ({"count": -1}, {"count": 1, "segments": 0}, {"count": 1, "bad_fraction": 1.5}):
        with pytest.raises(ValueError):
            LoadgenConfig(**bad)


def test_reference_records_come_first_and_every_topic_is_fed(run: tuple[list[Any], LoadGenerator]) -> None:
    msgs, gen = run
    topics = [m.topic for m in msgs]
    first_activity = topics.index("activityRelations")
    assert set(topics[:first_activity]) == TABLES - {"activityRelations"}
    assert set(topics[first_activity:]) == {"activityRelations"}
    assert Counter(topics) == gen.summary.per_topic


def test_bad_fraction_honoured_and_every_good_message_is_sequin_shaped(run: tuple[list[Any], LoadGenerator]) -> None:
    msgs, gen = run
    acts = [m for m in msgs if m.topic == "activityRelations"]
    bad = [m for m in acts if decode(m.value) is None]
    assert len(bad) == gen.summary.bad_total
    assert 0.04 < len(bad) / len(acts) < 0.06
    assert {m.value for m in bad if m.value is None} == {None}  # tombstones are among them
    assert len(gen.summary.bad) >= 8  # many kinds of bad input
    # One vocabulary: loadgen counts each bad message under the class the router's decoder dead-letters it with.
    classes: Counter[str] = Counter()
    for m in bad:
        with pytest.raises(BadMessage) as caught:
            sequin_decode(m.value)
        classes[caught.value.error_class] += 1
    assert classes == gen.summary.bad
    for m in msgs:
        msg = decode(m.value) if m.topic == "activityRelations" else json.loads(m.value)
        if msg is None:
            continue
        assert set(msg) == {"action", "changes", "record", "metadata"}
        meta, rec = msg["metadata"], msg["record"]
        assert METADATA_KEYS <= set(meta)
        assert meta["table_name"] == m.topic and meta["table_schema"] == "public"
        assert valid_ts(meta["commit_timestamp"])
        if msg["action"] == "read":
            assert meta["commit_lsn"] is None and meta["commit_idx"] is None
        else:
            assert isinstance(meta["commit_lsn"], int) and isinstance(meta["commit_idx"], int)
        pk = rec["activityId"] if m.topic == "activityRelations" else rec["id"]
        assert m.key == pk.encode() and meta["record_pks"] == [pk]
        if msg["action"] == "update":
            assert isinstance(msg["changes"], dict) and "updatedAt" in msg["changes"]
            assert set(msg["changes"]) <= set(rec)
        else:
            assert msg["changes"] is None
        if m.topic == "activityRelations":
            assert set(rec) == ACTIVITY_COLUMNS
            assert rec["createdAt"] <= rec["updatedAt"]


def test_activity_messages_are_about_one_kilobyte(run: tuple[list[Any], LoadGenerator]) -> None:
    msgs, _ = run
    sizes = [len(m.value) for m in msgs if m.topic == "activityRelations" and decode(m.value)]
    assert 800 < statistics.mean(sizes) < 1600


def test_changes_hold_the_previous_values_of_each_row(run: tuple[list[Any], LoadGenerator]) -> None:
    """Replaying each row's history: an update's ``changes`` are the values the row had before it."""
    msgs, _ = run
    state: dict[str, dict[str, Any]] = {}
    kinds: Counter[str] = Counter()
    delivered: set[bytes] = set()
    for m in msgs:
        if m.topic != "activityRelations" or (msg := decode(m.value)) is None or m.value in delivered:
            continue  # bad input, or a duplicate delivery (at-least-once: the same bytes again)
        delivered.add(m.value)
        rec, key = msg["record"], m.key.decode()
        if msg["action"] == "update":
            prev = state[key]
            for col, old in msg["changes"].items():
                assert prev[col] == old, (key, col)
            assert rec["updatedAt"] > prev["updatedAt"]
            moved = set(msg["changes"]) - {"updatedAt"}
            kinds["move" if "segmentId" in moved else "timestamp" if "timestamp" in moved else "other"] += 1
        elif msg["action"] == "delete":
            assert state[key] == rec
            kinds["delete"] += 1
        state[key] = rec
    assert kinds["move"] > 50 and kinds["timestamp"] > 50 and kinds["delete"] > 100 and kinds["other"] > 300


def test_duplicates_and_backfill_reads(run: tuple[list[Any], LoadGenerator]) -> None:
    msgs, gen = run
    repeats = sum(n - 1 for n in Counter((m.topic, m.key, m.value) for m in msgs if m.value).values())
    assert repeats == gen.summary.duplicates > 200
    acts = [(m.key, m.value) for m in msgs if m.topic == "activityRelations" and decode(m.value)]
    reads = [json.loads(v) for _, v in acts if b'"action":"read"' in v]
    assert len(reads) > 1000


def test_content_covers_the_cleaning_rules(run: tuple[list[Any], LoadGenerator]) -> None:
    msgs, _ = run
    by_topic: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in msgs:
        msg = decode(m.value) if m.topic == "activityRelations" else json.loads(m.value)
        if msg is not None:
            by_topic[m.topic].append(msg)
    members = [x["record"] for x in by_topic["members"]]
    for flag in ("isBot", "isTeamMember", "isOrganization"):
        assert any((r["attributes"].get(flag) or {}).get("default") is True for r in members), flag
    places = {(x["record"]["location"], x["record"]["country"]) for x in by_topic["organizations"]}
    flat = {v for p in places for v in p}
    for needle in (
        "Bucharest, Romania",
        "Lagos, Nigeria",
        "Newark, New Jersey",
        "UK",
        "US",
        "South Korea",
        "Atlanta, Georgia, United States",
        "",
    ):
        assert needle in flat, needle
    projects = [x["record"] for x in by_topic["insightsProjects"]]
    assert any(not p["enabled"] for p in projects) and any(p["deletedAt"] for p in projects)
    repos = by_topic["repositories"]
    live = [x["record"] for x in repos if x["action"] != "delete"]
    for col in ("excluded", "archived"):
        assert any(r[col] for r in live), col
    assert any(not r["enabled"] for r in live) and any(r["deletedAt"] for r in live)
    pk_only = [x["record"] for x in repos if x["action"] == "delete"]
    assert pk_only and all(v is None for r in pk_only for k, v in r.items() if k != "id")
    gerrit_ids = {x["record"]["id"] for x in by_topic["integrations"] if x["record"]["platform"] == "gerrit"}
    assert any(r["sourceIntegrationId"] in gerrit_ids for r in live)
    channels = [x["record"]["channel"] or "" for x in by_topic["activityRelations"]]
    assert any("/q/project:" in c for c in channels)
    urls = {r["url"] for r in live}
    assert any(c not in urls and c.lower() in {u.lower() for u in urls} for c in channels)  # mixed case


def test_segment_sizes_are_skewed(run: tuple[list[Any], LoadGenerator]) -> None:
    msgs, _ = run
    sizes = Counter(
        msg["record"]["segmentId"]
        for m in msgs
        if m.topic == "activityRelations" and (msg := decode(m.value)) and msg["action"] == "insert"
    )
    ranked = sorted(sizes.values(), reverse=True)
    assert ranked[0] > 5 * statistics.median(ranked)


def test_rate_limiter_spaces_messages_without_real_sleeping() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(50.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(101):
        limiter.acquire()
    assert now[0] - 100.0 == pytest.approx(2.0)  # 100 intervals of 20 ms
    unlimited = RateLimiter(None, clock=lambda: 0.0, sleep=lambda s: slept.append(-1))
    before = len(slept)
    unlimited.acquire()
    assert len(slept) == before
