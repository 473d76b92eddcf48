"""Benchmark (not a test): online rebucketing (issue 15), a gradual N -> M while ingestion goes on, against the
cutover on the same rows.

    .venv/bin/python -m bench.bench_rebucket [--quick] [--size 5000000] [--rate 5000] [--before 30] [--after 20]
        [--from 10] [--to 20]

1. ``--size`` synthetic activities (bench_enrich's generator, inside ClickHouse, split by the router's rule) and
   their reference rows are loaded into N raw buckets.
2. ``bucketer run``'s pipeline (stream/pipeline.py: Router exactly once + Loader + the incremental maintenance,
   threads in this process, the default staggered reconciliation schedule) starts on it against a local broker;
   a warm-up batch must become visible first (the maintenance's first setup reconciles every bucket).
3. A separate producer process (bench/latency_probe.py) sends Sequin inserts at ``--rate``/s: ``--before``
   seconds, then ``Controller.start(M)`` (what ``bucketer rebucket --to M --strategy gradual`` asks the running
   process through its API) runs to ``done`` while the producer goes on, then ``--after`` seconds more.
   Ingestion latency of an event = the moment it is first found in a raw bucket table (any layout: the poller
   lists the active parts of every raw table, keyed by table UUID so a renamed-in table is read anew) minus its
   produce() time; reported per window of produce time (before / during / after the migration), p50/p99/max.
   The migration's phases are timed, and the flip (the one step that holds the loader) on its own.
4. The cutover on the same rows, loaded again by a child process (the generator is deterministic):
   ``stream.rebucket.rebucket`` (redistribute, verify, swap, rebuild every cleaned bucket), timed; ingestion
   is stopped for all of it (the router and the loader must be down), against the gradual's flip hold. The
   child's rows lack the events the pipeline took before and during the migration (a few % of the rows).
"""

from __future__ import annotations

import argparse
import array
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import WORK_DIR, Report, broker, unique_prefix
from bench.latency_probe import SEQ_DIGITS, Poller, pct

RAW_PREFIX = "activityRelations_bucket_MV_ds_"


class RawWatch(Poller):
    """When each probe event ``{tag}-{seq}`` is first found in any raw bucket table (old layout, ``__next``
    tables, the renamed-in new layout). Each poll reads, from parts not read before only, the sourceIds at or
    above the oldest unseen one; parts are keyed by (table UUID, part name), since a table renamed into place
    has part names of its own that may repeat the old table's."""

    def __init__(self, wh, tag: str, count: int) -> None:  # noqa: ANN001
        super().__init__(wh, 0, tag, count)
        self.visible = 0
        self.read: set[tuple[str, str]] = set()

    def _tables(self) -> dict[str, str]:
        return {
            str(name): str(uuid)
            for name, uuid in self.wh.rows(
                "SELECT name, toString(uuid) FROM system.tables WHERE database = currentDatabase() "
                "AND startsWith(name, {p:String}) AND engine LIKE '%MergeTree'",
                {"p": RAW_PREFIX},
            )
        }

    def poll(self, sweep: bool = False) -> int:
        from connectors.warehouse import WarehouseError

        self.polls += 1
        uuids = self._tables()
        low = f"{self.tag}-{self.next_unseen:0{SEQ_DIGITS}d}"
        params = {"low": low, "high": self.high}
        fresh: dict[str, list[str]] = {}
        for table, name in self.wh.rows(
            "SELECT table, name FROM system.parts WHERE database = currentDatabase() AND active "
            "AND startsWith(table, {p:String})",
            {"p": RAW_PREFIX},
        ):
            if table in uuids and (uuids[table], name) not in self.read:
                fresh.setdefault(table, []).append(name)
        rows: list[tuple[str]] = []
        for table, parts in fresh.items():
            try:
                rows += self.wh.rows(
                    f"SELECT sourceId FROM `{table}` WHERE _part IN {{parts:Array(String)}} "
                    "AND sourceId >= {low:String} AND sourceId < {high:String}",
                    {**params, "parts": parts},
                )
            except WarehouseError:  # renamed or dropped since the listing (the flip): read on the next poll
                continue
            self.read.update((uuids[table], p) for p in parts)
        if sweep:
            for table in uuids:
                try:
                    rows += self.wh.rows(
                        f"SELECT sourceId FROM `{table}` "
                        "WHERE sourceId >= {low:String} AND sourceId < {high:String}",
                        params,
                    )
                except WarehouseError:
                    continue
        new = self.record(rows)
        self.visible += new
        return new


