"""Decoding and validation of Sequin change messages on ``activityRelations`` (SEQUIN.md).

Contract (other parts build on it):

- ``decode(value, topic, partition, offset) -> Change`` or raises ``BadMessage``. Nothing else
  escapes: any input (random bytes included) is either a ``Change`` or a ``BadMessage``.
- ``Change.segment_id`` is the bucket key (the non-empty segmentId string of ``record``; for a delete
  the deleted row's). The router forwards the **original value bytes**; it never re-encodes them.
- ``Change.retirement`` is ``None`` or a ``Retirement(segment_id, value, reason)``: the router-made
  Sequin-shaped delete of the old row (docs/CONTRACTS.md) for an ``update`` whose ``changes`` alter
  segmentId or another sort-key column; it goes to the bucket of ``Retirement.segment_id`` with the
  source key and header ``bucketer-derived: retirement``.
- ``Change.old_values_unknown`` is True for an ``update`` whose ``changes`` is ``{}``/null (no
  REPLICA IDENTITY FULL): the old row cannot be known, so nothing is guessed; the router counts it.
- ``Change.segment_id == ""`` only for a delete whose record holds only activityId (``key_only_delete``, no
  REPLICA IDENTITY FULL): the router sends it to the resolve topic (connectors/topics.py), not to a bucket.
- ``BadMessage.error_class`` is one of ``ERROR_CLASSES``; ``detail`` is a short human reason.

Required columns (CLEANED_BUCKETS.md) must be present and not null: strings for the string ones,
timestamps as ISO-8601 text (``2025-03-01T10:00:00.000000Z``) or integer unix microseconds. A delete
may lack ``updatedAt`` when ``metadata.commit_timestamp`` is a valid timestamp (CONTRACTS.md).
Speed: a good insert/read/delete, or an update not touching the sort key, is checked by a typed
msgspec decode of only the needed fields (the rest of the JSON is skipped in C, after a UTF-8 check);
everything else takes the full orjson path, which names the error or builds the retirement. The two
paths agree on every input (tests/unit/test_sequin.py fuzzes both). ``Change.record`` is parsed lazily.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson

from connectors.model import ACTIONS as _ACTIONS
from connectors.model import BUCKET_KEY, REQUIRED_STRINGS, REQUIRED_TIMESTAMPS, SORT_KEY, VERSION_SOURCE

ACTIONS = frozenset(_ACTIONS)
PRIMARY_KEY = "activityId"
STRING_COLUMNS = REQUIRED_STRINGS  # required besides the bucket key (connectors/model.py)
TIMESTAMP_COLUMNS = REQUIRED_TIMESTAMPS
ERROR_CLASSES = (
    "tombstone",
    "invalid_utf8",
    "not_json",
    "not_object",
    "unknown_action",
    "no_record",
    "record_not_object",
    "missing_segment_id",
    "null_segment_id",
    "non_string_segment_id",
    "empty_segment_id",
    "missing_column",
    "bad_column",
    "bad_timestamp",
    "bad_changes",
    "too_large",  # raised by the router: over the producer's message.max.bytes
    "key_only_delete",  # raised by the router: a key-only delete, and a sink without the resolve topic
)
# DateTime64(3) range: 1900-01-01 .. 2299-12-31, in microseconds.
_MIN_US, _MAX_US = -2_208_988_800_000_000, 10_413_791_999_999_999
_fromisoformat = datetime.fromisoformat


class BadMessage(ValueError):
    """Input that cannot be routed; ``error_class`` names why (one of ERROR_CLASSES)."""

    def __init__(self, error_class: str, detail: str) -> None:
        super().__init__(f"{error_class}: {detail}")
        self.error_class = error_class
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Retirement:
    segment_id: str
    value: bytes
    reason: str  # "segment_move" | "sort_key_change"


class Change:
    """A valid change. ``record`` (the full row) is parsed from ``value`` on first use only."""

    __slots__ = ("action", "segment_id", "value", "retirement", "old_values_unknown", "_record")

    def __init__(
        self,
        action: str,
        segment_id: str,
        value: bytes,
        record: dict[str, Any] | None = None,
        retirement: Retirement | None = None,
        old_values_unknown: bool = False,
    ) -> None:
        self.action, self.segment_id, self.value = action, segment_id, value
        self.retirement, self.old_values_unknown, self._record = retirement, old_values_unknown, record

    @property
    def record(self) -> dict[str, Any]:
        if self._record is None:
            self._record = orjson.loads(self.value)["record"]
        return self._record  # type: ignore[return-value]


class _Record(msgspec.Struct):
    """The columns the fast path checks; every other field of the JSON is skipped unparsed."""

    segmentId: str
    activityId: str
    memberId: str
    platform: str
    sourceId: str
    type: str
    # Text kept as text and checked by valid_timestamp, the full path's own rule (a parse into datetime here
    # took any number of fraction digits, which ClickHouse refuses past 19: the two paths disagreed).
    createdAt: str | int
    updatedAt: str | int
    timestamp: str | int


class _Message(msgspec.Struct):
    action: str
    record: _Record
    changes: dict[str, Any] | None = None


# The fast path reads exactly the required columns of the data model, spelled out above for typed attribute
# access; a model that changes them without this struct fails here, at import, not on the first message.
if _Record.__struct_fields__ != (BUCKET_KEY, *STRING_COLUMNS, *TIMESTAMP_COLUMNS):
    raise ImportError(f"connectors.sequin._Record {_Record.__struct_fields__} is not the model's required columns")
_FAST = msgspec.json.Decoder(_Message)
_SORT_KEY_SET = frozenset(SORT_KEY)


def _values_of(columns: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """A record's values of ``columns`` as a tuple, in C (KeyError when one is absent): the full path's quick
    check of a good row."""
    if len(columns) == 1:
        return lambda record: (record[columns[0]],)
    return operator.itemgetter(*columns)


_strings_of, _timestamps_of = _values_of(STRING_COLUMNS), _values_of(TIMESTAMP_COLUMNS)
_ONLY_STR = {str}


def decode(value: bytes | None, topic: str = "", partition: int = -1, offset: int = -1) -> Change:
    """Validate one Sequin value; where it came from is written into a retirement's metadata.

    Fast path: a typed decode of only the needed fields (msgspec, in C). Anything it does not accept
    as a plain good change (bad input, a delete without updatedAt, an update touching the sort key)
    takes the full path, which names the error class or builds the retirement."""
    try:
        if not value.isascii():  # type: ignore[union-attr]
            value.decode("utf-8")  # type: ignore[union-attr]  # msgspec does not check skipped fields
        m = _FAST.decode(value)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - whatever the fast path rejects, the full path classifies
        return _decode_full(value, topic, partition, offset)
    r = m.record
    ch = m.changes
    if (
        m.action in ACTIONS
        and r.segmentId
        and valid_timestamp(r.createdAt)
        and valid_timestamp(r.updatedAt)
        and valid_timestamp(r.timestamp)
        and (m.action != "update" or ch is None or _SORT_KEY_SET.isdisjoint(ch))
    ):
        return Change(m.action, r.segmentId, value, old_values_unknown=m.action == "update" and not ch)  # type: ignore[arg-type]
    return _decode_full(value, topic, partition, offset)


def _decode_full(value: bytes | None, topic: str, partition: int, offset: int) -> Change:
    if value is None:
        raise BadMessage("tombstone", "null value")
    try:
        msg = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        msg = _loads_slow(value, exc)
    if type(msg) is not dict:
        raise BadMessage("not_object", f"top level is {type(msg).__name__}")
    action = msg.get("action")
    if type(action) is not str or action not in ACTIONS:
        raise BadMessage("unknown_action", f"action {_short(action)}")
    record = msg.get("record")
    if record is None:
        raise BadMessage("no_record", "record missing or null")
    if type(record) is not dict:
        raise BadMessage("record_not_object", f"record is {type(record).__name__}")
    segment_id = record.get(BUCKET_KEY)
    if type(segment_id) is not str or not segment_id:
        if action == "delete" and key_only_delete(record, msg.get("metadata")):
            return Change(action, "", value, record)  # no bucket: the router sends it to the resolve topic
        segment_id = _segment_id(record, "record")  # raises the precise class
    try:  # fast path for good rows; the slow one names what is wrong (or allows a delete)
        good = set(map(type, _strings_of(record))) == _ONLY_STR and all(map(valid_timestamp, _timestamps_of(record)))
    except KeyError:
        good = False
    if not good:
        _check_columns(record, action, msg.get("metadata"))
    changes = msg.get("changes")
    if action != "update":
        return Change(action, segment_id, value, record)
    if changes is None or changes == {}:
        return Change(action, segment_id, value, record, old_values_unknown=True)
    if type(changes) is not dict:
        raise BadMessage("bad_changes", f"changes is {type(changes).__name__}")
    source = f"{topic}/{partition}/{offset}"
    return Change(action, segment_id, value, record, retirement=_retirement(msg, record, changes, source))


def key_only_delete(record: dict[str, Any], metadata: object) -> bool:
    """A delete of a table without REPLICA IDENTITY FULL: the record holds only the primary key (activityId, a
    non-empty string; every other column null or absent) and the commit time versions it. Its ``Change`` has an
    empty ``segment_id``: the loader finds the row's bucket by activityId (stream/cdc.py)."""
    key = record.get(PRIMARY_KEY)
    return (
        type(key) is str
        and bool(key)
        and all(v is None for c, v in record.items() if c != PRIMARY_KEY)
        and type(metadata) is dict
        and valid_timestamp(metadata.get("commit_timestamp"))
    )


