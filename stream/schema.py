"""Warehouse schema for N buckets: idempotent DDL, the names of PIPELINE.md, the rows of CONTRACTS.md.

``ensure_schema(wh, buckets)`` creates what is missing and (re)defines the views for the warehouse's bucket count
(recorded on first use; a different ``buckets`` is refused, see ``BucketCountMismatch``); running it again
changes nothing. Tables (all in the warehouse's database):

Raw bucket ``activityRelations_bucket_MV_ds_{n}``: the 23 activity columns + ``_deleted UInt8`` +
``_version UInt64`` (= toUnixTimestamp64Milli(updatedAt) * 2 + _deleted), ReplacingMergeTree(_version,
_deleted), PARTITION BY toYear(createdAt), ORDER BY (segmentId, timestamp, type, platform, channel, sourceId).
``SELECT … FROM t FINAL`` gives exactly the live rows. Raw and reference tables fsync each inserted part
(``fsync_after_insert``): the loader commits Kafka offsets after an insert returns.

Reference tables, each ReplacingMergeTree(_version, _deleted) ORDER BY id, same ``_version`` rule
(updatedAt, or the message's commit_timestamp when the record has none, e.g. a key-only delete)::

    members          (id String, attributes String, isBot UInt8, isTeamMember UInt8, isOrganization UInt8,
                      displayName String, joinedAt DateTime64(3,'UTC'), createdAt DateTime64(3,'UTC'),
                      updatedAt DateTime64(3,'UTC'), _deleted UInt8, _version UInt64)
    organizations    (id String, displayName String, location String, country String,
                      createdAt …, updatedAt …, _deleted, _version)
    repositories     (id String, url String, segmentId String, insightsProjectId String,
                      sourceIntegrationId String, enabled UInt8 DEFAULT 1, excluded UInt8, archived UInt8,
                      deletedAt Nullable(DateTime64(3,'UTC')), createdAt …, updatedAt …, _deleted, _version)
    insightsProjects (id String, name String, slug String, segmentId String, enabled UInt8 DEFAULT 1,
                      deletedAt Nullable(DateTime64(3,'UTC')), createdAt …, updatedAt …, _deleted, _version)
    integrations     (id String, platform LowCardinality(String), segmentId String,
                      deletedAt Nullable(DateTime64(3,'UTC')), createdAt …, updatedAt …, _deleted, _version)

Read them with ``FINAL`` (deleted rows vanish). ``members.attributes`` is the JSON text of the record's
attributes; the three flags come from ``attributes.<flag>.default`` (0 when absent).

Cleaned bucket ``activityRelations_deduplicated_cleaned_bucket_{n}_ds``: the 23 columns + gitChangedLines
UInt64, gitChangedLinesBucket String, organizationCountryCode LowCardinality(String), organizationName String,
snapshotId DateTime('UTC') (``CLEANED_NAMES``), then ``_deleted UInt8`` and ``_version UInt64``;
ReplacingMergeTree(_version, _deleted) ORDER BY the raw identity (segmentId, timestamp, type, platform,
channel, sourceId): one cleaned row per raw row, corrected in place by stream/incremental.py (a newer
``_version`` replaces, ``_deleted = 1`` retracts). Read it with ``FINAL`` (the views do). ``cleaned_columns_ddl()``
gives its column list for a table built aside.

Views (each reads the cleaned buckets ``FINAL`` and shows the 28 ``CLEANED_NAMES`` columns):
``activityRelations_deduplicated_cleaned_bucket_union`` (all cleaned buckets),
``activityRelations_bucket_routing(bucketId=n)`` (one cleaned bucket; an id outside 0..N-1 raises
"invalid bucketId"), ``project_buckets(project='slug')`` → (project, projectId, segmentId, bucketId) for the
enabled, not-deleted insightsProject; no rows otherwise. ``bucketer_settings`` records the bucket count.
"""

from __future__ import annotations

from typing import Any, Protocol

from connectors.model import (
    ACTIVITY_COLUMNS,
    CLEANED_EXTRA,
    CLEANED_ORDER,
    PARTITION_KEY,
    REFERENCE_COLUMNS,
    REFERENCE_KEY,
    SORT_KEY,
    VERSION_COLUMNS,
    Column,
    bucket_sql,
)
from connectors.model import ACTIVITY_NAMES as ACTIVITY_NAMES  # re-exported: the schema's readers import it here
from connectors.warehouse import schema_command
from stream.buckets import cleaned_table, raw_table
from stream.cdc import fill_index, index_ddl, index_exists, rebuild_index

UNION_VIEW = "activityRelations_deduplicated_cleaned_bucket_union"
ROUTING_VIEW = "activityRelations_bucket_routing"
PROJECT_VIEW = "project_buckets"
SETTINGS_TABLE = "bucketer_settings"

# The 28 columns a reader sees in a cleaned bucket (not ``_deleted``/``_version``).
CLEANED_NAMES = ACTIVITY_NAMES + tuple(c.name for c in CLEANED_EXTRA)


