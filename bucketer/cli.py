"""The ``bucketer`` console script. The only place that reads the environment and installs signal handlers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from bucketer.localkafka import DEFAULT_PORT, LocalKafka, LocalKafkaError, fetch_jars

app = typer.Typer(help="Kafka-fed streaming bucketer: Sequin changes -> cityHash64 buckets -> ClickHouse.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
local_app = typer.Typer(help="A single-node Apache Kafka 4.x broker (KRaft) on 127.0.0.1.", no_args_is_help=True)
app.add_typer(local_app, name="local")

PortOpt = Annotated[int, typer.Option("--port", envvar="BUCKETER_LOCAL_PORT", help="Broker port on 127.0.0.1.")]
DirOpt = Annotated[Path, typer.Option("--dir", envvar="BUCKETER_LOCAL_DIR",
                                      help="Broker directory; its data survives stop/start.")]
DEFAULT_LOCAL_DIR = Path(".bucketer/kafka")


def fail(reason: str, code: int = 1) -> typer.Exit:
    """Print a one-line reason on stderr and return the exit to raise."""
    typer.echo(f"bucketer: {reason}", err=True)
    return typer.Exit(code)


@local_app.command("start")
def local_start(port: PortOpt = DEFAULT_PORT, dir: DirOpt = DEFAULT_LOCAL_DIR) -> None:
    """Start the broker (idempotent); the last line printed is bootstrap=127.0.0.1:PORT."""
    broker = LocalKafka(dir, port=port)
    try:
        was_running = broker.status().running
        bootstrap = broker.start()
    except LocalKafkaError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"kafka {'already running' if was_running else 'started'} in {broker.directory}")
    typer.echo(f"bootstrap={bootstrap}")


@local_app.command("stop")
def local_stop(port: PortOpt = DEFAULT_PORT, dir: DirOpt = DEFAULT_LOCAL_DIR) -> None:
    """Stop the broker gracefully (SIGTERM, then SIGKILL after a grace period)."""
    stopped = LocalKafka(dir, port=port).stop()
    typer.echo("kafka stopped" if stopped else "kafka was not running")


@local_app.command("status")
def local_status(port: PortOpt = DEFAULT_PORT, dir: DirOpt = DEFAULT_LOCAL_DIR) -> None:
    """Tell whether the broker is running, and its bootstrap address. Exit 0 running, 3 stopped."""
    st = LocalKafka(dir, port=port).status()
    if st.running:
        typer.echo(f"running pid={st.pid} dir={st.directory}")
        typer.echo(f"bootstrap={st.bootstrap}")
    else:
        typer.echo(f"stopped dir={st.directory}")
        raise typer.Exit(3)


@local_app.command("fetch")
def local_fetch() -> None:
    """Fetch the broker's jars from Maven Central into the cache (done by start when needed)."""
    try:
        typer.echo(str(fetch_jars(quiet=False)))
    except LocalKafkaError as exc:
        raise fail(str(exc)) from None


@app.command("bucket-of")
def bucket_of_cmd(
    segment_ids: Annotated[list[str] | None, typer.Argument(help="Segment ids; read from stdin when none.")] = None,
    buckets: Annotated[int, typer.Option("--buckets", "-n", envvar="BUCKETER_BUCKETS", min=1)] = 10,
) -> None:
    """Print cityHash64(segmentId) % N for each id, one per line, in order (bit-exact with ClickHouse)."""
    from stream.buckets import bucket_of

    ids = segment_ids if segment_ids else (line.rstrip("\r\n") for line in sys.stdin)
    out = sys.stdout
    for sid in ids:
        out.write(f"{bucket_of(sid, buckets)}\n")
    out.flush()


