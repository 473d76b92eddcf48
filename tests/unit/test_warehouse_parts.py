"""Pure parts of the warehouse side: schema DDL text, the ingest rules in Python, read-only query checks; and the
warehouse seam's own contract on the embedded engine (error codes, the one swap), each test in its own data dir."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from connectors.warehouse import EmbeddedWarehouse, ServerWarehouse, WarehouseError, open_warehouse, redact
from stream.query import QueryError, read_only
from stream.row_sql import insert_sql, problem
from stream.schema import (
    PROJECT_VIEW,
    ROUTING_VIEW,
    UNION_VIEW,
    cleaned_table_ddl,
    raw_table_ddl,
    reference_table_ddl,
    schema_statements,
)


def columns_of(ddl: str) -> list[str]:
    body = ddl[ddl.index("(") + 1 : ddl.rindex(")\nENGINE")]
    return [line.strip().split()[0].strip("`") for line in body.strip().splitlines()]


def test_raw_table_layout_follows_the_contract() -> None:
    ddl = raw_table_ddl(7)
    assert ddl.startswith("CREATE TABLE IF NOT EXISTS activityRelations_bucket_MV_ds_7 (")
    cols = columns_of(ddl)
    assert len(cols) == 25 and cols[:3] == ["activityId", "conversationId", "createdAt"]
    assert cols[-2:] == ["_deleted", "_version"]
    assert "ENGINE = ReplacingMergeTree(_version, _deleted)" in ddl
    assert "PARTITION BY toYear(createdAt)" in ddl
    assert "ORDER BY (segmentId, timestamp, type, platform, channel, sourceId)" in ddl
    assert "`timestamp` DateTime64(3, 'UTC')" in ddl and "`sentimentScore` Int8 DEFAULT -1" in ddl
    assert "fsync_after_insert = 1" in ddl  # offsets are committed after the insert: parts must be on disk


def test_cleaned_and_reference_tables() -> None:
    cleaned = cleaned_table_ddl(2)
    cols = columns_of(cleaned)
    assert cols[23:] == [
        "gitChangedLines",
        "gitChangedLinesBucket",
        "organizationCountryCode",
        "organizationName",
        "snapshotId",
        "_deleted",
        "_version",
    ]
    # Corrected in place by stream/incremental.py: one row per raw identity, the newest _version wins.
    assert (
        "ENGINE = ReplacingMergeTree(_version, _deleted)\n"
        "ORDER BY (segmentId, timestamp, type, platform, channel, sourceId)" in cleaned
    )
    members = reference_table_ddl("members")
    assert {"isBot", "isTeamMember", "isOrganization", "attributes"} <= set(columns_of(members))
    assert "ReplacingMergeTree(_version, _deleted)\nORDER BY id" in members
    assert "`enabled` UInt8 DEFAULT 1" in reference_table_ddl("repositories")


def test_schema_statements_cover_n_buckets_and_are_idempotent_text() -> None:
    stmts = schema_statements(3)
    created = [
        re.search(r"(?:TABLE IF NOT EXISTS|VIEW IF NOT EXISTS|OR REPLACE VIEW) (\w+)", s).group(1) for s in stmts
    ]
    for n in range(3):
        assert f"activityRelations_bucket_MV_ds_{n}" in created
        assert f"activityRelations_deduplicated_cleaned_bucket_{n}_ds" in created
    assert "activityRelations_bucket_MV_ds_3" not in created
    assert {"bucketer_activity_index", "bucketer_activity_index_mv_2"} <= set(created)
    assert "bucketer_activity_index_mv_3" not in created
    assert {UNION_VIEW, ROUTING_VIEW, PROJECT_VIEW, "members", "insightsProjects"} <= set(created)
    assert all("IF NOT EXISTS" in s or "OR REPLACE" in s for s in stmts)
    with pytest.raises(ValueError):
        schema_statements(0)


def test_insert_sql_lists_every_column_and_reads_the_source() -> None:
    cols, select = insert_sql("activityRelations")
    assert cols.count("`") == 2 * 25 and "{source}" in select and "throwIf" in select
    ref_cols, ref_select = insert_sql("repositories")
    assert ref_cols.split(", ")[0] == "`id`" and ref_cols.endswith("`_deleted`, `_version`")
    assert "commit_timestamp" in ref_select


RECORD = {
    "activityId": "a",
    "memberId": "m",
    "platform": "git",
    "segmentId": "s",
    "sourceId": "x",
    "type": "t",
    "createdAt": "2025-01-01T00:00:00Z",
    "updatedAt": 1735689600000000,
    "timestamp": "2025-01-01T00:00:00Z",
}


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (None, "tombstone"),
        (b"", "tombstone"),
        (b"{nope", "not JSON"),
        (b"[1]", "not a JSON object"),
        (orjson.dumps({"action": "upsert", "record": RECORD}), "unknown action"),
        (orjson.dumps({"action": "insert", "record": "x"}), "no record"),
        (orjson.dumps({"action": "insert", "record": {**RECORD, "segmentId": None}}), "segmentId"),
        (orjson.dumps({"action": "insert", "record": {**RECORD, "timestamp": "soon"}}), "timestamp"),
        (orjson.dumps({"action": "insert", "record": {**RECORD, "score": 300}}), "score"),
        (orjson.dumps({"action": "insert", "record": {**RECORD, "gitInsertions": -1}}), "gitInsertions"),
        (orjson.dumps({"action": "insert", "record": {**RECORD, "channel": {"a": 1}}}), "channel"),
    ],
)
def test_problem_names_what_is_wrong(value: bytes | None, needle: str) -> None:
    reason = problem(value, "activityRelations")
    assert reason is not None and needle in reason


def test_problem_accepts_good_messages_and_key_only_deletes() -> None:
    good = {"action": "read", "record": {**RECORD, "score": "3", "isContribution": True, "sentimentScore": None}}
    assert problem(orjson.dumps(good), "activityRelations") is None
    key_only = {
        "action": "delete",
        "record": {"id": "r1", "url": None},
        "metadata": {"commit_timestamp": "2025-01-01T00:00:00.000001Z"},
    }
    assert problem(orjson.dumps(key_only), "repositories") is None
    no_version = {"action": "delete", "record": {"id": "r1"}, "metadata": {}}
    assert "version" in (problem(orjson.dumps(no_version), "repositories") or "")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "  with x as (select 1) select * from x;",
        "(SELECT 1) UNION ALL (SELECT 2)",
        "-- note\nSELECT ';' AS semicolon",
        "/* a */ select 'drop table x'",
    ],
)
def test_read_only_accepts_selects(sql: str) -> None:
    assert read_only(sql).strip()


@pytest.mark.parametrize(
    "sql",
    [
        "",
        ";",
        "DROP TABLE members",
        "insert into t values (1)",
        "SELECT 1; DROP TABLE t",
        "select 1 into outfile '/tmp/x'",
        "ALTER TABLE t DELETE WHERE 1",
        "optimize table t",
    ],
)
def test_read_only_rejects_the_rest(sql: str) -> None:
    with pytest.raises(QueryError):
        read_only(sql)


def test_constructors_do_no_io_and_urls_pick_the_backend(tmp_path: Path) -> None:
    where = tmp_path / "never-created"
    wh = open_warehouse(where)
    assert isinstance(wh, EmbeddedWarehouse) and not where.exists()
    server = open_warehouse(where, url="https://u:secret@ch.example:8443/analytics")
    assert isinstance(server, ServerWarehouse) and server.database == "analytics"
    assert redact(server.url) == "https://u:***@ch.example:8443/analytics"


class FakeHttpClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes | None]] = []

    def command(self, sql: str, parameters: object = None, data: bytes | None = None) -> None:
        self.calls.append((sql, data))


def test_server_backend_streams_the_json_through_input() -> None:
    wh = ServerWarehouse("http://localhost:8123/db1")
    fake = FakeHttpClient()
    wh._client = fake
    wh.insert_json("t (`a`)", "SELECT JSONExtractString(v, 'a') FROM {source}", [b'{"a":"x"}', b'{"a":"y"}'])
    sql, data = fake.calls[0]
    assert sql == "INSERT INTO t (`a`) SELECT JSONExtractString(v, 'a') FROM input('v String') FORMAT JSONAsString"
    assert data == b'{"a":"x"}\n{"a":"y"}'


def test_only_data_errors_are_blamed_on_messages() -> None:
    from connectors.warehouse import WarehouseError
    from stream.loader import is_data_error

    assert is_data_error(WarehouseError("Code: 395. DB::Exception: a change message without its required fields"))
    assert is_data_error(WarehouseError("Code: 117. DB::Exception: JSON object must begin with '{'"))
    assert not is_data_error(WarehouseError("Code: 252. DB::Exception: Too many parts (300)"))
    assert not is_data_error(WarehouseError("Code: 241. DB::Exception: Memory limit (total) exceeded"))
    assert not is_data_error(WarehouseError("connection refused"))


def test_warehouse_errors_keep_the_engine_code() -> None:
    from clickhouse_connect.driver.exceptions import DatabaseError

    from connectors.warehouse import _wrap

    assert WarehouseError("Code: 252. DB::Exception: Too many parts (300)").code == 252
    assert WarehouseError("connection refused").code is None
    assert WarehouseError("anything", code=159).code == 159
    # clickhouse-connect's own code wins, also when the message hides it (show_clickhouse_errors off).
    hidden = _wrap(DatabaseError("The ClickHouse server returned an error", code=241))
    assert (hidden.code, str(hidden)) == (241, "The ClickHouse server returned an error")
    assert _wrap(ValueError("Code: 117. DB::Exception: bad\n  JSON")).code == 117


def test_embedded_engine_errors_carry_their_code(tmp_path: Path) -> None:
    from stream.loader import is_data_error

    with EmbeddedWarehouse(tmp_path / "d") as wh:
        with pytest.raises(WarehouseError) as missing:
            wh.rows("SELECT * FROM no_such_table")
        assert missing.value.code == 60 and "\n" not in str(missing.value)  # UNKNOWN_TABLE
        assert not is_data_error(missing.value)
        with pytest.raises(WarehouseError) as thrown:
            wh.command("SELECT throwIf(1, 'a change message without its required fields')")
        assert thrown.value.code == 395 and is_data_error(thrown.value)


def tables_and_columns(wh: EmbeddedWarehouse) -> dict[str, list[str]]:
    rows = wh.rows(
        "SELECT table, groupArray(name) FROM (SELECT table, name FROM system.columns "
        "WHERE database = currentDatabase() ORDER BY table, position) GROUP BY table ORDER BY table"
    )
    return {t: list(cols) for t, cols in rows}


@pytest.mark.parametrize("engine", ["Atomic", "Ordinary"])
def test_exchange_swaps_two_tables_with_or_without_exchange_tables(tmp_path: Path, engine: str) -> None:
    """The one swap: EXCHANGE TABLES on an Atomic database, the documented RENAME fallback on one without it."""
    with EmbeddedWarehouse(tmp_path / "d") as wh:
        wh.command("SET allow_deprecated_database_ordinary = 1")
        wh.command(f"CREATE DATABASE swapdb ENGINE = {engine}")
    with EmbeddedWarehouse(tmp_path / "d", database="swapdb") as wh:
        assert wh.rows("SELECT engine FROM system.databases WHERE name = currentDatabase()") == [(engine,)]
        wh.command("CREATE TABLE live (old UInt8) ENGINE = MergeTree ORDER BY old")
        wh.command("CREATE TABLE live__next (new UInt8) ENGINE = MergeTree ORDER BY new")
        wh.command("INSERT INTO live VALUES (1)")
        wh.command("INSERT INTO live__next VALUES (2), (3)")
        wh.exchange("live", "live__next")
        assert wh._atomic_exchange is (engine == "Atomic")
        assert tables_and_columns(wh) == {"live": ["new"], "live__next": ["old"]}
        assert wh.rows("SELECT sum(new) FROM live") == [(5,)]
        wh.exchange("live", "live__next")  # and back: no leftover name in the way
        assert tables_and_columns(wh) == {"live": ["old"], "live__next": ["new"]}


def test_loader_problem_classes_are_the_routers_vocabulary() -> None:
    """One DLQ vocabulary (docs/CONTRACTS.md): the loader's classes are the router's where the cause is the same."""
    from connectors.sequin import ERROR_CLASSES
    from stream.row_sql import LOADER_ONLY_CLASSES, classify_problem

    cases = {
        b"": "tombstone",
        b"{nope": "not_json",
        b"[1]": "not_object",
        orjson.dumps({"action": "upsert", "record": {}}): "unknown_action",
        orjson.dumps({"action": "insert", "record": None}): "no_record",
        orjson.dumps({"action": "insert", "record": {"id": ""}}): "missing_column",
        orjson.dumps({"action": "insert", "record": {"id": "r1", "enabled": "maybe"}}): "bad_column",
        orjson.dumps({"action": "insert", "record": {"id": "r1", "updatedAt": "yesterday"}}): "bad_timestamp",
        orjson.dumps({"action": "delete", "record": {"id": "r1"}}): "no_version",
    }
    for value, want in cases.items():
        found = classify_problem(value, "repositories")
        assert found is not None and found[0] == want, (value, found)
        assert found[0] in ERROR_CLASSES or found[0] in LOADER_ONLY_CLASSES
