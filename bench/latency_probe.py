"""The instruments of bench_latency: a fixed-rate producer (its own process), the visibility poller, and
the bucket-topic append times. See bench/bench_latency.py for the method.

    python -m bench.latency_probe BOOTSTRAP TOPIC TAG RATE COUNT TIMES_FILE [PARTITIONS]  # the producer process

Events are Sequin inserts from loadgen templates with a unique activityId and a sequential sourceId
``{tag}-{seq:09d}``, so a poll can ask for "every id at or above the oldest one not seen yet".
"""

from __future__ import annotations

import array
import contextlib
import json
import re
import signal
import sys
import time
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path

from bench.common import messages
from bench.kafka_run import admin

SEQ_DIGITS = 9
PREBUILT = 1_000_000  # events built up front, at most


# -- the producer process -------------------------------------------------------------------------------
def templates(n: int = 200) -> list[bytes]:
    """Good loadgen inserts with ``@@AID@@`` / ``@@SRC@@`` placeholders for activityId and sourceId."""
    import orjson

    out = []
    for _key, value in messages(max(n * 3, 1000), seed=7):
        try:
            doc = orjson.loads(value) if value else None
        except orjson.JSONDecodeError:
            continue
        if not isinstance(doc, dict) or doc.get("action") != "insert" or not isinstance(doc.get("record"), dict):
            continue
        record = doc["record"]
        aid = record.get("activityId")
        if not isinstance(aid, str) or not record.get("segmentId"):
            continue
        record["sourceId"] = "@@SRC@@"
        out.append(orjson.dumps(doc).replace(aid.encode(), b"@@AID@@"))
        if len(out) >= n:
            break
    if not out:
        raise RuntimeError("no insert templates found in the generated messages")
    return out


def event(tpl: bytes, tag: str, seq: int) -> tuple[bytes, bytes]:
    aid = str(uuid.UUID(int=zlib.crc32(tag.encode()) << 64 | seq)).encode()
    src = f"{tag}-{seq:0{SEQ_DIGITS}d}".encode()
    return aid, tpl.replace(b"@@AID@@", aid).replace(b"@@SRC@@", src)


def produce(
    bootstrap: str, topic: str, tag: str, rate: float, count: int, times_path: Path, partitions: int = 0
) -> None:
    """Send ``count`` events at ``rate``/s; write the produce() wall-clock times (float64 array). With
    ``partitions``, event ``seq`` goes to partition ``seq % partitions`` (else the key's)."""
    from confluent_kafka import Producer

    tpls = templates()
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 1, "enable.idempotence": True, "partitioner": "murmur2_random"}
    )
    # Built before the clock starts; a long open-ended run (bench_rebucket: stopped by SIGTERM) builds them as
    # it goes instead of holding gigabytes.
    events: Iterable[tuple[bytes, bytes]] = (
        [event(tpls[seq % len(tpls)], tag, seq) for seq in range(count)]
        if count <= PREBUILT
        else (event(tpls[seq % len(tpls)], tag, seq) for seq in range(count))
    )
    stamps = array.array("d", bytes(8 * count))
    produce_one = producer.produce
    stop = []  # SIGTERM: stop sending, still flush and write the stamps (unsent events keep 0.0)
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    start = time.perf_counter()
    sent = 0
    for seq, (key, value) in enumerate(events):
        if stop:
            break
        wait = start + seq / rate - time.perf_counter()
        if wait > 0.0005:
            time.sleep(wait)
        stamps[seq] = time.time()
        where = {"partition": seq % partitions} if partitions else {}
        try:
            produce_one(topic, value, key, **where)
        except BufferError:
            producer.poll(0.05)
            produce_one(topic, value, key, **where)
        sent += 1
        if seq % 64 == 0:
            producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("producer could not deliver everything within 60 s")
    times_path.write_bytes(stamps.tobytes())
    print(json.dumps({"achieved_rate": sent / (time.perf_counter() - start), "sent": sent}), flush=True)


