"""Cleaned buckets kept current by ``bucketer run`` alone (no enrich), on a real broker and the embedded engine.

Phases, each produced to Kafka and followed by a pipeline run until idle: activities first (no member known:
nothing is clean), then the reference topics (the activities appear), then reference changes (a member becomes a
bot, a repository is disabled, an organization is renamed and moves country), then an activity segment move
and a delete. After each phase the cleaned union equals the expectation computed here, in Python, from what
was produced (never with the product's SQL); the reconciliation afterwards finds 0 differing rows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer
from kafkatools import create_topics, unique, wait_until
from prometheus_client import generate_latest

from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from connectors.warehouse import open_warehouse
from stream.buckets import bucket_of
from stream.incremental import Maintainer, maintenance_status
from stream.metrics import registry_for
from stream.pipeline import Pipeline, PipelineConfig

N = 3
T0 = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)
SEGMENTS = [f"9a0b0000-0000-4000-8000-{i:012d}" for i in range(4)]
GIT = {"git", "gerrit", "github", "gitlab"}


class FrozenClock:
    """No scheduled slot fires during the test (the first is :10): every change must arrive by maintenance."""

    def now(self) -> datetime:
        return datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, 0.2))


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


class World:
    """What was produced, and the cleaned rows it must give (the model of CLEANED_BUCKETS.md, in Python)."""

    def __init__(self) -> None:
        self.tick = 0
        self.activities: dict[tuple[Any, ...], dict[str, Any] | None] = {}
        self.refs: dict[str, dict[str, dict[str, Any] | None]] = {
            t: {} for t in ("members", "organizations", "repositories", "insightsProjects", "integrations")
        }
        self.out: list[tuple[str, bytes, bytes]] = []  # (topic kind, key, value)
        # The newest Sequin commit_timestamp sent per bucket (None: a reference table, which every bucket reads).
        self.newest: dict[int | None, datetime] = {}

    def at(self) -> str:
        self.tick += 1
        return iso(T0 + timedelta(days=30, seconds=self.tick))

    def message(
        self, table: str, action: str, record: dict[str, Any], changes: Any = None, buckets: tuple[int, ...] = ()
    ) -> bytes:
        """Sequin commits a little after the row's updatedAt: the freshness must follow the commit time."""
        commit = datetime.fromisoformat(record["updatedAt"]) + timedelta(seconds=2)
        for b in buckets if table == "activityRelations" else (None,):
            self.newest[b] = max(commit, self.newest.get(b, commit))
        meta = {"table_name": table, "commit_timestamp": iso(commit)}
        return orjson.dumps({"action": action, "record": record, "changes": changes, "metadata": meta})

    def activity(self, i: int, action: str = "insert", **over: Any) -> dict[str, Any]:
        rec = {
            "activityId": f"a{i}",
            "createdAt": iso(T0),
            "updatedAt": self.at(),
            "memberId": f"m{i % 4}",
            "organizationId": f"o{i % 3}" if i % 5 else None,
            "platform": ["github", "slack", "git", "discord"][i % 4],
            "segmentId": SEGMENTS[i % len(SEGMENTS)],
            "sourceId": f"s{i}",
            "type": "authored-commit",
            "timestamp": iso(T0 + timedelta(minutes=i)),
            "channel": f"https://github.com/acme/Repo{i % 3}" if i % 2 == 0 else "#general",
            "gitInsertions": i * 7,
            "gitDeletions": i,
            "sentimentScore": None,
            "score": 1,
            "isContribution": True,
            **over,
        }
        key = self.ident(rec)
        self.activities[key] = None if action == "delete" else rec
        self.out.append(
            (
                "activityRelations",
                rec["activityId"].encode(),
                self.message("activityRelations", action, rec, buckets=(bucket_of(rec["segmentId"], N),)),
            )
        )
        return rec

    def move(self, rec: dict[str, Any], segment: str) -> None:
        """An update that changes the segment (a sort-key column): the router retires the old row."""
        new = {**rec, "segmentId": segment, "updatedAt": self.at()}
        self.activities[self.ident(rec)] = None
        self.activities[self.ident(new)] = new
        changes = {"segmentId": rec["segmentId"], "updatedAt": rec["updatedAt"]}
        moved = (bucket_of(rec["segmentId"], N), bucket_of(segment, N))  # the retirement lands in the old bucket
        self.out.append(
            ("activityRelations", b"moved", self.message("activityRelations", "update", new, changes, moved))
        )

    @staticmethod
    def ident(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["segmentId"], r["timestamp"], r["type"], r["platform"], r.get("channel") or "", r["sourceId"])

    def ref(self, table: str, action: str, record: dict[str, Any]) -> None:
        record = {"createdAt": iso(T0), **record, "updatedAt": self.at()}
        self.refs[table][record["id"]] = None if action == "delete" else record
        self.out.append((table, record["id"].encode(), self.message(table, action, record)))

    def member(self, mid: str, bot: bool = False) -> None:
        attrs = {"isBot": {"default": bot}} if bot else {}
        self.ref("members", "update", {"id": mid, "attributes": attrs, "displayName": mid, "joinedAt": iso(T0)})

    def project_with_repositories(self) -> None:
        """The enabled project p0 and, in every segment, three enabled repositories of it (r0..r2)."""
        self.ref("insightsProjects", "insert", {"id": "p0", "name": "p", "slug": "p", "segmentId": SEGMENTS[0]})
        self.refs["insightsProjects"]["p0"] |= {"enabled": True, "deletedAt": None}
        for r in range(3):
            for s in SEGMENTS:
                rec = {
                    "id": f"r{r}-{s[-2:]}",
                    "url": f"https://github.com/acme/repo{r}",
                    "segmentId": s,
                    "insightsProjectId": "p0",
                    "sourceIntegrationId": "i0",
                    "enabled": True,
                    "deletedAt": None,
                }
                self.ref("repositories", "insert", rec)

    def expected(self) -> set[tuple[Any, ...]]:
        """(activityId, organizationName, organizationCountryCode, gitChangedLines) of each cleaned row."""
        live = {k: m for k, m in self.refs["members"].items() if m is not None}
        projects = {k for k, p in self.refs["insightsProjects"].items() if p and p["enabled"] and not p["deletedAt"]}
        channels = {
            (r["url"].lower(), r["segmentId"])
            for r in self.refs["repositories"].values()
            if r and r["enabled"] and not r["deletedAt"] and r["insightsProjectId"] in projects
        }
        codes = {"Germany": "DE", "France": "FR", "": "XX"}
        out = set()
        for a in self.activities.values():
            if a is None or a["memberId"] not in live or live[a["memberId"]]["attributes"]:
                continue
            if a["platform"] in GIT and ((a["channel"] or "").lower(), a["segmentId"]) not in channels:
                continue
            org = self.refs["organizations"].get(a["organizationId"] or "")
            name, code = (org["displayName"], codes[org["country"]]) if org else ("", "XX")
            out.add((a["activityId"], name, code, a["gitInsertions"] + a["gitDeletions"]))
        return out


