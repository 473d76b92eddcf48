"""Operations commands: ``bucketer bootstrap`` (replay the source into raw buckets) and ``bucketer rebucket``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bucketer.app import app
from bucketer.options import (
    DEFAULT_DATA_DIR,
    DEFAULT_LOADER_GROUP,
    MAX_BUCKETS,
    BootstrapOpt,
    BucketsOpt,
    DataDirOpt,
    KafkaConfigOpt,
    KafkaOptionOpt,
    OfLoaderGroupOpt,
    TopicPrefixOpt,
    bucket_range_error,
    fail,
    kafka_connection,
    open_configured_warehouse,
    require_kafka,
)


@app.command("bootstrap")
def bootstrap_cmd(
    bootstrap: BootstrapOpt = None,
    kafka_config: KafkaConfigOpt = None,
    kafka_option: KafkaOptionOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    bucket: Annotated[list[int] | None, typer.Option("--bucket", "-b", help="Only these buckets (repeatable).")] = None,
    buckets: BucketsOpt = None,
    topic_prefix: TopicPrefixOpt = "",
) -> None:
    """Replay activityRelations from its beginning into raw buckets (append; idempotent), then check the spread."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from connectors.kafka import BucketerKafkaError, check_reachable
    from connectors.topics import TopicNames
    from connectors.warehouse import WarehouseError
    from stream.replay import replay
    from stream.schema import BucketCountMismatch, ensure_schema

    kafka = require_kafka(bootstrap, kafka_config, kafka_option)
    bars = Progress(
        TextColumn("{task.description:<32}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    tasks: dict[str, object] = {}

    def progress(topic: str, read: int, total: int) -> None:
        # ``total`` is the topic's offset span (transaction markers take offsets too); read = total at its end.
        if topic not in tasks:
            tasks[topic] = bars.add_task(topic, total=total or None)
        bars.update(tasks[topic], completed=read)  # type: ignore[arg-type]

    try:
        check_reachable(kafka)
        with open_configured_warehouse(data_dir) as wh:
            n = ensure_schema(wh, buckets)  # the warehouse's N; a different --buckets is refused
            with bars:
                report = replay(wh, kafka, n, only=bucket, topics=TopicNames(topic_prefix), progress=progress)
    except BucketCountMismatch as exc:
        raise fail(str(exc), 2) from None
    except (BucketerKafkaError, WarehouseError, LookupError, ValueError, TimeoutError) as exc:
        raise fail(str(exc)) from None
    rate = report.messages / report.seconds if report.seconds else 0.0
    typer.echo(
        f"bootstrap: replayed {report.messages:,} messages in {report.seconds:.1f}s ({rate:,.0f}/s); "
        f"{sum(report.written.values()):,} rows written, {report.skipped_buckets:,} for other buckets, "
        f"{sum(report.dead_lettered.values()):,} bad input (already in the DLQ), {report.rejected} refused"
    )
    typer.echo(f"{'table':<18} {'replayed':>10} {'refused':>8} {'live rows':>10}")
    for table, read in report.reference_messages.items():
        live = report.reference_live.get(table, 0)
        typer.echo(f"{table:<18} {read:>10,} {report.reference_bad.get(table, 0):>8,} {live:>10,}")
    typer.echo(f"{'bucket':>6} {'replayed':>10} {'live rows':>10} {'share':>7} {'misplaced':>9}")
    for c in report.checks:
        typer.echo(f"{c.bucket:>6} {c.replayed:>10,} {c.live_rows:>10,} {c.share:>7.1%} {c.misplaced:>9}")
    if not report.ok:
        raise fail("distribution check failed: rows sit in a bucket other than cityHash64(segmentId) % N")
    typer.echo("distribution check: every row is in bucket cityHash64(segmentId) % N")
    typer.echo("next: `bucketer enrich --all` builds the cleaned buckets from these rows now")


@app.command("rebucket")
def rebucket_cmd(
    to: Annotated[
        int | None, typer.Option("--to", help=f"The new bucket count (1-{MAX_BUCKETS}, as --buckets).")
    ] = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    strategy: Annotated[
        str,
        typer.Option(
            "--strategy",
            help="cutover (the pipeline stopped) or gradual (while `bucketer run --http-port` runs; resumable).",
        ),
    ] = "cutover",
    abort: Annotated[bool, typer.Option("--abort", help="gradual: roll an unfinished migration back to N.")] = False,
    bootstrap: BootstrapOpt = None,
    kafka_config: KafkaConfigOpt = None,
    kafka_option: KafkaOptionOpt = None,
    loader_group: OfLoaderGroupOpt = DEFAULT_LOADER_GROUP,
    topic_prefix: TopicPrefixOpt = "",
    force: Annotated[bool, typer.Option("--force", help="Skip the loader-drained check.")] = False,
    parallel: Annotated[int, typer.Option("--parallel", "-p", min=1)] = 1,
) -> None:
    """Move the warehouse from N to M buckets: redistribute raw rows, swap, rebuild every cleaned bucket.
    Kafka (--bootstrap or --kafka-config) is read to check that the loader has drained the bucket topics."""
    from confluent_kafka import KafkaException

    from connectors.kafka import BucketerKafkaError, check_reachable
    from connectors.topics import TopicNames
    from connectors.warehouse import WarehouseError
    from stream.enrich import Enricher
    from stream.rebucket import RebucketError, loader_lag, rebucket
    from stream.schema import bucket_count

    if strategy == "gradual":
        from bucketer.cli_migrate import gradual

        if to is not None and not 1 <= to <= MAX_BUCKETS:
            raise bucket_range_error("--to", to)
        if to is None and not abort:
            raise fail("--to M is needed (or --abort)", 2)
        gradual(data_dir, to, abort)
        return
    if strategy != "cutover":
        raise fail(f"unknown strategy {strategy!r}; use cutover or gradual", 2)
    if abort:
        raise fail("--abort is for --strategy gradual", 2)
    if to is None:
        raise fail("--to M is needed", 2)
    if not 1 <= to <= MAX_BUCKETS:
        raise bucket_range_error("--to", to)
    configured = kafka_connection(bootstrap, kafka_config, kafka_option, required=False)
    if not force and configured is None:
        raise fail("--bootstrap is needed to check that the loader has drained the bucket topics (or --force)", 2)
    kafka = None if force else configured  # where the drained check reads the loader's lag
    try:
        if kafka is not None:
            check_reachable(kafka)  # a one-line error within 5 s, before the warehouse is opened
        with open_configured_warehouse(data_dir) as wh:
            current = bucket_count(wh)
            if kafka is not None:
                lag = loader_lag(kafka, loader_group, TopicNames(topic_prefix), current or 0)
                if lag:
                    raise fail(
                        f"the loader group {loader_group!r} still has {lag} unloaded messages on the bucket and "
                        f"resolve topics; let it drain (or --force)"
                    )
            enricher = Enricher(lambda: open_configured_warehouse(data_dir), lock_dir=Path(data_dir) / "locks")
            report = rebucket(wh, to, enricher, parallel=parallel)
    except (RebucketError, WarehouseError, BucketerKafkaError) as exc:
        raise fail(str(exc)) from None
    except KafkaException as exc:  # the broker went away between the reachability check and the lag
        raise fail(f"cannot read the loader's lag from Kafka at {kafka}: {exc}") from None
    typer.echo(f"rebucket: {report.old} -> {report.new} buckets, {report.rows:,} live raw rows redistributed")
    for m, n in enumerate(report.per_bucket):
        typer.echo(f"bucket {m:>3}: {n:>10,} live raw rows")
    failed = [r for r in report.rebuilds if r.status != "ok"]
    typer.echo(f"cleaned buckets rebuilt: {len(report.rebuilds) - len(failed)}/{len(report.rebuilds)}")
    typer.echo(
        f"next: restart `bucketer run`/`load` (they take {report.new} from the warehouse) and any "
        f"`bucketer route` with --buckets {report.new}"
    )
    if failed:
        raise fail(f"{len(failed)} cleaned bucket rebuilds failed: {failed[0].error}")
