"""The ``bucketer`` console script. The only place that reads the environment and installs signal handlers."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer

from bucketer.localkafka import (
    DEFAULT_PORT,
    PLAINTEXT,
    SASL_SSL,
    SECURITY_MODES,
    LocalKafka,
    LocalKafkaError,
    check_ports,
    fetch_jars,
)

app = typer.Typer(
    help="Kafka-fed streaming bucketer: Sequin changes -> cityHash64 buckets -> ClickHouse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
local_app = typer.Typer(help="A single-node Apache Kafka 4.x broker (KRaft) on 127.0.0.1.", no_args_is_help=True)
app.add_typer(local_app, name="local")

PortOpt = Annotated[int, typer.Option("--port", envvar="BUCKETER_LOCAL_PORT", help="Broker port on 127.0.0.1.")]
DirOpt = Annotated[
    Path, typer.Option("--dir", envvar="BUCKETER_LOCAL_DIR", help="Broker directory; its data survives stop/start.")
]
DEFAULT_LOCAL_DIR = Path(".bucketer/kafka")


def fail(reason: str, code: int = 1) -> typer.Exit:
    """Print a one-line reason on stderr and return the exit to raise."""
    typer.echo(f"bucketer: {reason}", err=True)
    return typer.Exit(code)


# --buckets, on every command that takes it. Each bucket is a Kafka topic (at least one partition) and two
# warehouse tables, all created up front and all read by every loader: the bound keeps that within what one
# broker and one warehouse handle well (``route --buckets 1000000`` timed out creating topics).
MAX_BUCKETS = 1024


def _check_buckets(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= MAX_BUCKETS:
        raise fail(
            f"--buckets {value} is out of range (1-{MAX_BUCKETS}: each bucket is a Kafka topic and two tables)", 2
        )
    return value


_BUCKETS_RANGE = f"1-{MAX_BUCKETS}, each bucket a topic on the broker and two tables"
# A command with a warehouse: N is the warehouse's (stream/schema.py ensure_schema); a different one is refused.
BucketsOpt = Annotated[
    int | None,
    typer.Option(
        "--buckets",
        "-n",
        envvar="BUCKETER_BUCKETS",
        callback=_check_buckets,
        show_default=False,
        help=f"Bucket count ({_BUCKETS_RANGE}); default: the warehouse's recorded count, 10 for a new warehouse. "
        "Only `bucketer rebucket` changes it.",
    ),
]
# A command without a warehouse (route, bucket-of): it must be given the warehouse's N; nothing checks it here.
FixedBucketsOpt = Annotated[
    int,
    typer.Option(
        "--buckets",
        "-n",
        envvar="BUCKETER_BUCKETS",
        callback=_check_buckets,
        help=f"Bucket count ({_BUCKETS_RANGE}); must be the warehouse's (see `bucketer status`).",
    ),
]


def _check_security(value: str) -> str:
    value = value.lower()
    if value not in SECURITY_MODES:
        raise fail(f"--security {value} is not supported: use {' or '.join(SECURITY_MODES)}", 2)
    return value


SecurityOpt = Annotated[
    str,
    typer.Option(
        "--security",
        envvar="BUCKETER_LOCAL_SECURITY",
        callback=_check_security,
        help=f"Client listener: {PLAINTEXT}, or {SASL_SSL} (SCRAM-SHA-512 over TLS; also prints config=PATH, a "
        "config file whose [kafka] table holds the client settings). A directory keeps the one it started with.",
    ),
]


@local_app.command("start")
def local_start(
    port: PortOpt = DEFAULT_PORT, dir: DirOpt = DEFAULT_LOCAL_DIR, security: SecurityOpt = PLAINTEXT
) -> None:
    """Start the broker (idempotent); the last line printed is bootstrap=127.0.0.1:PORT."""
    broker = LocalKafka(dir, port=port, security=security)
    try:
        check_ports(broker.port, broker.controller_port)
    except LocalKafkaError as exc:
        raise fail(str(exc), 2) from None
    try:
        was_running = broker.status().running
        bootstrap = broker.start()
    except LocalKafkaError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"kafka {'already running' if was_running else 'started'} in {broker.directory}")
    if security == SASL_SSL:
        typer.echo(f"config={broker.config_file}")
    typer.echo(f"bootstrap={bootstrap}")


@local_app.command("stop")
def local_stop(port: PortOpt = DEFAULT_PORT, dir: DirOpt = DEFAULT_LOCAL_DIR) -> None:
    """Stop the broker gracefully (SIGTERM, then SIGKILL after a grace period)."""
    stopped = LocalKafka(dir, port=port).stop()
    typer.echo("kafka stopped" if stopped else "kafka was not running")


@local_app.command("status")
def local_status(port: PortOpt = DEFAULT_PORT, dir: DirOpt = DEFAULT_LOCAL_DIR) -> None:
    """Tell whether the broker is running, and its bootstrap address. Exit 0 running, 3 stopped."""
    st = LocalKafka(dir, port=port).status()
    if st.running:
        typer.echo(f"running pid={st.pid} dir={st.directory}")
        typer.echo(f"bootstrap={st.bootstrap}")
    else:
        typer.echo(f"stopped dir={st.directory}")
        raise typer.Exit(3)


@local_app.command("fetch")
def local_fetch() -> None:
    """Fetch the broker's jars from Maven Central into the cache (done by start when needed)."""
    try:
        typer.echo(str(fetch_jars(quiet=False)))
    except LocalKafkaError as exc:
        raise fail(str(exc)) from None


@app.command("bucket-of")
def bucket_of_cmd(
    segment_ids: Annotated[list[str] | None, typer.Argument(help="Segment ids; read from stdin when none.")] = None,
    buckets: FixedBucketsOpt = 10,
) -> None:
    """Print cityHash64(segmentId) % N for each id, one per line, in order (bit-exact with ClickHouse)."""
    from stream.buckets import bucket_of

    # ClickHouse hashes a String's bytes, so ids are hashed as the bytes given, UTF-8 or not: arguments as the
    # OS passed them (os.fsencode undoes Python's surrogateescape decoding), stdin read as bytes.
    ids: Iterable[bytes] = (
        (os.fsencode(s) for s in segment_ids) if segment_ids else (line.rstrip(b"\r\n") for line in sys.stdin.buffer)
    )
    out = sys.stdout
    for sid in ids:
        out.write(f"{bucket_of(sid, buckets)}\n")
    out.flush()


# --- shared by the command modules ---------------------------------------------------------------------
DataDirOpt = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="BUCKETER_DATA_DIR",
        help="Embedded warehouse directory (ignored with BUCKETER_CLICKHOUSE_URL).",
    ),
]
DEFAULT_DATA_DIR = Path(".bucketer")


def open_configured_warehouse(data_dir: Path):  # noqa: ANN201 - EmbeddedWarehouse | ServerWarehouse
    """The warehouse the environment asks for: a ClickHouse server URL, else embedded chdb in ``data_dir``."""
    import os

    from connectors.warehouse import open_warehouse

    return open_warehouse(data_dir, url=os.environ.get("BUCKETER_CLICKHOUSE_URL") or None)


def install_stop(stop) -> None:  # noqa: ANN001 - any zero-argument callable
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


def log_to_stderr(verbose: bool = False) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


# The commands of the other areas register themselves on ``app`` (imported last: they import this module).
from bucketer import cli_dlq, cli_ops, cli_pipeline, cli_serve, cli_tinybird, cli_warehouse  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":
    # Run the importable module's app: the command modules register on that one, not on __main__'s.
    from bucketer.cli import main as _main

    _main()