PART_INSERT = re.compile(r"^INSERT INTO activityRelations_bucket_\S+ .* WHERE _part = (\d+)$", re.S)


# -- the insert clock ---------------------------------------------------------------------------------------
class InsertClock:
    """Wraps the loader's warehouse: an event is visible when the INSERT holding it returns.

    ``Warehouse.insert_json`` is a synchronous INSERT (no async_insert), so its rows are visible to every
    query from the moment it returns; stamping there costs one ``bytes.find`` per row and no query, so it
    does not disturb what it measures. Everything else is delegated unchanged.
    """

    def __init__(self, inner) -> None:  # noqa: ANN001 - a Warehouse
        self.inner = inner
        self._parts = None
        self.start("", 0)

    def start(self, tag: str, count: int) -> None:
        self.marker = f'"sourceId":"{tag}-'.encode()
        self.count = count
        self.seen = array.array("d", bytes(8 * count))
        self.taken = array.array("d", bytes(8 * count))  # when the loader took the event from Kafka
        self.visible = 0
        self.inserts: list[tuple[float, int]] = []  # (seconds the INSERT took, rows)

    def insert_json(self, table: str, select: str, data) -> None:  # noqa: ANN001 - bytes | Sequence[bytes]
        t0 = time.perf_counter()
        self.inner.insert_json(table, select, data)
        self._stamp(data, t0)

    @contextlib.contextmanager
    def json_parts(self, parts):  # noqa: ANN001, ANN201 - the loader's one-parse path (stream/loader.py)
        self._parts = parts
        try:
            with self.inner.json_parts(parts) as source:
                yield source
        finally:
            self._parts = None

    def command(self, sql: str, params=None) -> None:  # noqa: ANN001
        """A bucket table taking its share of the stage (``… WHERE _part = i``) makes part i visible."""
        t0 = time.perf_counter()
        self.inner.command(sql, params)
        m = PART_INSERT.search(sql)
        if m and self._parts is not None:
            self._stamp(self._parts[int(m.group(1))], t0)

    def stamp_taken(self, values) -> None:  # noqa: ANN001 - the values of one consume() batch
        """Called by the loader (bench_latency's subclass) as it takes a batch from Kafka."""
        self._mark((v for v in values if v), self.taken, time.time())

    def _stamp(self, data, t0: float) -> None:  # noqa: ANN001
        now = time.time()
        self.inserts.append((time.perf_counter() - t0, 1 if isinstance(data, bytes) else len(data)))
        self.visible += self._mark([data] if isinstance(data, bytes) else data, self.seen, now)

    def _mark(self, values, stamps: array.array, now: float) -> int:  # noqa: ANN001
        """Stamp ``now`` for each event of this phase found in ``values`` and not stamped yet; how many."""
        marker, count, marked = self.marker, self.count, 0
        for value in values:
            at = value.find(marker)
            if at >= 0:
                start = at + len(marker)
                seq = int(value[start : start + SEQ_DIGITS])
                if seq < count and not stamps[seq]:
                    stamps[seq] = now
                    marked += 1
        return marked

    @property
    def done(self) -> bool:
        return self.visible >= self.count

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)


