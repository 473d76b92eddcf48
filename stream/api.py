"""The HTTP query API: Tinybird-compatible endpoints over the warehouse (an ASGI app, FastAPI + uvicorn).

``create_app(connect, config)`` builds the app; ``Server(app, bind(host, port))`` runs it on uvicorn, in the
foreground (``bucketer serve``, ``run()``) or in a thread (``bucketer run --http-port``, ``serve_pipeline``).

Endpoints (token = one of ``BUCKETER_API_TOKEN``'s comma-separated tokens, as ``Authorization: Bearer T`` or
``?token=T``, as Tinybird accepts; with no token configured there is no auth, allowed on loopback only):

- ``GET|POST /v0/sql?q=SQL`` (token): one read-only statement (``stream.query.read_only``), ClickHouse
  ``FORMAT JSON`` by default (``meta``, ``data``, ``rows``, ``statistics``: the engine's own output, passed
  through untouched); a trailing ``FORMAT CSV|CSVWithNames|TSV|TSVWithNames|JSONEachRow|JSONCompact`` picks
  another (and text formats for people, Pretty, Vertical, Markdown…, as ``text/plain``). ``{name:Type}``
  parameters in the SQL are bound by the engine from query parameters of that name. ``max_seconds``,
  ``max_rows``, ``max_memory_mb`` tighten the server's query limits for this request (never loosen them; what
  `bucketer query --max-seconds/--max-rows/--max-memory-mb` sends); they, ``q`` and ``token`` are the API's own
  and cannot name a SQL parameter (``RESERVED_PARAMS``). Pipes take no caller limits: their parameters are theirs.
- ``GET /v0/pipes/{pipe}.json`` (token): ``activityRelations_deduplicated_cleaned_bucket_union``,
  ``activityRelations_bucket_routing`` (``bucketId``, or ``project=SLUG`` resolved to it), ``project_buckets``
  (``project``); the first two with optional ``segmentId``, ``limit``, ``offset``. User pipes: ``NAME.sql`` files
  of a folder (``load_pipes``), every ``{param:Type}`` required, ``project=`` resolved into a ``bucketId``
  parameter. Values are always bound by the engine, never pasted into SQL. project -> bucket lookups are cached
  until insightsProjects changes (``ProjectCache``).
- ``GET /v0/status`` (token): the JSON of ``bucketer status --json``; ``GET /`` (token): the HTML status page
  (reloads itself); ``GET /healthz``, ``GET /readyz`` (no token); ``GET /openapi.json``; ``GET /metrics`` when
  serving a pipeline.

Errors are ``{"error": "..."}``: 400 bad SQL / missing or ill-typed parameter / invalid bucketId, 401 no or
wrong token, 403 a write, several statements, INTO OUTFILE or a table function reaching outside (the engine's
``readonly = 1`` refuses them; ``read_only`` turns away what is not a SELECT before the engine sees it), 404
unknown pipe or unknown/disabled project, 408 past the time limit, 413 past the row or memory limit, 503 the
warehouse cannot be reached. An unexpected failure is a 500 with a generic message (and a log line). The
access log is off: it would print ``?token=``.

Concurrency with the pipeline (measured, chdb 4.4 / clickhouse-connect 1.12): each warehouse handle is its own
chdb connection to the process's one engine. A query on a second handle runs while another handle executes a
long query (``SELECT 1`` took 1-3 ms while an 18 s scan ran on the other handle), but two queries on the SAME
handle serialise (the same ``SELECT 1`` waited 24 s). So the API keeps a small pool of its own handles (one per
request in flight, ``pool_size``) next to the loader's and the enricher's, with no lock shared with them: a slow
API query never holds up a load, and a long rebuild never blocks the API. A handle whose query failed is closed,
not reused: after a timeout chdb hands the timed-out query's output to the next query on that handle.

While it serves, the process records its URL next to the data dir's lock (``connectors.warehouse.announce_api``:
the URL, its pid, whether a token is required) and removes it when it stops: ``bucketer status`` and ``bucketer
query`` on a held data dir go through this API (``/v0/status``, ``/v0/sql``) instead of refusing.
"""

from __future__ import annotations

import hmac
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, BeforeValidator
from starlette.exceptions import HTTPException as StarletteHTTPException

from connectors.kafka_conn import KafkaConnection
from connectors.warehouse import WarehouseError, one_line
from stream.buckets import cleaned_table
from stream.migration import READERS
from stream.query import QueryError, QueryLimits, engine_error, read_only, run_statement
from stream.schema import PROJECT_VIEW, ROUTING_VIEW, UNION_VIEW, cleaned_select_list

log = logging.getLogger("bucketer.api")


class ServeError(RuntimeError):
    """The API cannot be served (port in use or out of range, no token on a public address); one line."""


