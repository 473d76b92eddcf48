"""Read-only SQL on the warehouse, one JSON object per row.

``read_only(sql)`` accepts one SELECT (or WITH … SELECT) statement and rejects anything else with
``QueryError``: other statements, several statements, ``INTO OUTFILE``. The query also runs with the
ClickHouse setting ``readonly = 2`` where the backend allows it, so the engine refuses writes as well.

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
        raise QueryError("one statement only")
    m = _FIRST_WORD.match(body)
    if not m or m.group(1).upper() not in ("SELECT", "WITH"):
        raise QueryError(f"read-only: only SELECT queries are allowed, not {(m.group(1) if m else body[:20])!r}")
    if re.search(r"\bINTO\s+OUTFILE\b", body, re.I):
        raise QueryError("read-only: INTO OUTFILE is not allowed")
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
        raise QueryError(f"no enabled project with slug {slug!r}")
    if len(rows) > 1:
        raise QueryError(f"slug {slug!r} names {len(rows)} enabled projects")
    project, pid, seg, bucket = rows[0]
    return ProjectBucket(project, pid, seg, int(bucket))


def run_query(wh: Warehouse, sql: str, project: str | None = None) -> list[dict[str, Any]]:
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
        return wh.dicts(f"{statement}\nSETTINGS readonly = 2", params or None)
    except WarehouseError as exc:
        raise QueryError(str(exc)) from exc


def _default(value: Any) -> Any:
    return str(value)


def json_lines(rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    opts = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS
    for row in rows:
        yield orjson.dumps(row, default=_default, option=opts)
