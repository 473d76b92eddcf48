"""The warehouse: ClickHouse SQL behind one small interface, two backends.

Contract (``Warehouse`` protocol):

- ``command(sql, params=None)``: run DDL/DML, no result.
- ``rows(sql, params=None) -> list[tuple]`` and ``dicts(sql, params=None) -> list[dict]``: a query's rows.
- ``insert(table, columns, rows)``: insert Python rows (small volumes: tests, reference fix-ups).
- ``exchange(a, b)``: swap two tables' names (the one swap enrichment and rebucket use; see its fallback).
- ``insert_json(table, select, data) -> None``: let ClickHouse parse JSON itself. ``data`` is JSON values
  (bytes of whitespace-separated values, or a sequence of values, e.g. Kafka message values as is);
  ``select`` is a SELECT whose FROM is the
  placeholder ``{source}``, a relation with one column ``v String`` holding one JSON value per row
  (``JSONAsString``). This is the loader's fast path: Python never parses the messages.
- Context manager: ``with open_warehouse(...) as wh``. Constructors do no I/O; ``__enter__`` connects.

Backends (both via clickhouse-connect, both speak the same SQL):

- ``EmbeddedWarehouse(data_dir)``: chdb in this process, data in ``data_dir`` (``chdb:///abs/path``). chdb hosts
  ONE engine per process, and one process may own a data directory: a lock file ``bucketer.lock`` (flock, with
  the owner's pid in it) refuses a second process with a one-line error. Inside one process a registry lets
  any number of warehouses open the same directory (each gets its own connection handle, so threads do not
  serialise on one client); opening another directory while one is open is a clear error. chdb can switch
  directories once every handle on the previous one is closed, so tests use one data dir each, in turn.
- Next to the lock, a process that serves the HTTP API over the directory it holds records where it listens
  (``announce_api``: ``bucketer.api.json`` with the URL, the pid and whether a token is needed, never a token),
  removed when it stops; ``dir_holder(data_dir)`` tells, without writing anything, whether a live process holds
  a directory and where its API is, so ``bucketer status``/``query`` can go through it instead of refusing.
  Opening a warehouse still writes (chdb itself writes a ``status`` file in its directory, even to read).
- ``ServerWarehouse(url)``: a ClickHouse server, ``http(s)://user:pass@host:port/database``.

Errors surface as ``WarehouseError`` (one line, no credentials) with ClickHouse's numeric error code in ``.code``
(None when the failure is not the engine's, e.g. a lost connection).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

LOCK_NAME = "bucketer.lock"
API_NAME = "bucketer.api.json"  # where the holder's HTTP API listens (announce_api), next to the lock
# Batches handed to chdb as files go to memory (tmpfs) when there is one: cheaper than a disk-backed file.
_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
ENGINE_DIR = "chdb"


class WarehouseError(RuntimeError):
    """A warehouse operation failed; the message is one line and safe to print. ``code``: ClickHouse's numeric
    error code when the engine reported the failure, else None: the one given (clickhouse-connect's, see
    ``_wrap``), or the ``Code: N`` the message carries (ClickHouse's own form, also what fakes raise)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code if code is not None else error_code(message)


_CODE = re.compile(r"\bCode: (\d+)")


def error_code(message: str) -> int | None:
    """ClickHouse's numeric error code in an engine message (``Code: N. DB::Exception: …``), else None."""
    m = _CODE.search(message)
    return int(m.group(1)) if m else None


class DataDirInUse(WarehouseError):
    """The data dir is locked by another process (``pid`` as its lock file says, None when unreadable)."""

    def __init__(self, message: str, data_dir: Path, pid: int | None) -> None:
        super().__init__(message)
        self.data_dir = data_dir
        self.pid = pid


def _wrap(exc: Exception) -> WarehouseError:
    """The engine's exception as a WarehouseError: one line, its error code kept (clickhouse-connect's
    ``.code``, else the message's)."""
    if isinstance(exc, WarehouseError):
        return exc
    code = getattr(exc, "code", None)
    return WarehouseError(one_line(exc), code if isinstance(code, int) else None)


@runtime_checkable
class Warehouse(Protocol):
    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None: ...

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]: ...

    def dicts(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]: ...

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None: ...

    def insert_json(self, table: str, select: str, data: bytes | Sequence[bytes]) -> None: ...

    def exchange(self, a: str, b: str) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:600]


