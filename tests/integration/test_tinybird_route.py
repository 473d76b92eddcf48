"""The router with ``--sink tinybird`` against a real broker and the Tinybird stand-in: every good message
lands in the data source of its bucket at least once, bad input goes to the DLQ only, a crash between a
send and its commit loses nothing, and offsets end committed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from kafkatools import drain, unique
from proctools import repo_env
from sequin_oracle import routable as good
from tinybird_standin import Reply, Standin

from connectors.kafka_conn import KafkaConnection
from connectors.tinybird import TinybirdSettings
from connectors.tinybird_api import Secret
from connectors.topics import TopicNames
from stream.buckets import bucket_of
from stream.loadgen import LoadgenConfig, generate
from stream.loadgen_producer import LoadProducer, ProducerSettings, ensure_topics
from stream.router import Router, RouterConfig

TOKEN = "p.integration-secret-777"
BUCKETS = 4
CHILD = Path(__file__).resolve().parents[1] / "tinybird_router_child.py"


def load(bootstrap: str, prefix: str, count: int, seed: int) -> list[tuple[bytes, bytes | None]]:
    config = LoadgenConfig(count=count, seed=seed, segments=15, bad_fraction=0.05)
    settings = ProducerSettings(kafka=KafkaConnection.plain(bootstrap), topic_prefix=prefix, partitions=3)
    ensure_topics(settings)
    with LoadProducer(settings) as producer:
        producer.run(config)
    return [(k, v) for t, k, v in generate(config) if t == "activityRelations"]


def committed_and_end(bootstrap: str, group: str, topic: str) -> dict[int, tuple[int, int]]:
    """Per partition: (committed offset or -1, end offset)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(topic, p) for p in range(3)]
        return {
            tp.partition: (max(tp.offset, -1), c.get_watermark_offsets(tp, timeout=10)[1])
            for tp in c.committed(parts, timeout=10)
        }
    finally:
        c.close()


def committed_equals_end(bootstrap: str, group: str, topic: str) -> bool:
    return all(done == end for done, end in committed_and_end(bootstrap, group, topic).values())


def check_landed(standin: Standin, messages: list[tuple[bytes, bytes | None]]) -> Counter[bytes]:
    landed: Counter[bytes] = Counter()
    where: dict[bytes, set[str]] = {}
    for ds, rows in standin.rows.items():
        for row in rows:
            landed[row] += 1
            where.setdefault(row, set()).add(ds)
    expected_good = 0
    for _, value in messages:
        msg = good(value)
        if msg is None:
            assert value not in landed, "bad input reached Tinybird"
            continue
        expected_good += 1
        ds = f"activityRelations_bucket_MV_ds_{bucket_of(msg['record']['segmentId'], BUCKETS)}"
        assert landed[value] >= 1, "a good message never landed"
        assert where[value] == {ds}
        changes = msg.get("changes") or {}
        sid = msg["record"]["segmentId"]
        if msg["action"] == "update" and changes.get("segmentId", sid) != sid:
            old_ds = f"activityRelations_bucket_MV_ds_{bucket_of(changes['segmentId'], BUCKETS)}"
            retired = [json.loads(r) for r in standin.rows[old_ds] if b'"retirement"' in r]
            assert any(
                r["record"]["activityId"] == msg["record"]["activityId"]
                and r["record"]["segmentId"] == changes["segmentId"]
                for r in retired
            )
    assert expected_good > 500
    return landed


def router_config(
    bootstrap: str, prefix: str, group: str, url: str, instance: str | None = None, idle: float = 4
) -> RouterConfig:
    tb = TinybirdSettings(
        url=url,
        token=Secret(TOKEN),
        linger=0.05,
        max_batch_bytes=50_000,
        backoff_base=0.05,
        backoff_cap=0.5,
    )
    return RouterConfig(
        kafka=KafkaConnection.plain(bootstrap),
        buckets=BUCKETS,
        group=group,
        topic_prefix=prefix,
        sink="tinybird",
        tinybird=tb,
        batch_size=200,
        batch_time=0.2,
        until_idle=idle,
        exactly_once=False,
        instance_id=instance or unique("tb"),
    )


