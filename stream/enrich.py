"""Enrichment: rebuild a cleaned bucket from its raw bucket and the reference tables (CLEANED_BUCKETS.md).

This is the replace-only path (``--refresh hourly``) and the full computation the incremental mode's
reconciliation compares with (stream/incremental.py, which also corrects the cleaned buckets change by change
with the same ``cleaning_select``). The cleaning rules themselves are in stream/cleaning.py.

One rebuild of bucket ``n`` (``Enricher.rebuild(n)``):

1. Country codes: ``refresh_country_codes`` codes the organizations' new (country, location) pairs
   (stream/cleaning.py).
2. Reference state, once per batch of buckets: ``prepare_reference`` (stream/cleaning.py) builds the small
   in-memory member and channel sets and the organization lookup the bucket queries probe.
3. Build aside: ``DROP`` any leftover ``<cleaned>__next``, create it with the cleaned layout, and
   ``INSERT INTO <cleaned>__next`` the ``cleaning_select`` of the raw bucket (stream/cleaning.py) with the
   run's snapshotId, in blocks of about a quarter of the bucket (``insert_block_rows``) so reading and writing overlap.
4. Swap: ``wh.exchange(<cleaned>, <cleaned>__next)`` (``EXCHANGE TABLES``, atomic, where the database has it,
   which chdb and a default server do; the warehouse seam documents its non-atomic fallback). Then the
   previous snapshot, now under the aside name, is dropped (SYNC). A failure or a kill anywhere before the
   swap leaves the previous snapshot untouched and readable; the leftover ``__next`` is dropped by the next run.

Concurrency: never two rebuilds of one bucket at once — an in-process lock per bucket plus, when a
``lock_dir`` is given, an flock on ``lock_dir/bucket-<n>.lock`` for other processes on the host (the CLI uses
``<data-dir>/locks``). A busy bucket raises ``BucketBusyError`` (the scheduler skips it until its next slot).
Workers on several hosts against one server must share the lock dir or own disjoint buckets.
``rebuild_many(buckets, parallel=K)`` refreshes the codes and prepares the reference state once, and rebuilds
up to K buckets at a time, each on its own warehouse connection from ``connect()``; ``rebuild(n)`` alone does
the same for one bucket.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from connectors.warehouse import Warehouse, WarehouseError, one_line
from stream.buckets import cleaned_table, raw_table
from stream.cleaning import (
    ReferenceState,
    cleaning_select,
    drop_reference,
    prepare_reference,
    refresh_country_codes,
)
from stream.schedule import Clock, SystemClock
from stream.schema import cleaned_table_ddl

log = logging.getLogger("bucketer.enrich")

# One row per finished rebuild: when it finished, how long it took, its rows and snapshot (status reads it).
REBUILD_LOG = "bucketer_rebuilds"
ASIDE_SUFFIX = "__next"


class EnrichError(RuntimeError):
    """A rebuild failed; the previous snapshot of the bucket is still in place."""


class BucketBusyError(EnrichError):
    """Another rebuild of the same bucket is running (in this process or another)."""


@dataclass(frozen=True)
class RebuildResult:
    bucket: int
    status: str  # "ok" | "busy" | "failed"
    rows: int = 0
    seconds: float = 0.0
    snapshot_id: datetime | None = None
    error: str = ""
    differing: int | None = None  # a reconciliation: rows that differed from the full rebuild (expected 0)


def rebuild_log_ddl() -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {REBUILD_LOG} (bucket UInt32, finishedAt DateTime64(3, 'UTC'), "
        f"snapshotId DateTime('UTC'), rows UInt64, seconds Float64) ENGINE = MergeTree ORDER BY (bucket, finishedAt)"
    )


# A rebuild's INSERT … SELECT hands the table writer blocks of min_insert_block_size_rows rows (ClickHouse's
# default: 1,048,576), and by default one thread writes them. Reading and cleaning run while the previous block
# is sorted and written, so a bucket that fits in one block reads everything first and then writes on one
# core, with nothing to overlap: at 10M activities in 10 buckets that made the buckets' sum 1.4x one unbucketed
# rebuild. Blocks of about a quarter of the source keep both going, and max_insert_threads (the engine's
# max_threads) lets several blocks be sorted and written at once; big tables keep the default block size
# (smaller blocks only add parts there). A 94k-row bucket took 70 ms with its 32Ki-row blocks and 2 writers,
# against 96-112 ms as one 64Ki-row block with 1 writer. Measured in bench/bench_enrich.py (bench/RESULTS.md).
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS, BLOCKS_PER_REBUILD = 16_384, 1_048_576, 4


def insert_block_rows(source_rows: int) -> int:
    """Rows per block written by a rebuild of a table of ``source_rows`` raw rows: a power of two, so
    that a rebuild writes about ``BLOCKS_PER_REBUILD`` blocks, within [16Ki, 1Mi]."""
    want = max(1, source_rows // BLOCKS_PER_REBUILD)
    return min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, 1 << (want - 1).bit_length()))


def cleaning_insert(wh: Warehouse, target: str, source: str, ref: ReferenceState) -> str:
    """``INSERT INTO target`` the cleaned rows of ``source`` (takes the ``snapshot`` parameter), with the block
    size of ``insert_block_rows`` for the source's current row count (active parts; a cheap metadata read) and
    as many writer threads as the engine's max_threads."""
    rows = wh.rows(
        "SELECT (SELECT sum(rows) FROM system.parts WHERE database = currentDatabase() AND table = {t:String} "
        "AND active), getSetting('max_threads')",
        {"t": source},
    )
    source_rows, threads = (int(rows[0][0] or 0), int(rows[0][1] or 1)) if rows else (0, 1)
    return (
        f"INSERT INTO {target} {cleaning_select(source, ref)}\n"
        f"SETTINGS min_insert_block_size_rows = {insert_block_rows(source_rows)}, min_insert_block_size_bytes = 0, "
        f"max_insert_threads = {threads}"
    )


