"""The one group-lag count (connectors.kafka.group_lag) on a real broker, after the router has written the bucket
topics in transactions: every partition it wrote ends with a commit marker, which takes an offset but is no
message. A drained loader must show 0 (so `bucketer rebucket` is not refused without --force), a lagging one the
number of messages it has not committed, never the markers.

The expected counts come from the generated scenario and from a plain read_committed consumer, not from the
product's lag code."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafkatools import create_topics, drain, unique
from sequinmsgs import Sent, scenario

from connectors.kafka import group_lag
from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from connectors.warehouse import EmbeddedWarehouse
from stream.loader import Loader, LoaderConfig
from stream.rebucket import loader_lag
from stream.router import Router, RouterConfig
from stream.schema import ensure_schema
from stream.status import kafka_figures

BUCKETS = 10


def commit(bootstrap: str, group: str, offsets: list[TopicPartition]) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


def offset_span(bootstrap: str, group: str, topics: list[str]) -> int:
    """high watermark - committed offset (the low watermark without one), summed: the count this replaces."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        md = consumer.list_topics(timeout=10).topics
        parts = [TopicPartition(t, p) for t in topics for p in md[t].partitions]
        total = 0
        for tp in consumer.committed(parts, timeout=10):
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            total += high - (tp.offset if tp.offset >= 0 else low)
        return total
    finally:
        consumer.close()


def bucketer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bucketer", *args],
        env={k: v for k, v in os.environ.items() if k != "BUCKETER_CLICKHOUSE_URL"} | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def routed(bootstrap: str) -> tuple[TopicNames, list[Sent], str]:
    """A scenario routed into 10 bucket topics (3 partitions each) by the real router, in many transactions."""
    names = TopicNames(unique("lag") + ".")
    create_topics(bootstrap, [names.source], partitions=3)
    sents = scenario(7, 400, BUCKETS)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for s in sents:
        producer.produce(names.source, s.value, s.key)
    assert producer.flush(30) == 0
    router_group = unique("router")
    Router(
        RouterConfig(
            kafka=KafkaConnection.plain(bootstrap),
            buckets=BUCKETS,
            group=router_group,
            topic_prefix=names.prefix,
            batch_size=250,
            until_idle=3.0,
            instance_id=unique("lag"),
        )
    ).run()
    return names, sents, router_group


def bucket_messages(sents: list[Sent]) -> int:
    return sum(s.dlq is None for s in sents) + sum(s.retire_bucket is not None for s in sents)


def resolve_messages(sents: list[Sent]) -> int:
    """Copies the router sends to the resolve topic: updates without old values (``changes`` {} or null)."""

    def unknown_old(s: Sent) -> bool:
        m = orjson.loads(s.value) if s.dlq is None and s.value is not None else {}
        return m.get("action") == "update" and not m.get("changes")

    return sum(map(unknown_old, sents))


def test_lag_counts_messages_not_transaction_markers(bootstrap: str, routed) -> None:
    names, sents, router_group = routed
    topics = [*names.buckets(BUCKETS), names.resolve]  # what the loader lands
    expected = bucket_messages(sents) + resolve_messages(sents)
    seen = drain(bootstrap, topics, expected=expected, timeout=60, idle=2)
    assert len(seen) == expected > 1000

    # A loader group that has read nothing: every message, and the markers are not among them.
    fresh = unique("loader")
    lag = group_lag(KafkaConnection.plain(bootstrap), fresh, topics)
    assert (lag.messages, lag.pending, lag.exact, lag.absent) == (expected, 0, True, ())
    assert loader_lag(KafkaConnection.plain(bootstrap), fresh, names, BUCKETS) == expected
    assert offset_span(bootstrap, fresh, topics) > expected  # what high - committed said: markers included

    # A group part-way: committed at the 5th message of every partition. Its lag is the messages from there on.
    by_partition: dict[tuple[str, int], list[int]] = defaultdict(list)
    for m in seen:
        by_partition[(m.topic(), m.partition())].append(m.offset())
    assert len(by_partition) > 3 * BUCKETS  # every bucket partition and the resolve topic's
    partway = unique("loader")
    commit(bootstrap, partway, [TopicPartition(t, p, sorted(offs)[4]) for (t, p), offs in by_partition.items()])
    rest = sum(len(offs) - 4 for offs in by_partition.values())
    assert loader_lag(KafkaConnection.plain(bootstrap), partway, names, BUCKETS) == rest
    assert offset_span(bootstrap, partway, topics) > rest

    # A group committed right after its last message (what a plain consumer commits): drained, although the
    # marker behind the last message leaves high - committed = 1 on every partition.
    done = unique("loader")
    commit(bootstrap, done, [TopicPartition(t, p, max(offs) + 1) for (t, p), offs in by_partition.items()])
    assert offset_span(bootstrap, done, topics) == len(by_partition)
    assert loader_lag(KafkaConnection.plain(bootstrap), done, names, BUCKETS) == 0

    # status: the DLQ holds the bad inputs (written in the router's transactions), the router has no lag.
    dlq, router_lag, _ = kafka_figures(KafkaConnection.plain(bootstrap), names, router_group)
    assert (dlq, router_lag) == (sum(s.dlq is not None for s in sents), 0)
    assert group_lag(KafkaConnection.plain(bootstrap), None, [names.dlq, names.prefix + "missing"]).absent == (
        names.prefix + "missing",
    )


def test_drained_loader_lets_rebucket_through_without_force(bootstrap: str, routed, tmp_path: Path) -> None:
    names, sents, _ = routed
    data = tmp_path / "wh"
    group = unique("loader")
    with EmbeddedWarehouse(data) as wh:
        ensure_schema(wh, BUCKETS)
        loader = Loader(
            LoaderConfig(
                kafka=KafkaConnection.plain(bootstrap), buckets=BUCKETS, group=group, topics=names, max_wait=0.3
            ),
            wh,
        )
        stats = loader.run(until_idle=3.0)
        assert resolve_messages(sents) > 0
        assert stats.messages == bucket_messages(sents) + resolve_messages(sents)  # the loader reads both
    assert loader_lag(KafkaConnection.plain(bootstrap), group, names, BUCKETS) == 0

    common = ["--data-dir", str(data), "--bootstrap", bootstrap, "--topic-prefix", names.prefix]
    # A loader group that has not drained is still refused, with the number of messages it has left.
    lagging = bucketer("rebucket", "--to", "20", *common, "--loader-group", unique("loader"))
    assert lagging.returncode != 0
    assert f"still has {bucket_messages(sents) + resolve_messages(sents)} unloaded messages" in lagging.stderr

    moved = bucketer("rebucket", "--to", "20", *common, "--loader-group", group)
    assert moved.returncode == 0, moved.stderr
    assert "rebucket: 10 -> 20 buckets" in moved.stdout