def producer_proc(bootstrap: str, topic: str, tag: str, rate: float, count: int) -> tuple[subprocess.Popen, Path]:
    path = WORK_DIR / f"rebucket-{tag}-{os.getpid()}.times"
    cmd = [sys.executable, "-m", "bench.latency_probe", bootstrap, topic, tag, str(rate), str(count), str(path)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True), path


def watch_until(watch: RawWatch, want: int, timeout: float, errors: list) -> None:  # noqa: ANN001
    t = time.monotonic()
    while watch.visible < want and time.monotonic() - t < timeout:
        if errors:
            raise RuntimeError(f"pipeline failed: {errors[0]!r}")
        watch.poll()
        time.sleep(0.1)


def windows(produced: array.array, seen: array.array, bounds: dict[str, tuple[float, float]]) -> dict:
    out = {}
    for name, (lo, hi) in bounds.items():
        idx = [i for i in range(len(produced)) if produced[i] and lo <= produced[i] < hi]
        lat = sorted(seen[i] - produced[i] for i in idx if seen[i])
        out[name] = {
            "events": len(idx),
            "lost": len(idx) - len(lat),
            "p50": pct(lat, 50),
            "p99": pct(lat, 99),
            "max": lat[-1] if lat else None,
        }
    return out


def gradual(data_dir: Path, bootstrap: str, old: int, new: int, rate: float, before: float, after: float) -> dict:
    from connectors.kafka_conn import KafkaConnection
    from connectors.warehouse import open_warehouse
    from stream import migration
    from stream.pipeline import Pipeline, PipelineConfig

    prefix = unique_prefix("rebucket")
    pipeline = Pipeline(
        PipelineConfig(kafka=KafkaConnection.plain(bootstrap), data_dir=data_dir, buckets=old, topic_prefix=prefix)
    )
    flips: list[float] = []  # the whole flip step (its index backfill runs after the loader resumed)
    holds: list[float] = []  # the loader held: hold() asked -> resume()
    real_flip = migration.Migration._flip

    def timed_flip(self, wh, st) -> None:  # noqa: ANN001
        loader = self.pipeline.loader
        real_hold, real_resume = loader.hold, loader.resume
        asked: list[float] = []

        def hold():  # noqa: ANN202
            asked.append(time.perf_counter())
            return real_hold()

        def resume() -> None:
            if asked:
                holds.append(time.perf_counter() - asked.pop())
            real_resume()

        loader.hold, loader.resume = hold, resume
        t = time.perf_counter()
        try:
            real_flip(self, wh, st)
        finally:
            flips.append(time.perf_counter() - t)
            loader.hold, loader.resume = real_hold, real_resume

    migration.Migration._flip = timed_flip  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pipeline.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="pipeline", daemon=True)
    res: dict = {"flip": flips, "flip_hold": holds}
    try:
        with open_warehouse(data_dir) as reader:
            t0 = time.perf_counter()
            thread.start()
            while pipeline.loader is None and not errors:
                time.sleep(0.1)
            res["startup"] = time.perf_counter() - t0
            warm = RawWatch(reader, "warm", 1000)
            proc, path = producer_proc(bootstrap, pipeline.topics.source, "warm", 500, 1000)
            watch_until(warm, 1000, 600, errors)
            proc.wait(60)
            path.unlink(missing_ok=True)
            if warm.visible < 1000:
                raise RuntimeError(f"warm-up: {warm.visible} of 1000 events visible")
            res["warm_up"] = time.perf_counter() - t0
            print(f"warm: {res['warm_up']:.0f}s", file=sys.stderr, flush=True)

            count = int(rate * 1800)  # at most 30 min; stopped by SIGTERM after the last window
            watch = RawWatch(reader, "ev", count)
            proc, path = producer_proc(bootstrap, pipeline.topics.source, "ev", rate, count)
            stop_polling = threading.Event()

            def poll() -> None:
                while not stop_polling.is_set():
                    watch.poll()
                    time.sleep(0.1)

            poller = threading.Thread(target=poll, daemon=True)
            start = time.time()
            poller.start()
            time.sleep(before)
            controller = migration.Controller(pipeline)
            m0 = time.time()
            controller.start(new, False)
            phases: list[tuple[str, float]] = []
            while True:
                if errors:
                    raise RuntimeError(f"pipeline failed: {errors[0]!r}")
                got = controller.report()
                phase = (got["migration"] or {}).get("phase")
                if not phases or phases[-1][0] != phase:
                    phases.append((phase, time.time() - m0))
                    print(f"migration: {phase} at {phases[-1][1]:.1f}s", file=sys.stderr, flush=True)
                if phase == "done":
                    break
                if got.get("error"):
                    raise RuntimeError(f"migration failed: {got['error']}")
                time.sleep(0.1)
            m1 = time.time()
            time.sleep(after)
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=120)[0]
            end = time.time()
            sent = json.loads(out.strip().splitlines()[-1])
            produced = array.array("d")
            produced.frombytes(path.read_bytes())
            path.unlink(missing_ok=True)
            total = sent["sent"]
            watch.count = total  # nothing past it was sent
            deadline = time.monotonic() + 120
            while watch.next_unseen < total and time.monotonic() < deadline:
                time.sleep(0.5)
            stop_polling.set()
            poller.join(30)
            watch.poll(sweep=True)
            res["achieved_rate"] = sent["achieved_rate"]
            res["sent"] = total
            res["duration"] = m1 - m0
            res["phases"] = phases
            res["windows"] = windows(
                produced[:total],
                watch.seen,
                {"before": (start + 5.0, m0), "during": (m0, m1), "after": (m1, end)},
            )
            res["lost_overall"] = total - sum(1 for i in range(total) if watch.seen[i])
    finally:
        pipeline.stop()
        thread.join(300)
        migration.Migration._flip = real_flip  # type: ignore[method-assign]
    if errors:
        raise RuntimeError(f"pipeline failed: {errors[0]!r}")
    return res


