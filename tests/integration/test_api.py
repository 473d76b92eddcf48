"""The HTTP query API of a real `bucketer run --http-port` on the real broker, while it loads.

Phase 1 runs the pipeline until idle with a final rebuild (cleaned buckets to read); phase 2 starts it again on
the same data dir with the API, and keeps producing activities in the background, so every request below is
answered while the loader writes. Expectations come from the generated messages and the test's own bucket
function (stream.buckets is checked bit for bit against ClickHouse in tests/unit), not from the product's SQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import Producer
from kafkatools import create_topics, unique

from bucketer.localkafka import free_port
from connectors.topics import TopicNames
from stream.buckets import bucket_of, cleaned_table, raw_table
from stream.loadgen import LoadgenConfig, generate

BUCKETS = 4
TOKEN = "t0ken-for-tests"
MAX_ROWS = 20_000
UNION = "activityRelations_deduplicated_cleaned_bucket_union"
ROUTING = "activityRelations_bucket_routing"
BUCKETER = [sys.executable, "-m", "bucketer"]


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    topics: TopicNames
    bootstrap: str
    live: dict[str, str]  # slug -> segmentId of the enabled, not deleted projects
    dead: list[str]  # slugs of disabled or deleted projects
    project_msgs: dict[str, tuple[bytes, dict]]  # slug -> (key, message)
    produced: list[int]  # activities produced during phase 2 so far
    data: Path


def projects_of(cfg: LoadgenConfig) -> tuple[dict[str, str], list[str], dict[str, tuple[bytes, dict]]]:
    last: dict[str, tuple[bytes, dict]] = {}
    for g in generate(cfg):
        if g.topic == "insightsProjects" and g.value is not None:
            msg = orjson.loads(g.value)
            last[msg["record"]["id"]] = (g.key, msg)
    live, dead, by_slug = {}, [], {}
    for key, msg in last.values():
        rec = msg["record"]
        by_slug[rec["slug"]] = (key, msg)
        if msg["action"] != "delete" and rec["enabled"] and rec["deletedAt"] is None:
            live[rec["slug"]] = rec["segmentId"]
        else:
            dead.append(rec["slug"])
    return live, dead, by_slug


def produce(bootstrap: str, topics: TopicNames, cfg: LoadgenConfig, activities_only: bool = False) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    n = 0
    for g in generate(cfg):
        if g.topic == "activityRelations":
            producer.produce(topics.source, key=g.key, value=g.value)
            n += 1
        elif not activities_only:
            producer.produce(topics.reference(g.topic), key=g.key, value=g.value)
    assert producer.flush(60) == 0
    return n


def wait_for(url: str, proc: subprocess.Popen[bytes], path: str, deadline_s: float) -> httpx.Response:
    deadline = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"bucketer run exited early with {proc.returncode}"
        try:
            r = httpx.get(url + path, timeout=5)
            if r.status_code == 200:
                return r
            last = r.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"{path} never answered 200: {last}")


@pytest.fixture(scope="module")
def served(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("api")
    data = tmp / "wh"
    topics = TopicNames(unique("api") + ".")
    create_topics(bootstrap, [topics.source, *topics.references().values()], partitions=3)
    first = LoadgenConfig(count=3000, seed=5, segments=30, bad_fraction=0.02)
    live, dead, msgs = projects_of(first)
    assert len(live) >= 5 and dead, "the generator made live and disabled/deleted projects"
    produce(bootstrap, topics, first)
    common = ["--bootstrap", bootstrap, "--data-dir", str(data), "--buckets", str(BUCKETS)]
    common += ["--topic-prefix", topics.prefix]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETER_")}
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")

    # Phase 1: load everything, rebuild every bucket, exit.
    done = subprocess.run(
        [*BUCKETER, "run", *common, "--until-idle", "3", "--enrich-on-exit"],
        env=env,
        capture_output=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    # Phase 2: the same warehouse, with the API, while more activities arrive.
    port = free_port()
    env2 = env | {
        "BUCKETER_API_TOKEN": TOKEN,
        "BUCKETER_QUERY_TIMEOUT": "1",
        "BUCKETER_QUERY_MAX_ROWS": str(MAX_ROWS),
        "BUCKETER_QUERY_MAX_MEMORY": str(300 << 20),
    }
    log = (tmp / "run.log").open("wb")
    proc = subprocess.Popen([*BUCKETER, "run", *common, "--http-port", str(port)], env=env2, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    produced = [0]
    stop = threading.Event()

    def trickle() -> None:  # more activities in small batches, so the loader is busy during the tests
        cfg = LoadgenConfig(count=20_000, seed=6, segments=30, bad_fraction=0.0)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
        for g in generate(cfg):
            if stop.is_set():
                break
            if g.topic == "activityRelations":
                producer.produce(topics.source, key=g.key, value=g.value)
                produced[0] += 1
                if produced[0] % 200 == 0:
                    producer.flush(10)
                    time.sleep(0.2)
        producer.flush(30)

    feeder = threading.Thread(target=trickle, daemon=True)
    try:
        wait_for(url, proc, "/healthz", 60)
        wait_for(url, proc, "/readyz", 90)
        feeder.start()
        yield Served(url, proc, topics, bootstrap, live, dead, msgs, produced, data)
    finally:
        stop.set()
        feeder.join(60) if feeder.is_alive() else None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
    assert proc.returncode == 0, (tmp / "run.log").read_text()[-3000:]
    assert TOKEN not in (tmp / "run.log").read_text(), "a token was logged"


def get(s: Served, path: str, /, token: str | None = TOKEN, **params: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(s.url + path, params=params, headers=headers, timeout=30)


def sql(s: Served, q: str, /, **params: object) -> httpx.Response:
    return get(s, "/v0/sql", q=q, **params)


def rows_of(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    return r.json()["data"]


# --- answers while loading --------------------------------------------------------------------------------


def test_sql_answers_in_format_json_shape_while_loading(served: Served) -> None:
    before = int(rows_of(sql(served, f"SELECT count() AS n FROM {raw_table(0)}"))[0]["n"])
    body = sql(served, "SELECT number AS n, toString(number) AS s FROM numbers(3)").json()
    assert [m["name"] for m in body["meta"]] == ["n", "s"] and body["meta"][1]["type"] == "String"
    assert [int(r["n"]) for r in body["data"]] == [0, 1, 2] and body["rows"] == 3
    assert {"elapsed", "rows_read", "bytes_read"} <= set(body["statistics"])
    # The loader keeps writing while the API answers: raw rows grow under our queries.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = int(rows_of(sql(served, f"SELECT count() AS n FROM {raw_table(0)}"))[0]["n"])
        if now > before:
            break
        time.sleep(0.5)
    assert now > before, "no new rows were loaded while the API was being queried"
    assert served.produced[0] > 0


def test_other_formats_and_bound_parameters(served: Served) -> None:
    r = sql(served, "SELECT number FROM numbers(3) FORMAT CSV")
    assert r.status_code == 200 and r.text.split() == ["0", "1", "2"]
    assert r.headers["content-type"].startswith("text/csv")
    # {name:Type} is bound by the engine: a quote in the value stays data.
    r = sql(served, "SELECT {s:String} AS s, {n:UInt32} + 1 AS m", s="it's'); DROP TABLE x; --", n="41")
    assert rows_of(r) == [{"s": "it's'); DROP TABLE x; --", "m": 42}]


def test_pipes_answer(served: Served) -> None:
    union = rows_of(get(served, f"/v0/pipes/{UNION}.json"))
    assert union, "the cleaned buckets are empty"
    for b in range(BUCKETS):
        got = rows_of(get(served, f"/v0/pipes/{ROUTING}.json", bucketId=b))
        assert all(bucket_of(r["segmentId"], BUCKETS) == b for r in got)
        assert sorted(r["activityId"] for r in got) == sorted(
            r["activityId"] for r in union if bucket_of(r["segmentId"], BUCKETS) == b
        )
    limited = get(served, f"/v0/pipes/{UNION}.json", limit=5, offset=2).json()
    assert limited["rows"] == 5
    seg = union[0]["segmentId"]
    only = rows_of(get(served, f"/v0/pipes/{UNION}.json", segmentId=seg))
    assert only and {r["segmentId"] for r in only} == {seg}
    assert len(only) == sum(1 for r in union if r["segmentId"] == seg)


def test_project_injection_returns_exactly_its_bucket(served: Served) -> None:
    checked = 0
    for slug, segment in sorted(served.live.items())[:6]:
        b = bucket_of(segment, BUCKETS)
        pb = rows_of(get(served, "/v0/pipes/project_buckets.json", project=slug))
        assert [(r["project"], r["segmentId"], int(r["bucketId"])) for r in pb] == [(slug, segment, b)]
        for _ in range(3):  # a scheduled rebuild between the two reads would change the buckets: read again
            union = rows_of(get(served, f"/v0/pipes/{UNION}.json"))
            got = rows_of(get(served, f"/v0/pipes/{ROUTING}.json", project=slug))
            if union == rows_of(get(served, f"/v0/pipes/{UNION}.json")):
                break
        expected = sorted(orjson.dumps(r) for r in union if bucket_of(r["segmentId"], BUCKETS) == b)
        assert expected, f"bucket {b} is empty"
        assert sorted(orjson.dumps(r) for r in got) == expected
        # The same as naming the bucket; bucketId and project together must agree.
        assert rows_of(get(served, f"/v0/pipes/{ROUTING}.json", project=slug, bucketId=b)) == got
        other = (b + 1) % BUCKETS
        assert get(served, f"/v0/pipes/{ROUTING}.json", project=slug, bucketId=other).status_code == 400
        checked += 1
    assert checked == 6


def test_project_cache_sees_a_project_disabled_while_running(served: Served) -> None:
    slug = sorted(served.live)[-1]
    assert get(served, f"/v0/pipes/{ROUTING}.json", project=slug, limit=1).status_code == 200  # cached now
    key, msg = served.project_msgs[slug]
    rec = dict(msg["record"], enabled=False, updatedAt="2025-07-01T00:00:00.000000Z")
    value = orjson.dumps({**msg, "action": "update", "record": rec, "changes": {"enabled": True}})
    producer = Producer({"bootstrap.servers": served.bootstrap})
    producer.produce(served.topics.reference("insightsProjects"), key=key, value=value)
    assert producer.flush(30) == 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = get(served, f"/v0/pipes/{ROUTING}.json", project=slug, limit=1)
        if r.status_code == 404:
            break
        time.sleep(0.5)
    assert r.status_code == 404 and "project" in r.json()["error"]
    served.live.pop(slug)


def test_a_slow_query_does_not_hold_up_the_others(served: Served) -> None:
    """Each request in flight has its own engine handle: quick queries answer while a slow one still runs (on
    one shared handle they would wait for it). The slow one sleeps, so it leaves the CPU to the others."""
    warm = [threading.Thread(target=sql, args=(served, "SELECT 1")) for _ in range(3)]
    for w in warm:  # open a few handles first, so the quick queries below do not pay for opening one
        w.start()
    for w in warm:
        w.join()
    done: dict[str, float] = {}

    def slow() -> None:
        r = sql(served, "SELECT sleep(0.9) AS s")
        done["slow"] = time.monotonic()
        done["slow_status"] = r.status_code

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.1)
    assert rows_of(sql(served, "SELECT 1 AS x")) == [{"x": 1}]
    assert rows_of(get(served, f"/v0/pipes/{ROUTING}.json", bucketId=0, limit=1))
    done["quick"] = time.monotonic()
    t.join(30)
    assert done["slow_status"] == 200 and done["quick"] < done["slow"]


# --- every error with its status code -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "q",
    [
        "DROP TABLE activityRelations_bucket_MV_ds_0",
        "INSERT INTO bucketer_settings (key, value) VALUES ('x', 'y')",
        "ALTER TABLE activityRelations_bucket_MV_ds_0 DELETE WHERE 1",
        "CREATE TABLE x (a UInt8) ENGINE = Memory",
        "SYSTEM SHUTDOWN",
        "KILL QUERY WHERE 1",
        "TRUNCATE TABLE activityRelations_bucket_MV_ds_0",
        "SELECT 1; DROP TABLE activityRelations_bucket_MV_ds_0",
        "SELECT 1 INTO OUTFILE '/tmp/bucketer-api-outfile'",
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        "SELECT * FROM url('http://127.0.0.1:1/x', 'CSV', 'a String')",
        "SELECT * FROM s3('http://127.0.0.1:1/bucketer-test/k.csv', 'CSV', 'a String')",
        "SELECT * FROM remote('127.0.0.1:1', system.one)",
        "WITH h AS (SELECT * FROM file('/etc/passwd', 'LineAsString')) SELECT * FROM h",
    ],
)
def test_writes_and_reaching_outside_are_403(served: Served, q: str) -> None:
    r = sql(served, q)
    assert r.status_code == 403, r.text
    assert r.json()["error"]


def test_refused_drop_leaves_the_table(served: Served) -> None:
    table = raw_table(0)
    before = int(rows_of(sql(served, f"SELECT count() AS n FROM {table}"))[0]["n"])
    assert sql(served, f"DROP TABLE {table}").status_code == 403
    assert sql(served, f"SELECT 1; DROP TABLE {cleaned_table(0)}").status_code == 403
    exists = rows_of(
        sql(
            served,
            "SELECT name FROM system.tables WHERE database = currentDatabase() AND name IN ({a:String}, "
            "{b:String}) ORDER BY name",
            a=table,
            b=cleaned_table(0),
        )
    )
    assert [r["name"] for r in exists] == sorted([table, cleaned_table(0)])
    assert int(rows_of(sql(served, f"SELECT count() AS n FROM {table}"))[0]["n"]) >= before


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/v0/sql", {}, 400),  # no q
        ("/v0/sql", {"q": "SELECT FROM WHERE"}, 400),  # syntax
        ("/v0/sql", {"q": "SELECT nope FROM system.one"}, 400),
        ("/v0/sql", {"q": "SELECT {x:UInt32} AS x"}, 400),  # missing parameter
        ("/v0/sql", {"q": "SELECT {x:UInt32} AS x", "x": "abc"}, 400),  # ill-typed parameter
        ("/v0/sql", {"q": "SELECT 1 FORMAT Native"}, 400),  # a format not served
        (f"/v0/pipes/{ROUTING}.json", {}, 400),  # no bucketId
        (f"/v0/pipes/{ROUTING}.json", {"bucketId": "abc"}, 400),
        (f"/v0/pipes/{ROUTING}.json", {"bucketId": "-1"}, 400),
        (f"/v0/pipes/{ROUTING}.json", {"bucketId": str(BUCKETS)}, 400),  # out of range
        (f"/v0/pipes/{ROUTING}.json", {"bucketId": "1", "limit": "x"}, 400),
        ("/v0/pipes/project_buckets.json", {}, 400),  # no project
        ("/v0/pipes/no_such_pipe.json", {}, 404),
        (f"/v0/pipes/{ROUTING}.json", {"project": "no-such-project"}, 404),
        ("/v0/pipes/project_buckets.json", {"project": "no-such-project"}, 404),
        ("/v0/nothing", {}, 404),
        ("/v0/sql", {"q": "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) = 1"}, 408),
        ("/v0/sql", {"q": f"SELECT number FROM numbers({MAX_ROWS * 3})"}, 413),
        ("/v0/sql", {"q": "SELECT length(range(100000000)) AS n"}, 413),  # 800 MB at once: past the memory limit
    ],
)
def test_error_status_codes(served: Served, path: str, params: dict, status: int) -> None:
    t0 = time.monotonic()
    r = get(served, path, **params)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert time.monotonic() - t0 < 20


def test_out_of_range_bucket_says_why(served: Served) -> None:
    r = get(served, f"/v0/pipes/{ROUTING}.json", bucketId=BUCKETS + 5)
    assert r.status_code == 400 and "invalid bucketId" in r.json()["error"]


def test_disabled_and_deleted_projects_are_404(served: Served) -> None:
    for slug in served.dead:
        r = get(served, f"/v0/pipes/{ROUTING}.json", project=slug)
        assert r.status_code == 404, (slug, r.text)
        assert get(served, "/v0/pipes/project_buckets.json", project=slug).status_code == 404


def test_auth(served: Served) -> None:
    q = {"q": "SELECT 1 AS x"}
    assert get(served, "/v0/sql", token=None, **q).status_code == 401
    assert get(served, "/v0/sql", token="wrong", **q).status_code == 401
    assert get(served, "/v0/status", token=None).status_code == 401
    assert get(served, f"/v0/pipes/{ROUTING}.json", token=None, bucketId=0).status_code == 401
    assert httpx.get(served.url + "/v0/sql", params={**q, "token": TOKEN}, timeout=10).status_code == 200
    assert get(served, "/v0/sql", **q).status_code == 200
    assert httpx.get(served.url + "/healthz", timeout=10).status_code == 200
    assert httpx.get(served.url + "/readyz", timeout=10).status_code == 200


# --- status, metrics, openapi ---------------------------------------------------------------------------------


def test_status_is_bucketer_status_json(served: Served) -> None:
    st = get(served, "/v0/status").json()
    assert [b["bucket"] for b in st["buckets"]] == list(range(BUCKETS))
    assert {"raw_total", "cleaned_total", "generated_at", "dlq_messages", "router_lag", "kafka_error"} <= set(st)
    assert st["kafka_error"] is None and st["dlq_messages"] > 0  # phase 1 dead-lettered the bad messages
    for b in st["buckets"]:
        n = int(rows_of(sql(served, f"SELECT count() AS n FROM {cleaned_table(b['bucket'])}"))[0]["n"])
        assert b["cleaned_rows"] == n
        assert b["snapshot_id"] is not None and b["rebuilt_at"] is not None
    assert st["cleaned_total"] == len(rows_of(get(served, f"/v0/pipes/{UNION}.json")))
    assert abs(sum(b["share"] for b in st["buckets"]) - 1) < 1e-9


def test_status_page_in_a_headless_browser(served: Served, tmp_path: Path) -> None:
    """Chromium (system package) through Selenium: one bar per bucket, the numbers of /v0/status, skew flagged."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "make setup installs chromium and chromium-driver"
    assert get(served, "/", token=None).status_code == 401
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        # The page draws /v0/status every second; the loader may still be writing: wait for a drawing of the
        # figures /v0/status gives right after it.
        driver.get(f"{served.url}/?token={TOKEN}&refresh=1")
        assert driver.title == "bucketer status"
        # The page redraws every second while the loader may still write: read one drawing whole (one script,
        # so no element goes stale between reads) and compare it with /v0/status taken right after.
        snapshot = """
            const q = (s) => Array.from(document.querySelectorAll(s));
            const card = document.querySelector('.card[data-key="DLQ messages"]');
            return {
              rows: q("#bars div.bar").map((b) => parseInt(b.dataset.rows)),
              skewed: q("#bars div.bar").map((b) => b.dataset.skewed === "true"),
              raw: q("#bucket-rows tr td.raw").map((c) => c.textContent),
              cleaned: q("#bucket-rows tr td.cleaned").map((c) => c.textContent),
              total: document.getElementById("raw-total").textContent,
              rebuilds: q("#rebuild-rows tr").length,
              dlq: card ? card.textContent : "",
            };"""
        deadline = time.monotonic() + 90
        while True:
            drawn = driver.execute_script(snapshot)
            after = get(served, "/v0/status").json()
            raw = [b["raw_rows"] for b in after["buckets"]]
            cleaned = [b["cleaned_rows"] for b in after["buckets"]]
            same = drawn["rows"] == raw and drawn["cleaned"] == [f"{n:,}" for n in cleaned]
            if same or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(drawn["rows"]) == BUCKETS
        assert drawn["rows"] == raw
        assert drawn["raw"] == [f"{n:,}" for n in raw]
        assert drawn["cleaned"] == [f"{n:,}" for n in cleaned]
        assert drawn["total"] == f"{after['raw_total']:,}"
        mean = sum(raw) / len(raw)
        assert drawn["skewed"] == [n >= 1.5 * mean for n in raw]
        # Phase 1's rebuilds, from the JSON's list, and the DLQ classes (read from the DLQ topic) on the DLQ card.
        assert after["rebuilds"] and drawn["rebuilds"] > 0
        assert after["dlq_by_class"]
        assert all(k in drawn["dlq"] for k in after["dlq_by_class"]), drawn["dlq"]
        shot = tmp_path / "status-page.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    finally:
        driver.quit()