def test_every_good_message_lands_in_its_data_source_bad_ones_in_the_dlq(bootstrap: str, group: str) -> None:
    prefix = unique("tbr") + "."
    messages = load(bootstrap, prefix, 1200, seed=21)
    with Standin(token=TOKEN) as standin:
        standin.script(
            "activityRelations_bucket_MV_ds_1", Reply(429, {"Retry-After": "0.5"}), Reply(503), Reply(200, delay=0.5)
        )
        standin.script("activityRelations_bucket_MV_ds_2", Reply(200, quarantine=1))
        Router(router_config(bootstrap, prefix, group, standin.url)).run()
        check_landed(standin, messages)
    bad = [v for _, v in messages if good(v) is None]
    dlq = drain(bootstrap, [TopicNames(prefix).dlq], expected=len(bad), timeout=30)
    assert Counter(m.value() or None for m in dlq) == Counter(bad)
    assert committed_equals_end(bootstrap, group, TopicNames(prefix).source)


@pytest.mark.timeout(240)
def test_a_crash_between_send_and_commit_loses_nothing(bootstrap: str, group: str) -> None:
    prefix = unique("tbc") + "."
    messages = load(bootstrap, prefix, 1500, seed=22)
    with Standin(token=TOKEN) as standin:
        child = subprocess.run(
            [sys.executable, str(CHILD), bootstrap, prefix, group, standin.url, str(BUCKETS), "60"],
            input=TOKEN + "\n",
            capture_output=True,
            text=True,
            timeout=120,
            env=repo_env(),
        )
        assert child.returncode == 9, child.stdout + child.stderr
        # the crash came after some offsets were committed, with rows sent beyond them (sent, not committed)
        progress = committed_and_end(bootstrap, group, TopicNames(prefix).source)
        assert any(done > 0 for done, _ in progress.values()), progress
        assert any(done < end for done, end in progress.values()), progress
        before = sum(len(r) for r in standin.rows.values())
        assert before > 0
        # the restarted router has the dead one's instance id (static membership: it takes over at once)
        Router(router_config(bootstrap, prefix, group, standin.url, instance="crash-child", idle=8)).run()
        assert committed_equals_end(bootstrap, group, TopicNames(prefix).source), "the restart did not finish"
        landed = check_landed(standin, messages)
    assert any(n > 1 for v, n in landed.items() if good(v) and sum(1 for _, x in messages if x == v) == 1), (
        "nothing was re-sent after the crash: the test did not crash between a send and its commit"
    )
    assert committed_equals_end(bootstrap, group, TopicNames(prefix).source)
    assert TOKEN not in child.stdout + child.stderr


def run_route_cli(bootstrap: str, prefix: str, group: str, url: str, token: str) -> subprocess.CompletedProcess[str]:
    import os
    import shutil

    exe = shutil.which("bucketer", path=str(Path(sys.executable).parent)) or "bucketer"
    env = {**os.environ, "BUCKETER_TINYBIRD_TOKEN": token}
    return subprocess.run(
        [
            exe,
            "route",
            "--bootstrap",
            bootstrap,
            "--buckets",
            str(BUCKETS),
            "--sink",
            "tinybird",
            "--tinybird-url",
            url,
            "--topic-prefix",
            prefix,
            "--group",
            group,
            "--until-idle",
            "4",
            "--at-least-once",
            "--progress",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_route_cli_sink_tinybird_delivers_and_never_prints_the_token(bootstrap: str, group: str) -> None:
    prefix = unique("tbcli") + "."
    messages = load(bootstrap, prefix, 800, seed=23)
    with Standin(token=TOKEN) as standin:
        standin.script("activityRelations_bucket_MV_ds_0", Reply(503), Reply(429, {"Retry-After": "0.3"}))
        done = run_route_cli(bootstrap, prefix, group, standin.url, TOKEN)
        assert done.returncode == 0, done.stderr[-3000:]
        check_landed(standin, messages)
    assert committed_equals_end(bootstrap, group, TopicNames(prefix).source)
    assert TOKEN not in done.stdout + done.stderr
    assert "activityRelations_bucket_MV_ds_0" in done.stderr  # the retries were logged, by data source


def test_route_cli_wrong_token_stops_with_a_clear_error_and_commits_nothing(bootstrap: str, group: str) -> None:
    prefix = unique("tbbad") + "."
    load(bootstrap, prefix, 200, seed=24)
    wrong = "p.wrong-token-for-the-cli-5150"
    with Standin(token=TOKEN) as standin:
        done = run_route_cli(bootstrap, prefix, group, standin.url, wrong)
        assert all(len(rows) == 0 for rows in standin.rows.values())
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("bucketer:") and "403" in last and "token" in last
    assert wrong not in done.stdout + done.stderr and TOKEN not in done.stdout + done.stderr
    assert all(c == -1 for c, _ in committed_and_end(bootstrap, group, TopicNames(prefix).source).values())
