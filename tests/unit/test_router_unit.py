"""The router's batch/commit/abort/replay logic on an in-memory consumer and sink (no broker): failed
commits, failed aborts and a fatal sink error still give every output exactly once, in order."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from fakes import FakeMessage
from sequinmsgs import scenario

from connectors.kafka import ConsumerFenced, KafkaFatalError, KafkaRetryError
from connectors.kafka_conn import KafkaConnection
from stream.router import Router, RouterConfig

TOPIC = "activityRelations"


class MemoryConsumer:
    """Two partitions; committed offsets are only ever written by the sink's commit."""

    def __init__(self, logs: list[list[FakeMessage]]) -> None:
        self.logs = logs
        self.position_of = [0] * len(logs)
        self.committed_of = [-1001] * len(logs)
        self.tps = [TopicPartition(TOPIC, p) for p in range(len(logs))]

    def subscribe(self, topics: list[str], on_assign: Any, **_: Any) -> None:
        on_assign(self, self.tps)

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        out: list[FakeMessage] = []
        for p, log in enumerate(self.logs):
            take = log[self.position_of[p] : self.position_of[p] + max(1, n // 2)]
            self.position_of[p] += len(take)
            out.extend(take)
        return out

    def assignment(self) -> list[TopicPartition]:
        return self.tps

    def committed(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, tp.partition, self.committed_of[tp.partition]) for tp in tps]

    def seek(self, tp: TopicPartition) -> None:
        self.position_of[tp.partition] = 0 if tp.offset < 0 else tp.offset

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, tp.partition, self.position_of[tp.partition]) for tp in tps]

    def get_watermark_offsets(self, tp: TopicPartition, **_: Any) -> tuple[int, int]:
        return 0, len(self.logs[tp.partition])

    def consumer_group_metadata(self) -> object:
        return object()

    def close(self) -> None:
        pass


class FlakySink:
    """Transactional in memory: records become visible only on commit. ``plan`` says what each commit
    does: "ok", "abortable" (abort works), "stuck" (abort fails too), "fatal"."""

    exactly_once = True

    def __init__(self, plan: list[str]) -> None:
        self.plan = plan
        self.out: list[tuple[str, int | None, bytes | None, bytes | None]] = []
        self.staged: list[tuple[str, int | None, bytes | None, bytes | None]] = []
        self.opens = self.aborts = 0
        self._abort_fails = False

    def open(self) -> None:
        self.opens += 1
        self.staged = []  # a new producer fences the old one: its open transaction is aborted

    def begin(self) -> None:
        assert not self.staged, "a batch began while another was open"

    def write(self, bucket: int, key: bytes | None, value: bytes, headers: Any = None) -> None:
        self.staged.append(("retire" if headers else "row", bucket, key, value))

    def dead_letter(self, key: bytes | None, value: bytes | None, headers: Any) -> None:
        self.staged.append(("dlq", None, key, value))

    def commit(self, offsets: list[TopicPartition], consumer: MemoryConsumer) -> None:
        step = self.plan.pop(0) if self.plan else "ok"
        if step == "abortable":
            raise _abortable()
        if step == "stuck":
            self._abort_fails = True
            raise _abortable()
        if step == "fatal":
            raise KafkaFatalError("fenced")
        self.out.extend(self.staged)
        self.staged = []
        for tp in offsets:
            consumer.committed_of[tp.partition] = tp.offset

    def abort(self) -> None:
        self.aborts += 1
        if self._abort_fails:
            self._abort_fails = False
            raise KafkaRetryError("abort timed out")
        self.staged = []

    def close(self) -> None:
        pass


class PipelinedFlakySink(FlakySink):
    """FlakySink with ``commit_later``, as KafkaSink has: the router then routes each batch while the previous
    one commits in a thread of its own. ``begin`` (inherited) fails if a batch begins before that commit ended."""

    def __init__(self, plan: list[str]) -> None:
        super().__init__(plan)
        self.commit_threads: set[str] = set()

    def commit_later(self, offsets: list[TopicPartition], consumer: MemoryConsumer) -> Any:
        def finish() -> None:
            self.commit_threads.add(threading.current_thread().name)
            FlakySink.commit(self, offsets, consumer)

        return finish


def _abortable() -> KafkaRetryError:
    class Err:
        def txn_requires_abort(self) -> bool:
            return True

    return KafkaRetryError("commit failed", Err())  # type: ignore[arg-type]


