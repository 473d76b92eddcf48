"""Small synthetic Sequin messages for the router tests, each with where it must end up.

``scenario(seed, n_activities, buckets)`` returns a list of ``Sent``: the key and value to produce
on the source topic, and the expectation written from the test's point of view (the bucket of the
row, the old row's bucket for a retirement, the DLQ class for bad input). Expectations use
``bucket_of``, which tests/unit/test_buckets.py checks against ClickHouse's own values.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

import orjson

from stream.buckets import bucket_of


@dataclass(frozen=True)
class Sent:
    key: bytes | None
    value: bytes | None
    bucket: int | None = None  # where the original bytes must land
    dlq: str | None = None  # or the DLQ error class
    retire_bucket: int | None = None  # where the retirement of the old row must land
    retire_segment: str | None = None


def ts(rng: random.Random, year: int = 2025) -> str:
    return (
        f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
        f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}.{rng.randint(0, 999999):06d}Z"
    )


def row(rng: random.Random, activity_id: str, segment: str) -> dict[str, object]:
    return {
        "activityId": activity_id,
        "conversationId": None,
        "createdAt": ts(rng, 2024),
        "updatedAt": ts(rng),
        "memberId": str(uuid.UUID(int=rng.getrandbits(128))),
        "objectMemberId": None,
        "organizationId": str(uuid.UUID(int=rng.getrandbits(128))),
        "parentId": None,
        "platform": rng.choice(["github", "git", "gerrit", "slack"]),
        "segmentId": segment,
        "username": f"user{rng.randint(1, 500)}",
        "sourceId": uuid.UUID(int=rng.getrandbits(128)).hex,
        "type": rng.choice(["authored-commit", "issue-comment", "pull_request-opened"]),
        "timestamp": rng.choice([ts(rng), rng.randint(1_600_000_000_000_000, 1_750_000_000_000_000)]),
        "channel": f"https://github.com/acme/repo{rng.randint(1, 40)}",
        "gitInsertions": rng.randint(0, 90),
        "gitDeletions": rng.randint(0, 40),
        "sentimentScore": None,
        "score": 2,
        "isContribution": True,
        "pad": "x" * rng.randint(200, 600),
    }


def message(action: str, record: object, changes: object = None, **extra: object) -> bytes:
    meta = {
        "table_schema": "public",
        "table_name": "activityRelations",
        "commit_timestamp": "2025-05-01T12:00:03.121004Z",
        "commit_lsn": 88120311,
        "commit_idx": 4,
    }
    return orjson.dumps({"action": action, "changes": changes, "record": record, "metadata": meta, **extra})


def bad_messages(rng: random.Random, segments: list[str]) -> list[Sent]:
    """One or more messages of every bad class."""

    def rec(**over: object) -> dict[str, object]:
        r = row(rng, uuid.uuid4().hex, rng.choice(segments))
        r.update(over)
        return r

    def without(col: str) -> dict[str, object]:
        r = rec()
        del r[col]
        return r

    k = b"bad-key"
    return [
        Sent(k, b"{not json", dlq="not_json"),
        Sent(k, b'{"action":"insert","record":{"segmentId":"\xff\xfe"}}', dlq="invalid_utf8"),
        Sent(k, b"[1,2,3]", dlq="not_object"),
        Sent(k, b'"just a string"', dlq="not_object"),
        Sent(k, message("insert", None), dlq="no_record"),
        Sent(k, orjson.dumps({"action": "insert"}), dlq="no_record"),
        Sent(k, message("insert", [1, 2]), dlq="record_not_object"),
        Sent(k, message("insert", without("segmentId")), dlq="missing_segment_id"),
        Sent(k, message("insert", rec(segmentId=None)), dlq="null_segment_id"),
        Sent(k, message("insert", rec(segmentId="")), dlq="empty_segment_id"),
        Sent(k, message("insert", rec(segmentId=42)), dlq="non_string_segment_id"),
        Sent(k, message("upsert", rec()), dlq="unknown_action"),
        Sent(k, orjson.dumps({"record": rec()}), dlq="unknown_action"),
        Sent(k, None, dlq="tombstone"),
        Sent(None, None, dlq="tombstone"),
        Sent(k, message("insert", rec(timestamp="yesterday")), dlq="bad_timestamp"),
        Sent(k, message("insert", rec(createdAt="2025-13-45T99:00:00Z")), dlq="bad_timestamp"),
        Sent(k, message("insert", rec(updatedAt=True)), dlq="bad_timestamp"),
        Sent(k, message("insert", without("memberId")), dlq="missing_column"),
        Sent(k, message("insert", rec(activityId=None)), dlq="missing_column"),
        Sent(k, message("insert", rec(platform=7)), dlq="bad_column"),
        Sent(k, message("update", rec(), changes=["segmentId"]), dlq="bad_changes"),
        Sent(k, message("update", rec(), changes={"segmentId": None}), dlq="bad_changes"),
    ]


def scenario(seed: int, n_activities: int, buckets: int, n_segments: int = 40) -> list[Sent]:
    """Inserts, reads, plain updates, segment moves, sort-key changes, updates without old values,
    deletes, exact duplicates and every bad class, interleaved across activities."""
    rng = random.Random(seed)
    segments = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n_segments)]
    streams: list[list[Sent]] = []
    for i in range(n_activities):
        aid = f"{seed}-{i}-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}"
        key = aid.encode()
        cur = row(rng, aid, rng.choice(segments))
        first = message(rng.choice(["insert", "insert", "read"]), cur)
        out = [Sent(key, first, bucket_of(cur["segmentId"], buckets))]
        for _ in range(rng.randint(0, 3)):
            kind = rng.random()
            new = dict(cur, updatedAt=ts(rng, 2026))
            if kind < 0.3:  # a segment move: the old bucket must forget the row
                new["segmentId"] = rng.choice(segments)
                changes = {"segmentId": cur["segmentId"], "updatedAt": cur["updatedAt"]}
                out.append(
                    Sent(
                        key,
                        message("update", new, changes),
                        bucket_of(new["segmentId"], buckets),
                        retire_bucket=bucket_of(cur["segmentId"], buckets),
                        retire_segment=cur["segmentId"],
                    )
                    if new["segmentId"] != cur["segmentId"]
                    else Sent(
                        key,
                        message("update", new, {"updatedAt": cur["updatedAt"]}),
                        bucket_of(new["segmentId"], buckets),
                    )
                )
            elif kind < 0.45:  # another sort-key column changes: retire in the same bucket
                new["type"] = cur["type"] + "-edited"
                b = bucket_of(cur["segmentId"], buckets)
                out.append(
                    Sent(
                        key,
                        message("update", new, {"type": cur["type"]}),
                        b,
                        retire_bucket=b,
                        retire_segment=cur["segmentId"],
                    )
                )
            elif kind < 0.6:  # no REPLICA IDENTITY FULL: nothing to retire, nothing guessed
                out.append(Sent(key, message("update", new, {}), bucket_of(new["segmentId"], buckets)))
            elif kind < 0.8:  # an update of a non-key column
                new["score"] = rng.randint(0, 9)
                out.append(
                    Sent(key, message("update", new, {"score": cur["score"]}), bucket_of(new["segmentId"], buckets))
                )
            else:  # an exact duplicate (Sequin is at-least-once)
                out.append(out[-1])
                new = cur
            cur = new
        if rng.random() < 0.2:
            out.append(Sent(key, message("delete", cur), bucket_of(cur["segmentId"], buckets)))
        streams.append(out)
    bad = bad_messages(rng, segments)
    streams.extend([b] for b in bad for _ in range(3))
    merged: list[Sent] = []
    while streams:  # interleave, keeping each activity's own order
        s = streams[rng.randrange(len(streams))]
        merged.append(s.pop(0))
        if not s:
            streams.remove(s)
    return merged
