"""The query path against the real chdb engine: files, network and servers stay out of reach, limits hold and
cannot be raised from the SQL, writes are refused, and harmless exploration (SHOW, DESCRIBE, EXPLAIN, EXISTS,
FORMAT) works."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.warehouse import EmbeddedWarehouse
from stream.query import (
    QueryError,
    QueryForbidden,
    QueryLimits,
    QueryTimeout,
    QueryTooLarge,
    open_session,
    query_raw,
    run_query,
)

SECRET = "s3cr3t-host-file-content"


class Listener:
    """A TCP port that counts the connections made to it: proof that nothing reached for the network."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("host") / "secret.txt"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture(scope="module")
def wh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedWarehouse]:
    d: Path = tmp_path_factory.mktemp("qsafe")
    with EmbeddedWarehouse(d) as w:
        w.command("CREATE TABLE t (x UInt32, at DateTime('UTC')) ENGINE = MergeTree ORDER BY x")
        w.command("INSERT INTO t VALUES (1, '2025-03-01 10:00:00'), (2, '2025-03-01 11:30:00')")
        yield w


def _outside(secret: Path, port: int) -> list[str]:
    f, p = str(secret), port
    return [
        # host files: the table function, the scalar function (readonly alone lets it through), hidden in parts
        f"SELECT * FROM file('{f}', 'LineAsString')",
        f"SELECT file('{f}') AS content",
        f"SELECT `file`('{f}') AS content FORMAT CSV",
        f"WITH h AS (SELECT * FROM file('{f}', 'LineAsString')) SELECT * FROM h",
        f"SELECT * FROM t JOIN (SELECT 1 AS x FROM file('{f}', 'LineAsString')) USING x",
        f"SELECT x FROM t WHERE toString(x) IN (SELECT file('{f}'))",
        f"SELECT arrayMap(p -> file(p), ['{f}'])",
        f"SELECT * FROM view(SELECT file('{f}'))",
        f"EXPLAIN PLAN actions = 1 SELECT file('{f}')",
        f"DESCRIBE (SELECT * FROM file('{f}', 'LineAsString'))",
        f"SELECT * FROM fileCluster('default', '{f}', 'LineAsString')",
        f"SELECT * FROM sqlite('{f}', 't')",
        "SELECT * FROM filesystem('/etc')",
        # network and other servers, all aimed at a port that counts connections
        f"SELECT * FROM url('http://127.0.0.1:{p}/x', 'CSV', 'a String')",
        f"SELECT * FROM urlCluster('default', 'http://127.0.0.1:{p}/x', 'CSV', 'a String')",
        f"SELECT * FROM s3('http://127.0.0.1:{p}/mybucket/x.csv', 'CSV', 'a String')",
        f"SELECT * FROM gcs('http://127.0.0.1:{p}/mybucket/x.csv', 'CSV', 'a String')",
        f"SELECT * FROM azureBlobStorage('http://127.0.0.1:{p}/acct', 'cont', 'x.csv', 'CSV', 'a String')",
        f"SELECT * FROM iceberg('http://127.0.0.1:{p}/mybucket/x/')",
        f"SELECT * FROM deltaLake('http://127.0.0.1:{p}/mybucket/x/')",
        f"SELECT * FROM hdfs('hdfs://127.0.0.1:{p}/x', 'CSV', 'a String')",
        f"SELECT * FROM remote('127.0.0.1:{p}', system.one)",
        f"SELECT * FROM remoteSecure('127.0.0.1:{p}', system.one)",
        f"SELECT * FROM mysql('127.0.0.1:{p}', 'd', 't', 'u', 'p')",
        f"SELECT * FROM postgresql('127.0.0.1:{p}', 'd', 't', 'u', 'p')",
        f"SELECT * FROM mongodb('127.0.0.1:{p}', 'd', 'c', 'u', 'p', 'a String')",
        f"SELECT * FROM redis('127.0.0.1:{p}', 'k', 'k String')",
        "SELECT * FROM jdbc('jdbc:x', 'y', 'z')",
        # programs and the process's own memory
        "SELECT * FROM executable('id', 'TabSeparated', 'a String')",
        "SELECT * FROM input('a String')",
        "SELECT * FROM python(SECRET)",
    ]


def test_everything_reaching_outside_is_refused(wh: EmbeddedWarehouse, secret_file: Path, listener: Listener) -> None:
    for sql in _outside(secret_file, listener.port):
        t0 = time.monotonic()
        with pytest.raises(QueryForbidden) as err:
            query_raw(wh, sql)
        assert SECRET not in str(err.value) and "\n" not in str(err.value), sql
        assert time.monotonic() - t0 < 5, sql
    assert listener.connections == 0


@pytest.mark.parametrize(
    "fn", ["file", "url", "s3", "hdfs", "remote", "mysql", "postgresql", "executable", "sqlite", "azureBlobStorage"]
)
def test_the_engine_itself_refuses_table_functions_in_the_session(
    wh: EmbeddedWarehouse, secret_file: Path, listener: Listener, fn: str
) -> None:
    """Below the statement check: the session's readonly = 1 alone refuses the table functions."""
    sql = next(s for s in _outside(secret_file, listener.port) if s.startswith(f"SELECT * FROM {fn}("))
    session = open_session(wh, QueryLimits())
    try:
        with pytest.raises(QueryForbidden, match="readonly"):
            session.raw(sql, {}, None)
    finally:
        session.close()
    assert listener.connections == 0


