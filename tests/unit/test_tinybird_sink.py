"""The Tinybird sink against the local stand-in of the Events API (no Kafka: a recording consumer)."""

from __future__ import annotations

import gzip
import logging
import re
import time
from typing import Any

import orjson
import pytest
from confluent_kafka import TopicPartition
from kafkatools import wait_until
from tinybird_standin import Reply, Standin

from connectors.kafka_conn import KafkaConnection
from connectors.tinybird import AckTracker, TinybirdSettings, TinybirdSink, TinybirdSinkError
from connectors.tinybird_api import Secret, TinybirdClient

TOKEN = "p.very-secret-token-4242"
DS = "activityRelations_bucket_MV_ds_{n}"


class RecordingConsumer:
    def __init__(self) -> None:
        self.commits: list[dict[tuple[str, int], int]] = []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        assert asynchronous is False
        self.commits.append({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def committed(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for c in self.commits:
            out.update(c)
        return out


def line(i: int, bucket: int, pad: int = 0) -> bytes:
    return orjson.dumps(
        {
            "action": "insert",
            "record": {"activityId": f"a{i}", "bucket": bucket, "pad": "x" * pad},
            "changes": None,
            "metadata": {},
        }
    )


def make_sink(standin: Standin, **kw: Any) -> TinybirdSink:
    settings = TinybirdSettings(
        url=standin.url,
        token=Secret(TOKEN),
        **({"linger": 0.05, "backoff_base": 0.05, "backoff_cap": 0.2, "close_timeout": 10} | kw),
    )
    return TinybirdSink(settings, 4)


def route(
    sink: TinybirdSink, consumer: RecordingConsumer, batches: list[list[tuple[int, bytes]]], topic: str = "src"
) -> None:
    offset = 0
    for batch in batches:
        sink.begin()
        for bucket, value in batch:
            sink.write(bucket, b"k", value)
            offset += 1
        sink.commit([TopicPartition(topic, 0, offset)], consumer)


@pytest.fixture
def standin() -> Any:
    with Standin(token=TOKEN) as s:
        yield s


def test_every_line_lands_in_its_data_source_and_offsets_follow_acks(standin: Standin) -> None:
    consumer = RecordingConsumer()
    sink = make_sink(standin)
    sink.open()
    batches = [[(i % 4, line(i, i % 4, pad=300)) for i in range(b * 50, b * 50 + 50)] for b in range(6)]
    route(sink, consumer, batches)
    sink.close()
    for n in range(4):
        want = [v for batch in batches for b, v in batch if b == n]
        assert standin.rows[DS.format(n=n)] == want  # exactly, in order, nothing else
    assert consumer.committed() == {("src", 0): 300}
    assert any(r.gzipped for r in standin.received)  # 50 x ~400 bytes: gzip pays
    assert sink.stats[DS.format(n=0)]["rows"] == 75


def test_ack_tracker_commits_only_an_acknowledged_prefix() -> None:
    t = AckTracker()
    a, b = t.open(), t.open()
    t.added(a, 10)
    t.added(b, 10)
    t.seal(a, [TopicPartition("s", 0, 5)])
    t.seal(b, [TopicPartition("s", 0, 9), TopicPartition("s", 1, 3)])
    t.acked([b], [10])  # the later batch first
    assert t.take_committable() == [] and t.acknowledged() == {}
    t.acked([a], [10])
    assert t.acknowledged() == {("s", 0): 9, ("s", 1): 3}
    got = {(tp.topic, tp.partition): tp.offset for tp in t.take_committable()}
    assert got == {("s", 0): 9, ("s", 1): 3} and t.pending_bytes == 0
    c = t.open()
    t.added(c, 4)
    t.added(c, 6)
    t.acked([c], [4])  # one line of it already sent and acknowledged
    t.discard(c)  # an aborted batch never commits
    assert t.take_committable() == [] and t.pending_bytes == 0
    t.acked([c], [6])  # its other line acknowledged after the abort
    assert t.pending_bytes == 0


def test_retry_after_is_honoured_per_data_source(standin: Standin) -> None:
    ds0, ds1 = DS.format(n=0), DS.format(n=1)
    standin.script(ds0, Reply(429, {"Retry-After": "1.2"}))
    consumer = RecordingConsumer()
    sink = make_sink(standin)
    sink.open()
    t0 = time.monotonic()
    route(sink, consumer, [[(0, line(1, 0)), (1, line(2, 1))]])
    wait_until(lambda: standin.rows[ds0], 10, "the retried request")
    first, second = standin.requests_to(ds0)[:2]
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 1.2
    assert standin.requests_to(ds1)[0].at - t0 < 1.0  # the other data source did not wait
    sink.close()
    assert consumer.committed() == {("src", 0): 2}
    assert sink.stats[ds0]["throttled"] == 1


def test_rate_limit_reset_header_when_no_retry_after(standin: Standin) -> None:
    ds = DS.format(n=2)
    standin.script(ds, Reply(429, {"X-RateLimit-Reset": "0.8"}))
    sink = make_sink(standin)
    sink.open()
    route(sink, RecordingConsumer(), [[(2, line(1, 2))]])
    sink.close()
    first, second = standin.requests_to(ds)[:2]
    assert second.at - first.at >= 0.8 and standin.rows[ds] == [line(1, 2)]


def test_server_errors_and_slow_answers_are_retried(standin: Standin) -> None:
    ds = DS.format(n=3)
    standin.script(ds, Reply(503), Reply(500), Reply(502), Reply(504), Reply(200, delay=1.5))
    consumer = RecordingConsumer()
    sink = make_sink(standin, timeout=0.5)  # the slow answer times out: retried (it may duplicate)
    sink.open()
    route(sink, consumer, [[(3, line(i, 3)) for i in range(5)]])
    sink.close()
    assert set(standin.rows[ds]) == {line(i, 3) for i in range(5)}
    assert [r.status for r in standin.requests_to(ds)][:4] == [503, 500, 502, 504]
    assert sink.stats[ds]["retries"] >= 5
    assert consumer.committed() == {("src", 0): 5}


def test_too_large_batches_are_split(standin: Standin) -> None:
    standin.max_body = 3000
    ds = DS.format(n=0)
    sink = make_sink(standin, gzip_min_bytes=10**9)
    sink.open()
    values = [line(i, 0, pad=200) for i in range(40)]
    route(sink, RecordingConsumer(), [[(0, v) for v in values]])
    sink.close()
    assert standin.rows[ds] == values
    assert any(r.status == 413 for r in standin.received) and sink.stats[ds]["splits"] > 0


def test_rate_never_exceeds_100_requests_per_second_per_data_source(standin: Standin) -> None:
    ds = DS.format(n=1)
    times: list[float] = []

    class TimedClient(TinybirdClient):
        def post_events(self, datasource: str, body: bytes, gzipped: bool = False) -> Any:
            times.append(time.monotonic())  # when each request really starts
            return super().post_events(datasource, body, gzipped)

    settings = TinybirdSettings(url=standin.url, token=Secret(TOKEN), linger=0.0, max_batch_bytes=120)  # 1 line/request
    sink = TinybirdSink(settings, 4, client_factory=lambda c: TimedClient(c.url, c.token, c.timeout))
    sink.open()
    route(sink, RecordingConsumer(), [[(1, line(i, 1)) for i in range(60)]])
    sink.close()
    assert len(times) == 60 and len(standin.requests_to(ds)) == 60
    windows = [times[i + 10] - times[i] for i in range(len(times) - 10)]
    assert min(windows) >= 0.0999  # any 11 requests span at least 100 ms


def test_quarantined_rows_are_counted_and_logged(standin: Standin, caplog: pytest.LogCaptureFixture) -> None:
    ds = DS.format(n=2)
    standin.script(ds, Reply(200, quarantine=2))
    sink = make_sink(standin)
    sink.open()
    with caplog.at_level(logging.WARNING, logger="bucketer.tinybird"):
        route(sink, RecordingConsumer(), [[(2, line(i, 2)) for i in range(4)] + [(2, b'"just a string"')]])
        sink.close()
    assert sink.stats[ds]["quarantined"] == 3  # 2 reported + the line that is not an object
    assert any(ds in r.getMessage() and "quarantined" in r.getMessage() for r in caplog.records)


def test_partial_write_stops_loudly_without_retry_or_commit(standin: Standin, caplog: pytest.LogCaptureFixture) -> None:
    ds = DS.format(n=1)
    standin.script(ds, Reply(422, body='{"error":"materialized view activity_mv failed"}'))
    consumer = RecordingConsumer()
    sink = make_sink(standin)
    sink.open()
    with caplog.at_level(logging.ERROR, logger="bucketer.tinybird"):
        with pytest.raises(TinybirdSinkError, match="422"):
            route(sink, consumer, [[(1, line(i, 1)) for i in range(6)]])  # the commit waits, then stops
        with pytest.raises(TinybirdSinkError, match="422"):
            route(sink, consumer, [[(1, line(99, 1))]])
        sink.close()
    assert len(standin.requests_to(ds)) == 1  # no blind retry
    assert consumer.committed() == {}  # nothing committed past it
    assert any("activity_mv failed" in r.getMessage() for r in caplog.records)
    with pytest.raises(TinybirdSinkError):
        sink.open()  # sticky: a reopen does not hide it


@pytest.mark.parametrize("status", [400, 404])
def test_configuration_errors_stop(standin: Standin, status: int) -> None:
    standin.script("*", Reply(status))
    sink = make_sink(standin)
    sink.open()
    consumer = RecordingConsumer()
    with pytest.raises(TinybirdSinkError, match=str(status)):
        route(sink, consumer, [[(0, line(1, 0))]])
    assert sink.fatal is not None and sink.fatal.status == status
    assert consumer.commits == [] and len(standin.received) == 1  # not retried, nothing committed
    sink.close()


def test_wrong_token_stops_and_the_token_is_never_printed(
    standin: Standin, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    standin.token = "p.the-right-one"
    sink = make_sink(standin)
    with caplog.at_level(logging.DEBUG):
        sink.open()
        with pytest.raises(TinybirdSinkError) as info:
            route(sink, RecordingConsumer(), [[(0, line(1, 0))]])
        with pytest.raises(TinybirdSinkError):
            sink.commit([TopicPartition("src", 0, 9)], RecordingConsumer())
        sink.close()
    assert "403" in str(info.value) and "token" in str(info.value)
    printed = capsys.readouterr()
    everything = [
        str(info.value),
        repr(sink),
        repr(sink.settings),
        str(sink.settings),
        repr(sink.settings.token),
        printed.out,
        printed.err,
        caplog.text,
        str(dict(sink.stats)),
    ]
    assert all(TOKEN not in text for text in everything)
    assert TOKEN in sink.settings.token.reveal()  # the check above is not vacuous


def test_client_gzip_body_is_ndjson_of_the_original_bytes(standin: Standin) -> None:
    values = [line(i, 0, pad=100) for i in range(30)]
    body = gzip.compress(b"\n".join(values) + b"\n")
    with TinybirdClient(standin.url, Secret(TOKEN)) as client:
        result = client.post_events("some_ds", body, gzipped=True)
    assert (result.status, result.successful_rows, result.quarantined_rows) == (200, 30, 0)
    assert standin.rows["some_ds"] == values


def test_router_config_with_tinybird_settings_goes_through_the_sink_seam() -> None:
    from dataclasses import replace

    from stream.router import RouterConfig
    from stream.sinks import KafkaSink, make_sink

    base = RouterConfig(
        kafka=KafkaConnection.plain("127.0.0.1:1"), buckets=7, group="g", topic_prefix="p.", batch_size=123
    )
    settings = TinybirdSettings(url="http://127.0.0.1:9", token=Secret(TOKEN), linger=0.2)
    config = replace(base, sink="tinybird", tinybird=settings)
    assert (config.sink, config.buckets, config.group, config.topic_prefix, config.batch_size) == (
        "tinybird",
        7,
        "g",
        "p.",
        123,
    )
    sink = make_sink(config)  # no network: open() has not run
    assert isinstance(sink, TinybirdSink) and sink.buckets == 7 and sink.settings is settings
    assert isinstance(sink.dlq, KafkaSink) and not sink.dlq.exactly_once  # the DLQ stays a Kafka topic
    assert TOKEN not in repr(config) and TOKEN not in str(config) and TOKEN not in repr(sink)
    assert isinstance(make_sink(base), KafkaSink)


def test_router_config_refuses_a_tinybird_sink_without_settings() -> None:
    from stream.router import RouterConfig

    with pytest.raises(ValueError, match="tinybird-url"):
        RouterConfig(kafka=KafkaConnection.plain("127.0.0.1:1"), sink="tinybird")
    with pytest.raises(ValueError, match="unknown sink"):
        RouterConfig(kafka=KafkaConnection.plain("127.0.0.1:1"), sink="s3")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"url": "127.0.0.1:9"}, "http"),
        ({"token": Secret("")}, "token"),
        ({"token": TOKEN}, "Secret"),  # a plain string would print itself
        ({"datasource_template": "activityRelations_ds"}, "{n}"),
        ({"unreachable_deadline": 0}, "unreachable_deadline"),
        ({"max_batch_bytes": 0}, "max_batch_bytes"),
    ],
)
def test_tinybird_settings_refuse_what_cannot_work(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        TinybirdSettings(**({"url": "https://api.tinybird.co", "token": Secret(TOKEN)} | change))
    assert TOKEN not in str(info.value)


def test_tinybird_sink_errors_are_the_seams_own_not_kafkas() -> None:
    from connectors.kafka import BucketerKafkaError
    from connectors.sink_errors import SinkFatalError, SinkRetryError

    assert issubclass(TinybirdSinkError, SinkFatalError)
    assert not issubclass(TinybirdSinkError, BucketerKafkaError)
    assert not issubclass(SinkRetryError, BucketerKafkaError) and not issubclass(SinkFatalError, BucketerKafkaError)
