"""Warehouse commands: ``query``, ``status`` and ``enrich``."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

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

if TYPE_CHECKING:
    from stream.query import QueryLimits

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


# --- a data dir held by a running process: through its HTTP API -----------------------------------------


def in_use(data_dir: Path, pid: int | None) -> str:
    """The refusal for a data dir held by a process that does not serve the API."""
    return (
        f"data dir {data_dir} is in use by another bucketer process (pid {pid if pid is not None else '?'}); "
        f"stop it, or start it with --http-port to read it while it runs"
    )


class ApiAnswerError(Exception):
    """The running process's API answered with an error (``status``, its one-line message)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RunningApi:
    """The HTTP API of the process holding a data dir, as the data dir's record says (connectors.warehouse
    ``dir_holder``); BUCKETER_API_TOKEN's first token goes as a bearer header, never in the URL."""

    def __init__(self, data_dir: Path, pid: int | None, url: str, token_required: bool) -> None:
        self.data_dir, self.pid, self.url = data_dir, pid, url
        tokens = [t.strip() for t in os.environ.get("BUCKETER_API_TOKEN", "").split(",") if t.strip()]
        if token_required and not tokens:
            raise fail(
                f"data dir {data_dir} is held by pid {pid}, which serves it at {url} with a token: "
                f"set BUCKETER_API_TOKEN to read it while it runs"
            )
        self._headers = {"Authorization": f"Bearer {tokens[0]}"} if tokens else {}

    def call(self, method: str, path: str, params: dict[str, str] | None = None, body: str | None = None) -> bytes:
        import httpx

        from connectors.warehouse import one_line

        try:
            # No read timeout of ours: the server's own query time limit ends a long query (Ctrl-C too).
            r = httpx.request(
                method,
                self.url + path,
                params=params,
                content=body.encode() if body is not None else None,
                headers=self._headers | ({"Content-Type": "text/plain; charset=utf-8"} if body is not None else {}),
                timeout=httpx.Timeout(10.0, read=None),
            )
        except httpx.HTTPError as exc:
            raise ApiAnswerError(
                f"cannot reach the API of pid {self.pid} (which holds {self.data_dir}) at {self.url}: {one_line(exc)}"
            ) from None
        if r.status_code == 200:
            return r.content
        try:
            message = str(r.json()["error"])
        except (ValueError, KeyError, TypeError):
            message = " ".join(r.text.split())[:300] or f"HTTP {r.status_code}"
        if r.status_code == 401:
            message = f"the API of pid {self.pid} at {self.url} refused BUCKETER_API_TOKEN: {message}"
        raise ApiAnswerError(message, r.status_code)

    def json(self, path: str, params: dict[str, str] | None = None) -> Any:
        import orjson

        return orjson.loads(self.call("GET", path, params))


def running_api(data_dir: Path) -> RunningApi | None:
    """The API to read ``data_dir`` through when a live process holds it, None when it is free (or the
    warehouse is a ClickHouse server). A holder that records no API: the one-line refusal. Writes nothing."""
    from connectors.warehouse import dir_holder

    if os.environ.get("BUCKETER_CLICKHOUSE_URL"):
        return None
    holder = dir_holder(data_dir)
    if holder is None:
        return None
    if holder.api_url is None:
        raise fail(in_use(data_dir, holder.pid))
    api = RunningApi(data_dir, holder.pid, holder.api_url, holder.token_required)
    typer.echo(f"bucketer: {data_dir} is held by pid {holder.pid}: reading it through its API at {api.url}", err=True)
    return api


# The highest max_seconds / max_rows / max_memory_mb the API takes (stream.api.LIMIT_PARAMS, not imported: it
# brings FastAPI in).
API_LIMIT_TOPS = {"max_seconds": 1e6, "max_rows": 10**15, "max_memory_mb": 10**9}


def query_via_api(api: RunningApi, sql: str, project: str | None, limits: QueryLimits | None = None) -> bytes:
    """What the local path prints (JSON lines, or the FORMAT clause's output), from ``POST /v0/sql``: the same
    query path on the server's engine. With a project: its bucket from the ``project_buckets`` pipe, then
    ``{bucket}`` and the ``{bucketId}``/``{segmentId}``/``{project}`` parameters as locally. ``limits`` go as
    the API's ``max_seconds``/``max_rows``/``max_memory_mb``: the server applies each unless its own is lower."""
    from stream.buckets import cleaned_table
    from stream.query import DEFAULT_FORMAT, QueryError, QueryNotFound, read_only, user_format

    statement = read_only(sql)
    params: dict[str, str] = {}
    if limits is not None:
        top = API_LIMIT_TOPS  # a flag past what the API takes (a 400) asks for no less than its highest value
        params = {
            # digits only: no exponent
            "max_seconds": f"{min(limits.timeout_s, top['max_seconds']):.6f}".rstrip("0").rstrip("."),
            "max_rows": str(min(limits.max_result_rows, top["max_rows"])),
            "max_memory_mb": str(min(max(1, limits.max_memory_bytes >> 20), top["max_memory_mb"])),
        }
    if project is None:
        if "{bucket}" in statement:
            raise QueryError("{bucket} needs --project")
    else:
        try:
            found = api.json("/v0/pipes/project_buckets.json", {"project": project})["data"]
        except ApiAnswerError as exc:
            if exc.status == 404:
                raise QueryNotFound(f"no enabled project with slug {project!r}") from None
            raise
        row = found[0]
        statement = statement.replace("{bucket}", cleaned_table(int(row["bucketId"])))
        params |= {"bucketId": str(row["bucketId"]), "segmentId": str(row["segmentId"]), "project": row["project"]}
    if user_format(statement) is None:
        statement += f"\nFORMAT {DEFAULT_FORMAT}"  # on a line of its own: a trailing -- comment ends first
    try:
        return api.call("POST", "/v0/sql", params, body=statement)
    except ApiAnswerError as exc:
        if exc.status == 400 and str(exc).startswith("FORMAT "):
            raise ApiAnswerError(
                f"{exc} (the API of the running process; stop it to read any format directly)"
            ) from None
        raise


