"""Warehouse commands: ``query``, ``status`` and ``enrich``."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from bucketer.app import app
from bucketer.options import (
    DEFAULT_DATA_DIR,
    DEFAULT_ROUTER_GROUP,
    BootstrapOpt,
    BucketsOpt,
    DataDirOpt,
    KafkaConfigOpt,
    KafkaOptionOpt,
    OfRouterGroupOpt,
    TopicPrefixOpt,
    fail,
    kafka_connection,
    open_configured_warehouse,
)

T = TypeVar("T")


def existing_warehouse(data_dir: Path):  # noqa: ANN201 - EmbeddedWarehouse | ServerWarehouse
    """For the read-only commands: the configured warehouse, refusing (one line, nothing created) a
    ``--data-dir`` that holds no embedded warehouse, such as a typo. A warehouse is a directory in which chdb
    has laid out its engine (``<data dir>/chdb/metadata``); a ClickHouse server URL skips the check."""
    from connectors.warehouse import ENGINE_DIR

    if not os.environ.get("BUCKETER_CLICKHOUSE_URL") and not (data_dir / ENGINE_DIR / "metadata").is_dir():
        raise fail(
            f"no warehouse in {data_dir} (no {ENGINE_DIR}/ inside): check --data-dir / BUCKETER_DATA_DIR; "
            f"`bucketer run`, `load`, `bootstrap` or `enrich` create one"
        )
    return open_configured_warehouse(data_dir)


def _wait_interruptibly(work: Callable[[], T]) -> T:
    """Run ``work`` in a daemon thread and wait for it; Ctrl-C ends the process at once, with one line.
    A running engine query cannot be interrupted from Python, so os._exit stops it; a query writes nothing,
    and the data dir's lock is a flock, which the kernel drops with the process."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # handed to the main thread
            error.append(exc)

    worker = threading.Thread(target=run, name="bucketer-query", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        sys.stderr.write("bucketer: query cancelled (Ctrl-C)\n")
        sys.stderr.flush()
        os._exit(130)
    if error:
        raise error[0]
    return result[0]


@app.command("query")
def query_cmd(
    sql: Annotated[
        str,
        typer.Argument(
            help="One read-only statement: SELECT, SHOW, DESCRIBE, EXPLAIN or EXISTS; FORMAT X picks the output "
            "format. With --project: {bucket} and {segmentId:String} etc."
        ),
    ],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    project: Annotated[
        str | None,
        typer.Option(
            "--project", envvar="BUCKETER_PROJECT", help="Project slug; resolves its bucket via project_buckets."
        ),
    ] = None,
    max_seconds: Annotated[
        float,
        typer.Option("--max-seconds", min=0.001, envvar="BUCKETER_QUERY_MAX_SECONDS", help="Time limit of the query."),
    ] = 30.0,
    max_rows: Annotated[
        int,
        typer.Option("--max-rows", min=1, envvar="BUCKETER_QUERY_MAX_ROWS", help="Most result rows; more is an error."),
    ] = 1_000_000,
    max_memory_mb: Annotated[
        int,
        typer.Option("--max-memory-mb", min=1, envvar="BUCKETER_QUERY_MAX_MEMORY_MB", help="Memory limit, MiB."),
    ] = 4096,
) -> None:
    """Read-only SQL on the warehouse; one JSON object per line unless the SQL says FORMAT.

    Runs with the engine's readonly = 1 and the limits below set first (the SQL cannot change them:
    a SETTINGS clause or SET is refused); writes, INTO OUTFILE and functions that reach files, the
    network or other servers (file, url, s3, remote, mysql, executable, ...) are refused. Ctrl-C cancels."""
    from connectors.warehouse import WarehouseError
    from stream.query import QueryError, QueryLimits, QueryTimeout, query_raw, read_only

    limits = QueryLimits(timeout_s=max_seconds, max_result_rows=max_rows, max_memory_bytes=max_memory_mb << 20)

    def work() -> bytes:
        with existing_warehouse(data_dir) as wh:
            return query_raw(wh, sql, project=project, limits=limits)

    try:
        read_only(sql)
        out = _wait_interruptibly(work)
    except QueryTimeout as exc:
        raise fail(f"{exc} (--max-seconds {max_seconds:g})") from None
    except (QueryError, WarehouseError) as exc:
        raise fail(str(exc)) from None
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()


@app.command("status")
def status_cmd(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    bootstrap: BootstrapOpt = None,
    kafka_config: KafkaConfigOpt = None,
    kafka_option: KafkaOptionOpt = None,
    router_group: OfRouterGroupOpt = DEFAULT_ROUTER_GROUP,
    topic_prefix: TopicPrefixOpt = "",
    allow_partial: Annotated[
        bool, typer.Option("--allow-partial", help="Exit 0 even when Kafka's figures could not be had.")
    ] = False,
) -> None:
    """Per bucket: raw rows, cleaned rows, share, snapshotId, last and next rebuild; DLQ count and router lag.
    With Kafka (--bootstrap or --kafka-config) and Kafka unreachable, the warehouse part is still shown, and the
    exit is 1 (or 0 with --allow-partial)."""
    import json

    from connectors.topics import TopicNames
    from connectors.warehouse import WarehouseError
    from stream.status import collect

    kafka = kafka_connection(bootstrap, kafka_config, kafka_option, required=False)
    try:
        with existing_warehouse(data_dir) as wh:
            st = collect(wh, kafka=kafka, topics=TopicNames(topic_prefix), router_group=router_group)
    except (WarehouseError, LookupError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(st.as_json()))
        if st.kafka_error and not allow_partial:
            raise fail(f"kafka figures missing (DLQ count, router lag): {st.kafka_error}")
        return
    from rich.console import Console
    from rich.table import Table

    def age(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        if seconds < 60:
            return f"{seconds:.0f}s"
        return f"{seconds / 3600:.1f}h" if seconds >= 3600 else f"{seconds / 60:.0f}m"

    widest = max((b.raw_rows for b in st.buckets), default=0) or 1
    table = Table(title=f"bucketer status ({len(st.buckets)} buckets)")
    for col, justify in (
        ("bucket", "right"),
        ("raw rows", "right"),
        ("cleaned rows", "right"),
        ("share", "right"),
        ("", "left"),
        ("snapshotId", "left"),
        ("rebuilt", "right"),
        ("next rebuild", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for b in st.buckets:
        table.add_row(
            str(b.bucket),
            f"{b.raw_rows:,}",
            f"{b.cleaned_rows:,}",
            f"{b.share:.1%}",
            "█" * round(24 * b.raw_rows / widest),
            b.snapshot_id.strftime("%Y-%m-%d %H:%M") if b.snapshot_id else "-",
            f"{age(b.rebuilt_age_s)} ago ({b.rebuild_seconds:.1f}s)" if b.rebuilt_age_s is not None else "-",
            b.next_rebuild.strftime("%H:%M UTC") if b.next_rebuild else "-",
        )
    table.add_section()
    table.add_row("all", f"{st.raw_total:,}", f"{st.cleaned_total:,}", "100%" if st.raw_total else "-", "", "", "", "")
    console = Console()
    if not console.is_terminal:  # piped (make demo, logs): rich's 80-column default would wrap every row
        console = Console(width=max(console.width, 110))
    console.print(table)
    if st.kafka_error:
        console.print(f"kafka: {st.kafka_error}")
        if not allow_partial:
            raise fail(f"kafka figures missing (DLQ count, router lag): {st.kafka_error}")
    elif kafka is not None:
        console.print(
            f"DLQ messages: {st.dlq_messages if st.dlq_messages is not None else 'no DLQ topic'}   "
            f"router lag: {st.router_lag if st.router_lag is not None else 'no source topic'}"
        )


# --- end warehouse -------------------------------------------------------------------------------------


# --- enrich (stream/enrich.py, stream/schedule.py, connectors/countries.py) ------------------------------
@app.command("enrich")
def enrich_cmd(
    bucket: Annotated[
        list[int] | None, typer.Option("--bucket", "-b", min=0, help="Bucket to rebuild (repeatable).")
    ] = None,
    all_buckets: Annotated[bool, typer.Option("--all", help="Rebuild every bucket.")] = False,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel", "-p", min=1, envvar="BUCKETER_ENRICH_PARALLEL", help="Buckets rebuilt at the same time."
        ),
    ] = 1,
    buckets: BucketsOpt = None,
) -> None:
    """Rebuild cleaned buckets now (the manual trigger): built aside, swapped in atomically."""
    from connectors.warehouse import WarehouseError
    from stream.enrich import Enricher
    from stream.schema import BucketCountMismatch, ensure_schema

    if all_buckets == bool(bucket):
        raise fail("give either --bucket n (repeatable) or --all")
    try:
        with open_configured_warehouse(data_dir) as wh:
            n = ensure_schema(wh, buckets)  # the warehouse's N; a different --buckets is refused
        todo = list(range(n)) if all_buckets else list(bucket or [])
        bad = [b for b in todo if b >= n]
        if bad:
            raise fail(f"no bucket {bad[0]}: buckets are 0..{n - 1}")
        enricher = Enricher(lambda: open_configured_warehouse(data_dir), lock_dir=data_dir / "locks")
        results = enricher.rebuild_many(todo, parallel=parallel)
    except BucketCountMismatch as exc:
        raise fail(str(exc), 2) from None
    except WarehouseError as exc:
        raise fail(str(exc)) from None
    for r in results:
        if r.status == "ok":
            snap = r.snapshot_id.strftime("%Y-%m-%dT%H:%MZ") if r.snapshot_id else "-"
            typer.echo(f"bucket {r.bucket}: {r.rows} rows in {r.seconds:.2f}s, snapshot {snap}")
        else:
            typer.echo(f"bucket {r.bucket}: {r.status}: {r.error}", err=True)
    failed = [r.bucket for r in results if r.status != "ok"]
    if failed:
        raise fail(f"{len(failed)} of {len(results)} bucket(s) not rebuilt: {failed}")


# --- end enrich ----------------------------------------------------------------------------------------
