"""`bucketer query` and `bucketer status` as a user runs them: Ctrl-C cancels a running query at once, the
limits are flags, the engine's output is printed as is, and a --data-dir holding no warehouse is refused
without creating anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from connectors.warehouse import LOCK_NAME, EmbeddedWarehouse

BUCKETER = Path(sys.executable).with_name("bucketer")
HEAVY = "SELECT count() FROM numbers(1e12) WHERE sipHash64(number) = 1"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BUCKETER_")} | {"COLUMNS": "140"}


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUCKETER), *args], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qcli") / "wh"
    with EmbeddedWarehouse(d) as wh:
        wh.command("CREATE TABLE t (x UInt32, name String) ENGINE = MergeTree ORDER BY x")
        wh.command("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    return d


def _one_line_error(cp: subprocess.CompletedProcess[str]) -> str:
    assert cp.returncode == 1, (cp.returncode, cp.stdout, cp.stderr)
    assert cp.stderr.count("\n") == 1 and cp.stderr.startswith("bucketer: ") and "Traceback" not in cp.stderr
    return cp.stderr


def _signal_masks(pid: int) -> dict[str, str]:
    """The main thread's signal masks (hex) from /proc (SigIgn bit 2: SIGINT ignored), and the threads that
    block SIGINT."""

    def masks(path: Path) -> dict[str, str]:
        lines = path.read_text().splitlines()
        wanted = ("Name", "SigBlk", "SigIgn", "SigCgt")
        return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines) if k in wanted}

    out = {f"main {k}": v for k, v in masks(Path(f"/proc/{pid}/status")).items()}
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        m = masks(task / "status")
        if int(m.get("SigBlk", "0"), 16) & 2:
            out[f"task {task.name} {m.get('Name')}"] = f"blocks SIGINT ({m['SigBlk']})"
    return out


def test_ctrl_c_cancels_a_running_query_at_once(warehouse: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(BUCKETER), "query", "--data-dir", str(warehouse), "--max-seconds", "600", HEAVY],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As a terminal's Ctrl-C finds it: SIGINT not ignored. A suite started in the background (`make test &`,
        # nohup) ignores SIGINT, the child inherits that, and Python then installs no KeyboardInterrupt handler
        # (seen 2026-12-04: the query ran on past the SIGINT).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # The warehouse lock holds the pid once the query's process has opened the warehouse.
        lock = warehouse / LOCK_NAME
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and lock.read_text().strip() != str(proc.pid):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.5)  # well into the engine's work
        assert proc.poll() is None, "the query ended by itself: it must still be running when Ctrl-C comes"
        signals = _signal_masks(proc.pid)  # said if the process does not exit
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 10 s after SIGINT; before it: {signals}") from None
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert took < 3, took
    assert proc.returncode == 130 and out == ""
    assert err == "bucketer: query cancelled (Ctrl-C)\n"
    # The directory is free again for the next process.
    assert run_cli("query", "--data-dir", str(warehouse), "SELECT count() AS n FROM t", cwd=tmp_path).stdout == (
        '{"n":2}\n'
    )


def test_limit_flags(warehouse: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    slow = run_cli("query", "--data-dir", str(warehouse), "--max-seconds", "1", HEAVY, cwd=tmp_path)
    assert time.monotonic() - t0 < 30
    assert "Timeout exceeded" in _one_line_error(slow) and "--max-seconds 1" in slow.stderr
    many = run_cli("query", "--data-dir", str(warehouse), "--max-rows", "5", "SELECT * FROM numbers(10)", cwd=tmp_path)
    assert "max rows: 5" in _one_line_error(many) and many.stdout == ""
    ok = run_cli("query", "--data-dir", str(warehouse), "--max-rows", "10", "SELECT * FROM numbers(10)", cwd=tmp_path)
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 10
    small = run_cli(
        "query",
        "--data-dir",
        str(warehouse),
        "--max-memory-mb",
        "1",
        "SELECT length(groupArray(number)) FROM numbers(100000000)",
        cwd=tmp_path,
    )
    assert "memory limit" in _one_line_error(small).lower()
    off = run_cli("query", "--data-dir", str(warehouse), "--max-seconds", "0", "SELECT 1", cwd=tmp_path)
    assert off.returncode == 2 and "--max-seconds" in off.stderr  # 0 would mean "no limit" to the engine
    helptext = run_cli("query", "--help", cwd=tmp_path).stdout
    assert all(flag in helptext for flag in ("--max-seconds", "--max-rows", "--max-memory-mb", "FORMAT"))


def test_output_is_the_engines_own(warehouse: Path, tmp_path: Path) -> None:
    def q(sql: str) -> str:
        cp = run_cli("query", "--data-dir", str(warehouse), sql, cwd=tmp_path)
        assert cp.returncode == 0 and cp.stderr == "", cp.stderr
        return cp.stdout

    assert q("SELECT x, name FROM t ORDER BY x FORMAT CSV") == '1,"a"\n2,"b"\n'
    assert q("SELECT x, name FROM t ORDER BY x FORMAT TSVWithNames") == "x\tname\n1\ta\n2\tb\n"
    assert [json.loads(line) for line in q("SELECT x, name FROM t ORDER BY x").splitlines()] == [
        {"x": 1, "name": "a"},
        {"x": 2, "name": "b"},
    ]
    assert json.loads(q("SHOW TABLES")) == {"name": "t"}
    assert [json.loads(line)["name"] for line in q("DESCRIBE t").splitlines()] == ["x", "name"]
    assert "ReadFromMergeTree" in q("EXPLAIN SELECT x FROM t")
    assert q("EXISTS t FORMAT TSV") == "1\n"


def test_refusals_are_one_line(warehouse: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-show-me\n")
    for sql, needle in (
        (f"SELECT file('{secret}')", "file() reaches outside"),
        ("SELECT * FROM url('http://127.0.0.1:1/x', 'CSV', 'a String')", "url() reaches outside"),
        ("INSERT INTO t VALUES (3, 'c')", "only SELECT"),
        ("SELECT 1 SETTINGS max_execution_time = 0", "readonly"),
        ("SELECT x FROM", "Syntax error"),
    ):
        cp = run_cli("query", "--data-dir", str(warehouse), sql, cwd=tmp_path)
        assert needle in _one_line_error(cp) and "do-not-show-me" not in cp.stdout + cp.stderr, sql


@pytest.mark.parametrize("command", ["query", "status"])
def test_a_data_dir_without_a_warehouse_is_refused_and_not_created(command: str, tmp_path: Path) -> None:
    args = ["SELECT 1"] if command == "query" else []
    typo = tmp_path / "typo"
    cp = run_cli(command, "--data-dir", str(typo), *args, cwd=tmp_path)
    assert "no warehouse in" in _one_line_error(cp) and not typo.exists()
    # The same through the environment, and for the default .bucketer/ of the working directory.
    cp = run_cli(command, *args, cwd=tmp_path, env=_env() | {"BUCKETER_DATA_DIR": str(typo)})
    assert "no warehouse in" in _one_line_error(cp) and not typo.exists()
    cp = run_cli(command, *args, cwd=tmp_path)
    assert "no warehouse in .bucketer" in _one_line_error(cp) and not (tmp_path / ".bucketer").exists()
    # An existing directory that is not a warehouse (or a file) is refused too, and left as it was.
    other = tmp_path / "other"
    other.mkdir()
    cp = run_cli(command, "--data-dir", str(other), *args, cwd=tmp_path)
    assert "no warehouse in" in _one_line_error(cp) and list(other.iterdir()) == []
    afile = tmp_path / "afile"
    afile.write_text("x")
    cp = run_cli(command, "--data-dir", str(afile), *args, cwd=tmp_path)
    assert "no warehouse in" in _one_line_error(cp) and afile.read_text() == "x"