class ApiError(Exception):
    """An answer other than 200: ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ApiConfig:
    tokens: tuple[str, ...] = ()  # empty: no auth (only allowed on a loopback address, see check_bind)
    limits: QueryLimits = field(default_factory=QueryLimits)
    pool_size: int = 4
    pool_wait_s: float = 30.0
    # For /v0/status: Kafka figures (DLQ count, router lag) when a connection is known.
    kafka: KafkaConnection | None = None
    topic_prefix: str = ""
    router_group: str = "bucketer-router"
    pipes: tuple[UserPipe, ...] = ()  # user pipes (load_pipes)
    kafka_ttl_s: float = 5.0  # /v0/status reads the Kafka figures at most this often (stream.status.KafkaFigures)


@dataclass(frozen=True)
class UserPipe:
    """A pipe from a SQL file: ``NAME.sql`` serves ``/v0/pipes/NAME.json``; its ``{param:Type}`` are required."""

    name: str
    sql: str
    params: tuple[tuple[str, str], ...]  # (name, ClickHouse type)


_PIPE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPED_PARAM = re.compile(r"\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*([^{}]+?)\s*\}")
BUILTIN_PIPES = ("activityRelations_deduplicated_cleaned_bucket_union", "activityRelations_bucket_routing")


def load_pipes(folder: Path) -> tuple[UserPipe, ...]:
    """The user pipes of ``folder`` (every ``*.sql``), each checked to be one read-only statement; a bad file is
    a ServeError naming it."""
    if not folder.is_dir():
        raise ServeError(f"--pipes {folder}: not a directory")
    out = []
    for path in sorted(folder.glob("*.sql")):
        name = path.stem
        if not _PIPE_NAME.match(name) or name in (*BUILTIN_PIPES, "project_buckets"):
            raise ServeError(f"pipe file {path}: {name!r} is not a usable pipe name")
        try:
            statement = read_only(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, QueryError) as exc:
            raise ServeError(f"pipe file {path}: {one_line(exc)}") from None
        if _TRAILING_FORMAT.search(statement):
            raise ServeError(f"pipe file {path}: no FORMAT clause (pipes answer in FORMAT JSON)")
        params = tuple(dict.fromkeys((n, t) for n, t in _TYPED_PARAM.findall(statement)))
        names = [n for n, _ in params]
        if len(set(names)) != len(names):
            raise ServeError(f"pipe file {path}: a parameter is declared with two types")
        # ?token= is the caller's secret (auth), and ?project= names the bucket when the pipe takes bucketId:
        # a SQL parameter of either name would be handed the other's value.
        taken = {"token"} | ({"project"} if "bucketId" in names else set())
        for param in names:
            if param in taken:
                raise ServeError(
                    f"pipe file {path}: {{{param}:Type}} cannot be a pipe parameter "
                    + ("(?token= is the API token)" if param == "token" else "(?project= picks bucketId)")
                    + "; give it another name"
                )
        out.append(UserPipe(name, statement, params))
    return tuple(out)


def _param_schema(ch_type: str) -> dict[str, Any]:
    t = ch_type.strip()
    if re.fullmatch(r"U?Int(8|16|32|64|128|256)", t):
        return {"type": "integer", **({"minimum": 0} if t.startswith("U") else {})}
    if re.fullmatch(r"Float(32|64)", t):
        return {"type": "number"}
    return {"type": "string"}


@dataclass(frozen=True)
class HttpConfig:
    """Where ``bucketer run --http-port`` serves the API, and how (the Kafka fields come from the pipeline)."""

    port: int
    host: str = "127.0.0.1"
    api: ApiConfig = field(default_factory=ApiConfig)


def check_bind(host: str, tokens: Sequence[str]) -> None:
    """Refuse to serve without a token on an address other machines can reach."""
    if not tokens and host not in ("127.0.0.1", "::1", "localhost"):
        raise ServeError(f"--http-host {host} is reachable from other machines: set BUCKETER_API_TOKEN")


# --- warehouse handles --------------------------------------------------------------------------------------


class HandlePool:
    """Opened warehouse handles, one per request in flight (at most ``size``), opened on first need."""

    def __init__(self, connect: Callable[[], Any], size: int = 4, wait_s: float = 30.0) -> None:
        self._connect = connect
        self._slots = threading.BoundedSemaphore(max(1, size))
        self._wait_s = wait_s
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._all: list[Any] = []
        self._closed = False

    @contextmanager
    def handle(self) -> Iterator[Any]:
        if not self._slots.acquire(timeout=self._wait_s):
            raise ApiError(503, "busy: every warehouse handle is in use, try again")
        try:
            with self._lock:
                if self._closed:
                    raise ApiError(503, "the server is stopping")
                wh = self._idle.pop() if self._idle else None
            if wh is None:
                try:
                    wh = self._connect().__enter__()
                except WarehouseError as exc:
                    raise ApiError(503, f"warehouse unavailable: {exc}") from None
                with self._lock:
                    self._all.append(wh)
            try:
                yield wh
            except BaseException as exc:
                # A handle that saw a failure is not reused: after a query timeout, chdb hands the timed-out
                # query's output to the NEXT query on the same handle (measured, chdb 4.4); closing drops it.
                # The API's own 4xx answers (an unknown project, a bad parameter) ran nothing that failed: the
                # handle goes back (closed, it cost the next request a new connection, ~250 ms measured).
                keep = isinstance(exc, ApiError) and exc.status < 500
                with self._lock:
                    if keep:
                        self._idle.append(wh)
                    else:
                        self._all.remove(wh)
                if not keep:
                    _close(wh)
                raise
            with self._lock:
                self._idle.append(wh)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles, self._all, self._idle = self._all, [], []
        for wh in handles:
            _close(wh)


def _close(wh: Any) -> None:
    try:
        wh.__exit__(None, None, None)
    except Exception as exc:  # closing is best effort
        log.warning("api: closing a warehouse handle failed: %s", one_line(exc))


# --- executing SQL ------------------------------------------------------------------------------------------

FORMATS = {
    "JSON": "application/json",
    "JSONCompact": "application/json",
    "JSONEachRow": "application/x-ndjson",
    "CSV": "text/csv",
    "CSVWithNames": "text/csv",
    "TabSeparated": "text/tab-separated-values",
    "TabSeparatedWithNames": "text/tab-separated-values",
    # Text formats for people (what `bucketer query` offers when it goes through a running process's API).
    **{
        f: "text/plain; charset=utf-8"
        for f in (
            "Pretty PrettyCompact PrettyCompactMonoBlock PrettySpace PrettyNoEscapes PrettyCompactNoEscapes "
            "PrettySpaceNoEscapes Vertical Markdown TabSeparatedRaw TabSeparatedWithNamesAndTypes "
            "CSVWithNamesAndTypes JSONCompactEachRow JSONStrings JSONCompactStrings Values TSKV"
        ).split()
    },
}
_FORMAT_ALIASES = {f.lower(): f for f in FORMATS} | {
    "tsv": "TabSeparated",
    "tsvwithnames": "TabSeparatedWithNames",
    "tsvraw": "TabSeparatedRaw",
    "tsvwithnamesandtypes": "TabSeparatedWithNamesAndTypes",
    "jsonlines": "JSONEachRow",
    "ndjson": "JSONEachRow",
}
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z]+)\s*$", re.I)
_PARAM = re.compile(r"\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*[^{}]+\}")


def split_format(statement: str) -> tuple[str, str]:
    """(statement without a trailing ``FORMAT name``, the output format); JSON when none is given."""
    m = _TRAILING_FORMAT.search(statement)
    if not m:
        return statement, "JSON"
    fmt = _FORMAT_ALIASES.get(m.group(1).lower())
    if fmt is None:
        raise ApiError(400, f"FORMAT {m.group(1)} is not served; use one of {', '.join(FORMATS)}")
    return statement[: m.start()].rstrip(), fmt


def sql_params(statement: str) -> list[str]:
    """The names of the ``{name:Type}`` query parameters in a statement, in order, once each."""
    return list(dict.fromkeys(_PARAM.findall(statement)))


def execute(wh: Any, statement: str, params: Mapping[str, Any], limits: QueryLimits, fmt: str = "JSON") -> bytes:
    """The engine's output of ``statement`` in ``fmt``, through the query path of ``bucketer query``
    (stream.query.run_statement: functions reaching outside refused as the engine parses them, the limits and
    ``readonly = 1`` on a session of its own)."""
    try:
        return run_statement(wh, statement, params, limits, fmt)
    except QueryError:
        raise
    except WarehouseError as exc:
        raise ApiError(503, f"warehouse unavailable: {exc}") from None


# --- project -> bucket, cached ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Project:
    slug: str
    project_id: str
    segment_id: str
    bucket: int


class ProjectCache:
    """``project_buckets`` lookups, kept until insightsProjects changes.

    The fingerprint (row count and an XOR of every row's (id, _version, _deleted) hash, parts not merged
    included) changes with any insert into insightsProjects and does not need FINAL, so each lookup costs
    one small aggregate instead of the view's FINAL scan; a merge also changes it (harmless: one refill).

    On the embedded warehouse not even that: nothing but this process writes to it, so while its count of
    finished writes (``EmbeddedWarehouse.write_epoch``) is the one the fingerprint was taken at, the
    fingerprint is still the table's and is not asked again (``bucketer serve``: never; ``bucketer run``: once
    after each of the loader's writes, not once per request). A server has other writers: asked every time."""

    FINGERPRINT = "SELECT count(), groupBitXor(cityHash64(id, _version, _deleted)) FROM insightsProjects"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fingerprint: tuple[Any, ...] | None = None
        self._epoch: int | None = None  # the write epoch the fingerprint was taken at (embedded only)
        self._known: dict[str, Project | None] = {}
        self.lookups = 0  # view queries run (for tests and metrics)
        self.fingerprints = 0  # fingerprint queries run

    def resolve(self, wh: Any, slug: str) -> Project:
        epoch_of = getattr(wh, "write_epoch", None)
        epoch = epoch_of() if epoch_of is not None else None
        with self._lock:
            fp = self._fingerprint if epoch is not None and epoch == self._epoch else None
        if fp is None:
            self.fingerprints += 1
            fp = tuple(wh.rows(self.FINGERPRINT)[0])
        with self._lock:
            if fp != self._fingerprint:
                self._fingerprint, self._known = fp, {}
            self._epoch = epoch
            if slug in self._known:
                found = self._known[slug]
            else:
                found = self._lookup(wh, slug)
                self._known[slug] = found
        if found is None:
            raise ApiError(404, f"unknown or disabled project {slug!r}")
        return found

    def _lookup(self, wh: Any, slug: str) -> Project | None:
        self.lookups += 1
        rows = wh.rows(
            f"SELECT project, projectId, segmentId, bucketId FROM {PROJECT_VIEW}(project = {{p:String}})", {"p": slug}
        )
        if len(rows) > 1:
            raise ApiError(400, f"slug {slug!r} names {len(rows)} enabled projects")
        if not rows:
            return None
        project, pid, seg, bucket = rows[0]
        return Project(str(project), str(pid), str(seg), int(bucket))


