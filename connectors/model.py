"""The data model: the one owner of the facts the decoder, the warehouse and the Tinybird project share.

Everything that states the shape of a Sequin change or of a warehouse row derives from here: the warehouse DDL
(stream/schema.py), the message -> row SQL and its Python mirror (stream/row_sql.py), the decoder
(connectors/sequin.py), the cleaning rules (stream/cleaning.py), rebucket and bootstrap, the Tinybird generator
(stream/tinybird_project.py) and the load generator (stream/loadgen*.py).

It lives in ``connectors/`` because the decoder (connectors/sequin.py) needs the sort key, the actions and the
required columns, and nothing in ``connectors/`` may import ``stream/``; like connectors/topics.py (the topic
names of the contract) it imports nothing of this project. Table and view names keep their existing owners:
stream/buckets.py (bucket tables), stream/schema.py (views), connectors/topics.py (topics).

- ``ACTIVITY_COLUMNS``: the 23 activity columns in table order, each a ``Column(name, type, default, path)``:
  the ClickHouse type of the warehouse, the DEFAULT expression of the warehouse table (None: the type's own
  default), and the JSON path of the value in a Sequin message (SEQUIN.md).
- ``SORT_KEY``: the raw tables' ORDER BY; an update whose ``changes`` touch it retires the old row.
- ``ACTIONS``, ``ACTIVITY_REQUIRED`` (present and not null, CLEANED_BUCKETS.md), ``REFERENCE_KEY``.
- ``GIT_PLATFORMS`` and the gerrit rule (``GERRIT``, ``gerrit_query_url`` in Python, ``gerrit_variant_sql``).
- ``bucket_sql(expr, n)``: ``cityHash64(expr) % n`` as SQL (stream/buckets.py computes it in Python).
- ``slot_offset`` / ``slot_minute``: the hourly schedule slot of a bucket (stream/schedule.py).
"""

from __future__ import annotations

from typing import NamedTuple

TS = "DateTime64(3, 'UTC')"
NULLABLE_TS = f"Nullable({TS})"


class Column(NamedTuple):
    name: str
    type: str  # ClickHouse type in the warehouse
    default: str | None = None  # DEFAULT expression of the warehouse table; None: the type's own default
    path: str | None = None  # JSON path of the value in a Sequin message; None: computed by bucketer


def _rec(name: str, ctype: str, default: str | None = None) -> Column:
    return Column(name, ctype, default, f"$.record.{name}")


ACTIONS = ("insert", "update", "delete", "read")
BUCKET_KEY = "segmentId"

ACTIVITY_COLUMNS: tuple[Column, ...] = (
    _rec("activityId", "String"),
    _rec("conversationId", "String"),
    _rec("createdAt", TS),
    _rec("updatedAt", TS),
    _rec("memberId", "String"),
    _rec("objectMemberId", "String"),
    _rec("objectMemberUsername", "String"),
    _rec("organizationId", "String"),
    _rec("parentId", "String"),
    _rec("platform", "LowCardinality(String)"),
    _rec(BUCKET_KEY, "String"),
    _rec("username", "String"),
    _rec("sourceId", "String"),
    _rec("type", "LowCardinality(String)"),
    _rec("timestamp", TS),
    _rec("sourceParentId", "String"),
    _rec("channel", "String"),
    _rec("sentimentScore", "Int8", "-1"),
    _rec("gitInsertions", "UInt32"),
    _rec("gitDeletions", "UInt32"),
    _rec("score", "Int8", "-1"),
    _rec("isContribution", "UInt8"),
    _rec("pullRequestReviewState", "LowCardinality(String)"),
)
ACTIVITY_NAMES = tuple(c.name for c in ACTIVITY_COLUMNS)
_ACTIVITY_TYPES = {c.name: c.type for c in ACTIVITY_COLUMNS}

# The raw tables' ORDER BY (ReplacingMergeTree identity) and PARTITION BY.
SORT_KEY = (BUCKET_KEY, "timestamp", "type", "platform", "channel", "sourceId")
PARTITION_KEY = "toYear(createdAt)"

# Present and not null in every activity change (CLEANED_BUCKETS.md); a delete may lack updatedAt when the
# message's metadata.commit_timestamp stands in (CONTRACTS.md). Order: the order problems are reported in.
ACTIVITY_REQUIRED = (
    "activityId",
    "memberId",
    "platform",
    BUCKET_KEY,
    "sourceId",
    "type",
    "createdAt",
    "updatedAt",
    "timestamp",
)
# The required strings the decoder checks besides the bucket key (which it checks, and names, on its own).
REQUIRED_STRINGS = tuple(n for n in ACTIVITY_REQUIRED if n != BUCKET_KEY and _ACTIVITY_TYPES[n] != TS)
REQUIRED_TIMESTAMPS = tuple(n for n in ACTIVITY_REQUIRED if _ACTIVITY_TYPES[n] == TS)
VERSION_SOURCE = "updatedAt"  # _version = toUnixTimestamp64Milli(updatedAt) * 2 + _deleted

VERSION_COLUMNS: tuple[Column, ...] = (Column("_deleted", "UInt8"), Column("_version", "UInt64"))

# Cleaned buckets: the activity columns plus these, ReplacingMergeTree(_version, _deleted) ORDER BY CLEANED_ORDER.
CLEANED_EXTRA: tuple[Column, ...] = (
    Column("gitChangedLines", "UInt64"),
    Column("gitChangedLinesBucket", "String"),
    Column("organizationCountryCode", "LowCardinality(String)"),
    Column("organizationName", "String"),
    Column("snapshotId", "DateTime('UTC')"),
)
# The raw identity: a correction replaces exactly the cleaned row of one raw row (stream/incremental.py).
CLEANED_ORDER = SORT_KEY
# The anchor's cleaned datasources (MergeTree, replaced whole by the hourly copy): the Tinybird target keeps it.
ANCHOR_CLEANED_ORDER = (BUCKET_KEY, "timestamp", "type", "platform", "memberId", "organizationId")

