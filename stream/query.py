"""Read-only SQL on the warehouse: the engine's own output, one JSON object per row unless the SQL says ``FORMAT``.

What a user may run (``read_only(sql)`` checks the statement's kind, the engine checks the rest):

- one statement: ``SELECT`` / ``WITH … SELECT``, ``SHOW …``, ``DESCRIBE``/``DESC``, ``EXPLAIN …`` (AST, SYNTAX,
  PLAN, PIPELINE, ESTIMATE…), ``EXISTS``; anything else (INSERT, CREATE, DROP, ALTER, SYSTEM, KILL, SET, USE…),
  several statements or ``INTO OUTFILE`` (which the engine would write on the host even in readonly mode) is a
  ``QueryForbidden``;
- a ``FORMAT X`` clause picks the engine's output format (CSV, JSONEachRow, Pretty…); without one the output is
  ``JSONEachRow`` with ISO-8601 UTC timestamps and unquoted 64-bit integers.

How it is enforced. Each query runs on a session of its own (for chdb its own connection handle to the engine,
whose ``SET`` state is per handle): the output settings and the ``QueryLimits`` (time limit, result rows,
memory) are set on that session first and ``readonly = 1`` last. From then on the engine refuses every write,
every setting change (``SET`` or a ``SETTINGS`` clause in the query: the user can neither raise a limit nor
turn ``readonly`` back off; naming a setting at its current value is allowed, and a subquery's SETTINGS clause
is accepted but not applied) and the table functions that
reach files, the network or other servers (``file``, ``url``, ``s3``, ``remote``, ``mysql``, ``executable``…).
Before running it, the statement is parsed by the engine (``EXPLAIN AST``) and refused when it names a table
function that is not on a short list of local, harmless ones (``numbers``, ``values``, ``merge``…) or the
scalar ``file()``, which reads host files even under ``readonly = 1``. Engine errors map by ClickHouse code to
``QueryForbidden`` (403), ``QueryTimeout`` (408), ``QueryTooLarge`` (413); every message is one line.

``query_raw(wh, sql, project=None, limits=None) -> bytes`` is the engine's output; ``run_query`` the same as a
list of dicts (no ``FORMAT`` then). With a project slug the bucket is resolved through ``project_buckets`` (an
unknown, disabled or deleted project is a ``QueryError``), and the query is offered:

- ``{bucket}``: replaced by the project's cleaned bucket table (what ``activityRelations_bucket_routing(bucketId
  = n)`` reads, without the view's per-query check: the id comes from ``project_buckets`` and is valid);
- the query parameters ``{bucketId:UInt32}``, ``{segmentId:String}`` and ``{project:String}``.

So ``SELECT count() FROM {bucket} WHERE segmentId = {segmentId:String}`` counts one project's activities
reading one bucket only.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from connectors.warehouse import (
    EmbeddedWarehouse,
    ServerWarehouse,
    Warehouse,
    WarehouseError,
    error_code,
    one_line,
)
from stream.buckets import cleaned_table
from stream.schema import PROJECT_VIEW, cleaned_select_list


class QueryError(ValueError):
    """The query is refused or failed; the message is one line."""

    status = 400


class QueryForbidden(QueryError):
    """A write, several statements, INTO OUTFILE, a setting change, or a function that reaches outside."""

    status = 403


class QueryNotFound(QueryError):
    status = 404


class QueryTimeout(QueryError):
    status = 408


class QueryTooLarge(QueryError):
    status = 413


@dataclass(frozen=True)
class QueryLimits:
    """Per-query engine limits, set on the query's session before ``readonly = 1``."""

    timeout_s: float = 30.0
    max_result_rows: int = 1_000_000
    max_memory_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        # 0 means "no limit" to ClickHouse: never let a typo switch a limit off.
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, not {self.timeout_s}")
        if self.max_result_rows < 1 or self.max_memory_bytes < 1:
            raise ValueError("max_result_rows and max_memory_bytes must be >= 1")

    def within(self, cap: QueryLimits) -> QueryLimits:
        """These limits, none above ``cap``'s (a caller may tighten the server's limits, never raise them)."""
        return QueryLimits(
            min(self.timeout_s, cap.timeout_s),
            min(self.max_result_rows, cap.max_result_rows),
            min(self.max_memory_bytes, cap.max_memory_bytes),
        )

    def settings(self) -> dict[str, str]:
        return {
            "max_execution_time": f"{self.timeout_s:g}",
            "timeout_overflow_mode": "throw",
            "max_result_rows": str(self.max_result_rows),
            "result_overflow_mode": "throw",
            "max_memory_usage": str(self.max_memory_bytes),
        }


