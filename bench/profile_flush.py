"""What one loader flush over several raw buckets costs, step by step (the 'misses' section of RESULTS.md).

    .venv/bin/python -m bench.profile_flush [--rows-per-bucket R] [--buckets N] [--repeats K]

A flush at 20k events/s holds a few hundred to a thousand messages per bucket. This times, on the embedded
engine alone (no Kafka), the loader's own steps (stage bookkeeping, the one parse into the in-memory stage,
one INSERT per bucket table), an INSERT of a single row (the fixed cost of a statement that writes a part),
and two alternatives the loader does not use: a Null-engine stage whose materialized views fan the rows out
to the bucket tables in one statement, serially and with ``parallel_view_processing``. Prints, writes nothing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
import uuid

from bench.common import WORK_DIR, messages
from connectors.warehouse import EmbeddedWarehouse
from stream.buckets import raw_table
from stream.row_sql import insert_sql, problem
from stream.schema import ensure_schema, stage_columns


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows-per-bucket", type=int, default=800)
    ap.add_argument("--buckets", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    n = args.buckets
    want = args.rows_per_bucket * n
    values = [v for _, v in messages(want + want // 4 + 1000) if v and problem(v, "activityRelations") is None]
    assert len(values) >= want, "not enough valid messages generated"
    parts = [values[:want][i::n] for i in range(n)]
    columns, select = insert_sql("activityRelations", part=True)
    work = WORK_DIR / f"profile-flush-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    times: dict[str, list[float]] = {}
    try:
        with EmbeddedWarehouse(work / "wh") as wh:

            def timed(label: str, *sql: str) -> float:
                t = time.perf_counter()
                for statement in sql:
                    wh.command(statement)
                took = (time.perf_counter() - t) * 1000
                times.setdefault(label, []).append(took)
                return took

            ensure_schema(wh, n)
            stage, null_stage = "profile_stage", "profile_null_stage"
            create = f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} ({stage_columns()}) ENGINE = Memory"
            wh.command(create)
            wh.command(f"CREATE TABLE {null_stage} ({stage_columns()}) ENGINE = Null")
            for b in range(n):
                wh.command(
                    f"CREATE MATERIALIZED VIEW profile_fanout_{b} TO {raw_table(b)} "
                    f"AS SELECT {columns} FROM {null_stage} WHERE _part = {b}"
                )
            per_bucket = f"loader: INSERT into one bucket table (~{args.rows_per_bucket} rows)"
            for _ in range(args.repeats):
                # The json_parts file of part i is i.json, so _part is the bucket number here.
                with wh.json_parts(parts) as source:
                    parse = f"({columns}, `_part`) " + select.replace("{source}", source)
                    flush = timed(
                        "loader: stage bookkeeping (create if missing, truncate)", create, f"TRUNCATE {stage}"
                    )
                    flush += timed("loader: one parse into the stage", f"INSERT INTO {stage} {parse}")
                    for b in range(n):
                        flush += timed(
                            per_bucket,
                            f"INSERT INTO {raw_table(b)} ({columns}) SELECT {columns} FROM {stage} WHERE _part = {b}",
                        )
                    times.setdefault("loader: whole flush (the steps above)", []).append(flush)
                    timed(
                        "INSERT of 1 row into a bucket table (a statement's fixed cost)",
                        f"INSERT INTO {raw_table(0)} ({columns}) SELECT {columns} FROM {stage} LIMIT 1",
                    )
                    timed(
                        "alternative: one INSERT into a Null stage, materialized views fan out (serial)",
                        f"INSERT INTO {null_stage} {parse}",
                    )
                    timed(
                        "alternative: the same with parallel_view_processing = 1",
                        f"INSERT INTO {null_stage} {parse} SETTINGS parallel_view_processing = 1",
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{n} buckets, {args.rows_per_bucket} rows each, median of {args.repeats} flushes:")
    for label, samples in times.items():
        print(f"  {statistics.median(samples):7.1f} ms  {label}")


if __name__ == "__main__":
    main()
