"""A router process for the crash test: routes to a Tinybird stand-in and dies (os._exit) right after
the N-th acknowledged request, i.e. between a send and the commit of its offsets.

usage: python tinybird_router_child.py BOOTSTRAP PREFIX GROUP URL BUCKETS CRASH_AFTER   (token on stdin)
"""

from __future__ import annotations

import os
import sys
import threading

from connectors.kafka_conn import KafkaConnection
from connectors.tinybird import TinybirdSettings
from connectors.tinybird_api import Secret, TinybirdClient
from stream.router import Router, RouterConfig


def main() -> None:
    bootstrap, prefix, group, url, buckets, crash_after = sys.argv[1:7]
    token = Secret(sys.stdin.readline().strip())
    acked = [0]
    lock = threading.Lock()
    original = TinybirdClient.post_events

    def post_events(self: TinybirdClient, datasource: str, body: bytes, gzipped: bool = False):  # type: ignore[no-untyped-def]
        result = original(self, datasource, body, gzipped)
        with lock:
            acked[0] += 1
            if acked[0] >= int(crash_after):
                print(f"crashing after {acked[0]} acknowledged requests", flush=True)
                os._exit(9)
        return result

    TinybirdClient.post_events = post_events  # type: ignore[method-assign]
    tb = TinybirdSettings(url=url, token=token, linger=0.05, max_batch_bytes=20_000)
    config = RouterConfig(
        kafka=KafkaConnection.plain(bootstrap),
        buckets=int(buckets),
        group=group,
        topic_prefix=prefix,
        sink="tinybird",
        tinybird=tb,
        batch_size=100,
        batch_time=0.2,
        until_idle=30,
        exactly_once=False,
        instance_id="crash-child",
    )
    Router(config).run()
    print("router ended without crashing", flush=True)


if __name__ == "__main__":
    main()
