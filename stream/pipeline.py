"""``bucketer run``: the whole pipeline in one process on one warehouse — router, loader, enrichment schedule.

Three workers, each a thread running its own ``run()``:

- the router (stream/router.py): ``activityRelations`` -> bucket topics, exactly once by default;
- the loader (stream/loader.py): bucket topics + reference topics -> raw and reference tables;
- the scheduler (stream/schedule.py): on the staggered hourly pattern, reconciles each cleaned bucket with a
  full rebuild (``refresh="incremental"``, the default: every loader flush already corrected the cleaned
  buckets, stream/incremental.py), or rebuilds and swaps them through the Enricher (``refresh="hourly"``, the
  anchor's replace-only mode), ``parallel`` buckets at a time.

The embedded warehouse allows one process per data directory; inside this process every worker opens its own
handle on the same engine (connectors/warehouse.py), so the loader inserts while a rebuild runs.

Stopping: ``stop()`` only sets flags. Workers stop in data-flow order — the router first, then the loader
once it has written everything the router committed, then the scheduler — so a clean stop leaves nothing
routed but unloaded. With ``until_idle=S`` the router exits after S idle seconds, the loader after it has been
idle for S seconds *after the router finished* (its own idle timer would fire while the router starts up),
then, with ``enrich_on_exit``, every bucket is rebuilt once before the scheduler stops. If any worker fails,
the others are stopped and the first error is raised from ``run()``. A broker outage is ridden out by each
worker (the loader up to ``outage_deadline``, stream/loader.py); the loader is only called idle when it is
itself (no outage, no rejoin after one, nothing uncommitted), so a bounce never ends a run with input unread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.kafka import ensure_bucket_topics
from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames
from connectors.warehouse import open_warehouse
from stream.enrich import Enricher, RebuildResult
from stream.incremental import REFRESH_MODES, Maintainer, MaintenanceLoop, reconcile_many
from stream.loader import Loader, LoaderConfig
from stream.metrics import serve
from stream.router import Router, RouterConfig
from stream.schedule import Clock, ScheduleConfig, Scheduler, SystemClock
from stream.schema import ensure_schema

log = logging.getLogger("bucketer.pipeline")


@dataclass(frozen=True)
class PipelineConfig:
    kafka: KafkaConnection
    data_dir: Path = Path(".bucketer")
    clickhouse_url: str | None = None
    buckets: int | None = None  # None: the warehouse's recorded count (10 for a new one); see ensure_schema
    topic_prefix: str = ""
    until_idle: float | None = None
    exactly_once: bool = True
    parallel: int = 1
    schedule: str | None = None  # ScheduleConfig.parse spec; None = the staggered default
    enrich_on_exit: bool = False
    partitions: int | None = None  # per bucket topic; None: connectors.topics.bucket_partitions
    router_group: str = "bucketer-router"
    loader_group: str = "bucketer-loader"
    router_overrides: dict[str, Any] = field(default_factory=dict)
    instance_id: str | None = None  # the router's and the loader's static member name (connectors.kafka.Member)
    metrics_port: int | None = None  # Prometheus metrics on 127.0.0.1:PORT/metrics (stream/metrics.py)
    http: Any = None  # stream.api.HttpConfig: serve the HTTP query API from this process (--http-port)
    outage_deadline: float = 300.0  # the loader rides out a broker outage this long (LoaderConfig)
    # "incremental": every flush corrects the cleaned buckets (stream/incremental.py), the schedule reconciles;
    # "hourly": the anchor's replace-only rebuilds on the schedule.
    refresh: str = "incremental"


class Pipeline:
    def __init__(self, config: PipelineConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.topics = TopicNames(config.topic_prefix)
        self._clock = clock or SystemClock()
        self._stopping = threading.Event()
        self._errors: list[BaseException] = []
        self.router: Router | None = None
        self.loader: Loader | None = None
        self.scheduler: Scheduler | None = None
        self.rebuilds: list[RebuildResult] = []
        self.buckets: int | None = None  # the warehouse's N, known once run() has opened it
        self.maintainer: Maintainer | None = None

    def connect(self) -> Any:
        """A new, unopened warehouse handle (the Enricher opens one per rebuild)."""
        return open_warehouse(self.config.data_dir, url=self.config.clickhouse_url)

    def stop(self) -> None:
        self._stopping.set()
        if self.router is not None:
            self.router.stop()

    def run(self) -> None:
        cfg = self.config
        if cfg.refresh not in REFRESH_MODES:
            raise ValueError(f"refresh must be one of {', '.join(REFRESH_MODES)}, got {cfg.refresh!r}")
        with self.connect() as wh:
            from stream import migration  # a gradual rebucket under way (stream/migration.py)

            active = migration.recover(wh)  # a flip a SIGKILL interrupted is finished before anything reads
            # The warehouse owns N: a --buckets that differs is refused here, before any topic is created.
            n = self.buckets = ensure_schema(wh, cfg.buckets)
            ensure_bucket_topics(
                cfg.kafka,
                self.topics,
                n,
                cfg.partitions,
                1,
                others=[*self.topics.references().values(), self.topics.source],
            )
            maintainer = loop = None
            if cfg.refresh == "incremental":
                self.maintainer = maintainer = Maintainer(n, now=self._clock)
                maintainer.setup(wh)
                loop = MaintenanceLoop(maintainer, self.connect, on_error=self._fail)
            self.router = Router(
                RouterConfig(
                    kafka=cfg.kafka,
                    buckets=n,
                    group=cfg.router_group,
                    topic_prefix=cfg.topic_prefix,
                    exactly_once=cfg.exactly_once,
                    until_idle=cfg.until_idle,
                    partitions=cfg.partitions,
                    instance_id=cfg.instance_id,
                    **cfg.router_overrides,
                )
            )
            self.loader = Loader(
                LoaderConfig(
                    kafka=cfg.kafka,
                    buckets=n,
                    group=cfg.loader_group,
                    topics=self.topics,
                    outage_deadline=cfg.outage_deadline,
                    instance_id=cfg.instance_id,
                ),
                wh,
                after_flush=loop.wake if loop is not None else None,
            )
            migration.attach(self, wh, active)
            enricher = Enricher(self.connect, clock=self._clock, lock_dir=Path(cfg.data_dir) / "locks")

            def refresh(buckets: Iterable[int]) -> None:
                if maintainer is not None:
                    self.rebuilds.extend(reconcile_many(self.connect, maintainer, buckets))
                else:
                    self.rebuilds.extend(enricher.rebuild_many(buckets, parallel=cfg.parallel))

            schedule = ScheduleConfig.parse(cfg.schedule, n) if cfg.schedule else ScheduleConfig(buckets=n)
            self.scheduler = Scheduler(
                schedule,
                refresh,
                clock=self._clock,
            )

            if cfg.metrics_port is not None:
                from stream.api import pipeline_ready
                from stream.metrics import Health

                health = Health(
                    [self.router, self.loader],
                    ready=pipeline_ready(self),
                    connect=self.connect,
                    failed=lambda: f"a worker failed: {self._errors[0]}" if self._errors else None,
                )
                serve(  # lives as long as the process (a last scrape after run() still answers), as before
                    cfg.metrics_port,
                    health=health,
                    router=self.router,
                    loader=self.loader,
                    rebuilds=self.rebuilds,
                    maintainer=maintainer,
                )
            if cfg.http is not None:  # the API's handles share this process's engine (see stream/api.py)
                from stream.api import serve_pipeline

                api = serve_pipeline(self, cfg.http)
            threads = [
                self._spawn("router", self.router.run),
                self._spawn("loader", self.loader.run),
                self._spawn("scheduler", self.scheduler.run),
            ]
            if loop is not None:
                loop.start()
            try:
                self._supervise(threads[0])
            finally:
                self.router.stop()
                threads[0].join()
                self._drain_loader(threads[1])
                if loop is not None:  # the last round: what the loader landed is in the cleaned buckets
                    try:
                        loop.finish(None if self._errors else wh)
                    except BaseException as exc:  # already in _errors when the thread failed
                        if exc not in self._errors:
                            self._errors.append(exc)
                if cfg.enrich_on_exit and not self._errors:
                    refresh(range(n))
                if maintainer is not None:
                    maintainer.close(wh)
                self.scheduler.stop()
                for t in threads[1:]:
                    t.join()
                if cfg.http is not None:
                    api.stop()
        if self._errors:
            raise self._errors[0]

    # -- internals ---------------------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """A worker outside ``_spawn`` failed (the maintenance loop): the pipeline stops, run() re-raises it."""
        self._errors.append(exc)
        self.stop()

    def _spawn(self, name: str, target: Callable[[], Any]) -> threading.Thread:
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # a worker failure stops the pipeline, and run() re-raises it
                log.error("%s failed: %s", name, exc)
                self._errors.append(exc)
                self.stop()

        thread = threading.Thread(target=body, name=f"bucketer-{name}", daemon=True)
        thread.start()
        return thread

    def _supervise(self, router_thread: threading.Thread) -> None:
        """Wait until the router ends (until-idle, stop, or failure)."""
        while router_thread.is_alive() and not self._stopping.is_set():
            router_thread.join(0.2)

    def _loader_caught_up(self) -> bool:
        """Nothing left for the loader group: no committed message it has not committed, and none in an open
        transaction. A router SIGKILLed mid-transaction leaves one open on the bucket topics until the broker
        aborts it (its transaction timeout): a read_committed loader sees nothing past it and looks idle, while
        the messages routed after it wait behind it. ``--until-idle`` must not end there."""
        from connectors.kafka import group_lag

        assert self.buckets is not None
        topics = [*self.topics.buckets(self.buckets), self.topics.resolve, *self.topics.references().values()]
        lag = group_lag(self.config.kafka, self.config.loader_group, topics)
        if lag.at_most:
            log.info(
                "until-idle: the loader still has %d messages to read, %d offsets in open transactions: waiting",
                lag.messages,
                lag.pending,
            )
        return lag.exact and lag.at_most == 0

    def _drain_loader(self, loader_thread: threading.Thread) -> None:
        """Let the loader write everything the router committed, then stop it."""
        assert self.loader is not None
        stats = self.loader.stats
        idle_for = self.config.until_idle if self.config.until_idle is not None else 2.0
        last_seen, last_change = stats.messages, time.monotonic()
        # On a plain stop (no until-idle) the loader still catches up, bounded by a grace period.
        deadline = time.monotonic() + (3600 if self.config.until_idle is not None else 60)
        while loader_thread.is_alive() and time.monotonic() < deadline and not self._errors:
            # The loader's own idleness too: a broker outage, or the rejoin after it, is not idle (what the
            # router committed may still be waiting to be read).
            if stats.messages != last_seen:
                last_seen, last_change = stats.messages, time.monotonic()
            elif (
                stats.committed >= stats.messages
                and time.monotonic() - last_change >= idle_for
                and self.loader.idle(idle_for)
            ):
                if self.config.until_idle is None or self._loader_caught_up():
                    break
                last_change = time.monotonic()  # input is still to come: wait another idle spell
            time.sleep(0.1)
        self.loader.stop()
        loader_thread.join()
