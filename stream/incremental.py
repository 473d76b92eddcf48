"""Incremental maintenance of the cleaned buckets: every landed change corrects only the cleaned rows it affects.

The cleaned bucket is a ReplacingMergeTree(_version, _deleted) keyed by the raw identity (stream/schema.py), so
a **correction** of a set K of raw identities is one INSERT: the cleaning rules (``cleaning.cleaning_select``,
the same definition the full rebuild uses) over ``raw FINAL WHERE identity IN K`` with the CURRENT reference
state, read through small filtered subqueries (the members, organizations and repositories of K's rows only),
plus a tombstone (``_deleted = 1``) for each identity of K that is in the cleaned bucket but no longer passes
(retired raw row, bot member, disabled repository …). ``_version`` is the engine's ``now64(9)`` of the
correction's query, so a correction that read the state later always wins. The rows are computed into a small
in-memory stage first (that gives the rows-written count) and then inserted as ONE block, i.e. one part:
readers (FINAL) see a correction entirely or not at all.

Finding K without scanning buckets — structures filled by materialized views, at landing time:

- ``bucketer_cleaned_queue_{n}``: every row inserted into raw bucket n (its identity, updatedAt and
  ``at`` = the engine clock in ns). Activities, retirements, replays: K = the queue entries after the
  bucket's watermark.
- ``bucketer_cleaned_index_{n}``: identity by ``(kind, key, key2)``: memberId (kind 1), organizationId
  (kind 2) and, for git platforms, ``(lower(channel), segmentId)`` (kind 3); every version ever landed
  (stale extra candidates are harmless: the correction re-reads the raw row FINAL).
- ``bucketer_ref_changes``: every row inserted into a reference table (table, id, updatedAt, ``at``).
  members → index kind 1; organizations → kind 2 (their country codes are resolved first); repositories,
  insightsProjects, integrations → the affected repositories (by id, insightsProjectId, sourceIntegrationId),
  both as they are now and as the cleaned buckets were last corrected with
  (``bucketer_applied_repositories``, updated only AFTER the corrections, so a crash in between still knows
  the old url), → their channels (lower(url), and the gerrit query-URL variant) → index kind 3.

``bucketer_cleaned_state`` (ReplacingMergeTree by name): per bucket the activity watermark, the freshness
(the newest Sequin ``commit_timestamp`` applied: the loader hands each landed batch's marks to ``landed``, a
reference table's to every bucket, and the next round that covers them records them; ``freshness_lag`` = now −
that) and the
snapshotId its corrections write (the hour of the bucket's last reconciliation); ``refs`` holds the
reference-change watermark. Watermarks advance only after the corrections they cover are written, so a crash
anywhere replays the corrections, which is harmless (a correction is a pure function of the current state).

Reconciliation (``Maintainer.reconcile(n)``, the hourly job in incremental mode): the full rebuild is computed
aside, compared with the maintained bucket FINAL on every column but snapshotId/_version (identity plus a
hash of the row), and only the differing rows are applied — with the aside's own ``_version`` (its read time),
so a correction that ran meanwhile, having read later, is never overwritten. Returns the number of differing
rows (expected 0), logged and recorded in the state.

Bulk: past ``BULK_ROWS`` queued rows in a bucket (or reference changes), e.g. after a bootstrap replay, the
bucket (or every bucket) is reconciled in full instead: cheaper than a correction of that many identities.

Concurrency: one Maintainer per warehouse at a time (the embedded engine is one process anyway); the
watermarks assume the queues are written by the same process that corrects them (see docs/CONTRACTS.md).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from connectors.model import GIT_PLATFORMS, gerrit_variant_sql
from connectors.warehouse import Warehouse, one_line, schema_command
from stream.buckets import cleaned_table, raw_table
from stream.cleaning import (
    COUNTRY_TABLE,
    VERSION_NOW,
    Lookups,
    allowed_channels_sql,
    cleaning_select,
    country_table_ddl,
    drop_reference,
    drop_stale,
    organization_lookup_sql,
    prepare_reference,
    real_members_sql,
    refresh_country_codes,
)
from stream.enrich import RebuildResult, cleaning_insert, log_rebuild, snapshot_of
from stream.schedule import Clock
from stream.schema import (
    ACTIVITY_NAMES,
    CLEANED_NAMES,
    REFERENCE_COLUMNS,
    SORT_KEY,
    cleaned_columns_ddl,
    cleaned_table_ddl,
    migrate_cleaned_layout,
)

log = logging.getLogger("bucketer.maintain")

IDENT = ", ".join(SORT_KEY)
IDENT_DDL = (
    "segmentId String, timestamp DateTime64(3, 'UTC'), type LowCardinality(String), "
    "platform LowCardinality(String), channel String, sourceId String"
)
REF_CHANGES = "bucketer_ref_changes"
APPLIED_REPOS = "bucketer_applied_repositories"
STATE = "bucketer_cleaned_state"
WORK_PREFIX = "bucketer_cleaned_work_"
KIND_MEMBER, KIND_ORG, KIND_CHANNEL = 1, 2, 3
# Above this many queued raw rows a bucket is reconciled in full instead of corrected identity by identity
# (a correction costs ~5x a rebuild per row: 300k rows took 6.3 s against 1.1 s for the full reconciliation).
BULK_ROWS = 250_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def queue_table(n: int) -> str:
    return f"bucketer_cleaned_queue_{n}"


def index_table(n: int) -> str:
    return f"bucketer_cleaned_index_{n}"


def maintenance_ddl(buckets: int) -> list[str]:
    """The tables and materialized views of the maintenance, idempotent (CREATE … IF NOT EXISTS)."""
    git = ", ".join(f"'{p}'" for p in GIT_PLATFORMS)
    out = [
        f"CREATE TABLE IF NOT EXISTS {REF_CHANGES} (tbl LowCardinality(String), id String, "
        f"updatedAt DateTime64(3, 'UTC'), at UInt64) ENGINE = MergeTree ORDER BY at "
        f"TTL toDateTime(intDiv(at, 1000000000)) + INTERVAL 7 DAY",
        f"CREATE TABLE IF NOT EXISTS {APPLIED_REPOS} (id String, url String, segmentId String, "
        f"insightsProjectId String, sourceIntegrationId String, at UInt64) "
        f"ENGINE = ReplacingMergeTree(at) ORDER BY id",
        f"CREATE TABLE IF NOT EXISTS {STATE} (name String, watermark UInt64, freshness DateTime64(3, 'UTC'), "
        f"snapshotId DateTime('UTC'), differing Int64 DEFAULT -1, at DateTime64(9, 'UTC') DEFAULT now64(9)) "
        f"ENGINE = ReplacingMergeTree(at) ORDER BY name",
        country_table_ddl(),
    ]
    for table in REFERENCE_COLUMNS:
        out.append(
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS bucketer_ref_changes_mv_{table} TO {REF_CHANGES} AS "
            f"SELECT '{table}' AS tbl, id, updatedAt, {VERSION_NOW} AS at FROM {table}"
        )
    for n in range(buckets):
        out += [
            f"CREATE TABLE IF NOT EXISTS {queue_table(n)} (at UInt64, {IDENT_DDL}, updatedAt DateTime64(3, 'UTC')) "
            f"ENGINE = MergeTree ORDER BY at TTL toDateTime(intDiv(at, 1000000000)) + INTERVAL 7 DAY",
            f"CREATE TABLE IF NOT EXISTS {index_table(n)} (kind UInt8, key String, key2 String, {IDENT_DDL}) "
            f"ENGINE = ReplacingMergeTree ORDER BY (kind, key, key2, {IDENT})",
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {queue_table(n)}_mv TO {queue_table(n)} AS "
            f"SELECT {VERSION_NOW} AS at, {IDENT}, updatedAt FROM {raw_table(n)}",
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {index_table(n)}_mv TO {index_table(n)} AS "
            + index_select(raw_table(n), git),
        ]
    return out


def index_select(source: str, git: str) -> str:
    """Index rows (kind, key, key2, identity) of the rows of ``source``."""
    return (
        f"SELECT e.1 AS kind, e.2 AS key, e.3 AS key2, {IDENT} FROM {source} "
        f"ARRAY JOIN arrayFilter(x -> x.2 != '', [tuple(toUInt8({KIND_MEMBER}), memberId, ''), "
        f"tuple(toUInt8({KIND_ORG}), organizationId, ''), "
        f"tuple(toUInt8({KIND_CHANNEL}), if(platform IN ({git}), lower(channel), ''), segmentId)]) AS e"
    )


def _one_part(rows: int) -> str:
    """SETTINGS that make an INSERT … SELECT of ``rows`` rows one block, so one part (readers see all or none)."""
    return (
        "SETTINGS max_threads = 1, max_insert_threads = 1, "
        f"min_insert_block_size_rows = {max(rows, 1 << 20)}, min_insert_block_size_bytes = 0"
    )


@dataclass
class BucketState:
    watermark: int = 0
    freshness: datetime = EPOCH
    snapshot: datetime | None = None
    differing: int = -1


@dataclass(frozen=True)
class Correction:
    """One bucket's correction: identities examined (each read from raw through its primary key), rows written
    (live + tombstones)."""

    bucket: int
    candidates: int
    written: int
    tombstones: int


@dataclass
class MaintenanceStats:
    corrections: int = 0
    rows_read: int = 0  # candidate identities examined
    rows_written: int = 0
    tombstones: int = 0
    last: list[Correction] = field(default_factory=list)
    freshness: dict[int, datetime] = field(default_factory=dict)
    differing: dict[int, int] = field(default_factory=dict)


class Maintainer:
    """Keeps the cleaned buckets of one warehouse current. ``setup(wh)`` once (creates the structures, and the
    first time fills the index from the raw buckets and reconciles every bucket); then ``correct(wh)`` after
    each landed batch (the loader's ``after_flush``) and ``reconcile(wh, n)`` hourly."""

    def __init__(self, buckets: int, now: Clock | None = None) -> None:
        self.buckets = buckets
        self.stats = MaintenanceStats()
        self._now = now  # a Clock (stream/schedule.py) for snapshotIds; None = the system clock
        self._tag = uuid.uuid4().hex[:12]
        self._lock = threading.RLock()  # held by a rebucket's flip across the swap and ``relayout``
        self._state: dict[str, BucketState] | None = None
        # Freshness marks of landed batches not yet covered by a round (``landed``): bucket -> newest Sequin
        # commit_timestamp; None = a reference table (every bucket reads it).
        self._marks: dict[int | None, datetime] = {}
        self._marks_lock = threading.Lock()

    def landed(self, marks: Mapping[int | None, datetime]) -> None:
        """A batch was landed (the loader's ``after_flush``, after its INSERTs returned) with these freshness
        marks. The next round to START covers them: it reads the queues after taking the marks, so every row
        of a mark taken is in what it corrects. Marks are the only source of the freshness (the newest Sequin
        ``commit_timestamp`` applied); a correction run without a loader leaves it as it was."""
        with self._marks_lock:
            for b, t in marks.items():
                self._marks[b] = max(t, self._marks.get(b, t))

    def _take_marks(self) -> dict[int | None, datetime]:
        with self._marks_lock:
            marks, self._marks = self._marks, {}
        return marks

    @property
    def work(self) -> str:
        return f"{WORK_PREFIX}{self._tag}_k"

    @property
    def stage(self) -> str:
        return f"{WORK_PREFIX}{self._tag}_rows"

    @property
    def krows(self) -> str:
        """The raw rows (FINAL) of the work table's identities, with their bucket ``_b``: read from the raw buckets
        once per correction round; every lookup of the round (members, organizations, channels) and the cleaning
        itself read this small table."""
        return f"{WORK_PREFIX}{self._tag}_raw"

    @property
    def round_stage(self) -> str:
        """A correction round's cleaned rows and tombstones for every bucket it touches, with their bucket ``_b``."""
        return f"{WORK_PREFIX}{self._tag}_round"

    def now(self) -> datetime:
        return self._now.now() if self._now is not None else datetime.now(UTC)

    def _hour(self) -> datetime:
        return snapshot_of(self.now())

    # --- setup -----------------------------------------------------------------------------------------------

    def setup(self, wh: Warehouse) -> None:
        """Create what is missing; the first time (no ``refs`` state yet) backfill the index and the applied
        repositories from what is already landed, and reconcile every bucket (a cleaned bucket of the old
        MergeTree layout is rebuilt into the new one). Idempotent."""
        with self._lock:
            self._setup_locked(wh)

    def relayout(self, wh: Warehouse, buckets: int, resume: Callable[[], object] | None = None) -> None:
        """The warehouse now has ``buckets`` buckets (a gradual rebucket's flip, stream/migration.py), and its
        cleaned buckets were split from the maintained ones after a last round, then verified: current, so
        nothing is reconciled. The queues and the index are set up anew for the new layout, every bucket's
        watermark starts now (its freshness the oldest of the old buckets', never a claim too fresh), the
        reference watermark carries on. ``resume`` (the held loader's) is called once the queues' views exist:
        what lands from then on is queued for the next round. No round runs in between (the caller may hold the
        lock across the swap; a round would see the new tables with the old bucket count). A SIGKILL part-way
        leaves no layout state, and the next ``setup`` does the full first-time setup."""
        with self._lock:
            old = self._state or self._load_state(wh)
            parents = [st for name, st in old.items() if name.startswith("bucket/")]
            fresh = min((st.freshness for st in parents), default=EPOCH)
            snaps = [st.snapshot for st in parents if st.snapshot is not None]
            refs = old.get("refs")
            self.buckets = buckets
            self._reset(wh)
            for sql in maintenance_ddl(buckets):
                schema_command(wh, sql)
            for n in range(buckets):
                schema_command(wh, cleaned_table_ddl(n))
            start = self._clock_ns(wh)
            if resume is not None:
                resume()
            git = ", ".join(f"'{p}'" for p in GIT_PLATFORMS)
            state = {"layout": BucketState(watermark=buckets)}
            for n in range(buckets):
                # Rows landing meanwhile are indexed by the view too: the index collapses the duplicates.
                wh.command(f"INSERT INTO {index_table(n)} {index_select(raw_table(n), git)}")
                state[f"bucket/{n}"] = BucketState(watermark=start, freshness=fresh, snapshot=min(snaps, default=None))
            if refs is None:
                self._apply_repositories(wh, None)
                refresh_country_codes(wh)
                refs = BucketState(watermark=start)
            state["refs"] = refs
            self._state = state
            self.stats.freshness = {n: fresh for n in range(buckets)} if fresh > EPOCH else {}
            self._save(wh, *state)

    def _setup_locked(self, wh: Warehouse) -> None:
        self._migrate_old_layout(wh)
        for sql in maintenance_ddl(self.buckets):
            schema_command(wh, sql)  # ON CLUSTER on a server cluster (connectors/warehouse.py)
        for n in range(self.buckets):
            schema_command(wh, cleaned_table_ddl(n))
        drop_stale(wh, WORK_PREFIX)
        wh.command(f"CREATE TABLE IF NOT EXISTS {self.work} (_b UInt32, {IDENT_DDL}) ENGINE = Memory")
        wh.command(f"CREATE TABLE IF NOT EXISTS {self.stage} ({cleaned_columns_ddl()}) ENGINE = Memory")
        wh.command(
            f"CREATE TABLE IF NOT EXISTS {self.round_stage} ({cleaned_columns_ddl()}, _b UInt32) ENGINE = Memory"
        )
        wh.command(
            f"CREATE TABLE IF NOT EXISTS {self.krows} ENGINE = Memory "
            f"AS SELECT *, toUInt32(0) AS _b FROM {raw_table(0)} LIMIT 0"
        )
        self._state = self._load_state(wh)
        layout = self._state.get("layout")
        if layout is not None and layout.watermark != self.buckets:
            # Rebucketed: every identity may have moved; index and queues start again from the raw rows.
            log.warning("maintain: %d buckets, was %d: the maintenance is set up anew", self.buckets, layout.watermark)
            self._reset(wh)
            for sql in maintenance_ddl(self.buckets):
                schema_command(wh, sql)
            self._state = {}
        start = self._clock_ns(wh)
        git = ", ".join(f"'{p}'" for p in GIT_PLATFORMS)
        new_refs = "refs" not in self._state
        if new_refs:
            self._apply_repositories(wh, None)
            refresh_country_codes(wh)
        for n in range(self.buckets):
            if f"bucket/{n}" in self._state:
                continue
            # First maintained here: index what is already landed, then reconcile the bucket in full.
            wh.command(f"INSERT INTO {index_table(n)} {index_select(raw_table(n), git)}")
            self._reconcile_locked(wh, n)
            self._state[f"bucket/{n}"].watermark = start
            self._save(wh, f"bucket/{n}")
        if new_refs:
            self._state["refs"] = BucketState(watermark=start)
            self._save(wh, "refs")
        if layout is None or layout.watermark != self.buckets:
            self._state["layout"] = BucketState(watermark=self.buckets)
            self._save(wh, "layout")
        for n in range(self.buckets):
            st = self._state[f"bucket/{n}"]
            if st.freshness > EPOCH:
                self.stats.freshness[n] = st.freshness

    def _reset(self, wh: Warehouse) -> None:
        names = wh.rows(
            "SELECT name, engine FROM system.tables WHERE database = currentDatabase() AND "
            "(startsWith(name, 'bucketer_cleaned_queue_') OR startsWith(name, 'bucketer_cleaned_index_'))"
        )
        for name, _engine in sorted(names, key=lambda r: r[1] != "MaterializedView"):
            wh.command(f"DROP TABLE IF EXISTS `{name}` SYNC")
        wh.command(f"TRUNCATE TABLE {STATE}")

    def close(self, wh: Warehouse) -> None:
        for t in (self.work, self.stage, self.krows, self.round_stage):
            wh.command(f"DROP TABLE IF EXISTS {t}")

    def _migrate_old_layout(self, wh: Warehouse) -> None:
        for n in migrate_cleaned_layout(wh, self.buckets):
            log.warning("maintain: cleaned bucket %d was in the old layout; copied into the new one", n)

    @staticmethod
    def _clock_ns(wh: Warehouse) -> int:
        return int(wh.rows(f"SELECT {VERSION_NOW}")[0][0])

    def _load_state(self, wh: Warehouse) -> dict[str, BucketState]:
        out: dict[str, BucketState] = {}
        for name, wm, fresh, snap, diff in wh.rows(
            f"SELECT name, watermark, freshness, snapshotId, differing FROM {STATE} FINAL"
        ):
            out[name] = BucketState(
                int(wm),
                fresh.replace(tzinfo=UTC) if fresh.tzinfo is None else fresh,
                None if snap is None or snap.timestamp() <= 0 else snap.replace(tzinfo=UTC),
                int(diff),
            )
        return out

    def _save(self, wh: Warehouse, *names: str) -> None:
        """Record the state of ``names`` (one INSERT, so one part: all of them or none)."""
        assert self._state is not None
        if not names:
            return
        values: list[str] = []
        params: dict[str, object] = {}
        for i, name in enumerate(names):
            s = self._state[name]
            values.append(
                f"({{n{i}:String}}, {{w{i}:UInt64}}, parseDateTime64BestEffort({{f{i}:String}}, 3, 'UTC'), "
                f"toDateTime({{s{i}:String}}, 'UTC'), {{d{i}:Int64}})"
            )
            params |= {
                f"n{i}": name,
                f"w{i}": s.watermark,
                f"f{i}": s.freshness.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),
                f"s{i}": (s.snapshot or EPOCH).strftime("%Y-%m-%d %H:%M:%S"),
                f"d{i}": s.differing,
            }
        wh.command(
            f"INSERT INTO {STATE} (name, watermark, freshness, snapshotId, differing) VALUES {', '.join(values)}",
            params,
        )

    def bucket_state(self, n: int) -> BucketState:
        return (self._state or {}).get(f"bucket/{n}", BucketState())

    def state(self, wh: Warehouse) -> dict[str, BucketState]:
        """The recorded state (per ``bucket/<n>`` and ``refs``), read from the warehouse."""
        return self._load_state(wh)

    # --- corrections -----------------------------------------------------------------------------------------

    def correct(self, wh: Warehouse) -> list[Correction]:
        """Apply every change landed since the last correction to the cleaned buckets it affects."""
        with self._lock:
            if self._state is None:
                raise RuntimeError("Maintainer.setup() first")
            marks = self._take_marks()
            try:
                return self._correct_locked(wh, marks)
            except BaseException:
                self.landed(marks)  # not applied: a later round covers them
                raise

    def _correct_locked(self, wh: Warehouse, marks: Mapping[int | None, datetime]) -> list[Correction]:
        assert self._state is not None
        refs = self._state["refs"]
        lo = refs.watermark
        got = wh.rows(f"SELECT max(at), count() FROM {REF_CHANGES} WHERE at > {lo}")
        hi = int(got[0][0]) if got and int(got[0][1]) else lo
        if got and int(got[0][1]) > BULK_ROWS:
            return self._reconcile_everything(wh, hi, marks)
        tables: set[str] = set()
        if hi > lo:
            tables = {
                str(t) for (t,) in wh.rows(f"SELECT DISTINCT tbl FROM {REF_CHANGES} WHERE at > {lo} AND at <= {hi}")
            }

        def changed(table: str) -> str:
            return f"SELECT id FROM {REF_CHANGES} WHERE tbl = '{table}' AND at > {lo} AND at <= {hi}"

        if "organizations" in tables:
            refresh_country_codes(wh, f"id IN ({changed('organizations')})")
        repo_tables = {"repositories", "insightsProjects", "integrations"} & tables
        affected_repos = ""
        if repo_tables:
            conds = []
            if "repositories" in tables:
                conds.append(f"id IN ({changed('repositories')})")
            if "insightsProjects" in tables:
                conds.append(f"insightsProjectId IN ({changed('insightsProjects')})")
            if "integrations" in tables:
                conds.append(f"sourceIntegrationId IN ({changed('integrations')})")
            cols = "id, url, segmentId, insightsProjectId, sourceIntegrationId"
            affected_repos = (
                f"SELECT id, lower(url) AS u, segmentId FROM (SELECT {cols} FROM repositories FINAL "
                f"UNION ALL SELECT {cols} FROM {APPLIED_REPOS} FINAL) WHERE {' OR '.join(conds)}"
            )
        keys = []
        if "members" in tables:
            keys.append(f"kind = {KIND_MEMBER} AND key IN ({changed('members')})")
        if "organizations" in tables:
            keys.append(f"kind = {KIND_ORG} AND key IN ({changed('organizations')})")
        if affected_repos:
            keys.append(
                f"kind = {KIND_CHANNEL} AND (key, key2) IN (SELECT u, segmentId FROM ({affected_repos}) "
                f"UNION ALL SELECT {gerrit_variant_sql('u')}, segmentId FROM ({affected_repos}))"
            )
        candidates: dict[int, str] = {}
        advanced: dict[int, tuple[int, list[datetime]]] = {}
        # Every bucket's new queue entries in one round trip (a flush usually touches a few buckets only).
        heads = {
            int(b): (int(top), int(count))
            for b, top, count in wh.rows(
                " UNION ALL ".join(
                    f"SELECT toUInt32({n}), max(at), count() FROM {queue_table(n)} "
                    f"WHERE at > {self._state[f'bucket/{n}'].watermark}"
                    for n in range(self.buckets)
                )
            )
            if int(count)
        }
        for n in range(self.buckets):
            st = self._state[f"bucket/{n}"]
            qhi, queued = heads.get(n, (st.watermark, 0))
            sources = []
            if queued > BULK_ROWS:
                # A bulk landing (a bootstrap replay, a long outage's backlog): one full reconciliation of the
                # bucket is cheaper than a correction of that many identities, and gives the same rows.
                self._reconcile_locked(wh, n)
            elif qhi > st.watermark:
                sources.append(f"SELECT {IDENT} FROM {queue_table(n)} WHERE at > {st.watermark} AND at <= {qhi}")
            if keys and queued <= BULK_ROWS:
                sources.append(f"SELECT {IDENT} FROM {index_table(n)} WHERE " + " OR ".join(f"({k})" for k in keys))
            if sources:
                candidates[n] = " UNION ALL ".join(sources)
            advanced[n] = (qhi, [f for f in (marks.get(n), marks.get(None)) if f is not None])
        # One round for every touched bucket: the statements' fixed cost is paid once, not once per bucket.
        done = self._correct_buckets(wh, candidates) if candidates else []
        moved = []
        for n, (qhi, fresh) in advanced.items():  # the watermarks advance only after the corrections they cover
            st = self._state[f"bucket/{n}"]
            if qhi > st.watermark or fresh:
                st.watermark = qhi
                if fresh:
                    st.freshness = max(st.freshness, *fresh)
                self.stats.freshness[n] = st.freshness
                moved.append(f"bucket/{n}")
        self._save(wh, *moved)
        if hi > lo:
            if affected_repos:
                self._apply_repositories(wh, f"id IN (SELECT id FROM ({affected_repos}))")
            refs.watermark = hi
            self._save(wh, "refs")
        self.stats.last = done
        return done

    def _reconcile_everything(self, wh: Warehouse, hi: int, marks: Mapping[int | None, datetime]) -> list[Correction]:
        """A bulk of reference changes (a bootstrap replay of the reference topics): every bucket is reconciled in
        full, which covers every queued change too."""
        assert self._state is not None
        start = self._clock_ns(wh)
        refresh_country_codes(wh)
        for n in range(self.buckets):
            self._reconcile_locked(wh, n)
            st = self._state[f"bucket/{n}"]
            st.watermark = max(st.watermark, start)
            fresh = [f for f in (marks.get(n), marks.get(None)) if f is not None]
            if fresh:
                st.freshness = max(st.freshness, *fresh)
                self.stats.freshness[n] = st.freshness
            self._save(wh, f"bucket/{n}")
        self._apply_repositories(wh, None)
        self._state["refs"].watermark = hi
        self._save(wh, "refs")
        return []

    def _apply_repositories(self, wh: Warehouse, where: str | None) -> None:
        """Record the repositories (all, or those of ``where``) as the cleaned buckets are now corrected with."""
        wh.command(
            f"INSERT INTO {APPLIED_REPOS} SELECT id, url, segmentId, insightsProjectId, sourceIntegrationId, "
            f"{VERSION_NOW} FROM repositories FINAL" + (f" WHERE {where}" if where else "")
        )

    def live_select(self, snapshots: dict[int, datetime]) -> str:
        """The cleaned rows of the raw rows in ``krows`` (the round's identities, read FINAL from their raw
        buckets) that pass the rules now, each with its bucket ``_b`` and that bucket's snapshotId."""
        of_k = f"FROM {self.krows}"
        orgs = organization_lookup_sql(f"id IN (SELECT organizationId {of_k})")
        look = Lookups(
            member_ok=f"memberId IN ({real_members_sql(f'id IN (SELECT memberId {of_k})')})",
            channel_ok=(
                f"(lower(channel), segmentId) IN ({allowed_channels_sql(f'r.segmentId IN (SELECT segmentId {of_k})')})"
            ),
            org_name="transform(organizationId, _orgs.1, _orgs.2, '')",
            org_code="transform(organizationId, _orgs.1, _orgs.3, '')",
            with_=(
                f"WITH (SELECT tuple(groupArray(id), groupArray(toString(name)), groupArray(toString(code))) "
                f"FROM ({orgs})) AS _orgs\n"
            ),
        )

        def stamp(t: datetime) -> str:
            return f"toDateTime('{t.strftime('%Y-%m-%d %H:%M:%S')}', 'UTC')"

        branches = ", ".join(f"_b = {n}, {stamp(t)}" for n, t in sorted(snapshots.items()))
        snap = f"multiIf({branches}, {stamp(self._hour())})"
        return cleaning_select(self.krows, look, snapshot=snap, final=False, extra=", _b")

    def tombstone_select(self, buckets: Iterable[int]) -> str:
        """Tombstones for the round's identities (the work table) that are in their cleaned bucket but not among
        the live rows already in the round's stage (they no longer pass, or their raw row is retired)."""
        cols = ", ".join(f"`{c}`" for c in CLEANED_NAMES)
        return " UNION ALL ".join(
            f"SELECT {cols}, toUInt8(1), {VERSION_NOW}, toUInt32({n}) FROM {cleaned_table(n)} FINAL "
            f"WHERE ({IDENT}) IN (SELECT {IDENT} FROM {self.work} WHERE _b = {n}) "
            f"AND ({IDENT}) NOT IN (SELECT {IDENT} FROM {self.round_stage} WHERE _b = {n})"
            for n in buckets
        )

    def _correct_buckets(self, wh: Warehouse, candidates: dict[int, str]) -> list[Correction]:
        """One correction round: the identities of ``candidates`` (per bucket, a SELECT of identities) re-cleaned
        with the current reference state, in a fixed number of statements whatever the number of buckets, then
        published one bucket at a time, each as one part."""
        assert self._state is not None
        wh.command(f"TRUNCATE TABLE {self.work}")
        wh.command(
            f"INSERT INTO {self.work} SELECT DISTINCT _b, {IDENT} FROM ("
            + " UNION ALL ".join(f"SELECT toUInt32({n}) AS _b, {IDENT} FROM ({sql})" for n, sql in candidates.items())
            + ")"
        )
        k = {int(b): int(c) for b, c in wh.rows(f"SELECT _b, count() FROM {self.work} GROUP BY _b")}
        if not k:
            return []
        touched = sorted(k)
        wh.command(f"TRUNCATE TABLE {self.round_stage}")
        wh.command(f"TRUNCATE TABLE {self.krows}")
        wh.command(
            f"INSERT INTO {self.krows} "
            + " UNION ALL ".join(
                f"SELECT *, toUInt32({n}) FROM {raw_table(n)} FINAL "
                f"WHERE ({IDENT}) IN (SELECT {IDENT} FROM {self.work} WHERE _b = {n})"
                for n in touched
            )
        )
        snapshots = {n: self._state[f"bucket/{n}"].snapshot or self._hour() for n in touched}
        wh.command(f"INSERT INTO {self.round_stage} {self.live_select(snapshots)}")
        wh.command(f"TRUNCATE TABLE {self.krows}")
        wh.command(f"INSERT INTO {self.round_stage} {self.tombstone_select(touched)}")
        staged = {
            int(b): (int(w), int(t))
            for b, w, t in wh.rows(f"SELECT _b, count(), countIf(_deleted = 1) FROM {self.round_stage} GROUP BY _b")
        }
        done = []
        for n in touched:
            written, tomb = staged.get(n, (0, 0))
            if written:
                self._publish_bucket(wh, n, written)
            c = Correction(n, k[n], written, tomb)
            self.stats.corrections += 1
            self.stats.rows_read += c.candidates
            self.stats.rows_written += written
            self.stats.tombstones += tomb
            log.debug(
                "maintain: bucket %d corrected: %d candidates, %d rows written (%d tombstones)", n, k[n], written, tomb
            )
            done.append(c)
        wh.command(f"TRUNCATE TABLE {self.round_stage}")
        return done

    def _publish_bucket(self, wh: Warehouse, n: int, rows: int) -> None:
        """Move bucket ``n``'s ``rows`` rows of the round's stage into cleaned bucket ``n`` as one block, so one
        part: readers (FINAL) see the bucket's whole correction or none of it."""
        wh.command(
            f"INSERT INTO {cleaned_table(n)} SELECT * EXCEPT (_b) FROM {self.round_stage} WHERE _b = {n} "
            + _one_part(rows)
        )

    def _publish(self, wh: Warehouse, target: str, rows: int) -> None:
        """Move the stage's ``rows`` rows into ``target`` as one block, so one part: readers (FINAL) see the whole
        correction or none of it."""
        wh.command(f"INSERT INTO {target} SELECT * FROM {self.stage} " + _one_part(rows))

    # --- reconciliation --------------------------------------------------------------------------------------

    def reconcile(self, wh: Warehouse, n: int) -> int:
        """Compare cleaned bucket ``n`` with a full rebuild of it and apply the difference; returns how many rows
        differed (0 when the maintenance kept it exact)."""
        with self._lock:
            if self._state is None:
                self._state = self._load_state(wh)
            return self._reconcile_locked(wh, n)

    def _reconcile_locked(self, wh: Warehouse, n: int) -> int:
        assert self._state is not None
        snapshot = self._hour()
        aside = f"{WORK_PREFIX}{self._tag}_full"
        cleaned = cleaned_table(n)
        ref = prepare_reference(wh)
        try:
            wh.command(f"DROP TABLE IF EXISTS {aside} SYNC")
            wh.command(cleaned_table_ddl(n, aside))
            wh.command(
                cleaning_insert(wh, aside, raw_table(n), ref), {"snapshot": snapshot.strftime("%Y-%m-%d %H:%M:%S")}
            )
        finally:
            drop_reference(wh, ref)
        try:
            content = ", ".join(f"`{c}`" for c in ACTIVITY_NAMES + CLEANED_NAMES[len(ACTIVITY_NAMES) : -1])
            h = f"cityHash64({content})"
            changed = f"SELECT * FROM {aside} WHERE ({IDENT}, {h}) NOT IN (SELECT {IDENT}, {h} FROM {cleaned} FINAL)"
            version = f"(SELECT if(count() = 0, {VERSION_NOW}, max(_version)) FROM {aside})"
            cols = ", ".join(f"`{c}`" for c in CLEANED_NAMES)
            extra = (
                f"SELECT {cols}, toUInt8(1), {version} FROM {cleaned} FINAL "
                f"WHERE ({IDENT}) NOT IN (SELECT {IDENT} FROM {aside})"
            )
            wh.command(f"TRUNCATE TABLE {self.stage}")
            wh.command(f"INSERT INTO {self.stage} {changed} UNION ALL {extra}")
            differing = int(wh.rows(f"SELECT count() FROM {self.stage}")[0][0])
            if differing:
                self._publish(wh, cleaned, differing)
            wh.command(f"TRUNCATE TABLE {self.stage}")
        finally:
            wh.command(f"DROP TABLE IF EXISTS {aside} SYNC")
        st = self._state.setdefault(f"bucket/{n}", BucketState())
        st.snapshot, st.differing = snapshot, differing
        self._save(wh, f"bucket/{n}")
        self.stats.differing[n] = differing
        (log.warning if differing else log.info)(
            "maintain: bucket %d reconciled, %d rows differed from a full rebuild", n, differing
        )
        return differing


