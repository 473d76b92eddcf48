"""The loader rides out a broker restart (issue 16.1): `bucketer run` and `bucketer load` run as CLI processes
against a broker of the test's own; the broker is stopped while they load and started again ~8 s later on the
same ports and data, then more traffic comes. Both must exit 0 with the warehouse's live raw rows equal to the
tests' own model (test_pipeline.expected_live, written from the messages, never with the product's SQL).

Also what a loader says about its group: a drained loader's read_committed lag is 0 (transaction markers are
not lag), and a fresh data dir on a group that already committed gets a hint to run `bucketer bootstrap`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from kafkatools import create_topics, unique, wait_until
from test_pipeline import expected_live, live_rows

from bucketer.localkafka import LocalKafka
from connectors.kafka import consumer_config, lag_estimate
from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from connectors.warehouse import open_warehouse
from stream.loader import Loader, LoaderConfig
from stream.loadgen import LoadgenConfig, generate
from stream.schema import ensure_schema

BUCKETS = 4
OUTAGE = 8.0


def produce(bootstrap: str, topics: TopicNames, count: int, seed: int) -> list[bytes | None]:
    """Loadgen traffic on the source and reference topics; returns the activityRelations values sent."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    activity: list[bytes | None] = []
    for g in generate(LoadgenConfig(count=count, seed=seed, segments=30, bad_fraction=0.01)):
        topic = topics.source if g.topic == "activityRelations" else topics.reference(g.topic)
        producer.produce(topic, key=g.key, value=g.value)
        producer.poll(0)
        if g.topic == "activityRelations":
            activity.append(g.value)
    assert producer.flush(60) == 0
    return activity


