"""`bucketer run` end to end on a real broker and the embedded engine, then `bootstrap` and `rebucket`.

The expected live rows are computed here from the generated messages with a model written for the test
(last version per row identity, deletes and sort-key changes retire), never with the product's SQL."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
from clocks import FrozenClock
from confluent_kafka import Producer
from kafkatools import create_topics, unique

from bucketer.localkafka import free_port
from connectors.kafka_conn import KafkaConnection
from connectors.topics import REFERENCE_TABLES, TopicNames
from connectors.warehouse import open_warehouse
from stream.buckets import bucket_of, raw_table
from stream.enrich import Enricher
from stream.loadgen import LoadgenConfig, generate
from stream.pipeline import Pipeline, PipelineConfig
from stream.rebucket import RebucketError, rebucket
from stream.replay import replay
from stream.schema import ensure_schema

SORT_KEY = ("segmentId", "timestamp", "type", "platform", "channel", "sourceId")
ACTIONS = {"insert", "update", "delete", "read"}


def ms(v: object) -> int:
    if isinstance(v, int):
        return v // 1000
    return int(datetime.fromisoformat(str(v).replace("Z", "+00:00")).astimezone(UTC).timestamp() * 1000)


def identity(rec: dict) -> tuple:
    return (
        rec["segmentId"],
        ms(rec["timestamp"]),
        rec["type"],
        rec["platform"],
        rec.get("channel") or "",
        rec["sourceId"],
    )


def expected_live(values: list[bytes | None]) -> set[tuple]:
    """Row identity + activityId of every live row: the highest version per identity wins, a delete (or a
    retirement of the old row of a sort-key change) beats a live row of the same updatedAt."""
    best: dict[tuple, tuple[int, bool, str]] = {}

    def offer(rec: dict, deleted: bool, updated_ms: int) -> None:
        key = identity(rec)
        version = updated_ms * 2 + deleted
        if key not in best or version >= best[key][0] * 2 + best[key][1]:
            best[key] = (updated_ms, deleted, rec["activityId"])

    for raw in values:
        try:
            msg = orjson.loads(raw) if raw is not None else None
            rec = msg["record"]
            action = msg["action"]
            if action not in ACTIONS or not isinstance(rec, dict) or not rec.get("segmentId"):
                continue
            updated = ms(rec["updatedAt"])
            identity(rec)
        except Exception:  # bad input: the router dead-letters it
            continue
        changes = msg.get("changes") or {}
        if action == "update" and any(k in changes for k in SORT_KEY):
            old = {**rec, **changes}
            offer(old, True, ms(old["updatedAt"]))
        offer(rec, action == "delete", updated)
    return {(*k, aid) for k, (_, deleted, aid) in best.items() if not deleted}


def live_rows(wh, buckets: int) -> dict[int, set[tuple]]:
    out = {}
    for b in range(buckets):
        rows = wh.rows(
            f"SELECT segmentId, toUnixTimestamp64Milli(timestamp), type, platform, channel, sourceId, "
            f"activityId FROM {raw_table(b)} FINAL"
        )
        out[b] = {tuple(r) for r in rows}
    return out


def cleaned_ids(wh) -> list[str]:
    return sorted(r[0] for r in wh.rows("SELECT activityId FROM activityRelations_deduplicated_cleaned_bucket_union"))


@pytest.fixture(scope="module")
def traffic(bootstrap: str) -> tuple[TopicNames, list[bytes | None]]:
    topics = TopicNames(unique("pipe") + ".")
    create_topics(bootstrap, [topics.source, *topics.references().values()], partitions=3)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    activity: list[bytes | None] = []
    for g in generate(LoadgenConfig(count=4000, seed=11, segments=40, bad_fraction=0.02)):
        topic = topics.source if g.topic == "activityRelations" else topics.reference(g.topic)
        producer.produce(topic, key=g.key, value=g.value)
        if g.topic == "activityRelations":
            activity.append(g.value)
    assert producer.flush(60) == 0
    assert set(REFERENCE_TABLES) <= {"members", "organizations", "repositories", "insightsProjects", "integrations"}
    return topics, activity


def test_run_bootstrap_rebucket(bootstrap: str, traffic, tmp_path: Path) -> None:
    topics, activity = traffic
    expected = expected_live(activity)
    assert len(expected) > 1000  # the generator made a real workload

    # 1. The whole pipeline in one process, until idle, with a final rebuild of every bucket.
    data = tmp_path / "wh"
    pipeline = Pipeline(
        PipelineConfig(
            kafka=KafkaConnection.plain(bootstrap),
            data_dir=data,
            buckets=10,
            topic_prefix=topics.prefix,
            until_idle=3,
            enrich_on_exit=True,
            router_group=unique("router"),
            loader_group=unique("loader"),
            metrics_port=(port := free_port()),
        ),
        clock=FrozenClock(),
    )
    pipeline.run()
    # The Prometheus endpoint reports the workers' own committed counters.
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    scraped = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("bucketer_")
    }
    assert sum(v for k, v in scraped.items() if k.startswith("bucketer_routed_total{")) == pipeline.router.stats.routed
    router_dlq = [v for k, v in scraped.items() if k.startswith("bucketer_dead_letter") and 'stage="router"' in k]
    assert sum(router_dlq) == sum(pipeline.router.stats.dlq.values())
    assert scraped['bucketer_rebuilds_total{bucket="3",status="ok"}'] == 1
    assert pipeline.router is not None and sum(pipeline.router.stats.dlq.values()) > 0
    assert [r.status for r in pipeline.rebuilds] == ["ok"] * 10
    assert {r.snapshot_id for r in pipeline.rebuilds} == {datetime(2026, 1, 1, 0, 0, tzinfo=UTC)}
    with open_warehouse(data) as wh:
        got = live_rows(wh, 10)
        for b, rows in got.items():
            assert all(bucket_of(r[0], 10) == b for r in rows), f"a row in bucket {b} hashes elsewhere"
        assert set().union(*got.values()) == expected
        cleaned = cleaned_ids(wh)
        assert 0 < len(cleaned) < len(expected)  # cleaning drops bots, disabled repositories, ...
        assert set(cleaned) <= {r[-1] for r in expected}

    # 2. Bootstrap a fresh warehouse from the source topic alone: the same live rows, every bucket checked.
    fresh = tmp_path / "fresh"
    with open_warehouse(fresh) as wh:
        ensure_schema(wh, 10)
        report = replay(wh, KafkaConnection.plain(bootstrap), 10, topics=topics)
        assert report.ok and sum(c.misplaced for c in report.checks) == 0
        assert sum(report.dead_lettered.values()) == sum(pipeline.router.stats.dlq.values())
        assert set().union(*live_rows(wh, 10).values()) == expected
        # Replaying again appends only versions already there: nothing changes under FINAL.
        replay(wh, KafkaConnection.plain(bootstrap), 10, topics=topics)
        assert set().union(*live_rows(wh, 10).values()) == expected

    # 3. Rebucket the pipeline's warehouse 10 -> 20: same live rows, each in its new bucket, same cleaned rows.
    with open_warehouse(data) as wh:
        enricher = Enricher(lambda: open_warehouse(data), lock_dir=data / "locks")
        result = rebucket(wh, 20, enricher)
        assert result.old == 10 and result.new == 20 and sum(result.per_bucket) == len(expected)
        moved = live_rows(wh, 20)
        for b, rows in moved.items():
            assert all(bucket_of(r[0], 20) == b for r in rows)
        assert set().union(*moved.values()) == expected
        assert cleaned_ids(wh) == cleaned
        assert (
            wh.rows(
                "SELECT bucketId FROM project_buckets(project = {p:String})",
                {
                    "p": wh.rows(
                        "SELECT slug FROM insightsProjects FINAL WHERE enabled = 1 AND deletedAt IS NULL LIMIT 1"
                    )[0][0]
                },
            )[0][0]
            < 20
        )
        with pytest.raises(RebucketError, match="already has 20"):
            rebucket(wh, 20, enricher)
