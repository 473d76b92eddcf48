"""The API's pure parts: output format, bound parameters, pipe clauses, the bind check."""

from __future__ import annotations

import pytest

from stream.api import ApiError, ServeError, _engine_reason, _tail, bind, check_bind, split_format, sql_params


@pytest.mark.parametrize(
    ("sql", "statement", "fmt"),
    [
        ("SELECT 1", "SELECT 1", "JSON"),
        ("SELECT 1 FORMAT CSV", "SELECT 1", "CSV"),
        ("SELECT 1 format tsvwithnames", "SELECT 1", "TabSeparatedWithNames"),
        ("SELECT 'FORMAT CSV'", "SELECT 'FORMAT CSV'", "JSON"),
        ("SELECT 1\nFORMAT JSONEachRow  ", "SELECT 1", "JSONEachRow"),
    ],
)
def test_split_format(sql: str, statement: str, fmt: str) -> None:
    assert split_format(sql) == (statement, fmt)


def test_unserved_format_is_400() -> None:
    with pytest.raises(ApiError) as err:
        split_format("SELECT 1 FORMAT Native")
    assert err.value.status == 400 and "Native" in err.value.message


def test_sql_params_once_each_in_order() -> None:
    assert sql_params("SELECT {b:UInt32}, {a: String}, {b:UInt32}, '{not a param}'") == ["b", "a"]


def test_tail_binds_values_and_only_adds_given_clauses() -> None:
    assert _tail(None, None, None) == ("", {})
    sql, params = _tail("s'1", 5, 2)
    assert "s'1" not in sql and params == {"segmentId": "s'1", "limit": 5, "offset": 2}
    assert "{segmentId:String}" in sql and "LIMIT {limit:UInt64} OFFSET {offset:UInt64}" in sql
    sql, params = _tail(None, None, 7)
    assert "LIMIT {offset:UInt64}, " in sql and params == {"offset": 7}


def test_engine_reason_drops_the_expression_trace() -> None:
    msg = (
        "Code: 395. DB::Exception: invalid bucketId: expected an integer from 0 to 3: while executing "
        "'FUNCTION throwIf(_CAST(1_UInt8, 'UInt8'_String) :: 0) UInt8 : 5'. (FUNCTION_THROW_IF_VALUE_IS_NON_ZERO)"
    )
    assert _engine_reason(msg) == (
        "Code: 395. DB::Exception: invalid bucketId: expected an integer from 0 to 3 "
        "(FUNCTION_THROW_IF_VALUE_IS_NON_ZERO)"
    )
    assert _engine_reason("Code: 62. Syntax error") == "Code: 62. Syntax error"


def test_no_token_only_on_loopback() -> None:
    check_bind("127.0.0.1", ())
    check_bind("0.0.0.0", ("t",))
    with pytest.raises(ServeError, match="BUCKETER_API_TOKEN"):
        check_bind("0.0.0.0", ())


def test_bind_in_use_and_out_of_range_are_one_line() -> None:
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with pytest.raises(ServeError, match=f"127.0.0.1:{port}"):
            bind("127.0.0.1", port)
    finally:
        sock.close()
    with pytest.raises(ServeError, match="out of range"):
        bind("127.0.0.1", 70000)


@pytest.mark.parametrize("value", ["", "1.0", "+1", " 1", "1_0", "-1", "0x1", "１", "true"])
def test_integers_are_plain_digits_and_refused_before_the_warehouse(value: str) -> None:
    import warnings

    from stream.api import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    def connect() -> None:
        raise AssertionError("a bad parameter reached the warehouse")

    client = TestClient(create_app(connect))
    for path, name in (
        ("/v0/pipes/activityRelations_bucket_routing.json", "bucketId"),
        ("/v0/pipes/activityRelations_deduplicated_cleaned_bucket_union.json", "limit"),
        ("/v0/pipes/activityRelations_deduplicated_cleaned_bucket_union.json", "offset"),
    ):
        r = client.get(path, params={name: value})
        assert r.status_code == 400, (name, value, r.text)
        assert name in r.json()["error"]
