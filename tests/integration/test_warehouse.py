"""The embedded warehouse for real: one process per data dir (lock file), one data dir at a time per process,
idempotent schema, and the `bucketer query` / `bucketer status` commands on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from proctools import repo_env

from connectors.kafka_conn import KafkaConnection
from connectors.warehouse import EmbeddedWarehouse, WarehouseError
from stream.buckets import bucket_of, cleaned_table, raw_table
from stream.schema import ACTIVITY_NAMES, CLEANED_EXTRA, ensure_schema
from stream.status import warehouse_status

ROOT = Path(__file__).resolve().parents[2]
BUCKETER = Path(sys.executable).with_name("bucketer")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BUCKETER_CLICKHOUSE_URL"} | {"COLUMNS": "140"}
    return subprocess.run([str(BUCKETER), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_a_second_process_is_refused_with_one_line(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from connectors.warehouse import EmbeddedWarehouse
            with EmbeddedWarehouse({str(tmp_path / "d")!r}) as wh:
                wh.rows("SELECT 1")
                print("ready", flush=True)
                sys.stdin.readline()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=repo_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(WarehouseError) as err:
            with EmbeddedWarehouse(tmp_path / "d"):
                pass
        message = str(err.value)
        assert "in use by another bucketer process" in message and f"pid {holder.pid}" in message
        assert "\n" not in message
        cli = run_cli("query", "--data-dir", str(tmp_path / "d"), "SELECT 1", cwd=tmp_path)
        assert cli.returncode != 0 and cli.stderr.count("\n") == 1 and "in use" in cli.stderr
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(30)
    # Once the holder is gone the directory is free again.
    with EmbeddedWarehouse(tmp_path / "d") as wh:
        assert wh.rows("SELECT 1") == [(1,)]


def test_one_data_dir_at_a_time_in_a_process(tmp_path: Path) -> None:
    with EmbeddedWarehouse(tmp_path / "a") as a:
        a.command("CREATE TABLE IF NOT EXISTS only_in_a (x UInt8) ENGINE = MergeTree ORDER BY x")
        with EmbeddedWarehouse(tmp_path / "a") as again:  # same dir: shared engine, fine
            assert again.rows("EXISTS TABLE only_in_a") == [(1,)]
        with pytest.raises(WarehouseError, match="one data dir per process"):
            with EmbeddedWarehouse(tmp_path / "b"):
                pass
    with EmbeddedWarehouse(tmp_path / "b") as b:  # switching after close works
        assert b.rows("EXISTS TABLE only_in_a") == [(0,)]


def test_schema_is_idempotent(tmp_path: Path) -> None:
    with EmbeddedWarehouse(tmp_path / "d") as wh:
        ensure_schema(wh, 3)
        tables = wh.rows("SELECT name, engine FROM system.tables WHERE database = currentDatabase() ORDER BY name")
        wh.insert(raw_table(1), ["activityId", "segmentId", "_version"], [["a", "s", 1]])
        ensure_schema(wh, 3)
        assert (
            wh.rows("SELECT name, engine FROM system.tables WHERE database = currentDatabase() ORDER BY name") == tables
        )
        assert wh.rows(f"SELECT count() FROM {raw_table(1)}") == [(1,)]
        # settings, references, raw, cleaned, views, the activity index and its views
        assert len(tables) == 1 + 5 + 3 + 3 + 3 + 1 + 3


def cleaned_rows(bucket: int, count: int, snap: datetime) -> tuple[list[str], list[list[object]]]:
    cols = list(ACTIVITY_NAMES) + [c[0] for c in CLEANED_EXTRA]
    t = datetime(2025, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(count):
        row = {c: "" for c in cols} | {
            "createdAt": t,
            "updatedAt": t,
            "timestamp": t,
            "snapshotId": snap,
            "activityId": f"b{bucket}-{i}",
            "sourceId": f"b{bucket}-{i}",  # one row per raw identity: the cleaned bucket is keyed by it
            "segmentId": f"seg{bucket}",
            "sentimentScore": 0,
            "gitInsertions": 0,
            "gitDeletions": 0,
            "score": 0,
            "isContribution": 0,
            "gitChangedLines": 0,
        }
        rows.append([row[c] for c in cols])
    return cols, rows


def test_status_counts_live_rows_and_snapshot_age(tmp_path: Path) -> None:
    snap = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
    with EmbeddedWarehouse(tmp_path / "d") as wh:
        ensure_schema(wh, 3)
        raw_cols = ["activityId", "segmentId", "sourceId", "_deleted", "_version"]
        wh.insert(raw_table(0), raw_cols, [["a1", "s", "x1", 0, 2], ["a2", "s", "x2", 0, 2], ["a3", "s", "x3", 0, 2]])
        wh.insert(raw_table(0), raw_cols, [["a3", "s", "x3", 1, 3]])  # a delete of a3
        wh.insert(raw_table(2), raw_cols, [["b1", "t", "y1", 0, 2]])
        cols, rows = cleaned_rows(0, 2, snap)
        wh.insert(cleaned_table(0), cols, rows)
        st = warehouse_status(wh, now=lambda: snap + timedelta(minutes=90))
    assert [(b.bucket, b.raw_rows, b.cleaned_rows) for b in st.buckets] == [(0, 2, 2), (1, 0, 0), (2, 1, 0)]
    assert [round(b.share, 4) for b in st.buckets] == [round(2 / 3, 4), 0.0, round(1 / 3, 4)]
    assert st.buckets[0].snapshot_id == snap and st.buckets[0].snapshot_age_s == 5400
    assert st.buckets[1].snapshot_id is None and st.buckets[1].snapshot_age_s is None

    out = run_cli("status", "--data-dir", str(tmp_path / "d"), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [b["raw_rows"] for b in data["buckets"]] == [2, 0, 1] and data["cleaned_total"] == 2
    table = run_cli("status", "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert table.returncode == 0 and "cleaned rows" in table.stdout and "█" in table.stdout


def test_query_cli_json_lines_project_and_errors(tmp_path: Path) -> None:
    seg = "5ab72c4b-1047-4735-ae83-096d47d0cdaf"
    n = 10
    with EmbeddedWarehouse(tmp_path / ".bucketer") as wh:
        ensure_schema(wh, n)
        wh.insert(
            "insightsProjects",
            ["id", "name", "slug", "segmentId", "enabled", "_version"],
            [["p1", "Alpha", "alpha", seg, 1, 1], ["p2", "Off", "off", seg, 0, 1]],
        )
        cols, rows = cleaned_rows(bucket_of(seg, n), 3, datetime(2025, 3, 1, tzinfo=UTC))
        rows = [[seg if c == "segmentId" else v for c, v in zip(cols, r, strict=True)] for r in rows]
        wh.insert(cleaned_table(bucket_of(seg, n)), cols, rows)
    # --data-dir defaults to .bucketer/ in the working directory.
    out = run_cli(
        "query",
        "--project",
        "alpha",
        "SELECT {bucketId:UInt32} AS b, count() AS c FROM {bucket} WHERE segmentId = {segmentId:String}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [{"b": bucket_of(seg, n), "c": 3}]
    plain = run_cli("query", "SELECT number AS x FROM numbers(3)", cwd=tmp_path)
    assert [json.loads(line) for line in plain.stdout.splitlines()] == [{"x": 0}, {"x": 1}, {"x": 2}]
    for args, needle in (
        (("--project", "off", "SELECT 1"), "no enabled project"),
        (("DROP TABLE members",), "only SELECT"),
        (("SELECT * FROM activityRelations_bucket_routing(bucketId = 10)",), "invalid bucketId"),
    ):
        bad = run_cli("query", *args, cwd=tmp_path)
        assert bad.returncode != 0 and needle in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


def test_status_reads_dlq_count_and_router_lag_from_kafka_offsets(bootstrap: str, tmp_path: Path) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition
    from kafkatools import create_topics, unique

    from connectors.topics import TopicNames
    from stream.status import collect

    topics = TopicNames(prefix=unique("st") + ".")
    create_topics(bootstrap, [topics.source, topics.dlq], partitions=2)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(3):
        producer.produce(topics.dlq, value=b"bad", partition=i % 2)
    for i in range(7):
        producer.produce(topics.source, value=b"{}", partition=0 if i < 4 else 1)
    assert producer.flush(30) == 0
    group = unique("router")
    committer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:  # the "router" has done 2 of partition 0's 4 messages and nothing of partition 1's 3
        committer.commit(offsets=[TopicPartition(topics.source, 0, 2)], asynchronous=False)
    finally:
        committer.close()
    with EmbeddedWarehouse(tmp_path / "d") as wh:
        ensure_schema(wh, 2)
        st = collect(wh, kafka=KafkaConnection.plain(bootstrap), topics=topics, router_group=group)
        assert (st.dlq_messages, st.router_lag, st.kafka_error) == (3, 2 + 3, None)
        missing = collect(
            wh,
            kafka=KafkaConnection.plain(bootstrap),
            topics=TopicNames(prefix=unique("none") + "."),
            router_group=group,
        )
        assert (missing.dlq_messages, missing.router_lag) == (None, None)


def test_status_counts_committed_dlq_messages_not_transaction_markers(bootstrap: str, tmp_path: Path) -> None:
    """The router writes the DLQ inside transactions: commit markers and aborted records take offsets, so the
    offset span over-counts. status counts what a read_committed reader sees."""
    from confluent_kafka import Producer
    from kafkatools import create_topics, unique

    from connectors.topics import TopicNames
    from stream.status import collect

    topics = TopicNames(prefix=unique("stx") + ".")
    create_topics(bootstrap, [topics.dlq], partitions=2)
    tx = Producer({"bootstrap.servers": bootstrap, "transactional.id": unique("tx")})
    tx.init_transactions(30)
    for batch in range(4):  # four committed transactions of 2 messages, one aborted of 5
        tx.begin_transaction()
        for i in range(2):
            tx.produce(topics.dlq, value=b"bad", partition=(batch + i) % 2)
        tx.commit_transaction(30)
    tx.begin_transaction()
    for i in range(5):
        tx.produce(topics.dlq, value=b"aborted", partition=i % 2)
    assert tx.flush(30) == 0
    tx.abort_transaction(30)
    with EmbeddedWarehouse(tmp_path / "d") as wh:
        ensure_schema(wh, 2)
        st = collect(wh, kafka=KafkaConnection.plain(bootstrap), topics=topics, router_group=unique("g"))
    assert st.dlq_messages == 8


def test_status_lists_buckets_in_order(tmp_path: Path) -> None:
    with EmbeddedWarehouse(tmp_path / "d") as wh:
        ensure_schema(wh, 16)
        for b in range(16):
            wh.insert(
                raw_table(b),
                ["activityId", "segmentId", "sourceId", "_deleted", "_version"],
                [[f"a{i}", "s", f"x{i}", 0, 2] for i in range(b)],
            )
        st = warehouse_status(wh)
    assert [(b.bucket, b.raw_rows) for b in st.buckets] == [(b, b) for b in range(16)]
