"""`bucketer rebucket --strategy gradual` against a real `bucketer run --http-port` (real broker, embedded engine)
while a feeder produces at a steady rate and a reader checks the union all along.

Checked independently of the product's SQL: the live raw rows equal the test model (tests/integration/
test_pipeline.py ``expected_live``: last version per identity, deletes and moves retire); every row sits in
bucket ``cityHash64(segmentId) % M``; and, from the topics themselves, every good source message was routed
exactly once, to ``bucket(segmentId, N)`` before its partition's recorded switch offset and to
``bucket(segmentId, M)`` from it on (the DLQ's headers name the source offsets of the bad ones)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import Producer
from kafkatools import create_topics, drain, unique, wait_until
from test_pipeline import expected_live, live_rows

from bucketer.localkafka import free_port
from connectors.kafka import H_DERIVED, H_SOURCE_OFFSET, H_SOURCE_PARTITION
from connectors.topics import TopicNames
from connectors.warehouse import open_warehouse
from stream.buckets import bucket_of
from stream.incremental import Maintainer
from stream.loadgen import LoadgenConfig, generate
from stream.migration import STALL_ENV
from stream.schema import bucket_count

BUCKETER = [sys.executable, "-m", "bucketer"]
UNION = "activityRelations_deduplicated_cleaned_bucket_union"
IDENT = "segmentId, timestamp, type, platform, channel, sourceId"
READ_SQL = f"SELECT count(), uniqExact({IDENT}), groupUniqArray(activityId) FROM {UNION}"


@dataclass
class Run:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


@dataclass
class Setup:
    bootstrap: str
    topics: TopicNames
    data: Path
    env: dict[str, str]
    tmp: Path
    head: list[tuple[bytes | None, bytes | None]]  # activity messages produced before the run starts
    tail: list[tuple[bytes | None, bytes | None]]  # activity messages the feeder sends mid-run
    runs: list[Run] = field(default_factory=list)

    def start(self, buckets: int | None = None, stall: str | None = None) -> Run:
        port = free_port()
        log = self.tmp / f"run{len(self.runs)}.log"
        args = ["run", "--bootstrap", self.bootstrap, "--data-dir", str(self.data), "--topic-prefix"]
        args += [self.topics.prefix, "--http-port", str(port)] + (["--buckets", str(buckets)] if buckets else [])
        env = self.env | ({STALL_ENV: stall} if stall else {})
        with log.open("wb") as out:
            proc = subprocess.Popen([*BUCKETER, *args], env=env, stdout=out, stderr=out)
        run = Run(proc, f"http://127.0.0.1:{port}", log)
        self.runs.append(run)

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(run.url + "/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 120, "bucketer run --http-port to be ready", 0.3)
        return run

    def sql(self, run: Run, q: str) -> list[list[object]]:
        r = httpx.get(run.url + "/v0/sql", params={"q": q + " FORMAT JSONCompact"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def rebucket(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[bytes]:
        cmd = [*BUCKETER, "rebucket", "--strategy", "gradual", "--data-dir", str(self.data), *args]
        return subprocess.run(cmd, env=self.env, capture_output=True, timeout=timeout)

    def stop_all(self) -> None:
        for run in self.runs:
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGTERM)
                try:
                    run.proc.wait(60)
                except subprocess.TimeoutExpired:
                    run.proc.kill()
                    run.proc.wait(10)


def caught_up(s: Setup, run: Run) -> None:
    """The router and the loader have nothing left to read (as /v0/status tells), twice in a row."""

    def idle() -> bool:
        body = httpx.get(run.url + "/v0/status", timeout=60).json()
        return body.get("router_lag") == 0 and body.get("loader_lag") == 0

    wait_until(lambda: idle() and (time.sleep(1.0) or idle()), 120, "the pipeline to catch up", 0.5)


def make_setup(bootstrap: str, tmp: Path, count: int = 1600, head: float = 0.5) -> Setup:
    topics = TopicNames(unique("regrad") + ".")
    create_topics(bootstrap, [topics.source, *topics.references().values()], partitions=3)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    activity = []
    for g in generate(LoadgenConfig(count=count, seed=23, segments=50, bad_fraction=0.01)):
        if g.topic == "activityRelations":
            activity.append((g.key, g.value))
        else:
            producer.produce(topics.reference(g.topic), key=g.key, value=g.value)
    cut = int(len(activity) * head)
    for key, value in activity[:cut]:
        producer.produce(topics.source, key=key, value=value)
    assert producer.flush(60) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETER_")}
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    return Setup(bootstrap, topics, tmp / "wh", env, tmp, activity[:cut], activity[cut:])


class Feeder(threading.Thread):
    """Produces ``tail`` at ``rate`` messages/s; ``touched`` grows with each activityId sent (before its send)."""

    def __init__(self, s: Setup, rate: float) -> None:
        super().__init__(daemon=True)
        self.s, self.rate = s, rate
        self.touched: set[str] = set()
        self.lock = threading.Lock()

    def run(self) -> None:
        producer = Producer({"bootstrap.servers": self.s.bootstrap, "linger.ms": 5, "enable.idempotence": True})
        start = time.monotonic()
        for i, (key, value) in enumerate(self.s.tail):
            try:
                aid = orjson.loads(value or b"{}")["record"]["activityId"]
            except (ValueError, KeyError, TypeError):
                aid = None
            if aid:
                with self.lock:
                    self.touched.add(aid)
            producer.produce(self.s.topics.source, key=key, value=value)
            producer.poll(0)
            wait = start + (i + 1) / self.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        assert producer.flush(60) == 0


class Reader(threading.Thread):
    """Reads the union through the API all along: no row counted twice (count = distinct identities), and no
    row gone unless the feeder had sent a message about it (a delete, a move) before that read began."""

    def __init__(self, s: Setup, run: Run, feeder: Feeder) -> None:
        super().__init__(daemon=True)
        self.s, self.url, self.feeder = s, run.url, feeder
        self.stop = threading.Event()
        self.reads = 0
        self.problems: list[str] = []

    def run(self) -> None:
        before: set[str] | None = None
        while not self.stop.is_set():
            with self.feeder.lock:
                touched = set(self.feeder.touched)
            try:
                r = httpx.get(self.url + "/v0/sql", params={"q": READ_SQL + " FORMAT JSONCompact"}, timeout=30)
            except httpx.HTTPError:
                time.sleep(0.1)  # the process is being killed/restarted (the SIGKILL test)
                continue
            if r.status_code != 200:
                time.sleep(0.1)
                continue
            count, distinct, ids = r.json()["data"][0]
            now = set(ids)
            self.reads += 1
            if int(count) != int(distinct):
                self.problems.append(f"read {self.reads}: {count} rows but {distinct} identities")
            if before is not None:
                lost = before - now - touched
                if lost:
                    self.problems.append(f"read {self.reads}: {len(lost)} rows gone untouched, e.g. {sorted(lost)[:3]}")
            before = now
            time.sleep(0.05)

    def retarget(self, run: Run) -> None:
        self.url = run.url


def check_end_state(s: Setup, old: int, new: int, *, aborted: bool = False) -> None:
    """With the run stopped: the warehouse and the topics, against the test's own model. ``aborted``: the
    migration to ``new`` was rolled back, so the warehouse ends on ``old`` (the routing still went by ``new``
    between the two recorded switches)."""
    final = old if aborted else new
    with open_warehouse(s.data) as wh:
        assert bucket_count(wh) == final
        rows = live_rows(wh, final)
        left = wh.rows(
            "SELECT name FROM system.tables WHERE database = currentDatabase() AND (name LIKE '%\\_\\_next' "
            "OR name LIKE '%\\_\\_old' OR name LIKE '%rebucket%')"
        )
        state = wh.rows("SELECT value FROM bucketer_migration FINAL")
        cleaned = wh.rows(f"SELECT count(), uniqExact({IDENT}) FROM {UNION}")[0]
        # The maintained cleaned buckets equal a full rebuild: the flip's split, the maintenance set up anew for
        # M without a reconciliation, and the rounds after it kept them exact.
        maintainer = Maintainer(final)
        maintainer.setup(wh)  # the recorded state is for this layout: nothing is set up anew, nothing reconciled
        differing = [maintainer.reconcile(wh, b) for b in range(final)]
        maintainer.close(wh)
        # The activity index (how a key-only delete or a toast update finds its stored row) points at M's buckets.
        index = {
            str(a): (str(seg), int(b))
            for a, seg, b in wh.rows(
                "SELECT activityId, segmentId, _bucket FROM bucketer_activity_index FINAL WHERE _deleted = 0"
            )
        }
    everything = [v for _k, v in s.head + s.tail]
    assert set().union(*rows.values()) == expected_live(everything)
    assert all(bucket_of(r[0], final) == b for b, live in rows.items() for r in live), "rows outside hash % N"
    assert left == [], left
    assert differing == [0] * final, differing
    misplaced = {a: v for a, v in index.items() if bucket_of(v[0], final) != v[1]}
    assert index and not misplaced, f"{len(misplaced)} of {len(index)} index rows point at old buckets"
    assert orjson.loads(state[0][0])["phase"] == ("aborted" if aborted else "done")
    assert cleaned[0] == cleaned[1] > 0

    # The routing: exactly once, each message of a source partition by the layout of the last switch recorded
    # for it at or before its offset (N before the first one).
    switches: dict[int, list[tuple[int, int]]] = {}
    for m in drain(s.bootstrap, [s.topics.control], idle=1.0):
        if m.key().decode().startswith(s.topics.source + "/"):
            v = orjson.loads(m.value())
            switches.setdefault(int(m.key().decode().rsplit("/", 1)[1]), []).append((int(v["offset"]), int(v["to"])))
    assert switches and all(sw[-1][1] == final for sw in switches.values()), switches
    if aborted:
        assert all([to for _o, to in sw] == [new, old] for sw in switches.values()), switches

    def layout(partition: int, offset: int) -> int:
        n = old
        for at, to in sorted(set(switches.get(partition, []))):
            if offset >= at:
                n = to
        return n

    bad = {
        (int(dict(m.headers())[H_SOURCE_PARTITION]), int(dict(m.headers())[H_SOURCE_OFFSET]))
        for m in drain(s.bootstrap, [s.topics.dlq], idle=1.0)
    }
    expected: Counter[tuple[bytes, str]] = Counter()
    for m in drain(s.bootstrap, [s.topics.source], idle=1.0):
        if (m.partition(), m.offset()) in bad:
            continue
        n = layout(m.partition(), m.offset())
        seg = orjson.loads(m.value())["record"]["segmentId"]
        expected[(m.value(), s.topics.bucket(bucket_of(seg, n)))] += 1
    routed: Counter[tuple[bytes, str]] = Counter(
        (m.value(), m.topic())
        for m in drain(s.bootstrap, s.topics.buckets(max(old, new)), idle=1.5)
        if H_DERIVED not in dict(m.headers() or [])
    )
    assert routed == expected
    if new > old:
        assert any((s.topics.bucket_of_topic(t) or 0) >= old for _v, t in routed), "nothing in the new bucket topics"


def test_gradual_rebucket_aborted_after_the_switch_rolls_back_to_n(bootstrap: str, tmp_path: Path) -> None:
    """``--abort`` after the router has switched to M (messages routed by M are in topics 10..19): the router
    switches back to N, everything routed by M is loaded into the N layout, the next tables go, and the end state
    is N = 10 with every live row, each once, where hash % 10 puts it."""
    s = make_setup(bootstrap, tmp_path, count=1000)
    try:
        run = s.start(buckets=10, stall="switched")
        feeder = Feeder(s, rate=20)
        feeder.start()
        r = httpx.post(run.url + "/v0/rebucket", params={"to": 20}, timeout=60)
        assert r.status_code == 200, r.text

        def switched(url: str = run.url) -> bool:
            got = httpx.get(url + "/v0/rebucket", timeout=30).json()["migration"]
            return got is not None and got["phase"] == "switched"

        wait_until(switched, 120, "phase switched", 0.3)
        time.sleep(2.0)  # some messages routed by M
        run.proc.kill()  # the stalled step holds the migration thread: a restart frees it
        run.proc.wait(30)
        run = s.start()
        done = s.rebucket("--abort")
        assert done.returncode == 0, done.stderr.decode()[-3000:] + run.log.read_text()[-3000:]
        assert "abort" in done.stdout.decode() + done.stderr.decode()
        feeder.join(120)
        caught_up(s, run)
        st = httpx.get(run.url + "/v0/status", timeout=60).json()
        assert len(st["buckets"]) == 10
    finally:
        s.stop_all()
    check_end_state(s, 10, 20, aborted=True)


# 10 -> 16 and 20 -> 10 (the recompute path) take ~75 s each: they run with `make test-extended`
# (BUCKETER_EXTENDED=1), so `make test` stays inside its time budget; 10 -> 20 and the SIGKILL test always run.
_EXTENDED = pytest.mark.skipif(not os.environ.get("BUCKETER_EXTENDED"), reason="extended: make test-extended")


@pytest.mark.parametrize(
    ("old", "new"), [(10, 20), pytest.param(10, 16, marks=_EXTENDED), pytest.param(20, 10, marks=_EXTENDED)]
)
def test_gradual_rebucket_mid_stream(bootstrap: str, tmp_path: Path, old: int, new: int) -> None:
    s = make_setup(bootstrap, tmp_path)
    try:
        run = s.start(buckets=old)
        caught_up(s, run)
        feeder = Feeder(s, rate=30)
        reader = Reader(s, run, feeder)
        feeder.start()
        reader.start()
        time.sleep(1.0)
        done = s.rebucket("--to", str(new))
        assert done.returncode == 0, done.stderr.decode()[-3000:] + run.log.read_text()[-3000:]
        out = done.stdout.decode()
        assert ("split path" if new % old == 0 and new > old else "recompute path") in out
        st = httpx.get(run.url + "/v0/status", timeout=60).json()
        assert st["migration"]["phase"] == "done" and len(st["buckets"]) == new
        # The flip corrects the old cleaned buckets before it splits them, and holds the maintenance across the
        # swap: the new layout's first reconciliations find nothing to fix, and no round failed in between.
        log_text = run.log.read_text()
        assert "a correction round failed" not in log_text, log_text[-3000:]
        assert re.findall(r"reconciled, [1-9]\d* rows differed", log_text) == [], log_text[-3000:]
        feeder.join(120)
        caught_up(s, run)
        reader.stop.set()
        reader.join(30)
        assert reader.reads > 10 and reader.problems == [], reader.problems[:5]
    finally:
        s.stop_all()
    check_end_state(s, old, new)


def test_gradual_rebucket_sigkill_in_every_phase_then_resume(bootstrap: str, tmp_path: Path) -> None:
    """The running process is SIGKILLed right after each phase is recorded (``flipping``: inside the flip), then
    started again and the same command run again: it resumes, and the end state is the same."""
    s = make_setup(bootstrap, tmp_path, count=1000)
    try:
        run = s.start(buckets=10, stall="prepared")
        feeder = Feeder(s, rate=15)
        feeder.start()
        for stall, nxt in [
            ("prepared", "copied"),
            ("copied", "switched"),
            ("switched", "flipping"),
            ("flipping", "flipped"),
            ("flipped", None),
        ]:
            r = httpx.post(run.url + "/v0/rebucket", params={"to": 20}, timeout=60)
            assert r.status_code == 200, r.text

            seen: list[object] = []

            def phase(url: str = run.url, want: str = stall, seen: list[object] = seen) -> bool:
                got = httpx.get(url + "/v0/rebucket", timeout=30).json()["migration"]
                seen[:] = [got]
                return got is not None and got["phase"] == want

            # 240 s: alone this whole test takes ~90 s; beside a CPU-bound test on the other xdist worker a phase
            # took over 120 s once (fresh clone, 2 cores), without logs: a miss now says where the migration was.
            try:
                wait_until(phase, 240, f"phase {stall}", 0.3)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; last /v0/rebucket: {seen}; log: {run.log.read_text()[-4000:]}") from None
            run.proc.kill()
            run.proc.wait(30)
            run = s.start(stall=nxt)
        done = s.rebucket("--to", "20")
        assert done.returncode == 0, done.stderr.decode()[-3000:] + run.log.read_text()[-3000:]
        feeder.join(120)
        caught_up(s, run)
    finally:
        s.stop_all()
    check_end_state(s, 10, 20)
