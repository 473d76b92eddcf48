"""`bucketer local start --security sasl_ssl` for real: a broker whose client listener is SASL_SSL (SCRAM-SHA-512),
reached by confluent_kafka clients configured from nothing but the printed config file's [kafka] table."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from kafkatools import unique

BUCKETER = [sys.executable, "-m", "bucketer.cli"]
KAFKA_KEYS = [
    "bootstrap.servers",
    "security.protocol",
    "sasl.mechanism",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
]


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BUCKETER, *args], capture_output=True, text=True, timeout=timeout)


def free_port_pair() -> int:
    """A port P with P and P + 1 free (the CLI puts the controller on P + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise AssertionError("no two adjacent free ports")


@dataclass
class SecureBroker:
    directory: Path
    port: int
    start_output: list[str]
    start_seconds: float

    @property
    def common(self) -> list[str]:
        return ["--port", str(self.port), "--dir", str(self.directory)]

    @property
    def config_path(self) -> Path:
        line = self.start_output[-2]
        assert line.startswith("config="), self.start_output
        return Path(line.removeprefix("config="))

    def kafka(self) -> dict[str, str]:
        with open(self.config_path, "rb") as f:
            return dict(tomllib.load(f)["kafka"])

    def secrets(self) -> dict[str, str]:
        return dict(json.loads((self.directory / "secrets.json").read_text()))

    def pid(self) -> int:
        return int(json.loads((self.directory / "broker.json").read_text())["pid"])


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    directory = tmp_path_factory.mktemp("secure") / "kafka"
    port = free_port_pair()
    began = time.monotonic()
    proc = run("local", "start", "--security", "sasl_ssl", "--port", str(port), "--dir", str(directory))
    took = time.monotonic() - began
    broker = SecureBroker(directory, port, proc.stdout.strip().splitlines(), took)
    try:
        assert proc.returncode == 0, proc.stderr
        print(f"first sasl_ssl start (certificates, users, broker up): {took:.1f}s")
        yield broker
    finally:
        run("local", "stop", *broker.common)


def quiet(conf: dict[str, Any]) -> dict[str, Any]:
    return {**conf, "log_level": 0, "logger": _Silent()}


class _Silent:
    def log(self, *args: object, **kwargs: object) -> None:
        return None


def create_topic(kafka: dict[str, str], name: str, partitions: int = 1) -> None:
    admin = AdminClient(quiet(kafka))
    for fut in admin.create_topics([NewTopic(name, partitions, 1)], operation_timeout=30).values():
        fut.result(timeout=60)


def consume_all(kafka: dict[str, str], topic: str, expect: int, **extra: Any) -> list[bytes]:
    consumer = Consumer(
        quiet({**kafka, "group.id": unique("g"), "auto.offset.reset": "earliest", "enable.auto.commit": False, **extra})
    )
    got: list[bytes] = []
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 60
        while len(got) < expect and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append(msg.value() or b"")
        # Nothing beyond what was expected arrives either.
        end = time.monotonic() + 2
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append(msg.value() or b"")
    finally:
        consumer.close()
    return got


def first_error(conf: dict[str, Any], within: float = 30) -> tuple[KafkaError | None, float]:
    """The first error a producer with ``conf`` reports, and how long it took."""
    errors: list[KafkaError] = []
    producer = Producer(quiet({**conf, "error_cb": errors.append}))
    began = time.monotonic()
    while not errors and time.monotonic() - began < within:
        producer.poll(0.2)
    return (errors[0] if errors else None), time.monotonic() - began


def test_start_prints_config_then_bootstrap_and_keeps_secrets_private(secure: SecureBroker) -> None:
    out = secure.start_output
    assert out[-1] == f"bootstrap=127.0.0.1:{secure.port}"
    assert out[-2] == f"config={secure.directory / 'client.toml'}"
    kafka = secure.kafka()
    assert list(kafka) == KAFKA_KEYS
    assert kafka["bootstrap.servers"] == f"127.0.0.1:{secure.port}"
    assert kafka["security.protocol"] == "SASL_SSL"
    assert kafka["sasl.mechanism"] == "SCRAM-SHA-512"
    assert kafka["sasl.username"] == "bucketer"
    assert kafka["sasl.password"] == secure.secrets()["password"] and len(kafka["sasl.password"]) >= 32
    assert kafka["ssl.ca.location"] == str(secure.directory / "tls" / "ca.pem")
    for private in ("client.toml", "secrets.json", "server.properties", "tls/broker.p12"):
        assert stat.S_IMODE((secure.directory / private).stat().st_mode) == 0o600, private
    # The storage tool's argument file (it held the SCRAM passwords) and the CA's key are gone.
    assert not (secure.directory / "format.args").exists()
    assert sorted(p.name for p in (secure.directory / "tls").iterdir()) == ["broker.p12", "ca.pem"]
    assert secure.start_seconds < 120


def test_broker_certificate_verifies_against_the_pem_ca_for_127_0_0_1(secure: SecureBroker) -> None:
    ca = secure.kafka()["ssl.ca.location"]
    assert Path(ca).read_text().startswith("-----BEGIN CERTIFICATE-----")
    context = ssl.create_default_context(cafile=ca)  # verifies the chain and the name (here an IP address)
    with socket.create_connection(("127.0.0.1", secure.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            cert = tls.getpeercert()
    assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]
    # Another name is not in the certificate: the check above is a real one.
    with socket.create_connection(("127.0.0.1", secure.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname="example.com")


def test_admin_creates_a_topic_then_produce_and_consume(secure: SecureBroker) -> None:
    kafka = secure.kafka()
    topic = unique("secure")
    create_topic(kafka, topic)
    assert topic in AdminClient(quiet(kafka)).list_topics(timeout=30).topics
    producer = Producer(quiet({**kafka, "enable.idempotence": True}))
    sent = [f"m{i}".encode() for i in range(20)]
    for value in sent:
        producer.produce(topic, value, key=b"k")
    assert producer.flush(30) == 0
    assert consume_all(kafka, topic, len(sent)) == sent


def test_transactional_producer_and_read_committed_consumer(secure: SecureBroker) -> None:
    """The router's pair: its transactions commit (markers go over the SASL_SSL inter-broker listener), and
    an aborted one stays invisible to a read_committed consumer."""
    kafka = secure.kafka()
    topic = unique("secure-txn")
    create_topic(kafka, topic)
    producer = Producer(quiet({**kafka, "transactional.id": unique("txn")}))
    producer.init_transactions(60)
    batches = {"a": True, "b": False, "c": True}  # commit, abort, commit
    for name, commit in batches.items():
        producer.begin_transaction()
        for i in range(5):
            producer.produce(topic, f"{name}{i}".encode())
        assert producer.flush(30) == 0  # on the broker before the abort, so the abort has something to hide
        if commit:
            producer.commit_transaction(60)
        else:
            producer.abort_transaction(60)
    committed = [f"{n}{i}".encode() for n in ("a", "c") for i in range(5)]
    assert consume_all(kafka, topic, len(committed), **{"isolation.level": "read_committed"}) == committed
    everything = consume_all(kafka, topic, 15, **{"isolation.level": "read_uncommitted"})
    assert len(everything) == 15 and b"b0" in everything


def test_wrong_password_is_an_authentication_error_within_30s(secure: SecureBroker) -> None:
    wrong = {**secure.kafka(), "sasl.password": secure.kafka()["sasl.password"][::-1]}
    error, took = first_error(wrong)
    assert error is not None, "no error within 30 s"
    assert error.code() == KafkaError._AUTHENTICATION, error
    assert "SASL authentication error" in error.str() and "invalid credentials" in error.str()
    assert took < 30
    # A consumer (what the router and loader are) is refused the same way.
    errors: list[KafkaError] = []
    consumer = Consumer(quiet({**wrong, "group.id": unique("g"), "error_cb": errors.append}))
    try:
        consumer.subscribe([unique("never")])
        began = time.monotonic()
        while not errors and time.monotonic() - began < 30:
            consumer.poll(0.2)
    finally:
        consumer.close()
    assert errors and errors[0].code() == KafkaError._AUTHENTICATION


def test_plaintext_and_unverified_clients_are_refused(secure: SecureBroker) -> None:
    kafka = secure.kafka()
    plain = AdminClient(quiet({"bootstrap.servers": kafka["bootstrap.servers"]}))
    with pytest.raises(KafkaException):
        plain.list_topics(timeout=5)
    # TLS is checked too: without the local CA the broker's certificate is not trusted.
    no_ca = {k: v for k, v in kafka.items() if k != "ssl.ca.location"}
    error, _ = first_error(no_ca)
    # librdkafka reports it as _SSL or, depending on when the handshake fails, _TRANSPORT; the reason is the same.
    assert error is not None and error.code() in (KafkaError._SSL, KafkaError._TRANSPORT), error
    assert "certificate verify failed" in error.str()


def test_secrets_are_in_no_command_line_and_not_in_the_broker_log(secure: SecureBroker) -> None:
    secrets = secure.secrets()
    assert set(secrets) == {"password", "broker_password", "store_password"}
    broker = psutil.Process(secure.pid())
    cmdline = broker.cmdline()
    assert "kafka.Kafka" in cmdline and str(secure.directory / "server.properties") in cmdline
    ps = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True, check=True).stdout
    assert f"{secure.pid()} " in ps and "kafka.Kafka" in ps
    log = (secure.directory / "broker.log").read_text(errors="replace")
    assert log  # the broker wrote its start-up lines there
    for name, value in secrets.items():
        assert value not in " ".join(cmdline), name
        assert value not in ps, name
        assert value not in log, name
    # ...while the broker does use them: the client password authenticates (the other tests) and its own
    # properties file, private to the owner, holds the broker's.
    assert secrets["broker_password"] in (secure.directory / "server.properties").read_text()


def test_restart_keeps_certificates_users_and_config_and_start_is_idempotent(secure: SecureBroker) -> None:
    kafka = secure.kafka()
    config_text = secure.config_path.read_text()
    ca = Path(kafka["ssl.ca.location"]).read_bytes()
    store = (secure.directory / "tls" / "broker.p12").read_bytes()
    topic = unique("secure-restart")
    create_topic(kafka, topic)
    producer = Producer(quiet(kafka))
    producer.produce(topic, b"before")
    assert producer.flush(30) == 0

    again = run("local", "start", "--security", "sasl_ssl", *secure.common)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    assert again.stdout.strip().splitlines()[-2:] == secure.start_output[-2:]
    assert secure.config_path.read_text() == config_text

    # This directory is a SASL_SSL broker's: a plaintext start is refused in one line and changes nothing.
    plain = run("local", "start", *secure.common)
    assert plain.returncode == 1
    assert len(plain.stderr.strip().splitlines()) == 1 and "sasl_ssl" in plain.stderr
    assert psutil.pid_exists(secure.pid())

    stopped = run("local", "stop", *secure.common)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    began = time.monotonic()
    restarted = run("local", "start", "--security", "sasl_ssl", *secure.common)
    took = time.monotonic() - began
    assert restarted.returncode == 0, restarted.stderr
    print(f"sasl_ssl restart: {took:.1f}s")
    assert restarted.stdout.strip().splitlines()[-2:] == secure.start_output[-2:]
    assert secure.config_path.read_text() == config_text
    assert Path(kafka["ssl.ca.location"]).read_bytes() == ca
    assert (secure.directory / "tls" / "broker.p12").read_bytes() == store
    # The same user and password still authenticate, and the data is there.
    assert consume_all(secure.kafka(), topic, 1) == [b"before"]


def test_no_secret_on_the_command_line_of_keytool_or_the_storage_tool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The set-up steps run the real keytool and storage tool; every command line they get is recorded."""
    from bucketer import localkafka

    seen: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(cmd: list[str], *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        seen.append([str(c) for c in cmd])
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    broker = localkafka.LocalKafka(tmp_path / "k", port=free_port_pair(), security="sasl_ssl")
    broker.directory.mkdir(parents=True)
    secret = broker._prepare_security()
    props = broker._write_config(secret)
    java = localkafka._require_java()
    broker._format(java, f"{localkafka.fetch_jars()}/*", props, secret)
    assert (broker.directory / "data" / "meta.properties").exists()
    assert sum("keytool" in cmd[0] for cmd in seen) >= 5
    assert any(cmd[0] == java for cmd in seen)
    for cmd in seen:
        line = " ".join(cmd)
        for value in (secret.password, secret.broker_password, secret.store_password):
            assert value not in line, cmd


def test_route_load_and_run_through_the_sasl_ssl_listener(secure: SecureBroker, tmp_path: Path) -> None:
    """The workers take their whole connection from the printed config file (issue 14 must-show): loadgen,
    route + load, and run; the warehouses end with the same live rows."""
    cfg = ["--kafka-config", str(secure.config_path)]
    gen = run("loadgen", *cfg, "--count", "3000", "--seed", "4", "--topic-prefix", "sec.", "--quiet")
    assert gen.returncode == 0, gen.stderr
    routed = run("route", *cfg, "--topic-prefix", "sec.", "--until-idle", "3")
    assert routed.returncode == 0, routed.stderr
    loaded = run("load", *cfg, "--topic-prefix", "sec.", "--until-idle", "3", "--data-dir", str(tmp_path / "load"))
    assert loaded.returncode == 0, loaded.stderr
    # The same traffic on other topics for run (its groups are route's and load's).
    gen2 = run("loadgen", *cfg, "--count", "3000", "--seed", "4", "--topic-prefix", "sec2.", "--quiet")
    assert gen2.returncode == 0, gen2.stderr
    ran = run("run", *cfg, "--topic-prefix", "sec2.", "--until-idle", "3", "--data-dir", str(tmp_path / "run"))
    assert ran.returncode == 0, ran.stderr

    def live(d: str) -> int:
        out = run("query", "--data-dir", str(tmp_path / d), "SELECT count() AS n FROM activityRelations_bucket_MV_ds_0")
        assert out.returncode == 0, out.stderr
        return int(json.loads(out.stdout)["n"])

    counts = [live("load"), live("run")]
    assert counts[0] > 0 and counts[0] == counts[1]
    for out in (gen, routed, loaded, ran):
        assert secure.secrets()["password"] not in out.stdout + out.stderr


def test_a_wrong_password_is_a_one_line_error_for_a_worker(secure: SecureBroker, tmp_path: Path) -> None:
    env = {**os.environ, "BUCKETER_KAFKA_SASL_PASSWORD": "not-the-password"}
    began = time.monotonic()
    out = subprocess.run(
        [*BUCKETER, "route", "--kafka-config", str(secure.config_path), "--topic-prefix", "sec.", "--until-idle", "3"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    took = time.monotonic() - began
    assert out.returncode != 0 and took < 30, (out.returncode, took)
    lines = [line for line in out.stderr.strip().splitlines() if line.startswith("bucketer:")]
    assert len(lines) == 1 and "credentials" in lines[0], out.stderr
    assert "not-the-password" not in out.stdout + out.stderr
