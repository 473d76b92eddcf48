"""Benchmark (not a test): router throughput vs a plain confluent-kafka consume->produce passthrough.

Both read the same ~1 KB Sequin messages from the same source topic on the same broker in the same run,
with the same batch size, in exactly-once (transactions) and at-least-once (idempotent producer, commit
after delivery) mode. Each trial runs in its own process (so its peak RSS is its own); the rate is
messages / (last commit - first batch). Prints a table and appends a section to bench/RESULTS.md.

    .venv/bin/python bench/bench_router.py [--bootstrap B] [--messages 100000] [--repeats 3]

Without --bootstrap a local broker is started in a temporary directory and stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.kafka import consumer_config, ensure_topics, producer_config  # noqa: E402
from connectors.kafka_conn import KafkaConnection  # noqa: E402
from connectors.topics import TopicNames  # noqa: E402
from stream.router import Router, RouterConfig  # noqa: E402

BATCH = int(os.environ.get("BENCH_BATCH", str(RouterConfig.batch_size)))


def sequin_value(rng: random.Random, segments: list[str], i: int) -> bytes:
    rec = {
        "activityId": f"act-{i}",
        "segmentId": rng.choice(segments),
        "memberId": str(uuid.uuid4()),
        "organizationId": str(uuid.uuid4()),
        "platform": "github",
        "type": "authored-commit",
        "channel": f"https://github.com/acme/repo{rng.randint(1, 50)}",
        "sourceId": uuid.uuid4().hex,
        "timestamp": "2025-05-01T12:00:00.000000Z",
        "createdAt": "2025-05-01T12:00:01.000000Z",
        "updatedAt": "2025-05-01T12:00:03.120000Z",
        "username": f"user{i % 977}",
        "gitInsertions": 12,
        "gitDeletions": 3,
        "sentimentScore": None,
        "score": 2,
        "isContribution": True,
        "body": "x" * rng.randint(300, 420),
    }
    meta = {
        "table_schema": "public",
        "table_name": "activityRelations",
        "idempotency_key": uuid.uuid4().hex,
        "commit_timestamp": "2025-05-01T12:00:03.121004Z",
        "commit_lsn": 88120311 + i,
        "commit_idx": 0,
    }
    return orjson.dumps({"action": "insert", "changes": None, "record": rec, "metadata": meta})


def load(bootstrap: str, topic: str, count: int) -> int:
    ensure_topics(KafkaConnection.plain(bootstrap), [topic], 3, 1)
    rng = random.Random(1)
    segments = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(300)]
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "compression.type": "lz4"})
    size = 0
    for i in range(count):
        v = sequin_value(rng, segments, i)
        size += len(v)
        while True:
            try:
                p.produce(topic, v, f"act-{i}".encode())
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    p.flush(60)
    return size // count


def passthrough(
    bootstrap: str, source: str, out: str, count: int, eos: bool, partitions: int = 3
) -> tuple[float, float]:
    """The baseline: consume a batch, produce every message unchanged to one topic, commit."""
    ensure_topics(KafkaConnection.plain(bootstrap), [out], partitions, 1)
    group = f"pt-{uuid.uuid4().hex[:8]}"
    consumer = Consumer(consumer_config(KafkaConnection.plain(bootstrap), group))
    producer = Producer(producer_config(KafkaConnection.plain(bootstrap), f"pt-{group}" if eos else None))
    if eos:
        producer.init_transactions(30)
    consumer.subscribe([source])
    done, first, last = 0, 0.0, 0.0
    while done < count:
        msgs = consumer.consume(BATCH, timeout=RouterConfig.batch_time)
        if not msgs:
            continue
        first = first or time.monotonic()
        offsets: dict[tuple[str, int], int] = {}
        if eos:
            producer.begin_transaction()
        for m in msgs:
            producer.produce(out, m.value(), m.key())
            offsets[(m.topic(), m.partition())] = m.offset() + 1
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        if eos:
            producer.send_offsets_to_transaction(tps, consumer.consumer_group_metadata(), 30)
            producer.commit_transaction(30)
        else:
            producer.flush(30)
            consumer.commit(offsets=tps, asynchronous=False)
        done += len(msgs)
        last = time.monotonic()
    consumer.close()
    return first, last


def route(bootstrap: str, source_prefix: str, count: int, eos: bool) -> tuple[float, float]:
    cfg = RouterConfig(
        kafka=KafkaConnection.plain(bootstrap),
        buckets=10,
        group=f"rt-{uuid.uuid4().hex[:8]}",
        topic_prefix=source_prefix,
        batch_size=BATCH,
        exactly_once=eos,
        instance_id=uuid.uuid4().hex[:6],
        progress_interval=3600,
        partitions=int(os.environ.get("BENCH_PARTITIONS", "3")),
    )
    router = Router(cfg)
    marks: list[float] = []
    real_add = router.stats.add

    def add(counts):  # type: ignore[no-untyped-def]
        marks.append(time.monotonic())
        real_add(counts)
        if router.stats.routed + sum(router.stats.dlq.values()) >= count:
            router.stop()

    router.stats.add = add  # type: ignore[method-assign]
    real_batch = router._batch
    starts: list[float] = []

    def batch(msgs, consumer, sink):  # type: ignore[no-untyped-def]
        if not starts:
            starts.append(time.monotonic())
        real_batch(msgs, consumer, sink)

    router._batch = batch  # type: ignore[method-assign]
    t = threading.Thread(target=router.run)
    t.start()
    t.join(600)
    assert router.stats.routed == count, router.stats.summary()
    return starts[0], marks[-1]


def child(args: argparse.Namespace) -> None:
    eos = args.mode == "eos"
    if args.child.startswith("passthrough"):
        parts = 30 if args.child == "passthrough30" else 3
        first, last = passthrough(
            args.bootstrap, args.source, f"{args.source}.pt-{uuid.uuid4().hex[:6]}", args.messages, eos, parts
        )
    else:
        first, last = route(args.bootstrap, args.prefix, args.messages, eos)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rate": args.messages / (last - first), "rss_mb": rss_mb}))


def trial(bootstrap: str, kind: str, mode: str, names: TopicNames, count: int) -> dict[str, float]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--mode",
        mode,
        "--bootstrap",
        bootstrap,
        "--source",
        names.source,
        "--prefix",
        names.prefix,
        "--messages",
        str(count),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{kind} {mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap")
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--mode", default="eos")
    ap.add_argument("--source")
    ap.add_argument("--prefix", default="")
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    broker = None
    if not args.bootstrap:
        from bucketer.localkafka import LocalKafka, free_port

        broker = LocalKafka(tempfile.mkdtemp(prefix="bench-kafka-"), port=free_port(), controller_port=free_port())
        args.bootstrap = broker.start()
    try:
        run(args)
    finally:
        if broker is not None:
            broker.stop()


def run(args: argparse.Namespace) -> None:
    names = TopicNames(f"bench-{uuid.uuid4().hex[:6]}.")
    avg = load(args.bootstrap, names.source, args.messages)
    # Output topics exist before any timed run, for the router as for the passthrough (whose topic is
    # created before it consumes): a fresh topic's first produce waits for its metadata.
    ensure_topics(
        KafkaConnection.plain(args.bootstrap),
        [*names.buckets(10), names.dlq],
        int(os.environ.get("BENCH_PARTITIONS", "3")),
        1,
    )
    print(f"loaded {args.messages} messages of ~{avg} bytes into {names.source}", flush=True)
    rows = []
    for mode in ("eos", "alo"):
        res: dict[str, list[dict[str, float]]] = {"passthrough": [], "passthrough30": [], "router": []}
        for i in range(args.repeats):
            for kind in res:  # interleaved, so drift hits all alike
                res[kind].append(trial(args.bootstrap, kind, mode, names, args.messages))
                print(
                    f"{mode} {kind} #{i + 1}: {res[kind][-1]['rate']:.0f} msg/s, "
                    f"peak RSS {res[kind][-1]['rss_mb']:.0f} MB",
                    flush=True,
                )
        pt = statistics.median(r["rate"] for r in res["passthrough"])
        pt30 = statistics.median(r["rate"] for r in res["passthrough30"])
        rt = statistics.median(r["rate"] for r in res["router"])
        rss = max(r["rss_mb"] for r in res["router"])
        ptrss = max(r["rss_mb"] for r in res["passthrough"] + res["passthrough30"])
        rows.append((mode, pt, pt30, rt, rss, ptrss))
    table = [
        "| mode | passthrough 1x3 msg/s | passthrough 1x30 msg/s | router 10x3 msg/s | router / pt 1x3 | "
        "router / pt 1x30 | router peak RSS MB | passthrough peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, pt, pt30, rt, rss, ptrss in rows:
        name = "exactly-once" if mode == "eos" else "at-least-once"
        table.append(
            f"| {name} | {pt:,.0f} | {pt30:,.0f} | {rt:,.0f} | {rt / pt:.2f} | {rt / pt30:.2f} | "
            f"{rss:.0f} | {ptrss:.0f} |"
        )
    print("\n".join(table))
    if args.no_results:
        return
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )

    section = [
        f"## Router vs passthrough ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)\n",
        f"- machine: {platform.node()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; broker: local Apache Kafka 4.1.1 KRaft on the same machine; "
        f"load average at the end {os.getloadavg()[0]:.1f}",
        f"- command: `.venv/bin/python bench/bench_router.py {' '.join(sys.argv[1:])}`",
        f"- {args.messages} Sequin inserts of ~{avg} bytes, 3 source partitions, batch {BATCH}; router to 10 "
        "bucket topics x 3 partitions (30 partitions per transaction); passthrough to 1 topic x 3 partitions "
        "and, to separate the cost of writing 30 partitions from the cost of routing, 1 topic x 30; median of "
        f"{args.repeats} interleaved runs, each in its own process; rate = messages / (last commit - first batch)",
        "- target: router >= 0.8x passthrough, peak RSS <= 300 MB\n",
        *table,
    ]
    from bench.report import replace_section

    replace_section("router", "\n".join(section))


if __name__ == "__main__":
    main()