def test_metrics_on_the_same_port(served: Served) -> None:
    text = httpx.get(served.url + "/metrics", timeout=10).text
    assert "bucketer_loader_messages_total" in text and "bucketer_routed_total" in text


def test_openapi_document(served: Served) -> None:
    doc = httpx.get(served.url + "/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.")
    paths = set(doc["paths"])
    assert {
        "/v0/sql",
        f"/v0/pipes/{UNION}.json",
        f"/v0/pipes/{ROUTING}.json",
        "/v0/pipes/project_buckets.json",
    } <= paths
    assert {"/v0/status", "/healthz", "/readyz"} <= paths
    params = {p["name"] for p in doc["paths"][f"/v0/pipes/{ROUTING}.json"]["get"]["parameters"]}
    assert {"bucketId", "project", "limit", "offset", "segmentId"} <= params
    assert doc["components"]["securitySchemes"]


def test_second_process_cannot_take_the_data_dir(served: Served, tmp_path: Path) -> None:
    """While `run` holds the warehouse, `serve` on the same data dir says so in one line (and the API works)."""
    res = subprocess.run(
        [*BUCKETER, "serve", "--data-dir", str(served.data), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0 and "in use" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert sql(served, "SELECT 1 AS x").status_code == 200


def test_a_timed_out_handle_is_not_reused(tmp_path: Path) -> None:
    """chdb gives a timed-out query's output to the next query on the same handle; the pool drops such handles
    (without that, the SELECT after the timeout fails to parse the stale JSON)."""
    from connectors.warehouse import EmbeddedWarehouse
    from stream.api import HandlePool, execute
    from stream.query import QueryLimits, QueryTimeout

    pool = HandlePool(lambda: EmbeddedWarehouse(tmp_path / "wh"), size=1)
    try:
        with pytest.raises(QueryTimeout), pool.handle() as wh:
            execute(wh, "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) = 1", {}, QueryLimits(1))
        with pool.handle() as wh:
            assert wh.rows("SELECT 42") == [(42,)]
            assert orjson.loads(execute(wh, "SELECT 43 AS x", {}, QueryLimits()))["data"] == [{"x": 43}]
    finally:
        pool.close()


def test_the_apis_own_4xx_keeps_the_handle_and_a_5xx_drops_it(tmp_path: Path) -> None:
    """An unknown project (404) ran nothing that failed: the next request gets the same handle, not a new
    connection (which cost ~250 ms each); a 503 raised while a handle was out closes it."""
    from connectors.warehouse import EmbeddedWarehouse
    from stream.api import ApiError, HandlePool

    opened: list[EmbeddedWarehouse] = []

    def connect() -> EmbeddedWarehouse:
        opened.append(EmbeddedWarehouse(tmp_path / "wh"))
        return opened[-1]

    pool = HandlePool(connect, size=1)
    try:
        with pytest.raises(ApiError), pool.handle() as wh:
            raise ApiError(404, "unknown or disabled project 'x'")
        with pool.handle() as again:
            assert again is wh and len(opened) == 1
        with pytest.raises(ApiError), pool.handle():
            raise ApiError(503, "warehouse unavailable: gone")
        with pool.handle() as fresh:
            assert fresh is not wh and len(opened) == 2 and fresh.rows("SELECT 1") == [(1,)]
    finally:
        pool.close()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_from_the_openapi_document(served: Served, mode: str) -> None:
    """Schemathesis generates requests for every operation of /openapi.json (valid ones, then invalid ones):
    no answer is a 5xx, and every answer matches the document (status code, content type, body schema)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    auth = {"Authorization": f"Bearer {TOKEN}"}
    seen: dict[int, int] = {}
    no_inputs = {"/healthz", "/readyz", "/v0/status", "/metrics"}  # nothing to make invalid
    for op in operations:
        if mode == "negative" and op.path in no_inputs:
            continue
        strategy = op.as_strategy(
            generation_mode=GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
        )

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case) -> None:  # noqa: ANN001 - a schemathesis Case
            # positive_data_acceptance is left out: a random string is a schema-valid q, and 400 is its answer.
            response = case.call_and_validate(
                base_url=served.url, headers=auth, timeout=30, excluded_checks=[positive_data_acceptance]
            )
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, response.text

        check()
    assert seen.get(200) if mode == "positive" else seen.get(400), seen


def test_serve_with_user_pipes(tmp_path: Path) -> None:
    """`bucketer serve` on a warehouse with no pipeline: built-in pipes, user pipes with typed parameters bound by
    the engine, project= injected into a user pipe's bucketId; a bad pipe file stops serve with one line."""
    from connectors.warehouse import EmbeddedWarehouse
    from stream.schema import ensure_schema

    data = tmp_path / "wh"
    seg_a, seg_b = "seg-a", next(f"seg-{i}" for i in range(100) if bucket_of(f"seg-{i}", 4) != bucket_of("seg-a", 4))
    with EmbeddedWarehouse(data) as wh:
        ensure_schema(wh, 4)
        wh.command(
            "INSERT INTO insightsProjects (id, name, slug, segmentId, enabled, createdAt, updatedAt, _deleted, "
            "_version) VALUES ('p1', 'A', 'proj-a', {s:String}, 1, now64(3), now64(3), 0, 1)",
            {"s": seg_a},
        )
        for seg, n in ((seg_a, 3), (seg_b, 2)):
            for i in range(n):
                wh.command(
                    f"INSERT INTO {cleaned_table(bucket_of(seg, 4))} (activityId, segmentId, timestamp) "
                    "VALUES ({a:String}, {s:String}, now64(3))",
                    {"a": f"{seg}-act-{i}", "s": seg},
                )
    pipes = tmp_path / "pipes"
    pipes.mkdir()
    (pipes / "activities_of.sql").write_text(
        f"SELECT activityId FROM {ROUTING}(bucketId = {{bucketId:Int64}})\n"
        "WHERE segmentId = {segmentId:String} ORDER BY activityId LIMIT {n:UInt32}\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETER_")} | {"BUCKETER_API_TOKEN": TOKEN}
    cmd = [*BUCKETER, "serve", "--data-dir", str(data), "--port", str(port), "--pipes", str(pipes)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        wait_for(url, proc, "/readyz", 60)

        def pipe(name: str, **params: object) -> httpx.Response:
            return httpx.get(f"{url}/v0/pipes/{name}.json", params=params, headers=auth, timeout=30)

        got = pipe(ROUTING, project="proj-a").json()["data"]
        assert sorted(r["activityId"] for r in got) == [f"{seg_a}-act-{i}" for i in range(3)]
        b = bucket_of(seg_a, 4)
        r = pipe("activities_of", bucketId=b, segmentId=seg_a, n=2)
        assert r.status_code == 200, r.text
        assert r.json()["data"] == [
            {"activityId": f"{seg_a}-act-0"},
            {"activityId": f"{seg_a}-act-1"},
        ]
        assert pipe("activities_of", project="proj-a", segmentId=seg_a, n=10).json()["rows"] == 3
        assert pipe("activities_of", project="proj-a", segmentId="x' OR 1=1 --", n=10).json()["rows"] == 0
        assert pipe("activities_of", bucketId=b, segmentId=seg_a).status_code == 400  # n missing
        assert pipe("activities_of", bucketId=b, segmentId=seg_a, n="many").status_code == 400
        assert pipe("activities_of", project="nope", segmentId=seg_a, n=1).status_code == 404
        assert pipe("activities_of", bucketId=9, segmentId=seg_a, n=1).status_code == 400
        doc = httpx.get(url + "/openapi.json", timeout=10).json()
        names = {p["name"] for p in doc["paths"]["/v0/pipes/activities_of.json"]["get"]["parameters"]}
        assert names == {"bucketId", "segmentId", "n", "project"}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert TOKEN.encode() not in err

    (pipes / "bad.sql").write_text("DROP TABLE insightsProjects")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "bad.sql" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_run_with_its_http_port_taken_says_so(bootstrap: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETER_")}
        res = subprocess.run(
            [*BUCKETER, "run", "--bootstrap", bootstrap, "--data-dir", str(tmp_path / "wh"), "--buckets", "2"]
            + ["--topic-prefix", unique("apiport") + ".", "--http-port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode == 1
    assert f"bucketer: cannot serve HTTP on 127.0.0.1:{port}" in res.stderr.strip().splitlines()[-1]