def cutover_child(data_dir: Path, size: int, old: int, to: int) -> int:
    """In its own process (one engine per process): the same rows loaded again (the generator is deterministic;
    a chdb data directory cannot be copied, its tables are symlinks to absolute paths), then the cutover, timed."""
    import psutil

    from bench.bench_enrich import settle
    from bench.bench_incremental import load
    from connectors.warehouse import open_warehouse
    from stream.enrich import Enricher
    from stream.rebucket import rebucket
    from stream.schema import ensure_schema

    proc = psutil.Process()
    with open_warehouse(data_dir) as wh:
        ensure_schema(wh, old)
        load(wh, size, old)
        settle(wh)
        enricher = Enricher(lambda: open_warehouse(data_dir), lock_dir=data_dir / "locks")
        c0, t0 = sum(proc.cpu_times()[:2]), time.perf_counter()
        rep = rebucket(wh, to, enricher)
        wall, used = time.perf_counter() - t0, sum(proc.cpu_times()[:2]) - c0
    bad = [r for r in rep.rebuilds if r.status != "ok"]
    print(json.dumps({"wall": wall, "cpu": used, "rows": rep.rows, "failed_rebuilds": len(bad)}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 200k rows, 2000/s, 10 s before and after")
    ap.add_argument("--size", type=int, help="activities loaded first (default 5000000; quick 200000)")
    ap.add_argument("--rate", type=float, help="events/s during the run (default 5000; quick 2000)")
    ap.add_argument("--before", type=float, help="seconds of input before the migration (default 30; quick 10)")
    ap.add_argument("--after", type=float, help="seconds of input after it is done (default 20; quick 10)")
    ap.add_argument("--from", dest="old", type=int, default=10)
    ap.add_argument("--to", dest="new", type=int, default=20)
    ap.add_argument("--cutover-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cutover_child:
        return cutover_child(args.cutover_child, args.size, args.old, args.new)
    size = args.size or (200_000 if args.quick else 5_000_000)
    rate = args.rate or (2000.0 if args.quick else 5000.0)
    before = args.before or (10.0 if args.quick else 30.0)
    after = args.after or (10.0 if args.quick else 20.0)
    old, new = args.old, args.new
    report = Report("rebucket", f"Online rebucketing: ingestion latency during a gradual {old} -> {new}, vs cutover")
    report.notes.append(f"load average at start: {os.getloadavg()[0]:.2f}")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    from bench.bench_enrich import settle
    from bench.bench_incremental import load
    from connectors.warehouse import open_warehouse
    from stream.schema import ensure_schema

    base = Path(tempfile.mkdtemp(prefix="bench-rebucket-"))
    data, copy = base / "wh", base / "cut"
    res: dict = {"size": size, "rate": rate, "old": old, "new": new}
    try:
        with open_warehouse(data) as wh:
            ensure_schema(wh, old)
            t = time.perf_counter()
            load(wh, size, old)
            settle(wh)
            print(f"loaded {size:,} rows in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        with broker() as bootstrap:
            res["gradual"] = gradual(data, bootstrap, old, new, rate, before, after)
        print(f"gradual: {json.dumps(res['gradual'])[:1500]}", file=sys.stderr, flush=True)
        child = subprocess.run(
            [sys.executable, "-m", "bench.bench_rebucket", "--cutover-child", str(copy), "--size", str(size)]
            + ["--from", str(old), "--to", str(new)],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if child.returncode:
            raise RuntimeError(f"cutover child failed: {child.stderr[-2000:]}")
        res["cutover"] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"cutover: {res['cutover']}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    (WORK_DIR / "rebucket.json").write_text(json.dumps(res, indent=1, default=str))
    return write(report, res)


def fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f} s"


def write(report: Report, res: dict) -> int:
    g, c = res["gradual"], res["cutover"]
    old, new, size, rate = res["old"], res["new"], res["size"], res["rate"]
    w = g["windows"]
    for name in ("before", "during", "after"):
        lat = w[name]
        report.measure("ingestion_p99", [lat["p99"] or float("nan")], "s", window=name, rate=rate, rows=size)
        report.measure("ingestion_p50", [lat["p50"] or float("nan")], "s", window=name, rate=rate, rows=size)
    report.measure("gradual_duration", [g["duration"]], "s", rows=size)
    report.measure("flip_hold", g["flip_hold"] or [float("nan")], "s", rows=size)
    report.measure("flip_step", g["flip"] or [float("nan")], "s", rows=size)
    report.measure("cutover_duration", [c["wall"]], "s", rows=size)
    lines = [
        f"{size:,} activities in {old} buckets; events at {rate:,.0f}/s (achieved {g['achieved_rate']:,.0f}/s, "
        f"{g['sent']:,} sent) before, during and after `Controller.start({new})` (the gradual migration "
        f"`bucketer rebucket --to {new} --strategy gradual` asks the running process for). One run (n = 1).\n",
        "| window (by produce time) | events | not visible | p50 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("before", "during", "after"):
        lat = w[name]
        lines.append(
            f"| {name} | {lat['events']:,} | {lat['lost']} | {fmt(lat['p50'])} | {fmt(lat['p99'])} "
            f"| {fmt(lat['max'])} |"
        )
    phases = ", ".join(f"{p} {t:.1f} s" for p, t in g["phases"])
    flip = ", ".join(f"{x:.1f}" for x in g["flip_hold"])
    step = ", ".join(f"{x:.1f}" for x in g["flip"])
    lines += [
        "",
        f"Gradual migration: **{g['duration']:.1f} s** to `done` (phases reached at: {phases}); ingestion went on "
        f"throughout except in the flip, which holds the loader for {flip} s (asked -> resumed: the loader's flush, "
        f"a last correction round, the split of the cleaned buckets, the verification, the renames, the activity "
        f"index rebuilt, the maintenance's queues for {new} buckets); the whole flip step, with the maintenance "
        f"index backfill after the loader resumed, took {step} s.",
        "",
        f"Cutover on the same rows loaded anew (`stream.rebucket.rebucket`: redistribute, verify, swap, rebuild every "
        f"cleaned bucket; router and loader stopped throughout): **{c['wall']:.1f} s** wall, {c['cpu']:.1f} CPU-s, "
        f"{c['rows']:,} live rows moved, {c['failed_rebuilds']} failed rebuilds.",
        "",
        f"Events produced and never found in a raw bucket: {g['lost_overall']}.",
    ]
    report.ratio("gradual duration / cutover duration", g["duration"], c["wall"])
    if g["flip_hold"]:
        report.ratio(
            "ingestion stopped: gradual flip / cutover", max(g["flip_hold"]), c["wall"], higher_is_better=False
        )
    if w["before"]["p99"] and w["during"]["p99"]:
        report.ratio("ingestion p99: during / before", w["during"]["p99"], w["before"]["p99"], higher_is_better=False)
    if g["lost_overall"]:
        report.status = "partial"
        report.notes.append(f"{g['lost_overall']} events never became visible")
    report.save("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
