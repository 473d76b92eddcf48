"""Sequin change message → warehouse row, written once as SQL (the fast path) and once as a Python check.

The loader hands ClickHouse the message bytes as they came from Kafka; ``insert_sql(table)`` is the SELECT
that turns each JSON value (column ``v`` of the ``{source}`` relation) into a row of the raw bucket table or
of a reference table (stream/schema.py), following CONTRACTS.md:

- ``record`` fields by name; nulls and missing fields become the column defaults ('' / -1 / 0, enabled 1);
- timestamps as ISO-8601 text or integer unix microseconds, truncated to the millisecond (UTC);
- ``action`` delete (a Sequin delete or a router retirement) gives ``_deleted = 1``;
- ``_version = toUnixTimestamp64Milli(updatedAt) * 2 + _deleted``, with ``metadata.commit_timestamp`` standing
  in for a missing updatedAt (a repository delete carries only its primary key);
- a message without its required fields (or not JSON, or with a value of the wrong type) fails the insert
  (throwIf) instead of becoming a row of defaults. The loader then asks ``problem()`` which messages are bad,
  sends those to the DLQ with the reason, and inserts the rest.

``problem(value, table)`` mirrors those rules in Python; it runs only on the slow path after a failed insert.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from connectors.model import (
    ACTIONS,
    ACTIVITY_COLUMNS,
    ACTIVITY_REQUIRED,
    EMPTY_ATTRIBUTES,
    MEMBER_ATTRIBUTES,
    MEMBER_FLAGS,
    REFERENCE_COLUMNS,
    REFERENCE_KEY,
    TS,
    VERSION_COLUMNS,
    VERSION_SOURCE,
    Column,
    is_timestamp,
)
from connectors.topics import SOURCE

INT_RANGES = {"Int8": (-128, 127), "UInt8": (0, 255), "UInt32": (0, 2**32 - 1)}


def _ts(expr: str) -> str:
    """Nullable(String) holding ISO text or unix microseconds → Nullable(DateTime64(3,'UTC')), truncated."""
    return (
        f"if(match(ifNull({expr}, ''), '^-?[0-9]+$'), "
        f"toDateTime64(fromUnixTimestamp64Micro(toInt64OrZero({expr}), 'UTC'), 3, 'UTC'), "
        f"parseDateTime64BestEffortOrNull({expr}, 3, 'UTC'))"
    )


def _extract_type(columns: tuple[Column, ...], skip: tuple[str, ...] = ()) -> str:
    def one(name: str, ctype: str) -> str:
        if is_timestamp(ctype):
            return f"`{name}` Nullable(String)"
        base = ctype.removeprefix("LowCardinality(").removesuffix(")") if ctype.startswith("Low") else ctype
        return f"`{name}` Nullable({base})"

    record = ", ".join(one(c.name, c.type) for c in columns if c.name not in skip)
    return f"Tuple(action Nullable(String), record Tuple({record}), metadata Tuple(commit_timestamp Nullable(String)))"


def _value(name: str, ctype: str, default: str | None) -> str:
    ref = f"m.record.`{name}`"
    if ctype == TS:
        return f"ifNull({_ts(ref)}, toDateTime64(0, 3, 'UTC'))"
    if is_timestamp(ctype):
        return _ts(ref)
    if "String" in ctype:
        return f"ifNull({ref}, '')"
    return f"ifNull({ref}, {default if default is not None else 0})"


def target_columns(table: str) -> tuple[Column, ...]:
    cols = ACTIVITY_COLUMNS if table == SOURCE else REFERENCE_COLUMNS[table]
    return cols + VERSION_COLUMNS


def insert_sql(table: str, part: bool = False) -> tuple[str, str]:
    """(column list, SELECT with a ``{source}`` placeholder) for rows of ``table``: ``"activityRelations"`` (any
    raw bucket) or a reference table name. With ``part``, the source also has a ``_part`` column, passed
    through as the SELECT's last column (the loader's one-parse fan-out to several tables)."""
    required: tuple[str, ...]
    if table == SOURCE:
        columns, required = ACTIVITY_COLUMNS, ACTIVITY_REQUIRED
        extra: list[str] = []
        skip: tuple[str, ...] = ()
    else:
        columns, required = REFERENCE_COLUMNS[table], (REFERENCE_KEY,)
        skip = (MEMBER_ATTRIBUTES,) if table == "members" else ()
        extra = [f"JSONExtractRaw(v, 'record', '{MEMBER_ATTRIBUTES}') AS _attributes"] if table == "members" else []
    types = {c.name: c.type for c in columns}
    values = []
    for name, ctype, default, _ in columns:
        if table == "members" and name == MEMBER_ATTRIBUTES:
            values.append(f"if(_attributes IN ('', 'null'), '{EMPTY_ATTRIBUTES}', _attributes) AS `{name}`")
        elif table == "members" and name in MEMBER_FLAGS:
            values.append(
                f"ifNull(JSONExtract(v, 'record', '{MEMBER_ATTRIBUTES}', '{name}', 'default', 'Nullable(UInt8)'), 0) "
                f"AS `{name}`"
            )
        elif name == VERSION_SOURCE:  # a key-only delete: the commit time stands in (CONTRACTS.md)
            values.append(f"assumeNotNull(_version_ts) AS `{name}`")
        else:
            values.append(f"{_value(name, ctype, default)} AS `{name}`")
    missing = [
        f"isNull({_ts(f'm.record.`{n}`')})" if is_timestamp(types[n]) else f"ifNull(m.record.`{n}`, '') = ''"
        for n in required
    ]
    missing.append(f"ifNull(m.action, '') NOT IN ({', '.join(repr(a) for a in ACTIONS)})")
    deleted = "toUInt8(m.action = 'delete')"
    version_ts = f"ifNull({_ts(f'm.record.`{VERSION_SOURCE}`')}, {_ts('m.metadata.commit_timestamp')})"
    missing.append("isNull(_version_ts)")
    select = (
        f"SELECT {', '.join(values)}, {deleted} AS `_deleted`, "
        f"toUInt64(toUnixTimestamp64Milli(assumeNotNull(_version_ts))) * 2 + `_deleted` AS `_version`"
        + (", `_part`" if part else "")
        + f"\nFROM (SELECT v, {'`_part`, ' if part else ''}JSONExtract(v, '{_extract_type(columns, skip)}') AS m, "
        f"{version_ts} AS _version_ts" + "".join(f", {e}" for e in extra) + " FROM {source})\n"
        f"WHERE throwIf({' OR '.join(missing)}, "
        f"'a change message without its required fields, or not a JSON object of the expected types') = 0"
    )
    column_list = ", ".join(f"`{c.name}`" for c in target_columns(table))
    return column_list, select


# --- the same rules in Python, for the slow path -------------------------------------------------------------


def _bad_ts(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return False
    if not isinstance(value, str):
        return True
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return True
    return False


def _bad_number(value: Any, ctype: str) -> bool:
    if isinstance(value, bool):
        return ctype != "UInt8"
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            return True
    if not isinstance(value, int):
        return True
    lo, hi = INT_RANGES.get(ctype, (-(2**63), 2**64 - 1))
    return not lo <= value <= hi


# Dead-letter classes only the loader gives (the others are the router's, connectors/sequin.py ERROR_CLASSES).
# unchanged_toast_unresolved / delete_unresolved: the stored row a toast value or a key-only delete needs is absent
# (stream/cdc.py).
LOADER_ONLY_CLASSES = ("no_version", "warehouse_rejected", "unchanged_toast_unresolved", "delete_unresolved")


def problem(value: bytes | None, table: str) -> str | None:
    """Why this message cannot become a row of ``table``, or None when it can."""
    found = classify_problem(value, table)
    return found[1] if found else None


def classify_problem(value: bytes | None, table: str) -> tuple[str, str] | None:
    """(error class, detail) of a message that cannot become a row of ``table``, or None when it can. The
    classes are the router's (connectors/sequin.py ERROR_CLASSES) where the cause is the same, plus
    ``no_version`` (docs/CONTRACTS.md, "Dead letters")."""
    if not value:
        return "tombstone", "empty value (tombstone)"
    try:
        msg = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return "not_json", f"not JSON: {exc}"
    if not isinstance(msg, dict):
        return "not_object", "not a JSON object"
    if msg.get("action") not in ACTIONS:
        return "unknown_action", f"unknown action {msg.get('action')!r}"
    record = msg.get("record")
    if not isinstance(record, dict):
        return "no_record", "no record object"
    required = ACTIVITY_REQUIRED if table == SOURCE else (REFERENCE_KEY,)
    for name in required:
        if record.get(name) in (None, ""):
            return "missing_column", f"required field {name} is missing or null"
    for name, ctype, _, _ in target_columns(table):
        v = record.get(name)
        if v is None or name.startswith("_") or name == MEMBER_ATTRIBUTES:
            continue
        if is_timestamp(ctype):
            if _bad_ts(v):
                return "bad_timestamp", f"field {name} is not a timestamp: {str(v)[:40]!r}"
        elif "String" in ctype:
            if isinstance(v, (dict, list)):
                return "bad_column", f"field {name} is not a scalar"
        elif _bad_number(v, ctype):
            return "bad_column", f"field {name} is not a {ctype}: {str(v)[:40]!r}"
    if record.get(VERSION_SOURCE) is None:
        meta = msg.get("metadata")
        if not isinstance(meta, dict) or meta.get("commit_timestamp") is None or _bad_ts(meta["commit_timestamp"]):
            return "no_version", "no updatedAt and no metadata.commit_timestamp to version the row"
    return None
