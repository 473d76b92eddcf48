"""The ``bucketer`` console script: imports the command modules onto ``app`` (bucketer/app.py) and runs it.
Here too: ``local`` (the development broker) and ``bucket-of``. Shared options and helpers: bucketer/options.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

# The command modules register themselves on ``app`` when imported.
from bucketer import cli_dlq, cli_ops, cli_pipeline, cli_serve, cli_tinybird, cli_warehouse  # noqa: F401
from bucketer.app import app
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
from bucketer.options import FixedBucketsOpt, fail

local_app = typer.Typer(help="A single-node Apache Kafka 4.x broker (KRaft) on 127.0.0.1.", no_args_is_help=True)
app.add_typer(local_app, name="local")

PortOpt = Annotated[int, typer.Option("--port", envvar="BUCKETER_LOCAL_PORT", help="Broker port on 127.0.0.1.")]
DirOpt = Annotated[
    Path, typer.Option("--dir", envvar="BUCKETER_LOCAL_DIR", help="Broker directory; its data survives stop/start.")
]
DEFAULT_LOCAL_DIR = Path(".bucketer/kafka")


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


config_app = typer.Typer(help="The effective configuration (bucketer/config.py).", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command(
    "show",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "allow_interspersed_args": False},
)
def config_show(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    command: Annotated[
        list[str] | None,
        typer.Argument(
            help="A command and its arguments (e.g. route --batch-size 500): its settings as it would resolve "
            "them, flags included; nothing runs."
        ),
    ] = None,
) -> None:
    """Print the effective settings, the source of each (file, env, flag, default), secrets as ***."""
    from bucketer.config import current_file, show

    config = current_file(ctx)
    words = list(command or [])
    if not words:
        show(None, config, as_json, "")
        return
    root = ctx.find_root()
    group: Any = root.command
    path: list[str] = []
    sub_ctx: Any = root
    while isinstance(group, TyperGroup) and words:
        name = words.pop(0)
        cmd = group.get_command(sub_ctx, name)
        if cmd is None:
            raise fail(f"config show: no command {' '.join([*path, name])!r}", 2)
        path.append(name)
        if isinstance(cmd, TyperGroup):
            sub_ctx = cmd.make_context(name, [], parent=sub_ctx, resilient_parsing=True)
        group = cmd
    if isinstance(group, TyperGroup):
        raise fail(f"config show: {' '.join(path)} needs a command", 2)
    with group.make_context(path[-1], words, parent=sub_ctx) as target:
        show(target, current_file(target) or config, as_json, " ".join(path))


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
