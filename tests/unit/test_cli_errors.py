"""One-line reasons instead of tracebacks (issue 16.8), checked on the real console script as a user runs it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream.buckets import bucket_of
from stream.metrics import MetricsError, serve

BUCKETER = Path(sys.executable).with_name("bucketer")


def cli(*args: str, stdin: bytes = b"", cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BUCKETER), *args], input=stdin, capture_output=True, timeout=60, cwd=cwd)


def one_line_reason(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bucketer: "), err
    return lines[0]


def test_bucket_of_hashes_non_utf8_input_as_its_bytes() -> None:
    raw = [b"abc", b"\xff\xfe\xfa", b"5ab72c4b-1047-4735-ae83-096d47d0cdaf", b"caf\xe9"]
    proc = cli("bucket-of", "--buckets", "20", stdin=b"\n".join(raw) + b"\r\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == [str(bucket_of(r, 20)) for r in raw]


def test_a_data_dir_that_is_a_file_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    reason = one_line_reason(cli("enrich", "--all", "--data-dir", str(blocker)))
    assert "cannot use data dir" in reason


@pytest.mark.parametrize("port", ["0", "70000", "-5"])
def test_metrics_port_out_of_range_is_refused_before_anything_starts(port: str) -> None:
    proc = cli("run", "--bootstrap", "127.0.0.1:1", f"--metrics-port={port}")
    assert proc.returncode == 2
    assert "out of range" in one_line_reason(proc)


def test_metrics_port_in_use_is_a_typed_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(MetricsError, match="cannot serve metrics"):
            serve(taken.getsockname()[1])


@pytest.mark.parametrize(
    "args",
    [
        ["bucket-of", "--buckets", "1025", "x"],
        ["route", "--bootstrap", "127.0.0.1:1", "--buckets", "1000000"],
        ["run", "--bootstrap", "127.0.0.1:1", "--buckets", "0"],
        ["load", "--bootstrap", "127.0.0.1:1", "-n", "-3"],
        ["bootstrap", "--bootstrap", "127.0.0.1:1", "--buckets", "2048"],
        ["enrich", "--all", "--buckets", "5000"],
        ["rebucket", "--to", "1025", "--force"],
    ],
    ids=lambda a: a[0],
)
def test_bucket_count_out_of_range_is_refused_in_one_line(args: list[str], tmp_path: Path) -> None:
    data = tmp_path / "wh"
    proc = cli(*args, *([] if args[0] in ("bucket-of", "route") else ["--data-dir", str(data)]))
    assert proc.returncode == 2
    reason = one_line_reason(proc)
    assert "out of range (1-1024" in reason and "Kafka topic" in reason, reason
    assert not data.exists()  # refused before anything was opened


@pytest.mark.parametrize("command", [["run"], ["rebucket", "--to", "20"]], ids=lambda c: c[0])
def test_an_unreachable_broker_is_one_line_within_seconds(command: list[str], tmp_path: Path) -> None:
    data = tmp_path / "wh"
    started = time.monotonic()
    proc = cli(*command, "--bootstrap", "127.0.0.1:1", "--data-dir", str(data))
    took = time.monotonic() - started
    assert proc.returncode == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in one_line_reason(proc)
    assert took < 15, f"took {took:.1f}s to say the broker is unreachable"
    assert not data.exists()  # checked before the warehouse is opened or created
