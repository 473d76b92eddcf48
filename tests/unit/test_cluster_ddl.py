"""BUCKETER_CLICKHOUSE_CLUSTER: the schema's DDL ON CLUSTER with the Replicated engine family.

No ClickHouse cluster (nor server) runs here: each clustered statement is checked as text, and parsed by the
real ClickHouse parser of the embedded engine (``formatQuery``), which does not need a cluster to parse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from connectors.warehouse import REPLICA_ARGS, WarehouseError, cluster_ddl, open_warehouse, schema_command
from stream.incremental import maintenance_ddl
from stream.schema import cleaned_table_ddl, ensure_schema, schema_statements

CLUSTER = "prod"
BUCKETS = 3


def all_statements() -> list[str]:
    """Every statement the schema makes: ensure_schema's, then the maintenance's (Maintainer.setup)."""
    return schema_statements(BUCKETS) + maintenance_ddl(BUCKETS) + [cleaned_table_ddl(n) for n in range(BUCKETS)]


def unclustered(sql: str) -> str:
    """``sql`` with the clause and the Replicated engines taken back out."""
    sql = sql.replace(f" ON CLUSTER `{CLUSTER}`", "")
    sql = re.sub(r"Replicated(\w*MergeTree)\(" + re.escape(REPLICA_ARGS) + r", ", r"\1(", sql)
    return re.sub(r"Replicated(\w*MergeTree)\(" + re.escape(REPLICA_ARGS) + r"\)", r"\1", sql)


@pytest.mark.parametrize("sql", all_statements(), ids=lambda s: re.search(r"(?:EXISTS|VIEW) (\w+)", s).group(1))
def test_every_statement_gets_on_cluster_after_its_name_and_a_replicated_engine(sql: str) -> None:
    out = cluster_ddl(sql, CLUSTER)
    name = re.match(r"CREATE (?:OR REPLACE )?(?:MATERIALIZED )?(?:TABLE|VIEW) (?:IF NOT EXISTS )?(\S+)", sql)
    assert name is not None
    assert out.startswith(f"{sql[: name.end()]} ON CLUSTER `{CLUSTER}`")
    assert out.count("ON CLUSTER") == 1
    if "ENGINE = " in sql:  # a table: its engine is the Replicated twin, keeping its own arguments
        engine = re.search(r"ENGINE = (\w+)\(", out)
        assert engine is not None and engine.group(1).startswith("Replicated"), out
        assert f"({REPLICA_ARGS}" in out
    else:  # a view or a materialized view TO a table: no engine of its own
        assert "Replicated" not in out
    assert unclustered(out) == sql  # nothing else changed


def test_the_engines_are_the_ones_a_cluster_needs() -> None:
    out = [cluster_ddl(s, CLUSTER) for s in all_statements()]
    raw = next(s for s in out if "activityRelations_bucket_MV_ds_0 " in s)
    assert (
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', "
        "_version, _deleted)" in raw
    )
    assert "PARTITION BY" in raw and "fsync_after_insert" in raw
    changes = next(s for s in out if "bucketer_ref_changes " in s)
    assert "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}') ORDER BY at" in (
        changes
    )
    tables = [s for s in all_statements() if "ENGINE = " in s]
    assert sum("Replicated" in cluster_ddl(s, CLUSTER) for s in tables) == len(tables) > 3 * BUCKETS
    assert not any(re.search(r"ENGINE = (?!Replicated)\w*MergeTree", s) for s in out)


def test_without_a_cluster_nothing_changes() -> None:
    assert [cluster_ddl(s, None) for s in all_statements()] == all_statements()


def test_statements_it_does_not_understand_are_refused_not_half_clustered() -> None:
    for sql in ("DROP TABLE IF EXISTS x SYNC", "CREATE TABLE s (id String) ENGINE = Memory", "INSERT INTO x VALUES"):
        with pytest.raises(ValueError, match="not a schema statement"):
            cluster_ddl(sql, CLUSTER)
    with pytest.raises(WarehouseError, match="not a cluster name"):
        cluster_ddl(schema_statements(1)[0], "prod; DROP")


def test_clickhouse_parses_every_clustered_statement(tmp_path: Path) -> None:
    """The embedded engine's parser (ClickHouse's own) reads each statement back with the cluster and engine."""
    with open_warehouse(tmp_path / "wh", cluster="") as wh:
        for sql in all_statements():
            formatted = wh.rows("SELECT formatQuery({q:String})", {"q": cluster_ddl(sql, CLUSTER)})[0][0]
            assert f"ON CLUSTER {CLUSTER}" in formatted
            if "ENGINE = " in sql:
                assert re.search(r"ENGINE = Replicated\w*MergeTree\('/clickhouse/tables/\{shard\}", formatted)


class Recording:
    """A server warehouse's surface as ensure_schema sees it, on a cluster, recording what it is sent."""

    cluster = CLUSTER

    def __init__(self) -> None:
        self.sent: list[str] = []

    def command(self, sql: str, params: None = None) -> None:
        self.sent.append(sql)

    def rows(self, sql: str, params: object = None) -> list[tuple[int, ...]]:
        return [(0,)]  # a new warehouse: no settings table, no recorded bucket count


def test_ensure_schema_sends_the_clustered_statements_to_a_cluster_warehouse() -> None:
    wh = Recording()
    assert ensure_schema(wh, BUCKETS) == BUCKETS
    creates = [s for s in wh.sent if s.startswith("CREATE")]
    assert creates == [cluster_ddl(s, CLUSTER) for s in schema_statements(BUCKETS)]
    schema_command(wh, maintenance_ddl(1)[0])
    assert wh.sent[-1] == cluster_ddl(maintenance_ddl(1)[0], CLUSTER)


def test_a_cluster_with_the_embedded_warehouse_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(WarehouseError) as refused:
        open_warehouse(tmp_path, cluster=CLUSTER)
    assert "needs a ClickHouse server" in str(refused.value) and "\n" not in str(refused.value)
    monkeypatch.setenv("BUCKETER_CLICKHOUSE_CLUSTER", CLUSTER)
    with pytest.raises(WarehouseError, match="BUCKETER_CLICKHOUSE_CLUSTER=prod needs a ClickHouse server"):
        open_warehouse(tmp_path)
    server = open_warehouse(tmp_path, url="http://127.0.0.1:1/db")
    assert getattr(server, "cluster", None) == CLUSTER  # not connected: a server takes the cluster


def test_a_rebuild_swap_is_refused_on_a_cluster() -> None:
    """Rebuild swaps (hourly refresh, rebucket) are not cluster-aware: refused, not run half-replicated."""
    server = open_warehouse(url="http://127.0.0.1:1/db", cluster=CLUSTER)
    with pytest.raises(WarehouseError, match="not cluster-aware"):
        server.exchange("a", "b")