def _loads_slow(value: bytes, exc: orjson.JSONDecodeError) -> Any:
    """orjson refuses numbers beyond a double, which RFC 8259 allows (and the fast path skips over):
    parse those with the standard library; everything else orjson refused is bad input."""
    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError as uexc:
        raise BadMessage("invalid_utf8", str(uexc)[:200]) from None
    if "infinity" in str(exc):
        try:
            return json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError) as jexc:
            raise BadMessage("not_json", str(jexc)[:200]) from None
    raise BadMessage("not_json", str(exc)[:200]) from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _short(v: object) -> str:
    return repr(v)[:60]


def _segment_id(record: dict[str, Any], where: str) -> str:
    if "segmentId" not in record:
        raise BadMessage("missing_segment_id", f"{where}.segmentId absent")
    sid = record["segmentId"]
    if sid is None:
        raise BadMessage("null_segment_id", f"{where}.segmentId is null")
    if type(sid) is not str:
        raise BadMessage("non_string_segment_id", f"{where}.segmentId is {type(sid).__name__}")
    if not sid:
        raise BadMessage("empty_segment_id", f"{where}.segmentId is empty")
    return sid


def _check_columns(record: dict[str, Any], action: str, metadata: object) -> None:
    for col in STRING_COLUMNS:
        v = record.get(col)
        if v is None:
            raise BadMessage("missing_column", f"record.{col} absent or null")
        if type(v) is not str:
            raise BadMessage("bad_column", f"record.{col} is {type(v).__name__}")
    for col in TIMESTAMP_COLUMNS:
        v = record.get(col)
        if v is None:
            if (
                col == VERSION_SOURCE
                and action == "delete"
                and type(metadata) is dict
                and valid_timestamp(metadata.get("commit_timestamp"))
            ):
                continue
            raise BadMessage("missing_column", f"record.{col} absent or null")
        if not valid_timestamp(v):
            raise BadMessage("bad_timestamp", f"record.{col} = {_short(v)}")


