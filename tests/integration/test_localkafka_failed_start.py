"""A local broker that does not come up in time is killed, with its process group: a failed
``LocalKafka.start`` never leaves a Java broker behind (issue 16 item 5). Real Java, real jars."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from proctools import processes_using

from bucketer.localkafka import LocalKafka, LocalKafkaError, free_port


def test_a_start_that_times_out_leaves_no_broker_behind(tmp_path: Path) -> None:
    directory = tmp_path / "kafka"
    port = free_port()
    broker = LocalKafka(directory, port=port, controller_port=free_port())
    try:
        with pytest.raises(LocalKafkaError, match="did not answer"):
            broker.start(timeout=0.5)  # far too short for Java: the start fails after the broker was spawned
        assert processes_using(directory) == []
        assert not broker.status().running
        assert not (directory / "broker.json").exists()
    finally:
        for pid in processes_using(directory):  # the old behaviour: an orphan; end it ourselves
            os.kill(pid, signal.SIGKILL)
