"""One config file for every worker command: TOML, then ``BUCKETER_*`` variables, then flags (flags win).

``--config PATH`` (on every command, or before the command: ``bucketer --config PATH route``) or
``BUCKETER_CONFIG``. Sections (``SECTIONS``): ``[kafka]`` holds librdkafka keys, passed through as given (read by
bucketer/options.py's Kafka layers, exactly as ``--kafka-config`` reads the same table); the others hold the keys
of ``KEYS`` below. Each key lands on the command's own option through click's ``default_map`` (the layer below
the option's environment variable and its flag: so file < env < flag comes from click itself); a few settings
that have no option and are read from the environment (the ClickHouse URL and cluster, the API and Tinybird
tokens) are put in the environment when it does not already hold them.

Validated when the command starts: an unknown section or key, or a value of the wrong type, is one line
naming the key (``config bucketer.toml: [router] batch_size: expected an integer, not "ten"``), exit 2.

``bucketer config show [--config PATH] [--json] [COMMAND ARGS...]``: the effective settings, each with its
source (file, env, flag, default), secrets shown as ``***`` (a password inside a URL too). With a COMMAND, its
arguments are parsed exactly as that command parses them (nothing runs), so flags show as ``flag``.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

CONFIG_ENV = "BUCKETER_CONFIG"
LOG_FORMAT_ENV = "BUCKETER_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
SECTIONS = ("kafka", "warehouse", "router", "loader", "enrichment", "http")
_META_PATH = "bucketer.config.path"
_META_FILE = "bucketer.config.file"
_META_LOG = "bucketer.log_format"
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", Path: "a path"}


@dataclass(frozen=True, eq=False)  # hashed by identity: each key is one object of KEYS
class Key:
    """A config key ``[section] name``: its TOML type, the command options it sets (command path -> parameter
    name; ``*``: any command with a parameter of that name), or the environment variable it fills."""

    section: str
    name: str
    type: type
    params: Mapping[str, str] = field(default_factory=dict)
    env: str | None = None  # the variable: of the options (for config show) or, with env_only, the one filled
    env_only: bool = False  # no option: the product reads ``env``; the file fills it when unset
    secret: str | None = None  # "value": never shown; "url": the password inside a URL is never shown
    help: str = ""

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    def param_for(self, command: str, names: set[str]) -> str | None:
        """The parameter of ``command`` (its path, e.g. "dlq list") this key sets, if the command has it."""
        name = self.params.get(command) or self.params.get("*")
        return name if name is not None and name in names else None


def _k(section: str, name: str, type_: type, params: Mapping[str, str] | None = None, **kw: Any) -> Key:
    return Key(section, name, type_, dict(params or {}), **kw)


def _same(param: str, *commands: str) -> dict[str, str]:
    return {c: param for c in commands}


KEYS: tuple[Key, ...] = (
    # [warehouse]
    _k("warehouse", "data_dir", Path, {"*": "data_dir"}, env="BUCKETER_DATA_DIR", help="embedded warehouse dir"),
    _k("warehouse", "buckets", int, {"*": "buckets"}, env="BUCKETER_BUCKETS", help="bucket count N"),
    # The ClickHouse server (http[s]://user:password@host:port/database; unset: embedded chdb) and its cluster.
    _k("warehouse", "url", str, env="BUCKETER_CLICKHOUSE_URL", env_only=True, secret="url"),
    _k("warehouse", "cluster", str, env="BUCKETER_CLICKHOUSE_CLUSTER", env_only=True),
    # [router]
    _k(
        "router",
        "group",
        str,
        {"route": "group", "status": "router_group", "serve": "router_group"},
        env="BUCKETER_ROUTER_GROUP",
    ),
    _k("router", "topic_prefix", str, {"*": "topic_prefix"}, env="BUCKETER_TOPIC_PREFIX", help="every topic"),
    _k("router", "sink", str, _same("sink", "route"), env="BUCKETER_SINK"),
    _k("router", "batch_size", int, _same("batch_size", "route"), env="BUCKETER_BATCH_SIZE"),
    _k("router", "batch_time", float, _same("batch_time", "route"), env="BUCKETER_BATCH_TIME"),
    # A worker's static member name (--instance-id); one variable for every worker, as the option reads it.
    _k("router", "instance_id", str, _same("instance_id", "route", "run"), env="BUCKETER_INSTANCE_ID"),
    _k("router", "dynamic_membership", bool, _same("dynamic_membership", "route"), env="BUCKETER_DYNAMIC_MEMBERSHIP"),
    _k("router", "partitions", int, _same("partitions", "route", "run"), env="BUCKETER_BUCKET_PARTITIONS"),
    _k("router", "replication", int, _same("replication", "route"), env="BUCKETER_BUCKET_REPLICATION"),
    _k("router", "at_least_once", bool, _same("at_least_once", "route", "run"), env="BUCKETER_AT_LEAST_ONCE"),
    _k("router", "until_idle", float, _same("until_idle", "route", "run"), env="BUCKETER_UNTIL_IDLE"),
    _k("router", "progress", float, _same("progress", "route"), env="BUCKETER_PROGRESS"),
    _k(
        "router",
        "tinybird_url",
        str,
        {"route": "tinybird_url", "tinybird copy": "url", "tinybird countries": "url"},
        env="BUCKETER_TINYBIRD_URL",
    ),
    _k(
        "router",
        "tinybird_unreachable_deadline",
        float,
        _same("tinybird_deadline", "route"),
        env="BUCKETER_TINYBIRD_UNREACHABLE_DEADLINE",
    ),
    _k("router", "tinybird_token", str, env="BUCKETER_TINYBIRD_TOKEN", env_only=True, secret="value"),
    # [loader]
    _k("loader", "group", str, {"load": "group", "rebucket": "loader_group"}, env="BUCKETER_LOADER_GROUP"),
    _k("loader", "instance_id", str, _same("instance_id", "load"), env="BUCKETER_INSTANCE_ID"),
    _k("loader", "until_idle", float, _same("until_idle", "load"), env="BUCKETER_UNTIL_IDLE"),
    _k("loader", "outage_deadline", float, _same("outage_deadline", "load", "run"), env="BUCKETER_OUTAGE_DEADLINE"),
    _k("loader", "refresh", str, _same("refresh", "load", "run"), env="BUCKETER_REFRESH"),
    # [enrichment]
    _k("enrichment", "schedule", str, _same("schedule", "run"), env="BUCKETER_SCHEDULE"),
    _k("enrichment", "parallel", int, _same("parallel", "run", "enrich", "rebucket"), env="BUCKETER_PARALLEL"),
    _k("enrichment", "enrich_on_exit", bool, _same("enrich_on_exit", "run")),
    # [http]
    _k("http", "port", int, {"serve": "port", "run": "http_port"}, env="BUCKETER_HTTP_PORT"),
    _k("http", "host", str, _same("http_host", "serve", "run"), env="BUCKETER_HTTP_HOST"),
    _k("http", "metrics_port", int, _same("metrics_port", "run"), env="BUCKETER_METRICS_PORT"),
    _k("http", "api_token", str, env="BUCKETER_API_TOKEN", env_only=True, secret="value", help="comma-separated"),
    _k("http", "query_timeout", float, _same("query_timeout", "serve"), env="BUCKETER_QUERY_TIMEOUT"),
    _k("http", "max_result_rows", int, _same("max_result_rows", "serve"), env="BUCKETER_QUERY_MAX_ROWS"),
    _k("http", "max_memory", int, _same("max_memory", "serve"), env="BUCKETER_QUERY_MAX_MEMORY"),
    _k("http", "pipes_dir", Path, _same("pipes", "serve"), env="BUCKETER_PIPES_DIR"),
)
_BY_SECTION: dict[str, dict[str, Key]] = {}
for _key in KEYS:
    _BY_SECTION.setdefault(_key.section, {})[_key.name] = _key


class ConfigError(ValueError):
    """A config file that cannot be used: one line naming the file and the key."""


@dataclass(frozen=True)
class ConfigFile:
    """A validated config file: its path, its keys' values, and its ``[kafka]`` table (librdkafka keys)."""

    path: Path
    values: dict[Key, Any]
    kafka: dict[str, Any]

    def value(self, dotted: str) -> Any:
        for key, value in self.values.items():
            if key.dotted == dotted:
                return value
        return None


