"""Cleaned-bucket rebuilds on the embedded warehouse (chdb), checked row by row against expectations computed
here, in Python, from the same input rows (never by running the product's SQL again)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cleaned_model import gerrit_variant
from proctools import repo_env

from connectors.warehouse import EmbeddedWarehouse, open_warehouse
from stream.buckets import bucket_of, cleaned_table, raw_table
from stream.enrich import ASIDE_SUFFIX, BucketBusyError, Enricher, EnrichError, bucket_lock
from stream.schema import ACTIVITY_NAMES, ensure_schema

N = 3
REPO_ROOT = Path(__file__).resolve().parents[2]
CLEANED_NAMES = ACTIVITY_NAMES + (
    "gitChangedLines",
    "gitChangedLinesBucket",
    "organizationCountryCode",
    "organizationName",
    "snapshotId",
)
GIT = {"git", "gerrit", "github", "gitlab"}
T0 = datetime(2026, 5, 4, 12, 0, 0)
RUN_AT = datetime(2026, 11, 23, 23, 26, 41, tzinfo=UTC)


class FixedClock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        raise AssertionError("an enrichment never sleeps")


def version(updated: datetime, deleted: int = 0) -> int:
    return int(updated.replace(tzinfo=UTC).timestamp() * 1000) * 2 + deleted


# --- the input: reference rows with several versions, and activities -----------------------------------------


def _segments(per_bucket: int = 2) -> list[str]:
    """Segment ids, ``per_bucket`` in each of the N buckets (so every bucket has projects and rows)."""
    found: dict[int, list[str]] = {b: [] for b in range(N)}
    i = 0
    while min(map(len, found.values())) < per_bucket:
        sid = f"5e0a4c1e-0000-4000-8000-{i:012d}"
        if len(found[bucket_of(sid, N)]) < per_bucket:
            found[bucket_of(sid, N)].append(sid)
        i += 1
    return [found[b % N][b // N] for b in range(N * per_bucket)]


SEGMENTS = _segments()
# (id, segment, versions as (enabled, deletedAt, _deleted)); the last version is the live one
PROJECTS = {
    "p0": (0, [(1, None, 0)]),
    "p1": (1, [(1, None, 0)]),
    "p2": (2, [(0, None, 0)]),
    "p3": (3, [(1, T0, 0)]),  # soft-deleted
    "p4": (4, [(1, None, 0), (0, None, 0)]),  # disabled later
    "p5": (5, [(0, None, 0), (1, None, 0)]),  # enabled later
}
INTEGRATIONS = {"ig_gerrit": "gerrit", "ig_gh": "github", "ig_gl": "gitlab"}
# id: (url, project, integration, versions as (enabled, excluded, archived, deletedAt, _deleted))
REPOS = {
    "r1": ("https://github.com/Acme/Widget", "p0", "ig_gh", [(1, 0, 0, None, 0)]),
    "r2": ("https://gerrit.example.org/r/Core/Lib", "p0", "ig_gerrit", [(1, 0, 0, None, 0)]),
    "r3": ("https://review.example.org/gerrit/Tools", "p1", "ig_gerrit", [(1, 0, 0, None, 0)]),
    "r4": ("https://git.example.org:8443/plain/Repo", "p1", "ig_gerrit", [(1, 0, 0, None, 0)]),
    "r5": ("https://github.com/acme/disabled", "p0", "ig_gh", [(0, 0, 0, None, 0)]),
    "r6": ("https://github.com/acme/soft-deleted", "p1", "ig_gh", [(1, 0, 0, T0, 0)]),
    "r7": ("https://github.com/acme/excluded-archived", "p1", "ig_gh", [(1, 1, 1, None, 0)]),
    "r8": ("https://github.com/acme/project-disabled", "p2", "ig_gh", [(1, 0, 0, None, 0)]),
    "r9": ("https://github.com/acme/project-deleted", "p3", "ig_gh", [(1, 0, 0, None, 0)]),
    "r10": ("https://github.com/acme/project-disabled-later", "p4", "ig_gh", [(1, 0, 0, None, 0)]),
    "r11": ("https://github.com/acme/project-enabled-later", "p5", "ig_gh", [(1, 0, 0, None, 0)]),
    "r12": ("https://gitlab.com/acme/hard-deleted", "p0", "ig_gl", [(1, 0, 0, None, 0), (1, 0, 0, None, 1)]),
    "r13": ("https://github.com/acme/disabled-later", "p0", "ig_gh", [(1, 0, 0, None, 0), (0, 0, 0, None, 0)]),
    "r14": ("https://github.com/acme/r/not-gerrit", "p0", "ig_gh", [(1, 0, 0, None, 0)]),
    "r15": ("https://gerrit.example.org/r/Gone", "p2", "ig_gerrit", [(1, 0, 0, None, 0)]),
}
# id: versions as (isBot, isTeamMember, isOrganization, _deleted)
MEMBERS = {
    "m1": [(0, 0, 0, 0)],
    "m2": [(0, 0, 0, 0)],
    "m3": [(0, 0, 0, 0)],
    "bot": [(1, 0, 0, 0)],
    "team": [(0, 1, 0, 0)],
    "orgmember": [(0, 0, 1, 0)],
    "became_bot": [(0, 0, 0, 0), (1, 0, 0, 0)],
    "was_bot": [(1, 0, 0, 0), (0, 0, 0, 0)],
    "deleted": [(0, 0, 0, 0), (0, 0, 0, 1)],
}
# id: (versions of (displayName, country, location), expected name, expected code) -- codes written by hand
ORGS = {
    "o_ro": ([("Acme RO", "", "Bucharest, Romania")], "Acme RO", "RO"),
    "o_ng": ([("Naija", "", "Lagos, Nigeria")], "Naija", "NG"),
    "o_nj": ([("Garden", "", "Newark, New Jersey")], "Garden", "US"),
    "o_ga": ([("Peach", "", "Atlanta, Georgia, United States")], "Peach", "US"),
    "o_uk": ([("Tea", "UK", "")], "Tea", "GB"),
    "o_kr": ([("Kimchi", "South Korea", "")], "Kimchi", "KR"),
    "o_us": ([("Eagle", "US", "Bucharest, Romania")], "Eagle", "US"),  # country wins over location
    "o_xx": ([("Nowhere Inc", "", "Somewhere nice")], "Nowhere Inc", "XX"),
    "o_ge": ([("Old Name", "", "Paris, France"), ("New Name", "", "Tbilisi, Georgia")], "New Name", "GE"),
}
PLATFORMS = ["git", "gerrit", "github", "gitlab", "slack", "discord", "GitHub", "jira"]
LINES = [0, 1, 4, 9, 10, 30, 59, 60, 99, 100, 250, 499, 500, 100000]


@dataclass
class Dataset:
    activities: list[dict[str, Any]] = field(default_factory=list)  # every inserted version, in insert order

    def channels(self) -> list[str]:
        out = []
        for url, *_ in REPOS.values():
            out += [url, url.lower(), url.upper(), gerrit_variant(url.lower()), gerrit_variant(url)]
        return out + ["#general", "", "https://github.com/someone/else"]


def make_activities(seed: int, count: int) -> Dataset:
    rng = random.Random(seed)
    data = Dataset()
    channels = data.channels()
    members = list(MEMBERS) + ["unknown_member"]
    orgs = list(ORGS) + ["o_missing", "", ""]
    for i in range(count):
        ts = T0 + timedelta(minutes=i, milliseconds=rng.randrange(1000))
        row = {
            "activityId": f"act-{i:04d}",
            "conversationId": rng.choice(["", f"conv-{i % 7}"]),
            "createdAt": ts,
            "updatedAt": ts,
            "memberId": rng.choice(members),
            "objectMemberId": "",
            "objectMemberUsername": "",
            "organizationId": rng.choice(orgs),
            "parentId": "",
            "platform": rng.choice(PLATFORMS),
            "segmentId": rng.choice(SEGMENTS),
            "username": f"user{i % 13}",
            "sourceId": f"src-{i}",
            "type": rng.choice(["commit", "message"]),
            "timestamp": ts,
            "sourceParentId": "",
            "channel": rng.choice(channels),
            "sentimentScore": rng.choice([-1, 0, 55]),
            "gitInsertions": rng.choice(LINES),
            "gitDeletions": rng.choice(LINES),
            "score": rng.choice([-1, 2]),
            "isContribution": rng.choice([0, 1]),
            "pullRequestReviewState": rng.choice(["", "APPROVED"]),
            "_deleted": 0,
        }
        if rng.random() < 0.6:  # aim at a repository: its segment (mostly) and a spelling of its url
            url, pid, _iid, _v = REPOS[rng.choice(list(REPOS))]
            row["segmentId"] = SEGMENTS[PROJECTS[pid][0]] if rng.random() < 0.85 else rng.choice(SEGMENTS)
            row["channel"] = rng.choice(
                [url, url.lower(), url.upper(), gerrit_variant(url.lower()), gerrit_variant(url)]
            )
        data.activities.append(row)
        if i % 11 == 0:  # a later update of the same row (same sort key): new member, new counts
            upd = dict(
                row,
                updatedAt=ts + timedelta(hours=1),
                memberId=rng.choice(members),
                gitInsertions=rng.choice(LINES),
                organizationId=rng.choice(orgs),
            )
            data.activities.append(upd)
        if i % 13 == 0:  # deleted later
            data.activities.append(dict(row, updatedAt=ts + timedelta(hours=2), _deleted=1))
    return data


def insert_reference(wh: EmbeddedWarehouse) -> None:
    def stamp(k: int) -> datetime:
        return T0 + timedelta(days=k)

    rows: list[list[Any]] = []
    for pid, (seg, versions) in PROJECTS.items():
        for k, (enabled, deleted_at, dele) in enumerate(versions):
            rows.append(
                [
                    pid,
                    pid,
                    f"slug-{pid}",
                    SEGMENTS[seg],
                    enabled,
                    deleted_at,
                    stamp(k),
                    stamp(k),
                    dele,
                    version(stamp(k), dele),
                ]
            )
    wh.insert(
        "insightsProjects",
        ("id", "name", "slug", "segmentId", "enabled", "deletedAt", "createdAt", "updatedAt", "_deleted", "_version"),
        rows,
    )
    wh.insert(
        "integrations",
        ("id", "platform", "segmentId", "updatedAt", "_version"),
        [[iid, plat, SEGMENTS[0], T0, version(T0)] for iid, plat in INTEGRATIONS.items()],
    )
    rows = []
    for rid, (url, pid, iid, versions) in REPOS.items():
        seg = SEGMENTS[PROJECTS[pid][0]]
        for k, (enabled, excluded, archived, deleted_at, dele) in enumerate(versions):
            rows.append(
                [
                    rid,
                    url,
                    seg,
                    pid,
                    iid,
                    enabled,
                    excluded,
                    archived,
                    deleted_at,
                    stamp(k),
                    dele,
                    version(stamp(k), dele),
                ]
            )
    wh.insert(
        "repositories",
        (
            "id",
            "url",
            "segmentId",
            "insightsProjectId",
            "sourceIntegrationId",
            "enabled",
            "excluded",
            "archived",
            "deletedAt",
            "updatedAt",
            "_deleted",
            "_version",
        ),
        rows,
    )
    rows = []
    for mid, versions in MEMBERS.items():
        for k, (bot, team, orgm, dele) in enumerate(versions):
            rows.append([mid, "{}", bot, team, orgm, mid, stamp(k), dele, version(stamp(k), dele)])
    wh.insert(
        "members",
        (
            "id",
            "attributes",
            "isBot",
            "isTeamMember",
            "isOrganization",
            "displayName",
            "updatedAt",
            "_deleted",
            "_version",
        ),
        rows,
    )
    rows = []
    for oid, (versions, _, _) in ORGS.items():
        for k, (name, country, location) in enumerate(versions):
            rows.append([oid, name, location, country, stamp(k), 0, version(stamp(k))])
    wh.insert("organizations", ("id", "displayName", "location", "country", "updatedAt", "_deleted", "_version"), rows)


def insert_activities(wh: EmbeddedWarehouse, rows: list[dict[str, Any]]) -> None:
    for b in range(N):
        mine = [r for r in rows if bucket_of(r["segmentId"], N) == b]
        cols = ACTIVITY_NAMES + ("_deleted", "_version")
        wh.insert(
            raw_table(b),
            cols,
            [[r[c] for c in ACTIVITY_NAMES] + [r["_deleted"], version(r["updatedAt"], r["_deleted"])] for r in mine],
        )


# --- the expectation, computed here ----------------------------------------------------------------------------


def latest(versions: list[Any]) -> Any:
    return versions[-1]


def allowed_channels() -> set[tuple[str, str]]:
    out = set()
    for url, pid, iid, versions in REPOS.values():
        enabled, _excluded, _archived, deleted_at, dele = latest(versions)
        _seg, pversions = PROJECTS[pid]
        p_enabled, p_deleted_at, p_dele = latest(pversions)
        if dele or not enabled or deleted_at is not None or p_dele or not p_enabled or p_deleted_at is not None:
            continue
        seg = SEGMENTS[PROJECTS[pid][0]]
        out.add((url.lower(), seg))
        if INTEGRATIONS[iid] == "gerrit":
            out.add((gerrit_variant(url.lower()), seg))
    return out


def real_members() -> set[str]:
    return {m for m, versions in MEMBERS.items() if latest(versions) == (0, 0, 0, 0)}


def lines_bucket(n: int) -> str:
    for upper, label in ((1, ""), (10, "1-9"), (60, "10-59"), (100, "60-99"), (500, "100-499")):
        if n < upper:
            return label
    return "500+"


def expected_rows(data: Dataset, bucket: int, snapshot: datetime) -> list[tuple[Any, ...]]:
    live: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in data.activities:
        key = tuple(r[c] for c in ("segmentId", "timestamp", "type", "platform", "channel", "sourceId"))
        old = live.get(key)
        if old is None or version(r["updatedAt"], r["_deleted"]) > version(old["updatedAt"], old["_deleted"]):
            live[key] = r
    allowed, people = allowed_channels(), real_members()
    out = []
    for r in live.values():
        if r["_deleted"] or bucket_of(r["segmentId"], N) != bucket or r["memberId"] not in people:
            continue
        if r["platform"] in GIT and (r["channel"].lower(), r["segmentId"]) not in allowed:
            continue
        lines = r["gitInsertions"] + r["gitDeletions"]
        org = ORGS.get(r["organizationId"])
        name, code = (org[1], org[2]) if org else ("", "XX")
        out.append(tuple(r[c] for c in ACTIVITY_NAMES) + (lines, lines_bucket(lines), code, name, snapshot))
    return sorted(out, key=lambda t: t[0])


def plain(v: Any) -> Any:
    return v.astimezone(UTC).replace(tzinfo=None) if isinstance(v, datetime) and v.tzinfo else v


def cleaned_rows(wh: EmbeddedWarehouse, bucket: int) -> list[tuple[Any, ...]]:
    cols = ", ".join(f"`{c}`" for c in CLEANED_NAMES)
    return [
        tuple(plain(v) for v in row)
        for row in wh.rows(f"SELECT {cols} FROM {cleaned_table(bucket)} ORDER BY activityId")
    ]


# --- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "wh"


@pytest.fixture
def wh(data_dir: Path) -> Iterator[EmbeddedWarehouse]:
    with open_warehouse(data_dir) as w:
        ensure_schema(w, N)
        insert_reference(w)
        yield w  # type: ignore[misc]


def enricher(data_dir: Path, at: datetime = RUN_AT, **kw: Any) -> Enricher:
    return Enricher(lambda: open_warehouse(data_dir), clock=FixedClock(at), lock_dir=data_dir / "locks", **kw)


SNAPSHOT = datetime(2026, 11, 23, 23, 0, 0)


# --- tests -----------------------------------------------------------------------------------------------------


def test_cleaned_buckets_row_by_row(wh: EmbeddedWarehouse, data_dir: Path) -> None:
    data = make_activities(seed=7, count=400)
    insert_activities(wh, data.activities)
    results = enricher(data_dir).rebuild_many(range(N), parallel=2)
    assert [(r.bucket, r.status) for r in results] == [(b, "ok") for b in range(N)]
    total = 0
    for b in range(N):
        want = expected_rows(data, b, SNAPSHOT)
        got = cleaned_rows(wh, b)
        assert got == want, f"bucket {b}"
        assert results[b].rows == len(want)
        total += len(want)
    # The data exercises every rule: some rows kept and some dropped for each reason.
    live_git = [r for r in data.activities if r["platform"] in GIT]
    assert 50 < total < 400 and live_git
    kept = {row[0] for b in range(N) for row in cleaned_rows(wh, b)}
    by_id = {r["activityId"]: r for r in data.activities}
    kept_rows = [by_id[a] for a in kept]
    assert {r["platform"] for r in kept_rows} >= {"git", "gerrit", "github", "gitlab", "slack", "GitHub"}
    assert any("/q/project:" in r["channel"] for r in kept_rows if r["platform"] in GIT)  # gerrit variants
    assert any(r["channel"] != r["channel"].lower() for r in kept_rows if r["platform"] in GIT)  # mixed case
    assert not {r["memberId"] for r in kept_rows} & {
        "bot",
        "team",
        "orgmember",
        "became_bot",
        "deleted",
        "unknown_member",
    }
    assert "was_bot" in {r["memberId"] for r in kept_rows}
    codes = {row[CLEANED_NAMES.index("organizationCountryCode")] for b in range(N) for row in cleaned_rows(wh, b)}
    assert codes == {"RO", "NG", "US", "GB", "KR", "GE", "XX"}
    # The union and the routing view read the same rows.
    union = wh.rows("SELECT count() FROM activityRelations_deduplicated_cleaned_bucket_union")[0][0]
    assert union == total
    routed = wh.rows("SELECT count() FROM activityRelations_bucket_routing(bucketId = 1)")[0][0]
    assert routed == len(expected_rows(data, 1, SNAPSHOT))


def test_rebuilding_again_without_new_input_gives_the_same_rows(wh: EmbeddedWarehouse, data_dir: Path) -> None:
    data = make_activities(seed=11, count=150)
    insert_activities(wh, data.activities)
    enricher(data_dir).rebuild_many(range(N))
    first = [cleaned_rows(wh, b) for b in range(N)]
    insert_activities(wh, data.activities)  # a replay of every row: harmless
    enricher(data_dir, at=RUN_AT + timedelta(minutes=20)).rebuild_many(range(N), parallel=2)
    assert [cleaned_rows(wh, b) for b in range(N)] == first
    assert sum(map(len, first)) > 0
    # The next hour only moves the snapshotId.
    enricher(data_dir, at=RUN_AT + timedelta(hours=1)).rebuild(0)
    snap = CLEANED_NAMES.index("snapshotId")
    assert [r[:snap] for r in cleaned_rows(wh, 0)] == [r[:snap] for r in first[0]]
    assert {r[snap] for r in cleaned_rows(wh, 0)} == ({SNAPSHOT + timedelta(hours=1)} if first[0] else set())


def test_new_input_deletes_and_reference_changes_show_up_on_the_next_rebuild(
    wh: EmbeddedWarehouse, data_dir: Path
) -> None:
    data = make_activities(seed=3, count=120)
    insert_activities(wh, data.activities)
    enricher(data_dir).rebuild_many(range(N))
    kept = {row[0]: row for b in range(N) for row in cleaned_rows(wh, b)}
    victim_id = sorted(kept)[0]
    victim = next(r for r in reversed(data.activities) if r["activityId"] == victim_id)
    gone = dict(victim, updatedAt=victim["updatedAt"] + timedelta(days=1), _deleted=1)
    data.activities.append(gone)
    insert_activities(wh, [gone])
    # The organization of o_ro moves: the country code table learns the new (country, location) pair.
    wh.insert(
        "organizations",
        ("id", "displayName", "location", "country", "updatedAt", "_deleted", "_version"),
        [["o_ro", "Acme NG", "Lagos, Nigeria", "", T0 + timedelta(days=9), 0, version(T0 + timedelta(days=9))]],
    )
    ORGS_BEFORE = dict(ORGS)
    try:
        ORGS["o_ro"] = (ORGS["o_ro"][0], "Acme NG", "NG")
        enricher(data_dir).rebuild_many(range(N))
        for b in range(N):
            assert cleaned_rows(wh, b) == expected_rows(data, b, SNAPSHOT)
        assert victim_id not in {row[0] for b in range(N) for row in cleaned_rows(wh, b)}
    finally:
        ORGS.clear()
        ORGS.update(ORGS_BEFORE)


def test_a_failed_rebuild_leaves_the_previous_snapshot(wh: EmbeddedWarehouse, data_dir: Path) -> None:
    data = make_activities(seed=5, count=120)
    insert_activities(wh, data.activities)
    enricher(data_dir).rebuild_many(range(N))
    before = [cleaned_rows(wh, b) for b in range(N)]
    assert sum(map(len, before)) > 0
    more = make_activities(seed=6, count=60).activities
    for r in more:
        r["activityId"] = "new-" + r["activityId"]
        r["sourceId"] = "new-" + r["sourceId"]
    insert_activities(wh, more)

    def fail_between_build_and_swap(w: Any, bucket: int) -> None:
        # The new snapshot is complete and differs from the old one; then the run dies.
        assert w.rows(f"SELECT count() FROM {cleaned_table(bucket)}{ASIDE_SUFFIX}")[0][0] > len(before[bucket])
        raise RuntimeError("injected failure")

    broken = enricher(data_dir, at=RUN_AT + timedelta(hours=1), before_swap=fail_between_build_and_swap)
    results = broken.rebuild_many(range(N), parallel=2)
    assert [r.status for r in results] == ["failed"] * N
    assert all("injected failure" in r.error for r in results)
    assert [cleaned_rows(wh, b) for b in range(N)] == before
    # A warehouse error mid-build (the aside table vanishes under the INSERT) is reported the same way.
    with pytest.raises(EnrichError):
        enricher(data_dir, before_swap=lambda w, b: w.command(f"DROP TABLE {cleaned_table(b)}{ASIDE_SUFFIX}")).rebuild(
            0
        )
    assert cleaned_rows(wh, 0) == before[0]
    # The next good run replaces the snapshot and leaves no table aside.
    enricher(data_dir, at=RUN_AT + timedelta(hours=1)).rebuild_many(range(N))
    all_rows = Dataset(activities=data.activities + more)
    for b in range(N):
        assert cleaned_rows(wh, b) == expected_rows(all_rows, b, SNAPSHOT + timedelta(hours=1))
    leftovers = wh.rows(
        "SELECT name FROM system.tables WHERE database = currentDatabase() "
        "AND (name LIKE '%\\_\\_%' OR startsWith(name, 'enrich_ref_'))"
    )
    assert leftovers == []


def test_never_two_rebuilds_of_one_bucket_at_once(wh: EmbeddedWarehouse, data_dir: Path) -> None:
    insert_activities(wh, make_activities(seed=9, count=60).activities)
    inside, release = threading.Event(), threading.Event()

    def stall(w: Any, bucket: int) -> None:
        inside.set()
        assert release.wait(60)

    slow = enricher(data_dir, before_swap=stall)
    worker = threading.Thread(target=slow.rebuild, args=(1,))
    worker.start()
    try:
        assert inside.wait(60)
        with pytest.raises(BucketBusyError):
            enricher(data_dir).rebuild(1)
        results = enricher(data_dir).rebuild_many([0, 1, 2], parallel=2)
        assert [(r.bucket, r.status) for r in results] == [(0, "ok"), (1, "busy"), (2, "ok")]
    finally:
        release.set()
        worker.join(60)
    assert enricher(data_dir).rebuild(1).status == "ok"  # free again


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from datetime import datetime, UTC
    from pathlib import Path
    from connectors.warehouse import open_warehouse
    from stream.enrich import Enricher

    class Clock:
        def now(self): return datetime(2026, 11, 24, 3, 0, tzinfo=UTC)
        def sleep(self, s): pass

    def stall(wh, bucket):
        Path({marker!r}).write_text("built")
        time.sleep(600)

    data_dir = Path({data_dir!r})
    Enricher(lambda: open_warehouse(data_dir), clock=Clock(), lock_dir=data_dir / "locks",
             before_swap=stall).rebuild(2)
""")


