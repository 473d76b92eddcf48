"""The Tinybird project (datafiles) for N buckets, generated: ``generate_project(n) -> {path: text}``.

Contract (CLEANED_BUCKETS.md, TINYBIRD.md, PIPELINE.md names):
- ``datasources/activityRelations.datasource``: the source, JSONPaths ``$.record.*`` plus ``$.action`` and
  ``$.metadata.commit_timestamp``.
- ``datasources/activityRelations_bucket_MV_ds_{n}.datasource``: a raw bucket, the same JSONPaths (the
  router's Tinybird sink appends Sequin messages to it directly), ReplacingMergeTree with ENGINE_VER
  ``_version`` and ENGINE_IS_DELETED ``_deleted`` (**differs** from the anchor: deletes and the router's
  retirements make the old row disappear from FINAL); ``_version`` = updatedAt in ms * 2 + _deleted, so a
  delete of the same updatedAt wins whatever the arrival order.
- ``pipes/activityRelations_bucket_MV_{n}.pipe``: the bucketing materialized view, source -> bucket n.
- ``pipes/activityRelations_bucket_snapshot_{n}.pipe``: on-demand COPY (append) of the source into bucket n
  (bootstrap).
- ``pipes/activityRelations_deduplicated_cleaned_bucket_{n}.pipe``: the hourly cleaning COPY (replace) at
  minute ``(10 + 4 * (n // 2)) % 60`` into ``datasources/activityRelations_deduplicated_cleaned_bucket_{n}_ds``.
- ``pipes/activityRelations_deduplicated_cleaned_bucket_union.pipe``, ``pipes/activityRelations_bucket_routing.pipe``
  (an invalid ``bucketId`` fails with throwIf, never falls back to bucket 0), ``pipes/project_buckets.pipe``.
- The reference data sources (members, organizations, repositories, insightsProjects, integrations) and
  ``organization_country_codes`` (country, location) -> ISO code, filled by bucketer's country resolver
  (connectors/countries.py), which the cleaning pipes join: Tinybird runs no Python.

Pure and deterministic: same N, same bytes. Files that do not depend on N are the same for every N.
"""

from __future__ import annotations

from pathlib import Path

from connectors.countries import UNKNOWN
from connectors.model import (
    ACTIVITY_COLUMNS,
    ACTIVITY_NAMES,
    ACTIVITY_REQUIRED,
    ANCHOR_CLEANED_ORDER,
    CLEANED_EXTRA,
    EMPTY_ATTRIBUTES,
    GERRIT,
    GIT_PLATFORMS,
    MEMBER_ATTRIBUTES,
    NULLABLE_TS,
    PARTITION_KEY,
    REFERENCE_COLUMNS,
    REFERENCE_KEY,
    SORT_KEY,
    bucket_sql,
    gerrit_variant_sql,
    is_timestamp,
    slot_minute,
)
from connectors.model import TS as WAREHOUSE_TS
from connectors.model import Column as ModelColumn
from connectors.topics import SOURCE
from stream.buckets import cleaned_table, raw_table
from stream.cleaning import changed_lines_bucket_sql
from stream.schema import PROJECT_VIEW as PROJECT_PIPE
from stream.schema import ROUTING_VIEW as ROUTING_PIPE
from stream.schema import UNION_VIEW as UNION_PIPE

COUNTRY_DS = "organization_country_codes"
# Tinybird's DateTime64/DateTime columns carry no time zone here; the warehouse's are explicitly UTC.
TS = "DateTime64(3)"
TINYBIRD_TYPES = {WAREHOUSE_TS: TS, NULLABLE_TS: f"Nullable({TS})", "DateTime('UTC')": "DateTime"}
INDENT = "    "

# (column, type, JSONPath or None, DEFAULT or None)
Column = tuple[str, str, str | None, str | None]


def tinybird_type(ctype: str) -> str:
    """The Tinybird datafile type of a warehouse column type (connectors/model.py)."""
    return TINYBIRD_TYPES.get(ctype, ctype)


