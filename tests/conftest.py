"""Session-wide fixtures. Integration tests run against a real Apache Kafka broker: the one named by
BUCKETER_BOOTSTRAP, or a local KRaft broker started here. If it cannot start, tests fail (never skip)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafkatools import create_topics, unique

from bucketer.localkafka import LocalKafka, free_port

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "cityhash64.jsonl"


@pytest.fixture(scope="session")
def vectors_path() -> Path:
    path = Path(os.environ.get("BUCKETER_VECTORS", VECTORS))
    assert path.exists(), f"the ClickHouse-computed vectors are missing at {path} (../shared/vectors)"
    return path


def start_broker(directory: Path) -> LocalKafka:
    port = free_port()
    controller = free_port()
    broker = LocalKafka(directory, port=port, controller_port=controller)
    broker.start()
    return broker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka | None]:
    """The session's broker; None when an external one is given by BUCKETER_BOOTSTRAP."""
    if os.environ.get("BUCKETER_BOOTSTRAP"):
        yield None
        return
    b = start_broker(tmp_path_factory.mktemp("kafka"))
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def bootstrap(broker: LocalKafka | None) -> str:
    return os.environ.get("BUCKETER_BOOTSTRAP") or broker.bootstrap  # type: ignore[union-attr]


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    """A broker of this test alone, for tests that stop, kill or restart it."""
    b = start_broker(tmp_path / "kafka")
    try:
        yield b
    finally:
        b.stop(grace=10)


@pytest.fixture
def new_topics(bootstrap: str) -> Callable[..., list[str]]:
    """Create uniquely named topics for this test: new_topics("src", "dst", partitions=3)."""

    def make(*prefixes: str, partitions: int = 1) -> list[str]:
        names = [unique(p) for p in prefixes]
        create_topics(bootstrap, names, partitions)
        return names

    return make


@pytest.fixture
def group() -> str:
    return unique("group")
