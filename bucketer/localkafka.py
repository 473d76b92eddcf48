"""A single-node Apache Kafka 4.x broker (KRaft, combined broker+controller) for development and tests.

Contract:
- The broker's jars come from Maven Central (pinned in ``resources/kafka-pom.xml``) and are copied once
  into a cache directory shared by every checkout (``$BUCKETER_CACHE`` or ``~/.cache/bucketer``).
- ``start`` formats storage on first use, launches the JVM detached from the caller, waits until the
  broker answers a metadata request and returns the bootstrap address. It is idempotent: a broker
  already running from the same directory is reused, never doubled.
- Everything lives under one directory: ``server.properties``, ``data/`` (kept across stop/start),
  ``broker.log`` and ``broker.json`` (pid and ports of the running broker).
- ``stop`` sends SIGTERM (controlled shutdown), waits, then SIGKILL.
- Bound to 127.0.0.1 only.
- ``security="sasl_ssl"``: the client listener speaks SASL_SSL (SCRAM-SHA-512) and the controller listener
  stays plaintext on 127.0.0.1. On first start a CA and the broker's keystore signed by it are made with the
  JDK's ``keytool`` into ``tls/`` (``tls/ca.pem`` is the CA for librdkafka's ``ssl.ca.location``), random
  passwords are kept in ``secrets.json`` (0600) and the SCRAM users are created when storage is formatted.
  Every start writes ``client.toml`` (0600): a bucketer config file whose ``[kafka]`` table holds the client
  settings. No secret is ever put on a command line (``ps``): keytool reads them from its environment and
  the storage tool from a java argument file. A directory keeps the security it was set up with.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

KAFKA_VERSION = "4.1.1"
DEFAULT_PORT = 9092
HOST = "127.0.0.1"

PLAINTEXT = "plaintext"
SASL_SSL = "sasl_ssl"
SECURITY_MODES = (PLAINTEXT, SASL_SSL)
SCRAM_MECHANISM = "SCRAM-SHA-512"
CLIENT_USER = "bucketer"
BROKER_USER = "kafka-broker"  # the broker's own identity on its SASL_SSL listener (e.g. transaction markers)
CLIENT_LISTENER = "SASL_SSL"


class LocalKafkaError(RuntimeError):
    """A one-line, user-facing reason why the local broker could not be managed."""


class InvalidPort(LocalKafkaError):
    """A broker or controller port outside 1-65535 (a usage error: exit 2)."""


def check_ports(port: int, controller_port: int) -> None:
    """Raise ``InvalidPort`` unless both ports are in 1-65535 (the controller port defaults to port + 1)."""
    for what, p in (("port", port), ("controller port", controller_port)):
        if not 1 <= p <= 65535:
            raise InvalidPort(f"{what} {p} is out of range: use 1-65535 (the controller takes port + 1)")


def check_security(security: str) -> None:
    """Raise ``LocalKafkaError`` unless ``security`` is one of ``SECURITY_MODES``."""
    if security not in SECURITY_MODES:
        raise LocalKafkaError(f"security {security!r} is not supported: use {' or '.join(SECURITY_MODES)}")


@dataclass(frozen=True)
class Secrets:
    """The generated secrets of a SASL_SSL broker directory (kept in ``secrets.json``, mode 0600)."""

    password: str  # CLIENT_USER's SCRAM password: the one clients use
    broker_password: str  # BROKER_USER's SCRAM password: the broker connecting to its own listener
    store_password: str  # the PKCS12 keystore of the broker

    @classmethod
    def generate(cls) -> Secrets:
        # Hex only: safe inside the storage tool's SCRAM spec, a JAAS string and a TOML string alike.
        return cls(secrets.token_hex(24), secrets.token_hex(24), secrets.token_hex(24))

    def to_json(self) -> str:
        return json.dumps(
            {"password": self.password, "broker_password": self.broker_password, "store_password": self.store_password}
        )

    @classmethod
    def from_json(cls, text: str) -> Secrets:
        raw = json.loads(text)
        return cls(str(raw["password"]), str(raw["broker_password"]), str(raw["store_password"]))


def server_properties(
    *,
    port: int,
    controller_port: int,
    data: Path,
    security: str = PLAINTEXT,
    tls: Path | None = None,
    secret: Secrets | None = None,
) -> str:
    """The broker's ``server.properties`` (pure: no file is touched). ``sasl_ssl`` needs ``tls`` (the directory
    holding ``broker.p12``) and ``secret``."""
    check_security(security)
    if security == SASL_SSL:
        if tls is None or secret is None:
            raise ValueError("a sasl_ssl broker needs its tls directory and its secrets")
        prefix = f"listener.name.{CLIENT_LISTENER.lower()}."
        store = tls / "broker.p12"
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{BROKER_USER}" password="{secret.broker_password}";'
        )
        listener = [
            f"listeners={CLIENT_LISTENER}://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
            f"advertised.listeners={CLIENT_LISTENER}://{HOST}:{port}",
            "controller.listener.names=CONTROLLER",
            f"inter.broker.listener.name={CLIENT_LISTENER}",
            f"listener.security.protocol.map={CLIENT_LISTENER}:SASL_SSL,CONTROLLER:PLAINTEXT",
            f"sasl.enabled.mechanisms={SCRAM_MECHANISM}",
            f"sasl.mechanism.inter.broker.protocol={SCRAM_MECHANISM}",
            f"{prefix}sasl.enabled.mechanisms={SCRAM_MECHANISM}",
            f"{prefix}{SCRAM_MECHANISM.lower()}.sasl.jaas.config={jaas}",
            f"{prefix}ssl.keystore.type=PKCS12",
            f"{prefix}ssl.keystore.location={store}",
            f"{prefix}ssl.keystore.password={secret.store_password}",
            f"{prefix}ssl.key.password={secret.store_password}",
            # The broker is a client of its own listener (transaction markers): it trusts the CA in its store.
            f"{prefix}ssl.truststore.type=PKCS12",
            f"{prefix}ssl.truststore.location={store}",
            f"{prefix}ssl.truststore.password={secret.store_password}",
            f"{prefix}ssl.client.auth=none",
        ]
    else:
        listener = [
            f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
            f"advertised.listeners=PLAINTEXT://{HOST}:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        ]
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{HOST}:{controller_port}",
            *listener,
            f"log.dirs={data}",
            # One broker: every internal topic has one replica.
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=10",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=10",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "default.replication.factor=1",
            "min.insync.replicas=1",
            # Topics are created on purpose by the workers, never by a typo.
            "auto.create.topics.enable=false",
            "num.partitions=1",
            "group.initial.rebalance.delay.ms=0",
            # A development broker keeps what it was given: bootstrap replays topics from the start.
            "log.retention.ms=-1",
            "log.segment.bytes=268435456",
            "message.max.bytes=10485760",
            "num.network.threads=2",
            "num.io.threads=4",
            "",
        ]
    )


def client_settings(bootstrap: str, secret: Secrets, ca_location: Path) -> dict[str, str]:
    """The librdkafka settings a client of a SASL_SSL local broker needs (the ``[kafka]`` table)."""
    return {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": SCRAM_MECHANISM,
        "sasl.username": CLIENT_USER,
        "sasl.password": secret.password,
        "ssl.ca.location": str(ca_location),
    }


def _toml_string(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def client_config_toml(settings: Mapping[str, str], directory: Path) -> str:
    """A bucketer config file with one ``[kafka]`` table; keys are quoted, so ``bootstrap.servers`` is one key."""
    where = "".join(ch if ch.isprintable() else "?" for ch in str(directory))  # a comment is one line
    lines = [
        f"# Client settings for the local SASL_SSL broker in {where}",
        "# (written by `bucketer local start --security sasl_ssl`; it holds a password: keep it 0600).",
        "[kafka]",
        *(f"{_toml_string(k)} = {_toml_string(v)}" for k, v in settings.items()),
        "",
    ]
    return "\n".join(lines)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600 from the first byte, atomically)."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(partial, 0o600)
    partial.replace(path)


def _java_argfile(args: list[str]) -> str:
    """A java launcher argument file (``java @FILE``): one quoted argument a line."""
    return "".join('"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"\n' for a in args)


def new_cluster_id() -> str:
    """A KRaft cluster id like ``kafka-storage random-uuid`` prints (22 characters of URL-safe base64)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka avoids ids that look like a command-line option
            return text


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    port: int
    controller_port: int
    directory: Path

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"


