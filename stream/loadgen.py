"""Synthetic Sequin change messages for the six topics, deterministic per seed (pure: no I/O, no clock).

Contract:
- ``generate(config)`` yields ``Generated(topic, key, value)``: ``topic`` is the table name (the topic
  without prefix), ``key`` the primary key as UTF-8 text bytes (``None`` never, ``b""`` possible), ``value``
  the Sequin JSON bytes (``None`` for a tombstone). Same config, same bytes, in the same order.
- Reference records come first (integrations, insightsProjects, repositories, members, organizations,
  with their own updates and deletes), then exactly ``config.count`` messages on ``activityRelations``
  (bad ones and duplicate deliveries included).
- Nothing here reads the wall clock: commit timestamps are a fixed epoch plus a per-message step.
- ``LoadGenerator.summary`` counts what was generated: per topic, per action, bad (by kind), duplicates.

The content exercises the cleaning rules of CLEANED_BUCKETS.md: Zipf-skewed segment sizes, projects
enabled/disabled/deleted, repositories enabled/disabled/deleted/excluded/archived, gerrit repositories
(``/q/project:`` channels too), mixed-case channels, bots, team and organization members, unknown members,
messy organization locations; and the change patterns of SEQUIN.md: updates, deletes, segment moves,
timestamp changes, backfill reads and duplicate deliveries.
"""

from __future__ import annotations

import base64
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import orjson

from connectors.model import GIT_PLATFORMS
from connectors.topics import SOURCE
from stream.loadgen_model import EPOCH, ReferenceModel, build_reference_model, new_uuid, ts

ACTIVITY_TOPIC = SOURCE
OTHER_PLATFORMS = (
    ("slack", "message"),
    ("discord", "message"),
    ("discourse", "create_topic"),
    ("jira", "issue-created"),
    ("confluence", "page-created"),
    ("linkedin", "reaction"),
    ("groupsio", "message"),
    ("stackoverflow", "question"),
)
GIT_TYPES = {
    "git": ("authored-commit", "committed-commit", "co-authored-commit"),
    "github": ("pull_request-opened", "pull_request-merged", "issues-opened", "authored-commit"),
    "gitlab": ("merge_request-opened", "merge_request-merged", "authored-commit"),
    "gerrit": ("changeset-created", "changeset-merged", "patchset_approval-created"),
}
REVIEW_STATES = ("APPROVED", "CHANGES_REQUESTED", "COMMENTED", "")
BAD_KINDS = (
    "not_json",
    "invalid_utf8",
    "missing_segment_id",
    "null_segment_id",
    "tombstone",
    "bad_timestamp",
    "not_object",
    "no_record",
    "unknown_action",
    "truncated",
)
# The DLQ class the router gives each kind (connectors/sequin.py ERROR_CLASSES): the summary counts by class, so
# loadgen's figures and the router's dead-letter counters use one vocabulary. A truncated value is not JSON.
DLQ_CLASS = {"truncated": "not_json"}

MAX_TRACKED = 20_000  # live rows kept as candidates for updates, moves and deletes
# Shares of the activityRelations stream (the rest are inserts). Applied to the good messages.
MIX = (
    ("read", 0.10),
    ("update", 0.10),
    ("segment_move", 0.03),
    ("timestamp_change", 0.03),
    ("sort_key_change", 0.01),
    ("delete", 0.04),
    ("duplicate", 0.05),
)


class Generated(NamedTuple):
    topic: str
    key: bytes
    value: bytes | None


@dataclass(frozen=True)
class LoadgenConfig:
    count: int
    seed: int = 1
    segments: int = 60
    bad_fraction: float = 0.01
    members: int | None = None  # default: scales with count
    organizations: int | None = None  # default: scales with count

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if self.segments < 1:
            raise ValueError(f"segments must be >= 1, got {self.segments}")
        if not 0.0 <= self.bad_fraction <= 1.0:
            raise ValueError(f"bad fraction must be within [0, 1], got {self.bad_fraction}")


@dataclass
class Summary:
    per_topic: Counter[str] = field(default_factory=Counter)
    per_action: Counter[str] = field(default_factory=Counter)
    bad: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    bytes: int = 0

    @property
    def total(self) -> int:
        return sum(self.per_topic.values())

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())


