"""The Kafka connection built from a config file, the environment and flags (bucketer/options.py), on the real
console script against the real broker: file < env < flags, and the file alone is enough to route."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kafkatools import drain, unique

from bucketer.localkafka import free_port
from connectors.kafka import BrokerUnreachable, KafkaAuthenticationFailed, check_reachable, group_lag
from connectors.kafka_conn import KafkaConnection
from connectors.topics import TopicNames

BUCKETER = Path(sys.executable).with_name("bucketer")


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETER_")}
    return subprocess.run([str(BUCKETER), *args], capture_output=True, text=True, timeout=120, env=base | env)


def test_flag_beats_env_beats_file_for_the_bootstrap_servers(bootstrap: str, tmp_path: Path) -> None:
    file_addr, env_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"  # nothing listens on either
    config = tmp_path / "bucketer.toml"
    config.write_text(f'[kafka]\nbootstrap.servers = "{file_addr}"\nclient.id = "bucketer-test"\n')
    prefix = unique("kcfg") + "."
    load = ["loadgen", "--count", "30", "--topic-prefix", prefix, "--timeout", "3", "--quiet"]
    env = {"BUCKETER_KAFKA_CONFIG": str(config), "BUCKETER_BOOTSTRAP": env_addr}

    flagged = cli(*load, "--bootstrap", bootstrap, env=env)
    assert flagged.returncode == 0, flagged.stderr
    assert f"topic {prefix}activityRelations: " in flagged.stdout

    from_env = cli(*load, env=env)
    assert from_env.returncode == 1 and env_addr in from_env.stderr and file_addr not in from_env.stderr

    from_file = cli(*load, env={"BUCKETER_KAFKA_CONFIG": str(config)})
    assert from_file.returncode == 1 and file_addr in from_file.stderr


def test_route_and_dlq_list_take_their_connection_from_the_config_file_alone(bootstrap: str, tmp_path: Path) -> None:
    config = tmp_path / "bucketer.toml"
    # A whole bucketer config file: only its [kafka] table is read; an extra librdkafka key passes through.
    config.write_text(
        f'[router]\nbatch_size = 3\n\n[kafka]\n"bootstrap.servers" = "{bootstrap}"\nsocket.timeout.ms = 20000\n'
    )
    names = TopicNames(unique("kfile") + ".")
    env = {"BUCKETER_TOPIC_PREFIX": names.prefix}
    made = cli("loadgen", "--kafka-config", str(config), "--count", "40", "--quiet", env=env)
    assert made.returncode == 0, made.stderr
    routed = cli("route", "--kafka-config", str(config), "--buckets", "3", "--until-idle", "2", env=env)
    assert routed.returncode == 0, routed.stderr
    in_buckets = drain(bootstrap, names.buckets(3), idle=1.0)
    listed = cli("dlq", "list", "--json", env=env | {"BUCKETER_KAFKA_CONFIG": str(config)})
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["topic"] == names.dlq
    # The router read all of the source through the file's connection and committed it; its output is there.
    assert group_lag(KafkaConnection.plain(bootstrap), "bucketer-router", [names.source]).messages == 0
    assert len(in_buckets) > 0


def test_a_wrong_security_setting_is_named_in_one_line(bootstrap: str) -> None:
    """Against the plaintext listener: a TLS client names the failed handshake; a SASL client is refused as an
    authentication failure (the error class a wrong password gets), and no secret is in either message."""
    import certifi

    tls = KafkaConnection.from_settings(
        {"bootstrap.servers": bootstrap, "security.protocol": "SSL", "ssl.ca.location": certifi.where()}
    )
    with pytest.raises(BrokerUnreachable) as unreachable:
        check_reachable(tls, timeout=3.0)
    assert "SSL handshake failed" in str(unreachable.value) and "\n" not in str(unreachable.value)
    secret = "pw-never-in-a-message-7c1e"
    sasl = KafkaConnection.from_settings(
        {
            "bootstrap.servers": bootstrap,
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN",
            "sasl.username": "bucketer",
            "sasl.password": secret,
        }
    )
    with pytest.raises(KafkaAuthenticationFailed) as refused:
        check_reachable(sasl, timeout=3.0)
    assert str(refused.value).startswith(f"Kafka at {bootstrap} (SASL_PLAINTEXT) refused the credentials")
    assert secret not in str(refused.value) and "\n" not in str(refused.value)
    check_reachable(KafkaConnection.from_settings({"bootstrap.servers": bootstrap, "client.id": "ok"}), timeout=10.0)