def test_harmless_table_functions_and_system_tables_still_work(wh: EmbeddedWarehouse) -> None:
    assert run_query(wh, "SELECT count() AS n FROM numbers(10)") == [{"n": 10}]
    assert run_query(wh, "SELECT sum(a) AS s FROM values('a UInt8', 1, 2, 3)") == [{"s": 6}]
    assert run_query(wh, "SELECT count() AS n FROM merge(currentDatabase(), '^t$')") == [{"n": 2}]
    assert run_query(wh, "SELECT name FROM system.tables WHERE database = currentDatabase()") == [{"name": "t"}]


def test_limits_are_set_and_cannot_be_raised_or_unset(wh: EmbeddedWarehouse) -> None:
    limits = QueryLimits(timeout_s=7, max_result_rows=1234, max_memory_bytes=1 << 30)
    got = run_query(
        wh,
        "SELECT getSetting('readonly') AS ro, getSetting('max_execution_time') AS t, "
        "getSetting('max_result_rows') AS r, getSetting('max_memory_usage') AS m",
        limits=limits,
    )
    assert got == [{"ro": 1, "t": 7, "r": 1234, "m": 1 << 30}]
    for sql in (
        "SELECT 1 SETTINGS readonly = 0",
        "SELECT 1 SETTINGS readonly = 2",
        "SELECT 1 SETTINGS max_execution_time = 0",
        "SELECT 1 SETTINGS max_execution_time = 1000",
        "SELECT 1 SETTINGS max_result_rows = 0",
        "SELECT 1 SETTINGS timeout_overflow_mode = 'break'",
        "SELECT 1 FORMAT CSV SETTINGS max_memory_usage = 0",
        "SET readonly = 0",
        "SET max_execution_time = 0",
    ):
        with pytest.raises(QueryForbidden) as err:
            run_query(wh, sql, limits=limits) if "FORMAT" not in sql else query_raw(wh, sql, limits=limits)
        assert "\n" not in str(err.value), sql
    # Naming a setting at the value it has is no change, so readonly = 1 lets it through.
    assert query_raw(wh, "SELECT 1 FORMAT CSV SETTINGS readonly = 1", limits=limits) == b"1\n"
    # In a subquery the engine accepts a SETTINGS clause but does not apply it: the limits still hold.
    inner = "SELECT getSetting('readonly') AS ro, getSetting('max_execution_time') AS t SETTINGS readonly = 0, "
    assert run_query(wh, f"SELECT * FROM ({inner} max_execution_time = 1000)", limits=limits) == [{"ro": 1, "t": 7}]
    t0 = time.monotonic()
    with pytest.raises(QueryTimeout):
        run_query(
            wh,
            "SELECT * FROM (SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) = 1 "
            "SETTINGS max_execution_time = 1000)",
            limits=QueryLimits(timeout_s=1),
        )
    assert time.monotonic() - t0 < 5
    # The session's settings stay in the session: the warehouse's own connection is untouched.
    assert wh.rows("SELECT getSetting('readonly'), getSetting('max_execution_time')") == [(0, 0)]


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t VALUES (3, now())",
        "CREATE TABLE z (x UInt8) ENGINE = Memory",
        "DROP TABLE t",
        "ALTER TABLE t DELETE WHERE 1",
        "TRUNCATE TABLE t",
        "SYSTEM FLUSH LOGS",
        "KILL QUERY WHERE 1",
        "OPTIMIZE TABLE t FINAL",
        "USE system",
        "SELECT 1; DROP TABLE t",
        "/* SELECT */ DROP TABLE t",
    ],
)
def test_writes_are_refused_with_one_line_and_change_nothing(wh: EmbeddedWarehouse, sql: str) -> None:
    with pytest.raises(QueryForbidden) as err:
        run_query(wh, sql)
    assert err.value.status == 403 and "\n" not in str(err.value)
    assert run_query(wh, "SELECT count() AS n FROM t") == [{"n": 2}]


