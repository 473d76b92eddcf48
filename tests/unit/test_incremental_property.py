"""Property: whatever the interleaving of the six tables' changes, the maintained cleaned buckets equal a full
rebuild at every quiescent point.

A real chdb warehouse (one per module, tables truncated between examples), no Kafka: each batch lands through
the loader's own write path (``Loader._write``: the same parsing SQL, the one-parse fan-out to several bucket
tables), then ``Maintainer.correct`` runs (what the loader's ``after_flush`` hook does). Some batches land
without a correction (a crash between landing and correcting), so one correction may cover several batches.
At each quiescent point every cleaned bucket read FINAL must equal, row for row on every column but snapshotId,
the cleaning rules run in full over the raw bucket with prepare_reference's full reference sets (the rebuild).
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from connectors.warehouse import EmbeddedWarehouse
from stream import incremental
from stream.buckets import bucket_of, cleaned_table, raw_table
from stream.cleaning import cleaning_select, drop_reference, prepare_reference, refresh_country_codes
from stream.incremental import Maintainer
from stream.loader import Loader, LoaderConfig, _Pending
from stream.schema import CLEANED_NAMES, REFERENCE_COLUMNS, UNION_VIEW, ensure_schema

N = 2
TOPICS = TopicNames()
TOAST = "unchanged_toast"


def _segments() -> list[str]:
    found: list[str] = []
    want = [0, 0, 1]
    i = 0
    while want:
        sid = f"7c1d0000-0000-4000-8000-{i:012d}"
        if bucket_of(sid, N) == want[0]:
            found.append(sid)
            want.pop(0)
        i += 1
    return found


SEGMENTS = _segments()  # two in bucket 0, one in bucket 1: segment moves within and across buckets
REPO_URLS = [
    "https://github.com/acme/a",
    "https://GitHub.com/Acme/A",
    "https://gerrit.example.org/r/proj",
    "https://review.x.org/gerrit/b",
    "https://git.y.org/c",
]
CHANNELS = [
    "https://github.com/acme/a",
    "https://GITHUB.com/acme/A",
    "https://gerrit.example.org/r/proj",
    "https://gerrit.example.org/r/q/project:proj",
    "https://review.x.org/gerrit/q/project:b",
    "https://git.y.org/q/project:c",
    "https://git.y.org/c",
    "#general",
]
MEMBERS = ["m0", "m1", "m2"]
ORGS = ["o0", "o1", ""]
REPOS = ["r0", "r1", "r2"]
PROJECTS = ["p0", "p1"]
INTEGRATIONS = ["i0", "i1"]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STAMPS = [T0 + timedelta(hours=h) for h in range(2)]


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


# --- the operations ------------------------------------------------------------------------------------------

REAL = (False, False, False)
MOSTLY_TRUE = st.sampled_from([True, True, False])
MOSTLY_FALSE = st.sampled_from([False, False, True])

activity = st.fixed_dictionaries(
    {
        "segmentId": st.sampled_from(SEGMENTS),
        "timestamp": st.sampled_from(STAMPS),
        "type": st.sampled_from(["authored-commit", "comment"]),
        "platform": st.sampled_from(["github", "gerrit", "git", "slack", "slack"]),
        "channel": st.sampled_from(CHANNELS),
        "sourceId": st.sampled_from(["s0", "s1"]),
        "memberId": st.sampled_from(MEMBERS[:2]),
        "organizationId": st.sampled_from(ORGS),
        "gitInsertions": st.sampled_from([0, 5, 70, 600]),
        "gitDeletions": st.sampled_from([0, 3]),
        "username": st.sampled_from(["u1", "u2"]),
    }
)
ACTIVITY_OP = st.tuples(
    st.just("activity"), st.sampled_from(["insert", "update", "read", "update", "delete"]), activity
)
MEMBER_OP = st.tuples(
    st.just("members"),
    st.sampled_from(MEMBERS),
    st.sampled_from(["insert", "update", "update", "delete"]),
    st.sampled_from([REAL, REAL, REAL, (True, False, False), (False, True, False), (False, False, True)]),
)
ops = st.one_of(
    ACTIVITY_OP,
    ACTIVITY_OP,
    ACTIVITY_OP,
    MEMBER_OP,
    MEMBER_OP,
    st.tuples(st.just("move"), st.integers(0, 50), st.sampled_from(SEGMENTS), st.sampled_from(STAMPS)),
    st.tuples(
        st.just("organizations"),
        st.sampled_from(ORGS[:2]),
        st.sampled_from(["insert", "update", "delete"]),
        st.sampled_from(["Acme", "Acme Inc", "Globex"]),
        st.sampled_from(["", "Romania", "US", "Germany"]),
        st.sampled_from(["", "Bucharest, Romania", "Newark, New Jersey"]),
    ),
    st.tuples(
        st.just("repositories"),
        st.sampled_from(REPOS),
        st.sampled_from(["insert", "update", "update", "delete"]),
        st.sampled_from(REPO_URLS),
        st.sampled_from(SEGMENTS),
        st.sampled_from(PROJECTS),
        st.sampled_from(INTEGRATIONS),
        MOSTLY_TRUE,  # enabled
        MOSTLY_FALSE,  # soft-deleted
    ),
    st.tuples(
        st.just("insightsProjects"),
        st.sampled_from(PROJECTS),
        st.sampled_from(["insert", "update", "delete"]),
        MOSTLY_TRUE,
        MOSTLY_FALSE,
    ),
    st.tuples(
        st.just("integrations"),
        st.sampled_from(INTEGRATIONS),
        st.sampled_from(["insert", "update", "delete"]),
        st.sampled_from(["github", "gerrit"]),
    ),
    st.tuples(st.just("replay"), st.integers(0, 60)),
)
# Rounds of a few changes, each ending in a quiescent point, or only landed (a crash before the correction):
# references then change after the activities they affect, and back.
rounds = st.lists(
    st.tuples(st.lists(ops, min_size=1, max_size=6), st.sampled_from(["quiesce", "quiesce", "quiesce", "land"])),
    min_size=1,
    max_size=7,
).map(lambda rs: [op for changes, end in rs for op in [*changes, (end,)]])


class Scenario:
    """Turns operations into Sequin messages (per target table) with ever-increasing updatedAt."""

    def __init__(self) -> None:
        self.clock = itertools.count(1)
        self.sent: list[tuple[str, bytes]] = []
        self.activities: list[dict[str, Any]] = []
        self.batch: dict[str, list[bytes]] = {}

    def now(self) -> datetime:
        return T0 + timedelta(days=10, milliseconds=next(self.clock))

    def emit(
        self, table: str, action: str, record: dict[str, Any], at: datetime, sent: bool = True, changes: Any = None
    ) -> None:
        meta = {"table_name": table, "commit_timestamp": iso(at)}
        value = orjson.dumps({"action": action, "record": record, "changes": changes, "metadata": meta})
        self.batch.setdefault(table, []).append(value)
        if sent:
            self.sent.append((table, value))

    @staticmethod
    def activity_record(a: dict[str, Any], at: datetime) -> dict[str, Any]:
        return {
            "activityId": f"act-{a['sourceId']}-{a['channel'][-3:]}",
            "createdAt": iso(T0),
            "updatedAt": iso(at),
            "timestamp": iso(a["timestamp"]),
            "score": 1,
            "isContribution": True,
            **{k: v for k, v in a.items() if k != "timestamp"},
        }

    def activity(self, action: str, a: dict[str, Any], at: datetime) -> None:
        self.emit(raw_table(bucket_of(a["segmentId"], N)), action, self.activity_record(a, at), at)

    def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        at = self.now()
        created = iso(T0)
        if kind == "activity":
            _, action, a = op
            self.activities.append(a)
            self.activity(action, a, at)
        elif kind == "move" and self.activities:
            # The router's retirement: a delete of the old identity (old bucket), the new row in the new bucket.
            old = self.activities[op[1] % len(self.activities)]
            new = {**old, "segmentId": op[2], "timestamp": op[3]}
            self.activity("delete", old, at)
            self.activity("update", new, at)
            self.activities.append(new)
        elif kind == "members":
            _, mid, action, (bot, team, org) = op
            attrs = {"isBot": {"default": bot}, "isTeamMember": {"default": team}, "isOrganization": {"default": org}}
            rec = {"id": mid, "attributes": attrs, "displayName": mid, "joinedAt": created, "createdAt": created}
            self.emit("members", action, {**rec, "updatedAt": iso(at)}, at)
        elif kind == "organizations":
            _, oid, action, name, country, location = op
            rec = {"id": oid, "displayName": name, "country": country, "location": location, "createdAt": created}
            self.emit("organizations", action, {**rec, "updatedAt": iso(at)}, at)
        elif kind == "repositories":
            _, rid, action, url, seg, project, integration, enabled, deleted = op
            if action == "delete":  # a repositories delete carries only its primary key
                self.emit("repositories", "delete", {"id": rid}, at)
                return
            rec = {
                "id": rid,
                "url": url,
                "segmentId": seg,
                "insightsProjectId": project,
                "sourceIntegrationId": integration,
                "enabled": enabled,
                "excluded": False,
                "archived": deleted,
                "deletedAt": iso(T0) if deleted else None,
                "createdAt": created,
                "updatedAt": iso(at),
            }
            self.emit("repositories", action, rec, at)
        elif kind == "insightsProjects":
            _, pid, action, enabled, deleted = op
            rec = {
                "id": pid,
                "name": pid,
                "slug": pid,
                "segmentId": SEGMENTS[0],
                "enabled": enabled,
                "deletedAt": iso(T0) if deleted else None,
                "createdAt": created,
                "updatedAt": iso(at),
            }
            self.emit("insightsProjects", action, rec, at)
        elif kind == "integrations":
            _, iid, action, platform = op
            rec = {"id": iid, "platform": platform, "segmentId": SEGMENTS[0], "createdAt": created}
            self.emit("integrations", action, {**rec, "updatedAt": iso(at)}, at)
        # Sequin without REPLICA IDENTITY FULL (../shared/spec/SEQUIN.md): an unchanged TOASTed column arrives as
        # "unchanged_toast", an update carries changes {}, a delete only the primary key.
        elif kind == "member_toast":  # a member update that left attributes unchanged
            _, mid, name = op
            rec = {"id": mid, "attributes": TOAST, "displayName": name, "joinedAt": created, "createdAt": created}
            self.emit("members", "update", {**rec, "updatedAt": iso(at)}, at, changes={})
        elif kind == "repo_toast":  # repository r0 re-enabled, its url unchanged
            _, enabled = op
            rec = {"id": "r0", "url": TOAST, "segmentId": SEGMENTS[0], "insightsProjectId": "p0"}
            rec |= {"sourceIntegrationId": "i0", "enabled": enabled, "excluded": False, "archived": False}
            rec |= {"deletedAt": None, "createdAt": created, "updatedAt": iso(at)}
            self.emit("repositories", "update", rec, at, changes={})
        elif kind == "activity_toast" and self.activities:  # an update that left the channel unchanged
            a = self.activities[op[1] % len(self.activities)]
            rec = self.activity_record({**a, "username": "u9"}, at)
            self.emit(raw_table(bucket_of(a["segmentId"], N)), "update", {**rec, "channel": TOAST}, at, changes={})
        elif kind == "activity_key_delete" and self.activities:  # the router sends it to the resolve topic
            a = self.activities[op[1] % len(self.activities)]
            self.emit("resolve", "delete", {"activityId": self.activity_record(a, at)["activityId"]}, at)
        elif kind == "replay" and self.sent:
            table, value = self.sent[op[1] % len(self.sent)]
            self.batch.setdefault(table, []).append(value)

    def take(self) -> dict[str, list[bytes]]:
        batch, self.batch = self.batch, {}
        return batch


# --- the warehouse -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wh() -> Iterator[EmbeddedWarehouse]:
    folder = Path(tempfile.mkdtemp(prefix="bucketer-incr-"))
    try:
        with EmbeddedWarehouse(folder) as w:
            ensure_schema(w, N)
            Maintainer(N).setup(w)
            yield w
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def truncate_all(w: EmbeddedWarehouse) -> None:
    tables = w.rows(
        "SELECT name FROM system.tables WHERE database = currentDatabase() AND engine NOT IN "
        "('View', 'MaterializedView') AND NOT startsWith(name, 'bucketer_cleaned_work_') "
        "AND name != 'bucketer_settings'"
    )
    for (name,) in tables:
        w.command(f"TRUNCATE TABLE `{name}`")


def land(w: EmbeddedWarehouse, loader: Loader, batch: dict[str, list[bytes]]) -> None:
    topic = {raw_table(n): TOPICS.bucket(n) for n in range(N)} | {t: TOPICS.reference(t) for t in REFERENCE_COLUMNS}
    topic["resolve"] = TOPICS.resolve
    pending = {}
    for table, values in batch.items():
        p = _Pending(topic[table])
        for i, v in enumerate(values):
            p.values.append(v)
            p.keys.append(None)
            p.partitions.append(0)
            p.offsets.append(i)
        pending[table] = p
    loader._write(pending)


VISIBLE = [c for c in CLEANED_NAMES if c != "snapshotId"]


def maintained(w: EmbeddedWarehouse, n: int) -> list[tuple[Any, ...]]:
    cols = ", ".join(f"`{c}`" for c in VISIBLE)
    return sorted(w.rows(f"SELECT {cols} FROM {cleaned_table(n)} FINAL"), key=repr)


def check(w: EmbeddedWarehouse) -> None:
    refresh_country_codes(w)
    ref = prepare_reference(w)
    try:
        cols = ", ".join(f"`{c}`" for c in VISIBLE)
        for n in range(N):
            sql = f"SELECT {cols} FROM ({cleaning_select(raw_table(n), ref)})"
            full = sorted(w.rows(sql, {"snapshot": "2026-01-01 00:00:00"}), key=repr)
            assert maintained(w, n) == full, f"bucket {n}"
    finally:
        drop_reference(w, ref)
    union = w.rows(
        f"SELECT count(), uniqExact(segmentId, timestamp, type, platform, channel, sourceId) FROM {UNION_VIEW}"
    )
    assert union[0][0] == union[0][1] == sum(len(maintained(w, n)) for n in range(N))


def run(w: EmbeddedWarehouse, steps: list[tuple[Any, ...]]) -> list[int]:
    """Play ``steps`` from empty tables; checks every quiescent point; returns the cleaned row counts there."""
    truncate_all(w)
    maintainer = Maintainer(N)
    maintainer.setup(w)
    loader = Loader(LoaderConfig(kafka=KafkaConnection.plain("localhost:1"), buckets=N), w)
    scenario = Scenario()
    counts = []
    try:
        for op in [*steps, ("quiesce",)]:
            if op[0] in ("land", "quiesce"):
                land(w, loader, scenario.take())
                if op[0] == "quiesce":
                    maintainer.correct(w)
                    check(w)
                    counts.append(sum(len(maintained(w, n)) for n in range(N)))
            else:
                scenario.apply(op)
        # The reconciliation finds nothing to fix.
        assert [maintainer.reconcile(w, n) for n in range(N)] == [0] * N
    finally:
        maintainer.close(w)
    return counts


def base() -> list[tuple[Any, ...]]:
    """A populated start: real members, coded organizations, enabled projects and repositories (one gerrit)."""
    out: list[tuple[Any, ...]] = [("members", m, "insert", REAL) for m in MEMBERS]
    out += [
        ("organizations", "o0", "insert", "Acme", "Romania", ""),
        ("organizations", "o1", "insert", "Globex", "", ""),
    ]
    out += [("insightsProjects", p, "insert", True, False) for p in PROJECTS]
    out += [("integrations", "i0", "insert", "github"), ("integrations", "i1", "insert", "gerrit")]
    out += [
        ("repositories", "r0", "insert", REPO_URLS[0], SEGMENTS[0], "p0", "i0", True, False),
        ("repositories", "r1", "insert", REPO_URLS[2], SEGMENTS[0], "p0", "i1", True, False),
        ("repositories", "r2", "insert", REPO_URLS[4], SEGMENTS[2], "p1", "i0", True, False),
    ]
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ACTIVITY_OP, min_size=2, max_size=8), st.booleans(), rounds)
def test_maintained_buckets_equal_a_full_rebuild(
    wh: EmbeddedWarehouse, first: list[tuple[Any, ...]], refs_first: bool, steps: list[tuple[Any, ...]]
) -> None:
    # Activities first and their references in a later batch, or the other way round; then random rounds.
    start = [*base(), ("quiesce",), *first] if refs_first else [*first, ("quiesce",), *base()]
    run(wh, [*start, ("quiesce",), *steps])


# --- directed interleavings: each reference change after its activities, with the expected row counts --------

Q = ("quiesce",)


def act(**over: Any) -> tuple[Any, ...]:
    a = {
        "segmentId": SEGMENTS[0],
        "timestamp": STAMPS[0],
        "type": "comment",
        "platform": "slack",
        "channel": "#general",
        "sourceId": "s0",
        "memberId": "m0",
        "organizationId": "",
        "gitInsertions": 5,
        "gitDeletions": 0,
        "username": "u1",
    }
    return ("activity", over.pop("action", "insert"), {**a, **over})


def member(mid: str = "m0", flags: tuple[bool, bool, bool] = REAL, action: str = "update") -> tuple[Any, ...]:
    return ("members", mid, action, flags)


def repo(url: str, *, enabled: bool = True, action: str = "update", integration: str = "i0") -> tuple[Any, ...]:
    return ("repositories", "r0", action, url, SEGMENTS[0], "p0", integration, enabled, False)


PROJECT = ("insightsProjects", "p0", "insert", True, False)
GITHUB = "https://github.com/acme/a"
GERRIT = "https://gerrit.example.org/r/proj"

DIRECTED = {
    # the member arrives after its activity, becomes a bot, a real person again, is deleted
    "member_flips": (
        [act(), Q, member(action="insert"), Q, member(flags=(True, False, False)), Q, member(), Q]
        + [member(flags=(False, False, True)), Q, member(), Q, member(action="delete"), Q],
        [0, 1, 0, 1, 0, 1, 0, 0],
    ),
    # a git activity whose repository is enabled, disabled, enabled, moved to another url, deleted
    "repository_changes": (
        [member(), PROJECT, act(platform="github", channel="https://GITHUB.com/acme/A"), Q, repo(GITHUB), Q]
        + [repo(GITHUB, enabled=False), Q, repo(GITHUB), Q, repo("https://git.y.org/c"), Q, repo(GITHUB), Q]
        + [("repositories", "r0", "delete", GITHUB, SEGMENTS[0], "p0", "i0", True, False), Q],
        [0, 1, 0, 1, 0, 1, 0, 0],
    ),
    # a gerrit integration appears: the query-URL variant becomes allowed; then the project is disabled
    "gerrit_and_project": (
        [member(), PROJECT, ("integrations", "i0", "insert", "github"), repo(GERRIT)]
        + [act(platform="gerrit", channel="https://gerrit.example.org/r/q/project:proj"), Q]
        + [("integrations", "i0", "update", "gerrit"), Q, ("insightsProjects", "p0", "update", False, False), Q]
        + [("insightsProjects", "p0", "update", True, False), Q, ("integrations", "i0", "delete", "gerrit"), Q],
        [0, 1, 0, 1, 0, 0],
    ),
    # an organization renamed, its country changed, deleted (name '' and code XX), all after its activities
    "organization_changes": (
        [member(), act(organizationId="o0"), act(organizationId="o1", sourceId="s1"), Q]
        + [("organizations", "o0", "insert", "Acme", "Romania", ""), Q]
        + [("organizations", "o0", "update", "Globex", "", "Newark, New Jersey"), Q]
        + [("organizations", "o0", "delete", "Globex", "", ""), Q],
        [2, 2, 2, 2, 2],
    ),
    # segment moves within bucket 0 and into bucket 1 (retirement + insert), landed before one correction
    "segment_moves": (
        [member(), act(), Q, ("move", 0, SEGMENTS[1], STAMPS[0]), ("land",), ("move", 1, SEGMENTS[2], STAMPS[1])]
        + [("land",), Q, act(action="delete", segmentId=SEGMENTS[2], timestamp=STAMPS[1]), Q],
        [1, 1, 0, 0],
    ),
    # Sequin without REPLICA IDENTITY FULL: the repository re-enabled with its url "unchanged_toast" (the row
    # comes back only if the stored url is taken), the member's attributes "unchanged_toast" after it turned bot
    # (stays a bot), the activity's channel "unchanged_toast" (stays a git row of an enabled repository), then a
    # delete holding only the activityId
    "without_replica_identity_full": (
        [member(), PROJECT, act(platform="github", channel="https://GITHUB.com/acme/A"), Q, repo(GITHUB), Q]
        + [repo(GITHUB, enabled=False), Q, ("repo_toast", True), Q, member(flags=(True, False, False)), Q]
        + [("member_toast", "m0", "renamed"), Q, member(), Q, ("activity_toast", 0), Q, ("activity_key_delete", 0), Q],
        [0, 1, 0, 1, 0, 0, 1, 1, 0, 0],
    ),
    # a replayed older version and a duplicate change leave the newest in place
    "replays": (
        [member(), act(gitInsertions=5), Q, act(gitInsertions=600), Q, ("replay", 1), ("replay", 1), Q]
        + [member(flags=(False, True, False)), Q, ("replay", 0), Q],
        [1, 1, 1, 0, 0, 0],
    ),
}


@pytest.mark.parametrize("name", list(DIRECTED))
def test_directed_interleavings(wh: EmbeddedWarehouse, name: str) -> None:
    steps, counts = DIRECTED[name]
    assert run(wh, steps) == counts


def test_a_correction_killed_halfway_converges_after_a_restart(
    wh: EmbeddedWarehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reference changes land, the correction dies after bucket 0 (nothing recorded for bucket 1 or the
    reference watermark): a restarted maintainer corrects everything, and the old url is still known."""
    truncate_all(wh)
    first = Maintainer(N)
    first.setup(wh)
    loader = Loader(LoaderConfig(kafka=KafkaConnection.plain("localhost:1"), buckets=N), wh)
    scenario = Scenario()
    for op in base():
        scenario.apply(op)
    for i, seg in enumerate(SEGMENTS):
        for m in ("m0", "m1"):
            scenario.apply(act(segmentId=seg, memberId=m, sourceId=f"{m}-{i}"))
            scenario.apply(act(segmentId=seg, memberId=m, sourceId=f"{m}-{i}", platform="github", channel=GITHUB))
    land(wh, loader, scenario.take())
    first.correct(wh)
    check(wh)
    before = [len(maintained(wh, n)) for n in range(N)]
    assert all(before)

    scenario.apply(member("m0", flags=(True, False, False)))
    scenario.apply(("repositories", "r0", "update", REPO_URLS[4], SEGMENTS[0], "p0", "i0", True, False))
    land(wh, loader, scenario.take())
    real = Maintainer._publish_bucket
    published = []

    def dies_at_bucket_1(self: Maintainer, w: Any, n: int, rows: int) -> Any:
        if n == 1:  # bucket 0's correction is in, bucket 1's and the rest are not, no watermark has moved
            raise RuntimeError("killed")
        published.append(n)
        return real(self, w, n, rows)

    monkeypatch.setattr(Maintainer, "_publish_bucket", dies_at_bucket_1)
    with pytest.raises(RuntimeError, match="killed"):
        first.correct(wh)
    assert published == [0]
    monkeypatch.undo()
    first.close(wh)

    restarted = Maintainer(N)
    restarted.setup(wh)
    restarted.correct(wh)
    check(wh)
    after = [len(maintained(wh, n)) for n in range(N)]
    assert all(0 < a < b for a, b in zip(after, before, strict=True))
    assert [restarted.reconcile(wh, n) for n in range(N)] == [0] * N
    restarted.close(wh)


