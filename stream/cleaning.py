"""The cleaning rules (CLEANED_BUCKETS.md), written once, and the reference state they read.

The full rebuild (stream/enrich.py) and the incremental corrections and reconciliations (stream/incremental.py)
both compute cleaned rows with ``cleaning_select``; only the way they look the reference state up differs
(``Lookups``): a rebuild probes the batch's ready-made tables (``prepare_reference``), a correction reads small
filtered subqueries of the reference tables FINAL.

What the rules read besides the raw rows:

- Country codes: ``refresh_country_codes`` resolves, in Python (connectors/countries.py), every distinct
  (country, location) pair of ``organizations FINAL`` not yet in ``organization_country_codes`` for the
  current ``RESOLVER_VERSION``, and inserts the codes there. Organizations are few; activities are many, so
  the rebuild SQL only joins this small table: the resolver never runs per activity row, and the server
  never needs Python. (ReplacingMergeTree(resolverVersion) ORDER BY (country, location): a new resolver
  version recomputes every pair; concurrent refreshes insert identical rows, which is harmless.)
- Reference state, once per batch of buckets (``prepare_reference``): three small in-memory tables named
  ``enrich_ref_<tag>_*`` — the real members (``Set``), the allowed repository channels (``Set`` of (url,
  segmentId)) and the organizations' name and code (``Join``, read with ``joinGet``) — built from the
  reference tables ``FINAL``, so each bucket's query only probes ready-made sets instead of re-reading
  ``members FINAL`` and friends (a fixed cost that would otherwise be paid N times). Unique per batch, so
  concurrent batches never share one; dropped at the end (leftovers of killed runs after 6 hours).

``cleaning_select(source, ref | lookups, where=…, snapshot=…)`` — the rules, one SELECT over the raw rows and the
reference state (also giving ``_deleted`` = 0 and ``_version`` = the query's now64 in ns, the cleaned layout's
last two columns):
- rows: ``source FINAL`` minus retired rows (``_deleted = 0``);
- member: exists in ``members FINAL`` with isBot = isTeamMember = isOrganization = 0;
- git platforms (exactly git, gerrit, github, gitlab): ``(lower(channel), segmentId)`` is in the allowed
  channels: ``(lower(url), segmentId)`` of each repository FINAL with enabled = 1 and deletedAt IS NULL
  whose insightsProject FINAL has enabled = 1 and deletedAt IS NULL (excluded and archived kept); a gerrit
  repository (its sourceIntegration's platform is 'gerrit' in ``integrations FINAL``) also gives the
  query-URL variant of ``lower(url)``: first '/r/' -> '/r/q/project:', else first '/gerrit/' ->
  '/gerrit/q/project:', else 'scheme://host/q/project:' + the path without its leading '/'. The variant is
  taken of the lower-cased url. Other platforms pass;
- gitChangedLines = gitInsertions + gitDeletions (UInt64); gitChangedLinesBucket '' / '1-9' / '10-59' /
  '60-99' / '100-499' / '500+'; organizationName = displayName of ``organizations FINAL`` ('' when none);
  organizationCountryCode from ``organization_country_codes`` ('XX' when no organization or unknown);
  snapshotId = the start of the UTC hour of the run (from the injected clock), the same for every row.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from connectors.countries import RESOLVER_VERSION, UNKNOWN, organization_country_code
from connectors.model import GERRIT, GIT_PLATFORMS, gerrit_variant_sql
from connectors.warehouse import Warehouse, WarehouseError
from stream.schema import ACTIVITY_NAMES

log = logging.getLogger("bucketer.enrich")

COUNTRY_TABLE = "organization_country_codes"
REF_PREFIX = "enrich_ref_"


def country_table_ddl() -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {COUNTRY_TABLE} (country String, location String, "
        f"code LowCardinality(String), resolverVersion UInt32) "
        f"ENGINE = ReplacingMergeTree(resolverVersion) ORDER BY (country, location)"
    )


def refresh_country_codes(wh: Warehouse, org_filter: str = "") -> int:
    """Resolve the organizations' (country, location) pairs not yet coded by this resolver; returns how many.
    ``org_filter`` (a predicate on the organization, e.g. ``id IN (…)``) limits it to some organizations."""
    wh.command(country_table_ddl())
    extra = f"({org_filter}) AND " if org_filter else ""
    pairs = wh.rows(
        f"SELECT DISTINCT country, location FROM organizations FINAL WHERE {extra}(country, location) NOT IN "
        f"(SELECT country, location FROM {COUNTRY_TABLE} FINAL WHERE resolverVersion = {{v:UInt32}})",
        {"v": RESOLVER_VERSION},
    )
    rows = [(c, loc, organization_country_code(c, loc), RESOLVER_VERSION) for c, loc in pairs]
    wh.insert(COUNTRY_TABLE, ("country", "location", "code", "resolverVersion"), rows)
    return len(rows)


def allowed_channels_sql(repo_filter: str = "") -> str:
    """(url, segmentId) pairs a git activity's (lower(channel), segmentId) must be one of. ``repo_filter``, a
    predicate on the repository (alias ``r``), narrows the repositories read (a correction's candidates); the
    rule itself is the same."""
    extra = f" AND ({repo_filter})" if repo_filter else ""
    repos = (
        "SELECT lower(r.url) AS url, r.segmentId AS segmentId, r.sourceIntegrationId AS integration "
        "FROM repositories AS r FINAL "
        "WHERE r.enabled = 1 AND r.deletedAt IS NULL AND r.insightsProjectId IN "
        f"(SELECT id FROM insightsProjects FINAL WHERE enabled = 1 AND deletedAt IS NULL){extra}"
    )
    return (
        f"SELECT url, segmentId FROM ({repos}) "
        f"UNION ALL SELECT {gerrit_variant_sql('url')}, segmentId FROM ({repos}) "
        f"WHERE integration IN (SELECT id FROM integrations FINAL WHERE platform = '{GERRIT}')"
    )


def real_members_sql(id_filter: str = "") -> str:
    """The ids of real people: members FINAL that are not bots, team members or organizations (``id_filter``,
    a predicate on ``id``, narrows the members read)."""
    extra = f" AND ({id_filter})" if id_filter else ""
    return f"SELECT id FROM members FINAL WHERE isBot = 0 AND isTeamMember = 0 AND isOrganization = 0{extra}"


def organization_lookup_sql(id_filter: str = "") -> str:
    """(id, name, code) of the organizations FINAL (``id_filter`` narrows them); code '' when not coded."""
    extra = f" WHERE ({id_filter})" if id_filter else ""
    return f"""SELECT org.id AS id, org.displayName AS name, c.code AS code
            FROM (SELECT id, displayName, country, location FROM organizations FINAL{extra}) AS org
            LEFT JOIN (SELECT country, location, code FROM {COUNTRY_TABLE} FINAL) AS c
                ON c.country = org.country AND c.location = org.location"""


@dataclass(frozen=True)
class Lookups:
    """How the cleaning rules look the reference state up: SQL over the raw row's columns.

    ``member_ok``: the row's member is a real person; ``channel_ok``: its (lower(channel), segmentId) is an
    allowed repository channel; ``org_name``/``org_code``: its organization's displayName / country code ('' when
    none); ``with_``: a WITH clause the others may use. A rebuild probes the batch's ready-made Set/Join tables
    (``ReferenceState.lookups``); a correction reads small filtered subqueries of the reference tables FINAL
    (stream/incremental.py). Both feed the same ``cleaning_select``."""

    member_ok: str
    channel_ok: str
    org_name: str
    org_code: str
    with_: str = ""


@dataclass(frozen=True)
class ReferenceState:
    """The per-batch tables of ``prepare_reference`` (names in the warehouse's database)."""

    tag: str

    @property
    def members(self) -> str:
        return f"{REF_PREFIX}{self.tag}_members"

    @property
    def channels(self) -> str:
        return f"{REF_PREFIX}{self.tag}_channels"

    @property
    def organizations(self) -> str:
        return f"{REF_PREFIX}{self.tag}_organizations"

    def tables(self) -> tuple[str, str, str]:
        return self.members, self.channels, self.organizations

    def lookups(self) -> Lookups:
        org = self.organizations
        return Lookups(
            member_ok=f"memberId IN {self.members}",
            channel_ok=f"(lower(channel), segmentId) IN {self.channels}",
            org_name=f"joinGet('{org}', 'name', organizationId)",
            org_code=f"joinGet('{org}', 'code', organizationId)",
        )


def drop_stale(wh: Warehouse, prefix: str) -> None:
    """Drop the work tables named ``prefix…`` left over 6 hours ago by a process that died before its cleanup."""
    stale = wh.rows(
        "SELECT name FROM system.tables WHERE database = currentDatabase() AND startsWith(name, "
        "{p:String}) AND metadata_modification_time < now() - INTERVAL 6 HOUR",
        {"p": prefix},
    )
    for (name,) in stale:
        wh.command(f"DROP TABLE IF EXISTS `{name}`")


def prepare_reference(wh: Warehouse) -> ReferenceState:
    """Build this batch's member set, channel set and organization lookup (country codes must be refreshed)."""
    wh.command(country_table_ddl())
    drop_stale(wh, REF_PREFIX)
    ref = ReferenceState(uuid.uuid4().hex[:12])
    try:
        wh.command(f"CREATE TABLE {ref.members} (id String) ENGINE = Set SETTINGS persistent = 0")
        wh.command(f"INSERT INTO {ref.members} {real_members_sql()}")
        wh.command(f"CREATE TABLE {ref.channels} (url String, segmentId String) ENGINE = Set SETTINGS persistent = 0")
        wh.command(f"INSERT INTO {ref.channels} {allowed_channels_sql()}")
        wh.command(
            f"CREATE TABLE {ref.organizations} (id String, name String, code String) "
            f"ENGINE = Join(ANY, LEFT, id) SETTINGS persistent = 0"
        )
        wh.command(
            f"INSERT INTO {ref.organizations} SELECT id, name, code FROM ({organization_lookup_sql()}) "
            f"SETTINGS join_use_nulls = 0"
        )
    except BaseException:
        drop_reference(wh, ref)
        raise
    return ref


def drop_reference(wh: Warehouse, ref: ReferenceState) -> None:
    """Drop a batch's reference tables; best effort (a leftover is dropped by a later batch after 6 hours)."""
    for name in ref.tables():
        try:
            wh.command(f"DROP TABLE IF EXISTS {name}")
        except WarehouseError as exc:
            log.warning("enrich: could not drop %s: %s", name, exc)


VERSION_NOW = "toUInt64(toUnixTimestamp64Nano(now64(9)))"

# gitChangedLinesBucket: (first count above the bucket, its label); 0 lines is '', from the last bound up '500+'.
CHANGED_LINES_BUCKETS = ((10, "1-9"), (60, "10-59"), (100, "60-99"), (500, "100-499"))
CHANGED_LINES_TOP = "500+"


def changed_lines_bucket_sql(lines: str) -> str:
    """The gitChangedLinesBucket of the changed-lines count ``lines`` (a SQL expression), as SQL."""
    arms = ", ".join(f"{lines} < {upper}, '{label}'" for upper, label in CHANGED_LINES_BUCKETS)
    return f"multiIf({lines} = 0, '', {arms}, '{CHANGED_LINES_TOP}')"


def cleaning_select(
    source: str,
    ref: ReferenceState | Lookups,
    *,
    where: str = "",
    snapshot: str = "toDateTime({snapshot:String}, 'UTC')",
    final: bool = True,
    extra: str = "",
) -> str:
    """THE cleaning rules (CLEANED_BUCKETS.md): the SELECT of the cleaned rows, ``_deleted`` (0) and ``_version``
    included, of raw table ``source`` (``where`` narrows its rows, e.g. to a correction's identities) with the
    reference state looked up through ``ref``. ``snapshot`` is the snapshotId expression (by default the
    ``snapshot`` parameter, a 'YYYY-MM-DD HH:MM:SS' UTC string). ``_version`` is the engine's clock when the
    query starts (now64 is evaluated once per query), so a row computed from a later read of the reference
    state replaces one computed earlier. (The two are named ``_out_*``: an alias ``_deleted`` would replace the
    raw column in WHERE; INSERT … SELECT takes columns by position.) ``final=False`` for a ``source`` that
    already holds one version per identity (a correction's rows, read FINAL from raw into a Memory table);
    ``extra`` (", col") appends columns of ``source`` after ``_version`` (a correction carries each row's
    bucket through)."""
    look = ref.lookups() if isinstance(ref, ReferenceState) else ref
    cols = ", ".join(f"`{c}`" for c in ACTIVITY_NAMES)
    platforms = ", ".join(f"'{p}'" for p in GIT_PLATFORMS)
    narrow = f"\n  AND ({where})" if where else ""
    return f"""{look.with_}SELECT {cols},
    toUInt64(gitInsertions) + toUInt64(gitDeletions) AS gitChangedLines,
    {changed_lines_bucket_sql("gitChangedLines")} AS gitChangedLinesBucket,
    if(({look.org_code}) AS _code = '', '{UNKNOWN}', _code) AS organizationCountryCode,
    {look.org_name} AS organizationName,
    {snapshot} AS snapshotId,
    toUInt8(0) AS _out_deleted,
    {VERSION_NOW} AS _out_version{extra}
FROM {source}{" FINAL" if final else ""}
WHERE _deleted = 0{narrow}
  AND {look.member_ok}
  AND (platform NOT IN ({platforms}) OR {look.channel_ok})"""
