"""The bucket count N has one owner, the warehouse (issue 11): commands refuse a different ``--buckets``.

Everything runs as a user would: the ``bucketer`` console script against a real broker, on one data dir.
The warehouse is inspected by a separate Python process (one process per embedded data dir at a time).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from confluent_kafka.admin import AdminClient
from kafkatools import unique

BUCKETER = Path(sys.executable).with_name("bucketer")

# Prints what must not change when a command is refused: the views' definitions, the recorded N, how often N
# was recorded, every table name, and the raw and reference rows (all versions and live ones).
SNAPSHOT = """
import json, sys
from pathlib import Path
from connectors.warehouse import open_warehouse
from stream.buckets import raw_table
from stream.schema import PROJECT_VIEW, REFERENCE_COLUMNS, ROUTING_VIEW, SETTINGS_TABLE, UNION_VIEW, bucket_count
with open_warehouse(Path(sys.argv[1])) as wh:
    n = bucket_count(wh)
    tables = sorted(r[0] for r in wh.rows("SELECT name FROM system.tables WHERE database = currentDatabase()"))
    out = {
        "buckets": n,
        "settings_rows": wh.rows(f"SELECT count() FROM {SETTINGS_TABLE}")[0][0],
        "views": {v: wh.rows(f"SHOW CREATE TABLE {v}")[0][0] for v in (UNION_VIEW, ROUTING_VIEW, PROJECT_VIEW)},
        "tables": tables,
        "raw": [list(wh.rows(f"SELECT count(), (SELECT count() FROM {raw_table(b)} FINAL) FROM {raw_table(b)}")[0])
                for b in range(n)],
        "misplaced": sum(wh.rows(f"SELECT countIf(cityHash64(segmentId) % {n} != {b}) FROM {raw_table(b)}")[0][0]
                         for b in range(n)),
        "reference": {t: wh.rows(f"SELECT count() FROM {t} FINAL")[0][0] for t in REFERENCE_COLUMNS},
    }
