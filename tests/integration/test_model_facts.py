"""The data model's facts as the real engine reports them: a warehouse built by ``ensure_schema`` on the embedded
ClickHouse engine (chdb) is asked, through ``system.tables`` and ``system.columns``, for its sort keys and
columns, and the decoder's retirements and the generated Tinybird project are held to what it says."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from connectors import sequin
from connectors.warehouse import EmbeddedWarehouse
from stream.buckets import cleaned_table, raw_table
from stream.schema import ensure_schema
from stream.tinybird_project import generate_project

N = 3
REFERENCE = ("members", "organizations", "repositories", "insightsProjects", "integrations")


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedWarehouse]:
    with EmbeddedWarehouse(tmp_path_factory.mktemp("model") / "data") as wh:
        ensure_schema(wh, N)
        yield wh


def columns_of(wh: EmbeddedWarehouse, database: str, table: str) -> list[tuple[str, str]]:
    rows = wh.rows(
        "SELECT name, type FROM system.columns WHERE database = {d:String} AND table = {t:String} ORDER BY position",
        {"d": database, "t": table},
    )
    assert rows, f"{database}.{table} has no columns"
    return [(str(n), str(t)) for n, t in rows]


# --- (a) the sort key of retirements is the raw tables' ORDER BY ----------------------------------------------
def a_row() -> dict[str, object]:
    return {
        "activityId": "a-1",
        "conversationId": "c-1",
        "createdAt": "2025-03-01T10:00:00.000000Z",
        "updatedAt": "2025-03-01T10:00:00.000000Z",
        "memberId": "m-1",
        "objectMemberId": "",
        "objectMemberUsername": "",
        "organizationId": "o-1",
        "parentId": "",
        "platform": "github",
        "segmentId": "seg-1",
        "username": "u",
        "sourceId": "src-1",
        "type": "pull_request-opened",
        "timestamp": "2025-03-01T10:00:00.000000Z",
        "sourceParentId": "",
        "channel": "https://github.com/o/r",
        "sentimentScore": 3,
        "gitInsertions": 1,
        "gitDeletions": 2,
        "score": 1,
        "isContribution": 1,
        "pullRequestReviewState": "",
    }


def old_value(name: str, ctype: str) -> object:
    """Another valid value of a column of type ``ctype`` (what ``changes`` holds: the old value)."""
    if ctype.startswith("DateTime64"):
        return "2024-01-02T03:04:05.000000Z"
    if "String" in ctype:
        return f"old-{name}"
    return 0


def test_the_decoders_sort_key_is_the_raw_tables_order_by(warehouse: EmbeddedWarehouse) -> None:
    keys = warehouse.rows(
        "SELECT name, sorting_key FROM system.tables "
        "WHERE database = currentDatabase() AND startsWith(name, {p:String})",
        {"p": raw_table(0)[:-1]},
    )
    assert sorted(str(n) for n, _ in keys) == sorted(raw_table(n) for n in range(N))
    order_by = {str(k) for _, k in keys}
    assert order_by == {", ".join(sequin.SORT_KEY)}, order_by
    # And by behaviour: an update whose ``changes`` alter one column retires the old row exactly when ClickHouse
    # has that column in the ORDER BY (otherwise the ReplacingMergeTree row is replaced in place).
    ch_key = {c.strip() for c in order_by.pop().split(",")}
    columns = [c for c in columns_of(warehouse, warehouse.database, raw_table(0)) if not c[0].startswith("_")]
    assert len(columns) == 23
    for name, ctype in columns:
        value = orjson.dumps(
            {"action": "update", "record": a_row(), "changes": {name: old_value(name, ctype)}, "metadata": {}}
        )
        change = sequin.decode(value, "t", 0, 7)
        assert (change.retirement is not None) == (name in ch_key), name
        if change.retirement is not None:
            assert change.retirement.reason == ("segment_move" if name == "segmentId" else "sort_key_change")


# --- (b) the Tinybird datafiles have the warehouse's columns --------------------------------------------------
def datafile_columns(text: str) -> list[tuple[str, str]]:
    schema = text.split("SCHEMA >\n", 1)[1].split("\n\n", 1)[0]
    out = []
    for line in schema.splitlines():
        m = re.match(r"\s*`(\w+)` (.+?)(?: `json:[^`]+`)?(?: DEFAULT .+?)?,?$", line)
        assert m, line
        out.append((m[1], m[2]))
    return out


# Intended differences, and only these:
# - ``action`` and ``commitTimestamp`` exist only in Tinybird: there the datasource's own DEFAULT expressions
#   compute ``_deleted`` and ``_version`` from them at ingestion, where the warehouse's loader computes both in
#   its insert SQL (stream/row_sql.py) and stores neither.
# - Tinybird's DateTime64/DateTime columns are written without a time zone (the workspace's default, UTC); the
#   warehouse names 'UTC'. The stored instants are the same; only the parsing and display zone is implicit.
# - The warehouse's cleaned buckets carry ``_deleted`` and ``_version`` (ReplacingMergeTree, corrected in place by
#   stream/incremental.py); Tinybird's cleaned datasources are replaced whole by the hourly copy (the anchor's
#   design) and have neither.
TINYBIRD_ONLY = ("action", "commitTimestamp")
WAREHOUSE_CLEANED_ONLY = ("_deleted", "_version")


ZONED = {
    "DateTime64(3)": "DateTime64(3, 'UTC')",
    "Nullable(DateTime64(3))": "Nullable(DateTime64(3, 'UTC'))",
    "DateTime": "DateTime('UTC')",
}


def test_tinybird_datafiles_have_the_warehouses_columns(warehouse: EmbeddedWarehouse) -> None:
    files = generate_project(N)
    tables = [raw_table(n) for n in range(N)] + [cleaned_table(n) for n in range(N)] + list(REFERENCE)
    warehouse.command("CREATE DATABASE IF NOT EXISTS tinybird_model")
    for table in tables:
        cols = [c for c in datafile_columns(files[f"datasources/{table}.datasource"]) if c[0] not in TINYBIRD_ONLY]
        # ClickHouse itself reads the datafile's types: each must be a valid type, and is compared as it reports it.
        body = ", ".join(f"`{n}` {t}" for n, t in cols)
        warehouse.command(f"CREATE TABLE tinybird_model.`{table}` ({body}) ENGINE = Memory")
        tinybird = [(n, ZONED.get(t, t)) for n, t in columns_of(warehouse, "tinybird_model", table)]
        ours = columns_of(warehouse, warehouse.database, table)
        if table.startswith("activityRelations_deduplicated_cleaned"):
            ours = [c for c in ours if c[0] not in WAREHOUSE_CLEANED_ONLY]
        assert tinybird == ours, table
    # the generated project has no other datasource of an activity or reference table
    generated = {Path(p).stem for p in files if p.startswith("datasources/")}
    assert generated - set(tables) == {"activityRelations", "organization_country_codes"}
