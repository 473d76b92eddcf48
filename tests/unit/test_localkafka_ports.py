"""``bucketer local start`` refuses a port outside 1-65535 (broker or controller) at once, with a
one-line reason and exit 2, before creating anything or starting Java (issue 16 item 5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from proctools import processes_using

from bucketer.localkafka import InvalidPort, LocalKafka, check_ports

BAD = [0, 70000, -5, 65535]  # 65535: the controller would need 65536


@pytest.mark.parametrize("port", BAD)
def test_start_refuses_a_port_out_of_range_before_touching_anything(tmp_path: Path, port: int) -> None:
    broker = LocalKafka(tmp_path / "kafka", port=port)
    with pytest.raises(InvalidPort, match="out of range"):
        broker.start(timeout=5)
    assert not (tmp_path / "kafka").exists()


def test_check_ports_accepts_the_valid_range_and_names_the_controller() -> None:
    check_ports(1, 2)
    check_ports(65534, 65535)
    with pytest.raises(InvalidPort, match="controller port 0"):
        check_ports(9092, 0)


@pytest.mark.parametrize("port", ["0", "70000", "-5"])
def test_cli_local_start_bad_port_fails_fast_with_one_line(tmp_path: Path, port: str) -> None:
    exe = shutil.which("bucketer", path=str(Path(sys.executable).parent)) or "bucketer"
    directory = tmp_path / "kafka"
    started = time.monotonic()
    done = subprocess.run(
        [exe, "local", "start", f"--port={port}", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert took < 5, took
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bucketer:") and port in lines[0], done.stderr
    assert not (directory / "broker.json").exists()
    assert processes_using(directory) == []
