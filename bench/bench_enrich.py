"""Benchmark (not a test): rebuilding all cleaned buckets vs the same cleaning SQL once over one unbucketed table,
and a single-project query through the routing view vs through the union.

    .venv/bin/python bench/bench_enrich.py --sizes 1000000 5000000 10000000 --repeat 3

For each size, synthetic activities are generated inside ClickHouse (numbers() and rand(): skewed segment sizes,
git and non-git platforms, repository channels in mixed case, bots/team members, organizations with messy
locations) into one unbucketed raw table, then copied into the N raw bucket tables, and every raw table is
merged (OPTIMIZE FINAL) so both sides start from the same state. Timed (median of --repeat runs):

- unbucketed: ``INSERT INTO <aside> cleaning_select(all)`` once (the same SQL as a bucket rebuild, one table);
- buckets, parallel=1 and parallel=2: ``Enricher.rebuild_many(range(N), parallel=K)`` (build aside + EXCHANGE);

with rows/s (raw rows in / second) and the peak RSS of this process (chdb runs in it), sampled every 20 ms.
At the largest size: a single-project query (count, sum of changed lines, distinct members for one segment)
through ``activityRelations_bucket_routing(bucketId=b)`` vs through the union view, and straight from the
bucket's table for reference (median of 15).
Results are appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.warehouse import open_warehouse  # noqa: E402
from stream.buckets import cleaned_table, raw_table  # noqa: E402
from stream.enrich import (  # noqa: E402
    Enricher,
    cleaning_select,
    drop_reference,
    prepare_reference,
    refresh_country_codes,
)
from stream.schema import ROUTING_VIEW, UNION_VIEW, cleaned_table_ddl, ensure_schema  # noqa: E402

ALL = "bench_activities_all"
ALL_CLEANED = "bench_activities_all_cleaned"
SEGMENTS = 500
MEMBERS = 200_000
ORGS = 5_000
LOCATIONS = ["Bucharest, Romania", "Lagos, Nigeria", "Newark, New Jersey", "Atlanta, Georgia, United States",
             "San Francisco, CA", "Berlin, Germany", "Tbilisi, Georgia", "Bengaluru, India", "", "Remote"]


class PeakRss:
    """Samples this process's RSS in a thread; ``peak`` in bytes."""

    def __init__(self, every: float = 0.02) -> None:
        self.every = every
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRss:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def timed(fn: Callable[[], object]) -> tuple[float, int]:
    with PeakRss() as mem:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t, mem.peak