def _column(c: ModelColumn, required: tuple[str, ...]) -> Column:
    """A model column as a Tinybird schema line: the same name, type and JSONPath. A JSONPath that is absent
    in a message takes the DEFAULT, so every optional column has one (the warehouse's, else the type's zero);
    required columns and timestamps have none (a message without them is quarantined)."""
    if c.name in required or is_timestamp(c.type):
        default = None
    elif c.name == MEMBER_ATTRIBUTES:
        default = f"'{EMPTY_ATTRIBUTES}'"
    elif c.default is not None:
        default = c.default
    else:
        default = "''" if "String" in c.type else "0"
    return (c.name, tinybird_type(c.type), c.path, default)


ACTIVITY: tuple[Column, ...] = tuple(_column(c, ACTIVITY_REQUIRED) for c in ACTIVITY_COLUMNS)
CHANGE: tuple[Column, ...] = (
    ("action", "LowCardinality(String)", "$.action", "'insert'"),
    ("commitTimestamp", TS, "$.metadata.commit_timestamp", None),
)
VERSIONED: tuple[Column, ...] = (
    ("_deleted", "UInt8", None, "if(action = 'delete', 1, 0)"),
    (
        "_version",
        "UInt64",
        None,
        "toUInt64(toUnixTimestamp64Milli(if(toUnixTimestamp64Milli(updatedAt) = 0, commitTimestamp, updatedAt))) "
        "* 2 + _deleted",
    ),
)
REFERENCE: dict[str, tuple[Column, ...]] = {
    table: tuple(_column(c, (REFERENCE_KEY,)) for c in cols) for table, cols in REFERENCE_COLUMNS.items()
}
CLEANED: tuple[Column, ...] = tuple(
    (c.name, tinybird_type(c.type), None, None) for c in ACTIVITY_COLUMNS + CLEANED_EXTRA
)
COUNTRY: tuple[Column, ...] = (
    ("country", "String", "$.country", "''"),
    ("location", "String", "$.location", "''"),
    ("code", "LowCardinality(String)", "$.code", f"'{UNKNOWN}'"),
    ("resolverVersion", "UInt32", "$.resolverVersion", "0"),
)


def cleaning_minute(bucket: int) -> int:
    """The warehouse's default schedule slot (connectors/model.py): 0-1 at :10, 2-3 at :14, ..., wrapping past :59."""
    return slot_minute(bucket)


# --- datafile text -------------------------------------------------------------------------------------------
def _schema(columns: tuple[Column, ...]) -> str:
    lines = []
    for name, ctype, path, default in columns:
        text = f"`{name}` {ctype}"
        if path:
            text += f" `json:{path}`"
        if default is not None:
            text += f" DEFAULT {default}"
        lines.append(INDENT + text)
    return "SCHEMA >\n" + ",\n".join(lines) + "\n"


def _datasource(description: str, columns: tuple[Column, ...], engine: list[tuple[str, str]]) -> str:
    out = f"DESCRIPTION >\n{INDENT}{description}\n\n{_schema(columns)}\n"
    out += "".join(f'{key} "{value}"\n' for key, value in engine)
    return out


def _rmt(sorting: str, ver: str, is_deleted: str | None = None, partition: str | None = None) -> list[tuple[str, str]]:
    out = [("ENGINE", "ReplacingMergeTree")]
    if partition:
        out.append(("ENGINE_PARTITION_KEY", partition))
    out += [("ENGINE_SORTING_KEY", sorting), ("ENGINE_VER", ver)]
    if is_deleted:
        out.append(("ENGINE_IS_DELETED", is_deleted))
    return out


def _node(name: str, sql: str, description: str | None = None) -> str:
    body = "\n".join(INDENT + line if line else "" for line in sql.strip("\n").split("\n"))
    desc = f"DESCRIPTION >\n{INDENT}{description}\n\n" if description else ""
    return f"NODE {name}\n{desc}SQL >\n{body}\n"


