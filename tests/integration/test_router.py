"""The router on a real broker: every good message exactly once in its bucket (read_committed), every bad
one in the DLQ, retirements in the old buckets; across SIGKILLs of the process and a broker stop/start."""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from kafkatools import create_topics, drain, unique, wait_until
from sequinmsgs import Sent, scenario

from bucketer.localkafka import LocalKafka
from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from stream.router import Router, RouterConfig

ROOT = Path(__file__).resolve().parents[2]


def produce(bootstrap: str, topic: str, sents: list[Sent]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for s in sents:
        p.produce(topic, s.value, s.key)
        p.poll(0)
    assert p.flush(30) == 0


def expected_outputs(sents: list[Sent]) -> int:
    return len(sents) + sum(s.retire_bucket is not None for s in sents)


def check_exactly_once(bootstrap: str, names: TopicNames, buckets: int, sents: list[Sent]) -> None:
    """Read every bucket topic and the DLQ read_committed and compare with the expectations: the same
    multiset (so nothing lost, nothing duplicated), original bytes and key, and each key's order kept."""
    topics = [*names.buckets(buckets), names.dlq]
    got = drain(bootstrap, topics, expected=expected_outputs(sents), timeout=90, idle=3)
    rows, retired, dlq = Counter(), Counter(), Counter()
    order: dict[tuple[int, bytes | None], list[bytes]] = defaultdict(list)
    for m in got:
        headers = dict(m.headers() or [])
        if m.topic() == names.dlq:
            dlq[(m.key(), m.value(), headers["bucketer-error-class"].decode())] += 1
            assert headers["bucketer-source-topic"] == names.source.encode()
            assert int(headers["bucketer-source-offset"]) >= 0
            continue
        b = names.bucket_of_topic(m.topic())
        assert b is not None and 0 <= b < buckets
        if headers.get("bucketer-derived") == b"retirement":
            ret = orjson.loads(m.value())
            assert ret["action"] == "delete" and ret["metadata"]["bucketer"]["derived"] == "retirement"
            retired[(b, m.key(), ret["record"]["segmentId"])] += 1
        else:
            rows[(b, m.key(), m.value())] += 1
            order[(b, m.key())].append(m.value())
    want_rows = Counter((s.bucket, s.key, s.value) for s in sents if s.dlq is None)
    want_retired = Counter((s.retire_bucket, s.key, s.retire_segment) for s in sents if s.retire_bucket is not None)
    want_dlq = Counter((s.key, s.value, s.dlq) for s in sents if s.dlq)
    assert rows - want_rows == Counter(), "duplicated or misrouted rows"
    assert want_rows - rows == Counter(), "lost rows"
    assert retired == want_retired
    assert dlq == want_dlq
    want_order: dict[tuple[int, bytes | None], list[bytes]] = defaultdict(list)
    for s in sents:
        if s.dlq is None:
            want_order[(s.bucket, s.key)].append(s.value)  # type: ignore[index, arg-type]
    assert order == want_order, "the changes of one activity are out of order in its bucket"
    assert len(got) == expected_outputs(sents)


def setup(bootstrap: str, seed: int, activities: int, buckets: int) -> tuple[TopicNames, list[Sent]]:
    names = TopicNames(unique("rt") + ".")
    create_topics(bootstrap, [names.source], partitions=3)
    sents = scenario(seed, activities, buckets)
    produce(bootstrap, names.source, sents)
    return names, sents


@pytest.mark.parametrize("buckets", [10, 20])
def test_mixed_messages_land_exactly_once(bootstrap: str, group: str, buckets: int) -> None:
    names, sents = setup(bootstrap, buckets, 1200, buckets)
    assert len(sents) > 3000
    router = Router(
        RouterConfig(
            kafka=KafkaConnection.plain(bootstrap),
            buckets=buckets,
            group=group,
            topic_prefix=names.prefix,
            batch_size=700,
            until_idle=3.0,
            instance_id="t",
        )
    )
    router.run()
    check_exactly_once(bootstrap, names, buckets, sents)
    st = router.stats
    assert st.routed == len(sents) - sum(st.dlq.values()) + st.retirements
    assert st.dlq == Counter(s.dlq for s in sents if s.dlq)
    assert st.retirements == sum(s.retire_bucket is not None for s in sents)
    assert st.old_values_unknown > 0


def test_at_least_once_mode_delivers_everything(bootstrap: str, group: str) -> None:
    names, sents = setup(bootstrap, 5, 400, 10)
    router = Router(
        RouterConfig(
            kafka=KafkaConnection.plain(bootstrap),
            buckets=10,
            group=group,
            topic_prefix=names.prefix,
            exactly_once=False,
            until_idle=3.0,
            instance_id="alo",
        )
    )
    router.run()
    check_exactly_once(bootstrap, names, 10, sents)  # a clean run has no replays


def committed(bootstrap: str, group: str, topic: str, partitions: int = 3) -> int:
    """The group's committed offsets; read_uncommitted so a killed router's pending transaction does not
    make the fetch wait (it counts only what was committed)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return sum(max(tp.offset, 0) for tp in tps)
    except KafkaException:  # e.g. the coordinator is still loading after a broker restart
        return -1
    finally:
        c.close()


def high_watermarks(bootstrap: str, topics: list[str]) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("wm")})
    try:
        total = 0
        for t in topics:
            for p in c.list_topics(t, timeout=10).topics[t].partitions:
                total += c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
        return total
    except Exception:  # noqa: BLE001 - topics not created yet
        return 0
    finally:
        c.close()


def route_cmd(bootstrap: str, names: TopicNames, group: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bucketer.cli",
        "route",
        "--bootstrap",
        bootstrap,
        "--buckets",
        "10",
        "--group",
        group,
        "--topic-prefix",
        names.prefix,
        "--progress",
        "1",
    ]


def route_process(
    bootstrap: str, names: TopicNames, group: str, *extra: str, instance: str = "kill-test"
) -> subprocess.Popen[bytes]:
    """``bucketer route`` as a child; its stderr goes to a file (a pipe nobody reads could fill up)."""
    cmd = [*route_cmd(bootstrap, names, group), "--instance-id", instance, *extra]
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    STDERR[proc.pid] = err
    return proc


STDERR: dict[int, Any] = {}


def tail(proc: subprocess.Popen[bytes]) -> str:
    err = STDERR[proc.pid]
    err.seek(0)
    return str(err.read().decode(errors="replace")[-2000:])


def test_sigkill_mid_stream_then_restart_loses_and_duplicates_nothing(bootstrap: str, group: str) -> None:
    names, sents = setup(bootstrap, 77, 1500, 10)
    outputs = [*names.buckets(10), names.dlq]
    total_in = len(sents)
    for i in range(3):
        proc = route_process(bootstrap, names, group, "--batch-size", "40", "--batch-time", "0.2")
        start = high_watermarks(bootstrap, outputs)

        def progressed(proc: subprocess.Popen[bytes] = proc, start: int = start) -> bool:
            return proc.poll() is not None or high_watermarks(bootstrap, outputs) > start + 300

        try:
            wait_until(progressed, 60, "router output")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL, tail(proc)
        done = committed(bootstrap, group, names.source)
        assert done < total_in, f"kill {i} came after the router had finished ({done}/{total_in})"
    proc = route_process(bootstrap, names, group, "--until-idle", "4")
    try:
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, tail(proc)
    assert committed(bootstrap, group, names.source) == total_in
    check_exactly_once(bootstrap, names, 10, sents)


def test_broker_stop_start_mid_stream_router_recovers(own_broker: LocalKafka) -> None:
    bootstrap = own_broker.bootstrap
    names = TopicNames(unique("bk") + ".")
    group = unique("group")
    create_topics(bootstrap, [names.source], partitions=3)
    sents = scenario(99, 900, 10)
    half = len(sents) // 2
    produce(bootstrap, names.source, sents[:half])
    router = Router(
        RouterConfig(
            kafka=KafkaConnection.plain(bootstrap),
            buckets=10,
            group=group,
            topic_prefix=names.prefix,
            batch_size=50,
            batch_time=0.2,
            instance_id="bk",
            progress_interval=1.0,
        )
    )
    failure: list[BaseException] = []

    def run() -> None:
        try:
            router.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: router.stats.routed > 200, 60, "first routed batches")
        own_broker.stop(grace=10)
        time.sleep(3)
        own_broker.start()
        produce(bootstrap, names.source, sents[half:])
        try:
            wait_until(
                lambda: failure or committed(bootstrap, group, names.source) == len(sents),
                180,
                "the router to catch up after the broker restart",
                interval=1.0,
            )
        except AssertionError:
            faulthandler.dump_traceback(all_threads=True)  # where the router is, for the report
            raise
    finally:
        router.stop()
        thread.join(60)
    assert not thread.is_alive(), "router did not stop"
    assert failure == []
    check_exactly_once(bootstrap, names, 10, sents)


def test_sigterm_stops_gracefully_with_exit_0(bootstrap: str, group: str) -> None:
    names, sents = setup(bootstrap, 3, 200, 10)
    proc = route_process(bootstrap, names, group)
    try:
        wait_until(
            lambda: proc.poll() is not None or committed(bootstrap, group, names.source) == len(sents),
            60,
            "the router to route everything",
        )
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, tail(proc)
    check_exactly_once(bootstrap, names, 10, sents)


def test_unreachable_broker_is_one_clear_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETER_")}
    r = subprocess.run(
        [sys.executable, "-m", "bucketer.cli", "route", "--bootstrap", "127.0.0.1:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bucketer: cannot reach Kafka at 127.0.0.1:1"), r.stderr


def test_second_router_joining_mid_stream_rebalances_without_duplicates(bootstrap: str, group: str) -> None:
    """Router A routes alone; router B joins the group mid-stream (a rebalance revokes A's partitions
    between batches), then more input arrives for both; SIGTERM both: everything exactly once."""
    names, first = setup(bootstrap, 31, 800, 10)
    rest = scenario(32, 800, 10)
    outputs = [*names.buckets(10), names.dlq]
    a = route_process(bootstrap, names, group, "--batch-size", "40", "--batch-time", "0.2")
    b = None
    try:
        wait_until(lambda: a.poll() is not None or high_watermarks(bootstrap, outputs) > 300, 60, "router A output")
        b = route_process(bootstrap, names, group, "--batch-size", "40", instance="joiner")
        produce(bootstrap, names.source, rest)
        total = len(first) + len(rest)
        wait_until(
            lambda: (
                a.poll() is not None
                or b.poll() is not None  # type: ignore[union-attr]
                or committed(bootstrap, group, names.source) == total
            ),
            120,
            "both routers to finish",
        )
        assert a.poll() is None and b.poll() is None, "a router died"
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (a, b):
            if proc is not None:
                assert proc.wait(30) == 0, tail(proc)
    check_exactly_once(bootstrap, names, 10, first + rest)