def generate(wh, size: int, buckets: int) -> None:  # noqa: ANN001
    for t in ("members", "organizations", "insightsProjects", "repositories", "integrations", ALL):
        wh.command(f"TRUNCATE TABLE IF EXISTS {t}")
    for b in range(buckets):
        wh.command(f"TRUNCATE TABLE {raw_table(b)}")
    v = "toUInt64(1700000000000) * 2"
    wh.command(f"""INSERT INTO members (id, attributes, isBot, isTeamMember, isOrganization, displayName, updatedAt,
        _deleted, _version) SELECT concat('m', toString(number)), '{{}}', number % 50 = 0, number % 71 = 0,
        number % 97 = 0, concat('member ', toString(number)), now64(3), 0, {v} FROM numbers({MEMBERS})""")
    locs = "[" + ", ".join(f"'{x}'" for x in LOCATIONS) + "]"
    wh.command(f"""INSERT INTO organizations (id, displayName, location, country, updatedAt, _deleted, _version)
        SELECT concat('o', toString(number)), concat('Org ', toString(number)),
        {locs}[number % {len(LOCATIONS)} + 1], if(number % 7 = 0, 'UK', ''), now64(3), 0, {v}
        FROM numbers({ORGS})""")
    wh.command(f"""INSERT INTO insightsProjects (id, name, slug, segmentId, enabled, deletedAt, updatedAt, _deleted,
        _version) SELECT concat('p', toString(number)), concat('Project ', toString(number)),
        concat('project-', toString(number)), concat('seg-', toString(number)), number % 10 != 3,
        if(number % 17 = 5, now64(3), NULL), now64(3), 0, {v} FROM numbers({SEGMENTS})""")
    wh.command(f"""INSERT INTO integrations (id, platform, segmentId, updatedAt, _deleted, _version) VALUES
        ('ig-gh', 'github', '', now64(3), 0, {v}), ('ig-gerrit', 'gerrit', '', now64(3), 0, {v})""")
    wh.command(f"""INSERT INTO repositories (id, url, segmentId, insightsProjectId, sourceIntegrationId, enabled,
        excluded, archived, deletedAt, updatedAt, _deleted, _version)
        SELECT concat('r', toString(number)),
        if(s % 5 = 0, concat('https://review.example.org/r/Org', toString(s), '/Repo', toString(k)),
                      concat('https://github.com/Org', toString(s), '/Repo', toString(k))),
        concat('seg-', toString(s)), concat('p', toString(s)), if(s % 5 = 0, 'ig-gerrit', 'ig-gh'), k != 3,
        k = 2, 0, NULL, now64(3), 0, {v}
        FROM (SELECT number, intDiv(number, 4) AS s, number % 4 AS k FROM numbers({SEGMENTS * 4}))""")
    platforms = "['git', 'github', 'gitlab', 'gerrit', 'slack', 'discord', 'jira', 'discourse']"
    wh.command(f"""INSERT INTO {ALL}
        SELECT toString(number) AS activityId, '' AS conversationId, ts AS createdAt, ts AS updatedAt,
            concat('m', toString(rand(1) % {MEMBERS})) AS memberId, '' AS objectMemberId, '' AS objectMemberUsername,
            if(rand(2) % 3 = 0, '', concat('o', toString(rand(3) % {ORGS}))) AS organizationId, '' AS parentId,
            {platforms}[rand(4) % 8 + 1] AS platform, concat('seg-', toString(seg)) AS segmentId,
            'someone' AS username, concat('src-', toString(number)) AS sourceId,
            ['commit', 'message', 'issue'][rand(6) % 3 + 1] AS type, ts AS timestamp, '' AS sourceParentId,
            multiIf(platform = 'gerrit', concat('https://review.example.org/r/q/project:org', toString(seg), '/repo',
                                                toString(rand(7) % 5)),
                    platform IN ('git', 'github', 'gitlab'),
                    concat(if(rand(8) % 2 = 0, 'https://github.com/Org', 'HTTPS://GITHUB.COM/ORG'), toString(seg),
                           '/Repo', toString(rand(7) % 5)),
                    '#general') AS channel,
            -1 AS sentimentScore, rand(9) % 400 AS gitInsertions, rand(10) % 200 AS gitDeletions, -1 AS score,
            1 AS isContribution, '' AS pullRequestReviewState, 0 AS _deleted,
            toUInt64(toUnixTimestamp64Milli(ts)) * 2 AS _version
        FROM (SELECT number, toDateTime64(1704067200 + (number * 7919) % 63072000, 3, 'UTC') AS ts,
                     toUInt32(pow(rand(5) / 4294967296.0, 3) * {SEGMENTS}) AS seg
              FROM numbers({size}))""")
    for b in range(buckets):
        wh.command(f"INSERT INTO {raw_table(b)} SELECT * FROM {ALL} WHERE cityHash64(segmentId) % {buckets} = {b}")
    for t in [ALL] + [raw_table(b) for b in range(buckets)]:
        wh.command(f"OPTIMIZE TABLE {t} FINAL")


class Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000, 10_000_000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--buckets", type=int, default=10)
    ap.add_argument("--data-dir", type=Path, default=None, help="default: a temporary directory, removed after")
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--queries", type=int, default=15)
    args = ap.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-enrich-"))
    n = args.buckets
    enricher = Enricher(lambda: open_warehouse(data_dir), clock=Clock(), lock_dir=data_dir / "locks")
    lines: list[str] = []
    query_lines: list[str] = []
    load_before = os.getloadavg()
    try:
        with open_warehouse(data_dir) as wh:
            ensure_schema(wh, n)
            wh.command(f"CREATE TABLE IF NOT EXISTS {ALL} AS {raw_table(0)}")
            for size in args.sizes:
                t = time.perf_counter()
                generate(wh, size, n)
                refresh_country_codes(wh)
                raw = wh.rows(f"SELECT count() FROM {ALL} FINAL")[0][0]
                print(f"size {size:,}: generated in {time.perf_counter() - t:.1f}s", flush=True)

                def unbucketed() -> None:  # the same steps as one bucket's rebuild, over the one big table
                    refresh_country_codes(wh)
                    ref = prepare_reference(wh)
                    try:
                        wh.command(f"DROP TABLE IF EXISTS {ALL_CLEANED} SYNC")
                        wh.command(cleaned_table_ddl(0, ALL_CLEANED))
                        wh.command(f"INSERT INTO {ALL_CLEANED} {cleaning_select(ALL, ref)}",
                                   {"snapshot": datetime.now(UTC).strftime("%Y-%m-%d %H:00:00")})
                    finally:
                        drop_reference(wh, ref)

                def buckets(k: int) -> Callable[[], None]:
                    def run() -> None:
                        res = enricher.rebuild_many(range(n), parallel=k)
                        bad = [r for r in res if r.status != "ok"]
                        if bad:
                            raise SystemExit(f"rebuild failed: {bad[0]}")
                    return run

                runs: dict[str, list[tuple[float, int]]] = {"unbucketed": [], "p1": [], "p2": []}
                for _ in range(args.repeat):  # interleaved, so load drift hits every variant alike
                    runs["unbucketed"].append(timed(unbucketed))
                    runs["p1"].append(timed(buckets(1)))
                    runs["p2"].append(timed(buckets(2)))
                cleaned = wh.rows(f"SELECT count() FROM {ALL_CLEANED}")[0][0]
                in_buckets = sum(wh.rows(f"SELECT count() FROM {cleaned_table(b)}")[0][0] for b in range(n))
                assert cleaned == in_buckets, (cleaned, in_buckets)  # the same rows either way
                med = {k: statistics.median(s for s, _ in v) for k, v in runs.items()}
                mem = {k: max(m for _, m in v) for k, v in runs.items()}
                base = med["unbucketed"]
                for key, label in (("unbucketed", "unbucketed, once"), ("p1", f"{n} buckets, parallel=1"),
                                   ("p2", f"{n} buckets, parallel=2")):
                    lines.append(f"| {size:,} | {label} | {med[key]:.2f} | {raw / med[key]:,.0f} | "
                                 f"{med[key] / base:.2f}x | {mem[key] / 2**20:,.0f} | "
                                 f"{', '.join(f'{s:.2f}' for s, _ in runs[key])} |")
                    print(lines[-1], flush=True)
                print(f"  cleaned rows: {cleaned:,} of {raw:,}", flush=True)
            # Query benchmark at the largest size: the biggest enabled project.
            slug, seg = wh.rows(f"""SELECT p.slug, p.segmentId FROM insightsProjects AS p FINAL
                INNER JOIN (SELECT segmentId, count() AS c FROM {UNION_VIEW} GROUP BY segmentId) AS s
                ON s.segmentId = p.segmentId WHERE p.enabled = 1 AND p.deletedAt IS NULL
                ORDER BY s.c DESC LIMIT 1""")[0]
            bucket = wh.rows("SELECT bucketId FROM project_buckets(project = {p:String})", {"p": slug})[0][0]
            select = ("SELECT count(), sum(gitChangedLines), uniqExact(memberId) FROM {src} "
                      "WHERE segmentId = {seg:String}")
            routed_src = f"{ROUTING_VIEW}(bucketId = {bucket})"
            sources = {"routing": routed_src, "union": UNION_VIEW, "direct": cleaned_table(bucket)}
            answers = {k: wh.rows(select.replace("{src}", src), {"seg": seg}) for k, src in sources.items()}
            assert answers["routing"] == answers["union"] == answers["direct"], answers
            qt: dict[str, list[float]] = {k: [] for k in sources}
            for _ in range(args.queries):
                for key, src in sources.items():
                    t = time.perf_counter()
                    wh.rows(select.replace("{src}", src), {"seg": seg})
                    qt[key].append(time.perf_counter() - t)
            qm = {k: statistics.median(v) for k, v in qt.items()}
            rows_in_project = answers["union"][0][0]
            query_lines.append(f"| {args.sizes[-1]:,} | {slug} (bucket {bucket}, {rows_in_project:,} rows) | "
                               f"{qm['routing'] * 1000:.1f} | {qm['union'] * 1000:.1f} | "
                               f"{qm['direct'] * 1000:.1f} | {qm['routing'] / qm['union']:.2f}x |")
            print(query_lines[-1], flush=True)
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    load_after = os.getloadavg()
    cmd = "python bench/bench_enrich.py " + " ".join(sys.argv[1:])
    report = [
        f"\n## Enrichment rebuild: {n} buckets vs unbucketed ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)\n",
        f"- machine: {machine()}; load average before/after {load_before[0]:.1f}/{load_after[0]:.1f} "
        f"(shared machine: other work was running)",
        f"- command: `{cmd}`",
        "- each variant: median of the runs listed (interleaved); rows/s = raw rows in / median seconds; "
        "memory = peak RSS of the process (chdb is in-process); all raw tables merged (OPTIMIZE FINAL) first",
        "- targets: all buckets <= 1.1x unbucketed; with 2 parallel <= 0.7x\n",
        "| activities | variant | median s | rows/s | vs unbucketed | peak RSS MiB | runs s |",
        "|---:|---|---:|---:|---:|---:|---|",
        *lines,
        "\nSingle-project query (count, sum(gitChangedLines), uniqExact(memberId) WHERE segmentId = the project's), "
        f"median of {args.queries}; target routing <= 0.2x union\n",
        "| activities | project | routing ms | union ms | bucket table directly ms | routing / union |",
        "|---:|---|---:|---:|---:|---:|",
        *query_lines,
    ]
    with args.results.open("a") as fh:
        fh.write("\n".join(report) + "\n")
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
