"""Read-only SQL on the warehouse, one JSON object per row.

``read_only(sql)`` accepts one SELECT (or WITH … SELECT) statement and rejects anything else with
``QueryError``: other statements, several statements, ``INTO OUTFILE``. The query also runs with the
ClickHouse settings of ``QueryLimits`` (``readonly = 1``: the engine refuses writes and table functions that
reach files, the network or other servers; a time limit, a result-rows and a memory limit). Engine errors map
by ClickHouse code to ``QueryForbidden`` (403), ``QueryTimeout`` (408), ``QueryTooLarge`` (413).

``run_query(wh, sql, project=None)`` with a project slug resolves its bucket through ``project_buckets`` (an
unknown, disabled or deleted project is a ``QueryError``), then offers the query:

- ``{bucket}``: replaced by the project's cleaned bucket table (what ``activityRelations_bucket_routing(bucketId
  = n)`` reads, without the view's per-query check: the id comes from ``project_buckets`` and is valid);
- the query parameters ``{bucketId:UInt32}``, ``{segmentId:String}`` and ``{project:String}``.

So ``SELECT count() FROM {bucket} WHERE segmentId = {segmentId:String}`` counts one project's activities
reading one bucket only. ``json_lines(rows)`` turns rows into JSON text lines (timestamps ISO-8601 UTC).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from connectors.warehouse import Warehouse, WarehouseError
from stream.buckets import cleaned_table
from stream.schema import PROJECT_VIEW


class QueryError(ValueError):
    """The query is refused or failed; the message is one line."""

    status = 400


class QueryForbidden(QueryError):
    """A write, several statements, INTO OUTFILE, or a table function that reaches files/network/servers."""

    status = 403


class QueryNotFound(QueryError):
    status = 404


class QueryTimeout(QueryError):
    status = 408


class QueryTooLarge(QueryError):
    status = 413


@dataclass(frozen=True)
class QueryLimits:
    """Per-query engine limits, applied as SETTINGS next to ``readonly = 1``."""

    timeout_s: float = 30.0
    max_result_rows: int = 1_000_000
    max_memory_bytes: int = 4 << 30

    def settings(self) -> str:
        # readonly = 1 (not 2): the engine then also refuses every table function that reaches files, the
        # network or other servers (file, url, remote, s3, ...) and any SETTINGS change inside the query.
        # final = 1: the cleaned buckets are ReplacingMergeTrees corrected in place (stream/incremental.py); a
        # query naming {bucket} reads it FINAL, like the views do.
        return (
            f"final = 1, readonly = 1, max_execution_time = {self.timeout_s:g}, timeout_overflow_mode = 'throw', "
            f"max_result_rows = {self.max_result_rows}, result_overflow_mode = 'throw', "
            f"max_memory_usage = {self.max_memory_bytes}"
        )


_BY_CODE: dict[str, type[QueryError]] = {
    "164": QueryForbidden,  # READONLY
    "159": QueryTimeout,  # TIMEOUT_EXCEEDED
    "396": QueryTooLarge,  # TOO_MANY_ROWS_OR_BYTES
    "241": QueryTooLarge,  # MEMORY_LIMIT_EXCEEDED
}
_CODE = re.compile(r"Code: (\d+)")


def engine_error(message: str) -> QueryError:
    """The QueryError subclass for an engine error message (by its ClickHouse ``Code: N``)."""
    m = _CODE.search(message)
    return _BY_CODE.get(m.group(1) if m else "", QueryError)(message)


_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_STRINGS = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`\\]|\\.)*`", re.S)
_FIRST_WORD = re.compile(r"\s*\(*\s*([A-Za-z]+)")


def read_only(sql: str) -> str:
    """The statement without a trailing ``;`` when it is a single read-only SELECT, else ``QueryError``."""
    code = _STRINGS.sub("''", _COMMENTS.sub(" ", sql))
    body = code.strip().rstrip(";").strip()
    if not body:
        raise QueryError("empty query")
    if ";" in body:
        raise QueryForbidden("one statement only")
    m = _FIRST_WORD.match(body)
    if not m or m.group(1).upper() not in ("SELECT", "WITH"):
        raise QueryForbidden(f"read-only: only SELECT queries are allowed, not {(m.group(1) if m else body[:20])!r}")
    if re.search(r"\bINTO\s+OUTFILE\b", body, re.I):
        raise QueryForbidden("read-only: INTO OUTFILE is not allowed")
    return sql.strip().rstrip(";").rstrip()


@dataclass(frozen=True)
class ProjectBucket:
    project: str
    project_id: str
    segment_id: str
    bucket: int


def project_bucket(wh: Warehouse, slug: str) -> ProjectBucket:
    rows = wh.rows(
        f"SELECT project, projectId, segmentId, bucketId FROM {PROJECT_VIEW}(project = {{p:String}})", {"p": slug}
    )
    if not rows:
        raise QueryNotFound(f"no enabled project with slug {slug!r}")
    if len(rows) > 1:
        raise QueryError(f"slug {slug!r} names {len(rows)} enabled projects")
    project, pid, seg, bucket = rows[0]
    return ProjectBucket(project, pid, seg, int(bucket))


def run_query(
    wh: Warehouse, sql: str, project: str | None = None, limits: QueryLimits | None = None
) -> list[dict[str, Any]]:
    statement = read_only(sql)
    params: dict[str, Any] = {}
    if project is not None:
        pb = project_bucket(wh, project)
        # The bucket id comes from project_buckets, so it is valid: name the table itself rather than the
        # routing view, whose per-query check and table pruning cost more than the query (bench_enrich.py).
        statement = statement.replace("{bucket}", cleaned_table(pb.bucket))
        params = {"bucketId": pb.bucket, "segmentId": pb.segment_id, "project": pb.project}
    elif "{bucket}" in statement:
        raise QueryError("{bucket} needs --project")
    try:
        return wh.dicts(f"{statement}\nSETTINGS {(limits or QueryLimits()).settings()}", params or None)
    except WarehouseError as exc:
        raise engine_error(str(exc)) from exc


def _default(value: Any) -> Any:
    return str(value)


def json_lines(rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    opts = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS
    for row in rows:
        yield orjson.dumps(row, default=_default, option=opts)
