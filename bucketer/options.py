"""The options and helpers the ``bucketer`` commands share, each declared once.

Command modules import from here and register on bucketer/app.py's ``app``; nothing imports bucketer/cli.py.

The Kafka connection of a command comes from three layers, the later winning key by key:
1. the ``[kafka]`` table of ``--kafka-config PATH`` / ``BUCKETER_KAFKA_CONFIG`` (a TOML file: that table alone,
   or a whole bucketer config file, of which only ``[kafka]`` is read), librdkafka keys;
2. ``BUCKETER_KAFKA_<KEY>`` variables (the librdkafka key upper-cased, dots as underscores:
   ``BUCKETER_KAFKA_SASL_PASSWORD``), and ``BUCKETER_BOOTSTRAP`` for ``bootstrap.servers``;
3. flags: ``--bootstrap`` and ``--kafka-option KEY=VALUE`` (never a secret: a command line shows in ``ps``).
A bad setting is a one-line error naming the key, exit 2.
"""

from __future__ import annotations

import logging
import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # the warehouse and Kafka modules load only when a command needs them
    from connectors.kafka_conn import KafkaConnection
    from connectors.warehouse import EmbeddedWarehouse, ServerWarehouse


# --- helpers --------------------------------------------------------------------------------------------
def fail(reason: str, code: int = 1) -> typer.Exit:
    """Print a one-line reason on stderr and return the exit to raise."""
    typer.echo(f"bucketer: {reason}", err=True)
    return typer.Exit(code)


def open_configured_warehouse(data_dir: Path) -> EmbeddedWarehouse | ServerWarehouse:
    """The warehouse the environment asks for: a ClickHouse server URL, else embedded chdb in ``data_dir``."""
    from connectors.warehouse import open_warehouse

    return open_warehouse(data_dir, url=os.environ.get("BUCKETER_CLICKHOUSE_URL") or None)


def install_stop(stop: Callable[[], object]) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


# Fields a log call about one message passes as ``extra`` (``extra=message_fields(topic, partition, offset)``).
MESSAGE_FIELDS = ("topic", "partition", "offset")