@pytest.mark.parametrize("pipelined", [False, True], ids=["commit-in-line", "commit-in-background"])
@pytest.mark.parametrize(
    "plan", [[], ["ok", "abortable", "ok", "abortable", "abortable"], ["stuck", "ok", "fatal", "ok", "abortable"]]
)
def test_every_output_exactly_once_despite_failed_commits(plan: list[str], pipelined: bool) -> None:
    sents = scenario(21, 300, 10)
    logs: list[list[FakeMessage]] = [[], []]
    expected: list[list[Any]] = [[], []]
    for s in sents:
        p = hash(s.key) % 2
        logs[p].append(FakeMessage(TOPIC, p, len(logs[p]), s.value, s.key))
        expected[p].append(s)
    consumer = MemoryConsumer(logs)
    sink = (PipelinedFlakySink if pipelined else FlakySink)(list(plan))
    cfg = RouterConfig(
        kafka=KafkaConnection.plain("memory"),
        buckets=10,
        batch_size=100,
        backlog_batch_size=100,  # a fixed batch size: the plan's steps meet the batches one by one
        until_idle=0.05,
        instance_id="u",
    )
    router = Router(cfg, sink_factory=lambda _: sink, consumer_factory=lambda _: consumer)  # type: ignore[arg-type,return-value]
    router.run()
    want = Counter()
    for s in sents:
        if s.dlq:
            want[("dlq", None, s.key, s.value)] += 1
        else:
            want[("row", s.bucket, s.key, s.value)] += 1
    got = Counter(o for o in sink.out if o[0] != "retire")
    assert got == want
    assert sum(o[0] == "retire" for o in sink.out) == sum(s.retire_bucket is not None for s in sents)
    assert consumer.committed_of == [len(log) for log in logs]
    for key in {s.key for s in sents if s.dlq is None}:  # each activity's changes in source order
        assert [o[3] for o in sink.out if o[0] == "row" and o[2] == key] == [
            s.value for s in sents if s.key == key and s.dlq is None
        ]
    failures = sum(step != "ok" for step in plan)
    assert router.stats.aborts == failures
    assert sink.opens == 1 + sum(step in ("stuck", "fatal") for step in plan)
    assert router.stats.dlq == Counter(s.dlq for s in sents if s.dlq)
    if isinstance(sink, PipelinedFlakySink):  # the commits did run beside the router's thread
        assert sink.commit_threads == {"router-commit"}