def _type_ok(key: Key, value: object) -> bool:
    if key.type is bool:
        return isinstance(value, bool)
    if key.type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if key.type is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)  # str and Path


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return json.dumps(value, default=str) if not isinstance(value, str) else json.dumps(value)


def parse(path: Path, doc: Mapping[str, Any]) -> ConfigFile:
    """Validate a parsed TOML document: every section and key known, every value of its key's type."""
    from bucketer.options import _flatten
    from connectors.kafka_conn import RESERVED_KEYS, _check_value

    where = f"config {path}"
    values: dict[Key, Any] = {}
    kafka: dict[str, Any] = {}
    for section, table in doc.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{section}] (expected one of {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {section} must be a table ([{section}]), not {_describe(table)}")
        if section == "kafka":
            kafka = _flatten(table)
            for name, value in kafka.items():
                if name in RESERVED_KEYS:
                    raise ConfigError(f"{where}: [kafka] {name} is set by bucketer itself; remove it")
                try:
                    _check_value(name, value)
                except ValueError:
                    raise ConfigError(
                        f"{where}: [kafka] {name}: expected a string, number or boolean, not {_describe(value)}"
                    ) from None
            continue
        known = _BY_SECTION.get(section, {})
        for name, value in table.items():
            key = known.get(name)
            if key is None:
                raise ConfigError(
                    f"{where}: unknown key [{section}] {name} (known: {', '.join(sorted(known)) or 'none'})"
                )
            if not _type_ok(key, value):
                shown = "***" if key.secret and isinstance(value, str) else _describe(value)
                raise ConfigError(f"{where}: [{section}] {name}: expected {_TYPE_NAMES[key.type]}, not {shown}")
            values[key] = Path(value).expanduser() if key.type is Path else value
    return ConfigFile(path, values, kafka)


def load(path: Path) -> ConfigFile:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"config {path}: is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML ({exc})") from None
    return parse(path, doc)


# --- wiring into the commands -------------------------------------------------------------------------------
# Variables the file filled (env_only keys), so that `config show` still calls them "file".
_FILLED_ENV: set[str] = set()


def command_path(ctx: Any) -> str:
    """ "route", "dlq list": the command's path below ``bucketer``."""
    parts = []
    while ctx is not None and ctx.parent is not None:
        parts.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed(parts))


