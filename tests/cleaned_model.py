"""The tests' own model of the cleaned buckets, computed from the Sequin messages of all six topics (the
rules of ../shared/spec/CLEANED_BUCKETS.md), written independently of stream/ and connectors/ except for
the country resolver, which has its own tests (tests/unit/test_countries.py) and is injected.

Feed every message, in the order each topic's partition delivers it (per key), then read ``expected()``:
one tuple per cleaned row (activityId, memberId, organizationName, organizationCountryCode,
gitChangedLines, gitChangedLinesBucket). Bad input (what the router or loader dead-letters) is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

SORT_KEY = ("segmentId", "timestamp", "type", "platform", "channel", "sourceId")
ACTIONS = {"insert", "update", "delete", "read"}
GIT = {"git", "gerrit", "github", "gitlab"}
Row = tuple[str, str, str, str, int, str]


def _ms(v: Any) -> int:
    if isinstance(v, int):
        return v // 1000
    return int(datetime.fromisoformat(str(v).replace("Z", "+00:00")).astimezone(UTC).timestamp() * 1000)


def gerrit_variant(url: str) -> str:
    if "/r/" in url:
        return url.replace("/r/", "/r/q/project:", 1)
    if "/gerrit/" in url:
        return url.replace("/gerrit/", "/gerrit/q/project:", 1)
    scheme, rest = url.split("://", 1)
    host, _, path = rest.partition("/")
    return f"{scheme}://{host}/q/project:{path}"


def lines_bucket(n: int) -> str:
    for upper, label in ((1, ""), (10, "1-9"), (60, "10-59"), (100, "60-99"), (500, "100-499")):
        if n < upper:
            return label
    return "500+"


def _flag(rec: dict[str, Any], name: str) -> bool:
    attrs = rec.get("attributes")
    if isinstance(attrs, str):
        try:
            attrs = orjson.loads(attrs)
        except orjson.JSONDecodeError:
            attrs = {}
    value = (attrs or {}).get(name) if isinstance(attrs, dict) else None
    return bool(value.get("default")) if isinstance(value, dict) else False


class CleanedModel:
    """Latest version per key for the five reference tables and per row identity for activities."""

    def __init__(self, country_code: Callable[[str | None, str | None], str]) -> None:
        self._country_code = country_code
        self._refs: dict[str, dict[str, tuple[int, bool, dict[str, Any]]]] = {}
        self._acts: dict[tuple[Any, ...], tuple[int, bool, dict[str, Any]]] = {}

    # --- input -------------------------------------------------------------------------------------------

    def feed(self, table: str, values: Iterable[bytes | None]) -> None:
        for value in values:
            msg = self._parse(value)
            if msg is None:
                continue
            if table == "activityRelations":
                self._activity(msg)
            else:
                self._reference(table, msg)

    @staticmethod
    def _parse(value: bytes | None) -> dict[str, Any] | None:
        try:
            msg = orjson.loads(value) if value is not None else None
        except orjson.JSONDecodeError:
            return None
        if not isinstance(msg, dict) or msg.get("action") not in ACTIONS or not isinstance(msg.get("record"), dict):
            return None
        return msg

    @staticmethod
    def _version(rec: dict[str, Any], msg: dict[str, Any], deleted: bool) -> int | None:
        stamp = rec.get("updatedAt") or (msg.get("metadata") or {}).get("commit_timestamp")
        try:
            return _ms(stamp) * 2 + deleted if stamp is not None else None
        except (ValueError, TypeError):
            return None

    def _reference(self, table: str, msg: dict[str, Any]) -> None:
        rec = msg["record"]
        if not isinstance(rec.get("id"), str) or not rec["id"]:
            return
        deleted = msg["action"] == "delete"
        version = self._version(rec, msg, deleted)
        if version is None:
            return
        rows = self._refs.setdefault(table, {})
        old = rows.get(rec["id"])
        if old is None or version >= old[0]:
            rows[rec["id"]] = (version, deleted, rec)

    def _identity(self, rec: dict[str, Any]) -> tuple[Any, ...]:
        return (
            rec["segmentId"],
            _ms(rec["timestamp"]),
            rec["type"],
            rec["platform"],
            rec.get("channel") or "",
            rec["sourceId"],
        )

    def _offer(self, rec: dict[str, Any], deleted: bool) -> None:
        key = self._identity(rec)
        version = _ms(rec["updatedAt"]) * 2 + deleted
        old = self._acts.get(key)
        if old is None or version >= old[0]:
            self._acts[key] = (version, deleted, rec)

    def _activity(self, msg: dict[str, Any]) -> None:
        rec = msg["record"]
        try:
            if not isinstance(rec.get("segmentId"), str) or not rec["segmentId"]:
                return
            self._identity(rec)
            _ms(rec["updatedAt"])
            _ms(rec["createdAt"])
        except (KeyError, ValueError, TypeError):
            return
        changes = msg.get("changes") or {}
        if msg["action"] == "update" and any(k in changes for k in SORT_KEY):
            self._offer({**rec, **changes}, True)
        self._offer(rec, msg["action"] == "delete")

    # --- output ------------------------------------------------------------------------------------------

    def _live(self, table: str) -> dict[str, dict[str, Any]]:
        return {k: rec for k, (_, deleted, rec) in self._refs.get(table, {}).items() if not deleted}

    def allowed_channels(self) -> set[tuple[str, str]]:
        projects = {
            k: r
            for k, r in self._live("insightsProjects").items()
            if r.get("enabled", True) and r.get("deletedAt") is None
        }
        gerrit = {k for k, r in self._live("integrations").items() if r.get("platform") == "gerrit"}
        out: set[tuple[str, str]] = set()
        for r in self._live("repositories").values():
            if (
                not r.get("enabled", True)
                or r.get("deletedAt") is not None
                or r.get("insightsProjectId") not in projects
            ):
                continue
            url = (r.get("url") or "").lower()
            out.add((url, r.get("segmentId") or ""))
            if r.get("sourceIntegrationId") in gerrit:
                out.add((gerrit_variant(url), r.get("segmentId") or ""))
        return out

    def real_members(self) -> set[str]:
        return {
            k
            for k, r in self._live("members").items()
            if not any(_flag(r, f) for f in ("isBot", "isTeamMember", "isOrganization"))
        }

    def expected(self) -> set[Row]:
        allowed, people, orgs = self.allowed_channels(), self.real_members(), self._live("organizations")
        out: set[Row] = set()
        for _, deleted, r in self._acts.values():
            if deleted or r.get("memberId") not in people:
                continue
            if r["platform"] in GIT and ((r.get("channel") or "").lower(), r["segmentId"]) not in allowed:
                continue
            lines = int(r.get("gitInsertions") or 0) + int(r.get("gitDeletions") or 0)
            org = orgs.get(r.get("organizationId") or "")
            name = (org.get("displayName") or "") if org else ""
            code = self._country_code(org.get("country") or "", org.get("location") or "") if org else "XX"
            out.add((r["activityId"], r["memberId"], name, code, lines, lines_bucket(lines)))
        return out


CLEANED_MODEL_COLUMNS = (
    "activityId",
    "memberId",
    "organizationName",
    "organizationCountryCode",
    "gitChangedLines",
    "gitChangedLinesBucket",
)


def cleaned_union_rows(wh: Any, view: str = "activityRelations_deduplicated_cleaned_bucket_union") -> list[Row]:
    """The warehouse's cleaned rows in the model's shape, as a list (duplicates would show)."""
    cols = ", ".join(f"`{c}`" for c in CLEANED_MODEL_COLUMNS)
    return [tuple(r) for r in wh.rows(f"SELECT {cols} FROM {view}")]  # type: ignore[misc]