# -- the poller ------------------------------------------------------------------------------------------
class Poller:
    """Finds events ``{tag}-{seq}`` in the raw bucket tables; remembers when each was first seen.

    Cheap, so that watching does not slow down what is watched (the loader inserts through the same
    embedded engine): each poll lists the active parts (``system.parts``) and reads, from the parts it has
    not read before only (new inserts, and merges of parts it may have missed), the sourceIds at or above
    the oldest unseen one. Every ``sweep_every`` polls a full scan for the still-missing ids is a safety
    net (those events count as seen at the sweep: an over-, never an under-estimate).
    """

    def __init__(self, wh, buckets: int, tag: str, count: int, sweep_every: int = 20) -> None:  # noqa: ANN001
        from stream.buckets import raw_table

        self.wh, self.tag, self.count, self.sweep_every = wh, tag, count, sweep_every
        self.tables = [raw_table(b) for b in range(buckets)]
        self.seen = array.array("d", bytes(8 * count))
        self.next_unseen = 0
        self.read_parts: set[tuple[str, str]] = set()
        self.durations: list[float] = []
        self.polls = 0
        self.high = f"{tag}-{'9' * SEQ_DIGITS}~"
        names = ", ".join(f"'{t}'" for t in self.tables)
        self.parts_sql = (
            f"SELECT table, name FROM system.parts WHERE database = currentDatabase() AND active AND table IN ({names})"
        )

    def sweep(self) -> int:
        return self.poll(sweep=True)

    def poll(self, sweep: bool = False) -> int:
        """One round of queries; returns how many events became visible."""
        self.polls += 1
        t0 = time.perf_counter()
        low = f"{self.tag}-{self.next_unseen:0{SEQ_DIGITS}d}"
        fresh: dict[str, list[str]] = {}
        for table, name in self.wh.rows(self.parts_sql):
            if (table, name) not in self.read_parts:
                fresh.setdefault(table, []).append(name)
        rows: list[tuple[str]] = []
        params = {"low": low, "high": self.high}
        for table, parts in fresh.items():
            rows += self.wh.rows(
                f"SELECT sourceId FROM `{table}` WHERE _part IN {{parts:Array(String)}} "
                "AND sourceId >= {low:String} AND sourceId < {high:String}",
                {**params, "parts": parts},
            )
            self.read_parts.update((table, p) for p in parts)
        if sweep or self.polls % self.sweep_every == 0:
            for table in self.tables:
                rows += self.wh.rows(
                    f"SELECT sourceId FROM `{table}` WHERE sourceId >= {{low:String}} AND sourceId < {{high:String}}",
                    params,
                )
        self.durations.append(time.perf_counter() - t0)
        return self.record(rows)

    def record(self, rows: list[tuple[str]]) -> int:
        """Stamp now on each event of ``rows`` (sourceIds) not seen before; how many were new."""
        now = time.time()
        new = 0
        cut = len(self.tag) + 1
        for (source_id,) in rows:
            seq = int(source_id[cut:])
            if seq < self.count and self.seen[seq] == 0.0:
                self.seen[seq] = now
                new += 1
        while self.next_unseen < self.count and self.seen[self.next_unseen] != 0.0:
            self.next_unseen += 1
        return new

    @property
    def done(self) -> bool:
        return self.next_unseen >= self.count


def appended_at(bootstrap: str, bucket_topics: list[str], tag: str, count: int) -> list[float]:
    """Broker append time (s) of each event ``{tag}-{seq}`` in the bucket topics (read_committed); 0 if absent."""
    from confluent_kafka import Consumer, TopicPartition

    marker = f'"sourceId":"{tag}-'.encode()
    stamps = [0.0] * count
    md = admin(bootstrap).list_topics(timeout=10)
    tps = [TopicPartition(t, p, 0) for t in bucket_topics for p in md.topics[t].partitions]
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-latency-reader",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    consumer.assign(tps)
    eof: set[tuple[str, int]] = set()
    deadline = time.monotonic() + 120
    try:
        while len(eof) < len(tps) and time.monotonic() < deadline:
            for m in consumer.consume(10000, 1.0):
                if m.error() is not None:
                    eof.add((m.topic(), m.partition()))
                    continue
                value = m.value() or b""
                at = value.find(marker)
                if at >= 0:
                    start = at + len(marker)
                    seq = int(value[start : start + SEQ_DIGITS])
                    if seq < count and not stamps[seq]:
                        stamps[seq] = m.timestamp()[1] / 1000.0
    finally:
        consumer.close()
    return stamps


def pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(round(q / 100 * (len(sorted_values) - 1))))]


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    bootstrap, topic, tag, rate, count, path = args[:6]
    produce(bootstrap, topic, tag, float(rate), int(count), Path(path), int(args[6]) if len(args) > 6 else 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
