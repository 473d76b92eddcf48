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
        r = Resolver(wh)
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

        # The same delete again (a redelivery, a replay) is not a dead letter: an activity's is applied again with
        # the same version (the index keeps the newest live version), a member's finds only the delete once the
        # table has merged.
        r.apply([Item("resolve", "resolve", inspect("resolve", gone), 6, gone)], dlq)
        m_gone = msg("delete", {"id": "m1"}, ts="2025-05-01T00:00:00Z")
        r.apply([Item("members", "members", inspect("members", m_gone), 7, m_gone)], dlq)
        wh.command("OPTIMIZE TABLE members FINAL")
        r.apply([Item("members", "members", inspect("members", m_gone), 8, m_gone)], dlq)
        assert dead == [(TOAST_UNRESOLVED, 1), (DELETE_UNRESOLVED, 5)]
        assert (s.deletes_resolved, s.deletes_repeated, s.deletes_unresolved) == (3, 1, 1)
        assert wh.rows("SELECT count() FROM members FINAL") == [(0,)]

        # the counters reach the loader's metrics
        from types import SimpleNamespace

        from prometheus_client import generate_latest

        from stream.loader import LoaderStats
        from stream.metrics import registry_for

        text = generate_latest(registry_for(loader=SimpleNamespace(stats=LoaderStats(cdc=s)))).decode()
        assert "bucketer_toast_resolved_total 2.0" in text
        assert "bucketer_key_only_deletes_unresolved_total 1.0" in text
        assert "bucketer_key_only_deletes_repeated_total 1.0" in text
        assert "bucketer_empty_changes_retirements_total 1.0" in text


def test_after_a_rebucket_the_index_points_at_the_new_buckets_and_follows_new_rows(tmp_path: Path) -> None:
    """A rebucket replaces the raw tables: the activity index must then name M's buckets, keep indexing what lands
    in the replaced tables (a view left on a renamed-away table no longer fires), and a key-only delete must
    retire the row where it now is. Both strategies go through ensure_schema's change of N; this is the cutover."""
    from stream.enrich import Enricher
    from stream.rebucket import rebucket

    dead: list[tuple[str, Any]] = []
    ts = "2025-01-01T00:00:00Z"

    def act(i: int, seg: str) -> dict[str, Any]:
        return {
            "activityId": f"a{i}",
            "memberId": "m1",
            "platform": "github",
            "segmentId": seg,
            "sourceId": f"x{i}",
            "type": "t",
            "channel": "c",
            "createdAt": ts,
            "updatedAt": ts,
            "timestamp": ts,
            "username": "u",
        }

    segments = [f"seg-{k}" for k in range(40)]
    data = tmp_path / "wh"
    with open_warehouse(data) as wh:
        ensure_schema(wh, N)
        for i, seg in enumerate(segments):
            load(wh, raw_table(bucket_of(seg, N)), "activityRelations", msg("insert", act(i, seg)))
    enricher = Enricher(lambda: open_warehouse(data), lock_dir=tmp_path / "locks")
    with open_warehouse(data) as wh:
        rebucket(wh, 2 * N, enricher)
        m = 2 * N
        # a row landing after the rebucket, in a bucket that existed before it (its table was replaced)
        late_seg = next(s for s in (f"late-{k}" for k in range(100)) if bucket_of(s, m) < N)
        load(wh, raw_table(bucket_of(late_seg, m)), "activityRelations", msg("insert", act(99, late_seg)))
        index = {
            a: (seg, b)
            for a, seg, b in wh.rows(
                "SELECT activityId, segmentId, _bucket FROM bucketer_activity_index FINAL WHERE _deleted = 0"
            )
        }
        assert len(index) == len(segments) + 1 and "a99" in index
        assert all(bucket_of(seg, m) == b for seg, b in index.values())

        r = Resolver(wh)
        gone = [msg("delete", {"activityId": a}, ts="2025-05-01T00:00:00Z") for a in ("a0", "a99")]
        r.apply(
            [Item("resolve", "resolve", inspect("resolve", v), i, v) for i, v in enumerate(gone)],
            lambda *a: dead.append(a),
        )
        assert dead == []
        live = {str(a) for n in range(m) for (a,) in wh.rows(f"SELECT activityId FROM {raw_table(n)} FINAL")}
        assert live == {f"a{i}" for i in range(1, len(segments))}