def default_map(config: ConfigFile, command: str, names: set[str]) -> dict[str, Any]:
    """The ``default_map`` of ``command`` (whose parameters are ``names``) from the file: the file's layer."""
    out: dict[str, Any] = {}
    for key, value in config.values.items():
        param = key.param_for(command, names)
        if param is not None:
            out[param] = value
    if config.kafka and "kafka_config" in names:
        out["kafka_config"] = config.path  # options.kafka_file_settings reads its [kafka] table
    return out


def apply(ctx: Any, config: ConfigFile) -> None:
    """Put the file's layer under ``ctx``'s options, and fill the environment-only settings."""
    names = {p.name for p in ctx.command.params if p.name}
    ctx.default_map = {**(ctx.default_map or {}), **default_map(config, command_path(ctx), names)}
    for key, value in config.values.items():
        if key.env_only and key.env and not os.environ.get(key.env):
            os.environ[key.env] = str(value)
            _FILLED_ENV.add(key.env)
    ctx.meta[_META_FILE] = config


def _fail(reason: str) -> typer.Exit:
    typer.echo(f"bucketer: {reason}", err=True)
    return typer.Exit(2)


def _config_callback(ctx: typer.Context, value: Path | None) -> Path | None:
    if ctx.resilient_parsing:
        return value
    path = value if value is not None else ctx.meta.get(_META_PATH)
    if path is None:
        return None
    try:
        config = load(Path(path))
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    ctx.meta[_META_PATH] = Path(path)
    if isinstance(ctx.command, typer.core.TyperGroup):  # bucketer --config PATH COMMAND: for the command
        ctx.meta[_META_FILE] = config
    else:
        apply(ctx, config)
    return value


def _log_format_callback(ctx: typer.Context, value: str | None) -> str | None:
    if value is None or ctx.resilient_parsing:
        return value
    value = value.lower()
    if value not in LOG_FORMATS:
        raise _fail(f"--log-format {value!r}: expected {' or '.join(LOG_FORMATS)}")
    ctx.meta[_META_LOG] = value
    return value


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar=CONFIG_ENV,
        is_eager=True,
        expose_value=False,
        callback=_config_callback,
        show_default=False,
        help="TOML config file (sections kafka, warehouse, router, loader, enrichment, http); "
        "BUCKETER_* variables and flags override it. See `bucketer config show`.",
    ),
]
LogFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        envvar=LOG_FORMAT_ENV,
        expose_value=False,
        callback=_log_format_callback,
        show_default=False,
        help="Log lines on stderr: text (default) or json (one object a line).",
    ),
]


def _common_params() -> list[Any]:
    probe = typer.Typer(add_completion=False)

    @probe.command()
    def _probe(config: ConfigOpt = None, log_format: LogFormatOpt = None) -> None: ...

    return list(typer.main.get_command(probe).params)


COMMON_PARAMS = _common_params()


def add_common_params(cmd: Any) -> None:
    """Give ``cmd`` (and, for a group, every command below it) ``--config`` and ``--log-format`` (idempotent)."""
    if isinstance(cmd, typer.core.TyperGroup):
        for sub in cmd.commands.values():
            add_common_params(sub)
        return
    have = {p.name for p in cmd.params}
    cmd.params.extend(p for p in COMMON_PARAMS if p.name not in have)