def source_datasource() -> str:
    return _datasource(
        "Sequin changes of activityRelations (one JSON message per row: $.record.*).",
        ACTIVITY + CHANGE,
        _rmt(", ".join(SORT_KEY), "updatedAt", partition=PARTITION_KEY),
    )


def raw_bucket_datasource(n: int) -> str:
    return _datasource(
        f"Raw bucket {n}: cityHash64(segmentId) % N = {n}. Deletes and the router's retirements "
        "set _deleted, so FINAL keeps exactly the live rows.",
        ACTIVITY + CHANGE + VERSIONED,
        _rmt(", ".join(SORT_KEY), "_version", "_deleted", partition=PARTITION_KEY),
    )


def cleaned_datasource(n: int) -> str:
    return _datasource(
        f"Cleaned bucket {n}: rebuilt hourly (replace) by {cleaning_pipe_name(n)}.pipe.",
        CLEANED,
        [("ENGINE", "MergeTree"), ("ENGINE_SORTING_KEY", ", ".join(ANCHOR_CLEANED_ORDER))],
    )


def reference_datasource(table: str) -> str:
    return _datasource(
        f"Sequin changes of {table} ($.record.*); FINAL gives the latest live row per id.",
        REFERENCE[table] + CHANGE + VERSIONED,
        _rmt(REFERENCE_KEY, "_version", "_deleted"),
    )


def country_datasource() -> str:
    return _datasource(
        f"(country, location) -> ISO 3166-1 alpha-2 ('{UNKNOWN}' unknown), appended by bucketer's "
        "country resolver for every pair of organizations.",
        COUNTRY,
        _rmt("country, location", "resolverVersion"),
    )


def _bucket_filter(n: int, buckets: int) -> str:
    return f"{bucket_sql('segmentId', buckets)} = {n}"


def materialized_pipe(n: int, buckets: int) -> str:
    sql = f"SELECT *\nFROM {SOURCE}\nWHERE {_bucket_filter(n, buckets)}"
    return _node(f"bucket_{n}_of_{buckets}", sql) + f"\nTYPE MATERIALIZED\nDATASOURCE {raw_table(n)}\n"


def snapshot_pipe(n: int, buckets: int) -> str:
    sql = f"SELECT *\nFROM {SOURCE}\nWHERE {_bucket_filter(n, buckets)}"
    return (
        _node(f"snapshot_bucket_{n}", sql, f"Bootstrap: copy the source's rows of bucket {n} into it.")
        + f"\nTYPE COPY\nTARGET_DATASOURCE {raw_table(n)}\nCOPY_MODE append\nCOPY_SCHEDULE @on-demand\n"
    )


def gerrit_variant(url: str) -> str:
    """The query-URL variant of a (lower-cased) gerrit repository url, as SQL (the model's rule, one branch a line)."""
    return gerrit_variant_sql(url, ",\n        ")