def produce(bootstrap: str, topics: TopicNames, world: World) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for kind, key, value in world.out:
        topic = topics.source if kind == "activityRelations" else topics.reference(kind)
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0
    world.out = []


def run_until_idle(bootstrap: str, topics: TopicNames, data: Path, groups: tuple[str, str]) -> Pipeline:
    pipeline = Pipeline(
        PipelineConfig(
            kafka=KafkaConnection.plain(bootstrap),
            data_dir=data,
            buckets=N,
            topic_prefix=topics.prefix,
            until_idle=1.5,
            router_group=groups[0],
            loader_group=groups[1],
        ),
        clock=FrozenClock(),
    )
    pipeline.run()
    return pipeline


def cleaned(data: Path) -> set[tuple[Any, ...]]:
    with open_warehouse(data) as wh:
        rows = wh.rows(
            "SELECT activityId, organizationName, organizationCountryCode, gitChangedLines "
            "FROM activityRelations_deduplicated_cleaned_bucket_union"
        )
    assert len(rows) == len(set(rows)), "a cleaned row seen twice"
    return set(rows)


def test_cleaned_buckets_follow_every_topic_without_enrich(bootstrap: str, tmp_path: Path) -> None:
    topics = TopicNames(unique("incr") + ".")
    create_topics(bootstrap, [topics.source, *topics.references().values()])
    data, groups = tmp_path / "wh", (unique("router"), unique("loader"))
    world = World()

    # 1. activities only: no member is known yet, so nothing is clean
    recs = [world.activity(i) for i in range(24)]
    produce(bootstrap, topics, world)
    run_until_idle(bootstrap, topics, data, groups)
    assert cleaned(data) == world.expected() == set()

    # 2. the references arrive after their activities: the activities appear
    for m in range(4):
        world.member(f"m{m}")
    world.ref("organizations", "insert", {"id": "o1", "displayName": "Acme", "country": "Germany", "location": ""})
    world.ref("organizations", "insert", {"id": "o2", "displayName": "Globex", "country": "", "location": ""})
    world.project_with_repositories()
    produce(bootstrap, topics, world)
    run_until_idle(bootstrap, topics, data, groups)
    want = world.expected()
    assert len(want) >= 12 and cleaned(data) == want

    # 3. reference changes: a member becomes a bot, a repository is disabled, an organization renamed + moved
    world.member("m1", bot=True)
    disabled = dict(world.refs["repositories"][f"r0-{SEGMENTS[0][-2:]}"] or {})
    world.ref("repositories", "update", {**disabled, "enabled": False})
    world.ref("organizations", "update", {"id": "o1", "displayName": "Acme AG", "country": "France", "location": ""})
    produce(bootstrap, topics, world)
    run_until_idle(bootstrap, topics, data, groups)
    want3 = world.expected()
    assert want3 != want and cleaned(data) == want3

    # 4. activity changes: a segment move (retirement in the old bucket), a delete, a new activity
    world.move(recs[1], SEGMENTS[2])
    world.activity(2, "delete", updatedAt=world.at(), **{k: recs[2][k] for k in ("timestamp", "segmentId")})
    world.activity(40)
    produce(bootstrap, topics, world)
    pipeline = run_until_idle(bootstrap, topics, data, groups)
    assert pipeline.maintainer is not None
    assert cleaned(data) == world.expected()
    stats = pipeline.maintainer.stats
    assert stats.corrections > 0 and stats.rows_read >= stats.rows_written > 0
    metrics = generate_latest(registry_for(maintainer=pipeline.maintainer)).decode()
    assert "bucketer_correction_rows_written_total" in metrics and 'bucketer_freshness_seconds{bucket="0"}' in metrics

    # The reconciliation (the hourly job) finds nothing to fix; freshness is recorded per bucket.
    with open_warehouse(data) as wh:
        maintainer = Maintainer(N)
        maintainer.setup(wh)
        assert [maintainer.reconcile(wh, n) for n in range(N)] == [0] * N
        fresh = maintenance_status(wh, N, now=datetime(2026, 5, 1, 12, tzinfo=UTC))
        assert [f.differing for f in fresh] == [0] * N
        # Freshness = the newest commit_timestamp applied to the bucket (its activities, every reference table).
        assert [f.freshness for f in fresh] == [
            max(world.newest.get(n, world.newest[None]), world.newest[None]) for n in range(N)
        ]
        assert all(f.lag_seconds is not None and 0 < f.lag_seconds < 86400 for f in fresh)
        maintainer.close(wh)
    assert cleaned(data) == world.expected()


