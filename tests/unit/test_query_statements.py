"""Which statements the query path lets through to the engine, and how a FORMAT clause is recognised."""

from __future__ import annotations

import pytest

from stream.query import QueryError, QueryForbidden, QueryLimits, engine_error, read_only, session_settings, user_format


@pytest.mark.parametrize(
    "sql",
    [
        "SHOW TABLES",
        "show create table t",
        "DESCRIBE t",
        "desc table t",
        "EXPLAIN AST SELECT 1",
        "explain syntax select 1",
        "EXPLAIN PLAN SELECT 1",
        "EXISTS TABLE t",
        "SELECT 1 FORMAT CSV",
        "SELECT 1 SETTINGS readonly = 1",
        "/* INSERT */ SELECT '; DROP TABLE t' -- DELETE",
        "SELECT '--' AS a, 'x' AS b",
    ],
)
def test_exploration_and_selects_pass(sql: str) -> None:
    assert read_only(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "KILL QUERY WHERE 1",
        "SET readonly = 0",
        "USE system",
        "SYSTEM FLUSH LOGS",
        "CREATE TABLE z (x UInt8) ENGINE = Memory",
        "TRUNCATE TABLE t",
        "GRANT ALL ON *.* TO default",
        "SELECT '--'; DROP TABLE t",
        "SELECT 1 INTO  OUTFILE '/tmp/x'",
        "SELECT 1 INTO/**/OUTFILE '/tmp/x'",
        "EXPLAIN SELECT 1 INTO OUTFILE '/tmp/x'",
    ],
)
def test_the_rest_is_forbidden(sql: str) -> None:
    with pytest.raises(QueryForbidden) as err:
        read_only(sql)
    assert err.value.status == 403 and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("sql", "fmt"),
    [
        ("SELECT 1 FORMAT CSV", "CSV"),
        ("SELECT 1 format JSONEachRow;", "JSONEachRow"),
        ("SELECT 1 FORMAT TSV SETTINGS max_threads = 1", "TSV"),
        ("SHOW TABLES FORMAT Pretty", "Pretty"),
        ("SELECT 'FORMAT CSV'", None),
        ("SELECT 1 -- FORMAT CSV", None),
        ("SELECT format('{}', 'x')", None),
        ("SELECT format FROM t", None),
        ("SELECT 1", None),
    ],
)
def test_user_format(sql: str, fmt: str | None) -> None:
    assert user_format(sql) == fmt


def test_readonly_is_set_last_so_it_locks_the_limits_in() -> None:
    settings = session_settings(QueryLimits(timeout_s=3, max_result_rows=7, max_memory_bytes=9))
    assert list(settings)[-1] == "readonly" and settings["readonly"] == "1"
    assert settings["max_execution_time"] == "3" and settings["max_result_rows"] == "7"
    assert settings["max_memory_usage"] == "9" and settings["timeout_overflow_mode"] == "throw"
    assert "max_result_rows" not in session_settings(QueryLimits(), check=True)


def test_engine_errors_become_one_clean_line() -> None:
    raw = (
        "Code: 164. DB::Exception: Code: 164. DB::Exception: Cannot modify 'readonly' setting in readonly mode. "
        "(READONLY) (version 26.9.2.1). (READONLY)"
    )
    err = engine_error(raw)
    assert isinstance(err, QueryForbidden)
    assert str(err) == "Code: 164. DB::Exception: Cannot modify 'readonly' setting in readonly mode. (READONLY)"
    assert type(engine_error("Code: 62. DB::Exception: Syntax error")) is QueryError