def snapshot_of(now: datetime) -> datetime:
    """The start of the UTC hour of ``now``."""
    return now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


_inproc_locks: dict[tuple[str, int], threading.Lock] = {}
_inproc_guard = threading.Lock()


@contextmanager
def bucket_lock(bucket: int, lock_dir: Path | None) -> Iterator[None]:
    """Hold bucket ``bucket`` exclusively (in this process, and on the host through ``lock_dir``), or raise
    BucketBusyError at once."""
    key = (str(lock_dir.resolve()) if lock_dir else "", bucket)
    with _inproc_guard:
        lock = _inproc_locks.setdefault(key, threading.Lock())
    if not lock.acquire(blocking=False):
        raise BucketBusyError(f"bucket {bucket} is being rebuilt in this process")
    fd = -1
    try:
        if lock_dir is not None:
            lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_dir / f"bucket-{bucket}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise BucketBusyError(f"bucket {bucket} is being rebuilt by another process") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the flock
        lock.release()


def log_rebuild(wh: Warehouse, bucket: int, finished: datetime, snapshot: datetime, rows: int, seconds: float) -> None:
    """Record a finished rebuild or reconciliation of ``bucket`` in REBUILD_LOG (``status`` reads it). Written
    after the new rows are in place, so a failure here only costs the log line, and is logged."""
    try:
        wh.command(rebuild_log_ddl())
        wh.command(
            f"INSERT INTO {REBUILD_LOG} (bucket, finishedAt, snapshotId, rows, seconds) VALUES ({{b:UInt32}}, "
            f"parseDateTime64BestEffort({{f:String}}, 3, 'UTC'), toDateTime({{s:String}}, 'UTC'), "
            f"{{r:UInt64}}, {{d:Float64}})",
            {
                "b": bucket,
                "f": finished.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),
                "s": snapshot.strftime("%Y-%m-%d %H:%M:%S"),
                "r": rows,
                "d": seconds,
            },
        )
    except WarehouseError as exc:
        log.warning("enrich: bucket %d refreshed, but the rebuild log was not written: %s", bucket, exc)


