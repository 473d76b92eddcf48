"""Prometheus metrics of the workers, read from their own counters at scrape time.

``WorkerCollector(router=..., loader=..., rebuilds=...)`` is a prometheus-client collector: nothing is counted
twice and the hot paths do no metric work — each scrape reads ``RouterStats`` (committed counts only, so a
replayed batch is never counted twice), ``LoaderStats`` and the list of rebuild results. ``serve(port, ...)``
exposes them on ``http://127.0.0.1:PORT/metrics`` (loopback unless a host is given).

Metrics (all prefixed ``bucketer_``):
- ``routed_total{bucket}``: messages (retirements included) committed to each bucket;
- ``retirements_total``, ``updates_without_old_values_total``, ``router_aborted_batches_total``;
- ``dead_letter_total{stage, error_class}``: bad input sent to the DLQ by the router (per class) and the loader;
- ``router_lag_messages``: the router group's lag on the source topic at its last progress line;
- ``loaded_total{table}``, ``loader_messages_total``, ``loader_committed_total``;
- ``loader_lag_messages``: the loader group's read_committed lag on its partitions at its last progress line;
- ``loader_outages_total``: broker outages the loader rode out (or is riding out);
- ``toast_resolved_total``, ``toast_unresolved_total``, ``key_only_deletes_resolved_total``,
  ``key_only_deletes_unresolved_total``, ``empty_changes_retirements_total`` (stream/cdc.py);
- ``rebuilds_total{bucket, status}``, ``rebuild_rows{bucket}``, ``rebuild_seconds{bucket}`` (last rebuild);
- the cleaned buckets' maintenance (stream/incremental.py): ``corrections_total``,
  ``correction_rows_read_total``, ``correction_rows_written_total``, ``correction_tombstones_total``,
  ``freshness_seconds{bucket}`` (now − the newest applied change), ``reconcile_differing_rows{bucket}``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
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


def serve(port: int, host: str = "127.0.0.1", **workers: Any) -> CollectorRegistry:
    """Expose the workers' metrics over HTTP (a daemon thread); returns the registry."""
    from prometheus_client import start_http_server

    if not 1 <= port <= 65535:
        raise MetricsError(f"metrics port {port} is out of range (1-65535)")
    registry = registry_for(**workers)
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # in use, or not ours to bind
        raise MetricsError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return registry


class MetricsError(RuntimeError):
    """The metrics endpoint cannot be served (port out of range or in use); one line."""
