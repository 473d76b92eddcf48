"""Benchmark (not a test): incremental cleaned buckets (issue 12), in one run, one process, one warehouse.

    .venv/bin/python -m bench.bench_incremental [--quick] [--size 1000000] [--rates 1000,10000] [--duration S]
        [--changes 5] [--flushes 120]

1. ``--size`` synthetic activities (bench_enrich's generator, inside ClickHouse) are loaded into the raw
   buckets with their reference tables; ONE full rebuild of every cleaned bucket (``Enricher.rebuild_many``,
   parallel=1) is timed (wall and CPU seconds of this process: chdb runs in it), then ``Maintainer.setup``
   (index backfill + first reconciliation).
2. Maintenance CPU (no broker): an hour's change rate of 1% of the rows + 100 reference changes, landed as
   the loader would land it (rows into the raw buckets, reference rows into the reference tables) in
   ``--flushes`` flushes of the per-flush share (1%/3600 of the rows each, i.e. one flush a second), a
   reference change in every ``flushes/ (100/36)``-th; each followed by ``Maintainer.correct``. CPU seconds of the
   corrections only (the landing's own cost, materialized views included, is reported apart). Scaled to an
   hour: 3600 x the plain flush's correction + 100 x the reference change's extra.
3. The real pipeline (Router exactly once + Loader + the MaintenanceLoop woken by each flush, threads in this
   process, as ``bucketer run``; no schedule) on a local broker: a separate producer process
   (bench/latency_probe.py) sends Sequin inserts at each ``--rates`` rate; "visible" = the correction holding
   the event returned (its identities are read from the Maintainer's work table right after; one INSERT = one
   part, so a FINAL reader sees it from then on); a final sweep over the cleaned union checks every event is
   there (missing = lost, reported, never left out of the percentiles silently).
4. Reference changes through Kafka at a background of 1k events/s: a member turning bot, a repository disabled,
   an organization renamed (``--changes`` of each, different ids), each produced as a Sequin update to its
   topic; "fully corrected" = the end of the first ``Maintainer.correct`` after which a reader of the cleaned
   union (checking after each correction ends, so no polling load) sees none of the member's rows / none of the
   repository's channel rows / every row of the organization with its new name.
5. One-project query (count, sum of changed lines, distinct members, for the largest segment) on the maintained
   cleaned bucket (ReplacingMergeTree read FINAL, with the parts the corrections left) vs the same rows copied
   into a plain MergeTree ORDER BY (segmentId, timestamp, type, platform, memberId, organizationId) (the old
   layout); median of ``--queries``.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

from bench.common import WORK_DIR, Report, broker, unique_prefix
from bench.latency_probe import pct, templates

PROC = psutil.Process()


def cpu() -> float:
    t = PROC.cpu_times()
    return t.user + t.system


def ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- data ---------------------------------------------------------------------------------------------------
def load(wh, size: int, buckets: int) -> None:  # noqa: ANN001
    from bench.bench_enrich import ALL, generate
    from stream.buckets import bucket_of, raw_table

    wh.command(f"CREATE TABLE IF NOT EXISTS {ALL} AS {raw_table(0)}")
    generate(wh, size, buckets)
    # bench_enrich splits by cityHash64; re-split the same rows by the router's rule, so the pipeline's
    # events, the reference changes and the maintenance all see the rows where the product would put them.
    segs = [str(s) for (s,) in wh.rows(f"SELECT DISTINCT segmentId FROM {ALL}")]
    by_bucket: dict[int, list[str]] = {}
    for s in segs:
        by_bucket.setdefault(bucket_of(s, buckets), []).append(s)
    for b in range(buckets):
        wh.command(f"TRUNCATE TABLE {raw_table(b)}")
        ids = by_bucket.get(b, [])
        if ids:
            wh.command(
                f"INSERT INTO {raw_table(b)} SELECT * FROM {ALL} WHERE segmentId IN {{s:Array(String)}}", {"s": ids}
            )
        wh.command(f"OPTIMIZE TABLE {raw_table(b)} FINAL")
    wh.command(f"TRUNCATE TABLE {ALL}")
    # The probe's event templates (loadgen activities): their members, projects and repositories, so that every
    # probe event passes the cleaning rules and must appear in the cleaned union.
    from connectors.model import GIT_PLATFORMS

    members, repos = set(), set()
    for tpl in templates():
        rec = json.loads(tpl)["record"]
        members.add(rec["memberId"])
        if rec["platform"] in GIT_PLATFORMS:
            repos.add((rec["channel"].lower(), rec["segmentId"]))
    v = "toUInt64(1700000000000) * 2"
    wh.command(
        "INSERT INTO members (id, attributes, isBot, isTeamMember, isOrganization, displayName, updatedAt, "
        f"_deleted, _version) SELECT arrayJoin({{m:Array(String)}}), '{{}}', 0, 0, 0, 'probe', now64(3), 0, {v}",
        {"m": sorted(members)},
    )
    for i, (url, seg) in enumerate(sorted(repos)):
        wh.command(
            "INSERT INTO insightsProjects (id, name, slug, segmentId, enabled, deletedAt, updatedAt, _deleted, "
            f"_version) VALUES ({{p:String}}, 'probe', 'probe', {{s:String}}, 1, NULL, now64(3), 0, {v})",
            {"p": f"probe-p{i}", "s": seg},
        )
        wh.command(
            "INSERT INTO repositories (id, url, segmentId, insightsProjectId, sourceIntegrationId, enabled, "
            f"excluded, archived, deletedAt, updatedAt, _deleted, _version) VALUES ({{r:String}}, {{u:String}}, "
            f"{{s:String}}, {{p:String}}, 'ig-gh', 1, 0, 0, NULL, now64(3), 0, {v})",
            {"r": f"probe-r{i}", "u": url, "s": seg, "p": f"probe-p{i}"},
        )


# -- 2. maintenance CPU ---------------------------------------------------------------------------------------
def maintenance_cpu(wh, maint, size: int, buckets: int, flushes: int, per_flush: int, every: int) -> dict:  # noqa: ANN001
    """``flushes`` one-second flushes of ``per_flush`` updated raw rows each, a reference change in every 36th
    (100 an hour), ``Maintainer.correct`` after every ``every``-th flush; CPU seconds of the corrections."""
    from stream.buckets import raw_table

    plain, refs, landing, idle = [], [], [], []
    pending_ref = False
    sample = max(1, size // buckets // per_flush)
    c_start = cpu()
    for i in range(flushes):
        b = i % buckets
        # An update of per_flush existing rows: a later updatedAt, changed line counts (the raw version rule).
        t0 = cpu()
        wh.command(
            f"INSERT INTO {raw_table(b)} SELECT * REPLACE (updatedAt + INTERVAL {i + 1} SECOND AS updatedAt, "
            f"gitInsertions + 1 AS gitInsertions, _version + {2 * (i + 1) * 1000} AS _version) "
            f"FROM {raw_table(b)} FINAL WHERE cityHash64(sourceId, {i}) % {sample} = 0 LIMIT {per_flush}"
        )
        if i % 36 == 35:
            pending_ref = True
            k = i // 36 + 1000 * every + per_flush
            kind = (i // 36) % 3
            stamp = "now64(3), 0, toUInt64(toUnixTimestamp64Milli(now64(3))) * 2"
            if kind == 0:
                wh.command(
                    "INSERT INTO members (id, attributes, isBot, isTeamMember, isOrganization, displayName, "
                    f"updatedAt, _deleted, _version) SELECT id, attributes, 1 - isBot, isTeamMember, isOrganization, "
                    f"displayName, {stamp} FROM members FINAL WHERE id = 'm{k % 200_000}'"
                )
            elif kind == 1:
                wh.command(
                    "INSERT INTO organizations (id, displayName, location, country, updatedAt, _deleted, _version) "
                    f"SELECT id, concat(displayName, ' renamed'), location, country, {stamp} "
                    f"FROM organizations FINAL WHERE id = 'o{k % 5000}'"
                )
            else:
                wh.command(
                    "INSERT INTO repositories (id, url, segmentId, insightsProjectId, sourceIntegrationId, enabled, "
                    "excluded, archived, deletedAt, updatedAt, _deleted, _version) SELECT id, url, segmentId, "
                    "insightsProjectId, sourceIntegrationId, 1 - enabled, excluded, archived, deletedAt, "
                    f"{stamp} FROM repositories FINAL WHERE id = 'r{k % 2000}'"
                )
        t1 = cpu()
        landing.append(t1 - t0)
        if i % every != every - 1:
            continue
        done = maint.correct(wh)
        t2 = cpu()
        (refs if pending_ref else plain).append(
            (t2 - t1, sum(c.candidates for c in done), sum(c.written for c in done))
        )
        pending_ref = False
    for _ in range(20):
        t0 = cpu()
        maint.correct(wh)
        idle.append(cpu() - t0)
    plain_s = [p[0] for p in plain]
    ref_s = [r[0] for r in refs]
    mean_plain = sum(plain_s) / max(len(plain_s), 1)
    mean_ref = sum(ref_s) / len(ref_s) if ref_s else mean_plain
    return {
        "rows_per_flush": per_flush,
        "every": every,
        "flushes": flushes,
        "corrections_plain": len(plain),
        "corrections_ref": len(refs),
        "correct_plain_cpu_mean": mean_plain,
        "correct_plain_cpu_p50": pct(sorted(plain_s), 50),
        "correct_ref_cpu_mean": mean_ref,
        "correct_idle_cpu_p50": pct(sorted(idle), 50),
        "landing_cpu_mean": sum(landing) / len(landing),
        "candidates_plain_p50": pct(sorted(p[1] for p in plain), 50),
        "written_plain_p50": pct(sorted(p[2] for p in plain), 50),
        "candidates_ref_p50": pct(sorted(r[1] for r in refs), 50) if refs else None,
        "written_ref_p50": pct(sorted(r[2] for r in refs), 50) if refs else None,
        "hour_cpu": 3600 / every * mean_plain + 100 * max(0.0, mean_ref - mean_plain),
        "total_cpu": cpu() - c_start,
    }


# -- 3/4. the pipeline ----------------------------------------------------------------------------------------
class Visibility:
    """Per tag: when each event's correction returned (time.time(), the producer's clock)."""

    def __init__(self) -> None:
        self.tag, self.count = "", 0
        self.seen = array.array("d")
        self.visible = 0
        self.lock = threading.Lock()

    def start(self, tag: str, count: int) -> None:
        with self.lock:
            self.tag, self.count, self.visible = tag, count, 0
            self.seen = array.array("d", bytes(8 * count))

    def mark(self, wh, work: str) -> None:  # noqa: ANN001
        tag = self.tag
        if not tag:
            return
        now = time.time()
        rows = wh.rows(f"SELECT sourceId FROM {work} WHERE startsWith(sourceId, {{p:String}})", {"p": f"{tag}-"})
        with self.lock:
            for (src,) in rows:
                seq = int(str(src).rsplit("-", 1)[1])
                if seq < self.count and self.seen[seq] == 0.0:
                    self.seen[seq] = now
                    self.visible += 1


def make_maintainer(buckets: int, vis: Visibility):  # noqa: ANN201
    from stream.incremental import Maintainer

    class Stamping(Maintainer):
        def _correct_buckets(self, wh, candidates):  # type: ignore[no-untyped-def]
            done = super()._correct_buckets(wh, candidates)
            vis.mark(wh, self.work)  # the work table still holds this round's identities
            return done

    return Stamping(buckets)


def producer_proc(bootstrap: str, topic: str, tag: str, rate: float, count: int) -> tuple[subprocess.Popen, Path]:
    path = WORK_DIR / f"incr-{tag}-{os.getpid()}.times"
    cmd = [sys.executable, "-m", "bench.latency_probe", bootstrap, topic, tag, str(rate), str(count), str(path)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True), path


def latency_phase(bootstrap, topic, vis, reader, tag, rate, count, drain, errors) -> dict:  # noqa: ANN001
    from stream.schema import UNION_VIEW

    vis.start(tag, count)
    t_start = time.time()
    c0, w0 = cpu(), time.monotonic()
    proc, path = producer_proc(bootstrap, topic, tag, rate, count)
    finished = None
    while vis.visible < count:
        if errors:
            proc.kill()
            raise RuntimeError(f"pipeline failed: {errors[0]!r}")
        if finished is None and proc.poll() is not None:
            finished = time.monotonic()
            if proc.returncode:
                raise RuntimeError(f"producer exited with {proc.returncode}")
        if finished is not None and time.monotonic() - finished > drain:
            break
        time.sleep(0.05)
    wall, used = time.monotonic() - w0, cpu() - c0
    out = proc.communicate()[0]
    achieved = json.loads(out.strip().splitlines()[-1])["achieved_rate"]
    produced = array.array("d")
    produced.frombytes(path.read_bytes())
    path.unlink(missing_ok=True)
    seen = vis.seen
    lat = sorted(seen[i] - produced[i] for i in range(count) if seen[i] != 0.0)
    tenths = []
    for k in range(10):
        part = sorted(seen[i] - produced[i] for i in range(k * count // 10, (k + 1) * count // 10) if seen[i] != 0.0)
        tenths.append(pct(part, 50))
    in_union = int(
        reader.rows(f"SELECT count() FROM {UNION_VIEW} WHERE startsWith(sourceId, {{p:String}})", {"p": f"{tag}-"})[0][
            0
        ]
    )
    vis.start("", 0)
    return {
        "rate": rate,
        "achieved_rate": achieved,
        "events": count,
        "lost": count - len(lat),
        "in_union": in_union,
        "p50": pct(lat, 50),
        "p90": pct(lat, 90),
        "p99": pct(lat, 99),
        "max": lat[-1] if lat else None,
        "p50_by_tenth": tenths,
        "pipeline_cores": used / wall if wall else None,
        "t0": t_start,
        "t1": time.time(),
    }


def pick_targets(reader, changes: int) -> dict:  # noqa: ANN001
    from stream.schema import UNION_VIEW

    members = [
        str(m)
        for (m,) in reader.rows(
            f"SELECT memberId FROM {UNION_VIEW} WHERE startsWith(memberId, 'm') GROUP BY memberId "
            f"ORDER BY count() DESC LIMIT {changes}"
        )
    ]
    orgs = [
        str(o)
        for (o,) in reader.rows(
            f"SELECT organizationId FROM {UNION_VIEW} WHERE organizationId != '' GROUP BY organizationId "
            f"ORDER BY count() DESC LIMIT {changes}"
        )
    ]
    repos = reader.rows(
        f"SELECT r.id, r.url, r.segmentId, r.insightsProjectId, r.sourceIntegrationId, count() AS c "
        f"FROM {UNION_VIEW} AS u INNER JOIN (SELECT * FROM repositories FINAL WHERE enabled AND deletedAt IS NULL "
        f"AND startsWith(id, 'r')) AS r "
        f"ON lower(u.channel) = lower(r.url) AND u.segmentId = r.segmentId "
        f"GROUP BY r.id, r.url, r.segmentId, r.insightsProjectId, r.sourceIntegrationId ORDER BY c DESC LIMIT {changes}"
    )
    return {"members": members, "orgs": orgs, "repos": [tuple(str(x) for x in r[:5]) for r in repos]}


def sequin(table: str, record: dict, lsn: int) -> bytes:
    now = datetime.now(UTC)
    record = record | {"updatedAt": ts(now)}
    return json.dumps(
        {
            "action": "update",
            "changes": {},
            "record": record,
            "metadata": {
                "table_schema": "public",
                "table_name": table,
                "commit_timestamp": ts(now),
                "commit_lsn": lsn,
                "commit_idx": 0,
                "idempotency_key": uuid.uuid4().hex,
                "record_pks": [record["id"]],
            },
        }
    ).encode()


def change_phase(bootstrap, topics, reader, targets, changes, errors, calls) -> dict:  # noqa: ANN001
    from confluent_kafka import Producer

    from stream.schema import UNION_VIEW

    created = ts(datetime.now(UTC) - timedelta(days=400))
    prod = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "enable.idempotence": True})
    refs = topics.references()
    out: dict[str, list[float]] = {"member_bot": [], "repo_disabled": [], "org_renamed": []}
    rows_affected: dict[str, list[int]] = {k: [] for k in out}
    lsn = 10_000_000
    plan = []
    for i in range(changes):
        if i < len(targets["members"]):
            plan.append(("member_bot", targets["members"][i]))
        if i < len(targets["repos"]):
            plan.append(("repo_disabled", targets["repos"][i]))
        if i < len(targets["orgs"]):
            plan.append(("org_renamed", targets["orgs"][i]))
    for kind, target in plan:
        lsn += 1
        if kind == "member_bot":
            mid = target
            cond = f"SELECT count() = 0, 0 FROM {UNION_VIEW} WHERE memberId = '{mid}'"
            before = f"SELECT count() FROM {UNION_VIEW} WHERE memberId = '{mid}'"
            topic, key = refs["members"], mid
            value = sequin(
                "members",
                {
                    "id": mid,
                    "attributes": {"isBot": {"default": True}},
                    "displayName": f"member {mid}",
                    "joinedAt": created,
                    "createdAt": created,
                },
                lsn,
            )
        elif kind == "repo_disabled":
            rid, url, seg, proj, integ = target
            where = f"lower(channel) = lower('{url}') AND segmentId = '{seg}'"
            cond = f"SELECT count() = 0, 0 FROM {UNION_VIEW} WHERE {where}"
            before = f"SELECT count() FROM {UNION_VIEW} WHERE {where}"
            topic, key = refs["repositories"], rid
            value = sequin(
                "repositories",
                {
                    "id": rid,
                    "url": url,
                    "segmentId": seg,
                    "insightsProjectId": proj,
                    "sourceIntegrationId": integ,
                    "enabled": False,
                    "excluded": False,
                    "archived": False,
                    "deletedAt": None,
                    "forkedFrom": None,
                    "createdAt": created,
                },
                lsn,
            )
        else:
            oid = target
            name = f"Renamed {oid} {lsn}"
            cond = (
                f"SELECT countIf(organizationName != '{name}') = 0, count() FROM {UNION_VIEW} "
                f"WHERE organizationId = '{oid}'"
            )
            before = f"SELECT count() FROM {UNION_VIEW} WHERE organizationId = '{oid}'"
            got = reader.rows(f"SELECT location, country FROM organizations FINAL WHERE id = '{oid}'")
            loc, country = (str(got[0][0]), str(got[0][1])) if got else ("", "")
            topic, key = refs["organizations"], oid
            value = sequin(
                "organizations",
                {
                    "id": oid,
                    "displayName": name,
                    "location": loc,
                    "country": country,
                    "website": None,
                    "description": None,
                    "createdAt": created,
                    "deletedAt": None,
                },
                lsn,
            )
        n_rows = int(reader.rows(before)[0][0])
        t0 = time.time()
        prod.produce(topic, value, key.encode())
        prod.flush(10)
        seen = len(calls)
        while True:
            # Check after each correction that ends (no polling load on the pipeline): corrected no later than
            # the end of the last correction finished before a check that finds the rows right.
            if errors:
                raise RuntimeError(f"pipeline failed: {errors[0]!r}")
            if time.time() - t0 > 120:
                raise RuntimeError(f"{kind} {target}: not corrected after 120 s")
            if len(calls) == seen:
                time.sleep(0.02)
                continue
            seen = len(calls)
            last = calls[seen - 1]
            ok = reader.rows(cond)[0]
            if int(ok[0]) and (kind != "org_renamed" or int(ok[1]) > 0):
                break
        out[kind].append(last[0] + last[1] - t0)
        rows_affected[kind].append(n_rows)
        time.sleep(0.5)
    return {"seconds": out, "rows": rows_affected}


def run_pipeline(wh, reader, maint, vis, bootstrap, buckets, rates, duration, changes, warmup, drain) -> dict:  # noqa: ANN001
    from connectors.kafka import ensure_topics
    from connectors.kafka_conn import KafkaConnection
    from connectors.topics import TopicNames
    from stream.loader import Loader, LoaderConfig
    from stream.router import Router, RouterConfig

    prefix = unique_prefix("incr")
    topics = TopicNames(prefix)
    conn = KafkaConnection.plain(bootstrap)
    ensure_topics(conn, [*topics.buckets(buckets), topics.dlq, *topics.references().values(), topics.source], 3, 1)
    errors: list[BaseException] = []

    def spawn(name, target):  # noqa: ANN001, ANN202
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - reported by the measuring thread
                errors.append(exc)

        t = threading.Thread(target=body, name=name, daemon=True)
        t.start()
        return t

    router = Router(
        RouterConfig(
            kafka=conn,
            buckets=buckets,
            group=f"{prefix}router",
            topic_prefix=prefix,
            instance_id="bench-incr",
            progress_interval=3600,
        )
    )
    calls: list[tuple[float, float, int]] = []  # (time.time() at start, seconds, rows written) per correct()

    def correct(w):  # noqa: ANN001, ANN202
        t = time.time()
        done = maint.correct(w)
        calls.append((t, time.time() - t, sum(c.written for c in done)))
        return done

    from connectors.warehouse import EmbeddedWarehouse
    from stream.incremental import MaintenanceLoop

    # As `bucketer run`: the corrections in their own thread and handle, woken by each flush.
    loop = MaintenanceLoop(maint, lambda: EmbeddedWarehouse(wh.data_dir), correct=correct, on_error=errors.append)
    loader = Loader(
        LoaderConfig(kafka=conn, buckets=buckets, group=f"{prefix}loader", topics=topics), wh, after_flush=loop.wake
    )
    threads = [spawn("router", router.run), spawn("loader", loader.run)]
    loop.start()
    result: dict = {"rates": [], "changes": None}
    try:
        warm = latency_phase(bootstrap, topics.source, vis, reader, "warm", 1000.0, warmup, 120.0, errors)
        if warm["lost"]:
            raise RuntimeError(f"warm-up: {warm['lost']} of {warmup} events never became visible")
        for rate in rates:
            result["rates"].append(
                latency_phase(
                    bootstrap, topics.source, vis, reader, f"r{int(rate)}", rate, int(rate * duration), drain, errors
                )
            )
        targets = pick_targets(reader, changes)
        # Background load: 1k events/s for as long as the changes take (they stop it when done).
        bg_count = int(1000 * (changes * 3 * 4 + 30))
        vis.start("", 0)
        bg, bg_path = producer_proc(bootstrap, topics.source, "bg", 1000.0, bg_count)
        try:
            result["changes"] = change_phase(bootstrap, topics, reader, targets, changes, errors, calls)
        finally:
            bg.kill()
            bg.communicate()
            bg_path.unlink(missing_ok=True)
        result["stats"] = {
            "corrections": maint.stats.corrections,
            "rows_read": maint.stats.rows_read,
            "rows_written": maint.stats.rows_written,
            "flushes": loader.stats.flushes,
        }
        result["correct_calls"] = calls
        result["loader_defaults"] = {"max_wait": loader.config.max_wait, "max_rows": loader.config.max_rows}
    finally:
        router.stop()
        loader.stop()
        for t in threads:
            t.join(60)
        loop.finish(None)
    return result


# -- 5. the query ---------------------------------------------------------------------------------------------
def query_phase(wh, buckets: int, queries: int) -> dict:  # noqa: ANN001
    from stream.buckets import bucket_of, cleaned_table
    from stream.schema import CLEANED_NAMES, UNION_VIEW

    seg = str(wh.rows(f"SELECT segmentId FROM {UNION_VIEW} GROUP BY segmentId ORDER BY count() DESC LIMIT 1")[0][0])
    b = bucket_of(seg, buckets)
    old = "bench_cleaned_old_layout"
    cols = ", ".join(f"`{c}`" for c in CLEANED_NAMES)
    ddl = wh.rows(f"SHOW CREATE TABLE {cleaned_table(b)}")[0][0]
    columns = str(ddl)[str(ddl).index("(") : str(ddl).index("ENGINE")].strip()
    wh.command(f"DROP TABLE IF EXISTS {old}")
    wh.command(
        f"CREATE TABLE {old} {columns} ENGINE = MergeTree "
        "ORDER BY (segmentId, timestamp, type, platform, memberId, organizationId)"
    )
    wh.command(f"INSERT INTO {old} SELECT * FROM {cleaned_table(b)} FINAL")
    wh.command(f"OPTIMIZE TABLE {old} FINAL")
    parts = int(
        wh.rows(
            "SELECT count() FROM system.parts WHERE database = currentDatabase() AND active AND table = {t:String}",
            {"t": cleaned_table(b)},
        )[0][0]
    )
    q = "SELECT count(), sum(gitChangedLines), uniqExact(memberId) FROM {src} WHERE segmentId = '{seg}'"
    variants = {
        "maintained (FINAL)": q.format(src=f"{cleaned_table(b)} FINAL", seg=seg),
        "old layout MergeTree": q.format(src=old, seg=seg),
        "union view": q.format(src=UNION_VIEW, seg=seg),
    }
    answers = {k: wh.rows(v)[0] for k, v in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(queries):
        for k, v in variants.items():
            t = time.perf_counter()
            wh.rows(v)
            times[k].append(time.perf_counter() - t)
    rows = int(wh.rows(f"SELECT count() FROM {old}")[0][0])
    del cols
    return {
        "segment": seg,
        "bucket": b,
        "segment_rows": int(answers["old layout MergeTree"][0]),
        "bucket_rows": rows,
        "maintained_parts": parts,
        "same_answer": answers["maintained (FINAL)"] == answers["old layout MergeTree"],
        "times": times,
    }


# -- the run ------------------------------------------------------------------------------------------------
def calls_line(calls: list, t0: float, t1: float) -> str:
    got = [c for c in calls if t0 <= c[0] <= t1]
    if not got:
        return "none"
    d = sorted(c[1] for c in got)
    # Between one correct() ending and the next starting: the loader's own flush (consume, raw INSERT with the
    # queue/index materialized views, commit) and its wait for input.
    gaps = sorted(b[0] - (a[0] + a[1]) for a, b in zip(got, got[1:], strict=False))
    gap = f"; between calls p50 {pct(gaps, 50):.2f} s" if gaps else ""
    return f"{len(got)}, {pct(d, 50):.2f} / {d[-1]:.2f}, {pct(sorted(c[2] for c in got), 50):,.0f}{gap}"


def fmt(v: float | None, unit: str = " s") -> str:
    return "–" if v is None else (f"{v * 1000:.0f} ms" if unit == " s" and v < 1 else f"{v:.2f}{unit}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 100k rows, 2 s per rate, 1 change of each")
    ap.add_argument("--size", type=int, help="activities loaded first (default 1000000; quick 100000)")
    ap.add_argument("--buckets", type=int, default=10)
    ap.add_argument("--rates", help="events/s, comma-separated (default 1000,10000)")
    ap.add_argument("--duration", type=float, help="seconds of input per rate (default 20; quick 2)")
    ap.add_argument("--changes", type=int, help="changes of each kind (default 5; quick 1)")
    ap.add_argument("--flushes", type=int, help="flushes per CPU variant (default 216; quick 108)")
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--skip-cpu", action="store_true", help="debugging: no CPU phase (writes no results)")
    ap.add_argument("--drain", type=float, default=60.0)
    args = ap.parse_args(argv)
    size = args.size or (100_000 if args.quick else 1_000_000)
    rates = [float(r) for r in (args.rates or "1000,10000").split(",")]
    duration = args.duration or (2.0 if args.quick else 20.0)
    changes = args.changes or (1 if args.quick else 5)
    flushes = args.flushes or (108 if args.quick else 216)
    n = args.buckets
    report = Report("incremental", "Incremental cleaned buckets: freshness, corrections, maintenance CPU, query")
    report.notes.append(f"load average at start: {os.getloadavg()[0]:.2f}")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-incr-"))
    from bench.bench_enrich import Clock, settle
    from connectors.warehouse import open_warehouse
    from stream.enrich import Enricher
    from stream.schema import ensure_schema

    res: dict = {"size": size}
    try:
        with open_warehouse(data_dir) as wh, open_warehouse(data_dir) as reader:
            ensure_schema(wh, n)
            t = time.perf_counter()
            load(wh, size, n)
            print(f"loaded {size:,} rows in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
            enricher = Enricher(lambda: open_warehouse(data_dir), clock=Clock(), lock_dir=data_dir / "locks")
            rebuilds = []
            for _ in range(1 if args.quick else 2):
                settle(wh)
                c0, w0 = cpu(), time.perf_counter()
                out = enricher.rebuild_many(range(n), parallel=1)
                rebuilds.append((cpu() - c0, time.perf_counter() - w0))
                bad = [r for r in out if r.status != "ok"]
                if bad:
                    raise RuntimeError(f"rebuild failed: {bad[0]}")
            res["rebuild_cpu"] = sorted(r[0] for r in rebuilds)
            res["rebuild_wall"] = sorted(r[1] for r in rebuilds)
            print(f"rebuild: {rebuilds}", file=sys.stderr, flush=True)
            vis = Visibility()
            maint = make_maintainer(n, vis)
            settle(wh)
            c0, w0 = cpu(), time.perf_counter()
            maint.setup(wh)
            res["setup"] = (cpu() - c0, time.perf_counter() - w0)
            res["setup_differing"] = [maint.stats.differing.get(b) for b in range(n)]
            settle(wh)
            res["cpu"] = []
            for label, rows, every in (
                ()
                if args.skip_cpu
                else (
                    (f"{size:,} rows: 1%/h", max(1, round(size * 0.01 / 3600)), 1),
                    ("10M rows: 1%/h", round(10_000_000 * 0.01 / 3600), 1),
                    ("10M rows: 1%/h, corrected every 10th flush", round(10_000_000 * 0.01 / 3600), 10),
                )
            ):
                settle(wh)
                got = maintenance_cpu(wh, maint, size, n, flushes, rows, every)
                got["label"] = label
                res["cpu"].append(got)
                print(f"cpu: {got}", file=sys.stderr, flush=True)
            res["reconcile_after_cpu_phase"] = [maint.reconcile(wh, b) for b in range(n)]
            with broker() as bootstrap:
                res["pipeline"] = run_pipeline(
                    wh, reader, maint, vis, bootstrap, n, rates, duration, changes, 300, args.drain
                )
            print(f"pipeline: {json.dumps(res['pipeline'])[:2000]}", file=sys.stderr, flush=True)
            res["query"] = query_phase(wh, n, args.queries)
            res["reconcile_end"] = [maint.reconcile(wh, b) for b in range(n)]
            maint.close(wh)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    (WORK_DIR / "incremental.json").write_text(json.dumps(res, indent=1, default=str))
    if args.skip_cpu:
        return 0
    return write(report, res, size, n)


def write(report: Report, res: dict, size: int, n: int) -> int:
    from bench.common import median

    lines = []
    rb = median(res["rebuild_cpu"])
    rb10 = rb * 10_000_000 / size  # the rebuild is linear in rows (bench_enrich: 1.4 / 5.6 / 11.3 CPU-s at 1/5/10M)
    report.measure("full_rebuild_cpu", res["rebuild_cpu"], "cpu-s", rows=size, buckets=n)
    report.measure("full_rebuild_wall", res["rebuild_wall"], "s", rows=size, buckets=n)
    lines.append(f"### Maintenance CPU vs one full rebuild ({size:,} activities loaded, {n} buckets)\n")
    runs = ", ".join(f"{x:.2f}" for x in res["rebuild_cpu"])
    walls = ", ".join(f"{x:.2f}" for x in res["rebuild_wall"])
    lines.append(
        f"One full rebuild, `Enricher.rebuild_many(range({n}), parallel=1)`: **{rb:.2f} CPU-s** (runs {runs}; wall "
        f"{walls} s); at 10M rows, linear: {rb10:.1f} CPU-s. `Maintainer.setup` (index backfill + first "
        f"reconciliation of every bucket, against the rebuilt buckets: rows differing "
        f"{res['setup_differing']}): {res['setup'][0]:.2f} CPU-s, wall {res['setup'][1]:.2f} s.\n"
    )
    lines.append(
        "| variant | rows per 1-s flush | corrections/h | CPU-s per correction: plain (p50) / with a ref change "
        "| idle `correct()` | candidates / written per correction p50 (plain; ref) | landing per flush "
        "(not counted) | **CPU-s per hour** | **/ one rebuild** |"
    )
    lines.append("|---|---:|---:|---|---:|---|---:|---:|---:|")
    for c in res["cpu"]:
        ten = c["label"].startswith("10M")
        base = rb10 if ten else rb
        hour = c["hour_cpu"]
        report.measure(
            "maintenance_cpu_per_hour", [hour], "cpu-s", variant=c["label"], rows_per_flush=c["rows_per_flush"]
        )
        report.measure("correct_cpu_plain", [c["correct_plain_cpu_mean"]], "cpu-s", variant=c["label"])
        report.measure("correct_cpu_ref", [c["correct_ref_cpu_mean"]], "cpu-s", variant=c["label"])
        report.ratio(
            f"maintenance CPU/h / one rebuild, {c['label']} (target <= 0.25)",
            hour,
            base,
            target=0.25,
            higher_is_better=False,
        )
        lines.append(
            f"| {c['label']} | {c['rows_per_flush']} | {3600 // c['every']} | {c['correct_plain_cpu_mean']:.3f} "
            f"({c['correct_plain_cpu_p50']:.3f}) / {c['correct_ref_cpu_mean']:.3f} | {c['correct_idle_cpu_p50']:.3f} | "
            f"{c['candidates_plain_p50']} / {c['written_plain_p50']}; {c['candidates_ref_p50']} / "
            f"{c['written_ref_p50']} | {c['landing_cpu_mean']:.3f} | **{hour:.1f}** | **{hour / base:.2f}×** |"
        )
    lines.append(
        "\nPer hour = corrections/h × the plain correction's mean + 100 × (the ref-change correction's mean − the "
        "plain one), from the measured flushes (a reference change in every 36th flush). Against: one rebuild of "
        "the loaded rows, or of 10M rows for the 10M variants (rows landed at 10M's 1%/h rate, 28 per flush, into "
        "the loaded warehouse: the correction's cost follows the rows changed, not the bucket size, except the "
        "FINAL read of the candidates by primary key)."
    )
    lines.append(
        f"\nReconciliation after the CPU phase, rows differing per bucket: {res['reconcile_after_cpu_phase']}.\n"
    )
    p = res["pipeline"]
    lines.append("### Event produced → visible in the cleaned union (real pipeline, local broker)\n")
    lines.append(
        "| rate (achieved) | events | p50 | p90 | p99 | max | lost | in union at the end | p50 per tenth "
        "| pipeline cores | `correct()` calls: n, p50 / max s, rows written p50; gap between calls |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in p["rates"]:
        report.measure("cleaned_visible_p50", [r["p50"]] if r["p50"] is not None else [], "s", rate=r["rate"])
        report.measure("cleaned_visible_p99", [r["p99"]] if r["p99"] is not None else [], "s", rate=r["rate"])
        lines.append(
            f"| {r['rate']:,.0f}/s ({r['achieved_rate']:,.0f}) | {r['events']:,} | {fmt(r['p50'])} | {fmt(r['p90'])} | "
            f"{fmt(r['p99'])} | {fmt(r['max'])} | {r['lost']:,} | {r['in_union']:,} | "
            + " ".join("–" if v is None else f"{v:.1f}" for v in r["p50_by_tenth"])
            + f" s | {r['pipeline_cores']:.2f} | {calls_line(p['correct_calls'], r['t0'], r['t1'])} |"
        )
        if r["rate"] >= 10000 and r["p99"] is not None:
            report.ratio(
                f"p99 visible in cleaned at {r['rate']:,.0f}/s, s (target <= 5)",
                r["p99"],
                1.0,
                target=5.0,
                higher_is_better=False,
                unit=" s",
            )
    ch = p["changes"]
    lines.append("\n### Reference change produced → cleaned rows fully corrected (background 1k events/s)\n")
    lines.append("| change | n | p50 | p99 (= max at this n) | each | rows affected |\n|---|---|---|---|---|---|")
    worst = 0.0
    for kind, secs in ch["seconds"].items():
        s = sorted(secs)
        if not s:
            continue
        worst = max(worst, s[-1])
        report.measure(f"{kind}_corrected", s, "s")
        lines.append(
            f"| {kind} | {len(s)} | {fmt(pct(s, 50))} | {fmt(pct(s, 99))} | "
            f"{', '.join(f'{x:.2f}' for x in secs)} | {', '.join(str(x) for x in ch['rows'][kind])} |"
        )
    report.ratio(
        "reference change fully corrected, worst, s (target <= 10)",
        worst,
        1.0,
        target=10.0,
        higher_is_better=False,
        unit=" s",
    )
    st = p["stats"]
    lines.append(
        f"\nMaintainer over the whole run (CPU phase included): {st['corrections']:,} bucket corrections, "
        f"{st['rows_read']:,} candidate rows read, {st['rows_written']:,} rows written; pipeline loader flushes "
        f"{st['flushes']:,} (max_wait {p['loader_defaults']['max_wait']} s, max_rows "
        f"{p['loader_defaults']['max_rows']}).\n"
    )
    q = res["query"]
    med = {k: median(v) for k, v in q["times"].items()}
    for k, v in q["times"].items():
        report.measure("project_query", v, "s", variant=k)
    ratio = med["maintained (FINAL)"] / med["old layout MergeTree"]
    report.ratio(
        "one-project query, maintained FINAL / old-layout MergeTree (target <= 1.2)",
        ratio,
        1.0,
        target=1.2,
        higher_is_better=False,
    )
    lines.append(
        f"### One-project query (segment {q['segment']}: {q['segment_rows']:,} of bucket {q['bucket']}'s "
        f"{q['bucket_rows']:,} rows; maintained bucket in {q['maintained_parts']} active parts; same answer: "
        f"{q['same_answer']})\n"
    )
    lines.append("| source | p50 | min–max |\n|---|---|---|")
    for k, v in q["times"].items():
        lines.append(f"| {k} | {fmt(median(v))} | {fmt(min(v))}–{fmt(max(v))} |")
    lines.append(f"| **ratio maintained / old layout** (target ≤ 1.2) | **{ratio:.2f}** | |")
    lines.append(
        f"\nReconciliation at the end (after the pipeline phases), rows differing per bucket: {res['reconcile_end']}."
    )
    report.notes += [
        f"Data: bench_enrich's generator ({size:,} activities, 500 skewed segments, 200k members with bots/team/"
        "organization members, 5k organizations, 2,000 repositories with enabled/disabled/gerrit variants), split "
        "into the raw buckets by the router's rule and merged; plus members/projects/repositories for the probe's "
        "event templates so that every probe event passes the cleaning rules. One process: chdb, Router, Loader "
        "and the Maintainer; a separate producer process; the broker (Kafka 4.1.1, local) on the same 2 cores.",
        "Visible = the Maintainer's correction that holds the event returned (its identities read from the work "
        "table right after the one-part INSERT); every event was then checked in the cleaned union (column 'in "
        "union at the end'). As in `bucketer run`, the corrections run in their own thread (`MaintenanceLoop`, "
        "own warehouse handle), woken by each loader flush: a round corrects everything landed up to its start, "
        "and the loader flushes on meanwhile (see the `correct()` column).",
        "Reference changes: Sequin updates produced to the members/repositories/organizations topics one at a "
        "time (0.5 s apart, different ids each, the most-active members, organizations and repositories), "
        "while a producer sends 1k events/s; p99 over n = 'changes of each kind' is the worst of n.",
        "The CPU figure at 10M rows is scaled, not measured on 10M loaded rows: the rebuild's CPU linearly (bench_"
        "enrich measured 1.4 / 5.6 / 11.3 CPU-s at 1M / 5M / 10M), the corrections with 10M's change rate (28 "
        "rows a second) landed into this warehouse.",
    ]
    report.save("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
