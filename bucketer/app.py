"""The ``bucketer`` Typer application: created here, so that the command modules register on it without
importing bucketer/cli.py (which imports them).

Every command gets ``--config PATH`` and ``--log-format text|json`` (bucketer/config.py) from the group class
below, so no command declares them; both are also accepted before the command (``bucketer --config F route``).
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from bucketer.config import ConfigOpt, LogFormatOpt, add_common_params


class BucketerGroup(TyperGroup):
    """The root group: hands out its commands with the common options added (bucketer/config.py)."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            add_common_params(cmd)
        return cmd


app = typer.Typer(
    cls=BucketerGroup,
    help="Kafka-fed streaming bucketer: Sequin changes -> cityHash64 buckets -> ClickHouse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _common(config: ConfigOpt = None, log_format: LogFormatOpt = None) -> None:
    """Kafka-fed streaming bucketer: Sequin changes -> cityHash64 buckets -> ClickHouse."""