def cache_dir() -> Path:
    base = os.environ.get("BUCKETER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bucketer"
    )
    return Path(base)


def libs_dir(version: str = KAFKA_VERSION) -> Path:
    return cache_dir() / f"kafka-{version}" / "libs"


def fetch_jars(version: str = KAFKA_VERSION, quiet: bool = True) -> Path:
    """Copy the broker's runtime jars from Maven Central into the cache (no-op when already there)."""
    target = libs_dir(version)
    stamp = target / ".complete"
    if stamp.exists():
        return target
    if shutil.which("mvn") is None:
        raise LocalKafkaError("Maven (mvn) is not installed: it is needed once to fetch the Kafka jars")
    _require_java()
    work = target.parent
    work.mkdir(parents=True, exist_ok=True)
    pom_text = resources.files("bucketer.resources").joinpath("kafka-pom.xml").read_text()
    pom = work / "pom.xml"
    pom.write_text(pom_text.replace("@KAFKA_VERSION@", version))
    partial = work / "libs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = ["mvn", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={partial}"]
    if quiet:
        cmd.insert(1, "-q")
    proc = subprocess.run(cmd, capture_output=quiet, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout or "")[-2000:] + (proc.stderr or "")[-2000:] if quiet else ""
        raise LocalKafkaError(f"mvn could not fetch kafka_2.13:{version} from Maven Central\n{tail}")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    stamp.touch()
    return target


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise LocalKafkaError("Java is not installed: the local Kafka broker needs Java 17 or newer")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    for token in out.replace('"', " ").split():
        head = token.split(".")[0]
        if head.isdigit() and token.count(".") >= 1:
            major = int(head) if head != "1" else int(token.split(".")[1])
            if major < 17:
                raise LocalKafkaError(f"Java {token} found; the Kafka 4 broker needs Java 17 or newer")
            break
    return java


