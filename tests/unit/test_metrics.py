"""The Prometheus collector reads the workers' own counters (real RouterStats / LoaderStats / RebuildResult)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from prometheus_client import generate_latest

from stream.enrich import RebuildResult
from stream.loader import LoaderStats
from stream.metrics import registry_for
from stream.routing import BatchCounts, RouterStats


def scrape(**workers: object) -> dict[str, float]:
    text = generate_latest(registry_for(**workers)).decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_router_loader_and_rebuild_metrics() -> None:
    stats = RouterStats(3)
    stats.add(BatchCounts([5, 0, 2], retirements=1, old_values_unknown=4, dlq=Counter(not_json=2, tombstone=1)))
    stats.lag = 17
    loader = LoaderStats(
        messages=9,
        committed=8,
        inserted={"activityRelations_bucket_MV_ds_0": 5},
        dead_lettered=1,
        dlq=Counter(warehouse_rejected=1),
    )
    rebuilds = [
        RebuildResult(0, "ok", rows=10, seconds=0.5),
        RebuildResult(0, "busy"),
        RebuildResult(1, "ok", rows=3, seconds=0.1),
        RebuildResult(0, "ok", rows=12, seconds=0.7),
    ]
    m = scrape(router=SimpleNamespace(stats=stats), loader=SimpleNamespace(stats=loader), rebuilds=rebuilds)

    assert [m[f'bucketer_routed_total{{bucket="{b}"}}'] for b in range(3)] == [5, 0, 2]
    assert m["bucketer_retirements_total"] == 1 and m["bucketer_updates_without_old_values_total"] == 4
    assert m['bucketer_dead_letter_total{error_class="not_json",stage="router"}'] == 2
    assert m['bucketer_dead_letter_total{error_class="tombstone",stage="router"}'] == 1
    assert m['bucketer_dead_letter_total{error_class="warehouse_rejected",stage="loader"}'] == 1
    assert m["bucketer_router_lag_messages"] == 17
    assert m['bucketer_loaded_total{table="activityRelations_bucket_MV_ds_0"}'] == 5
    assert m["bucketer_loader_committed_total"] == 8
    assert m['bucketer_rebuilds_total{bucket="0",status="ok"}'] == 2
    assert m['bucketer_rebuilds_total{bucket="0",status="busy"}'] == 1
    assert m['bucketer_rebuild_rows{bucket="0"}'] == 12  # the last successful rebuild


def test_counters_follow_the_stats_between_scrapes() -> None:
    stats = RouterStats(2)
    worker = SimpleNamespace(stats=stats)
    registry = registry_for(router=worker)
    first = generate_latest(registry).decode()
    stats.add(BatchCounts([3, 4]))
    second = generate_latest(registry).decode()
    assert 'bucketer_routed_total{bucket="1"} 0.0' in first
    assert 'bucketer_routed_total{bucket="1"} 4.0' in second
