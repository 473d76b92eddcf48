"""The local broker is a real Apache Kafka 4.x and fit for what the pipeline needs: consumer groups,
transactions with send_offsets_to_transaction, read_committed isolation, durable data across restarts."""

from __future__ import annotations

from confluent_kafka import Consumer, Producer, TopicPartition
from kafkatools import create_topics, drain, unique, wait_until

from bucketer.localkafka import LocalKafka


def test_broker_is_kafka_4_kraft(bootstrap: str) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(timeout=10)
    assert len(md.brokers) == 1
    # KRaft clusters expose a controller; Kafka 4 removed ZooKeeper mode entirely.
    cluster = admin.describe_cluster(request_timeout=10).result(10)
    assert cluster.controller is not None


def test_produce_consume_with_consumer_group(bootstrap: str, new_topics, group: str) -> None:
    (topic,) = new_topics("pc", partitions=3)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i in range(300):
        producer.produce(topic, key=f"k{i % 17}".encode(), value=f"v{i}".encode())
    assert producer.flush(30) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    seen: list[bytes] = []
    try:

        def got_all() -> bool:
            seen.extend(m.value() for m in consumer.consume(500, timeout=0.5) if m.error() is None)
            return len(seen) >= 300

        wait_until(got_all, 60, "300 messages through a consumer group")
        consumer.commit(asynchronous=False)
        committed = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    finally:
        consumer.close()
    assert sorted(seen) == sorted(f"v{i}".encode() for i in range(300))
    assert sum(tp.offset for tp in committed) == 300

    # Same key, same partition, order kept.
    msgs = drain(bootstrap, [topic], expected=300)
    by_key: dict[bytes, set[int]] = {}
    for m in msgs:
        by_key.setdefault(m.key(), set()).add(m.partition())
    assert all(len(parts) == 1 for parts in by_key.values())


def test_transactions_send_offsets_and_read_committed(bootstrap: str, new_topics, group: str) -> None:
    src, dst = new_topics("txsrc", "txdst")
    seed = Producer({"bootstrap.servers": bootstrap})
    for i in range(50):
        seed.produce(src, value=f"m{i}".encode())
    assert seed.flush(30) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([src])
    tx = Producer({"bootstrap.servers": bootstrap, "transactional.id": unique("tx")})
    tx.init_transactions(30)
    try:
        batch: list = []
        wait_until(
            lambda: batch.extend(m for m in consumer.consume(100, 0.5) if m.error() is None) or len(batch) >= 50,
            60,
            "50 source messages",
        )
        # An aborted transaction leaves nothing visible to read_committed readers.
        tx.begin_transaction()
        for m in batch[:10]:
            tx.produce(dst, value=b"aborted-" + m.value())
        assert tx.flush(30) == 0  # really written to the log, then aborted (not just purged locally)
        tx.abort_transaction(30)
        # A committed one makes its output and its consumed offsets visible atomically.
        tx.begin_transaction()
        for m in batch:
            tx.produce(dst, value=b"copied-" + m.value())
        tx.send_offsets_to_transaction(consumer.position(consumer.assignment()), consumer.consumer_group_metadata(), 30)
        tx.commit_transaction(30)
        committed = consumer.committed([TopicPartition(src, 0)], timeout=10)
    finally:
        consumer.close()
    assert committed[0].offset == 50

    visible = drain(bootstrap, [dst], expected=50)
    assert sorted(m.value() for m in visible) == sorted(b"copied-m%d" % i for i in range(50))
    everything = drain(bootstrap, [dst], isolation="read_uncommitted", idle=2)
    assert sum(m.value().startswith(b"aborted-") for m in everything) == 10


def test_data_survives_stop_and_start(own_broker: LocalKafka) -> None:
    bootstrap = own_broker.bootstrap
    topic = unique("durable")
    create_topics(bootstrap, [topic])
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for i in range(100):
        p.produce(topic, value=f"d{i}".encode())
    assert p.flush(30) == 0

    pid_before = own_broker.status().pid
    assert own_broker.stop() is True
    assert own_broker.status().running is False
    assert own_broker.start() == bootstrap
    assert own_broker.status().pid != pid_before

    msgs = drain(bootstrap, [topic], expected=100, timeout=60)
    assert sorted(m.value() for m in msgs) == sorted(f"d{i}".encode() for i in range(100))