# --- the status page ----------------------------------------------------------------------------------------

SKEW = 1.5  # a bucket with at least this many times the mean raw rows is flagged


# --- the app ------------------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    error: str


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if getattr(value, "tzinfo", 1) is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    why = {
        400: "Bad SQL, a missing or ill-typed parameter, an invalid bucketId",
        401: "No or wrong token",
        403: "A write, several statements, INTO OUTFILE, or a table function reaching outside",
        404: "Unknown pipe, or unknown or disabled project",
        408: "Past the query time limit",
        413: "Past the result-rows or memory limit",
        503: "The warehouse cannot be reached, or every handle is busy",
    }
    return {c: {"model": ErrorBody, "description": why[c]} for c in codes}


_QUERY_ERRORS = _errors(400, 401, 403, 404, 408, 413, 503)
_JSON_RESULT: dict[str, Any] = {
    "type": "object",
    "required": ["meta", "data", "rows", "statistics"],
    "properties": {
        "meta": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
                "required": ["name", "type"],
            },
        },
        "data": {"type": "array", "items": {"type": "object"}},
        "rows": {"type": "integer"},
        "rows_before_limit_at_least": {"type": "integer"},
        "statistics": {"type": "object"},
    },
}
_PIPE_OK: dict[int | str, dict[str, Any]] = {
    200: {"description": "ClickHouse FORMAT JSON", "content": {"application/json": {"schema": _JSON_RESULT}}}
}
_SQL_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "FORMAT JSON by default; a trailing FORMAT clause picks another",
        "content": {
            "application/json": {"schema": {}},
            "application/x-ndjson": {"schema": {"type": "string"}},
            "text/csv": {"schema": {"type": "string"}},
            "text/tab-separated-values": {"schema": {"type": "string"}},
            "text/plain": {"schema": {"type": "string"}},
        },
    }
}
_HTML_OK: dict[int | str, dict[str, Any]] = {200: {"content": {"text/html": {"schema": {"type": "string"}}}}}
_SQL_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {"q": {"type": "string", "minLength": 1}},
                    "required": ["q"],
                }
            },
            "text/plain": {"schema": {"type": "string", "minLength": 1}},
        },
    }
}