# The default output (JSONEachRow): timestamps as ISO-8601 UTC, 64-bit integers as JSON numbers.
_OUTPUT_SETTINGS = {"date_time_output_format": "iso", "output_format_json_quote_64bit_integers": "0"}
DEFAULT_FORMAT = "JSONEachRow"


def session_settings(limits: QueryLimits, check: bool = False) -> dict[str, str]:
    """Everything a query session sets, in order: ``readonly`` comes last, so it locks the others in. A
    ``check`` session (the engine parsing the statement) has no result-rows limit: its rows are ours."""
    # final = 1: the cleaned buckets are ReplacingMergeTrees corrected in place (stream/incremental.py); a
    # query naming one reads it FINAL, like the views do (and the raw buckets deduplicated, as FINAL gives).
    settings = {**_OUTPUT_SETTINGS, **limits.settings(), "final": "1", "readonly": "1"}
    if check:
        del settings["max_result_rows"], settings["result_overflow_mode"]
    return settings


_BY_CODE: dict[str, type[QueryError]] = {
    "164": QueryForbidden,  # READONLY
    "159": QueryTimeout,  # TIMEOUT_EXCEEDED
    "396": QueryTooLarge,  # TOO_MANY_ROWS_OR_BYTES
    "241": QueryTooLarge,  # MEMORY_LIMIT_EXCEEDED
}
_CODE_PREFIX = re.compile(r"(Code: \d+\. DB::Exception: )+")
_VERSION = re.compile(r"\s*\(version [^)]*\)\.?")
_REPEATED_NAME = re.compile(r"(\([A-Z_]+\))(?:\s*\1)+")


def engine_error(message: str) -> QueryError:
    """The QueryError subclass for an engine error message (by its ClickHouse ``Code: N``), on one line."""
    text = one_line(Exception(message))
    start = text.find("Code: ")
    if start > 0:
        text = text[start:]
    # chdb repeats the code prefix and the error name around a version trailer: say each once.
    text = _REPEATED_NAME.sub(r"\1", _VERSION.sub("", _CODE_PREFIX.sub(lambda m: m.group(1), text)))
    return _BY_CODE.get(str(error_code(text)), QueryError)(text)


# Left to right, so a quote inside a comment or a comment marker inside a string is taken for what it is.
_TOKENS = re.compile(r"""--[^\n]*|/\*.*?(?:\*/|$)|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|`(?:[^`\\]|\\.)*`""", re.S)
_FIRST_WORD = re.compile(r"\s*\(*\s*([A-Za-z]+)")
ALLOWED_STATEMENTS = ("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS")
_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z_][A-Za-z0-9_]*)\s*(?:\bSETTINGS\b.*)?$", re.I | re.S)


def _code_only(sql: str) -> str:
    """``sql`` with comments blanked and string literals / quoted names emptied: only the SQL's own words."""
    return _TOKENS.sub(lambda m: " " if m.group(0)[0] in "-/" else "''", sql)


def read_only(sql: str) -> str:
    """The statement without a trailing ``;`` when it is one read-only statement, else ``QueryError``."""
    body = _code_only(sql).strip().rstrip(";").strip()
    if not body:
        raise QueryError("empty query")
    if ";" in body:
        raise QueryForbidden("one statement only")
    m = _FIRST_WORD.match(body)
    word = m.group(1).upper() if m else ""
    if word not in ALLOWED_STATEMENTS:
        raise QueryForbidden(
            f"read-only: only SELECT, SHOW, DESCRIBE, EXPLAIN and EXISTS are allowed, not {(word or body[:20])!r}"
        )
    if re.search(r"\bINTO\s+OUTFILE\b", body, re.I):
        raise QueryForbidden("read-only: INTO OUTFILE is not allowed")
    return sql.strip().rstrip(";").rstrip()


def user_format(sql: str) -> str | None:
    """The output format a trailing ``FORMAT X`` clause asks for, if any."""
    m = _FORMAT.search(_code_only(sql).strip().rstrip(";").rstrip())
    return m.group(1) if m else None