def test_into_outfile_writes_no_host_file(wh: EmbeddedWarehouse, tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    for sql in (f"SELECT * FROM t INTO OUTFILE '{target}'", f"EXPLAIN SELECT 1 INTO /* x */ OUTFILE '{target}'"):
        with pytest.raises(QueryForbidden, match="INTO OUTFILE"):
            query_raw(wh, sql)
    assert not target.exists()


def test_exploration_statements_work(wh: EmbeddedWarehouse) -> None:
    assert {"name": "t"} in run_query(wh, "SHOW TABLES")
    assert [r["name"] for r in run_query(wh, "DESCRIBE t")] == ["x", "at"]
    assert [r["name"] for r in run_query(wh, "DESC TABLE t")] == ["x", "at"]
    assert "MergeTree" in run_query(wh, "SHOW CREATE TABLE t")[0]["statement"]
    assert run_query(wh, "EXISTS t") == [{"result": 1}] and run_query(wh, "EXISTS TABLE nope") == [{"result": 0}]
    assert any("SelectQuery" in r["explain"] for r in run_query(wh, "EXPLAIN AST SELECT x FROM t"))
    assert run_query(wh, "EXPLAIN SYNTAX SELECT x FROM t WHERE x = 1")[0]["explain"].startswith("SELECT x")
    assert any("ReadFromMergeTree" in r["explain"] for r in run_query(wh, "EXPLAIN PLAN SELECT x FROM t"))
    assert any("ReadFromMergeTree" in r["explain"] for r in run_query(wh, "EXPLAIN SELECT x FROM t"))
    assert run_query(wh, "EXPLAIN ESTIMATE SELECT x FROM t")[0]["rows"] == 2


def test_format_clause_gives_the_engines_raw_output(wh: EmbeddedWarehouse) -> None:
    assert query_raw(wh, "SELECT x FROM t ORDER BY x FORMAT CSV") == b"1\n2\n"
    assert query_raw(wh, "SELECT x, at FROM t ORDER BY x FORMAT CSVWithNames;") == (
        b'"x","at"\n1,"2025-03-01T10:00:00Z"\n2,"2025-03-01T11:30:00Z"\n'
    )
    assert query_raw(wh, "SELECT x FROM t ORDER BY x FORMAT JSONEachRow") == b'{"x":1}\n{"x":2}\n'
    assert query_raw(wh, "SHOW TABLES FORMAT TSV") == b"t\n"
    assert b"\xe2\x94" in query_raw(wh, "SELECT 1 FORMAT Pretty")  # box drawing
    # Without FORMAT: JSON lines, ISO-8601 UTC timestamps, 64-bit integers as numbers.
    assert query_raw(wh, "SELECT x, at, toUInt64(18446744073709551615) AS big FROM t ORDER BY x LIMIT 1") == (
        b'{"x":1,"at":"2025-03-01T10:00:00Z","big":18446744073709551615}\n'
    )
    zoned = "SELECT toDateTime('2025-01-02 03:04:05', 'America/New_York') AS a"
    assert run_query(wh, zoned) == [{"a": "2025-01-02T08:04:05Z"}]  # whatever the column's zone: UTC
    with pytest.raises(QueryError, match="leave FORMAT out"):
        run_query(wh, "SELECT 1 FORMAT CSV")


def test_syntax_error_points_at_the_users_text(wh: EmbeddedWarehouse) -> None:
    sql = "SELECT x FROM"
    with pytest.raises(QueryError) as err:
        run_query(wh, sql)
    message = str(err.value)
    # Positions count from 1: the end of this query is one past its length.
    assert "Syntax error" in message and f"position {len(sql) + 1} " in message and "EXPLAIN AST" not in message
    with pytest.raises(QueryError, match="'\\(' at position 23 is never closed"):
        run_query(wh, "SELECT x FROM t WHERE (")
    assert "readonly" not in message and "SETTINGS" not in message  # nothing of ours shows


def test_heavy_query_times_out(wh: EmbeddedWarehouse) -> None:
    t0 = time.monotonic()
    with pytest.raises(QueryTimeout, match="Timeout"):
        run_query(
            wh,
            "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) = 1",
            limits=QueryLimits(timeout_s=1),
        )
    assert time.monotonic() - t0 < 5


def test_too_many_rows_is_refused(wh: EmbeddedWarehouse) -> None:
    with pytest.raises(QueryTooLarge):
        query_raw(wh, "SELECT number FROM numbers(100) FORMAT CSV", limits=QueryLimits(max_result_rows=10))
    assert len(run_query(wh, "SELECT number FROM numbers(10)", limits=QueryLimits(max_result_rows=10))) == 10


def test_limits_cannot_be_switched_off_by_zero() -> None:
    for bad in ({"timeout_s": 0}, {"max_result_rows": 0}, {"max_memory_bytes": 0}):
        with pytest.raises(ValueError):
            QueryLimits(**bad)  # type: ignore[arg-type]


def test_a_statement_is_checked_once_and_a_refused_one_every_time(
    wh: EmbeddedWarehouse, secret_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_statement remembers the statements the engine's parse let through (a pipe asked again skips the
    check session); one it refused is never remembered, so it is refused again, and its file stays unread."""
    import stream.query as query

    checks: list[str] = []
    real = query.check_functions
    monkeypatch.setattr(query, "check_functions", lambda s, st, p: (checks.append(st), real(s, st, p))[1])
    ok = "SELECT count() AS n FROM numbers({n:UInt8}) /* checked once */"
    for n in (3, 4):
        assert query.run_statement(wh, ok, {"n": n}, QueryLimits(), "JSONEachRow") == b'{"n":%d}\n' % n
    assert checks == [ok]
    bad = f"SELECT * FROM file('{secret_file}', 'LineAsString') /* refused */"
    for _ in range(2):
        with pytest.raises(QueryForbidden):
            query.run_statement(wh, bad, {}, QueryLimits(), "JSONEachRow")
    assert checks == [ok, bad, bad]