def test_too_many_fatal_sink_errors_stop_the_router() -> None:
    consumer = MemoryConsumer([[FakeMessage(TOPIC, 0, i, b"{}") for i in range(50)], []])
    sink = FlakySink(["fatal"] * 20)
    cfg = RouterConfig(
        kafka=KafkaConnection.plain("memory"), buckets=10, batch_size=10, until_idle=5, max_sink_restarts=3
    )
    router = Router(cfg, sink_factory=lambda _: sink, consumer_factory=lambda _: consumer)  # type: ignore[arg-type,return-value]
    with pytest.raises(KafkaFatalError, match="4 times"):
        router.run()
    assert consumer.committed_of == [-1001, -1001]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class OutageConsumer(MemoryConsumer):
    """One partition holding ``first``; every consume() is 0.25 s of ``clock``. The broker is away from ``away``
    to ``back`` (all brokers down reported through error_cb, as librdkafka does; committed offsets and
    watermarks unavailable), and ``second`` is produced one second after it is back."""

    def __init__(self, first: list[bytes], second: list[bytes], clock: Clock, away: float, back: float) -> None:
        super().__init__([[FakeMessage(TOPIC, 0, i, v) for i, v in enumerate(first)]])
        self.second, self.clock, self.away, self.back = second, clock, away, back
        self.error_cb: Any = None

    def down(self) -> bool:
        return self.away <= self.clock.t < self.back

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        self.clock.t += 0.25
        if self.down():
            if self.error_cb is not None:
                self.error_cb(KafkaError(KafkaError._ALL_BROKERS_DOWN))
                self.error_cb = None  # reported once per outage
            return []
        if self.second and self.clock.t >= self.back + 1:
            start = len(self.logs[0])
            self.logs[0] += [FakeMessage(TOPIC, 0, start + i, v) for i, v in enumerate(self.second)]
            self.second = []
        return super().consume(n, timeout)

    def committed(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        if self.down():
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return super().committed(tps, timeout)

    def get_watermark_offsets(self, tp: TopicPartition, **kw: Any) -> tuple[int, int]:
        if self.down():
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return super().get_watermark_offsets(tp, **kw)


def test_an_outage_is_not_idleness() -> None:
    """A static member keeps its partitions through a broker outage (no rejoin restarts the idle count): the
    router must still not call the outage idle time, or it stops as the broker returns, before the input
    that was waiting on it comes (test_broker_bounce lost the 2,000 changes produced after the restart)."""
    first = [s.value for s in scenario(31, 40, 10)]
    second = [s.value for s in scenario(32, 30, 10)]
    clock = Clock()
    consumer = OutageConsumer(first, second, clock, away=2.0, back=22.0)  # 20 s away, idle after 5

    def connect(conf: dict[str, Any]) -> OutageConsumer:
        consumer.error_cb = conf.get("error_cb")
        return consumer

    sink = FlakySink([])
    cfg = RouterConfig(kafka=KafkaConnection.plain("memory"), buckets=10, batch_size=100, until_idle=5, instance_id="u")
    Router(cfg, sink_factory=lambda _: sink, clock=clock, consumer_factory=connect).run()  # type: ignore[arg-type,return-value]
    assert consumer.second == [] and consumer.committed_of == [len(first) + len(second)]
    assert clock.t >= 22.0 + 5  # idle for until_idle after the broker's return, not counted from before


def test_a_router_without_an_instance_id_is_a_static_member_under_its_host_index_name(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUCKETER_LOCK_DIR", str(tmp_path))
    confs: list[dict[str, Any]] = []

    def connect(conf: dict[str, Any]) -> MemoryConsumer:
        confs.append(conf)
        return MemoryConsumer([[]])

    cfg = RouterConfig(kafka=KafkaConnection.plain("memory"), buckets=10, until_idle=0.05)
    router = Router(cfg, sink_factory=lambda _: FlakySink([]), consumer_factory=connect)  # type: ignore[arg-type,return-value]
    router.run()
    name = router.config.instance_id
    assert name is not None and name.endswith("-0")
    assert confs[0]["group.instance.id"] == f"activityRelations.{name}"
    assert confs[0]["session.timeout.ms"] == 30_000


class WaitingConsumer(MemoryConsumer):
    """A join that never ends in an assignment (the group waits for a static member that left for good);
    every consume() is 0.5 s of ``clock``."""

    def __init__(self, clock: Clock) -> None:
        super().__init__([[]])
        self.clock = clock

    def subscribe(self, topics: list[str], on_assign: Any, **_: Any) -> None:
        pass

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        self.clock.t += 0.5
        return []

    def assignment(self) -> list[TopicPartition]:
        return []


@pytest.mark.parametrize(("static", "waits"), [(True, 60.0), (False, 30.0)])
def test_a_router_with_no_partitions_waits_out_a_departed_static_members_session(static: bool, waits: float) -> None:
    clock = Clock()
    cfg = RouterConfig(
        kafka=KafkaConnection.plain("memory"), buckets=10, until_idle=3, instance_id="u", static_membership=static
    )
    consumer = WaitingConsumer(clock)
    Router(cfg, sink_factory=lambda _: FlakySink([]), clock=clock, consumer_factory=lambda _: consumer).run()  # type: ignore[arg-type,return-value]
    assert waits <= clock.t < waits + 5


class FencedConsumer(MemoryConsumer):
    """Shares the logs and committed offsets with the consumers before it (one group); its ``fence_at``-th
    consume() returns a few messages and then librdkafka's fatal consumer error (a static member fenced)."""

    def __init__(self, logs: list[list[FakeMessage]], committed: list[int], fence_at: int) -> None:
        super().__init__(logs)
        self.committed_of, self.fence_at, self.calls = committed, fence_at, 0
        self.position_of = [max(0, c) for c in committed]

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        self.calls += 1
        got = super().consume(n, timeout)
        if self.calls != self.fence_at:
            return got
        fenced = KafkaError(
            KafkaError._FATAL, "Static consumer fenced by other consumer with same group.instance.id", True
        )
        return [*got[:3], FakeMessage.failed(fenced)]


@pytest.mark.parametrize("twin", [False, True])
def test_a_fenced_static_member_rejoins_under_its_name_and_a_twin_stops_it(twin: bool) -> None:
    """After a broker away longer than the session, librdkafka's rejoin fences the member itself: the router
    takes a new consumer under the same name and every output is there once. A real twin under that name
    fences each new consumer: the fatal count stops the router."""
    sents = scenario(41, 120, 10)
    logs: list[list[FakeMessage]] = [[], []]
    for s in sents:
        p = hash(s.key) % 2
        logs[p].append(FakeMessage(TOPIC, p, len(logs[p]), s.value, s.key))
    committed = [-1001, -1001]
    consumers: list[FencedConsumer] = []

    def connect(conf: dict[str, Any]) -> FencedConsumer:
        consumers.append(FencedConsumer(logs, committed, fence_at=2 if twin or not consumers else 0))
        return consumers[-1]

    sink = FlakySink([])
    cfg = RouterConfig(
        kafka=KafkaConnection.plain("memory"), buckets=10, batch_size=20, until_idle=0.05, instance_id="u"
    )
    router = Router(cfg, sink_factory=lambda _: sink, consumer_factory=connect)  # type: ignore[arg-type,return-value]
    if twin:
        with pytest.raises(KafkaFatalError, match="6 times"):
            router.run()
        assert len(consumers) == 6
        return
    router.run()
    assert len(consumers) == 2
    assert committed == [len(log) for log in logs]
    got = Counter(o[3] for o in sink.out if o[0] != "retire")
    assert got == Counter(s.value for s in sents)  # every change once: the batch cut by the fence was replayed
    assert isinstance(ConsumerFenced("x"), KafkaFatalError)
