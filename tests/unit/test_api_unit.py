"""The API's pure parts: output format, bound parameters, pipe clauses, the bind check."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from stream.api import (
    ApiError,
    ServeError,
    _engine_reason,
    _tail,
    bind,
    caller_limits,
    check_bind,
    split_format,
    sql_params,
)
from stream.query import QueryLimits


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


# --- the caller's own limits (max_seconds, max_rows, max_memory_mb) -----------------------------------------

CAP = QueryLimits(timeout_s=20.0, max_result_rows=100, max_memory_bytes=1 << 30)


def test_caller_limits_tighten_the_servers_and_never_loosen_them() -> None:
    assert caller_limits({}, CAP) is CAP
    tight = {"max_seconds": "2.5", "max_rows": "10", "max_memory_mb": "64"}
    assert caller_limits(tight, CAP) == QueryLimits(2.5, 10, 64 << 20)
    loose = {"max_seconds": "900", "max_rows": "1000000", "max_memory_mb": "999999"}
    assert caller_limits(loose, CAP) == CAP
    assert caller_limits({"max_rows": "7", "max_seconds": "1000"}, CAP) == QueryLimits(20.0, 7, 1 << 30)
    assert caller_limits({"max_seconds": ".5"}, CAP).timeout_s == 0.5
    assert caller_limits({"max_seconds": "0.001"}, CAP).timeout_s == 0.001


def test_the_cli_knows_the_highest_limits_the_api_takes() -> None:
    from bucketer.cli_warehouse import API_LIMIT_TOPS
    from stream.api import LIMIT_PARAMS

    assert API_LIMIT_TOPS == {name: top for name, (_, _, top, _) in LIMIT_PARAMS.items()}
    assert caller_limits({n: str(v) for n, v in API_LIMIT_TOPS.items()}, CAP) == CAP


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_rows", ""),
        ("max_rows", "abc"),
        ("max_rows", "-1"),
        ("max_rows", "0"),
        ("max_rows", "1.5"),
        ("max_rows", "1e3"),
        ("max_rows", "+1"),
        ("max_rows", "１"),
        ("max_rows", "1" + "0" * 15 + "1"),  # past 1e15
        ("max_rows", "1" * 5000),  # past Python's int() digit limit: a 400, not a 500
        ("max_memory_mb", "0"),
        ("max_memory_mb", "2000000000"),
        ("max_seconds", "0"),
        ("max_seconds", "0.0"),
        ("max_seconds", "-1"),
        ("max_seconds", "nan"),
        ("max_seconds", "inf"),
        ("max_seconds", "1e-3"),
        ("max_seconds", "2000000"),
        ("max_seconds", "0.0000001"),  # the engine rounds it to 0 = no time limit at all
        ("max_seconds", "0.0009"),
    ],
)
def test_ill_formed_or_out_of_range_limits_are_400(name: str, value: str) -> None:
    with pytest.raises(ApiError) as err:
        caller_limits({name: value}, CAP)
    assert err.value.status == 400
    assert err.value.message.startswith(f"invalid parameters: {name}: expected ")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The app over a real embedded chdb warehouse, with the server's limits CAP and one user pipe."""
    import warnings

    from connectors.warehouse import EmbeddedWarehouse
    from stream.api import ApiConfig, UserPipe, create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    data = tmp_path_factory.mktemp("apilimits") / "wh"
    first = UserPipe("first", "SELECT number FROM numbers(5) LIMIT {max_rows:UInt32}", (("max_rows", "UInt32"),))
    app = create_app(lambda: EmbeddedWarehouse(data), ApiConfig(limits=CAP, pipes=(first,)))
    try:
        yield TestClient(app)
    finally:
        app.state.pool.close()  # the engine is the process's one: free it for the next test module


SETTINGS = (
    "SELECT getSetting('max_execution_time') AS s, getSetting('max_result_rows') AS r, "
    "getSetting('max_memory_usage') AS m"
)


def test_the_engine_runs_with_the_tightened_limits(embedded: Any) -> None:
    def engine_limits(**params: str) -> dict[str, Any]:
        r = embedded.get("/v0/sql", params={"q": SETTINGS, **params})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]

    assert engine_limits() == {"s": 20, "r": 100, "m": 1 << 30}
    assert engine_limits(max_seconds="2.5", max_rows="7", max_memory_mb="64") == {"s": 2.5, "r": 7, "m": 64 << 20}
    assert engine_limits(max_seconds="900", max_rows="100000", max_memory_mb="99999") == {
        "s": 20,
        "r": 100,
        "m": 1 << 30,
    }
    # POST (the query in the body, as `bucketer query` sends it): the limits still come from the query string.
    r = embedded.post("/v0/sql", params={"max_rows": "3"}, content=SETTINGS, headers={"Content-Type": "text/plain"})
    assert r.status_code == 200 and r.json()["data"][0]["r"] == 3, r.text


def test_max_rows_past_the_result_is_413(embedded: Any) -> None:
    q = "SELECT number FROM numbers(3)"
    r = embedded.get("/v0/sql", params={"q": q, "max_rows": "1"})
    assert r.status_code == 413, r.text
    assert "Limit for result exceeded, max rows: 1.00" in r.json()["error"]
    r = embedded.post("/v0/sql", params={"max_rows": "2"}, content=q, headers={"Content-Type": "text/plain"})
    assert r.status_code == 413, r.text
    r = embedded.get("/v0/sql", params={"q": q, "max_rows": "3"})
    assert r.status_code == 200 and r.json()["rows"] == 3, r.text


