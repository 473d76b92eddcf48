"""Country codes for the Tinybird project: fill ``organization_country_codes`` with bucketer's resolver.

The cleaning copy pipes (stream/tinybird_project.py) join ``organization_country_codes`` (country,
location) -> ISO code, because Tinybird runs SQL, not Python. ``sync_country_codes(client)`` asks Tinybird
for the (country, location) pairs of ``organizations`` that have no code for the current resolver version
yet, resolves them with connectors/countries.py (the product's own resolver, so Tinybird and the embedded
warehouse agree) and appends them through the Events API. Run it before the cleaning copies
(``bucketer tinybird countries``, or ``bucketer tinybird copy`` does it first). Idempotent: the data
source is a ReplacingMergeTree on resolverVersion, so a repeated pair is harmless.
"""

from __future__ import annotations

import orjson

from connectors.countries import RESOLVER_VERSION, organization_country_code
from connectors.tinybird_api import TinybirdClient
from stream.tinybird_project import COUNTRY_DS

PAIRS_SQL = (
    f"SELECT DISTINCT country, location FROM organizations FINAL WHERE _deleted = 0 "
    f"AND (country, location) NOT IN (SELECT country, location FROM {COUNTRY_DS} FINAL "
    f"WHERE resolverVersion = {RESOLVER_VERSION})"
)
BATCH = 5000


def sync_country_codes(client: TinybirdClient) -> int:
    """Resolve and append the missing pairs; returns how many were appended."""
    pairs = [(str(r.get("country") or ""), str(r.get("location") or "")) for r in client.query(PAIRS_SQL)]
    lines = [
        orjson.dumps(
            {
                "country": c,
                "location": loc,
                "code": organization_country_code(c, loc),
                "resolverVersion": RESOLVER_VERSION,
            }
        )
        for c, loc in sorted(set(pairs))
    ]
    for i in range(0, len(lines), BATCH):
        client.post_events(COUNTRY_DS, b"\n".join(lines[i : i + BATCH]) + b"\n")
    return len(lines)
