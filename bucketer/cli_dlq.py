"""``bucketer dlq list`` and ``bucketer dlq redrive`` (stream/dlq.py)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from bucketer.app import app
from bucketer.options import BootstrapOpt, KafkaConfigOpt, KafkaOptionOpt, TopicPrefixOpt, fail, require_kafka

dlq_app = typer.Typer(
    help="The dead-letter topic: what is in it, and sending it back once fixed.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")

ClassOpt = Annotated[
    list[str] | None, typer.Option("--class", help="Only dead letters of this error class (repeatable).")
]
SinceOpt = Annotated[
    str | None,
    typer.Option(
        "--since", help="Only dead letters written since: an ISO time (UTC if no zone) or an age: 30m, 2h, 7d."
    ),
]
_AGE = re.compile(r"^(\d+)([smhd])$")


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    if text is None:
        return None
    m = _AGE.match(text.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: int(m.group(1))})
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise fail(f"--since {text!r} is neither an ISO time nor an age like 30m, 2h, 7d", 2) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _selection(classes: list[str] | None, since: str | None):  # noqa: ANN202 - stream.dlq.Selection
    from stream.dlq import Selection

    return Selection(frozenset(classes or ()), parse_since(since))


@dlq_app.command("list")
def dlq_list(
    bootstrap: BootstrapOpt = None,
    kafka_config: KafkaConfigOpt = None,
    kafka_option: KafkaOptionOpt = None,
    topic_prefix: TopicPrefixOpt = "",
    error_class: ClassOpt = None,
    since: SinceOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document instead of the table.")] = False,
) -> None:
    """Dead letters by stage and error class: count, first and last time, sample details and source offsets."""
    from connectors.kafka import BucketerKafkaError
    from connectors.topics import TopicNames
    from stream.dlq import read_dead_letters, redriven_refs, summarize

    kafka = require_kafka(bootstrap, kafka_config, kafka_option)
    topics = TopicNames(topic_prefix)
    select = _selection(error_class, since)
    try:
        letters = list(read_dead_letters(kafka, topics))
        sent = redriven_refs(kafka, topics)
    except (LookupError, BucketerKafkaError, TimeoutError) as exc:
        raise fail(str(exc)) from None
    summary = summarize(letters, select)
    redriven = sum(1 for d in letters if select(d) and d.ref in sent)
    if as_json:
        doc = {"topic": topics.dlq, "classes": [s.as_dict() for s in summary], "redriven": redriven}
        typer.echo(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{topics.dlq}: {sum(s.count for s in summary)} dead letters ({redriven} redriven)")
    for col in ("stage", "class", "count", "last", "sample detail", "sample source"):
        table.add_column(col, justify="right" if col == "count" else "left")
    for s in summary:
        sample = s.samples[0] if s.samples else {}
        last = s.last.strftime("%Y-%m-%d %H:%M:%S") if s.last else ""
        table.add_row(
            s.stage, s.error_class, str(s.count), last, sample.get("detail", "")[:60], sample.get("source", "")
        )
    Console().print(table)


@dlq_app.command("redrive")
def dlq_redrive(
    bootstrap: BootstrapOpt = None,
    kafka_config: KafkaConfigOpt = None,
    kafka_option: KafkaOptionOpt = None,
    topic_prefix: TopicPrefixOpt = "",
    error_class: ClassOpt = None,
    since: SinceOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be sent; send nothing.")] = False,
) -> None:
    """Send the selected dead letters back to their source topic (original key and bytes), each at most once:
    a second redrive sends nothing the first sent."""
    from connectors.kafka import BucketerKafkaError
    from connectors.topics import TopicNames
    from stream.dlq import redrive

    kafka = require_kafka(bootstrap, kafka_config, kafka_option)
    try:
        report = redrive(kafka, TopicNames(topic_prefix), _selection(error_class, since), dry_run=dry_run)
    except (LookupError, BucketerKafkaError, TimeoutError) as exc:
        raise fail(str(exc)) from None
    verb = "would send" if dry_run else "sent"
    typer.echo(
        f"selected {report.selected}; {verb} {report.total_sent}; already redriven {report.already}; "
        f"skipped {sum(report.skipped.values())} without their original bytes"
        + (f" ({', '.join(f'{c}: {n}' for c, n in sorted(report.skipped.items()))})" if report.skipped else "")
    )
    for topic, n in sorted(report.sent.items()):
        typer.echo(f"  {topic}: {n}")
