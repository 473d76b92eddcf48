"""Restarts without rebalances (issue 14): a worker restarted with the same ``group.instance.id`` (static
membership) gets its partitions back and the other members of its group never see a rebalance; nothing is lost
or read twice. Real broker, real embedded warehouse; the other member's rebalance callbacks are the observation.
"""

from __future__ import annotations

import re
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from kafkatools import create_topics, unique, wait_until
from sequinmsgs import scenario
from test_loader import N, activity, change, final_rows, live_rows, on_topics, produce, topics  # noqa: F401
from test_router import STDERR, check_exactly_once, committed, route_process, tail
from test_router import produce as produce_sents

from connectors.kafka import Member
from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from connectors.warehouse import EmbeddedWarehouse
from stream.buckets import bucket_of
from stream.loader import Loader, LoaderConfig
from stream.router import Router, RouterConfig
from stream.schema import ensure_schema


class Watched:
    """A mixin before a worker class: records its rebalance callbacks ("assign" | "revoke", partitions)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, frozenset[tuple[str, int]]]] = []

    def record(self, kind: str, partitions: list[TopicPartition]) -> None:
        self.events.append((kind, frozenset((tp.topic, tp.partition) for tp in partitions)))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.record("assign", partitions)
        super()._on_assign(consumer, partitions)  # type: ignore[misc]

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.record("revoke", partitions)
        super()._on_revoke(consumer, partitions)  # type: ignore[misc]


class WatchedLoader(Watched, Loader):
    pass


class WatchedRouter(Watched, Router):
    pass


class Running:
    """A worker's run() in a thread; its failure is kept for the test."""

    def __init__(self, worker: Loader | Router) -> None:
        self.worker = worker
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._body, daemon=True)
        self.thread.start()

    def _body(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self.errors.append(exc)

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), f"{type(self.worker).__name__} did not stop"
        assert self.errors == [], self.errors


