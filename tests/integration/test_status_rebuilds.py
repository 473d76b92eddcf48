"""`status` tells when each bucket was last rebuilt (since the rebuild finished, not since the snapshot's hour)
and when its next scheduled rebuild is (issue 16.9)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from test_enrich import FixedClock  # the rebuild tests' clock: fixed, and a rebuild never sleeps

from connectors.warehouse import open_warehouse
from stream.enrich import Enricher
from stream.schedule import ScheduleConfig, next_slot
from stream.schema import ensure_schema
from stream.status import warehouse_status

N = 4


def test_status_shows_time_since_the_rebuild_finished_and_the_next_slot(tmp_path: Path) -> None:
    data = tmp_path / "wh"
    finished = datetime(2026, 3, 1, 10, 51, 0, tzinfo=UTC)  # snapshot hour 10:00, finished at 10:51
    with open_warehouse(data) as wh:
        ensure_schema(wh, N)
        results = Enricher(lambda: open_warehouse(data), clock=FixedClock(finished)).rebuild_many([1, 3])
        assert [r.status for r in results] == ["ok", "ok"]
        now = finished + timedelta(minutes=1)
        st = warehouse_status(wh, now=lambda: now)
    by = {b.bucket: b for b in st.buckets}
    for b in (1, 3):
        assert by[b].rebuilt_at == finished
        assert by[b].rebuilt_age_s == 60  # a minute ago, although its snapshot's hour began 52 minutes ago
        assert by[b].rebuild_seconds is not None and by[b].rebuild_seconds >= 0
    for b in (0, 2):
        assert by[b].rebuilt_at is None and by[b].rebuilt_age_s is None
    for b in range(N):
        assert by[b].next_rebuild == next_slot(b, now, ScheduleConfig(buckets=N))
    assert by[0].next_rebuild == datetime(2026, 3, 1, 11, 10, tzinfo=UTC)  # buckets 0-1 at :10
    assert st.as_json()["buckets"][1]["rebuilt_at"] == finished.isoformat()


def test_status_with_kafka_unreachable_says_so_and_exits_non_zero(tmp_path: Path) -> None:
    import subprocess
    import sys

    data = tmp_path / "wh"
    with open_warehouse(data) as wh:
        ensure_schema(wh, N)
    cli = [str(Path(sys.executable).with_name("bucketer")), "status", "--data-dir", str(data)]
    cli += ["--bootstrap", "127.0.0.1:1"]
    for extra, code in (([], 1), (["--json"], 1), (["--allow-partial"], 0)):
        proc = subprocess.run(cli + extra, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == code, (extra, proc.stdout, proc.stderr)
        assert "cleaned rows" in proc.stdout or "cleaned_rows" in proc.stdout  # the warehouse part is shown
        if code:
            assert "kafka figures missing" in proc.stderr and "Traceback" not in proc.stderr
