"""`bucketer status` and `bucketer query` on a data dir held by a real `bucketer run --http-port` (real broker):
they go through its HTTP API and print what they print on a free data dir; after the run exits, they read the
directory directly again. A held data dir whose holder serves no API is refused in one line.

Phase 1 loads the generated messages and rebuilds every bucket (`run --until-idle --enrich-on-exit`); phase 2
holds the same data dir with `run --http-port` and a token. Nothing more is produced in phase 2, so the CLI's
answers can be compared with the API's (and, after the exit, with the local path's) exactly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import Producer
from kafkatools import create_topics, unique

from bucketer.localkafka import free_port
from connectors.topics import TopicNames
from connectors.warehouse import API_NAME, dir_holder
from stream.buckets import bucket_of
from stream.loadgen import LoadgenConfig, generate

BUCKETS = 3
TOKEN = "via-api-t0ken"
UNION = "activityRelations_deduplicated_cleaned_bucket_union"
BUCKETER = [sys.executable, "-m", "bucketer"]
COUNT_SQL = f"SELECT count() FROM {UNION}"
PROJECT_SQL = (
    "SELECT {project:String} AS p, {bucketId:UInt32} AS b, count() AS n FROM {bucket} "
    "WHERE segmentId = {segmentId:String}"
)
# Query errors, kept from the API path to compare with the local path after the run exits.
ERRORS = {
    "file": "SELECT * FROM file('/etc/hostname', 'LineAsString')",
    "table": "SELECT count() FROM no_such_table_here",
    "write": "DROP TABLE bucketer_settings",
    "syntax": "SELECT FROM WHERE",
}


@dataclass
class Held:
    url: str
    proc: subprocess.Popen[bytes]
    data: Path
    env: dict[str, str]
    tmp: Path
    segments: dict[str, str]  # slug -> segmentId of live projects
    seen: dict[str, object] = field(default_factory=dict)  # answers through the API, for the local comparison


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*BUCKETER, *args], env=env, capture_output=True, timeout=timeout)


def api_get(h: Held, path: str, **params: object) -> httpx.Response:
    r = httpx.get(h.url + path, params=params, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r


@pytest.fixture(scope="module")
def held(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Held]:
    tmp = tmp_path_factory.mktemp("viaapi")
    # The data dir where another user can reach it (pytest's tmp is the owner's only): see test_another_user.
    outer = Path(tempfile.mkdtemp(prefix="bucketer-viaapi-"))
    outer.chmod(0o755)
    data = outer / "wh"
    topics = TopicNames(unique("viaapi") + ".")
    create_topics(bootstrap, [topics.source, *topics.references().values()], partitions=2)
    cfg = LoadgenConfig(count=1500, seed=11, segments=12, bad_fraction=0.02)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    last_project: dict[str, dict] = {}
    for g in generate(cfg):
        topic = topics.source if g.topic == "activityRelations" else topics.reference(g.topic)
        producer.produce(topic, key=g.key, value=g.value)
        if g.topic == "insightsProjects" and g.value is not None:
            msg = orjson.loads(g.value)
            last_project[msg["record"]["id"]] = msg
    assert producer.flush(60) == 0
    segments = {
        m["record"]["slug"]: m["record"]["segmentId"]
        for m in last_project.values()
        if m["action"] != "delete" and m["record"]["enabled"] and m["record"]["deletedAt"] is None
    }
    assert segments, "the generator made live projects"
    common = ["--bootstrap", bootstrap, "--data-dir", str(data), "--buckets", str(BUCKETS)]
    common += ["--topic-prefix", topics.prefix]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETER_")}
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    done = cli(env, "run", *common, "--until-idle", "3", "--enrich-on-exit", timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    port = free_port()
    log = (tmp / "run.log").open("wb")
    proc = subprocess.Popen(
        [*BUCKETER, "run", *common, "--http-port", str(port)],
        env=env | {"BUCKETER_API_TOKEN": TOKEN},
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    h = Held(url, proc, data, env | {"BUCKETER_API_TOKEN": TOKEN}, tmp, segments)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp / "run.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("bucketer run --http-port never became ready")
        yield h
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        shutil.rmtree(outer, ignore_errors=True)


def through_api(r: subprocess.CompletedProcess[bytes], h: Held) -> bool:
    return f"reading it through its API at {h.url}" in r.stderr.decode()


def test_the_holder_records_its_url_and_never_its_token(held: Held) -> None:
    record = orjson.loads((held.data / API_NAME).read_bytes())
    assert record == {"url": held.url, "pid": held.proc.pid, "token_required": True}
    assert TOKEN not in (held.data / API_NAME).read_text()
    found = dir_holder(held.data)
    assert found is not None and (found.pid, found.api_url, found.token_required) == (held.proc.pid, held.url, True)


def test_status_json_through_the_api_matches_v0_status(held: Held) -> None:
    r = cli(held.env, "status", "--data-dir", str(held.data), "--json")
    assert r.returncode == 0, r.stderr.decode()
    assert through_api(r, held)
    mine = orjson.loads(r.stdout)
    theirs = api_get(held, "/v0/status").json()
    # The same keys as the local `status --json` (Status.as_json), the API's extras left out.
    from dataclasses import fields

    from stream.status import Status

    assert set(mine) == {f.name for f in fields(Status)}
    for key in ("raw_total", "cleaned_total", "dlq_messages", "router_lag", "kafka_error"):
        assert mine[key] == theirs[key], key
    assert mine["raw_total"] > 0 and mine["cleaned_total"] > 0
    assert mine["dlq_messages"] is not None and mine["dlq_messages"] > 0  # the run's Kafka figures (2% bad)
    stable = ("bucket", "raw_rows", "cleaned_rows", "share", "snapshot_id", "rebuilt_at", "rebuild_seconds")
    assert [{k: b[k] for k in stable} for b in mine["buckets"]] == [
        {k: b[k] for k in stable} for b in theirs["buckets"]
    ]
    assert len(mine["buckets"]) == BUCKETS
    held.seen["status"] = mine


def test_status_table_through_the_api(held: Held) -> None:
    r = cli(held.env, "status", "--data-dir", str(held.data))
    assert r.returncode == 0, r.stderr.decode()
    assert through_api(r, held)
    out = r.stdout.decode()
    st = api_get(held, "/v0/status").json()
    assert f"bucketer status ({BUCKETS} buckets)" in out
    assert f"{st['raw_total']:,}" in out and f"{st['cleaned_total']:,}" in out
    assert f"DLQ messages: {st['dlq_messages']}" in out


def test_query_through_the_api_matches_v0_sql(held: Held) -> None:
    r = cli(held.env, "query", "--data-dir", str(held.data), COUNT_SQL)
    assert r.returncode == 0, r.stderr.decode()
    assert through_api(r, held)
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 1
    n = api_get(held, "/v0/sql", q=f"{COUNT_SQL} FORMAT JSON").json()["data"][0]["count()"]
    assert orjson.loads(lines[0]) == {"count()": int(n)} and int(n) > 0
    held.seen["count"] = r.stdout
    # A FORMAT clause: the engine's raw output, as the API gives it; a format for people too.
    for fmt in ("CSVWithNames", "Pretty", "JSON"):
        q = f"SELECT segmentId, count() AS n FROM {UNION} GROUP BY segmentId ORDER BY segmentId FORMAT {fmt}"
        r = cli(held.env, "query", "--data-dir", str(held.data), q)
        assert r.returncode == 0, r.stderr.decode()
        if fmt != "JSON":  # FORMAT JSON's statistics (elapsed) differ from one run to the next
            assert r.stdout == api_get(held, "/v0/sql", q=q).content
            held.seen[fmt] = r.stdout
        else:
            assert orjson.loads(r.stdout)["data"] == api_get(held, "/v0/sql", q=q).json()["data"]


def test_query_with_a_project_through_the_api(held: Held) -> None:
    slug, segment = sorted(held.segments.items())[0]
    q = PROJECT_SQL
    r = cli(held.env, "query", "--data-dir", str(held.data), "--project", slug, q)
    assert r.returncode == 0, r.stderr.decode()
    got = orjson.loads(r.stdout)
    rows = api_get(held, "/v0/pipes/activityRelations_bucket_routing.json", project=slug).json()["data"]
    mine = [r for r in rows if r["segmentId"] == segment]
    assert mine and got == {"p": slug, "b": bucket_of(segment, BUCKETS), "n": len(mine)}
    held.seen["project"] = (slug, r.stdout)
    r = cli(held.env, "query", "--data-dir", str(held.data), "--project", "no-such-project", q)
    assert r.returncode == 1
    assert r.stderr.decode().splitlines()[-1] == "bucketer: no enabled project with slug 'no-such-project'"


def test_query_errors_through_the_api_are_one_line(held: Held) -> None:
    for name, q in ERRORS.items():
        r = cli(held.env, "query", "--data-dir", str(held.data), q)
        err = r.stderr.decode().splitlines()
        assert r.returncode == 1, (name, r.stderr.decode())
        note = f"bucketer: {held.data} is held by pid {held.proc.pid}: reading it through its API at {held.url}"
        assert r.stdout == b"" and err[-1].startswith("bucketer: ") and err[:-1] in ([], [note]), (name, err)
        assert "Traceback" not in r.stderr.decode()
        held.seen["error:" + name] = err[-1]
    assert "file() reaches outside" in str(held.seen["error:file"])
    assert "no_such_table_here" in str(held.seen["error:table"])


SLOW_SQL = "SELECT count() FROM numbers(1e11) WHERE sipHash64(number) = 1"


def test_query_limits_go_through_the_api(held: Held) -> None:
    """--max-rows / --max-seconds tighten the running process's limits (30 s there), in one line and exit 1;
    a flag looser than anything the API takes is the process's own limit, as it is locally."""
    r = cli(held.env, "query", "--data-dir", str(held.data), "--max-rows", "1", "SELECT number FROM numbers(3)")
    err = r.stderr.decode().splitlines()
    assert r.returncode == 1 and r.stdout == b"" and through_api(r, held), r.stderr.decode()
    assert err[-1].startswith("bucketer: ") and "Limit for result exceeded, max rows: 1.00" in err[-1], err
    assert "Traceback" not in r.stderr.decode()
    held.seen["error:max-rows"] = err[-1]
    r = cli(held.env, "query", "--data-dir", str(held.data), "--max-rows", "3", "SELECT number FROM numbers(3)")
    assert r.returncode == 0 and r.stdout == b'{"number":0}\n{"number":1}\n{"number":2}\n', r.stderr.decode()

    t0 = time.monotonic()
    r = cli(held.env, "query", "--data-dir", str(held.data), "--max-seconds", "0.3", SLOW_SQL)
    took = time.monotonic() - t0
    err = r.stderr.decode().splitlines()
    assert r.returncode == 1 and r.stdout == b"" and through_api(r, held), r.stderr.decode()
    assert "Timeout exceeded" in err[-1] and "maximum: 300.000 ms" in err[-1], err
    assert err[-1].endswith("(--max-seconds 0.3, or the running process's BUCKETER_QUERY_TIMEOUT if lower)"), err
    assert took < 20, took  # the flag's 0.3 s, not the process's 30 s

    big = ["--max-seconds", "10000000", "--max-rows", "10000000000000000", "--max-memory-mb", "2000000000"]
    r = cli(held.env, "query", "--data-dir", str(held.data), *big, "SELECT 1 AS x")
    assert r.returncode == 0 and r.stdout == b'{"x":1}\n', r.stderr.decode()


