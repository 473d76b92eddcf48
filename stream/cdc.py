"""Faithful CDC without REPLICA IDENTITY FULL (SEQUIN.md, issue 14): the loader's resolution of the three message
shapes whose missing values are in the warehouse, not in the message.

- ``"unchanged_toast"``: a column whose value is that string takes the value of the latest stored version of the
  row (the newest live version not newer than the message's own): a reference table's own rows, for activities the
  activity index below. The INSERT … SELECT joins the incoming batch (parsed by ClickHouse with the SQL of
  stream/row_sql.py) with that stored row by primary key; for ``members.attributes`` the three flags come along.
- a delete whose record holds only the primary key: for a reference table the retirement is the stored row with
  ``_deleted = 1`` and the delete's ``_version``; for an activity (the router cannot bucket it: the message has
  no segmentId, so it sends it to the topic ``activityRelations_resolve``, connectors/topics.py) the stored row is
  found by activityId in the activity index, and the retirement goes into the raw bucket that holds it, with its
  sort key.
- an ``update`` of activityRelations whose ``changes`` is ``{}``/null (no old values; the router copies it to the
  same topic): if the previous live version of the activity (the newest older than the update) has another sort
  key, it is retired in its bucket, with ``_version`` = its own + 1 (the router's retirements do the same).

When the stored row is absent, the message goes to the DLQ: ``unchanged_toast_unresolved``,
``delete_unresolved`` (stream/row_sql.py LOADER_ONLY_CLASSES). Nothing is guessed.

The activity index ``bucketer_activity_index`` (ReplacingMergeTree(_version) ORDER BY (activityId, _deleted)): the
activity columns, ``_deleted``, ``_version`` and ``_bucket``, filled by one materialized view per raw bucket at
insert time (backfilled from the raw buckets once, when it is created). It keeps the newest live and the newest
deleted version of every activity, so a lookup by activityId is a primary-key read, never a scan of the buckets.

Order within a loader batch (``Resolver.apply``, after the batch's ordinary inserts): toast rows in waves (the k-th
message of a key in the batch resolves against the (k-1)-th, already stored), then key-only deletes, then the
empty-changes checks. Which stored version resolves a message is chosen here from the candidates' versions (one
primary-key query per table and wave); the INSERT then joins exactly that version.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from connectors.model import (
    ACTIVITY_COLUMNS,
    MEMBER_ATTRIBUTES,
    MEMBER_FLAGS,
    REFERENCE_KEY,
    SORT_KEY,
    VERSION_COLUMNS,
    VERSION_SOURCE,
    Column,
    bucket_sql,
)
from connectors.topics import SOURCE
from connectors.warehouse import WarehouseError
from stream.buckets import raw_table
from stream.row_sql import classify_problem, insert_sql, target_columns

log = logging.getLogger("bucketer.cdc")

TOAST = "unchanged_toast"
TOAST_BYTES = b'"unchanged_toast"'
INDEX_TABLE = "bucketer_activity_index"
ACTIVITY_KEY = "activityId"
RESOLVE_KIND = "resolve"  # the loader's kind for messages of the resolve topic
TOAST_UNRESOLVED = "unchanged_toast_unresolved"
DELETE_UNRESOLVED = "delete_unresolved"
DLQ_CLASSES = (TOAST_UNRESOLVED, DELETE_UNRESOLVED)
KEY_ONLY, EMPTY_CHANGES = "key_only_delete", "empty_changes"  # the Special shapes, besides TOAST

_SORT_MS = "timestamp"  # the sort-key column compared in milliseconds


# --- schema: the activity index ---------------------------------------------------------------------------------


def _index_columns() -> tuple[Column, ...]:
    return ACTIVITY_COLUMNS + VERSION_COLUMNS + (Column("_bucket", "UInt32"),)


def index_table_ddl() -> str:
    cols = ",\n    ".join(
        f"`{c.name}` {c.type}" + (f" DEFAULT {c.default}" if c.default is not None else "") for c in _index_columns()
    )
    return (
        f"CREATE TABLE IF NOT EXISTS {INDEX_TABLE} (\n    {cols}\n)\n"
        f"ENGINE = ReplacingMergeTree(_version)\nORDER BY ({ACTIVITY_KEY}, _deleted)"
    )


def _raw_select(n: int) -> str:
    names = ", ".join(f"`{c.name}`" for c in ACTIVITY_COLUMNS + VERSION_COLUMNS)
    return f"SELECT {names}, toUInt32({int(n)}) AS `_bucket` FROM {raw_table(n)}"


def index_view_ddl(n: int) -> str:
    return f"CREATE MATERIALIZED VIEW IF NOT EXISTS {INDEX_TABLE}_mv_{int(n)} TO {INDEX_TABLE} AS {_raw_select(n)}"


def index_ddl(buckets: int) -> list[str]:
    """The activity index and its views over raw buckets 0..buckets-1 (part of stream/schema.schema_statements,
    so they go through the same schema_command: ON CLUSTER on a cluster)."""
    return [index_table_ddl(), *(index_view_ddl(n) for n in range(buckets))]


def index_exists(wh: Any) -> bool:
    found = wh.rows(
        "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
        {"t": INDEX_TABLE},
    )
    return bool(found and int(found[0][0]))


def fill_index(wh: Any, buckets: int) -> None:
    """Fill a newly created index once from the raw buckets (its views see only rows inserted after them)."""
    for n in range(buckets):
        wh.command(f"INSERT INTO {INDEX_TABLE} {_raw_select(n)}")


def index_view_names(wh: Any) -> list[str]:
    return [
        str(name)
        for (name,) in wh.rows(
            "SELECT name FROM system.tables WHERE database = currentDatabase() AND startsWith(name, {p:String})",
            {"p": f"{INDEX_TABLE}_mv_"},
        )
    ]


def rebuild_index(wh: Any, buckets: int, command: Callable[[Any, str], object]) -> None:
    """The raw buckets were replaced (a rebucket, either strategy): a view whose source table was renamed away no
    longer fires for the table now under that name, and ``_bucket`` names the old layout. So every view is
    dropped and defined again over the current raw tables (``command``: the schema's ``schema_command``), and
    ``_bucket`` recomputed in place from each row's segmentId, where the rebucket has put its raw row (one
    column rewritten instead of the whole index copied again inside the gradual flip's loader hold). The rows are
    the same in both layouts: every version moved, nothing was added. Nothing may write the raw buckets
    meanwhile (the rebucket holds the loader, or runs with it stopped)."""
    for name in index_view_names(wh):
        wh.command(f"DROP TABLE IF EXISTS `{name}` SYNC")
    wh.command(
        f"ALTER TABLE {INDEX_TABLE} UPDATE `_bucket` = toUInt32({bucket_sql('segmentId', buckets)}) WHERE 1 "
        "SETTINGS mutations_sync = 2"
    )
    for sql in index_ddl(buckets):
        command(wh, sql)


# --- finding the messages to resolve (Python, on the few candidates a byte scan lets through) ------------------


@dataclass
class Special:
    """A message the loader resolves against the warehouse."""

    shape: str  # TOAST | KEY_ONLY | EMPTY_CHANGES, or "bad" (dead-lettered with ``error``)
    key: str = ""
    version: int = 0  # the message's own _version, as row_sql computes it
    record: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None


def _micros(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if not isinstance(v, str):
        return None
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    delta = t - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _ms(v: Any) -> int | None:
    us = _micros(v)
    return None if us is None else us // 1000


def _version(msg: dict[str, Any], record: dict[str, Any]) -> int | None:
    deleted = msg.get("action") == "delete"
    ms = _ms(record.get(VERSION_SOURCE))
    if record.get(VERSION_SOURCE) is None:
        meta = msg.get("metadata")
        ms = _ms(meta.get("commit_timestamp")) if isinstance(meta, dict) else None
    return None if ms is None else ms * 2 + deleted


def _parse(value: bytes) -> tuple[dict[str, Any], dict[str, Any]] | None:
    try:
        msg = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("record"), dict):
        return None
    return msg, msg["record"]


def is_key_only(record: dict[str, Any], key: str) -> bool:
    """A record holding only its primary key (every other column null or absent)."""
    k = record.get(key)
    return isinstance(k, str) and bool(k) and all(v is None for c, v in record.items() if c != key)


def has_toast(record: dict[str, Any]) -> bool:
    return any(v == TOAST for v in record.values())


def inspect(kind: str, value: bytes) -> Special | None:
    """What to resolve about one message of ``kind`` (``activityRelations``, a reference table, or RESOLVE_KIND);
    None: an ordinary message (the normal path inserts it, or dead-letters it with its class)."""
    if kind == RESOLVE_KIND:
        return _inspect_resolve(value)
    if TOAST_BYTES not in value and (kind == SOURCE or b"delete" not in value):
        return None  # the byte scan: no toast value, and (references) no delete
    parsed = _parse(value)
    if parsed is None:
        return None
    msg, record = parsed
    key = ACTIVITY_KEY if kind == SOURCE else REFERENCE_KEY
    version = _version(msg, record)
    if version is None or not isinstance(record.get(key), str) or not record[key]:
        return None
    if kind != SOURCE and msg.get("action") == "delete" and is_key_only(record, key):
        return Special(KEY_ONLY, record[key], version, record)
    if has_toast(record):
        return Special(TOAST, record[key], version, record)
    return None


def _inspect_resolve(value: bytes) -> Special:
    problem = classify_problem(value, SOURCE)
    parsed = _parse(value)
    if parsed is None:
        return Special("bad", error=problem or ("not_json", "not a JSON object with a record"))
    msg, record = parsed
    version = _version(msg, record)
    key = record.get(ACTIVITY_KEY)
    if not isinstance(key, str) or not key:
        return Special("bad", error=("missing_column", "record.activityId is missing or empty"))
    if version is None:
        return Special("bad", error=("no_version", "no updatedAt and no metadata.commit_timestamp to version the row"))
    if msg.get("action") == "delete" and is_key_only(record, ACTIVITY_KEY):
        return Special(KEY_ONLY, key, version, record)
    if msg.get("action") == "update" and not msg.get("changes"):
        if problem is not None:
            return Special("bad", error=problem)
        return Special(EMPTY_CHANGES, key, version, record)
    return Special("bad", error=("unknown_action", "neither a key-only delete nor an update without old values"))


# --- resolution ---------------------------------------------------------------------------------------------------


@dataclass
class CdcStats:
    toast_resolved: int = 0
    toast_unresolved: int = 0
    deletes_resolved: int = 0
    deletes_unresolved: int = 0
    deletes_repeated: int = 0  # the key's newest stored version is already a delete (a redelivery): nothing to do
    empty_changes_checked: int = 0
    empty_changes_retired: int = 0


@dataclass
class Item:
    """One message to resolve: its target table (a raw bucket, a reference table, or the resolve topic's)."""

    table: str
    kind: str
    special: Special
    origin: Any
    value: bytes


DeadLetter = Callable[[str, str, Any, bytes], None]  # (error class, reason, origin, value)


def _lit(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _keys(keys: Iterable[str]) -> str:
    return "(" + ", ".join(_lit(k) for k in sorted(set(keys))) + ")"


@dataclass(frozen=True)
class Stored:
    version: int
    bucket: int
    sort_key: tuple[Any, ...]


def _data_columns(kind: str) -> list[Column]:
    return [c for c in target_columns(kind) if c.name not in ("_deleted", "_version")]


def _toast_expr(kind: str, c: Column) -> str:
    n, s = f"n.`{c.name}`", f"s.`{c.name}`"
    if kind == "members" and (c.name == MEMBER_ATTRIBUTES or c.name in MEMBER_FLAGS):
        # row_sql keeps attributes as raw JSON text, so a toast value arrives quoted
        attrs = f"n.`{MEMBER_ATTRIBUTES}`"
        return f"if({attrs} IN ('\"{TOAST}\"', '{TOAST}'), {s}, {n}) AS `{c.name}`"
    if "String" in c.type:
        return f"if({n} = '{TOAST}', {s}, {n}) AS `{c.name}`"
    return f"{n} AS `{c.name}`"


class Resolver:
    """Resolves one batch's special messages against the warehouse (``apply``); counts in ``stats``."""

    def __init__(self, warehouse: Any) -> None:
        self.warehouse = warehouse  # the bucket of a stored row is the index's ``_bucket``: no N kept here
        self.stats = CdcStats()

    # the stored versions of some keys: from the reference table itself, or (activities) from the index
    def _stored(self, kind: str, keys: Iterable[str]) -> dict[str, list[Stored]]:
        keys = list(keys)
        if not keys:
            return {}
        out: dict[str, list[Stored]] = defaultdict(list)
        if kind in (SOURCE, RESOLVE_KIND):
            sk = ", ".join(f"toUnixTimestamp64Milli(`{c}`)" if c == _SORT_MS else f"`{c}`" for c in SORT_KEY)
            rows = self.warehouse.rows(
                f"SELECT {ACTIVITY_KEY}, _version, _bucket, {sk} FROM {INDEX_TABLE} "
                f"WHERE {ACTIVITY_KEY} IN {_keys(keys)} AND _deleted = 0"
            )
            for r in rows:
                out[r[0]].append(Stored(int(r[1]), int(r[2]), tuple(r[3:])))
        else:
            rows = self.warehouse.rows(
                f"SELECT {REFERENCE_KEY}, _version FROM {kind} WHERE {REFERENCE_KEY} IN {_keys(keys)} AND _deleted = 0"
            )
            for r in rows:
                out[r[0]].append(Stored(int(r[1]), -1, ()))
        return out

    def _deleted(self, kind: str, keys: Iterable[str]) -> set[str]:
        """The keys with a stored delete (the activity index keeps the newest live and the newest deleted version
        of each key; a reference table keeps its delete marker)."""
        keys = list(keys)
        if not keys:
            return set()
        table, key = (INDEX_TABLE, ACTIVITY_KEY) if kind in (SOURCE, RESOLVE_KIND) else (kind, REFERENCE_KEY)
        return {
            str(k)
            for (k,) in self.warehouse.rows(
                f"SELECT DISTINCT {key} FROM {table} WHERE {key} IN {_keys(keys)} AND _deleted = 1"
            )
        }

    @staticmethod
    def _latest(stored: list[Stored], below: int, strict: bool = False) -> Stored | None:
        ok = [s for s in stored if (s.version < below if strict else s.version <= below)]
        return max(ok, key=lambda s: s.version) if ok else None

    def apply(self, items: list[Item], dead_letter: DeadLetter) -> None:
        toast = [i for i in items if i.special.shape == TOAST]
        deletes = [i for i in items if i.special.shape == KEY_ONLY]
        empty = [i for i in items if i.special.shape == EMPTY_CHANGES]
        for i in items:
            if i.special.shape == "bad" and i.special.error is not None:
                dead_letter(i.special.error[0], i.special.error[1], i.origin, i.value)
        by_table: dict[str, list[Item]] = defaultdict(list)
        for i in toast:
            by_table[i.table].append(i)
        for table, group in by_table.items():
            for wave in _waves(group):
                self._toast_wave(table, wave, dead_letter)
        if deletes:
            self._deletes(deletes, dead_letter)
        if empty:
            self._empty_changes(empty)

    def _toast_wave(self, table: str, wave: list[Item], dead_letter: DeadLetter) -> None:
        kind = wave[0].kind
        stored = self._stored(kind, (i.special.key for i in wave))
        chosen: dict[str, int] = {}
        todo: list[Item] = []
        for i in wave:
            s = self._stored_or_dead(
                stored,
                i,
                TOAST_UNRESOLVED,
                f'a column is "{TOAST}" but no stored version of {{}} precedes it',
                dead_letter,
            )
            if s is None:
                self.stats.toast_unresolved += 1
                continue
            chosen[i.special.key] = s.version
            todo.append(i)
        if not todo:
            return
        key = ACTIVITY_KEY if kind == SOURCE else REFERENCE_KEY
        source = INDEX_TABLE if kind == SOURCE else table
        _, parse = insert_sql(kind)
        cols = _data_columns(kind)
        pairs = ", ".join(f"({_lit(k)}, {v})" for k, v in chosen.items())
        select = (
            f"SELECT {', '.join(_toast_expr(kind, c) for c in cols)}, n.`_deleted`, n.`_version`\n"
            f"FROM ({parse}) AS n\nINNER JOIN (SELECT * FROM {source} WHERE ({key}, _version) IN ({pairs}) "
            f"AND _deleted = 0 LIMIT 1 BY {key}) AS s ON n.`{key}` = s.`{key}`"
        )
        column_list = ", ".join(f"`{c.name}`" for c in target_columns(kind))
        done = self._insert_json(f"{table} ({column_list})", select, todo, kind, dead_letter)
        self.stats.toast_resolved += done

    def _stored_or_dead(
        self, stored: dict[str, list[Stored]], i: Item, error_class: str, detail: str, dead_letter: DeadLetter
    ) -> Stored | None:
        """The stored version ``i`` resolves against, or None after dead-lettering it (``detail`` names its key)."""
        s = self._latest(stored.get(i.special.key, []), i.special.version)
        if s is None:
            dead_letter(error_class, detail.format(i.special.key), i.origin, i.value)
        return s

    def _insert_json(self, target: str, select: str, items: list[Item], kind: str, dead_letter: DeadLetter) -> int:
        """Insert ``items`` through ``select``; a message the warehouse refuses goes to the DLQ with its class
        (row_sql.classify_problem) and the rest are inserted one by one. Returns the messages inserted."""
        try:
            self.warehouse.insert_json(target, select, [i.value for i in items])
            return len(items)
        except WarehouseError as exc:
            if len(items) == 1:
                found = classify_problem(items[0].value, kind) or ("warehouse_rejected", str(exc)[:300])
                dead_letter(found[0], found[1], items[0].origin, items[0].value)
                return 0
        return sum(self._insert_json(target, select, [i], kind, dead_letter) for i in items)

    def _retire(self, target: str, source: str, key: str, kind: str, triples: list[tuple[str, int, int]]) -> None:
        """Insert into ``target`` the stored rows (key, stored version) of ``source`` as deletes with new versions."""
        cols = ", ".join(f"s.`{c.name}`" for c in _data_columns(kind))
        arr = ", ".join(f"({_lit(k)}, toUInt64({sv}), toUInt64({nv}))" for k, sv, nv in triples)
        names = ", ".join(f"`{c.name}`" for c in target_columns(kind))
        self.warehouse.command(
            f"INSERT INTO {target} ({names}) SELECT {cols}, toUInt8(1), n.nv FROM "
            f"(SELECT * FROM {source} WHERE ({key}, _version) IN "
            f"(SELECT t.1, t.2 FROM (SELECT arrayJoin([{arr}]) AS t)) "
            f"AND _deleted = 0 LIMIT 1 BY {key}, _version) AS s INNER JOIN "
            f"(SELECT t.1 AS k, t.2 AS sv, t.3 AS nv FROM (SELECT arrayJoin([{arr}]) AS t)) AS n "
            f"ON s.`{key}` = n.k AND s._version = n.sv"
        )

    def _deletes(self, items: list[Item], dead_letter: DeadLetter) -> None:
        groups: dict[str, list[Item]] = defaultdict(list)  # reference table, or SOURCE for activities
        for i in items:
            groups[SOURCE if i.kind == RESOLVE_KIND else i.kind].append(i)
        for kind, group in groups.items():
            stored = self._stored(kind, (i.special.key for i in group))
            missing = {
                i.special.key for i in group if self._latest(stored.get(i.special.key, []), i.special.version) is None
            }
            deleted = self._deleted(kind, missing)
            targets: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
            for i in group:
                if i.special.key in deleted:
                    # Only a delete is stored for the key (an at-least-once redelivery, a replay of the topic):
                    # the delete is applied already, which is not a dead letter.
                    self.stats.deletes_repeated += 1
                    continue
                s = self._stored_or_dead(
                    stored,
                    i,
                    DELETE_UNRESOLVED,
                    "a delete holding only the key {}, which no stored row has",
                    dead_letter,
                )
                if s is None:
                    self.stats.deletes_unresolved += 1
                    continue
                target = raw_table(s.bucket) if kind == SOURCE else kind
                targets[target].append((i.special.key, s.version, i.special.version))
                self.stats.deletes_resolved += 1
            key = ACTIVITY_KEY if kind == SOURCE else REFERENCE_KEY
            for target, triples in targets.items():
                self._retire(target, INDEX_TABLE if kind == SOURCE else kind, key, kind, triples)

    def _empty_changes(self, items: list[Item]) -> None:
        stored = self._stored(SOURCE, (i.special.key for i in items))
        targets: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
        for i in items:
            self.stats.empty_changes_checked += 1
            old = self._latest(stored.get(i.special.key, []), i.special.version, strict=True)
            if old is None or _same_sort_key(i.special.record, old.sort_key):
                continue
            targets[raw_table(old.bucket)].append((i.special.key, old.version, old.version | 1))
            self.stats.empty_changes_retired += 1
        for target, triples in targets.items():
            self._retire(target, INDEX_TABLE, ACTIVITY_KEY, SOURCE, sorted(set(triples)))


def _same_sort_key(record: dict[str, Any], stored: tuple[Any, ...]) -> bool:
    for col, old in zip(SORT_KEY, stored, strict=True):
        new = record.get(col)
        if new == TOAST:
            continue  # unchanged
        if col == _SORT_MS:
            new = _ms(new)
        elif new is None:
            new = ""
        if new != old:
            return False
    return True


def _waves(items: list[Item]) -> Iterator[list[Item]]:
    """The k-th occurrence of every key in wave k: a wave never holds two messages of one row."""
    seen: Counter[str] = Counter()
    waves: list[list[Item]] = []
    for i in items:
        k = seen[i.special.key]
        seen[i.special.key] += 1
        if k == len(waves):
            waves.append([])
        waves[k].append(i)
    yield from waves
