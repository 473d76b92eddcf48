"""``bucketer rebucket --strategy gradual``: the client side. The migration runs in the process that holds the
data dir (``bucketer run --http-port``, stream/migration.py); this asks it to start (or resume, or abort) and
draws one progress bar per phase until it ends. Killing this command does not stop the migration; running it
again shows (or resumes) the one under way."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from bucketer.options import fail


def gradual(data_dir: Path, to: int | None, abort: bool, poll: float = 0.3) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from bucketer.cli_warehouse import ApiAnswerError, running_api

    api = running_api(data_dir)
    if api is None:
        raise fail(
            f"--strategy gradual runs inside the process that holds {data_dir}: start `bucketer run --http-port P` "
            f"(a ClickHouse server without one is not supported yet; use --strategy cutover)"
        )
    params = {"abort": "true" if abort else "false"} | ({"to": str(to)} if to is not None else {})
    import orjson

    try:
        answer: dict[str, Any] = orjson.loads(api.call("POST", "/v0/rebucket", params))
    except ApiAnswerError as exc:
        raise fail(str(exc)) from None
    m = answer["migration"]
    typer.echo(
        f"rebucket {m['id']}: {m['old']} -> {m['new']} buckets, {m['path']} path "
        f"({'each new bucket from its one parent' if m['path'] == 'split' else 'recomputed from all raw buckets'})"
        + (", aborting" if abort else f", from phase {m['phase']}")
    )
    bars: dict[str, Any] = {}
    with Progress(
        TextColumn("{task.description:>12}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        transient=False,
    ) as progress:
        while True:
            try:
                answer = api.json("/v0/rebucket")
            except ApiAnswerError as exc:
                raise fail(f"lost the running process: {exc}; run the same command again to resume") from None
            m = answer["migration"] or {}
            bar = m.get("progress") or {}
            if bar.get("phase"):
                task = bars.get(bar["phase"])
                if task is None:
                    task = bars[bar["phase"]] = progress.add_task(bar["phase"], total=max(1, bar["total"]))
                progress.update(task, completed=bar["done"], total=max(1, bar["total"]))
            if not answer["running"]:
                break
            time.sleep(poll)
    if answer.get("error"):
        raise fail(
            f"rebucket stopped in phase {m.get('phase')}: {answer['error']} (run it again to resume, or --abort)"
        )
    now = m["old"] if m.get("phase") == "aborted" else m.get("new")
    typer.echo(f"rebucket {m.get('id')}: {m.get('phase')}; the warehouse has {now} buckets")
