"""The Tinybird target: ``tinybird generate``, ``tinybird copy`` and ``tinybird countries``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bucketer.app import app
from bucketer.options import DEFAULT_BUCKETS, ProjectBucketsOpt, TinybirdBucketsOpt, fail

# --- tinybird (connectors/tinybird*.py, stream/tinybird_project.py, stream/tinybird_copy.py) -----------------------
tinybird_app = typer.Typer(
    help="The Tinybird target: generate the project for N buckets, run cleaning copies.", no_args_is_help=True
)
app.add_typer(tinybird_app, name="tinybird")
TOKEN_ENV = "BUCKETER_TINYBIRD_TOKEN"


def tinybird_token() -> object:
    """The API token from BUCKETER_TINYBIRD_TOKEN, as a Secret (never an option: it must not show in --help)."""
    import os

    from connectors.secret import Secret

    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise fail(f"set {TOKEN_ENV} to a Tinybird token", 2)
    return Secret(token)


# --tinybird-url of the commands that call the Tinybird API (the token never comes from an option).
TinybirdUrlOpt = Annotated[
    str,
    typer.Option(
        "--tinybird-url",
        envvar="BUCKETER_TINYBIRD_URL",
        help="API base, e.g. https://api.tinybird.co (token: BUCKETER_TINYBIRD_TOKEN).",
    ),
]


@tinybird_app.command("generate")
def tinybird_generate(
    buckets: ProjectBucketsOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Project folder (datasources/, pipes/).")] = Path("tinybird"),
    rebucket: Annotated[
        bool, typer.Option("--rebucket", help="Change the N of an existing project to --buckets (rewrites it).")
    ] = False,
    from_buckets: Annotated[
        int | None,
        typer.Option(
            "--from",
            min=1,
            help="Migrate from this N: write the --buckets project and its migration plan (migration.json, "
            "MIGRATION.md, migration/ stage folders).",
        ),
    ] = None,
) -> None:
    """Write the Tinybird datafiles for N buckets (deterministic: same N, same files)."""
    from stream.tinybird_project import ProjectBucketsError, project_buckets, write_project

    try:
        if (rebucket or from_buckets is not None) and buckets is None:
            raise fail(
                f"{'--from' if from_buckets is not None else '--rebucket'} needs --buckets M "
                "(the new number of buckets)",
                2,
            )
        if from_buckets is not None:
            existing = project_buckets(out)
            if existing is not None and existing not in (from_buckets, buckets):
                raise fail(f"the Tinybird project in {out} has {existing} buckets, not {from_buckets} (--from)")
        n = buckets if buckets is not None else project_buckets(out) or DEFAULT_BUCKETS
        paths = write_project(n, out, rebucket=rebucket or from_buckets is not None)
    except ProjectBucketsError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{len(paths)} datafiles for {n} buckets in {out}")
    if from_buckets is not None:
        from stream.tinybird_migration import PLAN_JSON, PLAN_MD, write_plan

        plan = write_plan(from_buckets, n, out)
        typer.echo(
            f"migration {from_buckets} -> {n} (path: {plan['path']}): {len(plan['steps'])} steps, "
            f"{len(plan['stages'])} deploy stages in {out / PLAN_MD} and {out / PLAN_JSON}"
        )


@tinybird_app.command("copy")
def tinybird_copy(
    url: TinybirdUrlOpt,
    bucket: Annotated[list[int] | None, typer.Option("--bucket", help="Bucket to rebuild (repeatable).")] = None,
    all_buckets: Annotated[bool, typer.Option("--all", help="Every bucket 0..N-1.")] = False,
    buckets: TinybirdBucketsOpt = DEFAULT_BUCKETS,
    parallel: Annotated[int, typer.Option("--parallel", min=1, help="Copy jobs at once (the account allows 12).")] = 12,
    poll: Annotated[float, typer.Option("--poll", min=0.01, help="Seconds between job polls.")] = 2.0,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds one job may take.")] = 3600.0,
    skip_countries: Annotated[
        bool, typer.Option("--skip-countries", help="Do not resolve new organization countries first.")
    ] = False,
) -> None:
    """Run the cleaning copy pipes now through the API and wait for each job; exit 1 if any failed."""
    from connectors.secret import Secret
    from connectors.tinybird_api import TinybirdClient
    from stream.tinybird_copy import CopyRunner

    if all_buckets == bool(bucket):
        raise fail("give --bucket n (repeatable) or --all", 2)
    chosen = list(range(buckets)) if all_buckets else list(dict.fromkeys(bucket or []))
    bad = [b for b in chosen if not 0 <= b < buckets]
    if bad:
        raise fail(f"bucket {bad[0]} out of range 0..{buckets - 1}", 2)
    token = tinybird_token()
    assert isinstance(token, Secret)
    with TinybirdClient(url, token, timeout=30.0) as client:
        if not skip_countries:
            sync_countries(client)
        runner = CopyRunner(
            client,
            max_concurrent=parallel,
            poll_interval=poll,
            timeout=timeout,
            on_result=lambda r: typer.echo(
                f"bucket {r.bucket}: {r.status} job={r.job_id} {r.seconds:.1f}s {r.detail}".rstrip()
            ),
        )
        results = runner.run(chosen)
    failed = [r for r in results if not r.ok]
    typer.echo(f"{len(results) - len(failed)} of {len(results)} copies done")
    if failed:
        raise typer.Exit(1)


def sync_countries(client: object) -> None:
    from connectors.tinybird_api import TinybirdError
    from stream.tinybird_countries import sync_country_codes

    try:
        n = sync_country_codes(client)  # type: ignore[arg-type]
    except TinybirdError as exc:
        raise fail(f"country codes: {exc}") from None
    typer.echo(f"{n} new (country, location) pairs resolved into organization_country_codes")


@tinybird_app.command("countries")
def tinybird_countries(
    url: TinybirdUrlOpt,
) -> None:
    """Resolve the organizations' new (country, location) pairs into organization_country_codes."""
    from connectors.secret import Secret
    from connectors.tinybird_api import TinybirdClient

    token = tinybird_token()
    assert isinstance(token, Secret)
    with TinybirdClient(url, token, timeout=30.0) as client:
        sync_countries(client)


# --- end tinybird --------------------------------------------------------------------------------------
