"""The ``bucketer`` Typer application: created here, so that the command modules register on it without
importing bucketer/cli.py (which imports them)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Kafka-fed streaming bucketer: Sequin changes -> cityHash64 buckets -> ClickHouse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
