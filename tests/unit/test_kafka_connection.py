"""KafkaConnection (connectors/kafka_conn.py) and the CLI layers that build it (bucketer/options.py): secrets never
print, bad settings are one-line errors naming the key, and file < env < flags."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import typer

from bucketer.options import kafka_settings
from connectors.kafka import BrokerUnreachable, admin, check_reachable, consumer_config, producer_config
from connectors.kafka_conn import KafkaConnection
from connectors.secret import Secret
from stream.router import RouterConfig

PASSWORD = "pw-9f3a77c1-never-print"
KEY_PASSWORD = "kp-51d0e2-never-print"
BUCKETER = Path(sys.executable).with_name("bucketer")


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    """A real PEM CA bundle (librdkafka loads it when a client is created)."""
    import certifi

    path = tmp_path / "ca.pem"
    path.write_bytes(Path(certifi.where()).read_bytes())
    return path


def secured(ca: Path, **more: object) -> KafkaConnection:
    return KafkaConnection.from_settings(
        {
            "bootstrap.servers": "127.0.0.1:1",
            "security.protocol": "sasl_ssl",
            "sasl.mechanism": "scram-sha-512",
            "sasl.username": "bucketer",
            "sasl.password": PASSWORD,
            "ssl.ca.location": str(ca),
            "ssl.key.password": KEY_PASSWORD,
            "socket.timeout.ms": 5000,
            **more,
        }
    )


def test_client_config_is_the_librdkafka_dict_with_secrets_revealed(ca: Path) -> None:
    conn = secured(ca)
    assert conn.client_config() == {
        "bootstrap.servers": "127.0.0.1:1",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "bucketer",
        "sasl.password": PASSWORD,
        "ssl.ca.location": str(ca),
        "ssl.key.password": KEY_PASSWORD,
        "socket.timeout.ms": 5000,
    }
    assert isinstance(conn.sasl_password, Secret) and conn.sasl_password.reveal() == PASSWORD
    assert dict(conn.extra)["ssl.key.password"] == Secret(KEY_PASSWORD)
    assert KafkaConnection.plain("h:1").client_config() == {
        "bootstrap.servers": "h:1",
        "security.protocol": "PLAINTEXT",
    }


def test_secrets_never_print_in_repr_str_logs_or_configs_that_hold_the_connection(
    ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conn = secured(ca)
    config = RouterConfig(kafka=conn, buckets=3)
    shown = [repr(conn), str(conn), f"{conn}", f"{conn!r}", repr(config), str(conn.settings()), repr(conn.extra)]
    with caplog.at_level(logging.INFO):
        logging.getLogger("bucketer.test").info("connection %s %r config %r", conn, conn, config)
    shown.append(caplog.text)
    for text in shown:
        assert PASSWORD not in text and KEY_PASSWORD not in text, text
    assert "Secret('***')" in repr(conn) and str(conn) == "127.0.0.1:1 (SASL_SSL)"
    assert str(KafkaConnection.plain("127.0.0.1:9092")) == "127.0.0.1:9092"  # error messages read as before
    assert conn.redact(f"x {PASSWORD} y {KEY_PASSWORD}") == "x *** y ***"


def test_an_unreachable_secured_broker_is_a_one_line_error_without_the_password(ca: Path) -> None:
    conn = secured(ca)
    with pytest.raises(BrokerUnreachable) as raised:
        check_reachable(conn, timeout=1.0)
    text = str(raised.value)
    assert text.startswith("cannot reach Kafka at 127.0.0.1:1 (SASL_SSL) within 1s") and "\n" not in text
    assert PASSWORD not in text and PASSWORD not in repr(raised.value)


def test_validation_errors_name_the_key_and_not_the_secret(ca: Path) -> None:
    with pytest.raises(ValueError) as raised:
        secured(ca, **{"sasl.mechanism": "SCRAM-SHA-1"})
    assert "sasl.mechanism" in str(raised.value) and PASSWORD not in str(raised.value)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({}, "bootstrap.servers"),
        ({"bootstrap.servers": "  "}, "bootstrap.servers"),
        ({"security.protocol": "TLS"}, "security.protocol"),
        ({"security.protocol": "SASL_SSL", "ssl.ca.location": "probe"}, "sasl.mechanism"),
        ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "CRAM"}, "sasl.mechanism"),
        ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.password": "x"}, "sasl.username"),
        (
            {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "u"},
            "sasl.password",
        ),
        ({"sasl.username": "u"}, "sasl.username"),  # SASL settings on a PLAINTEXT connection: a forgotten protocol
        (
            {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "GSSAPI", "ssl.ca.location": "probe"},
            "ssl.ca.location",
        ),
        ({"security.protocol": "SSL", "ssl.ca.location": "/nonexistent/ca.pem"}, "ssl.ca.location"),
        ({"security.protocol": "SSL", "ssl.certificate.location": "/nonexistent/c.pem"}, "ssl.certificate.location"),
        ({"group.id": "mine"}, "group.id"),
        ({"transactional.id": "mine"}, "transactional.id"),
        ({"Socket.Timeout": "1"}, "Socket.Timeout"),
        ({"socket.timeout.ms": [1, 2]}, "socket.timeout.ms"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_settings_are_a_one_line_error_naming_the_key(settings: dict[str, object], key: str) -> None:
    base: dict[str, object] = {} if settings == {} else {"bootstrap.servers": "h:1"}
    with pytest.raises(ValueError) as raised:
        KafkaConnection.from_settings(base | settings)
    message = str(raised.value)
    assert key in message and "\n" not in message, message


def test_good_settings_pass(ca: Path) -> None:
    assert (
        KafkaConnection.from_settings({"bootstrap.servers": "h:1", "security.protocol": "ssl"}).security_protocol
        == "SSL"
    )
    probe = {"bootstrap.servers": "h:1", "security.protocol": "SSL", "ssl.ca.location": "probe"}
    assert KafkaConnection.from_settings(probe).ssl_ca_location == "probe"
    oauth = {"bootstrap.servers": "h:1", "security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"}
    assert KafkaConnection.from_settings(oauth).sasl_username is None  # no user name for OAUTHBEARER
    assert replace(secured(ca)) == secured(ca)  # frozen, comparable: a config holding it stays comparable


def test_a_secret_given_as_a_plain_string_is_refused_by_the_constructor() -> None:
    with pytest.raises(ValueError, match="sasl.password must be a Secret"):
        KafkaConnection("h:1", "SASL_SSL", "PLAIN", "u", PASSWORD)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ssl.key.password must be a Secret"):
        KafkaConnection("h:1", "SSL", extra=(("ssl.key.password", PASSWORD),))


def test_client_configs_layer_defaults_then_connection_then_the_call(ca: Path) -> None:
    conn = secured(ca, **{"fetch.wait.max.ms": 7, "linger.ms": 3})
    c = consumer_config(conn, "g", **{"fetch.wait.max.ms": 9})
    assert (c["sasl.password"], c["ssl.ca.location"], c["group.id"]) == (PASSWORD, str(ca), "g")
    assert c["fetch.wait.max.ms"] == 9 and c["isolation.level"] == "read_committed"
    p = producer_config(conn, "tx")
    assert (p["linger.ms"], p["transactional.id"], p["security.protocol"]) == (3, "tx", "SASL_SSL")
    admin(conn)  # librdkafka accepts every key the connection holds (an unknown key would raise here)


def test_toml_dotted_keys_and_a_whole_config_file(tmp_path: Path) -> None:
    path = tmp_path / "bucketer.toml"
    path.write_text(
        '[warehouse]\ndata_dir = "x"\n\n[kafka]\nbootstrap.servers = "f:1"\n"security.protocol" = "SASL_SSL"\n'
        'sasl.mechanism = "PLAIN"\nsasl.username = "u"\nsasl.password = "p"\nsocket.timeout.ms = 1000\n\n'
        "[router]\nbatch_size = 5\n"
    )
    got = kafka_settings(None, path, None, env={})
    assert got == {
        "bootstrap.servers": "f:1",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "u",
        "sasl.password": "p",
        "socket.timeout.ms": 1000,
    }


def test_layers_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text('[kafka]\n"bootstrap.servers" = "file:1"\n"client.id" = "file"\n"socket.timeout.ms" = "1"\n')
    env = {"BUCKETER_KAFKA_CLIENT_ID": "env", "BUCKETER_KAFKA_SOCKET_TIMEOUT_MS": "2", "BUCKETER_KAFKA_CONFIG": "x"}
    assert kafka_settings(None, path, None, env=env) == {
        "bootstrap.servers": "file:1",
        "client.id": "env",
        "socket.timeout.ms": "2",
    }
    got = kafka_settings("flag:1", path, ["client.id=flag"], env=env | {"BUCKETER_BOOTSTRAP": "env:1"})
    assert got == {"bootstrap.servers": "flag:1", "client.id": "flag", "socket.timeout.ms": "2"}
    assert kafka_settings(None, path, None, env={"BUCKETER_BOOTSTRAP": "env:1"})["bootstrap.servers"] == "env:1"
    both = {"BUCKETER_BOOTSTRAP": "a:1", "BUCKETER_KAFKA_BOOTSTRAP_SERVERS": "b:1"}
    with pytest.raises(typer.Exit):  # two variables for one key that disagree: which one was meant?
        kafka_settings(None, None, None, env=both)
    assert kafka_settings("flag:1", None, None, env=both)["bootstrap.servers"] == "flag:1"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETER_")}
    return subprocess.run([str(BUCKETER), *args], capture_output=True, text=True, timeout=60, env=base | (env or {}))


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("bucketer: "), proc.stderr
    return lines[0]


def test_cli_precedence_of_a_key_file_then_env_then_flag(tmp_path: Path) -> None:
    """The console script with a config file: security.protocol from each layer in turn; the invalid value
    the error names is the layer that won (no broker needed: validation runs before any connection)."""
    path = tmp_path / "bucketer.toml"
    path.write_text(
        f'[kafka]\nbootstrap.servers = "127.0.0.1:1"\nsecurity.protocol = "from-file"\nsasl.password = "{PASSWORD}"\n'
    )
    env = {"BUCKETER_KAFKA_CONFIG": str(path)}
    assert "'from-file'" in one_line(cli("load", env=env))
    env["BUCKETER_KAFKA_SECURITY_PROTOCOL"] = "from-env"
    assert "'from-env'" in one_line(cli("load", env=env))
    flagged = cli("load", "-X", "security.protocol=from-flag", env=env)
    reason = one_line(flagged)
    assert "'from-flag'" in reason and "security.protocol" in reason
    assert PASSWORD not in flagged.stderr + flagged.stdout


@pytest.mark.parametrize(
    ("args", "toml", "says"),
    [
        (["route"], None, "bootstrap.servers is missing"),
        (["route", "--kafka-config", "/nonexistent/k.toml"], None, "no such file"),
        (["dlq", "list", "--kafka-config", "{path}"], "[other]\na = 1\n", "no [kafka] table"),
        (["load", "--kafka-config", "{path}"], "[kafka\n", "not valid TOML"),
        (["run", "--kafka-config", "{path}"], '[kafka]\n"security.protocol" = "SASL_SSL"\n', "bootstrap.servers"),
        (["bootstrap", "--bootstrap", "h:1", "-X", "ssl.key.password=oops"], None, "never a flag"),
        (["loadgen", "--count", "1", "--bootstrap", "h:1", "-X", "nokey"], None, "KEY=VALUE"),
        (["status", "--kafka-config", "{path}"], '[kafka]\n"group.id" = "g"\nbootstrap.servers = "h:1"\n', "group.id"),
        (["rebucket", "--to", "3", "--bootstrap", "h:1", "-X", "security.protocol=x"], None, "security.protocol"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_cli_kafka_errors_are_one_line_exit_2(args: list[str], toml: str | None, says: str, tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    if toml is not None:
        path.write_text(toml)
    data = tmp_path / "wh"
    reason = one_line(cli(*[a.replace("{path}", str(path)) for a in args], env={"BUCKETER_DATA_DIR": str(data)}))
    assert says in reason, reason
    assert not data.exists()  # refused before anything was opened


def test_redaction_masks_a_secret_but_leaves_a_very_short_one_alone() -> None:
    assert Secret(PASSWORD).redact(f"auth with {PASSWORD} failed") == "auth with *** failed"
    # Masking every "p" would garble the text and, by where the *** fall, tell the value.
    assert Secret("p").redact("sasl_plaintext://h:1/bootstrap") == "sasl_plaintext://h:1/bootstrap"
    assert Secret("").redact("text") == "text" and not Secret("")
