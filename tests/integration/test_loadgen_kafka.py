"""The load generator against a real broker: every generated message lands on its topic, in key order."""

from __future__ import annotations

from collections import Counter, defaultdict

from kafkatools import drain, unique
from typer.testing import CliRunner

from bucketer.cli import app
from connectors.kafka_conn import KafkaConnection
from connectors.topics import REFERENCE_TABLES, SOURCE
from stream.loadgen import LoadgenConfig, generate
from stream.loadgen_producer import LoadProducer, ProducerSettings, ensure_topics


def test_produced_messages_equal_the_generated_ones(bootstrap: str) -> None:
    prefix = unique("lg") + "."
    config = LoadgenConfig(count=1500, seed=5, segments=20, bad_fraction=0.03)
    settings = ProducerSettings(kafka=KafkaConnection.plain(bootstrap), topic_prefix=prefix, partitions=3)
    topics = ensure_topics(settings)
    assert ensure_topics(settings) == topics  # idempotent
    with LoadProducer(settings) as producer:
        summary = producer.run(config)
    expected = list(generate(config))
    got = drain(bootstrap, topics, expected=len(expected), timeout=60)
    assert summary.total == len(expected) == len(got)
    assert Counter((m.topic(), m.key(), m.value()) for m in got) == Counter((prefix + t, k, v) for t, k, v in expected)
    # per key, the order of the changes is kept (same key -> same partition)
    want: dict[tuple[str, bytes], list[bytes | None]] = defaultdict(list)
    for t, k, v in expected:
        want[(prefix + t, k)].append(v)
    seen: dict[tuple[str, bytes], list[bytes | None]] = defaultdict(list)
    for m in sorted(got, key=lambda m: (m.topic(), m.partition(), m.offset())):
        seen[(m.topic(), m.key())].append(m.value())
    assert seen == want


def test_cli_creates_topics_produces_and_summarises(bootstrap: str) -> None:
    prefix = unique("lgcli") + "."
    result = CliRunner().invoke(
        app,
        [
            "loadgen",
            "--bootstrap",
            bootstrap,
            "--count",
            "300",
            "--seed",
            "9",
            "--bad-fraction",
            "0.1",
            "--topic-prefix",
            prefix,
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.output.splitlines() if ": " in line)
    assert lines[f"topic {prefix}{SOURCE}"] == "300"
    total = sum(int(lines[f"topic {prefix}{t}"]) for t in (SOURCE, *REFERENCE_TABLES))
    assert lines["total"].startswith(f"{total} messages")
    got = drain(bootstrap, [prefix + t for t in (SOURCE, *REFERENCE_TABLES)], expected=total, timeout=60)
    assert len(got) == total
    bad = int(lines["bad"].split()[0])
    assert 10 <= bad <= 55


def test_cli_fails_with_one_line_on_unreachable_broker() -> None:
    result = CliRunner().invoke(
        app, ["loadgen", "--bootstrap", "127.0.0.1:1", "--count", "5", "--quiet", "--timeout", "3"]
    )
    assert result.exit_code != 0
    assert "bucketer:" in result.output and "127.0.0.1:1" in result.output