# Table functions that only read the warehouse itself or generate data; every other one (file, url, s3, remote,
# mysql, executable, python… and any added by a later engine version) is refused before the engine sees it.
LOCAL_TABLE_FUNCTIONS = frozenset(
    name.lower()
    for name in (
        "numbers numbers_mt zeros zeros_mt primes generate_series generateSeries generateRandom values "
        "SQLStandardValues null view viewIfPermitted viewExplain merge loop format fuzzJSON fuzzQuery "
        "mergeTreeIndex mergeTreeProjection mergeTreeAnalyzeIndexes mergeTreeAnalyzeIndexesUUID "
        "mergeTreeCodecBlockCounts mergeTreeTextIndex timeSeriesData timeSeriesMetrics timeSeriesTags "
        "timeSeriesSamples timeSeriesSelector timeSeriesMetricFamilies"
    ).split()
)
# Scalar functions that reach outside the warehouse; readonly does not stop them.
OUTSIDE_SCALAR_FUNCTIONS = frozenset({"file"})
_AST_FUNCTION = re.compile(r"\bFunction ([A-Za-z_][A-Za-z0-9_]*)")


class _Session(Protocol):
    engine: str  # which engine answers (its table functions are looked up once)

    def raw(self, sql: str, params: Mapping[str, Any], fmt: str | None) -> bytes: ...

    def close(self) -> None: ...


class _EmbeddedSession:
    """A chdb connection handle of its own on the process's engine: its SET state is not shared."""

    def __init__(self, wh: EmbeddedWarehouse, settings: Mapping[str, str]) -> None:
        import chdb

        self.engine = wh.dsn
        self._conn: Any = chdb.connect(wh.dsn.removeprefix("chdb://"))
        try:
            self._conn.query(f"USE `{wh.database}`")
            # One SET for all: the engine checks every change against the settings in force before the
            # statement (readonly = 0 then), applies them in order, readonly last (one query instead of ~10).
            self._conn.query("SET " + ", ".join(f"{key} = {_literal(value)}" for key, value in settings.items()))
        except Exception as exc:
            self.close()
            raise engine_error(str(exc)) from exc

    def raw(self, sql: str, params: Mapping[str, Any], fmt: str | None) -> bytes:
        # The engine's format argument is the default: a FORMAT clause in the SQL wins.
        try:
            return bytes(
                self._conn.query(sql, fmt or DEFAULT_FORMAT, params={k: str(v) for k, v in params.items()}).bytes()
            )
        except Exception as exc:
            raise engine_error(str(exc)) from exc

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class _ServerSession:
    """A ClickHouse server: the settings ride along with each request (HTTP parameters, readonly last).
    Not exercised by the tests (they have no server); the embedded session is the one tested."""

    def __init__(self, wh: ServerWarehouse, settings: Mapping[str, str]) -> None:
        self._client = wh._c()
        self._settings = dict(settings)
        self.engine = wh.url

    def raw(self, sql: str, params: Mapping[str, Any], fmt: str | None) -> bytes:
        try:
            # The format goes in as a FORMAT clause: never a second one after the SQL's own.
            fmt = None if user_format(sql) else fmt
            out = self._client.raw_query(sql, parameters=dict(params) or None, settings=self._settings, fmt=fmt)
        except Exception as exc:
            raise engine_error(str(exc)) from exc
        return bytes(out)

    def close(self) -> None:
        return None


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def open_session(wh: Warehouse, limits: QueryLimits, check: bool = False) -> _Session:
    """A session of its own for user SQL: output settings and ``limits`` set, then ``readonly = 1``."""
    settings = session_settings(limits, check)
    if isinstance(wh, EmbeddedWarehouse):
        return _EmbeddedSession(wh, settings)
    if isinstance(wh, ServerWarehouse):
        return _ServerSession(wh, settings)
    raise QueryError(f"no read-only query session for {type(wh).__name__}")


class _Passed:
    """Statements the engine has parsed and ``check_functions`` let through, most recent last (bounded).

    A verdict depends only on the statement's text and the engine (parameters are values, never names), so a
    statement asked again — a pipe, a dashboard's query — skips the check session and its two queries."""

    def __init__(self, size: int = 2048) -> None:
        self._size = size
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, statement: object) -> bool:
        with self._lock:
            if statement not in self._seen:
                return False
            self._seen.move_to_end(statement)  # type: ignore[arg-type]
            return True

    def add(self, statement: str) -> None:
        with self._lock:
            self._seen[statement] = None
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)