def log_to_stderr(verbose: bool = False) -> None:
    """Log on stderr as ``--log-format`` / ``BUCKETER_LOG_FORMAT`` asks: text lines, or one JSON object a line
    (ts, level, logger, msg, and topic/partition/offset when the call names a message)."""
    from bucketer.config import log_format

    handler = logging.StreamHandler(sys.stderr)
    if log_format() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (ISO 8601, UTC), level, logger, msg; topic, partition and offset when the
    record has them (``extra``); exc when an exception is attached. Never more than one line."""

    def format(self, record: logging.LogRecord) -> str:
        import orjson

        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in MESSAGE_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


# --- the warehouse --------------------------------------------------------------------------------------
DEFAULT_DATA_DIR = Path(".bucketer")
DataDirOpt = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="BUCKETER_DATA_DIR",
        help="Embedded warehouse directory (ignored with BUCKETER_CLICKHOUSE_URL).",
    ),
]

# --- buckets --------------------------------------------------------------------------------------------
# Each bucket is a Kafka topic (at least one partition) and two warehouse tables, all created up front and all
# read by every loader: the bound keeps that within what one broker and one warehouse handle well
# (``route --buckets 1000000`` timed out creating topics).
MAX_BUCKETS = 1024
DEFAULT_BUCKETS = 10


def bucket_range_error(flag: str, value: int) -> typer.Exit:
    return fail(f"{flag} {value} is out of range (1-{MAX_BUCKETS}: each bucket is a Kafka topic and two tables)", 2)


def _check_buckets(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= MAX_BUCKETS:
        raise bucket_range_error("--buckets", value)
    return value


_BUCKETS_RANGE = f"1-{MAX_BUCKETS}, each bucket a topic on the broker and two tables"
# A command with a warehouse: N is the warehouse's (stream/schema.py ensure_schema); a different one is refused.
BucketsOpt = Annotated[
    int | None,
    typer.Option(
        "--buckets",
        "-n",
        envvar="BUCKETER_BUCKETS",
        callback=_check_buckets,
        show_default=False,
        help=f"Bucket count ({_BUCKETS_RANGE}); default: the warehouse's recorded count, 10 for a new warehouse. "
        "Only `bucketer rebucket` changes it.",
    ),
]
# A command without a warehouse (route, bucket-of, tinybird copy): it must be given the warehouse's N.
FixedBucketsOpt = Annotated[
    int,
    typer.Option(
        "--buckets",
        "-n",
        envvar="BUCKETER_BUCKETS",
        callback=_check_buckets,
        help=f"Bucket count ({_BUCKETS_RANGE}); must be the warehouse's (see `bucketer status`).",
    ),
]
# The Tinybird generator: N is the project's.
ProjectBucketsOpt = Annotated[
    int | None,
    typer.Option(
        "--buckets",
        "-n",
        envvar="BUCKETER_BUCKETS",
        min=1,
        help="N; default: the project's own N in --out, else 10. Another N than the project's needs --rebucket.",
    ),
]
# The Tinybird copy jobs: N is the Tinybird project's (as generated).
TinybirdBucketsOpt = Annotated[
    int, typer.Option("--buckets", "-n", envvar="BUCKETER_BUCKETS", min=1, help="The Tinybird project's N.")
]
# --partitions of route and run: per bucket topic, when they create the topics.
BucketPartitionsOpt = Annotated[
    int | None,
    typer.Option(
        "--partitions",
        envvar="BUCKETER_BUCKET_PARTITIONS",
        min=1,
        help="Partitions per bucket topic created here (default: ceil(30 / N), about 30 in all).",
    ),
]

# --- topics, groups, pacing -----------------------------------------------------------------------------
TopicPrefixOpt = Annotated[
    str,
    typer.Option("--topic-prefix", envvar="BUCKETER_TOPIC_PREFIX", help="Prefix of every topic name read or written."),
]
DEFAULT_ROUTER_GROUP = "bucketer-router"
DEFAULT_LOADER_GROUP = "bucketer-loader"
RouterGroupOpt = Annotated[
    str, typer.Option("--group", envvar="BUCKETER_ROUTER_GROUP", help="The routers' consumer group.")
]
LoaderGroupOpt = Annotated[
    str, typer.Option("--group", envvar="BUCKETER_LOADER_GROUP", help="The loaders' consumer group.")
]
# The same groups, named from a command that is neither (status reads the router's lag, rebucket the loader's).
OfRouterGroupOpt = Annotated[
    str, typer.Option("--router-group", envvar="BUCKETER_ROUTER_GROUP", help="The routers' consumer group.")
]
OfLoaderGroupOpt = Annotated[
    str, typer.Option("--loader-group", envvar="BUCKETER_LOADER_GROUP", help="The loaders' consumer group.")
]
UntilIdleOpt = Annotated[
    float | None,
    typer.Option("--until-idle", envvar="BUCKETER_UNTIL_IDLE", help="Exit 0 once S seconds pass without new input."),
]
AtLeastOnceOpt = Annotated[
    bool,
    typer.Option(
        "--at-least-once",
        envvar="BUCKETER_AT_LEAST_ONCE",
        help="Faster: idempotent producer, offsets committed after delivery; a crash may duplicate.",
    ),
]

# --- Kafka ----------------------------------------------------------------------------------------------
KAFKA_ENV_PREFIX = "BUCKETER_KAFKA_"
KAFKA_CONFIG_ENV = "BUCKETER_KAFKA_CONFIG"
BOOTSTRAP_ENV = "BUCKETER_BOOTSTRAP"
# No envvar= here: BUCKETER_BOOTSTRAP is read with the environment layer (kafka_settings), below the flag.
BootstrapOpt = Annotated[
    str | None,
    typer.Option(
        "--bootstrap",
        show_default=False,
        help=f"Kafka bootstrap servers, host:port[,...] (env {BOOTSTRAP_ENV}; else bootstrap.servers of "
        "--kafka-config).",
    ),
]
KafkaConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--kafka-config",
        envvar=KAFKA_CONFIG_ENV,
        show_default=False,
        help="TOML file whose \\[kafka] table holds librdkafka settings (security.protocol, sasl.*, ssl.*, ...); "
        "BUCKETER_KAFKA_<KEY> variables and flags override it.",
    ),
]
KafkaOptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--kafka-option",
        "-X",
        show_default=False,
        help="A librdkafka setting KEY=VALUE (repeatable); not for secrets: use the file or BUCKETER_KAFKA_<KEY>.",
    ),
]


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML's dotted keys (``sasl.username = ...`` unquoted) nest tables; librdkafka's keys are the dotted path."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def kafka_file_settings(path: Path) -> dict[str, Any]:
    """The ``[kafka]`` table of the TOML file at ``path``, flattened to librdkafka keys."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise fail(f"--kafka-config {path}: no such file", 2) from None
    except OSError as exc:
        raise fail(f"--kafka-config {path}: cannot read it ({exc.strerror})", 2) from None
    except tomllib.TOMLDecodeError as exc:
        raise fail(f"--kafka-config {path}: not valid TOML ({exc})", 2) from None
    table = doc.get("kafka")
    if not isinstance(table, dict):
        raise fail(f"--kafka-config {path}: no [kafka] table (it holds the librdkafka settings)", 2)
    return _flatten(table)