def test_a_restarted_static_loader_gets_its_partitions_back_with_no_rebalance(
    bootstrap: str,
    topics: TopicNames,  # noqa: F811 - test_loader's fixture
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with EmbeddedWarehouse(data) as wh:
        ensure_schema(wh, N)
    group = unique("static-loader")
    segs = [str(uuid.uuid4()) for _ in range(8)]
    first = [change("insert", activity(segs[i % 8], i)) for i in range(160)]
    second = [change("insert", activity(segs[i % 8], i)) for i in range(160, 320)]
    # An update of a row of the first lot, so the restarted loader's share is not only new keys.
    second.append(change("update", {**first[3]["record"], "score": 9, "updatedAt": "2025-05-02T00:00:00.000000Z"}))
    produce(bootstrap, on_topics(topics, first))
    partitions = {(t, p) for t in [*topics.buckets(N), *topics.references().values()] for p in range(2)}

    def loader(name: str, wh: EmbeddedWarehouse) -> WatchedLoader:
        cfg = LoaderConfig(
            kafka=KafkaConnection.plain(bootstrap),
            buckets=N,
            group=group,
            topics=topics,
            max_rows=1000,
            max_wait=0.3,
            instance_id=name,
        )
        return WatchedLoader(cfg, wh)

    with EmbeddedWarehouse(data) as wh_x, EmbeddedWarehouse(data) as wh_y, EmbeddedWarehouse(data) as wh_z:
        x = Running(loader("x", wh_x))
        wait_until(lambda: x.worker._assigned == partitions or x.errors, 60, "loader x to get every partition")
        y = Running(loader("y", wh_y))

        def settled() -> bool:
            mine, theirs = x.worker._assigned, y.worker._assigned
            return bool(theirs) and not mine & theirs and mine | theirs == partitions

        wait_until(lambda: settled() or y.errors, 60, "loader y to join and the group to settle")
        wait_until(
            lambda: x.worker.stats.committed + y.worker.stats.committed >= len(first) or x.errors or y.errors,
            60,
            "the first lot loaded",
        )
        x_seen = list(x.worker.events)
        # Cooperative-sticky: y's join revoked only the partitions y took; x kept the others all along (the
        # protocol's later rounds call on_assign with nothing new).
        y_share = frozenset(y.worker._assigned)
        changes = [(kind, parts) for kind, parts in x_seen if parts]
        assert changes == [("assign", partitions), ("revoke", y_share)], x_seen

        y.stop()  # a static member sends no LeaveGroup: its partitions wait for it (session timeout 30 s)
        produce(bootstrap, on_topics(topics, second))
        z = Running(loader("y", wh_z))  # the restart: the same instance id
        wait_until(lambda: z.worker._assigned or z.errors, 30, "the restarted loader to get its partitions")
        total = len(first) + len(second)
        wait_until(
            lambda: (
                x.worker.stats.committed + y.worker.stats.committed + z.worker.stats.committed >= total
                or x.errors
                or z.errors
            ),
            60,
            "the second lot loaded",
        )
        assert z.worker._assigned == y_share
        assert [e for e in z.worker.events if e[1]] == [("assign", y_share)], z.worker.events
        assert x.worker.events == x_seen, "the other loader saw a rebalance"
        z.stop()
        x.stop()
        read = x.worker.stats.messages + y.worker.stats.messages + z.worker.stats.messages
        assert read == total, f"{read} messages read for {total} produced: something was read twice or lost"
        rows = final_rows(wh_x)
    by_bucket: dict[int, list[dict[str, Any]]] = {n: [] for n in range(N)}
    for m in first + second:
        by_bucket[bucket_of(m["record"]["segmentId"], N)].append(m)
    assert rows == {n: live_rows(msgs) for n, msgs in by_bucket.items()}


def whole_stderr(proc: Any) -> str:
    err = STDERR[proc.pid]
    err.seek(0)
    return str(err.read().decode(errors="replace"))


def test_a_restarted_static_router_resumes_its_partitions_and_the_other_never_rebalances(bootstrap: str) -> None:
    """Router a (a process) is killed mid-stream and started again with the same --instance-id; router b (in
    this process) routes on and its callbacks never fire again; every change lands exactly once."""
    names = TopicNames(unique("rt") + ".")
    create_topics(bootstrap, [names.source], partitions=3)
    sents = scenario(114, 1500, 10)
    # The second part is produced only while a is down: its partitions then hold work that only a restarted a
    # can route (b must not take them), however fast the first part was routed. Each key's order is kept.
    half = len(sents) * 2 // 5
    produce_sents(bootstrap, names.source, sents[:half])
    group = unique("static-router")
    a = route_process(bootstrap, names, group, "--batch-size", "40", "--batch-time", "0.2", instance="a")
    b = None
    try:
        wait_until(lambda: a.poll() is not None or "INFO assigned" in whole_stderr(a), 60, "router a to get partitions")
        b = Running(
            WatchedRouter(
                RouterConfig(
                    kafka=KafkaConnection.plain(bootstrap),
                    buckets=10,
                    group=group,
                    topic_prefix=names.prefix,
                    batch_size=40,
                    batch_time=0.2,
                    instance_id="b",
                )
            )
        )
        router_b: WatchedRouter = b.worker  # type: ignore[assignment]
        wait_until(lambda: router_b.events or b.errors, 60, "router b to join")
        wait_until(lambda: committed(bootstrap, group, names.source) > 300, 60, "both routing")
        b_seen = list(router_b.events)
        assert b_seen[-1][0] == "assign" and b_seen[-1][1], b_seen
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        produce_sents(bootstrap, names.source, sents[half:])
        a = route_process(bootstrap, names, group, "--batch-size", "40", "--batch-time", "0.2", instance="a")
        wait_until(
            lambda: a.poll() is not None or committed(bootstrap, group, names.source) == len(sents),
            90,
            "everything routed after the restart",
        )
        assert a.poll() is None, tail(a)
        assert router_b.events == b_seen, "router b saw a rebalance"
        # The restarted a got what b does not hold: the partitions it had before the kill.
        got = re.findall(r"router INFO assigned (.+)", whole_stderr(a))
        source = {(names.source, p) for p in range(3)}
        assert got and {f"{t}[{p}]" for t, p in source - b_seen[-1][1]} == set(got[-1].split(", ")), tail(a)
    finally:
        alive = a.poll() is None
        if alive:
            a.send_signal(signal.SIGTERM)
        if b is not None:
            b.stop()
        code = a.wait(30)
    assert alive and code == 0, tail(a)  # the restarted a was running to the end and stopped cleanly
    check_exactly_once(bootstrap, names, 10, sents)


def test_two_workers_of_one_group_on_one_host_get_different_names_and_a_restart_the_same(tmp_path: Path) -> None:
    first, second = Member("g", lock_dir=tmp_path), Member("g", lock_dir=tmp_path)
    other_group = Member("h", lock_dir=tmp_path)
    assert first.name != second.name and first.name.endswith("-0") and second.name.endswith("-1")
    assert other_group.name.endswith("-0")
    first.release()
    again = Member("g", lock_dir=tmp_path)  # the restart of the first takes its index back
    assert again.name == first.name
    assert Member("g", "explicit", lock_dir=tmp_path).name == "explicit"
    for m in (second, other_group, again):
        m.release()
