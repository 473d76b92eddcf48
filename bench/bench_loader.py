"""Loader throughput against the engine's own ingest of the same message bytes (not a test).

    .venv/bin/python bench/bench_loader.py --bootstrap 127.0.0.1:39092 --messages 100000 --runs 3

1. Generates ``--messages`` Sequin activityRelations change messages (deterministic, realistic size) and
   produces them to a fresh bucket topic.
2. Loader: a fresh consumer group and empty raw table each run; time from the first message consumed to the
   last flush committed (group join excluded, reported apart as wall time).
3. Engine: the same bytes in a local file, inserted by chdb itself with the same SQL
   (``INSERT INTO raw SELECT … FROM file(…, JSONAsString)``): no Kafka, no Python per message.
4. Appends medians and the ratio loader/engine to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.topics import TopicNames  # noqa: E402
from connectors.warehouse import EmbeddedWarehouse  # noqa: E402
from stream.buckets import raw_table  # noqa: E402
from stream.ingest import insert_sql  # noqa: E402
from stream.loader import Loader, LoaderConfig  # noqa: E402
from stream.schema import ensure_schema  # noqa: E402


def messages(count: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    segments = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(50)]
    base = datetime(2025, 1, 1, tzinfo=UTC)
    out = []
    for i in range(count):
        ts = base + timedelta(seconds=rng.randrange(10**8), microseconds=rng.randrange(10**6))
        upd = ts + timedelta(seconds=rng.randrange(1000))
        platform_ = rng.choice(["github", "git", "gitlab", "discord", "slack", "gerrit"])
        rec = {
            "activityId": str(uuid.UUID(int=rng.getrandbits(128))), "conversationId": None,
            "createdAt": ts.isoformat().replace("+00:00", "Z"), "updatedAt": upd.isoformat().replace("+00:00", "Z"),
            "memberId": str(uuid.UUID(int=rng.getrandbits(128))), "objectMemberId": None,
            "objectMemberUsername": None, "organizationId": str(uuid.UUID(int=rng.getrandbits(128))),
            "parentId": None, "platform": platform_, "segmentId": rng.choice(segments),
            "username": f"user{rng.randrange(10**6)}", "sourceId": f"{rng.getrandbits(64):x}",
            "type": rng.choice(["authored-commit", "pull_request-opened", "issue-comment", "message"]),
            "timestamp": ts.isoformat().replace("+00:00", "Z"), "sourceParentId": None,
            "channel": f"https://github.com/org{rng.randrange(100)}/repo{rng.randrange(1000)}",
            "sentimentScore": None, "gitInsertions": rng.randrange(500), "gitDeletions": rng.randrange(200),
            "score": rng.randrange(10), "isContribution": rng.random() < 0.8, "pullRequestReviewState": None,
            "tenantId": str(uuid.UUID(int=rng.getrandbits(128))), "attributes": {"isMainBranch": True},
        }
        msg = {"action": "insert" if i % 10 else "update", "changes": None if i % 10 else {"score": 1},
               "record": rec, "metadata": {"table_schema": "public", "table_name": "activityRelations",
                                           "commit_timestamp": upd.isoformat().replace("+00:00", "Z"),
                                           "commit_lsn": 1000 + i, "commit_idx": 0,
                                           "idempotency_key": uuid.UUID(int=rng.getrandbits(128)).hex,
                                           "record_pks": [rec["activityId"]],
                                           "consumer": {"id": "c1", "name": "bench", "annotations": {}},
                                           "database": {"id": "d1", "name": "crowd"}}}
        out.append(orjson.dumps(msg))
    return out


def produce(bootstrap: str, topic: str, values: list[bytes], partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        fut.result(30)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4",
                  "queue.buffering.max.messages": 1_000_000, "batch.num.messages": 10_000})
    for v in values:
        while True:
            try:
                p.produce(topic, value=v)
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(120) == 0


class TimedLoader(Loader):
    """Wall and CPU time from the first message taken to the last batch committed."""

    first: float | None = None
    last: float | None = None
    cpu_first: float = 0.0
    cpu_last: float = 0.0

    def _take(self, msgs):  # type: ignore[no-untyped-def]
        if self.first is None:
            self.first, self.cpu_first = time.perf_counter(), time.process_time()
        super()._take(msgs)

    def _reap(self, wait: bool) -> None:
        before = self.stats.flushes
        super()._reap(wait)
        if self.stats.flushes > before:  # a batch was inserted and its offsets committed
            self.last, self.cpu_last = time.perf_counter(), time.process_time()


def reset(wh: EmbeddedWarehouse) -> None:
    wh.command(f"TRUNCATE TABLE {raw_table(0)}")


def loader_run(wh: EmbeddedWarehouse, bootstrap: str, names: TopicNames, count: int,
               max_rows: int) -> tuple[float, float, float]:
    cfg = LoaderConfig(bootstrap=bootstrap, buckets=1, group=f"bench-{uuid.uuid4().hex[:8]}", topics=names,
                       max_rows=max_rows, max_wait=1.0)
    loader = TimedLoader(cfg, wh, clock=time.monotonic)
    start = time.perf_counter()
    loader.run(until_idle=3.0)
    assert loader.stats.messages == count, loader.stats
    assert loader.first is not None and loader.last is not None
    rows = wh.rows(f"SELECT count() FROM {raw_table(0)}")[0][0]
    assert rows == count, (rows, count)
    return loader.last - loader.first, (loader.last - start), loader.cpu_last - loader.cpu_first


def engine_run(wh: EmbeddedWarehouse, path: Path, count: int) -> float:
    columns, select = insert_sql("activityRelations")
    sql = f"INSERT INTO {raw_table(0)} ({columns}) " + select.replace(
        "{source}", f"file('{path}', 'JSONAsString', 'v String')")
    start = time.perf_counter()
    wh.command(sql)
    took = time.perf_counter() - start
    assert wh.rows(f"SELECT count() FROM {raw_table(0)}")[0][0] == count
    return took


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({model}), "
            f"Python {platform.python_version()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default=os.environ.get("BUCKETER_BOOTSTRAP", "127.0.0.1:39092"))
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--max-rows", type=int, default=100_000)
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = ap.parse_args()

    values = messages(args.messages)
    size = sum(len(v) for v in values)
    names = TopicNames(prefix=f"bench-{uuid.uuid4().hex[:8]}.")
    print(f"producing {len(values):,} messages ({size / 1e6:.1f} MB) to {names.bucket(0)} …", flush=True)
    produce(args.bootstrap, names.bucket(0), values, args.partitions)

    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    data = work / "messages.json"
    data.write_bytes(b"\n".join(values))
    loader_s, wall_s, engine_s, loader_cpu, engine_cpu = [], [], [], [], []
    try:
        with EmbeddedWarehouse(work / "wh") as wh:
            ensure_schema(wh, 1)
            for run in range(args.runs):
                reset(wh)
                took, wall, cpu_used = loader_run(wh, args.bootstrap, names, len(values), args.max_rows)
                loader_cpu.append(cpu_used)
                loader_s.append(took)
                wall_s.append(wall)
                reset(wh)
                cpu = time.process_time()
                engine_s.append(engine_run(wh, data, len(values)))
                engine_cpu.append(time.process_time() - cpu)
                print(f"run {run + 1}: loader {len(values) / took:,.0f} ev/s ({took:.2f}s, wall {wall:.2f}s, "
                      f"cpu {loader_cpu[-1]:.2f}s), engine {len(values) / engine_s[-1]:,.0f} ev/s "
                      f"({engine_s[-1]:.2f}s, cpu {engine_cpu[-1]:.2f}s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    loader_eps = len(values) / statistics.median(loader_s)
    engine_eps = len(values) / statistics.median(engine_s)
    ratio = loader_eps / engine_eps
    cmd = "python bench/bench_loader.py " + " ".join(sys.argv[1:])
    section = (
        f"\n## Loader vs engine ingest — {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}\n\n"
        f"- machine: {machine()} (shared with other work while measured)\n"
        f"- command: `{cmd}`\n"
        f"- input: {len(values):,} Sequin activityRelations messages, {size / 1e6:.1f} MB, "
        f"{args.partitions} partition(s), {args.runs} runs\n"
        f"- loader (Kafka read_committed → chdb, first message to last commit): median "
        f"{statistics.median(loader_s):.2f}s = **{loader_eps:,.0f} events/s** "
        f"(wall from start incl. the consumer group join: median {statistics.median(wall_s):.2f}s)\n"
        f"- engine (chdb `INSERT … SELECT … FROM file(JSONAsString)` of the same bytes, same SQL): median "
        f"{statistics.median(engine_s):.2f}s = **{engine_eps:,.0f} events/s**\n"
        f"- ratio loader/engine: **{ratio:.2f}** (target ≥ 0.7)\n"
        f"- CPU seconds (all threads of the process, less sensitive to a busy machine): loader median "
        f"{statistics.median(loader_cpu):.2f}s (first message to last commit), engine median "
        f"{statistics.median(engine_cpu):.2f}s; ratio of events per CPU-second "
        f"{statistics.median(engine_cpu) / statistics.median(loader_cpu):.2f}\n"
        f"- load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    with args.results.open("a") as fh:
        fh.write(section)
    print(section)


if __name__ == "__main__":
    main()
