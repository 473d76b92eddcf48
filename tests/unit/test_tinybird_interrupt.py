"""The Tinybird sink under a stop and an unreachable target (issue 16 item 4), against a closed port
(connections really refused) and the stand-in: ``interrupt()`` ends a commit that waits on retries
within a second, without committing; retries failing past ``unreachable_deadline`` stop the sink with
one line naming the target."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from confluent_kafka import TopicPartition
from test_tinybird_sink import TOKEN, RecordingConsumer, line

from connectors.kafka import BucketerKafkaError
from connectors.sink_errors import SinkRetryError
from connectors.tinybird import TinybirdSettings, TinybirdSink, TinybirdSinkError
from connectors.tinybird_api import Secret


def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def sink_for(url: str, **kw: object) -> TinybirdSink:
    settings = TinybirdSettings(url=url, token=Secret(TOKEN), linger=0.05, backoff_base=0.05, **kw)  # type: ignore[arg-type]
    return TinybirdSink(settings, 4)


def test_interrupt_ends_a_commit_stuck_on_retries_and_commits_nothing() -> None:
    sink, consumer = sink_for(closed_url(), backoff_cap=0.5), RecordingConsumer()
    sink.open()
    sink.begin()
    sink.write(1, b"k", line(1, 1))
    outcome: list[BaseException] = []

    def commit() -> None:
        try:
            sink.commit([TopicPartition("src", 0, 1)], consumer)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    t = threading.Thread(target=commit, daemon=True)
    t.start()
    time.sleep(1.0)  # retrying a refused connection
    assert t.is_alive() and sink.stats["activityRelations_bucket_MV_ds_1"]["retries"] >= 1
    asked = time.monotonic()
    sink.interrupt()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - asked < 1.5
    assert len(outcome) == 1 and isinstance(outcome[0], SinkRetryError)  # the router's retry, not a Kafka error
    assert not isinstance(outcome[0], BucketerKafkaError)
    started = time.monotonic()
    sink.abort()
    sink.close()  # does not wait close_timeout (60 s) and raises nothing: a stop is not a failure
    assert time.monotonic() - started < 6
    assert consumer.commits == []


def test_unreachable_past_the_deadline_stops_the_sink_with_one_line() -> None:
    url = closed_url()
    sink, consumer = sink_for(url, backoff_cap=0.2, unreachable_deadline=1.0), RecordingConsumer()
    sink.open()
    sink.begin()
    sink.write(0, b"k", line(1, 0))
    started = time.monotonic()
    with pytest.raises(TinybirdSinkError) as info:
        sink.commit([TopicPartition("src", 0, 1)], consumer)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "unreachable" in message and url in message and "\n" not in message
    assert consumer.commits == []
    sink.close()  # the stop was already reported: close stays quiet
