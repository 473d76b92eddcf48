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
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

KAFKA_VERSION = "4.1.1"
DEFAULT_PORT = 9092
HOST = "127.0.0.1"


class LocalKafkaError(RuntimeError):
    """A one-line, user-facing reason why the local broker could not be managed."""


class InvalidPort(LocalKafkaError):
    """A broker or controller port outside 1-65535 (a usage error: exit 2)."""


def check_ports(port: int, controller_port: int) -> None:
    """Raise ``InvalidPort`` unless both ports are in 1-65535 (the controller port defaults to port + 1)."""
    for what, p in (("port", port), ("controller port", controller_port)):
        if not 1 <= p <= 65535:
            raise InvalidPort(f"{what} {p} is out of range: use 1-65535 (the controller takes port + 1)")


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
    ):
        self.directory = Path(directory).resolve()
        self.port = port
        self.controller_port = controller_port or port + 1
        self.heap = heap
        self.version = version

    # -- state ---------------------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def _state_file(self) -> Path:
        return self.directory / "broker.json"

    def _read_state(self) -> dict[str, int] | None:
        try:
            return json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return None

    def status(self) -> BrokerStatus:
        state = self._read_state()
        if state and _pid_alive(state["pid"]):
            return BrokerStatus(True, state["pid"], state["port"], state["controller_port"], self.directory)
        return BrokerStatus(False, None, self.port, self.controller_port, self.directory)

    # -- start ---------------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> str:
        """Start the broker (idempotent) and wait until it answers. Ports are checked first
        (``InvalidPort``); a broker that does not come up is killed with its process group, so a
        failed start never leaves a broker behind."""
        check_ports(self.port, self.controller_port)
        current = self.status()
        if current.running:
            # Idempotent: the broker of this directory is already up (maybe on its own recorded port).
            self.port, self.controller_port = current.port, current.controller_port
            self._wait_ready(current.pid, timeout)
            return self.bootstrap
        for p in (self.port, self.controller_port):
            if port_open(p):
                raise LocalKafkaError(f"port {p} on {HOST} is already in use by another process")
        java = _require_java()
        libs = fetch_jars(self.version)
        self.directory.mkdir(parents=True, exist_ok=True)
        props = self._write_config()
        classpath = f"{libs}/*"
        if not (self.directory / "data" / "meta.properties").exists():
            self._format(java, classpath, props)
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
            json.dumps({"pid": proc.pid, "port": self.port, "controller_port": self.controller_port})
        )
        try:
            self._wait_ready(proc.pid, timeout)
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

    def _write_config(self) -> Path:
        data = self.directory / "data"
        props = self.directory / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{HOST}:{self.controller_port}",
                    f"listeners=PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://{HOST}:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
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
        )
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

    def _format(self, java: str, classpath: str, props: Path) -> None:
        def tool(*args: str) -> str:
            proc = subprocess.run(
                [java, "-Xmx256m", "-cp", classpath, "kafka.tools.StorageTool", *args], capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise LocalKafkaError(f"kafka storage tool failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
            return proc.stdout.strip()

        cluster_id = tool("random-uuid").splitlines()[-1].strip()
        tool("format", "-t", cluster_id, "-c", str(props), "--ignore-formatted")

    def _wait_ready(self, pid: int | None, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        admin = AdminClient(
            {
                "bootstrap.servers": self.bootstrap,
                "socket.connection.setup.timeout.ms": 1000,
                "log_level": 0,
                "logger": _SilentLogger(),
            }
        )
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
