"""``bucketer rebucket --to M``: move the warehouse from N to M buckets (strategy ``cutover``).

The raw rows are redistributed inside ClickHouse, never through Python:

1. refuse while the loader still has unloaded messages (its group lag on the N bucket topics and the resolve
   topic, counted as its read_committed consumer sees them: transaction markers are not messages), since those
   were routed
   under N and would land in the wrong table afterwards (``--force`` skips the check);
2. build every new raw bucket aside (``<raw table>__rebucket``) with
   ``INSERT … SELECT * FROM <all N raw tables> WHERE cityHash64(segmentId) % M = m`` — every version and every
   delete marker moves, so ``FINAL`` gives the same live rows as before;
3. verify: the live rows (``FINAL``) of the new layout and a hash of their identities and versions equal the
   old ones, and no row is in a bucket other than its hash says; on a mismatch nothing is swapped and the aside
   tables are dropped;
4. swap: each bucket below min(N, M) is exchanged with its rebuilt table (``Warehouse.exchange``: ``EXCHANGE
   TABLES`` where the database engine has it, else its documented fallback), new buckets are renamed into
   place, buckets ≥ M dropped;
5. ``ensure_schema(M)`` redefines the union, routing and project views and records M; every cleaned bucket is
   rebuilt for the new layout (cleaned tables of buckets ≥ M are dropped).

Then the router restarts with ``--buckets M`` (it creates the new bucket topics; its consumer offsets on the
source topic carry on) and the loader restarts without ``--buckets`` (it reads M from the warehouse). The
warehouse must not be written to during steps 2–4: with the embedded engine the data-dir lock guarantees it
(``bucketer run`` must be stopped); with a server, stop the loaders first. ``gradual`` (serve N while M is
built from the source topic) is not implemented.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from connectors.kafka import group_lag
from connectors.kafka_conn import KafkaConnection
from connectors.model import SORT_KEY, bucket_sql
from connectors.topics import TopicNames
from connectors.warehouse import Warehouse
from stream.buckets import cleaned_table, raw_table
from stream.enrich import Enricher, RebuildResult
from stream.schema import bucket_count, ensure_schema, raw_table_ddl

log = logging.getLogger("bucketer.rebucket")
ASIDE = "__rebucket"


class RebucketError(RuntimeError):
    """The move was refused or failed; the warehouse is left on its previous bucket count."""


@dataclass
class RebucketReport:
    old: int
    new: int
    rows: int
    per_bucket: list[int]
    rebuilds: list[RebuildResult]


def loader_lag(kafka: KafkaConnection, group: str, topics: TopicNames, buckets: int, timeout: float = 10.0) -> int:
    """Messages on the N bucket topics and the resolve topic (the loader lands both: a key-only delete or an
    update without old values waiting there belongs to the layout under N) the loader group has not committed
    yet, counted as its read_committed
    consumer sees them (``group_lag``: transaction markers are not messages, so a drained loader has 0; a topic
    never read counts whole; a missing topic counts nothing), plus what sits in transactions still open on
    them (a router still running: those may become messages routed under N)."""
    lag = group_lag(kafka, group, [*topics.buckets(buckets), topics.resolve], timeout)
    if lag.pending:
        log.info(
            "rebucket: %d offsets of the bucket and resolve topics are in open transactions (is a router running?)",
            lag.pending,
        )
    return lag.at_most


def _fingerprint(wh: Warehouse, tables: list[str]) -> tuple[tuple[int, int], list[int]]:
    """(live rows, order-free hash of every live row's identity and version) over ``tables``, and live rows per
    table. Compared under FINAL: ReplacingMergeTree may collapse superseded versions on insert or merge, so raw
    row counts legitimately differ between two layouts holding the same data."""
    per_table, rows, digest = [], 0, 0
    for t in tables:
        identity = ", ".join(("activityId", *SORT_KEY, "_version"))
        n, h = wh.rows(f"SELECT count(), sum(cityHash64({identity})) FROM {t} FINAL")[0]
        per_table.append(int(n))
        rows, digest = rows + int(n), (digest + int(h or 0)) % 2**64
    return (rows, digest), per_table


def rebucket(wh: Warehouse, to: int, enricher: Enricher, *, parallel: int = 1) -> RebucketReport:
    old = bucket_count(wh)
    if old is None:
        raise RebucketError("no bucketer schema in this warehouse; nothing to move")
    if to < 1:
        raise RebucketError(f"the number of buckets must be at least 1, got {to}")
    if to == old:
        raise RebucketError(f"the warehouse already has {old} buckets")
    sources = " UNION ALL ".join(f"SELECT * FROM {raw_table(n)}" for n in range(old))
    before = _fingerprint(wh, [raw_table(n) for n in range(old)])
    asides = [raw_table(m) + ASIDE for m in range(to)]
    try:
        for m, aside in enumerate(asides):
            wh.command(f"DROP TABLE IF EXISTS {aside} SYNC")
            wh.command(raw_table_ddl(m).replace(raw_table(m), aside, 1))
            wh.command(f"INSERT INTO {aside} SELECT * FROM ({sources}) WHERE {bucket_sql('segmentId', to)} = {m}")
        after = _fingerprint(wh, asides)
        misplaced = sum(
            int(wh.rows(f"SELECT countIf({bucket_sql('segmentId', to)} != {m}) FROM {a}")[0][0])
            for m, a in enumerate(asides)
        )
        if after[0] != before[0] or misplaced:
            raise RebucketError(
                f"verification failed: {after[0][0]} live rows in the new layout, {before[0][0]} in "
                f"the old, {misplaced} misplaced; nothing was swapped"
            )
    except BaseException:
        for aside in asides:
            wh.command(f"DROP TABLE IF EXISTS {aside} SYNC")
        raise
    total, per_bucket = before[0][0], after[1]
    for m, aside in enumerate(asides):
        if m < old:
            wh.exchange(raw_table(m), aside)
            wh.command(f"DROP TABLE IF EXISTS {aside} SYNC")
        else:
            wh.command(f"DROP TABLE IF EXISTS {raw_table(m)} SYNC")
            wh.command(f"RENAME TABLE {aside} TO {raw_table(m)}")
    # Views over M buckets first: they must not name tables about to be dropped. Only rebucket changes N.
    ensure_schema(wh, to, allow_change=True)
    for n in range(to, old):
        wh.command(f"DROP TABLE IF EXISTS {raw_table(n)} SYNC")
        wh.command(f"DROP TABLE IF EXISTS {cleaned_table(n)} SYNC")
    log.info("rebucket: %d -> %d buckets, %d live rows moved", old, to, total)
    rebuilds = enricher.rebuild_many(range(to), parallel=parallel)
    return RebucketReport(old, to, total, per_bucket, rebuilds)
