"""Prometheus metrics of the workers, read from their own counters at scrape time.

``WorkerCollector(router=..., loader=..., rebuilds=...)`` is a prometheus-client collector: nothing is counted
twice and the hot paths do no metric work — each scrape reads ``RouterStats`` (committed counts only, so a
replayed batch is never counted twice), ``LoaderStats`` and the list of rebuild results. ``serve(port, ...)``
exposes them on ``http://127.0.0.1:PORT/metrics`` (loopback unless a host is given), with ``/healthz`` and
``/readyz`` beside them (``Health``: alive = the worker loops turn; ready = alive, the warehouse answers and the
consumers are assigned).

Metrics (all prefixed ``bucketer_``):
- ``routed_total{bucket}``: messages (retirements included) committed to each bucket;
- ``retirements_total``, ``updates_without_old_values_total``, ``router_aborted_batches_total``;
- ``dead_letter_total{stage, error_class}``: bad input sent to the DLQ by the router (per class) and the loader;
- ``router_lag_messages``: the router group's lag on the source topic at its last progress line;
- ``loaded_total{table}``, ``loader_messages_total``, ``loader_committed_total``;
- ``loader_lag_messages``: the loader group's read_committed lag on its partitions at its last progress line;
- ``loader_outages_total``: broker outages the loader rode out (or is riding out);
- ``toast_resolved_total``, ``toast_unresolved_total``, ``key_only_deletes_resolved_total``,
  ``key_only_deletes_unresolved_total``, ``key_only_deletes_repeated_total``, ``empty_changes_retirements_total``
  (stream/cdc.py);
- ``rebuilds_total{bucket, status}``, ``rebuild_rows{bucket}``, ``rebuild_seconds{bucket}`` (last rebuild);
- the cleaned buckets' maintenance (stream/incremental.py): ``corrections_total``,
  ``correction_rows_read_total``, ``correction_rows_written_total``, ``correction_tombstones_total``,
  ``freshness_seconds{bucket}`` (now − the newest applied change), ``reconcile_differing_rows{bucket}``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry


class WorkerCollector(Collector):
    def __init__(
        self, router: Any = None, loader: Any = None, rebuilds: Sequence[Any] | None = None, maintainer: Any = None
    ) -> None:
        self.router, self.loader, self.rebuilds, self.maintainer = router, loader, rebuilds, maintainer

    def collect(self) -> Iterator[Any]:
        dlq = CounterMetricFamily(
            "bucketer_dead_letter", "Bad input sent to the dead-letter topic", labels=["stage", "error_class"]
        )
        if self.router is not None:
            yield from self._router(self.router.stats, dlq)
        if self.loader is not None:
            yield from self._loader(self.loader.stats, dlq)
        yield dlq
        if self.rebuilds is not None:
            yield from self._rebuilds(list(self.rebuilds))
        if self.maintainer is not None:
            yield from self._maintenance(self.maintainer.stats)

    @staticmethod
    def _maintenance(stats: Any) -> Iterator[Any]:
        for name, doc, value in (
            ("corrections", "Cleaned-bucket corrections applied", stats.corrections),
            ("correction_rows_read", "Candidate raw rows examined by corrections", stats.rows_read),
            ("correction_rows_written", "Cleaned rows written by corrections", stats.rows_written),
            ("correction_tombstones", "Cleaned rows retracted by corrections", stats.tombstones),
        ):
            yield CounterMetricFamily(f"bucketer_{name}", doc, value=value)
        fresh = GaugeMetricFamily(
            "bucketer_freshness_seconds", "Now minus the newest change applied to the bucket", labels=["bucket"]
        )
        now = time.time()
        for b, t in sorted(stats.freshness.items()):
            fresh.add_metric([str(b)], max(0.0, now - t.timestamp()))
        yield fresh
        diff = GaugeMetricFamily(
            "bucketer_reconcile_differing_rows", "Rows the last reconciliation found different", labels=["bucket"]
        )
        for b, n in sorted(stats.differing.items()):
            diff.add_metric([str(b)], n)
        yield diff

    @staticmethod
    def _router(stats: Any, dlq: CounterMetricFamily) -> Iterator[Any]:
        routed = CounterMetricFamily("bucketer_routed", "Messages committed to a bucket", labels=["bucket"])
        for b, n in enumerate(stats.buckets):
            routed.add_metric([str(b)], n)
        yield routed
        yield CounterMetricFamily("bucketer_retirements", "Retirements of old rows sent", value=stats.retirements)
        yield CounterMetricFamily(
            "bucketer_updates_without_old_values",
            "Updates whose changes were empty (no REPLICA IDENTITY FULL)",
            value=stats.old_values_unknown,
        )
        yield CounterMetricFamily("bucketer_router_aborted_batches", "Batches aborted and retried", value=stats.aborts)
        for error_class, n in sorted(stats.dlq.items()):
            dlq.add_metric(["router", error_class], n)
        if stats.lag is not None:
            yield GaugeMetricFamily(
                "bucketer_router_lag_messages", "Router group lag on the source topic", value=stats.lag
            )

    @staticmethod
    def _loader(stats: Any, dlq: CounterMetricFamily) -> Iterator[Any]:
        loaded = CounterMetricFamily("bucketer_loaded", "Messages inserted per table", labels=["table"])
        for table, n in sorted(stats.inserted.items()):
            loaded.add_metric([table], n)
        yield loaded
        yield CounterMetricFamily("bucketer_loader_messages", "Messages read by the loader", value=stats.messages)
        yield CounterMetricFamily("bucketer_loader_committed", "Messages loaded and committed", value=stats.committed)
        for error_class, n in sorted(stats.dlq.items()):
            dlq.add_metric(["loader", error_class], n)
        yield CounterMetricFamily("bucketer_loader_outages", "Broker outages the loader rode out", value=stats.outages)
        cdc = getattr(stats, "cdc", None)  # stream/cdc.py: values resolved against the warehouse
        if cdc is not None:
            for name, doc, value in (
                ("toast_resolved", '"unchanged_toast" values taken from the stored row', cdc.toast_resolved),
                ("toast_unresolved", '"unchanged_toast" messages without a stored row', cdc.toast_unresolved),
                ("key_only_deletes_resolved", "Key-only deletes that retired the stored row", cdc.deletes_resolved),
                ("key_only_deletes_unresolved", "Key-only deletes without a stored row", cdc.deletes_unresolved),
                ("key_only_deletes_repeated", "Key-only deletes of a key already deleted", cdc.deletes_repeated),
                (
                    "empty_changes_retirements",
                    "Old rows retired for updates without old values",
                    cdc.empty_changes_retired,
                ),
            ):
                yield CounterMetricFamily(f"bucketer_{name}", doc, value=value)
        if stats.lag is not None:
            yield GaugeMetricFamily(
                "bucketer_loader_lag_messages", "Loader group lag (read_committed) on its partitions", value=stats.lag
            )

    @staticmethod
    def _rebuilds(results: list[Any]) -> Iterator[Any]:
        total = CounterMetricFamily("bucketer_rebuilds", "Cleaned-bucket rebuilds", labels=["bucket", "status"])
        counts: dict[tuple[str, str], int] = {}
        last: dict[int, Any] = {}
        for r in results:
            key = (str(r.bucket), r.status)
            counts[key] = counts.get(key, 0) + 1
            if r.status == "ok":
                last[r.bucket] = r
        for key, n in sorted(counts.items()):
            total.add_metric(list(key), n)
        yield total
        rows = GaugeMetricFamily("bucketer_rebuild_rows", "Rows of the last rebuild", labels=["bucket"])
        secs = GaugeMetricFamily("bucketer_rebuild_seconds", "Duration of the last rebuild", labels=["bucket"])
        for b, r in sorted(last.items()):
            rows.add_metric([str(b)], r.rows)
            secs.add_metric([str(b)], r.seconds)
        yield rows
        yield secs


def registry_for(**workers: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(WorkerCollector(**workers))
    return registry


# A worker loop that has not turned for this long is stalled: /healthz fails (every loop turns at least every
# few seconds: a consume or poll timeout; a warehouse insert retrying with backoff still turns the loop).
STALL_AFTER = 120.0


class Health:
    """What ``/healthz`` and ``/readyz`` on the metrics port answer; each check returns why not, or None.

    - healthz, *alive*: the process serves, and every worker loop that has started (``loop_beat``, a
      ``time.monotonic()`` each worker sets as its loop turns) turned within ``stall_after`` seconds, and no
      worker has failed (``failed()``). An orchestrator restarts a process that stays unhealthy.
    - readyz, *ready*: alive, the warehouse answers (``connect()``: a new handle, ``SELECT 1``) and ``ready()``
      says the consumers are assigned (``stream.api.pipeline_ready``: the same check as the API's /readyz).
      Not ready while starting, rebalancing or stopping: take no traffic from it, do not restart it."""

    def __init__(
        self,
        workers: Sequence[Any] = (),
        *,
        ready: Callable[[], str | None] | None = None,
        connect: Callable[[], Any] | None = None,
        failed: Callable[[], str | None] | None = None,
        stall_after: float = STALL_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workers, self._ready, self._connect, self._failed = list(workers), ready, connect, failed
        self.stall_after, self._clock = stall_after, clock

    def alive(self) -> str | None:
        if self._failed is not None and (reason := self._failed()):
            return reason
        now = self._clock()
        for worker in self.workers:
            beat = getattr(worker, "loop_beat", None)
            if beat is not None and now - beat > self.stall_after:
                return f"the {type(worker).__name__.lower()} loop has not turned for {now - beat:.0f}s"
        return None

    def ready(self) -> str | None:
        if reason := self.alive():
            return reason
        if self._connect is not None:
            from connectors.warehouse import WarehouseError, one_line

            try:
                with self._connect() as wh:
                    wh.rows("SELECT 1")
            except WarehouseError as exc:
                return f"warehouse unavailable: {one_line(exc)}"
        return self._ready() if self._ready is not None else None


class MetricsServer:
    """``/metrics`` (Prometheus text), ``/healthz`` and ``/readyz`` (200 ``{"status": ...}``, or 503 with the
    reason) on one port, in a daemon thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        def answer(handler: BaseHTTPRequestHandler, code: int, body: bytes, kind: str) -> None:
            handler.send_response(code)
            handler.send_header("Content-Type", kind)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

        def check(handler: BaseHTTPRequestHandler, reason: str | None, ok: str) -> None:
            import json

            doc = {"status": ok} if reason is None else {"status": "unavailable", "reason": reason}
            answer(handler, 200 if reason is None else 503, json.dumps(doc).encode(), "application/json")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    answer(self, 200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    check(self, health.alive(), "ok")
                elif path == "/readyz":
                    check(self, health.ready(), "ready")
                else:
                    answer(self, 404, b"not found: /metrics, /healthz, /readyz\n", "text/plain")

            def log_message(self, *args: Any) -> None:  # scrapes are not log lines
                pass

        self.registry = registry
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="bucketer-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(port: int, host: str = "127.0.0.1", health: Health | None = None, **workers: Any) -> MetricsServer:
    """Expose the workers' metrics and ``health`` over HTTP (a daemon thread); port 0 picks a free one."""
    if not 0 <= port <= 65535:
        raise MetricsError(f"metrics port {port} is out of range (1-65535)")
    registry = registry_for(**workers)
    if health is None:
        health = Health([w for w in (workers.get("router"), workers.get("loader")) if w is not None])
    try:
        return MetricsServer(host, port, registry, health)
    except OSError as exc:  # in use, or not ours to bind
        raise MetricsError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None


class MetricsError(RuntimeError):
    """The metrics endpoint cannot be served (port out of range or in use); one line."""