def test_a_cleaned_bucket_of_the_old_layout_moves_to_the_new_one(tmp_path: Path) -> None:
    """A warehouse from before the maintenance (cleaned buckets plain MergeTree, ordered by member/org): its rows
    stay readable through ensure_schema, now in the ReplacingMergeTree layout the views read FINAL."""
    from stream.buckets import cleaned_table
    from stream.schema import ACTIVITY_COLUMNS, CLEANED_EXTRA, ensure_schema, settings_ddl

    cols = ", ".join(f"`{c.name}` {c.type}" for c in ACTIVITY_COLUMNS + CLEANED_EXTRA)
    with open_warehouse(tmp_path / "wh") as wh:
        wh.command(settings_ddl())
        wh.command(
            f"CREATE TABLE {cleaned_table(0)} ({cols}) ENGINE = MergeTree "
            f"ORDER BY (segmentId, timestamp, type, platform, memberId, organizationId)"
        )
        wh.command(f"INSERT INTO {cleaned_table(0)} (activityId, sourceId) VALUES ('x', '1'), ('y', '2')")
        ensure_schema(wh, N)
        assert wh.rows("SELECT activityId FROM activityRelations_deduplicated_cleaned_bucket_union ORDER BY 1") == [
            ("x",),
            ("y",),
        ]
        engine = wh.rows("SELECT engine FROM system.tables WHERE name = {t:String}", {"t": cleaned_table(0)})
        assert engine == [("ReplacingMergeTree",)]