def test_max_seconds_past_the_time_is_408(embedded: Any) -> None:
    t0 = time.monotonic()
    r = embedded.get(
        "/v0/sql", params={"q": "SELECT count() FROM numbers(1e11) WHERE sipHash64(number) = 1", "max_seconds": "0.3"}
    )
    took = time.monotonic() - t0
    assert r.status_code == 408, r.text
    assert "Timeout exceeded" in r.json()["error"]
    assert took < 10, took  # the caller's 0.3 s, not the server's 20 s


def test_a_bad_limit_is_400_before_the_query_runs(embedded: Any) -> None:
    for params in ({"max_rows": "0"}, {"max_seconds": "0.0000001"}, {"max_memory_mb": "x"}, {"max_rows": "1" * 5000}):
        t0 = time.monotonic()
        r = embedded.get(
            "/v0/sql", params={"q": "SELECT count() FROM numbers(1e11) WHERE sipHash64(number) = 1", **params}
        )
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"].startswith(f"invalid parameters: {next(iter(params))}: ")
        assert time.monotonic() - t0 < 5


def test_sql_parameters_named_like_the_apis_own_are_400(embedded: Any) -> None:
    """max_seconds, max_rows, max_memory_mb (and q, token) are read by the API itself: a {max_rows:UInt64} in the
    SQL would silently get the caller's row limit as its value, and the value would limit the result too."""
    for name in ("max_rows", "max_seconds", "max_memory_mb", "token", "q"):
        q = f"SELECT {{{name}:String}} AS v"
        r = embedded.get("/v0/sql", params={"q": q, name: "2"} if name != "q" else {"q": q})
        assert r.status_code == 400, (name, r.text)
        assert f"{name!r} is a parameter of the API itself" in r.json()["error"], r.text
    r = embedded.get("/v0/sql", params={"q": "SELECT {n:UInt8} AS v", "n": "2", "max_rows": "1"})
    assert r.status_code == 200 and r.json()["data"] == [{"v": 2}], r.text


def test_a_user_pipe_binds_a_parameter_named_max_rows(embedded: Any) -> None:
    """Pipes take no caller limits: a pipe's own {max_rows:Type} is its parameter, nothing else (0 is no limit)."""
    r = embedded.get("/v0/pipes/first.json", params={"max_rows": "2"})
    assert r.status_code == 200 and [d["number"] for d in r.json()["data"]] == [0, 1], r.text
    r = embedded.get("/v0/pipes/first.json", params={"max_rows": "0"})
    assert r.status_code == 200 and r.json()["data"] == [], r.text


@pytest.mark.parametrize(
    ("sql", "refused"),
    [
        ("SELECT {token:String} AS t", "token"),
        ("SELECT * FROM t WHERE b = {bucketId:UInt32} AND p = {project:String}", "project"),
    ],
)
def test_a_pipe_file_cannot_take_the_token_or_the_project_of_a_bucket_pipe(
    tmp_path: Any, sql: str, refused: str
) -> None:
    """?token= is the secret and ?project= picks bucketId: a pipe parameter of that name would be handed it."""
    from stream.api import load_pipes

    (tmp_path / "p.sql").write_text(sql)
    with pytest.raises(ServeError, match=rf"\{{{refused}:Type\}} cannot be a pipe parameter"):
        load_pipes(tmp_path)
    (tmp_path / "p.sql").write_text("SELECT {project:String} AS p")  # no bucketId: project is the pipe's own
    assert [(p.name, p.params) for p in load_pipes(tmp_path)] == [("p", (("project", "String"),))]


def test_the_project_cache_asks_the_fingerprint_again_only_after_a_write(embedded: Any) -> None:
    """Embedded: no process but this one writes, so the cache skips its fingerprint query until a write of this
    process finishes; then a changed project is seen on the very next lookup."""
    from stream.api import ApiError, ProjectCache
    from stream.schema import ensure_schema

    with embedded.app.state.pool.handle() as wh:  # the module's engine (one data dir per process)
        ensure_schema(wh, 4)

        def project(slug: str, enabled: int, version: int) -> None:
            wh.command(
                "INSERT INTO insightsProjects (id, slug, segmentId, enabled, _version) VALUES "
                f"('{slug}-id', '{slug}', 'seg-{slug}', {enabled}, {version})"
            )

        project("alpha", 1, 1)
        cache = ProjectCache()
        assert cache.resolve(wh, "alpha").segment_id == "seg-alpha"
        asked = cache.fingerprints
        for _ in range(3):
            cache.resolve(wh, "alpha")
        assert cache.fingerprints == asked  # no write: not asked again
        project("alpha", 0, 2)  # disabled by a later version
        with pytest.raises(ApiError) as err:
            cache.resolve(wh, "alpha")
        assert err.value.status == 404 and cache.fingerprints == asked + 1


def test_a_repeated_parameter_is_400_not_its_last_value(embedded: Any) -> None:
    """``?segmentId=a&segmentId=b`` is ambiguous: refused with its name (schemathesis found it read as ``b``)."""
    r = embedded.get("/v0/sql", params=[("q", "SELECT {n:UInt8} AS v"), ("n", "1"), ("n", "2")])
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "parameter 'n' given more than once; give each once"
    r = embedded.get("/v0/sql", params=[("q", "SELECT {n:UInt8} AS v"), ("n", "2")])
    assert r.status_code == 200 and r.json()["data"] == [{"v": 2}], r.text
