"""`bucketer local start|stop|status` as a user runs it: idempotent start, one broker, clear errors."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import psutil

from bucketer.localkafka import free_port

BUCKETER = [sys.executable, "-m", "bucketer.cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BUCKETER, *args], capture_output=True, text=True, timeout=timeout)


def brokers_in(directory: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "kafka.Kafka" in cmd and any(str(directory) in part for part in cmd):
            found.append(proc)
    return found


def test_start_twice_status_stop(tmp_path: Path) -> None:
    d = tmp_path / "k"
    port = free_port()
    common = ["--port", str(port), "--dir", str(d)]
    try:
        first = run("local", "start", *common)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip().splitlines()[-1] == f"bootstrap=127.0.0.1:{port}"

        second = run("local", "start", *common)
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip().splitlines()[-1] == f"bootstrap=127.0.0.1:{port}"
        assert "already running" in second.stdout
        assert len(brokers_in(d)) == 1

        status = run("local", "status", *common)
        assert status.returncode == 0
        assert "running" in status.stdout and f"bootstrap=127.0.0.1:{port}" in status.stdout
    finally:
        stop = run("local", "stop", *common)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert brokers_in(d) == []
    after = run("local", "status", *common)
    assert after.returncode == 3 and after.stdout.startswith("stopped")


def test_port_taken_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run("local", "start", "--port", str(port), "--dir", str(tmp_path / "k"))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "in use" in lines[0]
    assert brokers_in(tmp_path / "k") == []


def test_missing_java_is_a_one_line_error(tmp_path: Path) -> None:
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "BUCKETER_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(
        [*BUCKETER, "local", "start", "--port", str(free_port()), "--dir", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0 and "Java" in res.stderr