def test_sigkill_of_run_at_any_moment_converges_to_the_same_cleaned_rows(bootstrap: str, tmp_path: Path) -> None:
    """`bucketer run` (a process, the maintenance in its own thread) is SIGKILLed at staggered moments while
    activities and reference changes stream in; a last run until idle leaves the cleaned buckets equal to the
    model, each row once, and the reconciliation finds 0 differing rows."""
    topics = TopicNames(unique("incrkill") + ".")
    create_topics(bootstrap, [topics.source, *topics.references().values()])
    data = tmp_path / "wh"
    world = World()
    for m in range(4):
        world.member(f"m{m}")
    world.ref("organizations", "insert", {"id": "o1", "displayName": "Acme", "country": "Germany", "location": ""})
    world.project_with_repositories()
    env = {k: v for k, v in os.environ.items() if k != "BUCKETER_CLICKHOUSE_URL"}
    base = [sys.executable, "-m", "bucketer", "run", "--bootstrap", bootstrap, "--data-dir", str(data)]
    base += ["--buckets", str(N), "--topic-prefix", topics.prefix]
    changes = [
        lambda: world.member("m1", bot=True),
        lambda: world.ref(
            "organizations", "update", {"id": "o1", "displayName": "Acme AG", "country": "France", "location": ""}
        ),
        lambda: world.member("m1", bot=False),
        lambda: world.ref(
            "repositories", "update", {**(world.refs["repositories"][f"r0-{SEGMENTS[0][-2:]}"] or {}), "enabled": False}
        ),
    ]
    kills = 0
    for k, delay in enumerate((0.5, 1.5, 2.5, 3.5)):
        for i in range(k * 150, (k + 1) * 150):
            world.activity(i)
        changes[k]()
        produce(bootstrap, topics, world)
        log = tmp_path / f"run{k}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(base, env=env, stdout=out, stderr=out)
        try:
            started = lambda p=proc, f=log: p.poll() is not None or b"assigned" in f.read_bytes()  # noqa: E731
            wait_until(started, 90, "run to start")
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(delay)  # somewhere in routing, landing or a correction round
            for i in range(k * 150, k * 150 + 40):  # more input while it runs: some of it lands, some not
                world.activity(10_000 + i)
            produce(bootstrap, topics, world)
            time.sleep(delay / 2)
        finally:
            proc.send_signal(signal.SIGKILL)
            kills += proc.wait(30) == -signal.SIGKILL
    assert kills == 4
    final = subprocess.run([*base, "--until-idle", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    want = world.expected()
    assert len(want) > 300 and cleaned(data) == want
    with open_warehouse(data) as wh:
        maintainer = Maintainer(N)
        maintainer.setup(wh)
        assert [maintainer.reconcile(wh, n) for n in range(N)] == [0] * N
        maintainer.close(wh)