def test_token_missing_or_wrong(held: Held) -> None:
    env = {k: v for k, v in held.env.items() if k != "BUCKETER_API_TOKEN"}
    r = cli(env, "query", "--data-dir", str(held.data), COUNT_SQL)
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr.decode().strip().endswith("set BUCKETER_API_TOKEN to read it while it runs")
    r = cli(env | {"BUCKETER_API_TOKEN": "wrong"}, "status", "--data-dir", str(held.data))
    assert r.returncode == 1 and "refused BUCKETER_API_TOKEN: invalid token" in r.stderr.decode()
    assert "wrong" not in r.stderr.decode().replace("wrong token", "")


def test_a_holder_without_an_api_is_refused_in_one_line(held: Held) -> None:
    """A real process holding another data dir's lock (the embedded warehouse open), with no API."""
    other = held.tmp / "other"
    code = (
        "import sys\nfrom connectors.warehouse import EmbeddedWarehouse\n"
        f"with EmbeddedWarehouse({str(other)!r}):\n    print('open', flush=True)\n    sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], env=held.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        for args in (["status"], ["query", COUNT_SQL]):
            r = cli(held.env, *args, "--data-dir", str(other))
            assert r.returncode == 1 and r.stdout == b""
            assert r.stderr.decode().splitlines() == [
                f"bucketer: data dir {other} is in use by another bucketer process (pid {holder.pid}); "
                f"stop it, or start it with --http-port to read it while it runs"
            ]
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(60)


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
can_switch_user = os.geteuid() == 0 and shutil.which("setpriv") is not None


@pytest.mark.skipif(not can_switch_user, reason="needs root and setpriv to run the CLI as another user")
def test_another_user_reads_through_the_api_without_writing(held: Held) -> None:
    """`nobody` cannot write anything in the data dir (root's, 0755), yet status and query work through the
    holder's API: finding it writes nothing."""
    env = held.env | {"HOME": "/tmp"}
    r = subprocess.run(
        [*AS_NOBODY, *BUCKETER, "status", "--data-dir", str(held.data), "--json"], env=env, capture_output=True
    )
    assert r.returncode == 0 and through_api(r, held), r.stderr.decode()
    assert orjson.loads(r.stdout)["raw_total"] == api_get(held, "/v0/status").json()["raw_total"]
    r = subprocess.run(
        [*AS_NOBODY, *BUCKETER, "query", "--data-dir", str(held.data), COUNT_SQL], env=env, capture_output=True
    )
    assert r.returncode == 0 and r.stdout == held.seen["count"], r.stderr.decode()


def test_after_the_run_exits_the_cli_reads_the_dir_directly(held: Held) -> None:
    held.proc.send_signal(signal.SIGTERM)
    assert held.proc.wait(90) == 0, (held.tmp / "run.log").read_text()[-3000:]
    assert not (held.data / API_NAME).exists(), "the URL record outlived the process"
    assert dir_holder(held.data) is None
    env = held.env
    r = cli(env, "query", "--data-dir", str(held.data), COUNT_SQL)
    assert r.returncode == 0, r.stderr.decode()
    assert not through_api(r, held) and "through its API" not in r.stderr.decode()
    assert r.stdout == held.seen["count"]
    for fmt in ("CSVWithNames", "Pretty"):
        q = f"SELECT segmentId, count() AS n FROM {UNION} GROUP BY segmentId ORDER BY segmentId FORMAT {fmt}"
        r = cli(env, "query", "--data-dir", str(held.data), q)
        assert r.returncode == 0 and r.stdout == held.seen[fmt], fmt
    slug, out = held.seen["project"]  # type: ignore[misc]
    q = PROJECT_SQL
    r = cli(env, "query", "--data-dir", str(held.data), "--project", str(slug), q)
    assert r.returncode == 0 and r.stdout == out
    # The same one-line message and exit code as through the API.
    for name, q in ERRORS.items():
        r = cli(env, "query", "--data-dir", str(held.data), q)
        assert r.returncode == 1, name
        assert r.stderr.decode().splitlines() == [held.seen["error:" + name]], name
    r = cli(env, "query", "--data-dir", str(held.data), "--max-rows", "1", "SELECT number FROM numbers(3)")
    assert r.returncode == 1 and r.stderr.decode().splitlines() == [held.seen["error:max-rows"]]
    r = cli(env, "status", "--data-dir", str(held.data), "--json")
    assert r.returncode == 0 and "through its API" not in r.stderr.decode()
    local = orjson.loads(r.stdout)
    seen = held.seen["status"]
    assert isinstance(seen, dict) and set(local) == set(seen)
    for key in ("raw_total", "cleaned_total"):
        assert local[key] == seen[key]
    if can_switch_user:  # a free data dir another user cannot write: chdb cannot open it read-only; one line
        r = subprocess.run(
            [*AS_NOBODY, *BUCKETER, "query", "--data-dir", str(held.data), COUNT_SQL],
            env=env | {"HOME": "/tmp"},
            capture_output=True,
        )
        assert r.returncode == 1 and r.stderr.decode().splitlines() == [
            f"bucketer: cannot use data dir {held.data}: Permission denied "
            "(the embedded engine writes in its data dir even to read)"
        ]


def test_serve_records_its_url_too(held: Held) -> None:
    """`bucketer serve` (no pipeline, no token) on the same data dir: the CLI goes through it, no token needed."""
    assert held.proc.poll() is not None, "runs after the pipeline has exited"
    env = {k: v for k, v in held.env.items() if k != "BUCKETER_API_TOKEN"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = subprocess.Popen(
        [*BUCKETER, "serve", "--data-dir", str(held.data), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not (held.data / API_NAME).exists():
            assert serve.poll() is None and time.monotonic() < deadline, serve.stderr
            time.sleep(0.1)
        assert orjson.loads((held.data / API_NAME).read_bytes()) == {
            "url": url,
            "pid": serve.pid,
            "token_required": False,
        }
        r = cli(env, "query", "--data-dir", str(held.data), COUNT_SQL)
        assert r.returncode == 0 and f"reading it through its API at {url}" in r.stderr.decode(), r.stderr
        assert r.stdout == held.seen["count"]
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
    assert not (held.data / API_NAME).exists()
