"""The ceiling: a plain confluent-kafka consume -> produce of the same bytes, no parsing, at least once.

    python -m bench.passthrough --bootstrap HOST:PORT --topic-prefix P [--group G]

Reads ``{P}activityRelations`` in a consumer group and writes every message's key and value unchanged
to ``{P}activityRelations_passthrough`` (partitioned by key like the router), batch by batch: consume up
to 5000, produce, flush, commit the offsets asynchronously. SIGTERM/SIGINT finish the batch and exit.
"""

from __future__ import annotations

import argparse
import signal

from confluent_kafka import Consumer, Producer

SOURCE = "activityRelations"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic-prefix", default="")
    parser.add_argument("--group", default="bench-passthrough")
    parser.add_argument("--batch-size", type=int, default=5000)
    args = parser.parse_args(argv)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.max.bytes": 52428800,
            "max.partition.fetch.bytes": 10485760,
        }
    )
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "enable.idempotence": True,
            "linger.ms": 5,
            "batch.size": 1048576,
            "compression.type": "none",
            "partitioner": "murmur2_random",
        }
    )
    out = f"{args.topic_prefix}{SOURCE}_passthrough"
    consumer.subscribe([f"{args.topic_prefix}{SOURCE}"])
    try:
        while not stopping:
            msgs = consumer.consume(args.batch_size, timeout=0.5)
            if not msgs:
                continue
            for m in msgs:
                if m.error() is None:
                    producer.produce(out, m.value(), m.key())
            producer.flush()
            consumer.commit(asynchronous=True)
    finally:
        producer.flush(10)
        consumer.close()


if __name__ == "__main__":
    main()
