"""``bucketer serve``: the HTTP query API (stream/api.py) over a warehouse with no pipeline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from bucketer.app import app
from bucketer.options import (
    DEFAULT_DATA_DIR,
    DEFAULT_ROUTER_GROUP,
    BootstrapOpt,
    DataDirOpt,
    KafkaConfigOpt,
    KafkaOptionOpt,
    RouterGroupOpt,
    TopicPrefixOpt,
    fail,
    install_stop,
    kafka_connection,
    log_to_stderr,
    open_configured_warehouse,
)

HttpHostOpt = Annotated[
    str,
    typer.Option(
        "--http-host", envvar="BUCKETER_HTTP_HOST", help="Address to listen on (needs BUCKETER_API_TOKEN off loopback)."
    ),
]


def api_tokens() -> tuple[str, ...]:
    """The read tokens of BUCKETER_API_TOKEN (comma-separated); empty: no auth."""
    return tuple(t.strip() for t in os.environ.get("BUCKETER_API_TOKEN", "").split(",") if t.strip())


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise fail(f"{name}={raw!r} is not a number", 2) from None
    if value <= 0:
        raise fail(f"{name} must be positive, got {raw}", 2)
    return value


def http_config(port: int, host: str):  # noqa: ANN201 - stream.api.HttpConfig (imported late: fastapi)
    """``bucketer run --http-port``'s API settings: tokens and query limits from the environment, as serve's."""
    from stream.api import ApiConfig, HttpConfig
    from stream.query import QueryLimits

    d = QueryLimits()
    limits = QueryLimits(
        _env_number("BUCKETER_QUERY_TIMEOUT", d.timeout_s),
        int(_env_number("BUCKETER_QUERY_MAX_ROWS", d.max_result_rows)),
        int(_env_number("BUCKETER_QUERY_MAX_MEMORY", d.max_memory_bytes)),
    )
    pipes_dir = os.environ.get("BUCKETER_PIPES_DIR")
    pipes = user_pipes(Path(pipes_dir)) if pipes_dir else ()
    return HttpConfig(port=port, host=host, api=ApiConfig(tokens=api_tokens(), limits=limits, pipes=pipes))


def user_pipes(folder: Path):  # noqa: ANN201 - tuple[stream.api.UserPipe, ...]
    from stream.api import ServeError, load_pipes

    try:
        return load_pipes(folder)
    except ServeError as exc:
        raise fail(str(exc), 2) from None


@app.command("serve")
def serve_cmd(
    port: Annotated[int, typer.Option("--port", envvar="BUCKETER_HTTP_PORT", help="HTTP port.")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    http_host: HttpHostOpt = "127.0.0.1",
    bootstrap: BootstrapOpt = None,
    kafka_config: KafkaConfigOpt = None,
    kafka_option: KafkaOptionOpt = None,
    topic_prefix: TopicPrefixOpt = "",
    router_group: RouterGroupOpt = DEFAULT_ROUTER_GROUP,
    query_timeout: Annotated[
        float, typer.Option("--query-timeout", envvar="BUCKETER_QUERY_TIMEOUT", min=0.1, help="Seconds per query.")
    ] = 30.0,
    max_result_rows: Annotated[
        int, typer.Option("--max-result-rows", envvar="BUCKETER_QUERY_MAX_ROWS", min=1, help="Rows per answer.")
    ] = 1_000_000,
    pipes: Annotated[
        Path | None,
        typer.Option(
            "--pipes", envvar="BUCKETER_PIPES_DIR", help="Folder of NAME.sql user pipes ({param:Type} parameters)."
        ),
    ] = None,
    max_memory: Annotated[
        int, typer.Option("--max-memory", envvar="BUCKETER_QUERY_MAX_MEMORY", min=1, help="Bytes per query.")
    ] = 4 << 30,
) -> None:
    """Serve the Tinybird-compatible HTTP API (/v0/sql, /v0/pipes/..., /v0/status) on a warehouse."""
    from connectors.topics import TopicNames
    from connectors.warehouse import WarehouseError
    from stream.api import ApiConfig, ServeError, Server, bind, check_bind, create_app
    from stream.dlq import ClassCounts
    from stream.query import QueryLimits

    kafka = kafka_connection(bootstrap, kafka_config, kafka_option, required=False)  # for /v0/status's figures
    tokens = api_tokens()
    user = user_pipes(pipes) if pipes else ()
    log_to_stderr()
    try:
        check_bind(http_host, tokens)
        # Open (and hold) the warehouse first: a data dir held by another process is refused here, in one line.
        with open_configured_warehouse(data_dir) as wh:
            sock = bind(http_host, port)
            config = ApiConfig(
                tokens=tokens,
                limits=QueryLimits(query_timeout, max_result_rows, max_memory),
                kafka=kafka,
                topic_prefix=topic_prefix,
                router_group=router_group,
                pipes=user,
            )
            counts = ClassCounts(kafka, TopicNames(topic_prefix)) if kafka is not None else None
            app = create_app(lambda: open_configured_warehouse(data_dir), config, dlq_by_class=counts)
            server = Server(app, sock)
            typer.echo(f"serving on {server.url}" + ("" if tokens else " (no BUCKETER_API_TOKEN: no auth)"), err=True)
            wh.rows("SELECT 1")
            install_stop(server.stop_soon)  # SIGINT/SIGTERM: finish the requests in flight, exit 0
            server.run()
    except (ServeError, WarehouseError) as exc:
        raise fail(str(exc), 2 if isinstance(exc, ServeError) else 1) from None
