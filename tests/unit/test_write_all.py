"""The warehouse's batch writer: every byte out, in order, including after a short write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connectors import warehouse


def test_write_all_writes_every_chunk_in_order(tmp_path: Path) -> None:
    chunks = [f'{{"n":{i}}}'.encode() * (i % 7 + 1) for i in range(3000)]  # more than one writev group
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        warehouse.write_all(fd, chunks)
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == b"".join(chunks)


def test_write_all_finishes_a_short_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.writev

    def short(fd: int, bufs: list[bytes]) -> int:  # the kernel may take less than asked
        return real(fd, [bufs[0][:3]])

    monkeypatch.setattr(warehouse.os, "writev", short)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        warehouse.write_all(fd, [b"abcdef", b"ghij", b"k"])
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == b"abcdefghijk"
