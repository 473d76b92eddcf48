"""Pipeline commands: ``loadgen``, ``route``, ``run`` and ``load``."""

from __future__ import annotations

from typing import Annotated

import typer

from bucketer.app import app
from bucketer.cli_serve import HttpHostOpt, http_config
from bucketer.options import (
    DEFAULT_DATA_DIR,
    DEFAULT_LOADER_GROUP,
    DEFAULT_ROUTER_GROUP,
    AtLeastOnceOpt,
    BootstrapOpt,
    BucketPartitionsOpt,
    BucketsOpt,
    DataDirOpt,
    FixedBucketsOpt,
    InstanceIdOpt,
    KafkaConfigOpt,
    KafkaOptionOpt,
    LoaderGroupOpt,
    OutageDeadlineOpt,
    RefreshOpt,
    RouterGroupOpt,
    TopicPrefixOpt,
    UntilIdleOpt,
    fail,
    install_stop,
    log_to_stderr,
    open_configured_warehouse,
    require_kafka,
)


# --- loadgen (stream/loadgen.py) -----------------------------------------------------------------------
@app.command("loadgen")
def loadgen_cmd(
    count: Annotated[int, typer.Option("--count", min=0, help="Messages on activityRelations (bad ones included).")],
    rate: Annotated[
        float | None, typer.Option("--rate", min=0.001, help="Messages per second (default: unlimited).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", envvar="BUCKETER_LOADGEN_SEED", help="Same seed, same messages.")] = 1,
    segments: Annotated[int, typer.Option("--segments", min=1, help="Segments (projects), Zipf-skewed sizes.")] = 60,
    bad_fraction: Annotated[
        float, typer.Option("--bad-fraction", min=0.0, max=1.0, help="Share of bad activity messages.")
    ] = 0.01,
    topic_prefix: TopicPrefixOpt = "",
    partitions: Annotated[int, typer.Option("--partitions", min=1, help="Partitions of topics created here.")] = 3,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the broker.")] = 30.0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    bootstrap: BootstrapOpt = None,
    kafka_config: KafkaConfigOpt = None,
    kafka_option: KafkaOptionOpt = None,
) -> None:
    """Produce synthetic Sequin change messages for all six topics, deterministic for a seed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stream.loadgen import LoadgenConfig
    from stream.loadgen_producer import LoadgenError, LoadProducer, ProducerSettings, ensure_topics, expected_total

    kafka = require_kafka(bootstrap, kafka_config, kafka_option)
    config = LoadgenConfig(count=count, seed=seed, segments=segments, bad_fraction=bad_fraction)
    settings = ProducerSettings(
        kafka=kafka, topic_prefix=topic_prefix, partitions=partitions, rate=rate, timeout=timeout
    )
    console = Console(stderr=True)
    try:
        ensure_topics(settings)
        with (
            LoadProducer(settings) as producer,
            Progress(
                TextColumn("loadgen"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
                disable=quiet,
                transient=True,
            ) as progress,
        ):
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
    bootstrap: BootstrapOpt = None,
    kafka_config: KafkaConfigOpt = None,
    kafka_option: KafkaOptionOpt = None,
    buckets: FixedBucketsOpt = 10,
    sink: Annotated[str, typer.Option("--sink", envvar="BUCKETER_SINK", help="kafka (default) or tinybird.")] = "kafka",
    group: RouterGroupOpt = DEFAULT_ROUTER_GROUP,
    until_idle: UntilIdleOpt = None,
    topic_prefix: TopicPrefixOpt = "",
    at_least_once: AtLeastOnceOpt = False,
    partitions: BucketPartitionsOpt = None,
    replication: Annotated[int, typer.Option("--replication", envvar="BUCKETER_BUCKET_REPLICATION", min=1)] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", envvar="BUCKETER_BATCH_SIZE", min=1)] = 10_000,
    batch_time: Annotated[float, typer.Option("--batch-time", envvar="BUCKETER_BATCH_TIME", min=0.01)] = 0.25,
    instance_id: InstanceIdOpt = None,
    dynamic_membership: Annotated[
        bool,
        typer.Option(
            "--dynamic-membership",
            envvar="BUCKETER_DYNAMIC_MEMBERSHIP",
            help="Join the group without group.instance.id: a restart rebalances the whole group (the routers "
            "pause) instead of the static member resuming its partitions (bench/bench_restart.py).",
        ),
    ] = False,
    progress: Annotated[
        float, typer.Option("--progress", envvar="BUCKETER_PROGRESS", min=0.1, help="Seconds between progress lines.")
    ] = 10.0,
    tinybird_url: Annotated[
        str | None,
        typer.Option(
            "--tinybird-url",
            envvar="BUCKETER_TINYBIRD_URL",
            help="Tinybird API base URL (--sink tinybird); the token comes from BUCKETER_TINYBIRD_TOKEN only.",
        ),
    ] = None,
    tinybird_deadline: Annotated[
        float,
        typer.Option(
            "--tinybird-unreachable-deadline",
            envvar="BUCKETER_TINYBIRD_UNREACHABLE_DEADLINE",
            min=0.1,
            help="Seconds Tinybird may stay unreachable (refused, 5xx, timeouts) before route stops with an error.",
        ),
    ] = 180.0,
) -> None:
    """Route Sequin changes on activityRelations to activityRelations_bucket_{cityHash64(segmentId) % N}."""
    from connectors.kafka import BrokerUnreachable, BucketerKafkaError, KafkaAuthenticationFailed
    from connectors.sink_errors import SinkError
    from stream.router import Router, RouterConfig

    if sink not in ("kafka", "tinybird"):
        raise fail(f"unknown sink {sink!r}; expected kafka or tinybird", 2)
    kafka = require_kafka(bootstrap, kafka_config, kafka_option)
    log_to_stderr()
    extra: dict[str, object] = {"instance_id": instance_id} if instance_id else {}
    tinybird = None
    if sink == "tinybird":
        import os

        from connectors.secret import Secret
        from connectors.tinybird import TinybirdSettings

        token = os.environ.get("BUCKETER_TINYBIRD_TOKEN")
        if not tinybird_url or not token:
            raise fail("--sink tinybird needs --tinybird-url and BUCKETER_TINYBIRD_TOKEN", 2)
        try:
            tinybird = TinybirdSettings(url=tinybird_url, token=Secret(token), unreachable_deadline=tinybird_deadline)
        except ValueError as exc:
            raise fail(str(exc), 2) from None
    config = RouterConfig(
        kafka=kafka,
        buckets=buckets,
        group=group,
        topic_prefix=topic_prefix,
        sink=sink,
        partitions=partitions,
        replication=replication,
        batch_size=batch_size,
        batch_time=batch_time,
        exactly_once=not at_least_once,
        until_idle=until_idle,
        progress_interval=progress,
        static_membership=not dynamic_membership,
        tinybird=tinybird,
        **extra,
    )
    router = Router(config)
    install_stop(router.stop)
    try:
        router.run()
    except (BrokerUnreachable, KafkaAuthenticationFailed, SinkError) as exc:
        raise fail(str(exc)) from None
    except BucketerKafkaError as exc:
        raise fail(f"router stopped on a Kafka error: {exc}") from None


# --- end route -----------------------------------------------------------------------------------------


@app.command("run")
def run_cmd(
    bootstrap: BootstrapOpt = None,
    kafka_config: KafkaConfigOpt = None,
    kafka_option: KafkaOptionOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    buckets: BucketsOpt = None,
    until_idle: UntilIdleOpt = None,
    topic_prefix: TopicPrefixOpt = "",
    parallel: Annotated[
        int, typer.Option("--parallel", envvar="BUCKETER_PARALLEL", min=1, help="Cleaned buckets rebuilt at once.")
    ] = 1,
    schedule: Annotated[
        str | None,
        typer.Option(
            "--schedule", envvar="BUCKETER_SCHEDULE", help="Rebuild schedule (default: pairs 4 minutes apart from :10)."
        ),
    ] = None,
    enrich_on_exit: Annotated[
        bool, typer.Option("--enrich-on-exit", help="Rebuild every bucket before exiting.")
    ] = False,
    at_least_once: AtLeastOnceOpt = False,
    partitions: BucketPartitionsOpt = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port", envvar="BUCKETER_METRICS_PORT", help="Serve Prometheus metrics on 127.0.0.1:PORT."
        ),
    ] = None,
    http_port: Annotated[
        int | None, typer.Option("--http-port", envvar="BUCKETER_HTTP_PORT", help="Serve the HTTP query API.")
    ] = None,
    http_host: HttpHostOpt = "127.0.0.1",
    outage_deadline: OutageDeadlineOpt = 300.0,
    refresh: RefreshOpt = "incremental",
    instance_id: InstanceIdOpt = None,
) -> None:
    """The whole pipeline in one process: route, load, enrich on schedule (embedded warehouse by default)."""
    import os

    from connectors.kafka import BucketerKafkaError, check_reachable
    from connectors.warehouse import WarehouseError
    from stream.api import ServeError
    from stream.loader import LoaderError
    from stream.metrics import MetricsError
    from stream.pipeline import Pipeline, PipelineConfig
    from stream.schema import BucketCountMismatch

    if metrics_port is not None and not 1 <= metrics_port <= 65535:
        raise fail(f"--metrics-port {metrics_port} is out of range (1-65535)", 2)
    from stream.incremental import REFRESH_MODES

    kafka = require_kafka(bootstrap, kafka_config, kafka_option)
    if refresh not in REFRESH_MODES:
        raise fail(f"--refresh must be one of {', '.join(REFRESH_MODES)}, got {refresh!r}", 2)
    log_to_stderr()
    pipeline = Pipeline(
        PipelineConfig(
            kafka=kafka,
            data_dir=data_dir,
            clickhouse_url=os.environ.get("BUCKETER_CLICKHOUSE_URL") or None,
            buckets=buckets,
            topic_prefix=topic_prefix,
            until_idle=until_idle,
            exactly_once=not at_least_once,
            parallel=parallel,
            schedule=schedule,
            enrich_on_exit=enrich_on_exit,
            partitions=partitions,
            metrics_port=metrics_port,
            http=http_config(http_port, http_host) if http_port is not None else None,
            outage_deadline=outage_deadline,
            refresh=refresh,
            instance_id=instance_id,
        )
    )
    install_stop(pipeline.stop)
    try:
        check_reachable(kafka)  # in 5 s, like load and bootstrap (creating the topics would wait 30 s)
        pipeline.run()
    except BucketCountMismatch as exc:
        raise fail(str(exc), 2) from None
    except (BucketerKafkaError, WarehouseError, MetricsError, ServeError, LoaderError) as exc:
        raise fail(str(exc)) from None
    router, loader = pipeline.router, pipeline.loader
    if router is not None and loader is not None:
        typer.echo(f"run: {router.stats.summary()}")
        typer.echo(
            f"run: loaded {loader.stats.committed} messages into {len(loader.stats.inserted)} tables "
            f"({loader.stats.dead_lettered} dead-lettered)"
        )
    for r in pipeline.rebuilds:
        typer.echo(f"run: rebuilt bucket {r.bucket}: {r.status} {r.rows} rows" + (f" ({r.error})" if r.error else ""))


@app.command("load")
def load_cmd(
    bootstrap: BootstrapOpt = None,
    kafka_config: KafkaConfigOpt = None,
    kafka_option: KafkaOptionOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    buckets: BucketsOpt = None,
    group: LoaderGroupOpt = DEFAULT_LOADER_GROUP,
    until_idle: UntilIdleOpt = None,
    topic_prefix: TopicPrefixOpt = "",
    outage_deadline: OutageDeadlineOpt = 300.0,
    refresh: RefreshOpt = "incremental",
    instance_id: InstanceIdOpt = None,
) -> None:
    """The loader alone: bucket topics and reference topics into the warehouse (scale out with more loaders)."""
    from connectors.kafka import BucketerKafkaError, check_reachable
    from connectors.topics import TopicNames
    from connectors.warehouse import WarehouseError
    from stream.incremental import REFRESH_MODES, Maintainer, MaintenanceLoop
    from stream.loader import Loader, LoaderConfig, LoaderError
    from stream.schema import BucketCountMismatch, ensure_schema

    kafka = require_kafka(bootstrap, kafka_config, kafka_option)
    if refresh not in REFRESH_MODES:
        raise fail(f"--refresh must be one of {', '.join(REFRESH_MODES)}, got {refresh!r}", 2)
    log_to_stderr()
    try:
        check_reachable(kafka)
        with open_configured_warehouse(data_dir) as wh:
            n = ensure_schema(wh, buckets)  # the warehouse's N; a different --buckets is refused
            maintainer = Maintainer(n) if refresh == "incremental" else None
            loop = None
            if maintainer is not None:
                maintainer.setup(wh)
                loop = MaintenanceLoop(  # a failed round stops the loader (bound below); finish() raises it
                    maintainer, lambda: open_configured_warehouse(data_dir), on_error=lambda _exc: loader.stop()
                )
            loader = Loader(
                LoaderConfig(
                    kafka=kafka,
                    buckets=n,
                    group=group,
                    topics=TopicNames(topic_prefix),
                    outage_deadline=outage_deadline,
                    instance_id=instance_id,
                ),
                wh,
                after_flush=loop.wake if loop is not None else None,
            )
            install_stop(loader.stop)
            if loop is not None:
                loop.start()
            try:
                stats = loader.run(until_idle=until_idle)
            except BaseException:
                if loop is not None:
                    loop.finish(None)  # stopped; the loader's own failure is the one reported
                raise
            if loop is not None:  # the last round (everything landed is in the cleaned buckets), or its failure
                loop.finish(wh)
                loop.maintainer.close(wh)
    except BucketCountMismatch as exc:
        raise fail(str(exc), 2) from None
    except (BucketerKafkaError, WarehouseError, LoaderError) as exc:
        raise fail(str(exc)) from None
    typer.echo(
        f"load: {stats.committed} messages loaded into {len(stats.inserted)} tables, "
        f"{stats.dead_lettered} dead-lettered"
    )


# --- end run, load -------------------------------------------------------------------------------------