REFRESH_MODES = ("incremental", "hourly")


@dataclass(frozen=True)
class BucketFreshness:
    """What ``status`` can show per bucket: the newest applied change, the lag behind it, the last
    reconciliation's hour (the snapshotId new rows get) and how many rows it found different."""

    bucket: int
    freshness: datetime | None
    lag_seconds: float | None
    snapshot: datetime | None
    differing: int | None


def maintenance_status(wh: Warehouse, buckets: int, now: datetime | None = None) -> list[BucketFreshness]:
    """Per bucket, from the recorded state; all None for a warehouse that is not maintained (hourly mode)."""
    known = wh.rows(
        "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = {t:String}", {"t": STATE}
    )
    state = Maintainer(buckets)._load_state(wh) if known and int(known[0][0]) else {}
    at = now or datetime.now(UTC)
    out = []
    for n in range(buckets):
        st = state.get(f"bucket/{n}")
        fresh = st.freshness if st is not None and st.freshness > EPOCH else None
        out.append(
            BucketFreshness(
                n,
                fresh,
                None if fresh is None else max(0.0, (at - fresh).total_seconds()),
                st.snapshot if st is not None else None,
                st.differing if st is not None and st.differing >= 0 else None,
            )
        )
    return out


def reconcile_many(
    connect: Callable[[], AbstractContextManager[Warehouse]], maintainer: Maintainer, buckets: Iterable[int]
) -> list[RebuildResult]:
    """Reconcile ``buckets`` one by one on a connection of their own; never raises for one bucket's failure."""
    out = []
    for b in dict.fromkeys(buckets):
        started = time.monotonic()
        try:
            with connect() as wh:
                differing = maintainer.reconcile(wh, b)
                rows = int(wh.rows(f"SELECT count() FROM {cleaned_table(b)} FINAL")[0][0])
                st = maintainer.bucket_state(b)
                snapshot = st.snapshot or snapshot_of(maintainer.now())
                log_rebuild(wh, b, maintainer.now(), snapshot, rows, time.monotonic() - started)
        except Exception as exc:  # one bucket's failure must not stop the others
            log.error("maintain: reconciliation of bucket %d failed: %s", b, one_line(exc))
            out.append(RebuildResult(b, "failed", error=one_line(exc)))
            continue
        out.append(
            RebuildResult(
                b, "ok", rows=rows, seconds=time.monotonic() - started, snapshot_id=st.snapshot, differing=differing
            )
        )
    return out