class _Commands(Protocol):
    def command(self, sql: str, params: None = None) -> None: ...

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]: ...


def _cols(columns: tuple[Column, ...]) -> str:
    return ",\n    ".join(
        f"`{c.name}` {c.type}" + (f" DEFAULT {c.default}" if c.default is not None else "") for c in columns
    )


# The loader commits Kafka offsets once an insert returns: the parts must be on disk by then, not only in
# the page cache, or a power loss after the commit would lose rows that Kafka no longer replays.
DURABLE = "SETTINGS fsync_after_insert = 1, fsync_part_directory = 1"


def raw_table_ddl(n: int) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {raw_table(n)} (\n    {_cols(ACTIVITY_COLUMNS + VERSION_COLUMNS)}\n)\n"
        f"ENGINE = ReplacingMergeTree(_version, _deleted)\nPARTITION BY {PARTITION_KEY}\n"
        f"ORDER BY ({', '.join(SORT_KEY)})\n{DURABLE}"
    )


def reference_table_ddl(table: str) -> str:
    cols = REFERENCE_COLUMNS[table] + VERSION_COLUMNS
    return (
        f"CREATE TABLE IF NOT EXISTS {table} (\n    {_cols(cols)}\n)\n"
        f"ENGINE = ReplacingMergeTree(_version, _deleted)\nORDER BY {REFERENCE_KEY}\n{DURABLE}"
    )


def stage_columns() -> str:
    """Columns of the loader's in-memory stage: a raw bucket's, plus ``_part`` (which bucket table a row is for)."""
    return _cols(ACTIVITY_COLUMNS + VERSION_COLUMNS + (Column("_part", "UInt32"),))


def cleaned_columns_ddl() -> str:
    """The column list (inside the parentheses) of a cleaned bucket table."""
    return _cols(ACTIVITY_COLUMNS + CLEANED_EXTRA + VERSION_COLUMNS)


CLEANED_ENGINE = "ReplacingMergeTree(_version, _deleted)"


def cleaned_table_ddl(n: int, name: str | None = None) -> str:
    """CREATE TABLE IF NOT EXISTS for cleaned bucket ``n`` (or the same layout under ``name``, built aside)."""
    return (
        f"CREATE TABLE IF NOT EXISTS {name or cleaned_table(n)} (\n    {cleaned_columns_ddl()}\n)\n"
        f"ENGINE = {CLEANED_ENGINE}\nORDER BY ({', '.join(CLEANED_ORDER)})"
    )


def migrate_cleaned_layout(wh: object, buckets: int) -> list[int]:
    """Cleaned buckets still in the layout before incremental maintenance (plain MergeTree, no ``_version``)
    are copied into the current layout aside and swapped in (their rows stay readable, with ``_version`` 0, until
    the maintenance reconciles them). Returns the buckets migrated."""
    done = []
    for n in range(buckets):
        table = cleaned_table(n)
        cols = wh.rows(  # type: ignore[attr-defined]
            "SELECT countIf(name = '_version'), count() FROM system.columns WHERE database = currentDatabase() "
            "AND table = {t:String}",
            {"t": table},
        )
        if not cols or int(cols[0][1]) == 0 or int(cols[0][0]) > 0:
            continue
        aside = f"{table}__layout"
        wh.command(f"DROP TABLE IF EXISTS {aside} SYNC")  # type: ignore[attr-defined]
        wh.command(cleaned_table_ddl(n, aside))  # type: ignore[attr-defined]
        wh.command(f"INSERT INTO {aside} SELECT {cleaned_select_list()}, 0, 0 FROM {table}")  # type: ignore[attr-defined]
        wh.command(f"RENAME TABLE {table} TO {table}__old_layout, {aside} TO {table}")  # type: ignore[attr-defined]
        wh.command(f"DROP TABLE IF EXISTS {table}__old_layout SYNC")  # type: ignore[attr-defined]
        done.append(n)
    return done


def cleaned_select_list() -> str:
    """The 28 reader-visible columns of a cleaned bucket (not ``_deleted``/``_version``)."""
    return ", ".join(f"`{c}`" for c in CLEANED_NAMES)


def union_view_ddl(buckets: int) -> str:
    cols = cleaned_select_list()
    parts = "\nUNION ALL\n".join(f"SELECT {cols} FROM {cleaned_table(n)} FINAL" for n in range(buckets))
    return f"CREATE OR REPLACE VIEW {UNION_VIEW} AS\n{parts}"


def routing_view_ddl(buckets: int) -> str:
    """``activityRelations_bucket_routing(bucketId = n)``: cleaned bucket n, or an error for an invalid id.

    A ``merge()`` over the cleaned bucket tables filtered on ``_table`` reads only the chosen table (the Merge
    engine prunes tables by ``_table`` before reading). The check is a constant expression, so it is folded
    before any table is touched and fires even on empty buckets. (A UNION ALL of N branches each guarded by a
    scalar subquery cost twice the union view itself; measured in bench/bench_enrich.py.)"""
    pattern = cleaned_table(0).replace("_0_", "_[0-9]+_")
    check = (
        f"throwIf(NOT ({{bucketId:Int64}} BETWEEN 0 AND {buckets - 1}), "
        f"'invalid bucketId: expected an integer from 0 to {buckets - 1}')"
    )
    table = cleaned_table(0).replace("_0_", "_', toString({bucketId:Int64}), '_")
    return (
        f"CREATE OR REPLACE VIEW {ROUTING_VIEW} AS\n"
        f"SELECT {cleaned_select_list()} FROM merge(currentDatabase(), '^{pattern}$') FINAL\n"
        f"WHERE {check} = 0 AND _table = concat('{table}')"
    )