class Child:
    """A ``bucketer`` CLI process; its stderr goes to a file (read at the end, and kept for a failure)."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bucketer", *args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # a hung child dumps its threads on SIGABRT
            )

    def finish(self, timeout: float) -> tuple[str, str]:
        """(stdout, stderr) of a child that must exit 0 within ``timeout`` without a traceback."""
        try:
            stdout, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
            raise AssertionError(f"still running after {timeout:.0f}s:\n{self.errors()}") from None
        assert self.proc.returncode == 0, f"exit {self.proc.returncode}:\n{self.errors()}"
        err = self.log.read_text()
        assert "Traceback" not in err, self.errors()
        return stdout, err

    def errors(self) -> str:
        """The product's own lines (librdkafka's connection chatter left out), for an assertion message."""
        return "\n".join(line for line in self.log.read_text().splitlines() if "librdkafka" not in line)[-8000:]


def committed_offsets(bootstrap: str, topics: list[str], group: str) -> list[TopicPartition]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        md = c.list_topics(timeout=10).topics
        parts = [TopicPartition(t, p) for t in topics if t in md for p in md[t].partitions]
        return c.committed(parts, timeout=10) if parts else []
    finally:
        c.close()


def loader_joined(bootstrap: str, group: str) -> bool:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    except KafkaException:  # the coordinator is still loading: not yet
        return False
    return desc.state == ConsumerGroupState.STABLE and bool(desc.members)


def bounce(broker: LocalKafka, topics: TopicNames, when: str, group: str = "bucketer-loader") -> float:
    """Stop the broker once the loader group has committed its first bucket rows (``when="committed"``) or
    has just joined (``"joined"``: it is reading its first batch), start it again OUTAGE seconds later (same
    ports, same data); returns how long it was away."""

    def ready() -> bool:
        if when == "joined":
            return loader_joined(broker.bootstrap, group)
        return any(tp.offset > 0 for tp in committed_offsets(broker.bootstrap, topics.buckets(BUCKETS), group))

    wait_until(ready, 90, f"the loader group {when}", 0.2)
    down = time.monotonic()
    broker.stop(grace=20)
    time.sleep(OUTAGE)
    broker.start()
    return time.monotonic() - down


def check_outage_lines(err: str) -> None:
    """One line when the broker goes away and one when it is back (not one per failed attempt), ending back."""
    lines = [line for line in err.splitlines() if "loader: broker" in line]
    assert 2 <= len(lines) <= 4, lines
    assert "loader: broker unreachable, retrying" in lines[0] and "loader: broker back" in lines[-1], lines


def check_rows(data: Path, activity: list[bytes | None]) -> None:
    expected = expected_live(activity)
    assert len(expected) > 1000  # a real workload
    with open_warehouse(data) as wh:
        got = live_rows(wh, BUCKETS)
    assert set().union(*got.values()) == expected


def setup_topics(bootstrap: str) -> TopicNames:
    topics = TopicNames(unique("bounce") + ".")
    create_topics(bootstrap, [topics.source, *topics.references().values()], partitions=3)
    return topics


def test_run_survives_a_broker_restart_mid_load(own_broker: LocalKafka, tmp_path: Path) -> None:
    bootstrap = own_broker.bootstrap
    topics = setup_topics(bootstrap)
    activity = produce(bootstrap, topics, 12_000, seed=8)
    data = tmp_path / "wh"
    common = ["--bootstrap", bootstrap, "--topic-prefix", topics.prefix, "--buckets", str(BUCKETS)]
    run = Child(tmp_path / "run.log", "run", *common, "--data-dir", str(data), "--until-idle", "8")
    assert bounce(own_broker, topics, "committed") >= OUTAGE
    # More traffic after the restart: routed and loaded by the same process, on the same groups.
    activity += produce(bootstrap, topics, 2_000, seed=9)
    stdout, err = run.finish(timeout=150)
    assert "run: loaded" in stdout
    check_outage_lines(err)
    check_rows(data, activity)


def test_load_survives_a_broker_restart_mid_load(own_broker: LocalKafka, tmp_path: Path) -> None:
    bootstrap = own_broker.bootstrap
    topics = setup_topics(bootstrap)
    activity = produce(bootstrap, topics, 8_000, seed=18)
    common = ["--bootstrap", bootstrap, "--topic-prefix", topics.prefix, "--buckets", str(BUCKETS)]
    # Route first (the router alone), then bounce the broker under `load`; after the restart more traffic is
    # routed, which the same `load` must pick up (an outage is not idleness).
    Child(tmp_path / "route1.log", "route", *common, "--until-idle", "3").finish(timeout=120)
    data = tmp_path / "wh"
    load = Child(tmp_path / "load.log", "load", *common, "--data-dir", str(data), "--until-idle", "8")
    assert bounce(own_broker, topics, "joined") >= OUTAGE
    activity += produce(bootstrap, topics, 2_000, seed=19)
    Child(tmp_path / "route2.log", "route", *common, "--until-idle", "3").finish(timeout=120)
    stdout, err = load.finish(timeout=120)
    assert "load:" in stdout
    check_outage_lines(err)
    check_rows(data, activity)


def test_drained_loader_lag_is_zero_and_a_fresh_data_dir_gets_a_bootstrap_hint(
    bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topics = setup_topics(bootstrap)
    produce(bootstrap, topics, 1_500, seed=28)
    common = ["--bootstrap", bootstrap, "--topic-prefix", topics.prefix, "--buckets", str(BUCKETS)]
    group = unique("loader")
    Child(tmp_path / "route.log", "route", *common, "--until-idle", "3").finish(timeout=120)
    # The router writes in transactions: every routed batch ends with a marker on each partition it wrote.
    with open_warehouse(tmp_path / "first") as wh:
        ensure_schema(wh, BUCKETS)
        loader = Loader(
            LoaderConfig(kafka=KafkaConnection.plain(bootstrap), buckets=BUCKETS, group=group, topics=topics), wh
        )
        stats = loader.run(until_idle=3)
    assert stats.committed > 1000
    assert stats.lag == 0
    # The same read_committed view from outside the loader, over every partition it reads.
    buckets = committed_offsets(bootstrap, topics.buckets(BUCKETS), group)
    assert buckets and all(tp.offset > 0 for tp in buckets)
    probe = Consumer(consumer_config(KafkaConnection.plain(bootstrap), group))
    try:
        assert lag_estimate(probe, [TopicPartition(tp.topic, tp.partition) for tp in buckets]) == 0
    finally:
        probe.close()
    # A fresh data dir on the same group: nothing is read again, and the loader says why, in one line.
    fresh = ["--group", group, "--data-dir", str(tmp_path / "fresh"), "--until-idle", "3"]
    stdout, err = Child(tmp_path / "load.log", "load", *common, *fresh).finish(timeout=60)
    assert "load: 0 messages loaded" in stdout
    hints = [line for line in err.splitlines() if "bucketer bootstrap" in line]
    assert len(hints) == 1 and "holds no rows" in hints[0] and group in hints[0], err[-2000:]
    # The data dir that holds the rows gets no hint.
    caplog.set_level(logging.INFO, logger="bucketer.loader")
    with open_warehouse(tmp_path / "first") as wh:
        Loader(
            LoaderConfig(kafka=KafkaConnection.plain(bootstrap), buckets=BUCKETS, group=group, topics=topics), wh
        ).run(until_idle=1)
    assert not [r for r in caplog.records if "bucketer bootstrap" in r.getMessage()]


def test_a_broker_away_past_the_outage_deadline_is_a_one_line_error(own_broker: LocalKafka, tmp_path: Path) -> None:
    bootstrap = own_broker.bootstrap
    topics = setup_topics(bootstrap)
    common = ["--bootstrap", bootstrap, "--topic-prefix", topics.prefix, "--buckets", str(BUCKETS)]
    load = Child(tmp_path / "load.log", "load", *common, "--data-dir", str(tmp_path / "wh"), "--outage-deadline", "6")
    wait_until(lambda: loader_joined(bootstrap, "bucketer-loader"), 90, "the loader group joined", 0.2)
    gone = time.monotonic()
    own_broker.stop(grace=20)
    try:
        load.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        load.proc.send_signal(signal.SIGABRT)
        load.proc.wait(timeout=10)
        raise AssertionError(f"still running 90 s into the outage:\n{load.errors()}") from None
    took = time.monotonic() - gone
    err = load.log.read_text()
    assert load.proc.returncode == 1, load.errors()
    assert "Traceback" not in err and "AssertionError" not in err, load.errors()
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("bucketer: Kafka unreachable for ") and "last error" in last, last
    assert 6 <= took < 60
    own_broker.start()  # the fixture stops it
