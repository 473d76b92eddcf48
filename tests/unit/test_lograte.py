"""librdkafka's repeats are rate-limited (issue 16 item 9): a broker outage must not print hundreds of lines."""

from __future__ import annotations

import logging
import time

from confluent_kafka import Consumer

from bucketer.localkafka import free_port
from connectors.kafka import LIBRDKAFKA_LOG, consumer_config
from connectors.kafka_conn import KafkaConnection
from connectors.lograte import RepeatFilter


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def logger_with(name: str, *filters: logging.Filter) -> tuple[logging.Logger, Capture]:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    cap = Capture()
    logger.addHandler(cap)
    for f in filters:
        logger.addFilter(f)
    return logger, cap


def test_similar_lines_show_once_per_interval_and_say_how_many_were_held_back() -> None:
    clock = Clock()
    logger, cap = logger_with("test.lograte.unit", RepeatFilter(30.0, clock=clock))
    for i in range(50):
        clock.t = i * 0.2
        logger.warning("127.0.0.1:%d/1: Connect failed after %dms", 9092, i)
    logger.warning("a different line")
    assert cap.lines == ["127.0.0.1:9092/1: Connect failed after 0ms", "a different line"]
    clock.t = 40.0
    logger.warning("127.0.0.1:9092/1: Connect failed after 7ms")
    assert cap.lines[-1] == "127.0.0.1:9092/1: Connect failed after 7ms (49 similar lines held back in the last 40s)"
    clock.t = 41.0
    logger.error("127.0.0.1:9092/1: Connect failed after 7ms")  # another level is another line
    assert len(cap.lines) == 4


def test_memory_is_bounded() -> None:
    f = RepeatFilter(30.0, clock=Clock(), keys=8)
    logger, cap = logger_with("test.lograte.bounded", f)
    for i in range(100):
        logger.warning("line %s", chr(65 + i % 26) * (i + 1))
    assert len(cap.lines) == 100 and len(f._seen) <= 8


def _consume_nowhere(logger: logging.Logger, seconds: float) -> None:
    conf = consumer_config(KafkaConnection.plain(f"127.0.0.1:{free_port()}"), "lograte", logger=logger, debug="broker")
    consumer = Consumer(conf)
    consumer.subscribe(["nothing"])
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        consumer.poll(0.2)
    consumer.close()


def test_an_unreachable_broker_prints_a_few_lines_not_hundreds() -> None:
    """The same client against a closed port, with the product's logger and with a bare one."""
    bare, raw = logger_with("test.lograte.bare")
    _consume_nowhere(bare, 3.0)
    assert LIBRDKAFKA_LOG.filters, "the product's librdkafka logger has no rate limit"
    handler = Capture()
    LIBRDKAFKA_LOG.addHandler(handler)
    level = LIBRDKAFKA_LOG.level
    LIBRDKAFKA_LOG.setLevel(logging.DEBUG)
    try:
        _consume_nowhere(LIBRDKAFKA_LOG, 3.0)
    finally:
        LIBRDKAFKA_LOG.removeHandler(handler)
        LIBRDKAFKA_LOG.setLevel(level)
    assert len(raw.lines) > 30, raw.lines[:5]
    assert 0 < len(handler.lines) < len(raw.lines) / 3, (len(handler.lines), len(raw.lines))
