"""stream/cdc.py on the real embedded warehouse (chdb): "unchanged_toast" in members.attributes and in an activity
column takes the stored value, a key-only activity delete retires the stored row in its bucket, an update without
old values that moved the activity retires the old row, and an absent stored row goes to the DLQ with its class.
(Not yet through Kafka: the router/loader path is covered only by the unit tests of the decoder and loader.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from connectors.warehouse import open_warehouse
from stream.buckets import bucket_of, raw_table
from stream.cdc import DELETE_UNRESOLVED, TOAST_UNRESOLVED, Item, Resolver, inspect
from stream.row_sql import insert_sql
from stream.schema import ensure_schema

N = 4


def msg(action: str, rec: dict[str, Any], changes: Any = None, ts: str = "2025-06-01T00:00:00.000000Z") -> bytes:
    return orjson.dumps({"action": action, "record": rec, "changes": changes, "metadata": {"commit_timestamp": ts}})


def load(wh: Any, table: str, kind: str, value: bytes) -> None:
    cols, sel = insert_sql(kind)
    wh.insert_json(f"{table} ({cols})", sel, [value])


def test_toast_key_only_delete_and_empty_changes_resolve_against_the_warehouse(tmp_path: Path) -> None:
    dead: list[tuple[str, Any]] = []

    def dlq(cls: str, reason: str, origin: Any, value: bytes) -> None:
        dead.append((cls, origin))

    with open_warehouse(tmp_path) as wh:
        ensure_schema(wh, N)
        r = Resolver(wh, N)
        ts = "2025-01-01T00:00:00Z"
        load(
            wh,
            "members",
            "members",
            msg(
                "insert",
                {
                    "id": "m1",
                    "attributes": {"isBot": {"default": True}},
                    "displayName": "Bot",
                    "updatedAt": ts,
                    "createdAt": ts,
                    "joinedAt": ts,
                },
            ),
        )
        toast = msg(
            "update",
            {
                "id": "m1",
                "attributes": "unchanged_toast",
                "displayName": "Bot2",
                "updatedAt": "2025-02-01T00:00:00Z",
                "createdAt": ts,
                "joinedAt": ts,
            },
            {},
        )
        orphan = msg("update", {"id": "m9", "attributes": "unchanged_toast", "updatedAt": "2025-02-01T00:00:00Z"}, {})
        r.apply([Item("members", "members", inspect("members", v), i, v) for i, v in enumerate([toast, orphan])], dlq)
        assert wh.rows("SELECT id, attributes, isBot, displayName FROM members FINAL") == [
            ("m1", '{"isBot":{"default":true}}', 1, "Bot2")
        ]
        assert dead == [(TOAST_UNRESOLVED, 1)]

        rec = {
            "activityId": "a1",
            "memberId": "m1",
            "platform": "github",
            "segmentId": "s1",
            "sourceId": "x",
            "type": "t",
            "channel": "https://c/long",
            "createdAt": ts,
            "updatedAt": ts,
            "timestamp": ts,
            "username": "u",
        }
        b1, b2 = bucket_of("s1", N), bucket_of("s2", N)
        assert b1 != b2
        load(wh, raw_table(b1), "activityRelations", msg("insert", rec))
        t = msg("update", {**rec, "channel": "unchanged_toast", "username": "v", "updatedAt": "2025-03-01T00:00:00Z"})
        r.apply([Item(raw_table(b1), "activityRelations", inspect("activityRelations", t), 2, t)], dlq)
        assert wh.rows(f"SELECT channel, username FROM {raw_table(b1)} FINAL") == [("https://c/long", "v")]

        moved = msg("update", {**rec, "segmentId": "s2", "updatedAt": "2025-04-01T00:00:00Z"}, {})
        load(wh, raw_table(b2), "activityRelations", moved)
        r.apply([Item("resolve", "resolve", inspect("resolve", moved), 3, moved)], dlq)
        assert wh.rows(f"SELECT count() FROM {raw_table(b1)} FINAL") == [(0,)]
        assert wh.rows(f"SELECT segmentId, channel FROM {raw_table(b2)} FINAL") == [("s2", "https://c/long")]

        gone = msg("delete", {"activityId": "a1", "segmentId": None}, ts="2025-05-01T00:00:00Z")
        never = msg("delete", {"activityId": "zz"}, ts="2025-05-01T00:00:00Z")
        r.apply([Item("resolve", "resolve", inspect("resolve", v), 4 + i, v) for i, v in enumerate([gone, never])], dlq)
        assert sum(wh.rows(f"SELECT count() FROM {raw_table(n)} FINAL")[0][0] for n in range(N)) == 0
        assert wh.rows(f"SELECT segmentId, channel, _deleted FROM {raw_table(b2)} ORDER BY _version DESC LIMIT 1") == [
            ("s2", "https://c/long", 1)
        ]
        assert dead == [(TOAST_UNRESOLVED, 1), (DELETE_UNRESOLVED, 5)]
        s = r.stats
        assert (s.toast_resolved, s.toast_unresolved, s.deletes_resolved, s.deletes_unresolved) == (2, 1, 1, 1)
        assert (s.empty_changes_checked, s.empty_changes_retired) == (1, 1)

        # the counters reach the loader's metrics
        from types import SimpleNamespace

        from prometheus_client import generate_latest

        from stream.loader import LoaderStats
        from stream.metrics import registry_for

        text = generate_latest(registry_for(loader=SimpleNamespace(stats=LoaderStats(cdc=s)))).decode()
        assert "bucketer_toast_resolved_total 2.0" in text
        assert "bucketer_key_only_deletes_unresolved_total 1.0" in text
        assert "bucketer_empty_changes_retirements_total 1.0" in text