def project_view_ddl(buckets: int) -> str:
    return (
        f"CREATE OR REPLACE VIEW {PROJECT_VIEW} AS\n"
        f"SELECT slug AS project, id AS projectId, segmentId,\n"
        f"       toUInt32({bucket_sql('segmentId', buckets)}) AS bucketId\n"
        f"FROM insightsProjects FINAL\n"
        f"WHERE slug = {{project:String}} AND enabled = 1 AND deletedAt IS NULL"
    )


def settings_ddl() -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {SETTINGS_TABLE} (key String, value String, at DateTime64(3, 'UTC') "
        f"DEFAULT now64(3)) ENGINE = ReplacingMergeTree(at) ORDER BY key"
    )


def schema_statements(buckets: int) -> list[str]:
    """Every statement ``ensure_schema`` runs, in order."""
    if buckets < 1:
        raise ValueError(f"the number of buckets must be at least 1, got {buckets}")
    out = [settings_ddl()]
    out += [reference_table_ddl(t) for t in REFERENCE_COLUMNS]
    out += [raw_table_ddl(n) for n in range(buckets)]
    out += index_ddl(buckets)  # the activity index of key-only deletes and toast values (stream/cdc.py)
    out += [cleaned_table_ddl(n) for n in range(buckets)]
    out += [union_view_ddl(buckets), routing_view_ddl(buckets), project_view_ddl(buckets)]
    return out


DEFAULT_BUCKETS = 10  # a new warehouse's bucket count when none is given


class BucketCountMismatch(ValueError):
    """A bucket count was asked for that is not the one the warehouse is set up for (only rebucket changes it)."""

    def __init__(self, recorded: int, asked: int) -> None:
        super().__init__(
            f"the warehouse is set up for {recorded} buckets, not {asked}; "
            f"change it with `bucketer rebucket --to {asked}`"
        )
        self.recorded = recorded
        self.asked = asked


def ensure_schema(wh: _Commands, buckets: int | None, *, allow_change: bool = False) -> int:
    """Create what is missing and (re)define the views; return the warehouse's bucket count N. Idempotent.

    The warehouse owns N: it is the recorded count when there is one (``buckets=None`` means "whatever it
    is"), and a ``buckets`` that differs raises :class:`BucketCountMismatch` before anything is touched,
    unless ``allow_change`` (``bucketer rebucket`` alone, after it has moved the rows). A new warehouse takes
    ``buckets``, else DEFAULT_BUCKETS. The settings row is written only when N changes."""
    recorded = bucket_count(wh)
    if buckets is not None and recorded is not None and buckets != recorded and not allow_change:
        raise BucketCountMismatch(recorded, buckets)
    n = buckets if buckets is not None else (recorded if recorded is not None else DEFAULT_BUCKETS)
    if _has_settings(wh):  # an existing warehouse: cleaned buckets of an older layout move to the current one
        migrate_cleaned_layout(wh, recorded if recorded is not None else n)
    new_index = not index_exists(wh)
    for sql in schema_statements(n):
        schema_command(wh, sql)  # ON CLUSTER, Replicated engines, on a server cluster (connectors/warehouse.py)
    if new_index:
        fill_index(wh, n)
    elif recorded is not None and n != recorded:
        rebuild_index(wh, n, schema_command)  # the raw buckets were replaced: views and _bucket anew
    if n != recorded:
        # ReplacingMergeTree(at) keeps the row with the latest ``at``: make the new one strictly later than any
        # before it, so a change within the same millisecond as the last one (or after a clock step) still wins.
        wh.command(
            f"INSERT INTO {SETTINGS_TABLE} (key, value, at) SELECT 'buckets', '{int(n)}', "
            f"greatest(now64(3), (SELECT max(at) FROM {SETTINGS_TABLE} WHERE key = 'buckets') "
            f"+ toIntervalMillisecond(1))"
        )
    return n


def bucket_count(wh: object) -> int | None:
    """The bucket count the schema was last set up for, or None when there is no schema yet."""
    rows = (
        wh.rows(  # type: ignore[attr-defined]
            f"SELECT value FROM {SETTINGS_TABLE} FINAL WHERE key = 'buckets'"
        )
        if _has_settings(wh)
        else []
    )
    return int(rows[0][0]) if rows else None


def _has_settings(wh: object) -> bool:
    rows = wh.rows(  # type: ignore[attr-defined]
        "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
        {"t": SETTINGS_TABLE},
    )
    return bool(rows and rows[0][0])
