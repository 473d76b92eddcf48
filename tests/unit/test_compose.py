"""compose/docker-compose.yml: every bucketer command line in it parses as the CLI parses it (click's own
parser, through typer: nothing runs), with the service's environment applied; and the file renders with
``docker-compose config`` where that tool is installed (``make setup`` installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from bucketer.cli import app
from bucketer.config import KEYS

COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "docker-compose.yml"
SECRETS = {"CLICKHOUSE_PASSWORD": "pw", "BUCKETER_API_TOKEN": "token"}


def bucketer_services() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(COMPOSE.read_text())
    return {
        name: svc
        for name, svc in doc["services"].items()
        if svc.get("build", {}).get("dockerfile") == "compose/Dockerfile"
    }


def parse(argv: list[str], env: dict[str, str]) -> Any:
    """Parse ``bucketer ARGV`` the way the CLI does, without invoking the command."""
    group = typer.main.get_command(app)
    old = dict(os.environ)
    os.environ.update(env)
    try:
        with group.make_context("bucketer", list(argv)) as ctx:
            name, cmd, rest = group.resolve_command(ctx, list(argv))
            assert cmd is not None, f"no command {name}"
            return cmd.make_context(name, rest, parent=ctx)
    finally:
        os.environ.clear()
        os.environ.update(old)


def without_config(argv: list[str]) -> list[str]:
    i = argv.index("--config")
    return argv[:i] + argv[i + 2 :]


def with_local_config(argv: list[str]) -> list[str]:
    """The container's --config path replaced by the file mounted there (compose/bucketer.toml)."""
    i = argv.index("--config")
    return argv[: i + 1] + [str(COMPOSE.parent / "bucketer.toml")] + argv[i + 2 :]


def test_the_file_has_the_workers_and_the_one_config() -> None:
    services = bucketer_services()
    commands = sorted(svc["command"][0] for svc in services.values())
    assert commands.count("route") >= 2 and commands.count("load") >= 2 and "serve" in commands, commands
    ids = [svc["environment"].get("BUCKETER_INSTANCE_ID") for svc in services.values() if svc["command"][0] != "serve"]
    workers = [i for i in ids if i]
    assert len(workers) == len(set(workers)) >= 4, ids  # a shared static member name fences the other
    for name, svc in services.items():
        assert svc["command"][1:3] == ["--config", "/etc/bucketer/bucketer.toml"], name
        assert "./bucketer.toml:/etc/bucketer/bucketer.toml:ro" in svc["volumes"], name


@pytest.mark.parametrize("service", sorted(bucketer_services()))
def test_every_bucketer_command_line_parses(service: str) -> None:
    svc = bucketer_services()[service]
    argv = [str(a) for a in svc["command"]]
    env = {k: str(v) for k, v in (svc.get("environment") or {}).items() if "${" not in str(v)}
    env |= {"BUCKETER_CLICKHOUSE_URL": "http://default:pw@clickhouse:8123/default"}
    ctx = parse(without_config(argv), env)  # raises click's usage error on an unknown option or a bad value
    if "instance_id" in ctx.params:
        assert ctx.params["instance_id"] == env.get("BUCKETER_INSTANCE_ID"), ctx.params
    with_file = parse(with_local_config(argv), env)  # the mounted file's keys must be ones this command takes
    doc = tomllib.loads((COMPOSE.parent / "bucketer.toml").read_text())
    for key in KEYS:  # every value the file gives this command reaches it, unless the environment overrides it
        value = doc.get(key.section, {}).get(key.name)
        param = key.param_for(argv[0], set(with_file.params))
        if value is not None and param is not None and not (key.env and key.env in env):
            assert with_file.params[param] == value, (key.dotted, with_file.params[param], value)
    if "instance_id" in with_file.params:
        assert with_file.params["instance_id"] == env.get("BUCKETER_INSTANCE_ID"), with_file.params


def test_unknown_options_do_fail_the_parse() -> None:  # the check above can fail
    with pytest.raises(Exception, match="No such option: --schedule"):
        parse(["enrich", "--schedule"], {})


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (make setup)")
def test_docker_compose_renders_it() -> None:
    env = {**os.environ, **SECRETS}
    r = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    env.pop("BUCKETER_API_TOKEN")
    r = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "BUCKETER_API_TOKEN" in r.stderr  # no deployment without a token