class Enricher:
    """Rebuilds cleaned buckets. ``connect()`` returns a new (unopened) warehouse; each rebuild opens its own.

    ``before_swap(wh, bucket)`` runs after the new snapshot is built and before it is swapped in (tests use
    it to fail or stall a rebuild at its most delicate point)."""

    def __init__(
        self,
        connect: Callable[[], AbstractContextManager[Warehouse]],
        *,
        clock: Clock | None = None,
        lock_dir: Path | None = None,
        before_swap: Callable[[Warehouse, int], None] | None = None,
    ) -> None:
        self._connect = connect
        self._clock = clock or SystemClock()
        self._lock_dir = lock_dir
        self._before_swap = before_swap

    def refresh_countries(self) -> int:
        with self._connect() as wh:
            return refresh_country_codes(wh)

    def rebuild(self, bucket: int, *, ref: ReferenceState | None = None) -> RebuildResult:
        """Rebuild cleaned bucket ``bucket`` now; raises BucketBusyError or EnrichError. Without ``ref`` (the
        reference state of a batch) it refreshes the country codes and prepares its own."""
        if bucket < 0:
            raise EnrichError(f"invalid bucket {bucket}")
        with bucket_lock(bucket, self._lock_dir):
            try:
                with self._connect() as wh:
                    return self._rebuild_locked(wh, bucket, ref)
            except WarehouseError as exc:
                raise EnrichError(f"rebuild of bucket {bucket} failed (previous snapshot kept): {exc}") from exc

    def _rebuild_on(self, wh: Warehouse, bucket: int, ref: ReferenceState) -> RebuildResult:
        """``rebuild`` on an open connection (a batch reuses one connection per worker)."""
        with bucket_lock(bucket, self._lock_dir):
            try:
                return self._rebuild_locked(wh, bucket, ref)
            except WarehouseError as exc:
                raise EnrichError(f"rebuild of bucket {bucket} failed (previous snapshot kept): {exc}") from exc

    def _rebuild_locked(self, wh: Warehouse, bucket: int, ref: ReferenceState | None) -> RebuildResult:
        started = time.monotonic()
        snapshot = snapshot_of(self._clock.now())
        aside = cleaned_table(bucket) + ASIDE_SUFFIX
        own = None
        if ref is None:
            refresh_country_codes(wh)
            ref = own = prepare_reference(wh)
        try:
            wh.command(f"DROP TABLE IF EXISTS {aside} SYNC")
            wh.command(cleaned_table_ddl(bucket, aside))
            wh.command(
                cleaning_insert(wh, aside, raw_table(bucket), ref),
                {"snapshot": snapshot.strftime("%Y-%m-%d %H:%M:%S")},
            )
            rows = int(wh.rows(f"SELECT count() FROM {aside}")[0][0])
            if self._before_swap is not None:
                self._before_swap(wh, bucket)
            self._swap(wh, bucket)
        finally:
            if own is not None:
                drop_reference(wh, own)
        seconds = time.monotonic() - started
        log.info("enrich: bucket %d rebuilt, %d rows, snapshot %s, %.2fs", bucket, rows, snapshot, seconds)
        self._log_rebuild(wh, bucket, snapshot, rows, seconds)
        return RebuildResult(bucket, "ok", rows=rows, seconds=seconds, snapshot_id=snapshot)

    def _log_rebuild(self, wh: Warehouse, bucket: int, snapshot: datetime, rows: int, seconds: float) -> None:
        log_rebuild(wh, bucket, self._clock.now(), snapshot, rows, seconds)

    def _swap(self, wh: Warehouse, bucket: int) -> None:
        target = cleaned_table(bucket)
        aside = target + ASIDE_SUFFIX
        wh.command(cleaned_table_ddl(bucket))  # a first rebuild before ensure_schema: nothing to exchange with
        wh.exchange(target, aside)  # atomic where the database has EXCHANGE (its fallback: Warehouse.exchange)
        wh.command(f"DROP TABLE IF EXISTS {aside} SYNC")

    def rebuild_many(self, buckets: Iterable[int], parallel: int = 1) -> list[RebuildResult]:
        """Rebuild ``buckets``, up to ``parallel`` at once; never raises for one bucket's failure."""
        todo = list(dict.fromkeys(buckets))
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        try:
            with self._connect() as wh:
                refresh_country_codes(wh)
                ref = prepare_reference(wh)
                try:
                    return self._rebuild_all(wh, todo, parallel, ref)
                finally:
                    drop_reference(wh, ref)
        except WarehouseError as exc:
            return [RebuildResult(b, "failed", error=f"reference state: {one_line(exc)}") for b in todo]

    def _rebuild_all(self, wh: Warehouse, todo: list[int], parallel: int, ref: ReferenceState) -> list[RebuildResult]:
        """Each worker thread opens one connection and keeps it for the batch (opening one costs tens of ms)."""
        serial = parallel == 1 or len(todo) <= 1
        local = threading.local()
        opened: list[AbstractContextManager[Warehouse]] = []
        guard = threading.Lock()

        def connection() -> Warehouse:
            if serial:
                return wh
            conn = getattr(local, "wh", None)
            if conn is None:
                cm = self._connect()
                conn = cm.__enter__()
                with guard:
                    opened.append(cm)
                local.wh = conn
            return conn

        def one(b: int) -> RebuildResult:
            try:
                return self._rebuild_on(connection(), b, ref)
            except BucketBusyError as exc:
                log.warning("enrich: %s", exc)
                return RebuildResult(b, "busy", error=str(exc))
            except Exception as exc:  # one bucket's failure must not stop the others
                log.error("enrich: %s", one_line(exc))
                return RebuildResult(b, "failed", error=one_line(exc))

        try:
            if serial:
                return [one(b) for b in todo]
            with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="enrich") as pool:
                return list(pool.map(one, todo))
        finally:
            for cm in opened:
                try:
                    cm.__exit__(None, None, None)
                except Exception as exc:  # closing must not hide the results
                    log.warning("enrich: closing a connection: %s", one_line(exc))
