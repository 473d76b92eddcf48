"""``make demo``: the main job end to end on the embedded default, with the commands a user would type.

local Kafka broker -> loadgen (Sequin traffic for six topics) -> ``bucketer run --until-idle`` (route + load)
-> ``bucketer enrich --all`` -> ``bucketer status`` (all buckets) -> one project query via ``--project``.

Everything lives under ``.bucketer/demo`` and is started afresh each time, so the output is reproducible
(the load generator is deterministic per seed). The broker is stopped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bucketer.localkafka import LocalKafka, free_port, port_open

BUCKETER = [sys.executable, "-m", "bucketer.cli"]


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def sh(*args: str, capture: bool = False, quiet_stderr: bool = False) -> str:
    shown = " ".join(shlex.quote(a) for a in ("bucketer", *args))
    print(f"$ {shown}", flush=True)
    proc = subprocess.run(
        [*BUCKETER, *args],
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if quiet_stderr else None,
    )
    if proc.returncode != 0:
        if quiet_stderr and proc.stderr:
            sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"demo: `{shown}` failed with exit code {proc.returncode}")
    return proc.stdout or ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bucketer.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=".bucketer/demo")
    ap.add_argument("--count", type=int, default=int(os.environ.get("BUCKETER_DEMO_COUNT", 30000)))
    ap.add_argument("--buckets", type=int, default=10)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="leave the broker running at the end")
    args = ap.parse_args(argv)

    root = Path(args.dir).absolute()
    kafka_dir, warehouse = root / "kafka", root / "warehouse"
    LocalKafka(kafka_dir).stop()  # a broker left by an earlier demo
    shutil.rmtree(root, ignore_errors=True)
    port = 19092 if not (port_open(19092) or port_open(19093)) else free_port()
    broker = LocalKafka(kafka_dir, port=port, controller_port=free_port())
    started = time.monotonic()
    n = str(args.buckets)
    try:
        step("1. a local Apache Kafka 4 broker (KRaft, 127.0.0.1)")
        bootstrap = broker.start()
        print(f"bootstrap={bootstrap}")

        step(f"2. {args.count:,} synthetic Sequin changes for the six topics (seed {args.seed})")
        sh(
            "loadgen",
            "--bootstrap",
            bootstrap,
            "--count",
            str(args.count),
            "--seed",
            str(args.seed),
            "--bad-fraction",
            "0.01",
        )

        step("3. the pipeline until idle: route (exactly once) into buckets, load into the embedded warehouse")
        sh(
            "run",
            "--bootstrap",
            bootstrap,
            "--data-dir",
            str(warehouse),
            "--buckets",
            n,
            "--until-idle",
            "4",
            quiet_stderr=True,
        )

        step("4. rebuild every cleaned bucket now (the manual trigger of the hourly schedule)")
        sh("enrich", "--data-dir", str(warehouse), "--buckets", n, "--all", "--parallel", "2", quiet_stderr=True)

        step("5. status: rows per bucket, snapshot, DLQ and router lag")
        sh("status", "--data-dir", str(warehouse), "--bootstrap", bootstrap)

        step("6. one project, read from its own bucket only")
        top = sh(
            "query",
            "--data-dir",
            str(warehouse),
            "SELECT p.slug AS slug, count() AS activities FROM activityRelations_deduplicated_cleaned_bucket_union"
            " AS a INNER JOIN (SELECT slug, segmentId FROM insightsProjects FINAL WHERE enabled = 1 AND"
            " deletedAt IS NULL) AS p ON p.segmentId = a.segmentId GROUP BY slug ORDER BY activities DESC,"
            " slug LIMIT 1",
            capture=True,
        )
        print(top.strip())
        import json

        slug = json.loads(top.splitlines()[0])["slug"] if top.strip() else None
        if slug is None:
            raise SystemExit("demo: no enabled project has cleaned activities")
        for sql in (
            "SELECT {bucketId:UInt32} AS bucket, type, count() AS activities, sum(gitChangedLines) AS lines,"
            " uniqExact(memberId) AS members FROM {bucket} WHERE segmentId = {segmentId:String}"
            " GROUP BY type ORDER BY activities DESC LIMIT 8",
            "SELECT organizationName, organizationCountryCode AS country, count() AS activities FROM {bucket}"
            " WHERE segmentId = {segmentId:String} AND organizationName != '' GROUP BY 1, 2"
            " ORDER BY activities DESC LIMIT 5",
        ):
            print(sh("query", "--data-dir", str(warehouse), "--project", slug, sql, capture=True).strip())
    finally:
        if not args.keep:
            broker.stop()
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s; data under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
