"""``bucketer tinybird copy``: cleaning copy pipes run through the API (the stand-in), jobs polled to their end,
never more than K at once; failures reported; the token never printed."""

from __future__ import annotations

from typing import Any

import pytest
from tinybird_standin import Reply, Standin
from typer.testing import CliRunner

from bucketer.cli import app
from connectors.tinybird_api import Secret, TinybirdClient
from stream.tinybird_copy import CopyRunner

TOKEN = "p.copy-secret-31337"


@pytest.fixture
def standin() -> Any:
    with Standin(token=TOKEN, copy_concurrency=100, job_seconds=0.15) as s:
        yield s


def test_at_most_k_jobs_at_once_and_every_job_polled_to_its_end(standin: Standin) -> None:
    with TinybirdClient(standin.url, Secret(TOKEN)) as client:
        results = CopyRunner(client, max_concurrent=4, poll_interval=0.02).run(list(range(13)))
    assert [r.bucket for r in results] == list(range(13))
    assert all(r.status == "done" and r.ok for r in results)
    assert sorted(j.pipe for j in standin.jobs.values()) == sorted(
        f"activityRelations_deduplicated_cleaned_bucket_{n}" for n in range(13)
    )
    assert {j.mode for j in standin.jobs.values()} == {"replace"}
    assert 2 <= standin.max_open <= 4  # parallel, but never more than K started and unfinished


def test_cli_all_buckets_reports_failures_and_never_prints_the_token(
    standin: Standin, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin.failing_pipes.add("activityRelations_deduplicated_cleaned_bucket_3")
    standin.script("*", Reply(429, {"Retry-After": "0.1"}))  # events only; copies are unaffected
    monkeypatch.setenv("BUCKETER_TINYBIRD_TOKEN", TOKEN)
    result = CliRunner().invoke(
        app,
        [
            "tinybird",
            "copy",
            "--tinybird-url",
            standin.url,
            "--all",
            "--buckets",
            "6",
            "--parallel",
            "3",
            "--poll",
            "0.02",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "bucket 3: error" in result.output and "5 of 6 copies done" in result.output
    assert TOKEN not in result.output
    help_text = CliRunner().invoke(app, ["tinybird", "copy", "--help"], env={"COLUMNS": "250"}).output
    assert TOKEN not in help_text and "BUCKETER_TINYBIRD_TOKEN" in help_text


def test_cli_wrong_token_and_bad_arguments(standin: Standin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUCKETER_TINYBIRD_TOKEN", "p.wrong-token-xyz")
    result = CliRunner().invoke(
        app,
        [
            "tinybird",
            "copy",
            "--tinybird-url",
            standin.url,
            "--bucket",
            "1",
            "--bucket",
            "2",
            "--poll",
            "0.02",
            "--skip-countries",
        ],
    )
    assert result.exit_code == 1
    assert result.output.count("failed") == 2 and "403" in result.output
    result = CliRunner().invoke(app, ["tinybird", "countries", "--tinybird-url", standin.url])
    assert result.exit_code == 1 and "403" in result.output and "p.wrong-token-xyz" not in result.output
    assert "p.wrong-token-xyz" not in result.output and standin.jobs == {}
    assert CliRunner().invoke(app, ["tinybird", "copy", "--tinybird-url", standin.url]).exit_code == 2
    assert CliRunner().invoke(app, ["tinybird", "copy", "--tinybird-url", standin.url, "--bucket", "10"]).exit_code == 2
    monkeypatch.delenv("BUCKETER_TINYBIRD_TOKEN")
    result = CliRunner().invoke(app, ["tinybird", "copy", "--tinybird-url", standin.url, "--all"])
    assert result.exit_code == 2 and "BUCKETER_TINYBIRD_TOKEN" in result.output


def test_countries_are_resolved_into_their_data_source_before_copies(
    standin: Standin, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    pairs = [
        ("", "UK"),
        ("", "Bucharest, Romania"),
        ("", "Lagos, Nigeria"),
        ("", "Newark, New Jersey"),
        ("", ""),
        ("Germany", "Berlin"),
    ]
    standin.sql = lambda q: [{"country": c, "location": loc} for c, loc in pairs] if "organizations" in q else []
    monkeypatch.setenv("BUCKETER_TINYBIRD_TOKEN", TOKEN)
    result = CliRunner().invoke(
        app, ["tinybird", "copy", "--tinybird-url", standin.url, "--bucket", "0", "--poll", "0.02"]
    )
    assert result.exit_code == 0, result.output
    assert "6 new (country, location) pairs" in result.output
    rows = map(json.loads, standin.rows["organization_country_codes"])
    got = {(r["country"], r["location"]): r["code"] for r in rows}
    assert got == {
        ("", "UK"): "GB",
        ("", "Bucharest, Romania"): "RO",
        ("", "Lagos, Nigeria"): "NG",
        ("", "Newark, New Jersey"): "US",
        ("", ""): "XX",
        ("Germany", "Berlin"): "DE",
    }
    assert "FINAL" in standin.queries[0] and len(standin.jobs) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["route", "--help"],
        ["tinybird", "--help"],
        ["tinybird", "copy", "--help"],
        ["tinybird", "countries", "--help"],
        ["tinybird", "generate", "--help"],
    ],
)
def test_help_never_shows_the_token(args: list[str]) -> None:
    result = CliRunner().invoke(app, args, env={"BUCKETER_TINYBIRD_TOKEN": TOKEN, "COLUMNS": "250"})
    assert result.exit_code == 0 and "Usage" in result.output
    assert TOKEN not in result.output
