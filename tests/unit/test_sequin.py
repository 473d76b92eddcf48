"""Decoding and validation of Sequin messages: every bad class, retirements, and a fuzz of the decoder."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import orjson
import pytest
from fakes import FakeMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sequinmsgs import bad_messages, message, row, scenario

from connectors.sequin import ERROR_CLASSES, BadMessage, Change, _decode_full, decode, valid_timestamp
from stream.buckets import bucket_of
from stream.routing import BatchCounts, BatchRouter

RNG = random.Random(7)
SEG_A = "5ab72c4b-1047-4735-ae83-096d47d0cdaf"
SEG_B = "01e5baef-10d4-4b86-bb03-e954fd28bf0a"


def test_every_bad_class_is_named() -> None:
    bad = bad_messages(random.Random(1), [SEG_A, SEG_B])
    for sent in bad:
        with pytest.raises(BadMessage) as info:
            decode(sent.value)
        assert info.value.error_class == sent.dlq, sent.value
        assert info.value.error_class in ERROR_CLASSES
        assert info.value.detail
    seen = {s.dlq for s in bad}
    assert seen == set(ERROR_CLASSES) - {"too_large", "key_only_delete"}  # both raised by the router itself


@pytest.mark.parametrize("action", ["insert", "read", "delete", "update"])
def test_good_actions_decode(action: str) -> None:
    rec = row(RNG, "a1", SEG_A)
    ch = decode(message(action, rec, {"score": 1} if action == "update" else None))
    assert (ch.action, ch.segment_id, ch.record["activityId"], ch.retirement) == (action, SEG_A, "a1", None)
    assert ch.record == rec  # parsed on demand from the original bytes


def test_timestamps_iso_or_unix_micros() -> None:
    assert valid_timestamp("2025-03-01T10:00:00.000000Z")
    assert valid_timestamp("2025-03-01T10:00:00+02:00")
    assert valid_timestamp(1_740_823_200_000_000)
    for bad in ["2025-03-01T25:00:00Z", "", "now", 1.5, True, None, 10**20, "2025-02-30T00:00:00Z"]:
        assert not valid_timestamp(bad), bad


def test_delete_without_updated_at_uses_commit_timestamp() -> None:
    rec = row(RNG, "a1", SEG_A)
    rec["updatedAt"] = None
    assert decode(message("delete", rec)).segment_id == SEG_A
    with pytest.raises(BadMessage, match="missing_column"):
        decode(message("insert", rec))


def test_segment_move_retires_the_old_row_in_the_old_bucket() -> None:
    old = row(RNG, "a1", SEG_A)
    new = dict(old, segmentId=SEG_B, updatedAt="2026-01-01T00:00:00.000000Z")
    ch = decode(message("update", new, {"segmentId": SEG_A, "updatedAt": old["updatedAt"]}), "src", 2, 41)
    assert ch.segment_id == SEG_B
    assert ch.retirement is not None and ch.retirement.segment_id == SEG_A
    assert ch.retirement.reason == "segment_move"
    ret = orjson.loads(ch.retirement.value)
    assert ret["action"] == "delete" and ret["changes"] is None
    assert ret["record"] == old  # the new record overlaid with the old values
    assert ret["metadata"]["bucketer"] == {"derived": "retirement", "reason": "segment_move", "source": "src/2/41"}
    assert ret["metadata"]["commit_lsn"] == 88120311
    assert bucket_of(SEG_A, 10) != bucket_of(SEG_B, 10) or bucket_of(SEG_A, 20) != bucket_of(SEG_B, 20)


@pytest.mark.parametrize(
    "col,old",
    [
        ("timestamp", "2020-01-01T00:00:00.000000Z"),
        ("type", "old-type"),
        ("platform", "gitlab"),
        ("channel", "https://x/y"),
        ("sourceId", "zz"),
    ],
)
def test_other_sort_key_changes_retire_in_the_same_bucket(col: str, old: str) -> None:
    new = row(RNG, "a1", SEG_A)
    ch = decode(message("update", new, {col: old}))
    assert ch.retirement is not None
    assert (ch.retirement.segment_id, ch.retirement.reason) == (SEG_A, "sort_key_change")
    assert orjson.loads(ch.retirement.value)["record"][col] == old


def test_update_without_old_values_is_flagged_not_guessed() -> None:
    for changes in ({}, None):
        ch = decode(message("update", row(RNG, "a1", SEG_A), changes))
        assert ch.old_values_unknown and ch.retirement is None
    ch = decode(message("update", row(RNG, "a1", SEG_A), {"score": 3}))
    assert not ch.old_values_unknown and ch.retirement is None


def test_unchanged_value_in_changes_is_no_move() -> None:
    rec = row(RNG, "a1", SEG_A)
    assert decode(message("update", rec, {"segmentId": SEG_A, "score": 0})).retirement is None


class ListSink:
    exactly_once = True

    def __init__(self) -> None:
        self.out: list[tuple[object, ...]] = []

    def write(self, bucket: int, key: bytes | None, value: bytes, headers: object = None) -> None:
        self.out.append(("bucket", bucket, key, value, headers))

    def dead_letter(self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        self.out.append(("dlq", dict(headers)["bucketer-error-class"].decode(), key, value, headers))


def route_all(values: list[bytes | None], buckets: int = 10) -> tuple[ListSink, BatchCounts]:
    sink = ListSink()
    counts = BatchRouter(buckets, max_message_bytes=100_000).route(
        [FakeMessage("src", 0, i, v) for i, v in enumerate(values)], sink
    )  # type: ignore[arg-type]
    return sink, counts


def test_batch_router_matches_the_scenario_expectations() -> None:
    sents = scenario(3, 300, 10)
    sink, counts = route_all([s.value for s in sents])
    it = iter(sink.out)
    for offset, s in enumerate(sents):
        if s.dlq:
            kind, cls, _, value, headers = next(it)
            assert (kind, cls, value or None) == ("dlq", s.dlq, s.value)
            assert dict(headers)["bucketer-source-offset"] == str(offset).encode()
            assert dict(headers)["bucketer-source-topic"] == b"src"
            continue
        if s.retire_bucket is not None:
            kind, b, _, value, headers = next(it)
            assert (kind, b, headers) == ("bucket", s.retire_bucket, [("bucketer-derived", b"retirement")])
            assert orjson.loads(value)["record"]["segmentId"] == s.retire_segment
        kind, b, _, value, headers = next(it)
        assert (kind, b, value, headers) == ("bucket", s.bucket, s.value, None)  # original bytes, unchanged
    assert next(it, None) is None
    assert counts.dlq == Counter(s.dlq for s in sents if s.dlq)
    assert counts.retirements == sum(s.retire_bucket is not None for s in sents)
    assert counts.old_values_unknown > 0


def test_too_large_goes_to_the_dlq_without_its_bytes() -> None:
    big = message("insert", dict(row(RNG, "a1", SEG_A), pad="y" * 200_000))
    sink, counts = route_all([big])
    assert sink.out[0][:2] == ("dlq", "too_large") and sink.out[0][3] == b""
    assert counts.dlq == Counter({"too_large": 1})


def summary(decoder: Callable[..., Change], value: bytes | None) -> tuple[object, ...]:
    try:
        ch = decoder(value, "t", 0, 1)
    except BadMessage as bad:
        assert bad.error_class in ERROR_CLASSES
        return ("dlq", bad.error_class)
    assert isinstance(ch, Change) and isinstance(ch.segment_id, str) and ch.segment_id
    assert ch.value is value
    return ("routed", ch.action, ch.segment_id, ch.old_values_unknown, ch.retirement)


def outcome(value: bytes | None) -> str:
    """Decode, and route through BatchRouter: exactly one output (bucket or DLQ) besides a retirement.
    The fast path (typed partial decode) and the full path must agree on every input."""
    fast = summary(decode, value)
    assert fast == summary(_decode_full, value)
    result = str(fast[0])
    sink, _ = route_all([value])
    own = [o for o in sink.out if o[4] != [("bucketer-derived", b"retirement")]]
    assert len(own) == 1 and own[0][0] == ("bucket" if result == "routed" else "dlq")
    assert own[0][3] == value  # the original bytes, whichever way it went
    return result


FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    assert outcome(data) in ("routed", "dlq")


SEEDS = [m.value for m in scenario(11, 40, 10)]
# JSON edge cases where a partial (skipping) parser and a full one could disagree.
SPLICES = [
    b"1e999",
    b"-1e400",
    b"1" * 400,
    b"NaN",
    b"Infinity",
    b"\\ud800",
    b"\\q",
    b"\x80",
    b"\xc3\xa9",
    b"01",
    b'"segmentId":"dup",',
    b'"record":null,',
    b'"action":"delete",',
    b"\x00",
    b"tru",
    b"[]",
]
SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
)
JSON = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=10,
)


@FUZZ
@given(st.sampled_from(SEEDS), st.data())
def test_fuzz_mutated_messages(seed: bytes | None, data: st.DataObject) -> None:
    if seed is None:
        assert outcome(seed) == "dlq"
        return
    how = data.draw(st.sampled_from(["flip", "cut", "splice", "field", "record_field", "changes"]))
    buf = bytearray(seed)
    if how == "flip" and buf:
        for _ in range(data.draw(st.integers(1, 5))):
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
        value = bytes(buf)
    elif how == "cut":
        value = bytes(buf[: data.draw(st.integers(0, len(buf)))])
    elif how == "splice":
        at = data.draw(st.integers(0, len(buf)))
        value = bytes(buf[:at]) + data.draw(st.binary(max_size=20) | st.sampled_from(SPLICES)) + bytes(buf[at:])
    else:
        try:
            msg = orjson.loads(seed)
        except orjson.JSONDecodeError:
            msg = {}
        if not isinstance(msg, dict):
            msg = {}
        target = msg.get("record") if how == "record_field" and isinstance(msg.get("record"), dict) else msg
        if how == "changes":
            target, msg["action"] = msg, "update"
        name = data.draw(
            st.sampled_from(
                [
                    "action",
                    "record",
                    "changes",
                    "segmentId",
                    "timestamp",
                    "updatedAt",
                    "type",
                    "memberId",
                    "metadata",
                    "channel",
                ]
            )
        )
        target[name] = data.draw(JSON)
        value = orjson.dumps(msg)
    assert outcome(value) in ("routed", "dlq")


def test_fuzz_covers_both_outcomes() -> None:
    """The fuzz inputs above are not all rejected: mutated valid messages still route sometimes."""
    rng = random.Random(5)
    results = Counter()
    for seed in SEEDS:
        if seed is None or outcome(seed) == "dlq":
            continue
        msg = orjson.loads(seed)
        if isinstance(msg.get("record"), dict):
            msg["record"]["score"] = rng.random()
        results[outcome(orjson.dumps(msg))] += 1
        results[outcome(seed[: rng.randint(0, len(seed) - 1)])] += 1
    assert results["routed"] > 0 and results["dlq"] > 0


@FUZZ
@given(
    st.text(alphabet="0123456789-:.TtZz+ W", min_size=0, max_size=34)
    | st.builds(
        lambda cut, extra: "2025-03-01T10:00:00.000000Z"[:cut] + extra,
        st.integers(0, 27),
        st.text(alphabet="0123456789-:.TtZz+", max_size=8),
    ),
    st.sampled_from(["timestamp", "createdAt", "updatedAt"]),
    st.sampled_from(["insert", "delete", "read"]),
)
def test_fuzz_timestamps_fast_and_full_paths_agree(ts: str, column: str, action: str) -> None:
    """The fast path parses timestamps with msgspec (C), the full path with fromisoformat or msgspec."""
    rec = row(random.Random(0), "a1", SEG_A)
    rec[column] = ts
    assert outcome(message(action, rec)) in ("routed", "dlq")


def test_fast_and_full_paths_agree_on_long_fractions() -> None:
    """Found by the fuzz: the fast path took a timestamp with hundreds of fraction digits, which ClickHouse
    refuses past 19 (the loader would have stored NULL or failed); both paths now use one rule."""
    ok = dict(row(RNG, "f1", SEG_A), createdAt="2024-03-03T12:35:19." + "1" * 19 + "Z")
    bad = dict(row(RNG, "f2", SEG_A), createdAt="2024-03-03T12:35:19." + "1" * 400 + "Z")
    assert summary(decode, message("insert", ok))[0] == "routed"
    for decoder in (decode, _decode_full):
        assert summary(decoder, message("insert", bad)) == ("dlq", "bad_timestamp")