def status_from_json(body: dict[str, Any]):  # noqa: ANN201 - stream.status.Status
    """``Status.as_json()`` (what ``/v0/status`` answers) back into a Status."""
    from datetime import datetime

    from stream.status import BucketStatus, Status

    def at(value: Any) -> datetime | None:
        return datetime.fromisoformat(value) if value else None

    buckets = [
        BucketStatus(
            bucket=int(b["bucket"]),
            raw_rows=int(b["raw_rows"]),
            cleaned_rows=int(b["cleaned_rows"]),
            share=float(b["share"]),
            snapshot_id=at(b.get("snapshot_id")),
            snapshot_age_s=b.get("snapshot_age_s"),
            rebuilt_at=at(b.get("rebuilt_at")),
            rebuilt_age_s=b.get("rebuilt_age_s"),
            rebuild_seconds=b.get("rebuild_seconds"),
            next_rebuild=at(b.get("next_rebuild")),
        )
        for b in body["buckets"]
    ]
    return Status(
        buckets,
        int(body["raw_total"]),
        int(body["cleaned_total"]),
        datetime.fromisoformat(body["generated_at"]),
        dlq_messages=body.get("dlq_messages"),
        router_lag=body.get("router_lag"),
        kafka_error=body.get("kafka_error"),
        loader_lag=body.get("loader_lag"),
        notes=list(body.get("notes") or []),
        kafka_age_s=body.get("kafka_age_s"),
        migration=body.get("migration"),
    )


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
    network or other servers (file, url, s3, remote, mysql, executable, ...) are refused. Ctrl-C cancels.
    On a data dir held by a running `run --http-port` / `serve`: through its API (BUCKETER_API_TOKEN), the
    same output; the limits below go with the query, and that process's own limits apply where lower."""
    from connectors.warehouse import DataDirInUse, WarehouseError
    from stream.query import QueryError, QueryLimits, QueryTimeout, query_raw, read_only

    limits = QueryLimits(timeout_s=max_seconds, max_result_rows=max_rows, max_memory_bytes=max_memory_mb << 20)

    def work() -> bytes:
        with existing_warehouse(data_dir) as wh:
            return query_raw(wh, sql, project=project, limits=limits)

    try:
        read_only(sql)
        api = running_api(data_dir)
        if api is not None:
            try:
                out = _wait_interruptibly(lambda: query_via_api(api, sql, project, limits))
            except ApiAnswerError as exc:
                limit = (
                    f" (--max-seconds {max_seconds:g}, or the running process's BUCKETER_QUERY_TIMEOUT if lower)"
                    if exc.status == 408
                    else ""
                )
                raise fail(f"{exc}{limit}") from None
        else:
            out = _wait_interruptibly(work)
    except QueryTimeout as exc:
        raise fail(f"{exc} (--max-seconds {max_seconds:g})") from None
    except DataDirInUse as exc:  # taken between the look and the open
        raise fail(in_use(exc.data_dir, exc.pid)) from None
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
    exit is 1 (or 0 with --allow-partial). On a data dir held by a running `run --http-port` / `serve`:
    through its API (BUCKETER_API_TOKEN), with that process's Kafka figures."""
    import json

    from connectors.topics import TopicNames
    from connectors.warehouse import DataDirInUse, WarehouseError
    from stream.status import collect

    kafka = kafka_connection(bootstrap, kafka_config, kafka_option, required=False)
    try:
        api = running_api(data_dir)
        if api is not None:  # the running process's own figures (its Kafka, its topics and groups)
            body = api.json("/v0/status")
            st = status_from_json(body)
            kafka_known = any(body.get(k) is not None for k in ("dlq_by_class", "dlq_messages", "router_lag"))
        else:
            with existing_warehouse(data_dir) as wh:
                st = collect(wh, kafka=kafka, topics=TopicNames(topic_prefix), router_group=router_group)
            kafka_known = kafka is not None
    except DataDirInUse as exc:  # taken between the look and the open
        raise fail(in_use(exc.data_dir, exc.pid)) from None
    except (WarehouseError, LookupError, ApiAnswerError) as exc:
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
    if st.migration is not None:
        m = st.migration
        console.print(
            f"rebucket {m['id']}: {m['old']} -> {m['new']} buckets ({m['path']} path), phase {m['phase']}"
            + (f", error: {m['error']}" if m.get("error") else "")
        )
    if st.kafka_error:
        console.print(f"kafka: {st.kafka_error}")
        if not allow_partial:
            raise fail(f"kafka figures missing (DLQ count, router lag): {st.kafka_error}")
    elif kafka_known:
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