PASSED = _Passed()
_TABLE_FUNCTIONS: dict[str, frozenset[str]] = {}  # per engine (dsn): the names do not change while it runs


def check_functions(session: _Session, statement: str, params: Mapping[str, Any]) -> None:
    """Refuse a statement that names a function reaching outside the warehouse, as the engine parses it."""
    prefix = "EXPLAIN AST "
    try:
        ast = session.raw(prefix + statement, params, "TabSeparatedRaw").decode(errors="replace")
    except QueryError as exc:  # a syntax error: point at the user's text, not at ours
        shifted = re.sub(
            r"(position |line 1, col )(\d+)", lambda m: f"{m.group(1)}{max(int(m.group(2)) - len(prefix), 0)}", str(exc)
        )
        raise type(exc)(shifted) from exc
    table_functions = _TABLE_FUNCTIONS.get(session.engine)
    if table_functions is None:
        raw = session.raw("SELECT name FROM system.table_functions", {}, "TabSeparatedRaw").decode()
        table_functions = _TABLE_FUNCTIONS[session.engine] = frozenset(line.strip().lower() for line in raw.split())
    for name in _AST_FUNCTION.findall(ast):
        low = name.lower()
        if name in OUTSIDE_SCALAR_FUNCTIONS or (low in table_functions and low not in LOCAL_TABLE_FUNCTIONS):
            raise QueryForbidden(f"read-only: {name}() reaches outside the warehouse and is not allowed")


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


def prepare(wh: Warehouse, sql: str, project: str | None = None) -> tuple[str, dict[str, Any]]:
    """The statement to run and its query parameters (``{bucket}`` resolved with a project)."""
    statement = read_only(sql)
    if project is None:
        if "{bucket}" in statement:
            raise QueryError("{bucket} needs --project")
        return statement, {}
    try:
        pb = project_bucket(wh, project)
    except WarehouseError as exc:
        raise engine_error(str(exc)) from exc
    # The bucket id comes from project_buckets, so it is valid: name the table itself rather than the
    # routing view, whose per-query check and table pruning cost more than the query (bench_enrich.py).
    # (its reader columns, FINAL, as the views read it: a correction's superseded versions never show).
    bucket = f"(SELECT {cleaned_select_list()} FROM {cleaned_table(pb.bucket)} FINAL)"
    statement = statement.replace("{bucket}", bucket)
    return statement, {"bucketId": pb.bucket, "segmentId": pb.segment_id, "project": pb.project}


def query_raw(wh: Warehouse, sql: str, project: str | None = None, limits: QueryLimits | None = None) -> bytes:
    """The engine's output for one read-only statement: JSONEachRow, or the format its FORMAT clause names."""
    statement, params = prepare(wh, sql, project)
    return run_statement(wh, statement, params, limits or QueryLimits(), DEFAULT_FORMAT)


def run_statement(
    wh: Warehouse, statement: str, params: Mapping[str, Any], limits: QueryLimits, fmt: str | None
) -> bytes:
    """Run one statement already passed by ``read_only``: the engine parses it first (``check_functions``;
    once per statement text, ``PASSED``), then it runs on a session of its own with the limits set and
    ``readonly = 1`` last; ``fmt`` is the output format unless the statement has a FORMAT clause. A fresh session
    each time, closed after: a handle whose query failed (a timeout) is never used again (chdb may hand its
    output to the next query)."""
    if statement not in PASSED:
        checker = open_session(wh, limits, check=True)
        try:
            check_functions(checker, statement, params)
        finally:
            checker.close()
        PASSED.add(statement)
    session = open_session(wh, limits)
    try:
        return session.raw(statement, params, fmt)
    finally:
        session.close()


def run_query(
    wh: Warehouse, sql: str, project: str | None = None, limits: QueryLimits | None = None
) -> list[dict[str, Any]]:
    """``query_raw`` as rows (dicts); a FORMAT clause has no place here."""
    fmt = user_format(read_only(sql))
    if fmt is not None:
        raise QueryError(f"FORMAT {fmt}: rows come back as JSON objects here; leave FORMAT out")
    return [orjson.loads(line) for line in query_raw(wh, sql, project, limits).splitlines() if line]