# --- loadgen (stream/loadgen.py) -----------------------------------------------------------------------
@app.command("loadgen")
def loadgen_cmd(
    bootstrap: Annotated[str, typer.Option("--bootstrap", envvar="BUCKETER_BOOTSTRAP",
                                           help="Kafka bootstrap servers.")],
    count: Annotated[int, typer.Option("--count", min=0, help="Messages on activityRelations (bad ones included).")],
    rate: Annotated[float | None, typer.Option("--rate", min=0.001,
                                               help="Messages per second (default: unlimited).")] = None,
    seed: Annotated[int, typer.Option("--seed", envvar="BUCKETER_LOADGEN_SEED", help="Same seed, same messages.")] = 1,
    segments: Annotated[int, typer.Option("--segments", min=1, help="Segments (projects), Zipf-skewed sizes.")] = 60,
    bad_fraction: Annotated[float, typer.Option("--bad-fraction", min=0.0, max=1.0,
                                                help="Share of bad activity messages.")] = 0.01,
    topic_prefix: Annotated[str, typer.Option("--topic-prefix", envvar="BUCKETER_TOPIC_PREFIX")] = "",
    partitions: Annotated[int, typer.Option("--partitions", min=1, help="Partitions of topics created here.")] = 3,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the broker.")] = 30.0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Produce synthetic Sequin change messages for all six topics, deterministic for a seed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stream.loadgen import LoadgenConfig
    from stream.loadgen_producer import LoadgenError, LoadProducer, ProducerSettings, ensure_topics, expected_total

    config = LoadgenConfig(count=count, seed=seed, segments=segments, bad_fraction=bad_fraction)
    settings = ProducerSettings(bootstrap=bootstrap, topic_prefix=topic_prefix, partitions=partitions, rate=rate,
                                timeout=timeout)
    console = Console(stderr=True)
    try:
        ensure_topics(settings)
        with LoadProducer(settings) as producer, Progress(
                TextColumn("loadgen"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=console, disable=quiet, transient=True) as progress:
            task = progress.add_task("produce", total=expected_total(config))
            summary = producer.run(config, on_progress=lambda n: progress.update(task, completed=n))
    except LoadgenError as exc:
        raise fail(str(exc)) from None
    for topic, n in sorted(summary.per_topic.items()):
        typer.echo(f"topic {topic_prefix}{topic}: {n}")
    for action, n in sorted(summary.per_action.items()):
        typer.echo(f"action {action}: {n}")
    typer.echo(f"bad: {summary.bad_total} ({', '.join(f'{k}={v}' for k, v in sorted(summary.bad.items()))})")
    typer.echo(f"total: {summary.total} messages, {summary.bytes} bytes, {summary.duplicates} duplicates")
# --- end loadgen ---------------------------------------------------------------------------------------

# --- route (stream/router.py) -------------------------------------------------------------------------
@app.command("route")
def route_cmd(
    bootstrap: Annotated[str, typer.Option("--bootstrap", envvar="BUCKETER_BOOTSTRAP", help="Kafka bootstrap.")],
    buckets: Annotated[int, typer.Option("--buckets", "-n", envvar="BUCKETER_BUCKETS", min=1)] = 10,
    sink: Annotated[str, typer.Option("--sink", envvar="BUCKETER_SINK", help="kafka (default) or tinybird.")] = "kafka",
    group: Annotated[str, typer.Option("--group", envvar="BUCKETER_ROUTER_GROUP")] = "bucketer-router",
    until_idle: Annotated[float | None, typer.Option("--until-idle", envvar="BUCKETER_UNTIL_IDLE",
                                                     help="Exit 0 after S seconds without input.")] = None,
    topic_prefix: Annotated[str, typer.Option("--topic-prefix", envvar="BUCKETER_TOPIC_PREFIX")] = "",
    at_least_once: Annotated[bool, typer.Option(
        "--at-least-once", envvar="BUCKETER_AT_LEAST_ONCE",
        help="Faster: idempotent producer, offsets committed after delivery; a crash may duplicate.")] = False,
    partitions: Annotated[int, typer.Option("--partitions", envvar="BUCKETER_BUCKET_PARTITIONS", min=1,
                                            help="Partitions of the bucket topics the router creates.")] = 3,
    replication: Annotated[int, typer.Option("--replication", envvar="BUCKETER_BUCKET_REPLICATION", min=1)] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", envvar="BUCKETER_BATCH_SIZE", min=1)] = 10_000,
    batch_time: Annotated[float, typer.Option("--batch-time", envvar="BUCKETER_BATCH_TIME", min=0.01)] = 0.5,
    instance_id: Annotated[str | None, typer.Option(
        "--instance-id", envvar="BUCKETER_ROUTER_INSTANCE",
        help="Unique per router replica (default: host name); keeps transactional.id stable across restarts.")] = None,
    progress: Annotated[float, typer.Option("--progress", envvar="BUCKETER_PROGRESS", min=0.1,
                                            help="Seconds between progress lines.")] = 10.0,
    tinybird_url: Annotated[str | None, typer.Option(
        "--tinybird-url", envvar="BUCKETER_TINYBIRD_URL",
        help="Tinybird API base URL (--sink tinybird); the token comes from BUCKETER_TINYBIRD_TOKEN only.")] = None,
) -> None:
    """Route Sequin changes on activityRelations to activityRelations_bucket_{cityHash64(segmentId) % N}."""
    import logging
    import signal

    from connectors.kafka import BrokerUnreachable, BucketerKafkaError
    from stream.router import Router, RouterConfig

    if sink not in ("kafka", "tinybird"):
        raise fail(f"unknown sink {sink!r}; expected kafka or tinybird", 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    extra: dict[str, object] = {"instance_id": instance_id} if instance_id else {}
    config_cls = RouterConfig
    if sink == "tinybird":
        import os

        from connectors.tinybird import TinybirdConfig
        from connectors.tinybird_api import Secret
        from stream.tinybird_route import TinybirdRouterConfig

        token = os.environ.get("BUCKETER_TINYBIRD_TOKEN")
        if not tinybird_url or not token:
            raise fail("--sink tinybird needs --tinybird-url and BUCKETER_TINYBIRD_TOKEN", 2)
        config_cls = TinybirdRouterConfig
        extra["tinybird"] = TinybirdConfig(url=tinybird_url, token=Secret(token), buckets=buckets)
    config = config_cls(bootstrap=bootstrap, buckets=buckets, group=group, topic_prefix=topic_prefix, sink=sink,
                          partitions=partitions, replication=replication, batch_size=batch_size,
                          batch_time=batch_time, exactly_once=not at_least_once, until_idle=until_idle,
                          progress_interval=progress, **extra)
    router = Router(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: router.stop())
    try:
        router.run()
    except BrokerUnreachable as exc:
        raise fail(str(exc)) from None
    except BucketerKafkaError as exc:
        raise fail(f"router stopped on a Kafka error: {exc}") from None
# --- end route -----------------------------------------------------------------------------------------


# --- warehouse: query, status (connectors/warehouse.py, stream/query.py, stream/status.py) ---------------
DataDirOpt = Annotated[Path, typer.Option("--data-dir", envvar="BUCKETER_DATA_DIR",
                                          help="Embedded warehouse directory (ignored with BUCKETER_CLICKHOUSE_URL).")]
DEFAULT_DATA_DIR = Path(".bucketer")


def open_configured_warehouse(data_dir: Path):  # noqa: ANN201 - EmbeddedWarehouse | ServerWarehouse
    """The warehouse the environment asks for: a ClickHouse server URL, else embedded chdb in ``data_dir``."""
    import os

    from connectors.warehouse import open_warehouse

    return open_warehouse(data_dir, url=os.environ.get("BUCKETER_CLICKHOUSE_URL") or None)


@app.command("query")
def query_cmd(
    sql: Annotated[str, typer.Argument(help="One SELECT. With --project: {bucket} and {segmentId:String} etc.")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    project: Annotated[str | None, typer.Option("--project", envvar="BUCKETER_PROJECT",
                                                help="Project slug; resolves its bucket via project_buckets.")] = None,
) -> None:
    """Read-only SQL on the warehouse; one JSON object per line."""
    from connectors.warehouse import WarehouseError
    from stream.query import QueryError, json_lines, read_only, run_query

    try:
        read_only(sql)
        with open_configured_warehouse(data_dir) as wh:
            rows = run_query(wh, sql, project=project)
    except (QueryError, WarehouseError) as exc:
        raise fail(str(exc)) from None
    out = sys.stdout.buffer
    for line in json_lines(rows):
        out.write(line + b"\n")
    out.flush()


@app.command("status")
def status_cmd(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    bootstrap: Annotated[str | None, typer.Option("--bootstrap", envvar="BUCKETER_BOOTSTRAP",
                                                  help="Kafka, for the DLQ count and router lag.")] = None,
    router_group: Annotated[str, typer.Option("--router-group", envvar="BUCKETER_ROUTER_GROUP")] = "bucketer-router",
    topic_prefix: Annotated[str, typer.Option("--topic-prefix", envvar="BUCKETER_TOPIC_PREFIX")] = "",
) -> None:
    """Per bucket: raw rows, cleaned rows, share, snapshotId and its age; DLQ count and router lag."""
    import json

    from connectors.topics import TopicNames
    from connectors.warehouse import WarehouseError
    from stream.status import collect

    try:
        with open_configured_warehouse(data_dir) as wh:
            st = collect(wh, bootstrap=bootstrap, topics=TopicNames(topic_prefix), router_group=router_group)
    except (WarehouseError, LookupError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(st.as_json()))
        return
    from rich.console import Console
    from rich.table import Table

    def age(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        return f"{seconds / 3600:.1f}h" if seconds >= 3600 else f"{seconds / 60:.0f}m"

    widest = max((b.raw_rows for b in st.buckets), default=0) or 1
    table = Table(title=f"bucketer status ({len(st.buckets)} buckets)")
    for col, justify in (("bucket", "right"), ("raw rows", "right"), ("cleaned rows", "right"),
                         ("share", "right"), ("", "left"), ("snapshotId", "left"), ("age", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for b in st.buckets:
        table.add_row(str(b.bucket), f"{b.raw_rows:,}", f"{b.cleaned_rows:,}", f"{b.share:.1%}",
                      "█" * round(24 * b.raw_rows / widest), b.snapshot_id.strftime("%Y-%m-%d %H:%M") if
                      b.snapshot_id else "-", age(b.snapshot_age_s))
    table.add_section()
    table.add_row("all", f"{st.raw_total:,}", f"{st.cleaned_total:,}", "100%" if st.raw_total else "-", "", "", "")
    console = Console()
    if not console.is_terminal:  # piped (make demo, logs): rich's 80-column default would wrap every row
        console = Console(width=max(console.width, 110))
    console.print(table)
    if st.kafka_error:
        console.print(f"kafka: {st.kafka_error}")
    elif bootstrap:
        console.print(f"DLQ messages: {st.dlq_messages if st.dlq_messages is not None else 'no DLQ topic'}   "
                      f"router lag: {st.router_lag if st.router_lag is not None else 'no source topic'}")
# --- end warehouse -------------------------------------------------------------------------------------


# --- enrich (stream/enrich.py, stream/schedule.py, connectors/countries.py) ------------------------------
@app.command("enrich")
def enrich_cmd(
    bucket: Annotated[list[int] | None, typer.Option("--bucket", "-b", min=0,
                                                     help="Bucket to rebuild (repeatable).")] = None,
    all_buckets: Annotated[bool, typer.Option("--all", help="Rebuild every bucket.")] = False,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    parallel: Annotated[int, typer.Option("--parallel", "-p", min=1, envvar="BUCKETER_ENRICH_PARALLEL",
                                          help="Buckets rebuilt at the same time.")] = 1,
    buckets: Annotated[int | None, typer.Option("--buckets", "-n", min=1, envvar="BUCKETER_BUCKETS",
                                                help="Bucket count (default: the warehouse's, else 10).")] = None,
) -> None:
    """Rebuild cleaned buckets now (the manual trigger): built aside, swapped in atomically."""
    from connectors.warehouse import WarehouseError
    from stream.enrich import Enricher
    from stream.schema import bucket_count, ensure_schema

    if all_buckets == bool(bucket):
        raise fail("give either --bucket n (repeatable) or --all")
    try:
        with open_configured_warehouse(data_dir) as wh:
            known = bucket_count(wh)
            n = buckets or known or 10
            if known is None:
                ensure_schema(wh, n)
            elif buckets and buckets != known:
                raise fail(f"the warehouse is set up for {known} buckets, not {buckets}")
        todo = list(range(n)) if all_buckets else list(bucket or [])
        bad = [b for b in todo if b >= n]
        if bad:
            raise fail(f"no bucket {bad[0]}: buckets are 0..{n - 1}")
        enricher = Enricher(lambda: open_configured_warehouse(data_dir), lock_dir=data_dir / "locks")
        results = enricher.rebuild_many(todo, parallel=parallel)
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


# --- run, load (stream/pipeline.py, stream/loader.py) -------------------------------------------------------
def _install_stop(stop) -> None:  # noqa: ANN001 - any zero-argument callable
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


def _log_to_stderr(verbose: bool = False) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


@app.command("run")
def run_cmd(
    bootstrap: Annotated[str, typer.Option("--bootstrap", envvar="BUCKETER_BOOTSTRAP", help="Kafka bootstrap.")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    buckets: Annotated[int, typer.Option("--buckets", "-n", envvar="BUCKETER_BUCKETS", min=1)] = 10,
    until_idle: Annotated[float | None, typer.Option("--until-idle", envvar="BUCKETER_UNTIL_IDLE",
                                                     help="Exit 0 once S seconds pass without new input.")] = None,
    topic_prefix: Annotated[str, typer.Option("--topic-prefix", envvar="BUCKETER_TOPIC_PREFIX")] = "",
    parallel: Annotated[int, typer.Option("--parallel", envvar="BUCKETER_PARALLEL", min=1,
                                          help="Cleaned buckets rebuilt at once.")] = 1,
    schedule: Annotated[str | None, typer.Option("--schedule", envvar="BUCKETER_SCHEDULE",
                                                 help="Rebuild schedule (default: pairs 4 minutes apart from :10).")]
    = None,
    enrich_on_exit: Annotated[bool, typer.Option("--enrich-on-exit", help="Rebuild every bucket before exiting.")]
    = False,
    at_least_once: Annotated[bool, typer.Option("--at-least-once", envvar="BUCKETER_AT_LEAST_ONCE")] = False,
    partitions: Annotated[int, typer.Option("--partitions", envvar="BUCKETER_BUCKET_PARTITIONS", min=1)] = 3,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", envvar="BUCKETER_METRICS_PORT",
                                                     help="Serve Prometheus metrics on 127.0.0.1:PORT.")] = None,
) -> None:
    """The whole pipeline in one process: route, load, enrich on schedule (embedded warehouse by default)."""
    import os

    from connectors.kafka import BucketerKafkaError
    from connectors.warehouse import WarehouseError
    from stream.pipeline import Pipeline, PipelineConfig

    _log_to_stderr()
    pipeline = Pipeline(PipelineConfig(
        bootstrap=bootstrap, data_dir=data_dir, clickhouse_url=os.environ.get("BUCKETER_CLICKHOUSE_URL") or None,
        buckets=buckets, topic_prefix=topic_prefix, until_idle=until_idle, exactly_once=not at_least_once,
        parallel=parallel, schedule=schedule, enrich_on_exit=enrich_on_exit, partitions=partitions,
        metrics_port=metrics_port))
    _install_stop(pipeline.stop)
    try:
        pipeline.run()
    except (BucketerKafkaError, WarehouseError) as exc:
        raise fail(str(exc)) from None
    router, loader = pipeline.router, pipeline.loader
    if router is not None and loader is not None:
        typer.echo(f"run: {router.stats.summary()}")
        typer.echo(f"run: loaded {loader.stats.committed} messages into {len(loader.stats.inserted)} tables "
                   f"({loader.stats.dead_lettered} dead-lettered)")
    for r in pipeline.rebuilds:
        typer.echo(f"run: rebuilt bucket {r.bucket}: {r.status} {r.rows} rows" + (f" ({r.error})" if r.error else ""))


@app.command("load")
def load_cmd(
    bootstrap: Annotated[str, typer.Option("--bootstrap", envvar="BUCKETER_BOOTSTRAP", help="Kafka bootstrap.")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    buckets: Annotated[int, typer.Option("--buckets", "-n", envvar="BUCKETER_BUCKETS", min=1)] = 10,
    group: Annotated[str, typer.Option("--group", envvar="BUCKETER_LOADER_GROUP")] = "bucketer-loader",
    until_idle: Annotated[float | None, typer.Option("--until-idle", envvar="BUCKETER_UNTIL_IDLE")] = None,
    topic_prefix: Annotated[str, typer.Option("--topic-prefix", envvar="BUCKETER_TOPIC_PREFIX")] = "",
) -> None:
    """The loader alone: bucket topics and reference topics into the warehouse (scale out with more loaders)."""
    from connectors.kafka import BucketerKafkaError, check_reachable
    from connectors.topics import TopicNames
    from connectors.warehouse import WarehouseError
    from stream.loader import Loader, LoaderConfig, LoaderError
    from stream.schema import ensure_schema

    _log_to_stderr()
    try:
        check_reachable(bootstrap)
        with open_configured_warehouse(data_dir) as wh:
            ensure_schema(wh, buckets)
            loader = Loader(LoaderConfig(bootstrap=bootstrap, buckets=buckets, group=group,
                                         topics=TopicNames(topic_prefix)), wh)
            _install_stop(loader.stop)
            stats = loader.run(until_idle=until_idle)
    except (BucketerKafkaError, WarehouseError, LoaderError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"load: {stats.committed} messages loaded into {len(stats.inserted)} tables, "
               f"{stats.dead_lettered} dead-lettered")
# --- end run, load -------------------------------------------------------------------------------------


# --- tinybird (connectors/tinybird*.py, stream/tinybird_copy.py) ---------------------------------------
tinybird_app = typer.Typer(help="The Tinybird target: generate the project for N buckets, run cleaning copies.",
                           no_args_is_help=True)
app.add_typer(tinybird_app, name="tinybird")
TOKEN_ENV = "BUCKETER_TINYBIRD_TOKEN"


def tinybird_token() -> object:
    """The API token from BUCKETER_TINYBIRD_TOKEN, as a Secret (never an option: it must not show in --help)."""
    import os

    from connectors.tinybird_api import Secret

    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise fail(f"set {TOKEN_ENV} to a Tinybird token", 2)
    return Secret(token)


@tinybird_app.command("generate")
def tinybird_generate(
    buckets: Annotated[int, typer.Option("--buckets", "-n", envvar="BUCKETER_BUCKETS", min=1)] = 10,
    out: Annotated[Path, typer.Option("--out", help="Project folder (datasources/, pipes/).")] = Path("tinybird"),
) -> None:
    """Write the Tinybird datafiles for N buckets (deterministic: same N, same files)."""
    from connectors.tinybird_project import write_project

    paths = write_project(buckets, out)
    typer.echo(f"{len(paths)} datafiles for {buckets} buckets in {out}")


@tinybird_app.command("copy")
def tinybird_copy(
    url: Annotated[str, typer.Option("--tinybird-url", envvar="BUCKETER_TINYBIRD_URL",
                                     help="API base, e.g. https://api.tinybird.co (token: BUCKETER_TINYBIRD_TOKEN).")],
    bucket: Annotated[list[int] | None, typer.Option("--bucket", help="Bucket to rebuild (repeatable).")] = None,
    all_buckets: Annotated[bool, typer.Option("--all", help="Every bucket 0..N-1.")] = False,
    buckets: Annotated[int, typer.Option("--buckets", "-n", envvar="BUCKETER_BUCKETS", min=1)] = 10,
    parallel: Annotated[int, typer.Option("--parallel", min=1, help="Copy jobs at once (the account allows 12).")] = 12,
    poll: Annotated[float, typer.Option("--poll", min=0.01, help="Seconds between job polls.")] = 2.0,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds one job may take.")] = 3600.0,
    skip_countries: Annotated[bool, typer.Option("--skip-countries",
                                                 help="Do not resolve new organization countries first.")] = False,
) -> None:
    """Run the cleaning copy pipes now through the API and wait for each job; exit 1 if any failed."""
    from connectors.tinybird_api import Secret, TinybirdClient
    from stream.tinybird_copy import CopyRunner

    if all_buckets == bool(bucket):
        raise fail("give --bucket n (repeatable) or --all", 2)
    chosen = list(range(buckets)) if all_buckets else list(dict.fromkeys(bucket or []))
    bad = [b for b in chosen if not 0 <= b < buckets]
    if bad:
        raise fail(f"bucket {bad[0]} out of range 0..{buckets - 1}", 2)
    token = tinybird_token()
    assert isinstance(token, Secret)
    with TinybirdClient(url, token, timeout=30.0) as client:
        if not skip_countries:
            sync_countries(client)
        runner = CopyRunner(client, max_concurrent=parallel, poll_interval=poll, timeout=timeout,
                            on_result=lambda r: typer.echo(f"bucket {r.bucket}: {r.status} job={r.job_id} "
                                                           f"{r.seconds:.1f}s {r.detail}".rstrip()))
        results = runner.run(chosen)
    failed = [r for r in results if not r.ok]
    typer.echo(f"{len(results) - len(failed)} of {len(results)} copies done")
    if failed:
        raise typer.Exit(1)
def sync_countries(client: object) -> None:
    from connectors.tinybird_api import TinybirdError
    from stream.tinybird_countries import sync_country_codes

    try:
        n = sync_country_codes(client)  # type: ignore[arg-type]
    except TinybirdError as exc:
        raise fail(f"country codes: {exc}") from None
    typer.echo(f"{n} new (country, location) pairs resolved into organization_country_codes")


@tinybird_app.command("countries")
def tinybird_countries(
    url: Annotated[str, typer.Option("--tinybird-url", envvar="BUCKETER_TINYBIRD_URL",
                                     help="API base, e.g. https://api.tinybird.co (token: BUCKETER_TINYBIRD_TOKEN).")],
) -> None:
    """Resolve the organizations' new (country, location) pairs into organization_country_codes."""
    from connectors.tinybird_api import Secret, TinybirdClient

    token = tinybird_token()
    assert isinstance(token, Secret)
    with TinybirdClient(url, token, timeout=30.0) as client:
        sync_countries(client)
# --- end tinybird --------------------------------------------------------------------------------------


def main() -> None:
    import bucketer.cli_ops  # noqa: F401  - registers bootstrap and rebucket on the app

    app()


if __name__ == "__main__":
    # Run the importable module's app: commands registered from other modules (cli_ops) attach to that one.
    from bucketer.cli import main as _main

    _main()
