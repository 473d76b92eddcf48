"""The engine itself refuses host files, network and remote servers in ``query``; queries get a time limit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from connectors.warehouse import EmbeddedWarehouse
from stream.query import QueryForbidden, QueryLimits, QueryTimeout, run_query


@pytest.fixture(scope="module")
def wh(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d: Path = tmp_path_factory.mktemp("qsafe")
    with EmbeddedWarehouse(d) as w:
        w.command("CREATE TABLE t (x UInt32) ENGINE = MergeTree ORDER BY x")
        w.command("INSERT INTO t VALUES (1), (2)")
        yield w


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        "SELECT * FROM url('http://127.0.0.1:1/x', 'CSV', 'a String')",
        "SELECT * FROM remote('127.0.0.1:1', system.one)",
        "WITH h AS (SELECT * FROM file('/etc/hostname', 'LineAsString')) SELECT * FROM h",
        "SELECT * FROM t JOIN (SELECT 1 AS x FROM file('/etc/hostname', 'LineAsString')) USING x",
    ],
)
def test_table_functions_reaching_outside_are_refused(wh: EmbeddedWarehouse, sql: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(QueryForbidden, match="readonly"):
        run_query(wh, sql)
    assert time.monotonic() - t0 < 5


def test_drop_refused_and_table_still_there(wh: EmbeddedWarehouse) -> None:
    with pytest.raises(QueryForbidden):
        run_query(wh, "DROP TABLE t")
    assert run_query(wh, "SELECT count() AS n FROM t") == [{"n": 2}]


def test_heavy_query_times_out(wh: EmbeddedWarehouse) -> None:
    t0 = time.monotonic()
    with pytest.raises(QueryTimeout, match="Timeout"):
        run_query(
            wh,
            "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) = 1",
            limits=QueryLimits(timeout_s=1),
        )
    assert time.monotonic() - t0 < 5


def test_numbers_still_allowed(wh: EmbeddedWarehouse) -> None:
    assert run_query(wh, "SELECT count() AS n FROM numbers(10)") == [{"n": 10}]
