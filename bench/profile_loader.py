"""Where the loader's time goes, against the engine's own ingest (the 'misses' section of RESULTS.md).

    .venv/bin/python -m bench.profile_loader [--count N] [--repeats R]

Prints, and writes nothing:

1. The loader's timeline on the bench_loader input (one bucket topic, ~100k messages): when each flush is
   handed over, how many messages it holds and how long its insert takes, with the default ``max_bytes``
   (64 MiB) and with a limit no batch reaches (one flush).
2. The insert path on the engine alone, no Kafka: the same SQL over a file written beforehand (bench_loader's
   baseline) vs ``Warehouse.insert_json`` (which writes the values to a scratch file first) in one, two and
   four inserts, and the scratch-file write by itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable

from bench.bench_loader import TimedLoader, produce
from bench.common import WORK_DIR, broker, messages, unique_prefix
from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from connectors.warehouse import EmbeddedWarehouse, write_all
from stream.buckets import raw_table
from stream.loader import LoaderConfig
from stream.row_sql import insert_sql, problem
from stream.schema import ensure_schema


class Timeline(TimedLoader):
    """A loader that records, per flush, (messages, insert start, insert end) relative to its first message."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.flushes: list[tuple[int, float, float]] = []

    def _write(self, pending):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        super()._write(pending)
        self.flushes.append((sum(len(p.values) for p in pending.values()), start, time.perf_counter()))


def timeline(wh: EmbeddedWarehouse, bootstrap: str, names: TopicNames, max_bytes: int) -> str:
    wh.command(f"TRUNCATE TABLE {raw_table(0)}")
    cfg = LoaderConfig(
        kafka=KafkaConnection.plain(bootstrap),
        buckets=1,
        group=f"prof-{uuid.uuid4().hex[:8]}",
        topics=names,
        max_bytes=max_bytes,
    )
    loader = Timeline(cfg, wh)
    loader.run(until_idle=3.0)
    assert loader.first is not None and loader.last is not None
    t0 = loader.first
    steps = ", ".join(f"{n:,} msgs inserted {s - t0:.2f}-{e - t0:.2f}s" for n, s, e in loader.flushes)
    return f"first message -> last commit {loader.last - t0:.2f}s: {steps}"


def median_ms(fn: Callable[[], object], repeats: int, before: Callable[[], object] = lambda: None) -> float:
    times = []
    for _ in range(repeats):
        before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000, help="messages generated (the valid ones are used)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    values = [v for _, v in messages(args.count) if v and problem(v, "activityRelations") is None]
    names = TopicNames(prefix=unique_prefix("loaderprof"))
    work = WORK_DIR / f"profile-loader-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    print(f"{len(values):,} messages, {sum(map(len, values)) / 1e6:.1f} MB")
    try:
        with broker() as bootstrap, EmbeddedWarehouse(work / "wh") as wh:
            produce(bootstrap, names.bucket(0), values, 1)
            ensure_schema(wh, 1)
            timeline(wh, bootstrap, names, LoaderConfig.max_bytes)  # warm-up: the first run is slower
            for rep in range(args.repeats):
                for label, max_bytes in (("default max_bytes", LoaderConfig.max_bytes), ("one flush", 1 << 40)):
                    print(f"loader, repeat {rep + 1}, {label}: {timeline(wh, bootstrap, names, max_bytes)}")

            table, (columns, select) = raw_table(0), insert_sql("activityRelations")
            target = f"{table} ({columns})"
            path = os.path.join(tempfile.gettempdir(), f"profile-loader-{uuid.uuid4().hex[:8]}.json")
            with open(path, "wb") as f:
                write_all(f.fileno(), values)
            source = f"file('{path}', 'JSONAsString', 'v String')"

            def truncate() -> None:
                wh.command(f"TRUNCATE TABLE {table}")

            def in_parts(k: int) -> Callable[[], None]:
                step = -(-len(values) // k)
                chunks = [values[i : i + step] for i in range(0, len(values), step)]
                return lambda: [wh.insert_json(target, select, chunk) for chunk in chunks]

            def write_scratch() -> None:
                fd, name = tempfile.mkstemp(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
                try:
                    write_all(fd, values)
                finally:
                    os.close(fd)
                    os.unlink(name)

            try:
                runs = {
                    "engine: INSERT ... FROM file written beforehand (bench_loader's baseline)": lambda: wh.command(
                        f"INSERT INTO {target} " + select.replace("{source}", source)
                    ),
                    "insert_json, 1 insert": in_parts(1),
                    "insert_json, 2 inserts": in_parts(2),
                    "insert_json, 4 inserts": in_parts(4),
                }
                for label, fn in runs.items():
                    print(f"{label}: median {median_ms(fn, args.repeats + 1, truncate):.0f} ms")
                print(f"scratch-file write alone: median {median_ms(write_scratch, args.repeats + 1):.0f} ms")
            finally:
                os.unlink(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
