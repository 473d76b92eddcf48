"""bucketer/config.py: validation of the config file, `config show` (sources, redaction), JSON log lines, and
/healthz, /readyz on the metrics port. The CLI runs as a subprocess (the file fills environment-only settings
into its own environment, which must not leak into the test process)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bucketer.options import JsonFormatter
from stream.metrics import Health, serve

SECRETS = ("pw-in-the-file-93b1", "pw-in-the-env-5d2e", "url-pw-77aa", "api-token-c0ffee", "tb-token-beef")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETER_")}
    return subprocess.run(
        [sys.executable, "-m", "bucketer", *args], capture_output=True, text=True, timeout=60, env=base | (env or {})
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[routr]\nx = 1\n", "unknown section [routr]"),
        ('[router]\nbatch_size = "ten"\n', '[router] batch_size: expected an integer, not "ten"'),
        ("[router]\nbogus = 1\n", "unknown key [router] bogus"),
        ("[loader]\nrefresh = 3\n", "[loader] refresh: expected a string, not 3"),
        ('[kafka]\ngroup.id = "g"\n', "[kafka] group.id is set by bucketer itself"),
        ("[http]\napi_token = 5\n", "[http] api_token: expected a string, not 5"),
        ('[enrichment]\nenrich_on_exit = "yes"\n', "[enrichment] enrich_on_exit: expected true or false"),
        ("router = 1\n", "router must be a table"),
        ("[router\n", "not valid TOML"),
    ],
)
def test_a_bad_config_is_one_line_naming_the_key_exit_2(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "bucketer.toml"
    path.write_text(text)
    for args in (["route", "--config", str(path)], ["--config", str(path), "load"], ["config", "show"]):
        proc = cli(*args, env={"BUCKETER_CONFIG": str(path)} if args[0] == "config" else None)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith(f"bucketer: config {path}: ") and reason in lines[0], lines


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    proc = cli("run", "--config", str(tmp_path / "none.toml"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"bucketer: config {tmp_path / 'none.toml'}: no such file"


def test_config_show_redacts_every_secret_and_names_each_source(tmp_path: Path) -> None:
    path = tmp_path / "bucketer.toml"
    path.write_text(
        f'[kafka]\n"bootstrap.servers" = "127.0.0.1:9092"\nsecurity.protocol = "SASL_SSL"\n'
        f'sasl.mechanism = "SCRAM-SHA-512"\nsasl.username = "u"\nsasl.password = "{SECRETS[0]}"\n'
        f'[warehouse]\nurl = "http://bob:{SECRETS[2]}@ch.example:8123/db"\n'
        f'[http]\napi_token = "{SECRETS[3]}"\n[router]\ntinybird_token = "{SECRETS[4]}"\nbatch_size = 7\n'
    )
    env = {"BUCKETER_KAFKA_SSL_KEY_PASSWORD": SECRETS[1], "BUCKETER_BATCH_TIME": "0.5"}
    for args in (["--json"], ["--json", "route", "--group", "g-flag"], []):
        proc = cli("config", "show", "--config", str(path), *args, env=env)
        assert proc.returncode == 0, proc.stderr
        for secret in SECRETS:
            assert secret not in proc.stdout + proc.stderr
    shown = json.loads(cli("config", "show", "--config", str(path), "--json", "route", env=env).stdout)["settings"]
    assert shown["kafka.sasl.password"] == {"value": "***", "source": "file"}
    assert shown["kafka.ssl.key.password"] == {"value": "***", "source": "env"}
    assert shown["warehouse.url"] == {"value": "http://bob:***@ch.example:8123/db", "source": "file"}
    assert shown["http.api_token"]["value"] == shown["router.tinybird_token"]["value"] == "***"
    assert shown["router.batch_size"] == {"value": 7, "source": "file"}
    assert shown["router.batch_time"] == {"value": 0.5, "source": "env"}
    assert shown["router.sink"] == {"value": "kafka", "source": "default"}


def test_a_password_flag_is_refused_so_it_never_shows_in_ps() -> None:
    proc = cli("config", "show", "route", "-X", f"sasl.password={SECRETS[0]}")
    assert proc.returncode == 2 and SECRETS[0] not in proc.stderr and "never a flag" in proc.stderr


def test_json_log_lines_carry_the_message_coordinates() -> None:
    record = logging.LogRecord("bucketer.loader", logging.WARNING, __file__, 1, "dead-lettering %s", ("x\ny",), None)
    record.__dict__.update(topic="t", partition=2, offset=41)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "WARNING" and doc["logger"] == "bucketer.loader" and doc["msg"] == "dead-lettering x\ny"
    assert (doc["topic"], doc["partition"], doc["offset"]) == ("t", 2, 41) and doc["ts"].endswith("+00:00")
    plain = json.loads(JsonFormatter().format(logging.LogRecord("b", logging.INFO, __file__, 1, "m", (), None)))
    assert "topic" not in plain and plain["msg"] == "m"


class Worker:
    loop_beat: float | None = None


def test_health_endpoints_on_the_metrics_port() -> None:
    now = [1000.0]
    worker, reason = Worker(), {"ready": "consumer group g has no partitions assigned yet"}
    health = Health([worker], ready=lambda: reason["ready"], stall_after=60, clock=lambda: now[0])
    server = serve(0, health=health)
    url = f"http://127.0.0.1:{server.port}"
    try:
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}  # not started yet: alive
        worker.loop_beat = 990.0
        assert httpx.get(url + "/healthz").status_code == 200
        not_ready = httpx.get(url + "/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["reason"] == reason["ready"]
        reason["ready"] = None
        assert httpx.get(url + "/readyz").json() == {"status": "ready"}
        now[0] = 1100.0  # the loop has not turned for 110 s
        stalled = httpx.get(url + "/healthz")
        assert stalled.status_code == 503 and "has not turned for 110s" in stalled.json()["reason"]
        assert httpx.get(url + "/readyz").status_code == 503  # not alive: not ready either
        metrics = httpx.get(url + "/metrics")
        assert metrics.status_code == 200 and "bucketer_dead_letter" in metrics.text
        assert httpx.get(url + "/nope").status_code == 404
    finally:
        server.stop()


def test_a_failed_worker_is_unhealthy() -> None:
    health = Health([], failed=lambda: "a worker failed: boom")
    assert health.alive() == "a worker failed: boom" and health.ready() == "a worker failed: boom"
