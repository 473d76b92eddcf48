"""The reference side of the load generator: segments, projects, integrations, repositories, members and
organizations, built from the generator's seeded random source, and their Sequin messages.

Only ``stream/loadgen.py`` uses this; it is split out to keep one concept per module. The records follow
the Postgres columns named in CLEANED_BUCKETS.md (plus a few realistic extras the pipeline ignores).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from connectors.model import GERRIT, gerrit_query_url

if TYPE_CHECKING:
    from stream.loadgen import LoadGenerator

EPOCH = datetime(2025, 6, 1, tzinfo=UTC)

# (location, country) pairs as people type them; the ISO code the product must find is in the comment.
ORG_PLACES: tuple[tuple[str | None, str | None], ...] = (
    ("Bucharest, Romania", ""),  # RO
    ("Lagos, Nigeria", ""),  # NG
    ("Newark, New Jersey", ""),  # US
    ("", "UK"),  # GB
    ("", "US"),  # US
    ("South Korea", ""),  # KR
    ("Atlanta, Georgia, United States", ""),  # US
    ("", ""),  # XX
    (None, None),  # XX
    ("Berlin", "Germany"),  # DE
    ("San Francisco, CA", ""),  # US
    ("Bangalore", "India"),  # IN
    ("", "United Kingdom"),  # GB
    ("Tokyo, Japan", ""),  # JP
    ("São Paulo, Brazil", ""),  # BR
    ("Remote", ""),  # XX
    ("", "FR"),  # FR
    ("Toronto, Ontario, Canada", ""),  # CA
)
GERRIT_URLS = (
    "https://review.opendev.org/r/{a}/{b}",
    "https://gerrit.example.org/gerrit/{a}/{b}",
    "https://android-review.example.com/{a}/{b}",
)
WORDS = (
    "acme",
    "widget",
    "zephyr",
    "kestrel",
    "nimbus",
    "orbit",
    "quartz",
    "lumen",
    "cobalt",
    "tundra",
    "vortex",
    "maple",
    "helix",
    "ember",
    "falcon",
    "garnet",
    "harbor",
    "iris",
    "juniper",
    "lotus",
)


def ts(moment: datetime) -> str:
    """Sequin's timestamptz text: ISO-8601 UTC with microseconds and a Z (formatted by hand: fast)."""
    m = moment if moment.tzinfo is UTC else moment.astimezone(UTC)
    return f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}.{m.microsecond:06d}Z"


def new_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass
class ReferenceModel:
    segment_ids: list[str]
    cum_weights: list[float]
    repos: dict[str, list[dict[str, Any]]]  # segmentId -> repositories (with "_platform")
    members: list[dict[str, Any]]  # internal view: id, username, organizationId
    messages: list[tuple[str, str, bytes | None, str]] = field(default_factory=list)

    def pick_segment(self, rng: random.Random) -> str:
        return rng.choices(self.segment_ids, cum_weights=self.cum_weights)[0]

    def pick_member(self, rng: random.Random) -> dict[str, Any]:
        if rng.random() < 0.02:  # an activity of a member the members table never heard of
            return {"id": new_uuid(rng), "username": f"ghost{rng.randint(1, 999)}", "organizationId": None}
        return rng.choice(self.members)

    def git_channel(self, rng: random.Random, segment: str) -> tuple[str, str]:
        """(platform, channel) of a git-platform activity in ``segment``."""
        repos = self.repos.get(segment) or []
        if not repos or rng.random() < 0.08:
            # A repository this segment does not own (another segment's, or unknown): dropped by cleaning.
            pool: list[dict[str, Any] | None] = [r for rs in self.repos.values() for r in rs]
            other = rng.choice(pool or [None])
            url = other["url"] if other and rng.random() < 0.5 else f"https://github.com/unknown/{rng.choice(WORDS)}"
            return "github", url
        repo = rng.choice(repos)
        url, kind = repo["url"], repo["_platform"]
        if kind == GERRIT:
            platform = rng.choice(("gerrit", "gerrit", "git"))
            if rng.random() < 0.4:
                url = gerrit_query_url(url)
        else:
            platform = rng.choice((kind, kind, "git"))
        if rng.random() < 0.25:
            url = mixed_case(rng, url)
        return platform, url