def valid_timestamp(v: object) -> bool:
    """ISO-8601 text or integer unix microseconds within ClickHouse DateTime64(3)'s range."""
    if type(v) is int:
        return _MIN_US <= v <= _MAX_US
    if type(v) is not str or len(v) < 10 or len(v) > 40:
        return False
    try:
        _fromisoformat(v)
    except ValueError:
        try:  # RFC 3339 forms Python refuses (lower-case t/z): the fast path's parser accepts them
            msgspec.convert(v, datetime)
        except msgspec.ValidationError:
            return False
    return "1900" <= v[:4] <= "2299"  # either parser accepted it, so these are the year's four digits


def _retirement(msg: dict[str, Any], record: dict[str, Any], changes: dict[str, Any], source: str) -> Retirement | None:
    """The delete of the old row when ``changes`` alters the sort key (segmentId moves the bucket)."""
    moved = [c for c in SORT_KEY if c in changes and changes[c] != record.get(c)]
    if not moved:
        return None
    old = {**record, **changes}
    old_sid = _segment_id_of_changes(old)
    for col in TIMESTAMP_COLUMNS:
        if col in changes and changes[col] is not None and not valid_timestamp(changes[col]):
            raise BadMessage("bad_changes", f"changes.{col} = {_short(changes[col])}")
    reason = "segment_move" if BUCKET_KEY in moved else "sort_key_change"
    metadata = msg.get("metadata")
    meta = dict(metadata) if type(metadata) is dict else {}
    meta["bucketer"] = {"derived": "retirement", "reason": reason, "source": source}
    try:
        value = orjson.dumps({"action": "delete", "changes": None, "record": old, "metadata": meta})
    except TypeError as exc:  # an integer beyond 64 bits (valid JSON, but not re-encodable here)
        raise BadMessage("bad_changes", f"old row cannot be encoded: {exc}") from None
    return Retirement(old_sid, value, reason)


def _segment_id_of_changes(old: dict[str, Any]) -> str:
    try:
        return _segment_id(old, "changes")
    except BadMessage as exc:
        raise BadMessage("bad_changes", exc.detail) from None


_COMMIT_FIELD = b'"commit_timestamp"'


def commit_time(value: bytes) -> datetime | None:
    """The ``metadata.commit_timestamp`` of one message, read from its bytes without parsing the rest (the
    loader's freshness mark); None when absent, not a string, or not a timestamp. A string value cannot fake
    the field (its quotes are escaped in JSON); of several such keys the last one is taken."""
    at = value.rfind(_COMMIT_FIELD)
    if at < 0:
        return None
    rest = value[at + len(_COMMIT_FIELD) : at + len(_COMMIT_FIELD) + 48].lstrip()
    if not rest.startswith(b":"):
        return None
    rest = rest[1:].lstrip()
    end = rest.find(b'"', 1)
    if not rest.startswith(b'"') or end < 0:
        return None
    try:
        t = _fromisoformat(rest[1:end].decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)