# Reference tables: ReplacingMergeTree(_version, _deleted) ORDER BY REFERENCE_KEY, which is required.
REFERENCE_KEY = "id"
MEMBER_FLAGS = ("isBot", "isTeamMember", "isOrganization")  # from record.attributes.<flag>.default, 0 if absent
MEMBER_ATTRIBUTES = "attributes"  # the JSON text of record.attributes
EMPTY_ATTRIBUTES = "{}"  # stands in for absent or null attributes

REFERENCE_COLUMNS: dict[str, tuple[Column, ...]] = {
    "members": (
        _rec(REFERENCE_KEY, "String"),
        _rec(MEMBER_ATTRIBUTES, "String"),
        *(Column(f, "UInt8", None, f"$.record.{MEMBER_ATTRIBUTES}.{f}.default") for f in MEMBER_FLAGS),
        _rec("displayName", "String"),
        _rec("joinedAt", TS),
        _rec("createdAt", TS),
        _rec("updatedAt", TS),
    ),
    "organizations": (
        _rec(REFERENCE_KEY, "String"),
        _rec("displayName", "String"),
        _rec("location", "String"),
        _rec("country", "String"),
        _rec("createdAt", TS),
        _rec("updatedAt", TS),
    ),
    "repositories": (
        _rec(REFERENCE_KEY, "String"),
        _rec("url", "String"),
        _rec(BUCKET_KEY, "String"),
        _rec("insightsProjectId", "String"),
        _rec("sourceIntegrationId", "String"),
        _rec("enabled", "UInt8", "1"),
        _rec("excluded", "UInt8"),
        _rec("archived", "UInt8"),
        _rec("deletedAt", NULLABLE_TS),
        _rec("createdAt", TS),
        _rec("updatedAt", TS),
    ),
    "insightsProjects": (
        _rec(REFERENCE_KEY, "String"),
        _rec("name", "String"),
        _rec("slug", "String"),
        _rec(BUCKET_KEY, "String"),
        _rec("enabled", "UInt8", "1"),
        _rec("deletedAt", NULLABLE_TS),
        _rec("createdAt", TS),
        _rec("updatedAt", TS),
    ),
    "integrations": (
        _rec(REFERENCE_KEY, "String"),
        _rec("platform", "LowCardinality(String)"),
        _rec(BUCKET_KEY, "String"),
        _rec("deletedAt", NULLABLE_TS),
        _rec("createdAt", TS),
        _rec("updatedAt", TS),
    ),
}


def is_timestamp(ctype: str) -> bool:
    """A DateTime64 column, nullable or not (ISO-8601 text or unix microseconds in a Sequin message)."""
    return ctype in (TS, NULLABLE_TS)


# --- cleaning: git platforms and the gerrit rule (CLEANED_BUCKETS.md) -----------------------------------------
GIT_PLATFORMS = ("git", "gerrit", "github", "gitlab")  # exactly these (case-sensitive) need an allowed channel
GERRIT = "gerrit"  # the integration platform whose repositories also allow their /q/project: variant


def gerrit_query_url(url: str) -> str:
    """The ``/q/project:`` variant of a gerrit repository url: first '/r/' -> '/r/q/project:', else first
    '/gerrit/' -> '/gerrit/q/project:', else 'scheme://host/q/project:' + the path without its leading '/'."""
    if "/r/" in url:
        return url.replace("/r/", "/r/q/project:", 1)
    if "/gerrit/" in url:
        return url.replace("/gerrit/", "/gerrit/q/project:", 1)
    scheme, rest = url.split("://", 1)
    host, _, path = rest.partition("/")
    return f"{scheme}://{host}/q/project:{path}"


def gerrit_variant_sql(url: str, sep: str = ", ") -> str:
    """``gerrit_query_url`` as ClickHouse SQL of the url expression ``url``; ``sep`` joins the branches."""
    branches = (
        f"position({url}, '/r/') > 0, replaceOne({url}, '/r/', '/r/q/project:')",
        f"position({url}, '/gerrit/') > 0, replaceOne({url}, '/gerrit/', '/gerrit/q/project:')",
        f"replaceRegexpOne({url}, '^([^:/]+://[^/]*)/?', '\\\\1/q/project:')",
    )
    return f"multiIf({sep.join(branches)})"


# --- buckets --------------------------------------------------------------------------------------------------
def bucket_sql(expr: str, n: int) -> str:
    """The bucket of ``expr`` among ``n`` buckets as ClickHouse SQL (a UInt64); stream/buckets.py is the same
    function in Python, bit for bit."""
    return f"cityHash64({expr}) % {int(n)}"


# --- schedule slots (CLEANED_BUCKETS.md) ----------------------------------------------------------------------
FIRST_MINUTE, STEP_MINUTES, GROUP_SIZE = 10, 4, 2  # pairs of buckets 4 minutes apart from :10


def slot_offset(bucket: int, first: int = FIRST_MINUTE, step: int = STEP_MINUTES, group: int = GROUP_SIZE) -> int:
    """Minutes after the hour at which ``bucket`` is rebuilt, before wrapping (may exceed 59 for large N)."""
    return first + step * (bucket // group)


def slot_minute(bucket: int, first: int = FIRST_MINUTE, step: int = STEP_MINUTES, group: int = GROUP_SIZE) -> int:
    """The minute of every hour (0-59) at which ``bucket`` is rebuilt: ``slot_offset`` wrapped past :59."""
    return slot_offset(bucket, first, step, group) % 60