def cleaning_pipe(n: int) -> str:
    p = f"b{n}_"
    git = ", ".join(f"'{x}'" for x in GIT_PLATFORMS)
    cols = ",\n    ".join(f"a.{c} AS {c}" for c in ACTIVITY_NAMES)
    nodes = [
        _node(
            f"{p}allowed_repositories",
            """
SELECT lower(r.url) AS url, r.segmentId AS segmentId, r.sourceIntegrationId AS integrationId
FROM repositories AS r FINAL
WHERE r._deleted = 0 AND r.enabled = 1 AND r.deletedAt IS NULL
  AND r.insightsProjectId IN (
      SELECT id FROM insightsProjects FINAL WHERE _deleted = 0 AND enabled = 1 AND deletedAt IS NULL)""",
            "Enabled, not deleted repositories of enabled, not deleted projects (excluded/archived kept).",
        ),
        _node(
            f"{p}allowed_channels",
            f"""
SELECT url AS channel, segmentId FROM {p}allowed_repositories
UNION ALL
SELECT {gerrit_variant("url")} AS channel, segmentId
FROM {p}allowed_repositories
WHERE integrationId IN (SELECT id FROM integrations FINAL WHERE _deleted = 0 AND platform = '{GERRIT}')""",
            "(lower(url), segmentId) pairs, plus the /q/project: variant for gerrit repositories.",
        ),
        _node(
            f"{p}organizations",
            f"""
SELECT o.id AS id, o.displayName AS displayName, if(c.code = '', '{UNKNOWN}', c.code) AS code
FROM (SELECT id, displayName, country, location FROM organizations FINAL WHERE _deleted = 0) AS o
LEFT JOIN (SELECT country, location, code FROM {COUNTRY_DS} FINAL) AS c
    ON c.country = o.country AND c.location = o.location""",
            "Latest organization name and its ISO country code (resolved by bucketer).",
        ),
        _node(
            f"{p}cleaned",
            f"""
SELECT
    {cols},
    toUInt64(a.gitInsertions) + toUInt64(a.gitDeletions) AS gitChangedLines,
    {changed_lines_bucket_sql("gitChangedLines")} AS gitChangedLinesBucket,
    if(o.code = '', '{UNKNOWN}', o.code) AS organizationCountryCode,
    o.displayName AS organizationName,
    toStartOfHour(now()) AS snapshotId
FROM (SELECT * FROM {raw_table(n)} FINAL WHERE _deleted = 0) AS a
LEFT JOIN {p}organizations AS o ON o.id = a.organizationId
WHERE a.memberId IN (
        SELECT id FROM members FINAL
        WHERE _deleted = 0 AND isBot = 0 AND isTeamMember = 0 AND isOrganization = 0)
  AND (a.platform NOT IN ({git})
       OR (lower(a.channel), a.segmentId) IN (SELECT channel, segmentId FROM {p}allowed_channels))
SETTINGS join_use_nulls = 0""",
            f"Cleaned bucket {n}: real members only, git activities of allowed channels only.",
        ),
    ]
    tail = (
        f"\nTYPE COPY\nTARGET_DATASOURCE {cleaned_table(n)}\nCOPY_MODE replace\n"
        f"COPY_SCHEDULE {cleaning_minute(n)} * * * *\n"
    )
    return "\n\n".join(nodes) + tail


def _placed(n: int, buckets: int, placement: bool) -> str:
    """`` WHERE``/`` AND`` filter keeping the rows that belong to bucket n, when ``placement`` (the migration's
    transitional readers: a cleaned bucket may still hold rows that moved to another bucket)."""
    return f" AND {_bucket_filter(n, buckets)}" if placement else ""


def union_pipe(buckets: int, placement: bool = False) -> str:
    sql = "\nUNION ALL\n".join(
        f"SELECT * FROM {cleaned_table(n)}" + (f" WHERE {_bucket_filter(n, buckets)}" if placement else "")
        for n in range(buckets)
    )
    what = f"All {buckets} cleaned buckets, for queries without a project."
    if placement:
        what += " Transitional (re-bucketing): each bucket filtered to its own rows."
    return _node("union_all_buckets", sql, what) + "\nTYPE ENDPOINT\n"


def routing_pipe(buckets: int, placement: bool = False) -> str:
    bid = "{{ Int32(bucketId, -1) }}"
    check = _node(
        "check_bucket_id",
        f"""%
SELECT throwIf(NOT ({bid} BETWEEN 0 AND {buckets - 1}),
               'invalid bucketId: expected an integer from 0 to {buckets - 1}') AS invalid""",
        "Fails the request for a missing or invalid bucketId (never a silent bucket 0).",
    )
    branches = "\nUNION ALL\n".join(
        f"SELECT * FROM {cleaned_table(n)} WHERE {bid} = {n} AND (SELECT invalid FROM check_bucket_id) = 0"
        + _placed(n, buckets, placement)
        for n in range(buckets)
    )
    return check + "\n\n" + _node("route", "%\n" + branches, "The cleaned bucket bucketId.") + "\nTYPE ENDPOINT\n"


