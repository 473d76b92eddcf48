"""`bucketer dlq list` / `dlq redrive` on the real broker (issue 14, "dead letters you can act on").

The router dead-letters every bad class (tests/sequinmsgs.py); `dlq list` reports them by class with their
source offsets. For the redrive, dead letters are also written the way an older worker with a stricter rule
would have (good Sequin changes, a wrong class): once redriven, the current router routes them into their
buckets; a second redrive sends nothing; dead letters without their original bytes are skipped."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

from confluent_kafka import Producer
from kafkatools import create_topics, drain, unique
from sequinmsgs import bad_messages, message, row

from connectors.kafka import H_SOURCE_TOPIC, dlq_headers
from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from stream.buckets import bucket_of
from stream.dlq import H_REDRIVEN_FROM, Selection, read_dead_letters, redrive
from stream.router import Router, RouterConfig

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bucketer", *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=os.environ
    )


def route(bootstrap: str, names: TopicNames, group: str) -> Router:
    router = Router(
        RouterConfig(
            kafka=KafkaConnection.plain(bootstrap), buckets=10, group=group, topic_prefix=names.prefix, until_idle=3.0
        )
    )
    router.run()
    return router


def test_list_then_redrive_once(bootstrap: str, group: str) -> None:
    names = TopicNames(unique("dlq") + ".")
    create_topics(bootstrap, [names.source, names.dlq, *names.buckets(10)], partitions=3)
    rng = random.Random(3)
    segments = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(8)]
    bad = bad_messages(rng, segments)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for s in bad:
        p.produce(names.source, s.value, s.key)
    # Dead letters of good changes, as a worker with a stricter rule would have written them.
    wrongly = [(f"w{i}".encode(), message("insert", row(rng, f"wrong-{i}", rng.choice(segments)))) for i in range(7)]
    for i, (key, value) in enumerate(wrongly):
        p.produce(names.dlq, value, key, headers=dlq_headers("bad_column", "stricter rule", names.source, 0, 9000 + i))
    assert p.flush(30) == 0

    first = route(bootstrap, names, group)
    assert sum(first.stats.dlq.values()) == len(bad)

    listed = cli("dlq", "list", "--bootstrap", bootstrap, "--topic-prefix", names.prefix, "--json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    got = {c["error_class"]: c["count"] for c in doc["classes"]}
    want = Counter(s.dlq for s in bad)
    want["bad_column"] += len(wrongly)
    assert got == dict(want)
    assert all(c["stage"] == "router" and c["samples"] for c in doc["classes"])
    assert doc["classes"][0]["samples"][0]["source"].startswith(names.source + "/")
    table = cli("dlq", "list", "--bootstrap", bootstrap, "--topic-prefix", names.prefix, "--class", "not_json")
    assert table.returncode == 0 and "not_json" in table.stdout and "bad_column" not in table.stdout

    # Dry run: says what it would send, sends nothing.
    dry = redrive(KafkaConnection.plain(bootstrap), names, Selection(frozenset({"bad_column"})), dry_run=True)
    bad_column_bad = sum(1 for s in bad if s.dlq == "bad_column")
    assert dry.total_sent == len(wrongly) + bad_column_bad
    assert not any(m.topic() == names.source for m in drain(bootstrap, [names.source], idle=1) if m.headers())

    out = cli("dlq", "redrive", "--bootstrap", bootstrap, "--topic-prefix", names.prefix, "--class", "bad_column")
    assert out.returncode == 0, out.stderr
    assert f"sent {len(wrongly) + bad_column_bad};" in out.stdout
    redriven = [m for m in drain(bootstrap, [names.source], idle=2) if dict(m.headers() or {}).get(H_REDRIVEN_FROM)]
    assert sorted((m.key(), m.value()) for m in redriven) == sorted(
        [*wrongly, *((s.key, s.value) for s in bad if s.dlq == "bad_column")]
    )

    # The current router takes the wrongly dead-lettered changes into their buckets; the really bad ones go
    # back to the DLQ (new dead letters, with the redriven ones' source offsets).
    second = route(bootstrap, names, group)
    assert second.stats.dlq == Counter({"bad_column": bad_column_bad})
    landed = drain(bootstrap, names.buckets(10), expected=len(wrongly), timeout=30, idle=2)
    assert sorted((m.key(), m.value()) for m in landed) == sorted(wrongly)
    for m in landed:
        seg = json.loads(m.value())["record"]["segmentId"]
        assert m.topic() == names.bucket(bucket_of(seg, 10))

    # A second redrive sends nothing it sent before (only the new dead letters of the second routing).
    again = redrive(KafkaConnection.plain(bootstrap), names, Selection(frozenset({"bad_column"})))
    assert again.already == len(wrongly) + bad_column_bad and again.total_sent == bad_column_bad
    third = redrive(KafkaConnection.plain(bootstrap), names, Selection(frozenset({"bad_column"})))
    assert third.total_sent == 0

    # Tombstones have no original bytes: skipped, never sent as empty values.
    tomb = redrive(KafkaConnection.plain(bootstrap), names, Selection(frozenset({"tombstone"})))
    assert tomb.total_sent == 0 and tomb.skipped["tombstone"] == sum(1 for s in bad if s.dlq == "tombstone")
    letters = list(read_dead_letters(KafkaConnection.plain(bootstrap), names))
    assert {d.source_topic for d in letters} == {names.source}
    assert all(dict((k, v) for k, v in [(H_SOURCE_TOPIC, d.source_topic)]) for d in letters)


def test_unreachable_broker_and_missing_topic_are_one_line_errors(bootstrap: str) -> None:
    missing = cli("dlq", "list", "--bootstrap", bootstrap, "--topic-prefix", unique("nodlq") + ".")
    assert missing.returncode == 1 and "no dead-letter topic" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    bad_since = cli("dlq", "list", "--bootstrap", bootstrap, "--since", "yesterday")
    assert bad_since.returncode == 2 and "--since" in bad_since.stderr
