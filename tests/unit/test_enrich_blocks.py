"""The rebuild's block size: about a quarter of the source, a power of two, within [16Ki, 1Mi]."""

from stream.enrich import MAX_BLOCK_ROWS, MIN_BLOCK_ROWS, insert_block_rows


def test_small_and_empty_sources_get_the_floor() -> None:
    assert insert_block_rows(0) == MIN_BLOCK_ROWS == 16_384
    assert insert_block_rows(60_000) == MIN_BLOCK_ROWS
    assert insert_block_rows(100_000) == 32_768  # a 1M-activity bucket: written in blocks too, not in one


def test_a_bucket_is_written_in_about_four_blocks() -> None:
    assert insert_block_rows(930_000) == 262_144  # 232,500 rounded up to a power of two
    assert insert_block_rows(2_000_000) == 524_288
    for rows in (100_000, 300_000, 930_000, 2_000_000, 3_900_000):
        block = insert_block_rows(rows)
        assert block & (block - 1) == 0
        assert 2 <= -(-rows // block) <= 4


def test_big_tables_keep_clickhouse_default() -> None:
    assert insert_block_rows(10_000_000) == MAX_BLOCK_ROWS == 1_048_576
    assert insert_block_rows(10**9) == MAX_BLOCK_ROWS