def project_pipe(buckets: int) -> str:
    sql = f"""%
SELECT slug AS project, id AS projectId, segmentId, {bucket_sql("segmentId", buckets)} AS bucketId
FROM insightsProjects FINAL
WHERE _deleted = 0 AND enabled = 1 AND deletedAt IS NULL AND slug = {{{{ String(project, required=True) }}}}"""
    return (
        _node("project_bucket", sql, "Project slug -> its bucket; no rows for an unknown or disabled project.")
        + "\nTYPE ENDPOINT\n"
    )


def generate_project(buckets: int) -> dict[str, str]:
    """Every datafile of the project for ``buckets`` buckets, by relative path, in a stable order."""
    if buckets < 1:
        raise ValueError(f"the number of buckets must be at least 1, got {buckets}")
    files = {
        f"datasources/{SOURCE}.datasource": source_datasource(),
        f"datasources/{COUNTRY_DS}.datasource": country_datasource(),
    }
    for table in REFERENCE:
        files[f"datasources/{table}.datasource"] = reference_datasource(table)
    for n in range(buckets):
        files[f"datasources/{raw_table(n)}.datasource"] = raw_bucket_datasource(n)
        files[f"datasources/{cleaned_table(n)}.datasource"] = cleaned_datasource(n)
        files[f"pipes/activityRelations_bucket_MV_{n}.pipe"] = materialized_pipe(n, buckets)
        files[f"pipes/activityRelations_bucket_snapshot_{n}.pipe"] = snapshot_pipe(n, buckets)
        files[f"pipes/{cleaning_pipe_name(n)}.pipe"] = cleaning_pipe(n)
    files[f"pipes/{UNION_PIPE}.pipe"] = union_pipe(buckets)
    files[f"pipes/{ROUTING_PIPE}.pipe"] = routing_pipe(buckets)
    files[f"pipes/{PROJECT_PIPE}.pipe"] = project_pipe(buckets)
    return dict(sorted(files.items()))


def cleaning_pipe_name(n: int) -> str:
    return cleaned_table(n)[:-3]


class ProjectBucketsError(ValueError):
    """The project folder already holds another number of buckets (or an inconsistent set of them)."""


def project_buckets(out: Path) -> int | None:
    """N of the project already in ``out`` (its raw bucket datafiles are buckets 0..N-1), or None when ``out``
    holds no bucket datafile. Raises ``ProjectBucketsError`` when the bucket numbers are not 0..N-1."""
    head, tail = raw_table(0)[:-1], ".datasource"
    found = sorted(
        int(name[len(head) : -len(tail)])
        for name in (p.name for p in (out / "datasources").glob(f"{head}*{tail}"))
        if name[len(head) : -len(tail)].isdigit()
    )
    if not found:
        return None
    if found != list(range(len(found))):
        raise ProjectBucketsError(
            f"the Tinybird project in {out} has raw bucket datafiles {found[0]}..{found[-1]} with gaps; "
            f"regenerate it with --rebucket --buckets N"
        )
    return len(found)


def write_project(buckets: int, out: Path, *, rebucket: bool = False) -> list[Path]:
    """Write the files under ``out``. An existing project keeps its N: another ``buckets`` raises
    ``ProjectBucketsError`` unless ``rebucket`` says to change it, which also removes the generated bucket files
    of a larger previous N. Returns the paths."""
    existing = project_buckets(out) if not rebucket else None
    if existing is not None and existing != buckets:
        raise ProjectBucketsError(
            f"the Tinybird project in {out} has {existing} buckets, not {buckets}; to change it, run "
            f"bucketer tinybird generate --rebucket --buckets {buckets} --out {out}"
        )
    files = generate_project(buckets)
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    for sub in ("datasources", "pipes"):
        for stale in sorted((out / sub).glob("activityRelations_*")):
            if str(stale.relative_to(out)) not in files:
                stale.unlink()
    return written
