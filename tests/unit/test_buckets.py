"""The bucket function against ClickHouse: every vector row, and the embedded engine on random keys."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest

from stream.buckets import bucket_of, city_hash64


@pytest.fixture(scope="module")
def vectors(vectors_path: Path) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in vectors_path.read_text().splitlines() if line.strip()]
    assert len(rows) > 500
    return rows


@pytest.mark.parametrize("n", [10, 20, 50, 100])
def test_every_vector_row(vectors: list[dict[str, object]], n: int) -> None:
    wrong = [
        (r["segmentId"], bucket_of(str(r["segmentId"]), n), r[f"bucket_{n}"])
        for r in vectors
        if bucket_of(str(r["segmentId"]), n) != r[f"bucket_{n}"]
    ]
    assert wrong == []


def test_full_hash_of_every_vector_row(vectors: list[dict[str, object]]) -> None:
    assert [city_hash64(str(r["segmentId"])) for r in vectors] == [int(str(r["cityHash64"])) for r in vectors]


def test_str_and_utf8_bytes_agree() -> None:
    for s in ["", "a", "ß-üñí©ødé", "5ab72c4b-1047-4735-ae83-096d47d0cdaf", "😀" * 40]:
        assert city_hash64(s) == city_hash64(s.encode("utf-8"))


def test_pypi_cityhash_is_a_different_function(vectors: list[dict[str, object]]) -> None:
    """Why the implementation is clickhouse-cityhash: PyPI ``cityhash`` (v1.1) disagrees with ClickHouse."""
    import cityhash

    differs = sum(cityhash.CityHash64(str(r["segmentId"]).encode()) != int(str(r["cityHash64"])) for r in vectors)
    assert differs > 0.9 * len(vectors)


def test_bucket_count_must_be_positive() -> None:
    with pytest.raises(ValueError):
        bucket_of("x", 0)


def test_against_embedded_clickhouse_on_random_keys() -> None:
    import chdb

    rng = random.Random(20261123)
    alphabet = string.ascii_letters + string.digits + "-_ éß😀\t"
    keys = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 130))) for _ in range(2000)]
    keys += [bytes(rng.getrandbits(8) for _ in range(16)).hex() for _ in range(200)]
    # Pass the keys as hex so no quoting or escaping can change a byte on the way into SQL.
    arr = ",".join(f"unhex('{k.encode().hex()}')" for k in keys)
    res = chdb.query(
        f"SELECT toString(cityHash64(k)) FROM (SELECT arrayJoin([{arr}]) AS k) SETTINGS max_query_size = 10000000",
        "CSV",
    )
    theirs = [int(line.strip('"')) for line in str(res).split()]
    assert len(theirs) == len(keys)
    assert [city_hash64(k) for k in keys] == theirs
    assert [h % 20 for h in theirs] == [bucket_of(k, 20) for k in keys]


def test_bucket_topics_share_a_fixed_partition_budget_by_default() -> None:
    from connectors.topics import BUCKET_PARTITION_BUDGET, bucket_partitions

    assert BUCKET_PARTITION_BUDGET == 30
    assert [bucket_partitions(n) for n in (1, 10, 20, 29, 30, 50, 100)] == [30, 3, 2, 2, 1, 1, 1]
    for n in (10, 20, 50, 100):
        total = n * bucket_partitions(n)
        assert total <= max(n, BUCKET_PARTITION_BUDGET + n)  # the total stays near the budget, not N x 3
    assert bucket_partitions(100, 6) == 6  # an explicit --partitions wins