MAX_BODY = 1 << 20  # POST /v0/sql

_bearer = HTTPBearer(auto_error=False, description="A token from BUCKETER_API_TOKEN")
_query_token = APIKeyQuery(name="token", auto_error=False, description="The same token as a query parameter")


def _digits(value: Any) -> Any:
    """Integers in a query string as plain decimal digits only (pydantic alone takes "1.0", "+1", " 1", "1_0")."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("expected a non-negative integer written in decimal digits")
    return value


Digits = BeforeValidator(_digits)
Limit = Annotated[int | None, Digits, Query(ge=0, le=1_000_000_000, description="At most this many rows.")]
Offset = Annotated[int | None, Digits, Query(ge=0, le=1_000_000_000_000, description="Skip this many rows first.")]
SegmentId = Annotated[str | None, Query(max_length=1000, description="Only the rows of this segment.")]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _engine_reason(message: str) -> str:
    """An engine message without its trace of the expression that failed (``: while executing 'FUNCTION …'``)."""
    cut = message.find(": while executing")
    if cut < 0:
        return message
    code = re.search(r"\s\(([A-Z_]+)\)\s*$", message)
    return message[:cut] + (f" ({code.group(1)})" if code else "")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body", "path"))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    return "invalid parameters: " + "; ".join(parts) if parts else "invalid request"


def _tail(segment_id: str | None, limit: int | None, offset: int | None) -> tuple[str, dict[str, Any]]:
    """WHERE/LIMIT/OFFSET for the optional pipe parameters (clauses only for the values given; bound)."""
    sql = ""
    params: dict[str, Any] = {}
    if segment_id is not None:
        sql += "\nWHERE segmentId = {segmentId:String}"
        params["segmentId"] = segment_id
    if limit is not None:
        sql += "\nLIMIT {limit:UInt64}"
        params["limit"] = limit
        if offset is not None:
            sql += " OFFSET {offset:UInt64}"
            params["offset"] = offset
    elif offset is not None:
        sql += "\nLIMIT {offset:UInt64}, 18446744073709551615"
        params["offset"] = offset
    return sql, params


# The caller's own limits on /v0/sql (what `bucketer query --max-seconds/--max-rows/--max-memory-mb` sends):
# each may only tighten the server's (QueryLimits.within), never raise it. (kind, lowest, highest, description):
# the engine keeps max_execution_time in microseconds and takes anything under one as 0, which is no limit at
# all, so the time limit starts at a millisecond (as --max-seconds does).
LIMIT_PARAMS: dict[str, tuple[type, float, float, str]] = {
    "max_seconds": (float, 0.001, 1e6, "Time limit of this query, seconds (the server's own limit if lower)."),
    "max_rows": (int, 1, 1e15, "Most result rows of this query (the server's own limit if lower)."),
    "max_memory_mb": (int, 1, 1e9, "Memory limit of this query, MiB (the server's own limit if lower)."),
}
_LIMIT_OPENAPI = [
    {
        "name": name,
        "in": "query",
        "required": False,
        "description": why,
        "schema": {"type": "number", "minimum": low, "maximum": top}
        if kind is float
        else {"type": "integer", "minimum": int(low), "maximum": int(top)},
    }
    for name, (kind, low, top, why) in LIMIT_PARAMS.items()
]


# Query parameters /v0/sql reads itself: a ``{name:Type}`` of one of these names in the SQL is refused (400), not
# bound to the statement, the token or the caller's limit (which would then also limit the query).
RESERVED_PARAMS = ("q", "token", *LIMIT_PARAMS)


def caller_limits(query: Mapping[str, str], cap: QueryLimits) -> QueryLimits:
    """The limits of one request: ``cap`` (the server's), tightened by the caller's ``max_seconds``,
    ``max_rows``, ``max_memory_mb`` query parameters; an ill-formed or out-of-range value is a 400."""
    given: dict[str, float] = {}
    for name, (kind, low, top, _) in LIMIT_PARAMS.items():
        raw = query.get(name)
        if raw is None:
            continue
        text = raw.strip()
        # At most 40 characters: int() refuses past 4300 digits with a ValueError (a 500), and no limit needs more.
        ok = len(text) <= 40 and text.isascii()
        ok = ok and (text.isdigit() if kind is int else re.fullmatch(r"\d+(\.\d*)?|\.\d+", text) is not None)
        value = kind(text) if ok else None
        if value is None or not low <= value <= top:
            what = "an integer" if kind is int else "a number of seconds"
            raise ApiError(
                400, f"invalid parameters: {name}: expected {what} from {low:g} to {top:g}, got {raw[:40]!r}"
            )
        given[name] = value
    if not given:
        return cap
    mine = QueryLimits(
        given.get("max_seconds", cap.timeout_s),
        int(given.get("max_rows", cap.max_result_rows)),
        int(given["max_memory_mb"]) << 20 if "max_memory_mb" in given else cap.max_memory_bytes,
    )
    return mine.within(cap)


def create_app(
    connect: Callable[[], Any],
    config: ApiConfig | None = None,
    ready: Callable[[], str | None] | None = None,
    metrics: Any = None,
    dlq_by_class: Callable[[], Mapping[str, int]] | None = None,
    rebucket: Any = None,
) -> FastAPI:
    """The API over the warehouses ``connect()`` opens (unopened handles, as ``open_warehouse`` returns them).

    ``ready()`` returns why the process is not ready (or None) for /readyz; ``metrics`` (a prometheus-client
    registry) is served at /metrics; ``dlq_by_class()`` (dead letters per class, e.g. stream.dlq.ClassCounts)
    goes in /v0/status."""
    cfg = config or ApiConfig()
    pool = HandlePool(connect, cfg.pool_size, cfg.pool_wait_s)
    projects = ProjectCache()
    tokens = tuple(t.encode() for t in cfg.tokens)
    figures = None
    if cfg.kafka is not None:
        from connectors.topics import TopicNames
        from stream.status import KafkaFigures

        figures = KafkaFigures(cfg.kafka, TopicNames(cfg.topic_prefix), cfg.router_group, ttl=cfg.kafka_ttl_s)

    async def authorize(  # async: it does not block, and a sync dependency costs a trip to the thread pool
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
        token: Annotated[str | None, Security(_query_token)],
    ) -> None:
        if not tokens:
            return
        given = bearer.credentials if bearer is not None else token
        if not given:
            raise ApiError(401, "a token is required: Authorization: Bearer TOKEN or ?token=TOKEN")
        if not any(hmac.compare_digest(given.encode(), t) for t in tokens):
            raise ApiError(401, "invalid token")

    def single_valued(request: Request) -> None:
        """Every parameter of this API is one value: a repeated one (``?segmentId=a&segmentId=b``) is ambiguous
        and refused, never read as its last value (schemathesis found it accepted)."""
        keys = [k for k, _ in request.query_params.multi_items()]
        if len(keys) != len(set(keys)):
            twice = sorted({k for k in keys if keys.count(k) > 1})
            raise ApiError(400, f"parameter {', '.join(map(repr, twice))} given more than once; give each once")

    app = FastAPI(
        title="bucketer",
        version="0.1.0",
        description="Tinybird-compatible query API over the bucketer warehouse.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.pool = pool
    app.state.token_required = bool(tokens)  # what the CLI learns from the data dir's record (announce_api)
    app.state.projects = projects
    app.state.kafka_figures = figures
    auth = [Depends(authorize)]
    with_params = [*auth, Depends(single_valued)]  # the routes that read parameters (and document 400)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(QueryError)
    async def _query_error(_: Request, exc: QueryError) -> JSONResponse:
        return _error(exc.status, _engine_reason(str(exc)))

    @app.exception_handler(WarehouseError)
    async def _warehouse_error(_: Request, exc: WarehouseError) -> JSONResponse:
        msg = str(exc)
        if "Code: " in msg:
            err = engine_error(msg)
            return _error(err.status, _engine_reason(str(err)))
        return _error(503, f"warehouse unavailable: {msg}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("api: %s %s failed: %s", request.method, request.url.path, one_line(exc), exc_info=exc)
        return _error(500, "internal error (logged)")

    def run(
        statement: str, params: Mapping[str, Any], fmt: str = "JSON", limits: QueryLimits | None = None
    ) -> Response:
        with READERS.reading(), pool.handle() as wh:  # held back only while a rebucket renames tables
            body = execute(wh, statement, params, limits or cfg.limits, fmt)
        return Response(body, media_type=FORMATS[fmt])

    def pipe_rows(
        source: str, params: dict[str, Any], segment_id: str | None, limit: int | None, offset: int | None
    ) -> Response:
        """A built-in pipe's answer: ``source`` with the optional segmentId/limit/offset clauses, all bound."""
        tail, more = _tail(segment_id, limit, offset)
        return run(source + tail, params | more)

    def project_bucket(project: str, bucket_id: Any) -> int:
        """The bucket of an enabled project (404 otherwise); a bucketId given too must be that one (400)."""
        with pool.handle() as wh:
            found = projects.resolve(wh, project)
        if bucket_id is not None and str(bucket_id) != str(found.bucket):
            raise ApiError(400, f"bucketId {bucket_id} is not the bucket of project {project!r} ({found.bucket})")
        return found.bucket

    def sql_answer(q: str | None, query: Mapping[str, str]) -> Response:
        if q is None or not q.strip():
            raise ApiError(400, "the q parameter (one SQL statement) is required")
        limits = caller_limits(query, cfg.limits)
        statement, fmt = split_format(read_only(q))
        params: dict[str, Any] = {}
        for name in sql_params(statement):
            if name in RESERVED_PARAMS:
                raise ApiError(
                    400,
                    f"{{{name}:Type}} in the query: {name!r} is a parameter of the API itself "
                    f"({', '.join(RESERVED_PARAMS)}); give the SQL parameter another name",
                )
            if name not in query:
                raise ApiError(400, f"missing parameter {name!r} (used as {{{name}:Type}} in the query)")
            params[name] = query[name]
        return run(statement, params, fmt, limits)

    @app.get(
        "/v0/sql",
        dependencies=with_params,
        responses=_SQL_OK | _QUERY_ERRORS,
        openapi_extra={"parameters": _LIMIT_OPENAPI},
        summary="Read-only SQL (FORMAT JSON by default)",
    )
    def sql_get(
        request: Request,
        q: Annotated[str, Query(min_length=1, description="One SELECT; a trailing FORMAT picks the output.")],
    ) -> Response:
        return sql_answer(q, request.query_params)

    @app.post(
        "/v0/sql",
        dependencies=with_params,
        responses=_SQL_OK | _QUERY_ERRORS,
        openapi_extra=_SQL_BODY | {"parameters": _LIMIT_OPENAPI},
        summary="Read-only SQL, the query in the body (form field q or text)",
    )
    async def sql_post(request: Request) -> Response:
        from urllib.parse import parse_qs

        from starlette.concurrency import run_in_threadpool

        q = request.query_params.get("q")
        if q is None:
            body = await request.body()
            if len(body) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
            text = body.decode("utf-8", errors="replace")
            if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                # Parsed here (no python-multipart): a form field q, like Tinybird's POST /v0/sql.
                values = parse_qs(text, keep_blank_values=True).get("q")
                q = values[0] if values else None
            else:
                q = text
        return await run_in_threadpool(sql_answer, q, request.query_params)

    @app.get(
        f"/v0/pipes/{UNION_VIEW}.json",
        dependencies=with_params,
        responses=_PIPE_OK | _QUERY_ERRORS,
        summary="Every cleaned bucket",
    )
    def union_pipe(segmentId: SegmentId = None, limit: Limit = None, offset: Offset = None) -> Response:  # noqa: N803
        return pipe_rows(f"SELECT * FROM {UNION_VIEW}", {}, segmentId, limit, offset)

    @app.get(
        f"/v0/pipes/{ROUTING_VIEW}.json",
        dependencies=with_params,
        responses=_PIPE_OK | _QUERY_ERRORS,
        summary="One cleaned bucket, by id or project",
    )
    def routing_pipe(
        bucketId: Annotated[int | None, Digits, Query(ge=0, le=1_000_000, description="The bucket (0..N-1).")] = None,  # noqa: N803
        project: Annotated[
            str | None, Query(max_length=1000, description="A project slug: its bucket is used.")
        ] = None,
        segmentId: SegmentId = None,  # noqa: N803
        limit: Limit = None,
        offset: Offset = None,
    ) -> Response:
        if project is not None:
            bucket = project_bucket(project, bucketId)
            # The id comes from project_buckets, so it is valid: read the table itself, without the view's check
            # (its reader columns, FINAL, as the views read it).
            source = f"SELECT {cleaned_select_list()} FROM {cleaned_table(bucket)} FINAL"
            return pipe_rows(source, {}, segmentId, limit, offset)
        if bucketId is None:
            raise ApiError(400, "missing parameter bucketId (or project)")
        source = f"SELECT * FROM {ROUTING_VIEW}(bucketId = {{bucketId:Int64}})"
        return pipe_rows(source, {"bucketId": bucketId}, segmentId, limit, offset)

    @app.get(
        f"/v0/pipes/{PROJECT_VIEW}.json",
        dependencies=with_params,
        responses=_PIPE_OK | _QUERY_ERRORS,
        summary="The bucket of a project",
    )
    def project_pipe(
        project: Annotated[str, Query(max_length=1000, description="The project's slug.")],
    ) -> Response:
        with pool.handle() as wh:
            projects.resolve(wh, project)  # 404 for an unknown or disabled project
        return run(
            f"SELECT project, projectId, segmentId, bucketId FROM {PROJECT_VIEW}(project = {{project:String}})",
            {"project": project},
        )

    def user_pipe(pipe: UserPipe) -> Callable[[Request], Response]:
        def answer(request: Request) -> Response:
            query = request.query_params
            params: dict[str, Any] = {}
            for name, _ in pipe.params:
                if name in query:
                    params[name] = query[name]
            if "bucketId" in dict(pipe.params) and query.get("project") is not None:
                params["bucketId"] = project_bucket(query["project"], params.get("bucketId"))
            missing = [n for n, _ in pipe.params if n not in params]
            if missing:
                raise ApiError(400, f"missing parameter(s) {', '.join(missing)} of pipe {pipe.name!r}")
            return run(pipe.sql, params)

        return answer

    for pipe in cfg.pipes:
        parameters = [
            {"name": n, "in": "query", "required": n != "bucketId", "schema": _param_schema(t)} for n, t in pipe.params
        ]
        if "bucketId" in dict(pipe.params):
            parameters.append({"name": "project", "in": "query", "required": False, "schema": {"type": "string"}})
        app.add_api_route(
            f"/v0/pipes/{pipe.name}.json",
            user_pipe(pipe),
            methods=["GET"],
            dependencies=with_params,
            responses=_PIPE_OK | _QUERY_ERRORS,
            summary=f"User pipe {pipe.name}",
            openapi_extra={"parameters": parameters},
        )

    @app.get("/v0/pipes/{name}.json", dependencies=with_params, include_in_schema=False)
    def unknown_pipe(name: str) -> Response:
        raise ApiError(404, f"no pipe {name!r}")

    def collect_status(wh: Any) -> dict[str, Any]:
        from stream.enrich import REBUILD_LOG
        from stream.status import collect

        try:
            st = collect(wh, figures=figures)
        except LookupError as exc:
            raise ApiError(503, str(exc)) from None
        out = st.as_json()
        logged = wh.rows(
            "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
            {"t": REBUILD_LOG},
        )[0][0]
        recent = (
            wh.rows(f"SELECT bucket, finishedAt, rows, seconds FROM {REBUILD_LOG} ORDER BY finishedAt DESC LIMIT 12")
            if logged
            else []
        )
        out["rebuilds"] = [
            {"bucket": int(b), "finished_at": _iso(at), "rows": int(rows), "seconds": float(sec)}
            for b, at, rows, sec in recent
        ]
        out["dlq_by_class"] = dict(dlq_by_class()) if dlq_by_class is not None else None
        return out

    if rebucket is not None:  # stream.migration.Controller of a running pipeline

        @app.post("/v0/rebucket", dependencies=with_params, include_in_schema=False)
        def rebucket_start(to: int | None = None, abort: bool = False) -> JSONResponse:
            from stream.migration import MigrationError

            try:
                return JSONResponse(rebucket.start(to, abort))
            except MigrationError as exc:
                raise ApiError(409, str(exc)) from None

        @app.get("/v0/rebucket", dependencies=auth, include_in_schema=False)
        def rebucket_state() -> JSONResponse:
            return JSONResponse(rebucket.report())

    @app.get(
        "/v0/status",
        dependencies=with_params,
        responses=_errors(400, 401, 503),
        summary="The JSON of `bucketer status --json`",
    )
    def status() -> JSONResponse:
        with READERS.reading(), pool.handle() as wh:
            return JSONResponse(collect_status(wh))

    @app.get(
        "/",
        dependencies=auth,
        responses=_HTML_OK | _errors(401),
        summary="The status page (HTML; draws /v0/status and refreshes itself)",
    )
    def page() -> HTMLResponse:
        from stream.status_page import status_page_html

        return HTMLResponse(status_page_html())

    @app.get("/healthz", summary="The process is alive")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        responses=_errors(503),
        summary="The warehouse answers (and, in `bucketer run`, the consumers are assigned)",
    )
    def readyz() -> JSONResponse:
        try:
            with pool.handle() as wh:
                wh.rows("SELECT 1")
        except (ApiError, WarehouseError) as exc:
            return _error(503, f"warehouse unavailable: {exc}")
        reason = ready() if ready is not None else None
        if reason:
            return _error(503, reason)
        return JSONResponse({"status": "ready"})

    if metrics is not None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        @app.get(
            "/metrics",
            summary="Prometheus metrics of the workers",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        )
        def metrics_endpoint() -> Response:
            return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return app