def port_open(port: int, host: str = HOST, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); check its state where /proc exists.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


class LocalKafka:
    """Manages one broker rooted at ``directory``. No process is touched until a method is called."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        port: int = DEFAULT_PORT,
        controller_port: int | None = None,
        heap: str = "512m",
        version: str = KAFKA_VERSION,
        security: str = PLAINTEXT,
    ):
        self.directory = Path(directory).resolve()
        self.port = port
        self.controller_port = controller_port or port + 1
        self.heap = heap
        self.version = version
        self.security = security

    # -- state ---------------------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def _state_file(self) -> Path:
        return self.directory / "broker.json"

    @property
    def secrets_file(self) -> Path:
        return self.directory / "secrets.json"

    @property
    def tls_dir(self) -> Path:
        return self.directory / "tls"

    @property
    def ca_file(self) -> Path:
        """The PEM CA certificate that signed the broker's certificate (librdkafka's ``ssl.ca.location``)."""
        return self.tls_dir / "ca.pem"

    @property
    def config_file(self) -> Path:
        """The bucketer config file of a SASL_SSL broker's clients (``[kafka]`` table), written by ``start``."""
        return self.directory / "client.toml"

    def client_config(self) -> dict[str, str]:
        """The librdkafka settings that reach this broker (secrets included for sasl_ssl)."""
        if self.security == SASL_SSL:
            return client_settings(self.bootstrap, self._load_secrets(), self.ca_file)
        return {"bootstrap.servers": self.bootstrap}

    def _load_secrets(self) -> Secrets:
        try:
            return Secrets.from_json(self.secrets_file.read_text())
        except (OSError, ValueError, KeyError) as exc:
            raise LocalKafkaError(f"cannot read the broker's secrets in {self.secrets_file}: {exc}") from None

    def _dir_security(self) -> str | None:
        """The security this directory was set up with; None for a directory never started."""
        if self.secrets_file.exists():
            return SASL_SSL
        if (self.directory / "data" / "meta.properties").exists():
            return PLAINTEXT
        return None

    def _check_same_security(self, found: str | None, running: bool) -> None:
        if found is not None and found != self.security:
            state = "is running" if running else "was set up"
            raise LocalKafkaError(
                f"the broker in {self.directory} {state} with security {found}, not {self.security}: "
                f"pass --security {found} or use another --dir"
            )

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return None

    def status(self) -> BrokerStatus:
        state = self._read_state()
        if state and _pid_alive(state["pid"]) and self._is_our_broker(state["pid"]):
            return BrokerStatus(True, state["pid"], state["port"], state["controller_port"], self.directory)
        return BrokerStatus(False, None, self.port, self.controller_port, self.directory)

    def _is_our_broker(self, pid: int) -> bool:
        """Whether ``pid`` is this directory's broker, not a process that got a dead broker's pid (where /proc
        tells; elsewhere a live pid is taken as ours)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            return True
        return b"kafka.Kafka" in args and os.fsencode(self.directory / "server.properties") in args

    # -- start ---------------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> str:
        """Start the broker (idempotent) and wait until it answers. Ports are checked first
        (``InvalidPort``); a broker that does not come up is killed with its process group, so a
        failed start never leaves a broker behind."""
        check_ports(self.port, self.controller_port)
        check_security(self.security)
        current = self.status()
        if current.running:
            # Idempotent: the broker of this directory is already up (maybe on its own recorded port).
            state = self._read_state() or {}
            self._check_same_security(str(state.get("security", PLAINTEXT)), running=True)
            self.port, self.controller_port = current.port, current.controller_port
            if self.security == SASL_SSL:
                self._write_client_config()
            self._wait_ready(current.pid, timeout)
            return self.bootstrap
        self._check_same_security(self._dir_security(), running=False)
        for p in (self.port, self.controller_port):
            if port_open(p):
                raise LocalKafkaError(f"port {p} on {HOST} is already in use by another process")
        java = _require_java()
        libs = fetch_jars(self.version)
        self.directory.mkdir(parents=True, exist_ok=True)
        secret = self._prepare_security() if self.security == SASL_SSL else None
        props = self._write_config(secret)
        classpath = f"{libs}/*"
        if not (self.directory / "data" / "meta.properties").exists():
            self._format(java, classpath, props, secret)
        if secret is not None:
            self._write_client_config()
        log = open(self.directory / "broker.log", "ab")
        cmd = [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.directory / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.directory}",
            "-cp",
            classpath,
            "kafka.Kafka",
            str(props),
        ]
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.directory,
        )
        log.close()
        self._state_file.write_text(
            json.dumps(
                {
                    "pid": proc.pid,
                    "port": self.port,
                    "controller_port": self.controller_port,
                    "security": self.security,
                }
            )
        )
        try:
            self._wait_ready(proc.pid, timeout)
        except LocalKafkaError as exc:
            self._kill_group(proc)
            code = proc.returncode
            if code is None:
                raise
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise LocalKafkaError(f"{exc} ({how})") from None
        except BaseException:  # not up (or interrupted): never leave a broker behind
            self._kill_group(proc)
            raise
        return self.bootstrap

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: its group id is its pid
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._state_file.unlink(missing_ok=True)

    def _write_config(self, secret: Secrets | None = None) -> Path:
        props = self.directory / "server.properties"
        text = server_properties(
            port=self.port,
            controller_port=self.controller_port,
            data=self.directory / "data",
            security=self.security,
            tls=self.tls_dir,
            secret=secret,
        )
        # A sasl_ssl broker's properties hold its keystore and SCRAM passwords.
        _write_private(props, text)
        (self.directory / "log4j2.properties").write_text(
            "\n".join(
                [
                    "status = warn",
                    "appender.out.type = Console",
                    "appender.out.name = OUT",
                    "appender.out.layout.type = PatternLayout",
                    "appender.out.layout.pattern = [%d] %p %m (%c)%n",
                    "rootLogger.level = WARN",
                    "rootLogger.appenderRef.out.ref = OUT",
                    "logger.kafka.name = kafka.server.KafkaRaftServer",
                    "logger.kafka.level = INFO",
                    "",
                ]
            )
        )
        return props

    def _format(self, java: str, classpath: str, props: Path, secret: Secrets | None = None) -> None:
        args = ["format", "-t", new_cluster_id(), "-c", str(props), "--ignore-formatted"]
        if secret is not None:
            for user, password in ((CLIENT_USER, secret.password), (BROKER_USER, secret.broker_password)):
                args += ["--add-scram", f"{SCRAM_MECHANISM}=[name={user},password={password}]"]
        # Through a java argument file (0600, removed after): the SCRAM passwords never reach a command line.
        argfile = self.directory / "format.args"
        _write_private(argfile, _java_argfile(["-Xmx256m", "-cp", classpath, "kafka.tools.StorageTool", *args]))
        try:
            proc = subprocess.run([java, f"@{argfile}"], capture_output=True, text=True)
        finally:
            argfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            reason = (proc.stderr or proc.stdout).strip()
            for hidden in (secret.password, secret.broker_password) if secret is not None else ():
                reason = reason.replace(hidden, "***")
            raise LocalKafkaError(f"kafka storage tool failed: {reason[-500:]}")

    # -- sasl_ssl ------------------------------------------------------------------------------------
    def _prepare_security(self) -> Secrets:
        """Secrets and certificates of this directory: made once, then kept across stop/start."""
        if self.secrets_file.exists():
            secret = self._load_secrets()
        else:
            secret = Secrets.generate()
            _write_private(self.secrets_file, secret.to_json())
        os.chmod(self.directory, 0o700)
        if not (self.tls_dir / "broker.p12").exists() or not self.ca_file.exists():
            self._make_certificates(secret)
        return secret

    def _make_certificates(self, secret: Secrets) -> None:
        """A CA, the broker's key pair and certificate (for 127.0.0.1 and localhost) signed by it, and the CA
        as PEM; made in a scratch directory and renamed, so a half-made set is never used."""
        keytool = shutil.which("keytool")
        if keytool is None:
            raise LocalKafkaError("keytool (from the JDK) is not installed: it makes the SASL_SSL certificates")
        work = self.directory / "tls.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700)
        env = {**os.environ, "BUCKETER_STORE_PASS": secret.store_password}
        store = ["-storetype", "PKCS12", "-storepass:env", "BUCKETER_STORE_PASS"]
        ca, broker = str(work / "ca.p12"), str(work / "broker.p12")
        fast_jvm = ["-J-XX:TieredStopAtLevel=1", "-J-XX:+UseSerialGC"]
        key = ["-keyalg", "EC", "-groupname", "secp256r1", "-validity", "3650"]
        steps = [
            ["-genkeypair", "-alias", "ca", *key, "-dname", "CN=bucketer local CA", "-ext", "bc:c", "-keystore", ca],
            ["-exportcert", "-rfc", "-alias", "ca", "-keystore", ca, "-file", str(work / "ca.pem")],
            ["-genkeypair", "-alias", "broker", *key, "-dname", "CN=localhost", "-keystore", broker],
            ["-certreq", "-alias", "broker", "-keystore", broker, "-file", str(work / "broker.csr")],
            [
                "-gencert", "-rfc", "-alias", "ca", "-keystore", ca, "-validity", "3650",
                "-infile", str(work / "broker.csr"), "-outfile", str(work / "broker.pem"),
                "-ext", f"SAN=ip:{HOST},dns:localhost", "-ext", "KU=digitalSignature,keyAgreement",
                "-ext", "EKU=serverAuth,clientAuth",
            ],
            ["-importcert", "-noprompt", "-alias", "ca", "-file", str(work / "ca.pem"), "-keystore", broker],
            ["-importcert", "-alias", "broker", "-file", str(work / "broker.pem"), "-keystore", broker],
        ]  # fmt: skip
        for step in steps:
            proc = subprocess.run([keytool, *fast_jvm, *step, *store], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                out = (proc.stderr or proc.stdout).strip().replace("\n", " ")[-400:]
                raise LocalKafkaError(f"keytool {step[0]} failed: {out}")
        # Only what the broker and its clients need stays: the CA's key would sign anything clients trust.
        for scratch in ("broker.csr", "broker.pem", "ca.p12"):
            (work / scratch).unlink()
        for kept in work.iterdir():
            os.chmod(kept, 0o600 if kept.suffix == ".p12" else 0o644)
        shutil.rmtree(self.tls_dir, ignore_errors=True)
        work.rename(self.tls_dir)

    def _write_client_config(self) -> None:
        _write_private(self.config_file, client_config_toml(self.client_config(), self.directory))

    def _wait_ready(self, pid: int | None, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        conf: dict[str, Any] = {
            **self.client_config(),
            "socket.connection.setup.timeout.ms": 1000,
            "log_level": 0,
            "logger": _SilentLogger(),
        }
        admin = AdminClient(conf)
        while time.monotonic() < deadline:
            if pid is not None and not _pid_alive(pid):
                raise LocalKafkaError(f"the broker exited during start-up; see {self.directory / 'broker.log'}")
            if port_open(self.port):
                try:
                    md = admin.list_topics(timeout=2)
                    if md.brokers:
                        return
                except Exception:  # noqa: BLE001 - not ready yet; retried until the deadline
                    pass
            time.sleep(0.25)
        raise LocalKafkaError(f"the broker did not answer within {timeout:.0f}s; see {self.directory / 'broker.log'}")

    # -- stop ----------------------------------------------------------------------------------------
    def stop(self, grace: float = 30.0) -> bool:
        """Stop the broker; returns False when none was running."""
        current = self.status()
        if not current.running or current.pid is None:
            self._state_file.unlink(missing_ok=True)
            return False
        pid = current.pid
        self._signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _pid_alive(pid):
            self._reap(pid)
            time.sleep(0.2)
        if _pid_alive(pid):
            self._signal(pid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 10
            while time.monotonic() < kill_deadline and _pid_alive(pid):
                self._reap(pid)
                time.sleep(0.1)
        self._state_file.unlink(missing_ok=True)
        # The listener port is free once the process is gone; wait for it so a restart can bind.
        port_deadline = time.monotonic() + 10
        while time.monotonic() < port_deadline and port_open(current.port):
            time.sleep(0.1)
        return True

    def kill(self) -> None:
        """SIGKILL the broker at once (a crash, for tests)."""
        current = self.status()
        if current.running and current.pid is not None:
            self._signal(current.pid, signal.SIGKILL)
            while _pid_alive(current.pid):
                self._reap(current.pid)
                time.sleep(0.05)

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _reap(pid: int) -> None:
        # When this process started the broker, collect it so it does not linger as a zombie.
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


class _SilentLogger:
    """librdkafka logs connection refusals while the broker boots; they are expected here."""

    def log(self, *args: object, **kwargs: object) -> None:
        return None
