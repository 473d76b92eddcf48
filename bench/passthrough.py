"""The ceiling: a plain confluent-kafka consume -> produce of the same bytes, no parsing, at least once.

    python -m bench.passthrough --bootstrap HOST:PORT --topic-prefix P [--group G] [--flush-per-batch]
                                [--until-idle SECONDS]

Reads ``{P}activityRelations`` in a consumer group and writes every message's key and value unchanged
to ``{P}activityRelations_passthrough`` (partitioned by key like the router), batch by batch (up to 5000):

- by default **pipelined**, THE ceiling: ``produce`` each message, ``poll(0)``, commit the batch's offsets
  asynchronously, and go on to the next batch without waiting for delivery; ``flush`` once at the end. This
  is what a plain at-least-once copy with confluent-kafka looks like when written for speed.
- ``--flush-per-batch``: the same, but ``flush()`` after every batch before committing (a round trip per
  batch: a lowered ceiling, kept as a second row named for what it is).

``--until-idle S`` exits once no message arrived for S seconds (after the first one), like
``bucketer route --until-idle``; SIGTERM/SIGINT finish the batch and exit.
"""

from __future__ import annotations

import argparse
import signal
import time

from confluent_kafka import Consumer, Producer

SOURCE = "activityRelations"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic-prefix", default="")
    parser.add_argument("--group", default="bench-passthrough")
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--flush-per-batch", action="store_true", help="flush after every batch (lowered ceiling)")
    parser.add_argument("--until-idle", type=float, default=None, help="exit after this many seconds without input")
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
    produce, poll = producer.produce, producer.poll
    last_input: float | None = None
    try:
        while not stopping:
            msgs = consumer.consume(args.batch_size, timeout=0.5)
            if not msgs:
                if last_input is not None and args.until_idle is not None:
                    if time.monotonic() - last_input >= args.until_idle:
                        break
                continue
            last_input = time.monotonic()
            for m in msgs:
                if m.error() is None:
                    while True:
                        try:
                            produce(out, m.value(), m.key())
                            break
                        except BufferError:  # local queue full: serve delivery reports, then retry
                            poll(0.05)
                    poll(0)
            if args.flush_per_batch:
                producer.flush()
            consumer.commit(asynchronous=True)
    finally:
        producer.flush(30)
        consumer.close()


if __name__ == "__main__":
    main()
