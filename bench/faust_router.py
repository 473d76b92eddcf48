"""The routing job written with faust-streaming: the baseline a user of that framework would write.

Run as a worker process (the benchmark starts it, waits for its output, then sends SIGTERM)::

    python -m bench.faust_router --bootstrap 127.0.0.1:9092 --buckets 10 [--topic-prefix p.] [--exactly-once]

What it does, per message of ``{prefix}activityRelations``: decode and validate the Sequin JSON with the
project's own decoder (``connectors.sequin.decode``, so both contenders do the same per-message work and
only the framework differs; a minimal orjson check stands in when that module is absent), then send the
**original key and value bytes** to ``{prefix}activityRelations_bucket_{bucket_of(segmentId, N)}``, the
router-made retirement (if any) to the old row's bucket, and bad input to ``{prefix}activityRelations_dlq``
with the error class in a header.

Fair, not a strawman: raw key/value serializers (no re-encoding), ``await topic.send()`` which only
appends to aiokafka's batch (delivery is awaited by Faust's commit, not per message), larger fetch and
producer batches than the defaults, no web server, no leader topic, an in-memory store (no tables, so no
changelogs). Our broker has ``auto.create.topics.enable=false``; the benchmark creates the source topic
and this app declares its sink topics at start-up (``topic_allow_declare``), so no topic is ever
auto-created. ``--exactly-once`` sets Faust's ``processing_guarantee="exactly_once"`` (aiokafka
transactions, one transactional producer per assigned source partition).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile

import faust
import orjson

from stream.buckets import bucket_of

SOURCE = "activityRelations"

try:  # the same decoder as the bucketer router, when present
    from connectors.sequin import BadMessage, decode

    DECODER = "connectors.sequin.decode"
except ImportError:  # pragma: no cover - only before the router's decoder exists
    DECODER = "minimal orjson check"

    class BadMessage(ValueError):  # type: ignore[no-redef]
        def __init__(self, error_class: str, detail: str) -> None:
            super().__init__(f"{error_class}: {detail}")
            self.error_class = error_class
            self.detail = detail

    class _Change:
        __slots__ = ("segment_id", "retirement")

        def __init__(self, segment_id: str) -> None:
            self.segment_id = segment_id
            self.retirement = None

    def decode(value, topic="", partition=-1, offset=-1):  # type: ignore[no-redef]
        if value is None:
            raise BadMessage("tombstone", "null value")
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise BadMessage("not_json", str(exc)[:80]) from None
        if not isinstance(doc, dict):
            raise BadMessage("not_object", type(doc).__name__)
        if doc.get("action") not in ("insert", "update", "delete", "read"):
            raise BadMessage("unknown_action", repr(doc.get("action"))[:40])
        record = doc.get("record")
        if not isinstance(record, dict):
            raise BadMessage("no_record", "record is not an object")
        sid = record.get("segmentId")
        if not isinstance(sid, str) or not sid:
            raise BadMessage("missing_segment_id", repr(sid)[:40])
        return _Change(sid)


def build_app(
    bootstrap: str,
    buckets: int,
    prefix: str = "",
    exactly_once: bool = False,
    app_id: str = "faust-router",
    partitions: int = 3,
    datadir: str | None = None,
    linger: float = 0.1,
) -> faust.App:
    """A Faust app with one agent routing ``{prefix}activityRelations`` into ``buckets`` topics."""
    app = faust.App(
        f"{prefix}{app_id}",
        broker=f"kafka://{bootstrap}",
        key_serializer="raw",
        value_serializer="raw",
        store="memory://",
        datadir=datadir or tempfile.mkdtemp(prefix="faust-router-"),  # not the current directory
        web_enabled=False,
        topic_disable_leader=True,  # no {app_id}-__assignor-__leader topic
        topic_allow_declare=True,  # declare the sink topics explicitly (no auto-create on the broker)
        topic_partitions=partitions,
        topic_replication_factor=1,
        processing_guarantee="exactly_once" if exactly_once else "at_least_once",
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=5000,  # default 500
        stream_buffer_maxsize=16384,  # default 4096
        producer_linger=linger,  # default 0: one produce request per message
        producer_max_batch_size=1048576,  # default 16 KiB: 16 one-KB messages per batch
        producer_acks=-1,  # like the router: all in-sync replicas
        broker_commit_every=10000,
        broker_commit_interval=1.0,
    )
    source = app.topic(
        f"{prefix}{SOURCE}", key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    sinks = [
        app.topic(f"{prefix}{SOURCE}_bucket_{n}", key_serializer="raw", value_serializer="raw", partitions=partitions)
        for n in range(buckets)
    ]
    dlq = app.topic(f"{prefix}{SOURCE}_dlq", key_serializer="raw", value_serializer="raw", partitions=partitions)

    @app.agent(source)
    async def route(stream: faust.StreamT) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                change = decode(event.value, msg.topic, msg.partition, msg.offset)
            except BadMessage as bad:
                await dlq.send(
                    key=event.key,
                    value=event.value or b"",
                    headers={
                        "bucketer-error-class": bad.error_class.encode(),
                        "bucketer-error-detail": bad.detail.encode("utf-8", "replace"),
                        "bucketer-source-topic": msg.topic.encode(),
                        "bucketer-source-partition": str(msg.partition).encode(),
                        "bucketer-source-offset": str(msg.offset).encode(),
                    },
                )
                continue
            await sinks[bucket_of(change.segment_id, buckets)].send(key=event.key, value=event.value)
            if change.retirement is not None:
                ret = change.retirement
                await sinks[bucket_of(ret.segment_id, buckets)].send(
                    key=event.key, value=ret.value, headers={"bucketer-derived": b"retirement"}
                )

    @app.task
    async def quiet_root_logger() -> None:
        # mode leaves the root logger at DEBUG and filters in the handler, so every send builds a
        # LogRecord (aiokafka and faust log each message at debug): ~10% of the CPU. Not the framework's
        # inherent cost, so the baseline does not pay it.
        logging.getLogger().setLevel(logging.WARNING)

    @app.task
    async def declare_sinks() -> None:
        for topic in [*sinks, dlq]:
            await topic.maybe_declare()

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--buckets", type=int, default=10)
    parser.add_argument("--topic-prefix", default="")
    parser.add_argument("--partitions", type=int, default=3, help="partitions of the sink topics it declares")
    parser.add_argument("--exactly-once", action="store_true")
    parser.add_argument("--linger", type=float, default=0.1, help="producer linger, seconds (Faust's default: 0)")
    parser.add_argument("--loglevel", default="warn", choices=("crit", "error", "warn", "info", "debug"))
    args = parser.parse_args(argv)
    app = build_app(
        args.bootstrap,
        args.buckets,
        args.topic_prefix,
        args.exactly_once,
        partitions=args.partitions,
        linger=args.linger,
    )
    print(
        f"faust-router: decoder={DECODER} buckets={args.buckets} "
        f"guarantee={'exactly_once' if args.exactly_once else 'at_least_once'}",
        file=sys.stderr,
        flush=True,
    )
    # Faust's own entry point: ``worker`` handles SIGTERM/SIGINT (graceful stop) itself.
    sys.argv = [sys.argv[0], "worker", "--without-web", "--loglevel", args.loglevel]
    app.main()


if __name__ == "__main__":
    main()
