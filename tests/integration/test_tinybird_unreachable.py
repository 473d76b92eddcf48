"""``bucketer route --sink tinybird`` while Tinybird is unreachable (issue 16 item 4), against a real
broker: SIGTERM ends the run within seconds with nothing committed (a later run against a working
stand-in delivers every row), and an unreachable target past ``--tinybird-unreachable-deadline`` is a
one-line error and a non-zero exit."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from kafkatools import unique
from test_tinybird_route import BUCKETS, TOKEN, check_landed, committed_and_end, load, run_route_cli
from tinybird_standin import Standin

from connectors.topics import TopicNames


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again on exit: connections are refused


def start_route(bootstrap: str, prefix: str, group: str, url: str, *extra: str) -> subprocess.Popen[str]:
    exe = shutil.which("bucketer", path=str(Path(sys.executable).parent)) or "bucketer"
    env = {**os.environ, "BUCKETER_TINYBIRD_TOKEN": TOKEN}
    args = ["route", "--bootstrap", bootstrap, "--buckets", str(BUCKETS), "--sink", "tinybird"]
    args += ["--tinybird-url", url, "--topic-prefix", prefix, "--group", group, "--until-idle", "5"]
    args += ["--at-least-once", "--progress", "1", *extra]
    return subprocess.Popen([exe, *args], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


class Lines:
    """Collects a pipe's lines in a thread, so a test can wait for one with a deadline."""

    def __init__(self, pipe: object) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: object) -> None:
        for line in pipe:  # type: ignore[attr-defined]
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return True
            time.sleep(0.1)
        return False

    def done(self) -> list[str]:
        self._thread.join(10)
        return self.lines


def nothing_committed(bootstrap: str, group: str, prefix: str) -> bool:
    return all(c == -1 for c, _ in committed_and_end(bootstrap, group, TopicNames(prefix).source).values())


def test_sigterm_stops_route_while_tinybird_is_unreachable_and_commits_nothing(bootstrap: str, group: str) -> None:
    prefix = unique("tbdown") + "."
    messages = load(bootstrap, prefix, 800, seed=31)
    proc = start_route(bootstrap, prefix, group, f"http://127.0.0.1:{closed_port()}")
    try:
        out = Lines(proc.stderr)
        assert out.wait_for("retry 2", 90), "\n".join(out.lines[-20:])  # it is retrying a refused target
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = proc.wait(timeout=15)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = out.done()
    assert took < 15, took
    assert code == 0, "\n".join(lines[-20:])  # a stop asked for is not a failure
    assert not any("Traceback" in line for line in lines), "\n".join(lines[-30:])
    assert nothing_committed(bootstrap, group, prefix)  # the abandoned batch is replayed, not lost
    with Standin(token=TOKEN) as standin:
        done = run_route_cli(bootstrap, prefix, group, standin.url, TOKEN)
        assert done.returncode == 0, done.stderr[-3000:]
        check_landed(standin, messages)  # every good row delivered by the later run


def test_tinybird_unreachable_past_the_deadline_is_a_one_line_error(bootstrap: str, group: str) -> None:
    prefix = unique("tbdead") + "."
    load(bootstrap, prefix, 100, seed=32)
    url = f"http://127.0.0.1:{closed_port()}"
    proc = start_route(bootstrap, prefix, group, url, "--tinybird-unreachable-deadline", "2")
    try:
        out = Lines(proc.stderr)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = out.done()
    assert code != 0
    assert not any("Traceback" in line for line in lines), "\n".join(lines[-30:])
    last = lines[-1]
    assert last.startswith("bucketer:") and "unreachable" in last and url in last, last
    assert nothing_committed(bootstrap, group, prefix)