def mixed_case(rng: random.Random, url: str) -> str:
    return "".join(c.upper() if c.isalpha() and rng.random() < 0.3 else c for c in url)


def zipf_weights(rng: random.Random, n: int, s: float = 1.1) -> list[float]:
    ranks = list(range(1, n + 1))
    rng.shuffle(ranks)
    weights = [1.0 / (r**s) for r in ranks]
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    return cum


def build_reference_model(gen: LoadGenerator) -> ReferenceModel:
    """Create the reference rows and queue their messages on the generator's clock, in topic order."""
    rng, cfg = gen.rng, gen.config
    segments = [new_uuid(rng) for _ in range(cfg.segments)]
    model = ReferenceModel(segments, zipf_weights(rng, len(segments)), {}, [])
    out = model.messages

    def send(
        table: str,
        action: str,
        record: dict[str, Any],
        changes: dict[str, Any] | None = None,
        moment: datetime | None = None,
    ) -> None:
        out.append((table, record["id"], gen.encode(table, action, record, changes, record["id"], moment), action))

    def born() -> tuple[str, datetime]:
        moment = gen.now()
        return ts(moment - timedelta(days=rng.randint(30, 900))), moment

    later: list[tuple[str, str, dict[str, Any], dict[str, Any] | None]] = []  # updates/deletes after inserts

    def evolve(table: str, row: dict[str, Any], new: dict[str, Any]) -> None:
        old = {k: row[k] for k in new} | {"updatedAt": row["updatedAt"]}
        row = row | new
        later.append((table, "update", row, old))

    # integrations: one github per segment, some gitlab, some gerrit
    integrations: dict[str, list[dict[str, Any]]] = {}
    for seg in segments:
        kinds = ["github"] + (["gerrit"] if rng.random() < 0.25 else []) + (["gitlab"] if rng.random() < 0.2 else [])
        for kind in kinds:
            created, moment = born()
            row: dict[str, Any] = {
                "id": new_uuid(rng),
                "platform": kind,
                "segmentId": seg,
                "status": "done",
                "settings": {"orgs": [rng.choice(WORDS)]},
                "deletedAt": None,
                "createdAt": created,
                "updatedAt": ts(moment),
                "tenantId": "875c38bd-2b1b-4e91-ad07-0cfbabb4c49f",
            }
            integrations.setdefault(seg, []).append(row)
            send("integrations", "read" if rng.random() < 0.5 else "insert", row, moment=moment)

    # insightsProjects: one per segment; enabled, disabled, deleted
    projects: dict[str, dict[str, Any]] = {}
    for n, seg in enumerate(segments):
        created, moment = born()
        name = f"{rng.choice(WORDS).title()} {rng.choice(WORDS).title()} {n}"
        row = {
            "id": new_uuid(rng),
            "name": name,
            "slug": name.lower().replace(" ", "-"),
            "segmentId": seg,
            "description": f"The {name} project.",
            "enabled": True,
            "deletedAt": None,
            "isLF": rng.random() < 0.5,
            "createdAt": created,
            "updatedAt": ts(moment),
            "logoUrl": None,
            "website": None,
        }
        if n % 10 == 3:  # every tenth project disabled, every tenth deleted (sizes are shuffled)
            row["enabled"] = False
        elif n % 10 == 6:
            row["deletedAt"] = ts(moment)
        projects[seg] = row
        send("insightsProjects", "read" if rng.random() < 0.5 else "insert", row, moment=moment)
        if rng.random() < 0.05:
            evolve("insightsProjects", row, {"enabled": not row["enabled"]})

    # repositories: 1-3 per integration; enabled/disabled/deleted/excluded/archived; one row per url
    seen_urls: set[str] = set()
    for seg in segments:
        for integ in integrations[seg]:
            for _ in range(rng.randint(1, 3)):
                a, b = rng.choice(WORDS), f"{rng.choice(WORDS)}-{rng.randint(1, 99)}"
                if integ["platform"] == GERRIT:
                    url = rng.choice(GERRIT_URLS).format(a=a, b=b)
                else:
                    url = f"https://{integ['platform']}.com/{a}/{b}"
                if url in seen_urls:
                    continue
                seen_urls.add(url)
                created, moment = born()
                row = {
                    "id": new_uuid(rng),
                    "url": url,
                    "segmentId": seg,
                    "insightsProjectId": projects[seg]["id"],
                    "sourceIntegrationId": integ["id"],
                    "enabled": True,
                    "excluded": False,
                    "archived": False,
                    "deletedAt": None,
                    "forkedFrom": None,
                    "createdAt": created,
                    "updatedAt": ts(moment),
                }
                state = len(seen_urls) % 16  # a fixed share of each state, whatever the seed
                if state in (1, 9):
                    row["enabled"] = False
                elif state == 2:
                    row["deletedAt"] = ts(moment)
                elif state == 3:
                    row["excluded"] = True
                elif state == 4:
                    row["archived"] = True
                model.repos.setdefault(seg, []).append(row | {"_platform": integ["platform"]})
                send("repositories", "read" if rng.random() < 0.5 else "insert", row, moment=moment)
                if state == 5:  # no REPLICA IDENTITY FULL: a delete carries only the primary key
                    later.append(("repositories", "delete", {k: None for k in row} | {"id": row["id"]}, None))
                elif state == 6:
                    evolve("repositories", row, {"enabled": False})

    # organizations with messy places
    orgs: list[dict[str, Any]] = []
    for _ in range(cfg.organizations or max(12, min(2000, cfg.count // 100))):
        created, moment = born()
        location, country = rng.choice(ORG_PLACES)
        suffix = rng.choice(("Inc", "GmbH", "Labs", "SRL", "Ltd"))
        row = {
            "id": new_uuid(rng),
            "displayName": f"{rng.choice(WORDS).title()} {suffix}",
            "location": location,
            "country": country,
            "website": None,
            "description": None,
            "createdAt": created,
            "updatedAt": ts(moment),
            "deletedAt": None,
        }
        orgs.append(row)
        send("organizations", "read" if rng.random() < 0.5 else "insert", row, moment=moment)
        if rng.random() < 0.05:
            loc2, country2 = rng.choice(ORG_PLACES)
            evolve("organizations", row, {"location": loc2, "country": country2})

    # members: bots, team members, organization members, people
    for i in range(cfg.members or max(30, min(20_000, cfg.count // 20))):
        created, moment = born()
        attributes: dict[str, Any] = {"location": {"default": rng.choice(("Berlin", "Lagos", "", "Seoul"))}}
        r = rng.random()
        if r < 0.06:
            attributes["isBot"] = {"default": True, "github": True}
        elif r < 0.11:
            attributes["isTeamMember"] = {"default": True}
        elif r < 0.14:
            attributes["isOrganization"] = {"default": True}
        elif r < 0.2:
            attributes["isBot"] = {"default": False}
        username = f"{rng.choice(WORDS)}{i}"
        row = {
            "id": new_uuid(rng),
            "attributes": attributes,
            "displayName": username.title(),
            "joinedAt": created,
            "createdAt": created,
            "updatedAt": ts(moment),
            "score": rng.randint(0, 10),
            "reach": {"total": rng.randint(-1, 5000)},
            "manuallyCreated": False,
            "deletedAt": None,
        }
        send("members", "read" if rng.random() < 0.5 else "insert", row, moment=moment)
        model.members.append(
            {
                "id": row["id"],
                "username": username,
                "organizationId": rng.choice(orgs)["id"] if rng.random() < 0.8 else None,
            }
        )
        if rng.random() < 0.02:
            evolve("members", row, {"attributes": attributes | {"isBot": {"default": True}}})

    for table, action, row, changes in later:
        moment = gen.now()
        if action == "update":
            row["updatedAt"] = ts(moment)
        send(table, action, row, changes, moment)
        if rng.random() < 0.1:  # a duplicate delivery of a reference change
            out.append(out[-1][:3] + ("duplicate",))
    return model