class _ClientWarehouse:
    """The shared part: a clickhouse-connect client, set by the subclass's ``__enter__``."""

    _client: Any = None

    def _c(self) -> Any:
        if self._client is None:
            raise WarehouseError("the warehouse is not open (use it as a context manager)")
        return self._client

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        try:
            self._c().command(sql, parameters=dict(params) if params else None)
        except Exception as exc:
            raise _wrap(exc) from exc

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        try:
            return [tuple(r) for r in self._c().query(sql, parameters=dict(params) if params else None).result_rows]
        except Exception as exc:
            raise _wrap(exc) from exc

    def dicts(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        try:
            return list(self._c().query(sql, parameters=dict(params) if params else None).named_results())
        except Exception as exc:
            raise _wrap(exc) from exc

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        try:
            self._c().insert(table, [list(r) for r in rows], column_names=list(columns))
        except Exception as exc:
            raise _wrap(exc) from exc

    _atomic_exchange: bool | None = None  # does the database engine have EXCHANGE TABLES (asked once)

    def exchange(self, a: str, b: str) -> None:
        """Swap the names of the existing tables ``a`` and ``b``: ``EXCHANGE TABLES a AND b``, atomic, where the
        database engine has it (Atomic, Replicated, Shared: what chdb and a default server give).

        Fallback, for a database engine without EXCHANGE (Ordinary, Lazy…): ``RENAME TABLE a TO a__exchange,
        b TO a, a__exchange TO b``. It is NOT atomic: a reader between the renames may find ``a`` missing, and
        a failure part-way can leave ``a__exchange`` behind (a later exchange of ``a`` then fails on it, naming
        it, rather than guess)."""
        cluster = getattr(self, "cluster", None)
        if cluster:
            raise WarehouseError(
                f"swapping {a} and {b} on cluster {cluster}: rebuilds and rebucket are not cluster-aware yet "
                "(see README, Configuration)"
            )
        if self._atomic_exchange is None:
            engine = self.rows("SELECT engine FROM system.databases WHERE name = currentDatabase()")
            self._atomic_exchange = bool(engine) and engine[0][0] in _EXCHANGE_ENGINES
        if self._atomic_exchange:
            self.command(f"EXCHANGE TABLES {a} AND {b}")
        else:
            self.command(f"RENAME TABLE {a} TO {a}__exchange, {b} TO {a}, {a}__exchange TO {b}")


_EXCHANGE_ENGINES = frozenset({"Atomic", "Replicated", "Shared"})


def write_all(fd: int, chunks: Sequence[bytes]) -> None:
    """Write every chunk to ``fd`` with writev (no copy into one buffer), finishing partial writes."""
    step = 1024  # IOV_MAX on Linux
    for i in range(0, len(chunks), step):
        group = chunks[i : i + step]
        written = os.writev(fd, group)
        expected = sum(len(c) for c in group)
        if written < expected:
            rest = memoryview(b"".join(group))[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]


# --- embedded (chdb) ------------------------------------------------------------------------------------------


@dataclass
class _Engine:
    path: str
    lock_fd: int
    data_dir: Path
    users: int = 0


_registry_lock = threading.Lock()
_engine: _Engine | None = None


_UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def _flock_soon(fd: int) -> None:
    """The exclusive lock, or OSError when another process keeps it: ``dir_holder`` probes with a shared lock
    held for microseconds, so a few quick retries keep a probe from turning an owner away."""
    for _ in range(9):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.02)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _take_dir_lock(data_dir: Path) -> int:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a file in the way, a read-only or unwritable directory: one line, not a traceback
        # Not writable: chdb writes its status file in the directory even to read, so there is no read-only mode.
        why = " (the embedded engine writes in its data dir even to read)" if exc.errno in _UNWRITABLE else ""
        raise WarehouseError(f"cannot use data dir {data_dir}: {exc.strerror or exc}{why}") from None
    try:
        _flock_soon(fd)
    except OSError:
        try:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise DataDirInUse(
            f"data dir {data_dir} is in use by another bucketer process (pid {owner}); "
            f"stop it or use another --data-dir",
            data_dir,
            int(owner) if owner.isdigit() else None,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _acquire_engine(data_dir: Path) -> str:
    """Register one more user of the process's chdb engine at ``data_dir``; returns the engine path."""
    global _engine
    path = os.path.realpath(data_dir / ENGINE_DIR)
    with _registry_lock:
        if _engine is not None:
            if _engine.path != path:
                raise WarehouseError(
                    f"this process already has the embedded warehouse at {_engine.path} open; "
                    f"chdb hosts one data dir per process (close it before opening {path})"
                )
            _engine.users += 1
            return path
        fd = _take_dir_lock(Path(data_dir))
        _engine = _Engine(path=path, lock_fd=fd, data_dir=Path(data_dir), users=1)
        return path


def _release_engine() -> None:
    global _engine
    with _registry_lock:
        if _engine is None:
            return
        _engine.users -= 1
        if _engine.users <= 0:
            try:
                fcntl.flock(_engine.lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(_engine.lock_fd)
            _engine = None


def announce_api(url: str, token_required: bool) -> Callable[[], None]:
    """Record where this process serves the HTTP API over the data dir it holds (``API_NAME`` next to the
    lock: url, pid, whether a token is required; never a token). Returns the function that removes the record
    (only while it is still this process's). No embedded data dir held (a ClickHouse server), or a directory
    that cannot be written: nothing recorded, and the remover does nothing."""
    with _registry_lock:
        held = _engine
    if held is None:
        return lambda: None
    path = held.data_dir / API_NAME
    pid = os.getpid()
    tmp = path.with_name(f".{API_NAME}.{pid}")
    try:
        tmp.write_text(json.dumps({"url": url, "pid": pid, "token_required": token_required}) + "\n")
        os.replace(tmp, path)  # a reader never sees half a record
    except OSError:
        return lambda: None

    def withdraw() -> None:
        try:
            if json.loads(path.read_text()).get("pid") == pid:
                path.unlink()
        except (OSError, ValueError, AttributeError):
            pass

    return withdraw


@dataclass(frozen=True)
class DirHolder:
    """The live process holding a data dir: its pid, and where it serves the HTTP API (None: it does not)."""

    pid: int | None
    api_url: str | None = None
    token_required: bool = False


def dir_holder(data_dir: str | Path) -> DirHolder | None:
    """Who holds ``data_dir`` now, or None when no process does. Reads only: the lock file is opened read-only
    and probed with a shared flock, which fails while an owner holds its exclusive one (a flock dies with its
    process, so a held lock means a live holder). The API record counts only when its pid is the lock's."""
    try:
        fd = os.open(Path(data_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 64, 0).decode(errors="replace").strip()
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
    finally:
        os.close(fd)
    pid = int(raw) if raw.isdigit() else None
    try:
        record = json.loads((Path(data_dir) / API_NAME).read_text())
    except (OSError, ValueError):
        record = None
    if (
        pid is None
        or not isinstance(record, dict)
        or record.get("pid") != pid
        or not isinstance(record.get("url"), str)
    ):
        return DirHolder(pid)
    return DirHolder(pid, record["url"], bool(record.get("token_required")))


_WRITES: dict[str, int] = {}  # engine dsn -> writes finished (EmbeddedWarehouse.write_epoch)
_WRITES_LOCK = threading.Lock()


def _wrote(dsn: str) -> None:
    # Counted after the write returns: a reader that saw the old number may have read the old data, and it
    # will see the new number on its next look.
    with _WRITES_LOCK:
        _WRITES[dsn] = _WRITES.get(dsn, 0) + 1


class EmbeddedWarehouse(_ClientWarehouse):
    """chdb in this process, data under ``data_dir``; ``database`` is created on open."""

    def __init__(self, data_dir: str | Path, database: str = "bucketer") -> None:
        self.data_dir = Path(data_dir).absolute()
        self.database = database
        self._client = None
        self._registered = False

    @property
    def dsn(self) -> str:
        return f"chdb://{os.path.realpath(self.data_dir / ENGINE_DIR)}"

    def __enter__(self) -> Self:
        import clickhouse_connect

        if "?" in str(self.data_dir):  # chdb reads what follows a '?' as engine options, not as the path
            raise WarehouseError(f"data dir {self.data_dir}: chdb cannot use a path with '?' in it")
        path = _acquire_engine(self.data_dir)
        self._registered = True
        try:
            # clickhouse-connect's public chdb backend (>= 1.6), the same as dsn="chdb://<path>" but with the
            # path as it is: a DSN would be URL-parsed, so a '?' or '#' in a data dir would name another
            # directory. Each client is its own chdb connection handle on the process's one engine.
            client = clickhouse_connect.get_client(interface="chdb", path=path)
            client.command(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
            client.database = self.database
            self._client = client
        except Exception as exc:
            self.__exit__()
            raise WarehouseError(f"cannot open the embedded warehouse at {path}: {one_line(exc)}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        client, self._client = self._client, None
        try:
            if client is not None:
                client.close()
        finally:
            if self._registered:
                self._registered = False
                _release_engine()

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        try:
            super().command(sql, params)
        finally:
            _wrote(self.dsn)

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        try:
            super().insert(table, columns, rows)
        finally:
            _wrote(self.dsn)

    def write_epoch(self) -> int:
        """How many writes (commands, inserts) this process's handles on this engine have finished, failed ones
        included. No other process can write to an embedded data dir (chdb: one process per directory), so a
        result read when this number was E is still the warehouse's while it is E."""
        return _WRITES.get(self.dsn, 0)

    def insert_json(self, table: str, select: str, data: bytes | Sequence[bytes]) -> None:
        if not data:
            return
        fd, name = tempfile.mkstemp(prefix="bucketer-", suffix=".json", dir=_SCRATCH or self.data_dir)
        try:
            try:
                # JSONAsString needs no separator between objects: the values go out as they are, no join.
                write_all(fd, [data] if isinstance(data, bytes) else data)
            finally:
                os.close(fd)
            source = f"file('{name}', 'JSONAsString', 'v String')"
            self.command(f"INSERT INTO {table} " + select.replace("{source}", source))
        finally:
            os.unlink(name)

    @contextmanager
    def json_parts(self, parts: Sequence[Sequence[bytes]]) -> Iterator[str]:
        """A relation ``(_part UInt32, v String)`` over the JSON values of each part (``_part`` = its index), for
        the queries run inside the block: the values are written once, one file per part, and ClickHouse reads
        them (every file in parallel) as often as asked. Removed when the block ends."""
        folder = tempfile.mkdtemp(prefix="bucketer-parts-", dir=_SCRATCH or self.data_dir)
        try:
            for i, values in enumerate(parts):
                fd = os.open(os.path.join(folder, f"{i}.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    write_all(fd, values)
                finally:
                    os.close(fd)
            yield (
                f"(SELECT toUInt32(splitByChar('.', _file)[1]) AS _part, v "
                f"FROM file('{folder}/*.json', 'JSONAsString', 'v String'))"
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@runtime_checkable
class SupportsJsonParts(Protocol):
    """A warehouse that can expose several batches of JSON values as one relation (the embedded one)."""

    def json_parts(self, parts: Sequence[Sequence[bytes]]) -> AbstractContextManager[str]: ...


# --- a ClickHouse cluster ------------------------------------------------------------------------------------
CLUSTER_ENV = "BUCKETER_CLICKHOUSE_CLUSTER"
# Where a replicated table keeps its replication log in [Zoo]Keeper, and the replica's name: the server's
# macros ({shard}, {replica}, in its config) and the table's own names, expanded by ClickHouse at CREATE time.
REPLICA_ARGS = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"
_CLUSTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_CREATE = re.compile(r"^CREATE (?:OR REPLACE )?(?:MATERIALIZED )?(?:TABLE|VIEW) (?:IF NOT EXISTS )?(\S+)")
_ENGINE = re.compile(r"\bENGINE = (\w*)MergeTree\b(?:\(([^()]*)\))?")
_LOCAL_ENGINES = re.compile(r"\bENGINE = (Memory|Set|Join|Buffer|Null)\b")


def check_cluster(cluster: str) -> str:
    if not _CLUSTER_NAME.match(cluster):
        raise WarehouseError(f"{CLUSTER_ENV}={cluster!r} is not a cluster name (letters, digits, _ . -)")
    return cluster


def cluster_ddl(sql: str, cluster: str | None) -> str:
    """The schema statement ``sql`` for ``cluster``: ``ON CLUSTER`` after the object's name, and a MergeTree
    family engine made its Replicated twin (``ReplacingMergeTree(v, d)`` ->
    ``ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', v, d)``).
    ``sql`` unchanged when ``cluster`` is None. Only CREATE TABLE / VIEW / MATERIALIZED VIEW statements of
    MergeTree tables or views are accepted (anything else is refused: a ValueError naming it), so a statement
    this does not understand never runs half-clustered."""
    if not cluster:
        return sql
    check_cluster(cluster)
    match = _CREATE.match(sql)
    if match is None or _LOCAL_ENGINES.search(sql):
        raise ValueError(f"not a schema statement for a cluster: {sql.splitlines()[0][:120]}")
    clustered = f"{sql[: match.end()]} ON CLUSTER `{cluster}`{sql[match.end() :]}"

    def replicated(m: re.Match[str]) -> str:
        args = REPLICA_ARGS + (f", {m.group(2)}" if m.group(2) else "")
        return f"ENGINE = Replicated{m.group(1)}MergeTree({args})"

    return _ENGINE.sub(replicated, clustered, count=1)


def schema_command(wh: Any, sql: str) -> None:
    """Run the schema statement ``sql`` on ``wh``, ON CLUSTER when ``wh`` is a server warehouse on a cluster."""
    wh.command(cluster_ddl(sql, getattr(wh, "cluster", None)))


# --- server ---------------------------------------------------------------------------------------------------


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class ServerWarehouse(_ClientWarehouse):
    """A ClickHouse server at ``url`` (http/https). The URL path names the database (default ``bucketer``).
    With ``cluster``, the schema is made ON CLUSTER with Replicated engines (``cluster_ddl``); the rebuild swaps
    (``exchange``) are refused there: they are not cluster-aware yet."""

    def __init__(self, url: str, cluster: str | None = None) -> None:
        self.url = url
        self.cluster = check_cluster(cluster) if cluster else None
        parts = urlsplit(url)
        self.database = parts.path.strip("/") or "bucketer"
        self._client = None

    def __enter__(self) -> Self:
        import clickhouse_connect

        parts = urlsplit(self.url)
        try:
            client = clickhouse_connect.get_client(
                host=parts.hostname or "localhost",
                port=parts.port or (8443 if parts.scheme == "https" else 8123),
                username=parts.username or "default",
                password=parts.password or "",
                secure=parts.scheme == "https",
            )
            on_cluster = f" ON CLUSTER `{self.cluster}`" if self.cluster else ""
            client.command(f"CREATE DATABASE IF NOT EXISTS `{self.database}`{on_cluster}")
            client.database = self.database
        except Exception as exc:
            raise WarehouseError(f"cannot reach ClickHouse at {redact(self.url)}: {one_line(exc)}") from exc
        self._client = client
        return self

    def __exit__(self, *exc: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def insert_json(self, table: str, select: str, data: bytes | Sequence[bytes]) -> None:
        if not data:
            return
        if not isinstance(data, bytes):
            data = b"\n".join(data)
        sql = f"INSERT INTO {table} " + select.replace("{source}", "input('v String')") + " FORMAT JSONAsString"
        try:
            self._c().command(sql, data=data)
        except Exception as exc:
            raise _wrap(exc) from exc


def open_warehouse(
    data_dir: str | Path = ".bucketer", url: str | None = None, database: str = "bucketer", cluster: str | None = None
) -> EmbeddedWarehouse | ServerWarehouse:
    """The warehouse to use: a server when ``url`` is given, else the embedded one in ``data_dir``.
    ``cluster`` (default: BUCKETER_CLICKHOUSE_CLUSTER) is for a server only: with chdb it is refused in one line.
    Not yet connected; use it as a context manager."""
    cluster = cluster if cluster is not None else (os.environ.get(CLUSTER_ENV) or None)
    if url:
        return ServerWarehouse(url, cluster=cluster)
    if cluster:
        raise WarehouseError(
            f"{CLUSTER_ENV}={cluster} needs a ClickHouse server (BUCKETER_CLICKHOUSE_URL): the embedded chdb is "
            "one process, not a cluster"
        )
    return EmbeddedWarehouse(data_dir, database=database)