class LoadGenerator:
    """Iterate once for the messages; ``total`` is known before, ``summary`` fills while iterating."""

    def __init__(self, config: LoadgenConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.summary = Summary()
        self._lsn = 88_000_000
        self._tick = 0
        self.model: ReferenceModel = build_reference_model(self)

    @property
    def total(self) -> int:
        return len(self.model.messages) + self.config.count

    # --- metadata -------------------------------------------------------------------------------------
    def now(self) -> datetime:
        self._tick += 1
        return EPOCH + timedelta(milliseconds=37 * self._tick, microseconds=self._tick % 997)

    def metadata(self, table: str, pk: str, moment: datetime, read: bool) -> dict[str, Any]:
        if read:
            lsn, idx = None, None
            idem = base64.b64encode(f"read:{table}:{pk}:{self._tick}".encode()).decode()
        else:
            self._lsn += self.rng.randint(1, 400)
            lsn, idx = self._lsn, self.rng.randint(0, 7)
            idem = base64.b64encode(f"{lsn}:{idx}".encode()).decode()
        return {
            "table_schema": "public",
            "table_name": table,
            "commit_timestamp": ts(moment),
            "commit_lsn": lsn,
            "commit_idx": idx,
            "idempotency_key": idem,
            "record_pks": [pk],
            "consumer": {"id": "7f1c9a52-4d1e-4a4f-9d0b-3c1a52e0b6aa", "name": "crowd-kafka-sink", "annotations": {}},
            "database": {
                "id": "0c3e8a44-9e7e-4f8e-a2b7-5d2b9e1f0c11",
                "name": "crowd-production",
                "hostname": "db.internal.example",
                "database": "crowd",
                "annotations": {},
            },
            "transaction_annotations": None,
            "enrichment": None,
            "database_name": "crowd-production",
        }

    def encode(
        self,
        table: str,
        action: str,
        record: dict[str, Any],
        changes: dict[str, Any] | None,
        pk: str,
        moment: datetime | None = None,
    ) -> bytes:
        moment = moment or self.now()
        msg = {
            "action": action,
            "changes": changes,
            "record": record,
            "metadata": self.metadata(table, pk, moment, read=action == "read"),
        }
        return orjson.dumps(msg)

    def emit(self, topic: str, key: str | bytes, value: bytes | None, action: str) -> Generated:
        kb = key.encode() if isinstance(key, str) else key
        self.summary.per_topic[topic] += 1
        self.summary.per_action[action] += 1
        self.summary.duplicates += action == "duplicate"
        self.summary.bytes += len(kb) + len(value or b"")
        return Generated(topic, kb, value)

    # --- the stream -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Generated]:
        for topic, key, value, action in self.model.messages:
            yield self.emit(topic, key, value, action)
        yield from ActivityStream(self).run()


def generate(config: LoadgenConfig) -> Iterator[Generated]:
    """The messages of ``config``: the reference records, then ``config.count`` activity messages."""
    return iter(LoadGenerator(config))


class ActivityStream:
    """The activityRelations part: inserts, reads, updates, moves, deletes, duplicates, bad messages."""

    def __init__(self, gen: LoadGenerator) -> None:
        self.gen = gen
        self.rng = gen.rng
        self.model = gen.model
        self.live: list[dict[str, Any]] = []  # current rows, in creation order
        self.index: dict[str, int] = {}  # activityId -> position in live
        self.recent: list[tuple[bytes, bytes]] = []  # (key, value) of recent good messages, for duplicates

    def run(self) -> Iterator[Generated]:
        cfg = self.gen.config
        kinds = [k for k, _ in MIX]
        weights = [w for _, w in MIX] + [1.0 - sum(w for _, w in MIX)]
        backfill = cfg.count // 10  # the first tenth arrives as a backfill (action read)
        for i in range(cfg.count):
            if self.rng.random() < cfg.bad_fraction:
                yield self.bad()
                continue
            if i < backfill:
                yield self.insert("read")
                continue
            kind = self.rng.choices(kinds + ["insert"], weights)[0]
            needs_row = kind not in ("insert", "duplicate")
            if (needs_row and not self.live) or (kind == "duplicate" and not self.recent):
                kind = "insert"
            yield self.reread() if kind == "read" else getattr(self, kind)()

    def good(
        self, action: str, record: dict[str, Any], changes: dict[str, Any] | None, moment: datetime | None = None
    ) -> Generated:
        value = self.gen.encode(ACTIVITY_TOPIC, action, record, changes, record["activityId"], moment)
        key = record["activityId"].encode()
        self.recent.append((key, value))
        if len(self.recent) > 500:
            del self.recent[:250]
        return self.gen.emit(ACTIVITY_TOPIC, key, value, action)

    # --- row helpers ----------------------------------------------------------------------------------
    def new_row(self, moment: datetime) -> dict[str, Any]:
        rng, m = self.rng, self.model
        seg = m.pick_segment(rng)
        git = rng.random() < 0.55
        channel: str | None
        if git:
            platform, channel = m.git_channel(rng, seg)
            type_ = rng.choice(GIT_TYPES[platform])
            ins, dels = (rng.choice((0, 1, 5, 12, 40, 75, 250, 900)), rng.choice((0, 0, 2, 9, 30, 120, 600)))
        else:
            platform, type_ = rng.choice(OTHER_PLATFORMS)
            channel = rng.choice(
                (f"#{platform}-general", f"https://{platform}.example.org/c/{rng.randint(1, 40)}", "", None)
            )
            ins, dels = None, None
        member = m.pick_member(rng)
        created = moment - timedelta(seconds=rng.randint(0, 3600))
        when = EPOCH - timedelta(seconds=rng.randint(0, 2 * 365 * 86400), microseconds=rng.randint(0, 999_999))
        org = member["organizationId"] if rng.random() < 0.8 else None
        review = rng.choice(REVIEW_STATES) if "pull_request" in type_ or "merge" in type_ else None
        return {
            "activityId": new_uuid(rng),
            "conversationId": new_uuid(rng) if rng.random() < 0.3 else None,
            "createdAt": ts(created),
            "updatedAt": ts(moment),
            "memberId": member["id"],
            "objectMemberId": None,
            "objectMemberUsername": None,
            "organizationId": org,
            "parentId": None,
            "platform": platform,
            "segmentId": seg,
            "username": member["username"],
            "sourceId": f"{platform}-{rng.getrandbits(64):016x}",
            "type": type_,
            "timestamp": ts(when),
            "sourceParentId": f"{platform}-{rng.getrandbits(48):012x}" if rng.random() < 0.3 else None,
            "channel": channel,
            "sentimentScore": rng.choice((None, None, -20, 0, 12, 67, 100)),
            "gitInsertions": ins,
            "gitDeletions": dels,
            "score": rng.choice((None, 1, 2, 3, 8)),
            "isContribution": git or rng.random() < 0.2,
            "pullRequestReviewState": review,
        }

    def pick_live(self) -> dict[str, Any]:
        return self.live[self.rng.randrange(len(self.live))]

    def forget(self, row: dict[str, Any]) -> None:
        pos = self.index.pop(row["activityId"])
        last = self.live.pop()
        if last is not row:
            self.live[pos] = last
            self.index[last["activityId"]] = pos

    # --- kinds ----------------------------------------------------------------------------------------
    def insert(self, action: str = "insert") -> Generated:
        moment = self.gen.now()
        row = self.new_row(moment)
        if len(self.live) >= MAX_TRACKED:  # bounded memory: an old row stays live, it just changes no more
            self.forget(self.live[self.rng.randrange(len(self.live))])
        self.index[row["activityId"]] = len(self.live)
        self.live.append(row)
        return self.good(action, row, None, moment)

    def reread(self) -> Generated:
        return self.good("read", dict(self.pick_live()), None)

    def change(self, columns: dict[str, Any]) -> Generated:
        row = self.pick_live()
        moment = self.gen.now()
        old = {c: row[c] for c in columns} | {"updatedAt": row["updatedAt"]}
        row.update(columns)
        row["updatedAt"] = ts(moment)
        return self.good("update", dict(row), old, moment)

    def update(self) -> Generated:
        rng = self.rng
        return self.change(
            rng.choice(
                (
                    {"score": rng.randint(1, 10)},
                    {"sentimentScore": rng.randint(-100, 100)},
                    {"username": f"user{rng.randint(1, 9999)}"},
                    {"organizationId": self.model.pick_member(rng)["organizationId"]},
                )
            )
        )

    def segment_move(self) -> Generated:
        row = self.pick_live()
        others = [s for s in self.model.segment_ids if s != row["segmentId"]]
        return self.change({"segmentId": self.rng.choice(others)} if others else {"score": 1})

    def timestamp_change(self) -> Generated:
        row = self.pick_live()
        when = datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00"))
        return self.change({"timestamp": ts(when + timedelta(hours=self.rng.randint(1, 200)))})

    def sort_key_change(self) -> Generated:
        row = self.pick_live()
        if row["platform"] in GIT_PLATFORMS:
            return self.change({"type": self.rng.choice(GIT_TYPES[row["platform"]])})
        return self.change({"channel": f"#{row['platform']}-renamed-{self.rng.randint(1, 9)}"})

    def delete(self) -> Generated:
        row = self.pick_live()
        self.forget(row)
        return self.good("delete", dict(row), None)

    def duplicate(self) -> Generated:
        key, value = self.recent[self.rng.randrange(len(self.recent))]
        return self.gen.emit(ACTIVITY_TOPIC, key, value, "duplicate")

    def bad(self) -> Generated:
        rng = self.rng
        kind = rng.choice(BAD_KINDS)
        self.gen.summary.bad[DLQ_CLASS.get(kind, kind)] += 1
        moment = self.gen.now()
        row = self.new_row(moment)
        key = row["activityId"]
        value: bytes | None
        if kind == "not_json":
            value = b"this is not json {" + key.encode()
        elif kind == "invalid_utf8":
            value = b'{"action":"insert","record":{"activityId":"\xff\xfe\xfa"}}'
        elif kind == "tombstone":
            value = None
        elif kind == "not_object":
            value = orjson.dumps(["insert", row])
        elif kind == "truncated":
            value = self.gen.encode(ACTIVITY_TOPIC, "insert", row, None, key, moment)[:-17]
        else:
            msg: dict[str, Any] = {
                "action": "insert",
                "changes": None,
                "record": row,
                "metadata": self.gen.metadata(ACTIVITY_TOPIC, key, moment, read=False),
            }
            if kind == "missing_segment_id":
                del row["segmentId"]
            elif kind == "null_segment_id":
                row["segmentId"] = None
            elif kind == "bad_timestamp":
                row["timestamp"] = rng.choice(("yesterday", "2025-13-45T99:00:00Z", "", "17:00"))
            elif kind == "no_record":
                del msg["record"]
            elif kind == "unknown_action":
                msg["action"] = "upsert"
            value = orjson.dumps(msg)
        return self.gen.emit(ACTIVITY_TOPIC, key, value, "bad")
