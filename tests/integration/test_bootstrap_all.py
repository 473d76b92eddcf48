"""`replay` on a fresh data dir fills the reference tables too (issue 16 item 2), idempotently."""

from __future__ import annotations

from pathlib import Path

from confluent_kafka import Producer
from kafkatools import create_topics, unique

from connectors.kafka_conn import KafkaConnection
from connectors.topics import REFERENCE_TABLES, TopicNames
from connectors.warehouse import open_warehouse
from stream.loadgen import LoadgenConfig, generate
from stream.replay import replay
from stream.schema import ensure_schema


def test_replay_fills_reference_tables_and_twice_changes_nothing(bootstrap: str, tmp_path: Path) -> None:
    topics = TopicNames(unique("boot") + ".")
    create_topics(bootstrap, [topics.source, *topics.references().values()], partitions=3)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    sent: dict[str, int] = dict.fromkeys(REFERENCE_TABLES, 0)
    for g in generate(LoadgenConfig(count=2000, seed=5, segments=20, bad_fraction=0.02)):
        producer.produce(topics.source if g.topic == "activityRelations" else topics.reference(g.topic), g.value, g.key)
        if g.topic in sent:
            sent[g.topic] += 1
    assert producer.flush(60) == 0
    seen: list[tuple[str, int, int]] = []
    with open_warehouse(data_dir=tmp_path / "wh") as wh:
        ensure_schema(wh, 10)
        first = replay(
            wh, KafkaConnection.plain(bootstrap), 10, topics=topics, progress=lambda t, d, n: seen.append((t, d, n))
        )
        assert dict(first.reference_messages) == sent
        for table in REFERENCE_TABLES:
            assert sent[table] > 0 and first.reference_live[table] > 0, table
        assert first.ok and sum(first.written.values()) > 1000
        again = replay(wh, KafkaConnection.plain(bootstrap), 10, topics=topics)
        assert again.reference_live == first.reference_live
        assert [c.live_rows for c in again.checks] == [c.live_rows for c in first.checks]
    assert {t for t, _, _ in seen} == {topics.source, *topics.references().values()}