def test_a_bulk_landing_is_reconciled_in_full(wh: EmbeddedWarehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past BULK_ROWS queued rows a bucket is reconciled instead of corrected: the same rows either way."""
    monkeypatch.setattr(incremental, "BULK_ROWS", 1)
    calls = []
    everything = Maintainer._reconcile_everything
    monkeypatch.setattr(Maintainer, "_reconcile_everything", lambda self, *a: calls.append(a) or everything(self, *a))
    for name in ("segment_moves", "member_flips", "gerrit_and_project", "repository_changes"):
        steps, counts = DIRECTED[name]
        assert run(wh, steps) == counts
    assert calls  # a bulk of reference changes took the full path too


def test_reconciliation_repairs_a_drifted_bucket(wh: EmbeddedWarehouse) -> None:
    """A changed row, a row missing and a row too many: the reconciliation counts 3, fixes them, then counts 0."""
    truncate_all(wh)
    maintainer = Maintainer(N)
    maintainer.setup(wh)
    loader = Loader(LoaderConfig(kafka=KafkaConnection.plain("localhost:1"), buckets=N), wh)
    scenario = Scenario()
    for op in [member(action="insert"), *(act(sourceId=f"s{i}") for i in range(3))]:
        scenario.apply(op)
    land(wh, loader, scenario.take())
    maintainer.correct(wh)
    check(wh)
    assert len(maintained(wh, 0)) == 3
    cols = ", ".join(f"`{c}`" for c in CLEANED_NAMES)
    now = "toUInt64(toUnixTimestamp64Nano(now64(9)))"
    t = cleaned_table(0)
    changed = (
        f"SELECT * REPLACE ('Wrong' AS organizationName) FROM (SELECT {cols} FROM {t} FINAL WHERE sourceId = 's0')"
    )
    wh.command(f"INSERT INTO {t} SELECT *, 0, {now} FROM ({changed})")
    wh.command(f"INSERT INTO {t} SELECT {cols}, 1, {now} FROM {t} FINAL WHERE sourceId = 's1'")
    ghost = f"SELECT * REPLACE ('ghost' AS sourceId) FROM (SELECT {cols} FROM {t} FINAL WHERE sourceId = 's2')"
    wh.command(f"INSERT INTO {t} SELECT *, 0, {now} FROM ({ghost})")
    assert len(maintained(wh, 0)) == 3
    with pytest.raises(AssertionError):  # the drift is real
        check(wh)
    assert maintainer.reconcile(wh, 0) == 3
    check(wh)
    assert maintainer.reconcile(wh, 0) == 0
    assert maintainer.state(wh)["bucket/0"].differing == 0
    maintainer.close(wh)
