"""The bucket function: ClickHouse's ``cityHash64(segmentId) % N``, bit for bit.

Pure: bytes (or str, hashed as its UTF-8 bytes) in, int out, no I/O. ClickHouse's ``cityHash64`` is
CityHash **v1.0.2**; the PyPI package ``cityhash`` is v1.1 and disagrees on almost every input, so the
implementation here is ``clickhouse-cityhash`` and ``tests/unit/test_buckets.py`` checks it against
values computed by ClickHouse itself (``../shared/vectors/cityhash64.jsonl``).
"""

from __future__ import annotations

from clickhouse_cityhash.cityhash import CityHash64


def city_hash64(data: bytes | str) -> int:
    """ClickHouse ``cityHash64`` of one String value (a str is hashed as its UTF-8 bytes)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return int(CityHash64(data))


def bucket_of(segment_id: bytes | str, buckets: int) -> int:
    """``cityHash64(segmentId) % buckets`` exactly as ClickHouse computes it (UInt64 modulo)."""
    if buckets < 1:
        raise ValueError(f"the number of buckets must be at least 1, got {buckets}")
    return city_hash64(segment_id) % buckets


def raw_table(bucket: int) -> str:
    return f"activityRelations_bucket_MV_ds_{bucket}"


def bucket_of_raw(table: str) -> int | None:
    """The bucket whose raw table ``table`` is (``raw_table``'s inverse); None for any other name."""
    prefix = raw_table(0)[:-1]
    tail = table[len(prefix) :] if table.startswith(prefix) else ""
    return int(tail) if tail.isdigit() and raw_table(int(tail)) == table else None


def cleaned_table(bucket: int) -> str:
    return f"activityRelations_deduplicated_cleaned_bucket_{bucket}_ds"
