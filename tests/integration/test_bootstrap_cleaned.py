"""Bootstrap from scratch builds the same cleaned buckets as a normal load (issue 16 item 2): a fresh data dir,
all six topics replayed, then the cleaned rows equal the tests' own Sequin model (tests/cleaned_model.py) —
and equal what `run` builds from the same topics."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from cleaned_model import CleanedModel, cleaned_union_rows
from clocks import FrozenClock
from confluent_kafka import Producer
from kafkatools import create_topics, unique

from bucketer.localkafka import free_port
from connectors.countries import organization_country_code
from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from connectors.warehouse import open_warehouse
from stream.enrich import Enricher
from stream.loadgen import LoadgenConfig, generate
from stream.pipeline import Pipeline, PipelineConfig
from stream.replay import replay
from stream.schema import ensure_schema


def test_bootstrap_from_scratch_gives_the_cleaned_rows_of_the_model_and_of_a_normal_load(
    bootstrap: str, tmp_path: Path
) -> None:
    topics = TopicNames(unique("bootc") + ".")
    create_topics(bootstrap, [topics.source, *topics.references().values()], partitions=3)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    model = CleanedModel(organization_country_code)
    for g in generate(LoadgenConfig(count=3000, seed=21, segments=20, bad_fraction=0.02)):
        producer.produce(topics.source if g.topic == "activityRelations" else topics.reference(g.topic), g.value, g.key)
        model.feed(g.topic, [g.value])
    assert producer.flush(60) == 0
    expected = model.expected()
    # The generator's workload exercises the rules: some rows kept, some dropped for each reason.
    assert 500 < len(expected) < 3000
    assert model.allowed_channels() and len(model.real_members()) < len(model._live("members"))

    fresh = tmp_path / "fresh"
    with open_warehouse(fresh) as wh:
        ensure_schema(wh, 10)
        report = replay(wh, KafkaConnection.plain(bootstrap), 10, topics=topics)
        assert report.ok
    results = Enricher(lambda: open_warehouse(fresh), lock_dir=fresh / "locks").rebuild_many(range(10))
    assert [r.status for r in results] == ["ok"] * 10
    with open_warehouse(fresh) as wh:
        booted = cleaned_union_rows(wh)
    assert len(booted) == len(set(booted))
    assert set(booted) == expected

    # The CLI shows a bar per topic (stderr) and the rows per reference table (stdout).
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bucketer",
            "bootstrap",
            "--bootstrap",
            bootstrap,
            "--topic-prefix",
            topics.prefix,
            "--data-dir",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    for table, live in report.reference_live.items():
        assert re.search(rf"^{table} +[\d,]+ +[\d,]+ +{live:,}$", out.stdout, re.M), (table, live, out.stdout)
        assert topics.reference(table) in out.stderr
    assert topics.source in out.stderr and "bucketer enrich --all" in out.stdout

    loaded = tmp_path / "loaded"
    Pipeline(
        PipelineConfig(
            kafka=KafkaConnection.plain(bootstrap),
            data_dir=loaded,
            buckets=10,
            topic_prefix=topics.prefix,
            until_idle=3,
            enrich_on_exit=True,
            router_group=unique("router"),
            loader_group=unique("loader"),
            metrics_port=free_port(),
        ),
        clock=FrozenClock(),
    ).run()
    with open_warehouse(loaded) as wh:
        normal = cleaned_union_rows(wh)
    assert sorted(normal) == sorted(booted)