def log_format() -> str:
    """The log format the command line or the environment asked for (text when none)."""
    from typer._click.globals import get_current_context  # typer vendors click: its context, not click's

    ctx = get_current_context(silent=True)
    chosen = ctx.meta.get(_META_LOG) if ctx is not None else None
    env = os.environ.get(LOG_FORMAT_ENV, "").lower()
    return chosen or (env if env in LOG_FORMATS else "text")


# --- config show ---------------------------------------------------------------------------------------------
_SOURCES = {"COMMANDLINE": "flag", "ENVIRONMENT": "env", "DEFAULT_MAP": "file", "DEFAULT": "default"}


def redacted(key: Key | None, value: Any, kafka_key: str | None = None) -> Any:
    from connectors.kafka_conn import is_secret_key
    from connectors.secret import Secret

    if value is None:
        return None
    if isinstance(value, Secret) or (key is not None and key.secret == "value"):
        return "***"
    if kafka_key is not None and is_secret_key(kafka_key):
        return "***"
    if key is not None and key.secret == "url":
        from connectors.warehouse import redact

        return redact(str(value))
    if isinstance(value, Path):
        return str(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _env_source(var: str | None) -> bool:
    return bool(var) and bool(os.environ.get(var or "")) and var not in _FILLED_ENV


def effective(ctx: Any, config: ConfigFile | None) -> Iterator[tuple[str, Any, str]]:
    """(name, shown value, source) of every setting, for the command of ``ctx`` when it is one (its
    parameters' sources as click resolved them), else for no command (file, env, default)."""
    command = command_path(ctx) if ctx is not None else ""
    names = {p.name for p in ctx.command.params if p.name} if ctx is not None else set()
    for key in KEYS:
        param = key.param_for(command, names) if ctx is not None else None
        if param is not None:
            source = ctx.get_parameter_source(param)
            yield key.dotted, redacted(key, _jsonable(ctx.params.get(param))), _SOURCES.get(source.name, "default")
            continue
        if ctx is not None and not key.env_only:
            continue  # not a setting of this command
        if key.env and _env_source(key.env):
            yield key.dotted, redacted(key, os.environ[key.env]), "env"
        elif config is not None and key in config.values:
            yield key.dotted, redacted(key, _jsonable(config.values[key])), "file"
        elif key.env_only and key.env and os.environ.get(key.env):  # filled from a file
            yield key.dotted, redacted(key, os.environ[key.env]), "file"
        else:
            yield key.dotted, None, "default"  # the default of the command that uses it
    yield from _kafka_effective(ctx, config)


def _kafka_effective(ctx: Any, config: ConfigFile | None) -> Iterator[tuple[str, Any, str]]:
    from bucketer.options import (
        BOOTSTRAP_ENV,
        kafka_env_settings,
        kafka_file_settings,
        kafka_flag_settings,
    )

    params = ctx.params if ctx is not None else {}
    if ctx is not None and "kafka_config" not in params:
        return  # a command without Kafka
    path = params.get("kafka_config") or (config.path if config is not None and config.kafka else None)
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path is not None:
        layers.append(("file", kafka_file_settings(Path(path))))
    env = kafka_env_settings(os.environ)
    if os.environ.get(BOOTSTRAP_ENV):
        env["bootstrap.servers"] = os.environ[BOOTSTRAP_ENV]
    layers.append(("env", env))
    flags = kafka_flag_settings(params.get("kafka_option"))
    if params.get("bootstrap"):
        flags["bootstrap.servers"] = params["bootstrap"]
    layers.append(("flag", flags))
    merged: dict[str, tuple[Any, str]] = {}
    for source, layer in layers:
        for name, value in layer.items():
            merged[name] = (value, source)
    for name in sorted(merged):
        value, source = merged[name]
        yield f"kafka.{name}", redacted(None, value, kafka_key=name), source


def show(ctx: Any, config: ConfigFile | None, as_json: bool, command: str) -> None:
    rows = list(effective(ctx, config))
    if as_json:
        doc = {
            "config": str(config.path) if config is not None else None,
            "command": command or None,
            "settings": {name: {"value": value, "source": source} for name, value, source in rows},
        }
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        return
    typer.echo(
        f"# config: {config.path if config is not None else '(none)'}" + (f"; command: {command}" if command else "")
    )
    width = max(len(name) for name, _, _ in rows)
    for name, value, source in rows:
        shown = "(unset)" if value is None else value if isinstance(value, str) and value else json.dumps(value)
        typer.echo(f"{name:<{width}} = {shown}  [{source}]")


def current_file(ctx: Any) -> ConfigFile | None:
    return ctx.meta.get(_META_FILE)