print(json.dumps(out))
"""


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUCKETER), *args], capture_output=True, text=True, timeout=timeout)


def snapshot(data: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", SNAPSHOT, str(data)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def bucket_topics(bootstrap: str, prefix: str) -> set[int]:
    names = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30).topics
    head = f"{prefix}activityRelations_bucket_"
    return {int(t[len(head) :]) for t in names if t.startswith(head) and t[len(head) :].isdigit()}


def test_a_different_buckets_is_refused_and_the_recorded_n_is_used_without_one(bootstrap: str, tmp_path: Path) -> None:
    prefix = unique("own") + "."
    data = tmp_path / "wh"
    kafka = ["--bootstrap", bootstrap, "--topic-prefix", prefix]
    gen = cli("loadgen", *kafka, "--count", "1500", "--seed", "11", "--segments", "30", "--quiet")
    assert gen.returncode == 0, gen.stderr
    first = cli("run", *kafka, "--data-dir", str(data), "--buckets", "10", "--until-idle", "2")
    assert first.returncode == 0, first.stderr
    before = snapshot(data)
    assert before["buckets"] == 10 and before["settings_rows"] == 1 and before["misplaced"] == 0
    assert sum(live for _, live in before["raw"]) > 500 and all(before["reference"].values())
    assert bucket_topics(bootstrap, prefix) == set(range(10))

    refused = {
        "run": cli("run", *kafka, "--data-dir", str(data), "--buckets", "20", "--until-idle", "1"),
        "load": cli("load", *kafka, "--data-dir", str(data), "--buckets", "20", "--until-idle", "1"),
        "bootstrap": cli("bootstrap", *kafka, "--data-dir", str(data), "--buckets", "20"),
        "enrich": cli("enrich", "--all", "--data-dir", str(data), "--buckets", "20"),
    }
    for command, proc in refused.items():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert lines == [
            "bucketer: the warehouse is set up for 10 buckets, not 20; change it with `bucketer rebucket --to 20`"
        ], (command, proc.stderr)
    # Nothing moved: same views, same N recorded once, no new table, no new bucket topic, the same rows.
    assert snapshot(data) == before
    assert bucket_topics(bootstrap, prefix) == set(range(10))

    # Without --buckets every command takes the warehouse's 10: new input lands in the 10 buckets.
    more = cli("loadgen", *kafka, "--count", "800", "--seed", "12", "--segments", "30", "--quiet")
    assert more.returncode == 0, more.stderr
    again = cli("run", *kafka, "--data-dir", str(data), "--until-idle", "2")
    assert again.returncode == 0, again.stderr
    after = snapshot(data)
    assert after["buckets"] == 10 and after["settings_rows"] == 1 and after["misplaced"] == 0
    assert after["views"] == before["views"] and after["tables"] == before["tables"]
    assert sum(live for _, live in after["raw"]) > sum(live for _, live in before["raw"])
    assert bucket_topics(bootstrap, prefix) == set(range(10))
    load = cli("load", *kafka, "--data-dir", str(data), "--until-idle", "1")
    assert load.returncode == 0, load.stderr
    boot = cli("bootstrap", *kafka, "--data-dir", str(data))
    assert boot.returncode == 0, boot.stderr
    rows = [line.split() for line in boot.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(10)), boot.stdout  # one distribution row per bucket, 0..9
    assert "every row is in bucket" in boot.stdout
    enrich = cli("enrich", "--all", "--data-dir", str(data))
    assert enrich.returncode == 0, enrich.stderr
    assert [line.split(":")[0] for line in enrich.stdout.splitlines()] == [f"bucket {b}" for b in range(10)]
    assert snapshot(data)["settings_rows"] == 1 and snapshot(data)["views"] == before["views"]


def test_a_fresh_warehouse_takes_buckets_or_ten(bootstrap: str, tmp_path: Path) -> None:
    """A new data dir records the --buckets given (bootstrap here), else 10 (enrich)."""
    prefix = unique("own") + "."
    kafka = ["--bootstrap", bootstrap, "--topic-prefix", prefix]
    gen = cli("loadgen", *kafka, "--count", "300", "--seed", "4", "--segments", "12", "--quiet")
    assert gen.returncode == 0, gen.stderr
    boot = cli("bootstrap", *kafka, "--data-dir", str(tmp_path / "six"), "--buckets", "6")
    assert boot.returncode == 0, boot.stderr
    six = snapshot(tmp_path / "six")
    assert six["buckets"] == 6 and six["misplaced"] == 0 and sum(live for _, live in six["raw"]) > 100
    assert "an integer from 0 to 5'" in six["views"]["activityRelations_bucket_routing"]
    fresh = cli("enrich", "--all", "--data-dir", str(tmp_path / "ten"))
    assert fresh.returncode == 0, fresh.stderr
    assert snapshot(tmp_path / "ten")["buckets"] == 10


def test_ensure_schema_owns_n_and_only_allow_change_moves_it(tmp_path: Path) -> None:
    from connectors.warehouse import open_warehouse
    from stream.schema import ROUTING_VIEW, SETTINGS_TABLE, BucketCountMismatch, bucket_count, ensure_schema

    with open_warehouse(tmp_path / "wh") as wh:
        assert bucket_count(wh) is None
        assert ensure_schema(wh, None) == 10  # a fresh warehouse without a count takes 10
        view = wh.rows(f"SHOW CREATE TABLE {ROUTING_VIEW}")[0][0]
        assert ensure_schema(wh, None) == 10 and ensure_schema(wh, 10) == 10
        try:
            ensure_schema(wh, 4)
        except BucketCountMismatch as exc:
            assert str(exc) == (
                "the warehouse is set up for 10 buckets, not 4; change it with `bucketer rebucket --to 4`"
            )
            assert isinstance(exc, ValueError) and (exc.recorded, exc.asked) == (10, 4)
        else:
            raise AssertionError("a different bucket count was accepted")
        assert bucket_count(wh) == 10 and wh.rows(f"SHOW CREATE TABLE {ROUTING_VIEW}")[0][0] == view
        assert wh.rows(f"SELECT count() FROM {SETTINGS_TABLE}")[0][0] == 1  # recorded once, not per call
        # rebucket's way: each change is recorded, back-to-back changes included (no same-millisecond tie).
        for n in (4, 5, 6, 3):
            assert ensure_schema(wh, n, allow_change=True) == n and bucket_count(wh) == n
        assert ensure_schema(wh, None) == 3 and "from 0 to 2'" in wh.rows(f"SHOW CREATE TABLE {ROUTING_VIEW}")[0][0]
        ats = [r[0] for r in wh.rows(f"SELECT at FROM {SETTINGS_TABLE} ORDER BY at")]
        assert len(ats) == 5 and len(set(ats)) == 5