def kafka_env_settings(env: Mapping[str, str]) -> dict[str, str]:
    """``BUCKETER_KAFKA_<KEY>`` variables as librdkafka keys (empty ones are unset)."""
    out: dict[str, str] = {}
    for name, value in env.items():
        if name.startswith(KAFKA_ENV_PREFIX) and name != KAFKA_CONFIG_ENV and value != "":
            out[name[len(KAFKA_ENV_PREFIX) :].lower().replace("_", ".")] = value
    return out


def kafka_flag_settings(options: list[str] | None) -> dict[str, str]:
    from connectors.kafka_conn import is_secret_key

    out: dict[str, str] = {}
    for item in options or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise fail(f"--kafka-option {item.split('=')[0]!r}: expected KEY=VALUE", 2)
        if is_secret_key(key):
            var = KAFKA_ENV_PREFIX + key.upper().replace(".", "_")
            raise fail(f"--kafka-option {key}: a secret is never a flag (ps shows it); set {var} or the config file", 2)
        out[key] = value
    return out


def kafka_settings(
    bootstrap: str | None,
    kafka_config: Path | None,
    kafka_option: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The librdkafka settings of the three layers (file < env < flags), merged key by key."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = kafka_file_settings(kafka_config) if kafka_config is not None else {}
    env_layer: dict[str, Any] = kafka_env_settings(env)
    short = env.get(BOOTSTRAP_ENV) or None
    if short is not None:
        other = env_layer.get("bootstrap.servers")
        if other is not None and other != short and not bootstrap:  # the flag would settle it
            raise fail(
                f"{BOOTSTRAP_ENV} ({short}) and {KAFKA_ENV_PREFIX}BOOTSTRAP_SERVERS ({other}) disagree; set one", 2
            )
        env_layer["bootstrap.servers"] = short
    merged.update(env_layer)
    merged.update(kafka_flag_settings(kafka_option))
    if bootstrap:
        merged["bootstrap.servers"] = bootstrap
    return merged


def kafka_connection(
    bootstrap: str | None,
    kafka_config: Path | None,
    kafka_option: list[str] | None = None,
    *,
    required: bool = True,
) -> KafkaConnection | None:
    """The command's Kafka connection from its layers; ``None`` when not ``required`` and nothing names a
    broker (no bootstrap.servers anywhere and no --kafka-config). Bad settings: one line, exit 2."""
    from connectors.kafka_conn import KafkaConnection

    settings = kafka_settings(bootstrap, kafka_config, kafka_option)
    if not required and kafka_config is None and not settings.get("bootstrap.servers"):
        return None
    try:
        return KafkaConnection.from_settings(settings)
    except ValueError as exc:
        raise fail(str(exc), 2) from None


def require_kafka(
    bootstrap: str | None, kafka_config: Path | None, kafka_option: list[str] | None = None
) -> KafkaConnection:
    kafka = kafka_connection(bootstrap, kafka_config, kafka_option)
    assert kafka is not None  # required: never None
    return kafka


RefreshOpt = Annotated[
    str,
    typer.Option(
        "--refresh",
        envvar="BUCKETER_REFRESH",
        help="incremental: keep the cleaned buckets current at every flush, the schedule reconciles (default); "
        "hourly: the anchor's replace-only rebuilds on the schedule.",
    ),
]
OutageDeadlineOpt = Annotated[
    float,
    typer.Option(
        "--outage-deadline",
        envvar="BUCKETER_OUTAGE_DEADLINE",
        min=1,
        help="Seconds the loader rides out an unreachable broker before it exits non-zero.",
    ),
]
InstanceIdOpt = Annotated[
    str | None,
    typer.Option(
        "--instance-id",
        envvar=["BUCKETER_INSTANCE_ID", "BUCKETER_ROUTER_INSTANCE"],
        show_default=False,
        help="This worker's stable name in its consumer group (group.instance.id, the router's transactional.id): "
        "unique per replica, the same across its restarts. Default: host name + the lowest index free on this host.",
    ),
]