__all__ = [
    "COUNTRY_TABLE",
    "REFRESH_MODES",
    "Correction",
    "Maintainer",
    "MaintenanceStats",
    "maintenance_ddl",
    "reconcile_many",
    "maintenance_status",
]


class MaintenanceLoop:
    """The corrections in a thread of their own, on a warehouse handle of their own (``connect()``), so a
    correction never delays the loader's next flush and a flush never waits for a correction: the loader's
    ``after_flush`` only wakes the loop (``wake``), and a round corrects everything landed up to its start (what
    lands meanwhile is the next round's). Without a wake-up it still looks every ``poll`` seconds.

    Crash safety is the Maintainer's: the queues and the index are filled at landing time inside the
    warehouse, and the watermarks move only after the corrections they cover, so a loader may commit its
    offsets before the round that applies its rows, and a SIGKILL in between loses nothing (the restart's first
    round applies it). ``finish(wh)`` stops the thread and runs one last round on the caller's handle, so a
    stopping worker leaves the cleaned buckets current with what it landed. A failing round ends the loop:
    ``on_error(exc)`` is told (the worker stops) and ``finish`` raises it."""

    def __init__(
        self,
        maintainer: Maintainer,
        connect: Callable[[], AbstractContextManager[Warehouse]],
        *,
        correct: Callable[[Warehouse], list[Correction]] | None = None,
        poll: float = 5.0,
        on_error: Callable[[BaseException], object] | None = None,
    ) -> None:
        self.maintainer = maintainer
        self._connect = connect
        self._correct = correct or maintainer.correct
        self._poll = poll
        self._on_error = on_error
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.rounds = 0

    def wake(self, _wh: object = None, marks: Mapping[int | None, datetime] | None = None) -> None:
        """Something landed (the loader's ``after_flush``; the handle is not used): its freshness marks go to the
        Maintainer, and the loop runs a round."""
        if marks:
            self.maintainer.landed(marks)
        self._wake.set()

    def start(self) -> MaintenanceLoop:
        self._thread = threading.Thread(target=self._run, name="bucketer-maintainer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with self._connect() as wh:
                while not self._stop.is_set():
                    self._wake.wait(self._poll)
                    if self._stop.is_set():
                        break
                    self._wake.clear()
                    self._correct(wh)
                    self.rounds += 1
        except BaseException as exc:  # reported to the worker, which stops; finish() raises it
            log.error("maintain: a correction round failed: %s", one_line(exc))
            self.error = exc
            if self._on_error is not None:
                self._on_error(exc)

    def finish(self, wh: Warehouse | None = None) -> None:
        """Stop the thread; then, with ``wh``, one last round of everything landed so far."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        if wh is not None:
            self._correct(wh)
            self.rounds += 1