# --- serving ------------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or ServeError with a one-line reason (in use, out of range...)."""
    if not 0 <= port <= 65535:
        raise ServeError(f"HTTP port {port} is out of range (1-65535)")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio turns TCP_NODELAY on for accepted connections only when the
        # socket says it is TCP (base_events._set_nodelay); with proto 0 every small response waited on
        # Nagle and the client's delayed ACK (/healthz took 44 ms instead of 1, measured).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except (OSError, OverflowError) as exc:
        raise ServeError(f"cannot serve HTTP on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    sock.setblocking(False)
    return sock


class Server:
    """A uvicorn server on a bound socket; ``run()`` in the foreground, or ``start()``/``stop()`` in a thread."""

    def __init__(self, app: FastAPI, sock: socket.socket) -> None:
        import uvicorn

        class _Uvicorn(uvicorn.Server):
            # The caller owns the signals (bucketer.cli.install_stop -> stop()): uvicorn's own handlers would
            # re-raise SIGTERM after a graceful shutdown, so a clean stop would not exit 0.
            @contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        # access_log off: the access log prints the query string, and ?token= is a secret.
        self._uv = _Uvicorn(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self._sock = sock
        self._app = app
        self._thread: threading.Thread | None = None
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        # Where a local client connects (the CLI, from the data dir's record): loopback for a wildcard bind.
        local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        self.local_url = f"http://{local if ':' not in local else f'[{local}]'}:{port}"

    def run(self) -> None:
        from connectors.warehouse import announce_api

        # The socket already listens, so the record may go out before uvicorn runs: connections queue.
        withdraw = announce_api(self.local_url, bool(getattr(self._app.state, "token_required", False)))
        try:
            self._uv.run(sockets=[self._sock])
        finally:
            withdraw()
            self._app.state.pool.close()

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.run, name="bucketer-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._uv.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def stop_soon(self) -> None:
        """Ask the server to finish the requests in flight and return from run() (safe in a signal handler)."""
        self._uv.should_exit = True

    def stop(self) -> None:
        self._uv.should_exit = True
        if self._thread is not None:
            self._thread.join(15)


def pipeline_ready(pipeline: Any, timeout: float = 5.0) -> Callable[[], str | None]:
    """/readyz of ``bucketer run``: the router's and the loader's consumer groups have partitions assigned.

    Asked of the broker (describe the groups) with the API's own admin client: the workers' consumers are
    not touched from the API's threads (``assignment()`` on the loader's consumer blocked while it polled).
    Once both groups were seen assigned, later checks only ask that the pipeline is not stopping."""
    state: dict[str, Any] = {"ready": False, "admin": None}
    lock = threading.Lock()

    def check() -> str | None:
        cfg = pipeline.config
        if pipeline.router is None or pipeline.loader is None:
            return "the pipeline is starting"
        stopping = getattr(pipeline, "_stopping", None)
        if stopping is not None and stopping.is_set():
            return "the pipeline is stopping"
        if state["ready"]:
            return None
        with lock:
            from connectors.kafka import admin

            if state["admin"] is None:
                state["admin"] = admin(cfg.kafka, quiet=True)
            groups = [cfg.router_group, cfg.loader_group]
            try:
                futures = state["admin"].describe_consumer_groups(groups, request_timeout=timeout)
                for group, fut in futures.items():
                    members = fut.result(timeout=timeout + 1).members
                    if not any(m.assignment.topic_partitions for m in members):
                        return f"consumer group {group} has no partitions assigned yet"
            except Exception as exc:
                return f"cannot describe the consumer groups: {one_line(exc)}"
            state["ready"] = True
        return None

    return check


def serve_pipeline(pipeline: Any, http: HttpConfig) -> Server:
    """Start the API for a running ``Pipeline`` (its warehouse, its Kafka figures, its metrics)."""
    from dataclasses import replace

    from connectors.topics import TopicNames
    from stream.dlq import ClassCounts
    from stream.metrics import registry_for
    from stream.migration import Controller

    cfg = pipeline.config
    check_bind(http.host, http.api.tokens)
    sock = bind(http.host, http.port)
    api = replace(http.api, kafka=cfg.kafka, topic_prefix=cfg.topic_prefix, router_group=cfg.router_group)
    app = create_app(
        pipeline.connect,
        api,
        ready=pipeline_ready(pipeline),
        metrics=registry_for(router=pipeline.router, loader=pipeline.loader, rebuilds=pipeline.rebuilds),
        dlq_by_class=ClassCounts(cfg.kafka, TopicNames(cfg.topic_prefix)),
        rebucket=Controller(pipeline),
    )
    server = Server(app, sock).start()
    log.info("api: serving on %s", server.url)
    return server
