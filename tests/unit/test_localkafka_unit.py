import base64
import json
import os
import string
import tomllib
from pathlib import Path

import pytest

from bucketer.localkafka import (
    BROKER_USER,
    SASL_SSL,
    LocalKafka,
    LocalKafkaError,
    Secrets,
    _java_argfile,
    client_config_toml,
    client_settings,
    new_cluster_id,
    server_properties,
)


def test_constructor_touches_nothing(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "never", port=1)
    assert not (tmp_path / "never").exists()
    st = broker.status()
    assert st.running is False and st.bootstrap == "127.0.0.1:1"


def test_stale_state_file_is_not_running(tmp_path: Path) -> None:
    (tmp_path / "broker.json").write_text('{"pid": 999999999, "port": 5, "controller_port": 6}')
    assert LocalKafka(tmp_path, port=5).status().running is False


# --- the generated broker properties and client config (sasl_ssl) -------------------------------------------


def props(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert key not in out, f"{key} twice"
            out[key] = value
    return out


SECRET = Secrets(password="p" * 48, broker_password="b" * 48, store_password="s" * 48)


def sasl_props(tmp_path: Path) -> dict[str, str]:
    return props(
        server_properties(
            port=9400,
            controller_port=9401,
            data=tmp_path / "data",
            security=SASL_SSL,
            tls=tmp_path / "tls",
            secret=SECRET,
        )
    )


def test_sasl_ssl_properties_client_listener_is_scram_over_tls_controller_stays_plaintext(tmp_path: Path) -> None:
    p = sasl_props(tmp_path)
    assert p["listeners"] == "SASL_SSL://127.0.0.1:9400,CONTROLLER://127.0.0.1:9401"
    assert p["advertised.listeners"] == "SASL_SSL://127.0.0.1:9400"
    assert p["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT"
    assert p["controller.listener.names"] == "CONTROLLER"
    assert p["controller.quorum.voters"] == "1@127.0.0.1:9401"
    assert p["inter.broker.listener.name"] == "SASL_SSL"
    assert p["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert p["sasl.mechanism.inter.broker.protocol"] == "SCRAM-SHA-512"
    assert p["listener.name.sasl_ssl.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    # No plaintext client listener anywhere.
    assert "PLAINTEXT://" not in p["listeners"] and "PLAINTEXT" not in p["advertised.listeners"]


def test_sasl_ssl_properties_jaas_and_keystore(tmp_path: Path) -> None:
    p = sasl_props(tmp_path)
    jaas = p["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"]
    assert jaas == (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{BROKER_USER}" password="{SECRET.broker_password}";'
    )
    store = str(tmp_path / "tls" / "broker.p12")
    for kind in ("keystore", "truststore"):
        assert p[f"listener.name.sasl_ssl.ssl.{kind}.type"] == "PKCS12"
        assert p[f"listener.name.sasl_ssl.ssl.{kind}.location"] == store
        assert p[f"listener.name.sasl_ssl.ssl.{kind}.password"] == SECRET.store_password
    assert p["listener.name.sasl_ssl.ssl.key.password"] == SECRET.store_password
    # The clients' password is not the broker's business: it lives in the SCRAM credentials, not here.
    assert SECRET.password not in "\n".join(f"{k}={v}" for k, v in p.items())
    # The rest of the single-node settings are those of the plaintext broker.
    plain = props(server_properties(port=9400, controller_port=9401, data=tmp_path / "data"))
    for key in ("log.dirs", "transaction.state.log.replication.factor", "auto.create.topics.enable", "node.id"):
        assert p[key] == plain[key]


def test_plaintext_properties_are_unchanged(tmp_path: Path) -> None:
    p = props(server_properties(port=9400, controller_port=9401, data=tmp_path / "data"))
    assert p["listeners"] == "PLAINTEXT://127.0.0.1:9400,CONTROLLER://127.0.0.1:9401"
    assert p["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert p["inter.broker.listener.name"] == "PLAINTEXT"
    assert not [k for k in p if "sasl" in k or "ssl" in k]


def test_sasl_ssl_properties_need_tls_and_secrets(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        server_properties(port=1, controller_port=2, data=tmp_path, security=SASL_SSL)
    with pytest.raises(LocalKafkaError, match="plaintext or sasl_ssl"):
        server_properties(port=1, controller_port=2, data=tmp_path, security="ssl")


def test_client_config_toml_is_one_kafka_table_of_dotted_keys(tmp_path: Path) -> None:
    settings = client_settings("127.0.0.1:9400", SECRET, tmp_path / "tls" / "ca.pem")
    parsed = tomllib.loads(client_config_toml(settings, tmp_path))
    assert list(parsed) == ["kafka"]
    assert parsed["kafka"] == {
        "bootstrap.servers": "127.0.0.1:9400",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "bucketer",
        "sasl.password": SECRET.password,
        "ssl.ca.location": str(tmp_path / "tls" / "ca.pem"),
    }


def test_client_config_toml_escapes_any_string(tmp_path: Path) -> None:
    odd = {'we"ird\\key': 'a "quoted" \\ back\nslash\ttab\x01 é ✓', "plain": ""}
    assert tomllib.loads(client_config_toml(odd, tmp_path / 'dir "x"\nnewline'))["kafka"] == odd


def test_secrets_are_random_hex_and_round_trip() -> None:
    a, b = Secrets.generate(), Secrets.generate()
    assert len({a.password, a.broker_password, a.store_password, b.password}) == 4
    for value in (a.password, a.broker_password, a.store_password):
        assert len(value) == 48 and set(value) <= set(string.hexdigits.lower())
    assert Secrets.from_json(a.to_json()) == a


def test_cluster_id_is_what_the_storage_tool_accepts() -> None:
    for _ in range(200):
        cid = new_cluster_id()
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_java_argfile_quotes_every_argument() -> None:
    text = _java_argfile(["-cp", "/a b/*", 'x"y', "c\\d"])
    assert text.splitlines() == ['"-cp"', '"/a b/*"', '"x\\"y"', '"c\\\\d"']


def test_a_directory_keeps_its_security(tmp_path: Path) -> None:
    """Checked before any port, java or file is touched."""
    sasl_dir = tmp_path / "sasl"
    sasl_dir.mkdir()
    (sasl_dir / "secrets.json").write_text(SECRET.to_json())
    with pytest.raises(LocalKafkaError, match="was set up with security sasl_ssl, not plaintext"):
        LocalKafka(sasl_dir, port=1, controller_port=2).start()
    plain_dir = tmp_path / "plain"
    (plain_dir / "data").mkdir(parents=True)
    (plain_dir / "data" / "meta.properties").write_text("node.id=1\n")
    with pytest.raises(LocalKafkaError, match="was set up with security plaintext, not sasl_ssl"):
        LocalKafka(plain_dir, port=1, controller_port=2, security=SASL_SSL).start()
    assert sorted(p.name for p in plain_dir.iterdir()) == ["data"]
    with pytest.raises(LocalKafkaError, match="not supported"):
        LocalKafka(tmp_path / "x", port=1, controller_port=2, security="SASL_PLAINTEXT").start()


def test_client_config_of_a_sasl_ssl_directory(tmp_path: Path) -> None:
    (tmp_path / "secrets.json").write_text(SECRET.to_json())
    broker = LocalKafka(tmp_path, port=9400, controller_port=9401, security=SASL_SSL)
    assert broker.client_config() == client_settings("127.0.0.1:9400", SECRET, tmp_path / "tls" / "ca.pem")
    assert LocalKafka(tmp_path / "p", port=9400).client_config() == {"bootstrap.servers": "127.0.0.1:9400"}


def test_a_live_pid_that_is_not_this_directorys_broker_is_not_running(tmp_path: Path) -> None:
    """A dead broker's pid taken by another process (here: this test) is never stopped as if it were ours."""
    (tmp_path / "broker.json").write_text(json.dumps({"pid": os.getpid(), "port": 5, "controller_port": 6}))
    broker = LocalKafka(tmp_path, port=5)
    assert broker.status().running is False
    assert broker.stop() is False