def test_a_killed_rebuild_leaves_the_previous_snapshot(data_dir: Path, tmp_path: Path) -> None:
    data = make_activities(seed=21, count=120)
    with open_warehouse(data_dir) as w:
        ensure_schema(w, N)
        insert_reference(w)
        insert_activities(w, data.activities)
        enricher(data_dir).rebuild_many(range(N))
        before = cleaned_rows(w, 2)
        more = [
            dict(r, activityId="k-" + r["activityId"], sourceId="k-" + r["sourceId"])
            for r in make_activities(seed=22, count=60).activities
        ]
        insert_activities(w, more)
    assert before
    marker = tmp_path / "built"
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT.format(marker=str(marker), data_dir=str(data_dir)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stderr=subprocess.PIPE, start_new_session=True, env=repo_env()
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the rebuild never got to its swap"
            time.sleep(0.1)
        # While it runs, the bucket is locked for every other process.
        with pytest.raises(BucketBusyError):
            with bucket_lock(2, data_dir / "locks"):
                pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(60)
        if proc.stderr:
            proc.stderr.close()
    with open_warehouse(data_dir) as w:
        assert cleaned_rows(w, 2) == before  # the old snapshot, readable
        aside = w.rows(
            "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = {n:String}",
            {"n": cleaned_table(2) + ASIDE_SUFFIX},
        )
        assert aside == [(1,)]  # the half-done run left its table aside, nothing else
        assert enricher(data_dir).rebuild(2).status == "ok"
        assert cleaned_rows(w, 2) == expected_rows(Dataset(data.activities + more), 2, SNAPSHOT)


def test_cli_enrich_rebuilds_the_named_buckets(data_dir: Path) -> None:
    data = make_activities(seed=31, count=90)
    with open_warehouse(data_dir) as w:
        ensure_schema(w, N)
        insert_reference(w)
        insert_activities(w, data.activities)
        # While this process owns the data dir, the CLI refuses with a one-line reason.
        busy = subprocess.run(
            [sys.executable, "-m", "bucketer.cli", "enrich", "--data-dir", str(data_dir), "--all"],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=120,
        )
        assert busy.returncode != 0 and "in use" in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
    cli = [sys.executable, "-m", "bucketer.cli", "enrich", "--data-dir", str(data_dir)]
    ok = subprocess.run(
        cli + ["--bucket", "0", "--bucket", "2", "--parallel", "2"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["bucket 0", "bucket 2"]
    bad = subprocess.run(cli + ["--bucket", str(N)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert bad.returncode != 0 and f"no bucket {N}" in bad.stderr
    with open_warehouse(data_dir) as w:
        for b in (0, 2):
            rows = cleaned_rows(w, b)
            snaps = {r[-1] for r in rows}
            assert len(snaps) == 1  # one snapshot for the whole bucket: the hour the CLI ran
            snap = snaps.pop()
            assert rows == expected_rows(data, b, snap)
            assert f"{len(rows)} rows" in lines[0 if b == 0 else 1]
        assert cleaned_rows(w, 1) == []  # not asked for
