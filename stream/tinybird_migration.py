"""The migration plan of the Tinybird target from N to M buckets: ``migration_plan(n, m) -> dict`` (JSON-ready),
``render_markdown(plan)``, ``write_plan(n, m, out)`` (``migration.json``, ``MIGRATION.md`` and one complete
project folder per deploy stage under ``out/migration/``).

What it is built from (nothing guessed): the two generated projects (stream/tinybird_project.py) are diffed file
by file into added / changed / removed; each datafile's dependencies are read from its text (``FROM``,
``TARGET_DATASOURCE``, ``DATASOURCE``), so the stages can be checked for "nothing removed while something still
reads or writes it".

The path, by the arithmetic of ``cityHash64(segmentId) % N``: a row of old bucket b can land in new bucket n only
when b ≡ n (mod gcd(N, M)), so

- **split** (M = k·N): new bucket n (≥ N) gathers from old bucket n mod N alone; old bucket b keeps its rows of
  ``% M = b`` and sheds the others;
- **merge** (N = k·M): new bucket n gathers from old buckets n + M, n + 2M, …; old bucket n keeps everything;
  old buckets ≥ M are removed after their rows were gathered;
- **recompute** (neither, e.g. 10 → 16): new bucket n gathers from every old bucket b ≠ n with b ≡ n (mod g).

Every path has the same steps: (0) record the old layout's counts; deploy stage 1 (new data sources, the
gather copy pipes, the new buckets' cleaning pipes; nothing existing changes); deploy stage 2 (the writers:
bucketing materialized views and snapshot pipes by M; the router's Tinybird sink restarted with ``--buckets M``);
run the gather copies (append) — each selects in an old bucket b ≠ n only rows of ``% M = n``, which after the
writers' switch are exactly the rows written there before it (every later row of bucket b has ``% M = b``), so
no row is missed and a re-run only adds versions that ReplacingMergeTree collapses; a delete arriving after the
switch lands in the new bucket with a higher ``_version`` than the copied row, so it is never resurrected;
rebuild every cleaned bucket; verify; deploy stage 3 (the readers: union, routing and project_buckets by M in
one deployment, union and routing filtered to each bucket's own rows, since old buckets still hold rows that
moved); prune the old buckets (Delete API, rows of ``% M != b``); rebuild their cleaned buckets; verify; deploy
the final project (the plain generated M project; the gather pipes, the filters and the removed buckets' files
go; removing data sources needs ``--allow-destructive-operations``).
"""

from __future__ import annotations

import json
import re
import shutil
from math import gcd
from pathlib import Path
from typing import Any

from connectors.model import SORT_KEY, bucket_sql
from stream.buckets import cleaned_table, raw_table
from stream.schema import UNION_VIEW
from stream.tinybird_project import _node, cleaning_pipe_name, generate_project, routing_pipe, union_pipe

PLAN_FORMAT = "bucketer.tinybird-migration/1"
PLAN_JSON = "migration.json"
PLAN_MD = "MIGRATION.md"
STAGES_DIR = "migration"
COPY_CONCURRENCY = 12  # TINYBIRD.md: the production account runs 12 copy jobs at once, more stay queued

# The Tinybird facts the plan is built on (the plan's header cites them).
SOURCES: tuple[dict[str, str], ...] = (
    {
        "fact": "`tb deploy` is an alias of `tb deployment create --wait --auto`: it creates a deployment of the "
        "whole project folder, waits for it and promotes it to live (the old deployment is removed).",
        "url": "https://www.tinybird.co/docs/forward/dev-reference/commands/tb-deploy",
    },
    {
        "fact": "`tb deployment create --check` validates a deployment without creating it; `--wait` waits for it "
        "to finish; `--allow-destructive-operations` is needed to remove data sources.",
        "url": "https://www.tinybird.co/docs/forward/dev-reference/commands/tb-deployment",
    },
    {
        "fact": "A staging deployment can be read and written with `--staging` before `tb deployment promote`.",
        "url": "https://www.tinybird.co/docs/forward/test-and-deploy/deployments",
    },
    {
        "fact": "`tb copy run PIPE --wait [--mode append|replace]` runs an on-demand copy job and waits for it; "
        "`tb copy pause|resume PIPE` stops and restarts a scheduled one.",
        "url": "https://www.tinybird.co/docs/forward/dev-reference/commands/tb-copy",
    },
    {
        "fact": "A copy pipe writes its last node into TARGET_DATASOURCE; COPY_SCHEDULE @on-demand runs only when "
        "asked; COPY_MODE append (default) or replace (the target's content is replaced).",
        "url": "https://tinybird.co/docs/forward/work-with-data/copy-pipes",
    },
    {
        "fact": "`POST /v0/pipes/{pipe}/copy?_mode=append|replace` starts a copy job, polled at "
        "`GET /v0/jobs/{id}` until done/error/cancelled; 12 concurrent copy jobs in production.",
        "url": "spec/TINYBIRD.md (Copy pipes on demand)",
    },
    {
        "fact": "`POST /v0/datasources/{name}/delete` with `delete_condition` (an SQL filter) deletes rows "
        "selectively as a job (CLI: `tb datasource delete NAME --sql-condition ...`).",
        "url": "https://tinybird.co/docs/guides/ingest/replace-and-delete-data",
    },
)

_REF = re.compile(r"\b(?:FROM|JOIN|TARGET_DATASOURCE|DATASOURCE)\s+([A-Za-z_][A-Za-z0-9_]*)")


def path_of(old: int, new: int) -> str:
    if old < 1 or new < 1:
        raise ValueError(f"bucket counts must be at least 1, got {old} -> {new}")
    if old == new:
        return "none"
    if new % old == 0:
        return "split"
    if old % new == 0:
        return "merge"
    return "recompute"


def gather_sources(n: int, old: int, new: int) -> list[int]:
    """The old buckets that can hold rows of new bucket ``n`` (b ≡ n mod gcd), other than ``n`` itself."""
    g = gcd(old, new)
    return [b for b in range(old) if b != n and b % g == n % g]


def gather_pipe_name(n: int) -> str:
    return f"rebucket_gather_{n}"


def gather_pipe(n: int, old: int, new: int) -> str:
    """On-demand COPY (append) of the rows of new bucket ``n`` still sitting in other (old) raw buckets."""
    where = f"{bucket_sql('segmentId', new)} = {n}"
    sql = "\nUNION ALL\n".join(f"SELECT * FROM {raw_table(b)} WHERE {where}" for b in gather_sources(n, old, new))
    return (
        _node(
            f"gather_bucket_{n}",
            sql,
            f"Re-bucketing {old} -> {new}: copy the rows of bucket {n} written by the old layout into it.",
        )
        + f"\nTYPE COPY\nTARGET_DATASOURCE {raw_table(n)}\nCOPY_MODE append\nCOPY_SCHEDULE @on-demand\n"
    )


def references(text: str) -> set[str]:
    """The data sources and pipes a datafile reads or writes (FROM, JOIN, TARGET_DATASOURCE, DATASOURCE)."""
    return set(_REF.findall(text))


def name_of(rel: str) -> str:
    return Path(rel).stem


def diff_projects(old: dict[str, str], new: dict[str, str]) -> dict[str, list[str]]:
    return {
        "added": sorted(set(new) - set(old)),
        "changed": sorted(f for f in set(old) & set(new) if old[f] != new[f]),
        "removed": sorted(set(old) - set(new)),
    }


def _is_writer(rel: str) -> bool:
    """Bucketing materialized views and snapshot copies: what puts rows into raw buckets."""
    stem = name_of(rel)
    return stem.startswith("activityRelations_bucket_MV_") and rel.endswith(".pipe") or "_snapshot_" in stem


READERS = (UNION_VIEW, "activityRelations_bucket_routing", "project_buckets")


def _is_reader(rel: str) -> bool:
    return name_of(rel) in READERS


def stages(old: int, new: int) -> list[dict[str, Any]]:
    """The deploy stages, each a complete project folder ({path: text}) and why it is deployed then."""
    a, b = generate_project(old), generate_project(new)
    d = diff_projects(a, b)
    gathers = {
        f"pipes/{gather_pipe_name(n)}.pipe": gather_pipe(n, old, new) for n in range(new) if gather_sources(n, old, new)
    }
    added_storage = {
        f: b[f]
        for f in d["added"]
        if f.endswith(".datasource") or (not _is_writer(f) and not _is_reader(f))  # data sources, cleaning pipes
    }
    s1 = {**a, **added_storage, **gathers}
    # writers by M: changed and added bucketing views/snapshots in, the removed buckets' writers out
    s2 = {f: t for f, t in s1.items() if not (_is_writer(f) and f not in b)}
    s2.update({f: b[f] for f in b if _is_writer(f)})
    transitional = {
        f"pipes/{UNION_VIEW}.pipe": union_pipe(new, placement=True),
        "pipes/activityRelations_bucket_routing.pipe": routing_pipe(new, placement=True),
        "pipes/project_buckets.pipe": b["pipes/project_buckets.pipe"],
    }
    s3 = {**s2, **transitional}
    out = [
        {
            "name": "1-add",
            "files": s1,
            "why": "new data sources, gather copy pipes and new cleaning pipes; nothing that exists changes",
        },
        {
            "name": "2-switch-writers",
            "files": s2,
            "why": f"bucketing views and snapshot pipes by % {new} "
            f"(one deployment: every bucket switches at its promotion)",
        },
        {
            "name": "3-switch-readers",
            "files": s3,
            "why": f"union, routing and project_buckets by % {new} in one "
            "deployment; union and routing keep only each bucket's own rows while old buckets still hold moved rows",
        },
        {
            "name": "4-final",
            "files": dict(b),
            "why": f"the generated {new}-bucket project: gather pipes and "
            "filters go" + (", and the removed buckets' files" if d["removed"] else ""),
        },
    ]
    for st in out:
        st["files"] = dict(sorted(st["files"].items()))
    return out


# --- verification SQL (runs on Tinybird's Query API and, the same text, on the product's chdb layout) -----------
def _key() -> str:
    return "(" + ", ".join(SORT_KEY) + ")"


def verification(old: int, new: int) -> list[dict[str, str]]:
    """The checks, with when to run each and what they must return."""
    live = "\nUNION ALL\n".join(f"SELECT {_key()} AS k, segmentId FROM {raw_table(b)} FINAL" for b in range(old))
    counts_old = "\nUNION ALL\n".join(
        f"SELECT {b} AS bucket, count() AS rows FROM {raw_table(b)} FINAL" for b in range(old)
    )
    expected_new = (
        f"SELECT toUInt32({bucket_sql('segmentId', new)}) AS bucket, count() AS rows\n"
        f"FROM (SELECT DISTINCT k, segmentId FROM (\n{live}\n))\nGROUP BY bucket ORDER BY bucket"
    )
    counts_new = "\nUNION ALL\n".join(
        f"SELECT {n} AS bucket, count() AS rows FROM {raw_table(n)} FINAL" for n in range(new)
    )
    gathered = "\nUNION ALL\n".join(
        f"SELECT {n} AS bucket, count() AS missing FROM {raw_table(b)} FINAL\n"
        f"WHERE {bucket_sql('segmentId', new)} = {n} AND {_key()} NOT IN (SELECT {_key()} FROM {raw_table(n)})"
        for n in range(new)
        for b in gather_sources(n, old, new)
    )
    misplaced = "\nUNION ALL\n".join(
        f"SELECT {n} AS bucket, '{kind}' AS kind, count() AS rows FROM {table(n)}\n"
        f"WHERE {bucket_sql('segmentId', new)} != {n}"
        for kind, table in (("raw", raw_table), ("cleaned", cleaned_table))
        for n in range(new)
    )
    twice = "\nUNION ALL\n".join(
        f"SELECT DISTINCT '{kind}' AS kind, {_key()} AS k, {n} AS bucket FROM {table(n)} FINAL"
        for kind, table in (("raw", raw_table), ("cleaned", cleaned_table))
        for n in range(new)
    )
    duplicates = (
        f"SELECT kind, count() AS keys FROM (\nSELECT kind, k FROM (\n{twice}\n)\n"
        "GROUP BY kind, k HAVING count() > 1\n)\nGROUP BY kind"
    )
    out = [
        {
            "name": "old_counts",
            "when": "before stage 2",
            "sql": f"SELECT bucket, rows FROM (\n{counts_old}\n) ORDER BY bucket",
            "expect": "record: live rows per old bucket",
        },
        {
            "name": "expected_new_counts",
            "when": "before stage 2",
            "sql": expected_new,
            "expect": f"record: live rows per new bucket, computed from the old layout (% {new} of each row)",
        },
    ]
    if gathered:
        out.append(
            {
                "name": "gathered",
                "when": "after the gather copies, before stage 3",
                "sql": f"SELECT bucket, sum(missing) AS missing FROM (\n{gathered}\n) GROUP BY bucket ORDER BY bucket",
                "expect": "missing = 0 for every bucket: each live row of the old layout is in its new bucket",
            }
        )
    out += [
        {
            "name": "new_counts",
            "when": "after the prune (and again after stage 4)",
            "sql": f"SELECT bucket, rows FROM (\n{counts_new}\n) ORDER BY bucket",
            "expect": "equal to expected_new_counts when nothing was ingested meanwhile (otherwise the difference "
            "is what was ingested since); their sum equals the sum of old_counts",
        },
        {
            "name": "misplaced",
            "when": "after the prune and the cleaned rebuilds",
            "sql": f"SELECT kind, sum(rows) AS rows FROM (\n{misplaced}\n) GROUP BY kind ORDER BY kind",
            "expect": f"0 raw and 0 cleaned: every row (versions and tombstones too) in cityHash64(segmentId) % {new}",
        },
        {
            "name": "duplicates",
            "when": "after the prune and the cleaned rebuilds",
            "sql": duplicates,
            "expect": "no rows: no key is live in two buckets",
        },
    ]
    return out


def migration_plan(old: int, new: int) -> dict[str, Any]:
    """The machine-readable plan (JSON-ready) of the Tinybird project from ``old`` to ``new`` buckets."""
    path = path_of(old, new)
    a, b = generate_project(old), generate_project(new)
    files = diff_projects(a, b)
    st = stages(old, new) if path != "none" else []
    gathers = [gather_pipe_name(n) for n in range(new) if gather_sources(n, old, new)]
    prune = [bk for bk in range(min(old, new)) if path in ("split", "recompute")]
    cleaning = [cleaning_pipe_name(n) for n in range(new)]
    steps: list[dict[str, Any]] = []

    def step(action: str, title: str, **kw: Any) -> None:
        steps.append({"step": len(steps) + 1, "action": action, "title": title, **kw})

    if path != "none":
        step("verify", "record the old layout's counts", checks=["old_counts", "expected_new_counts"])
        s1, s2, s3, s4 = st
        step(
            "deploy",
            f"stage {s1['name']}: {s1['why']}",
            stage=s1["name"],
            command=f"cd {STAGES_DIR}/{s1['name']} && tb --cloud deployment create --check && tb --cloud deploy",
        )
        step(
            "deploy",
            f"stage {s2['name']}: {s2['why']}",
            stage=s2["name"],
            command=f"cd {STAGES_DIR}/{s2['name']} && tb --cloud deploy",
            also=f"restart the router's Tinybird sink with --buckets {new} (bucketer run/route ... --sink tinybird "
            f"--buckets {new}); its Kafka offsets carry on, so no message is lost while it restarts",
        )
        step(
            "copy",
            f"gather the old layout's rows into their new buckets (append; at most {COPY_CONCURRENCY} at once); "
            "start after both switches of step 3 are done",
            pipes=gathers,
            mode="append",
            command="tb --cloud copy run {pipe} --mode append --wait",
        )
        step(
            "copy",
            "rebuild every cleaned bucket from its raw bucket (replace)",
            pipes=cleaning,
            mode="replace",
            command=f"bucketer tinybird copy --all --buckets {new}",
        )
        if gathers:
            step("verify", "every live row of the old layout is in its new bucket", checks=["gathered"])
        step(
            "deploy",
            f"stage {s3['name']}: {s3['why']}",
            stage=s3["name"],
            command=f"cd {STAGES_DIR}/{s3['name']} && tb --cloud deploy",
        )
        if prune:
            step(
                "delete",
                "prune the rows that moved out of the kept old buckets (Delete API job per data source)",
                datasources=[
                    {"name": raw_table(bk), "delete_condition": f"{bucket_sql('segmentId', new)} != {bk}"}
                    for bk in prune
                ],
                command='tb --cloud datasource delete {name} --sql-condition "{delete_condition}"',
            )
            step(
                "copy",
                "rebuild the pruned buckets' cleaned data sources (replace)",
                pipes=[cleaning[bk] for bk in prune],
                mode="replace",
                command="bucketer tinybird copy " + " ".join(f"--bucket {bk}" for bk in prune) + f" --buckets {new}",
            )
        step("verify", "counts, placement and no row twice", checks=["new_counts", "misplaced", "duplicates"])
        destructive = " --allow-destructive-operations" if files["removed"] else ""
        step(
            "deploy",
            f"stage {s4['name']}: {s4['why']}",
            stage=s4["name"],
            command=f"cd {STAGES_DIR}/{s4['name']} && tb --cloud deployment create --wait --auto{destructive}",
        )
        step("verify", "the same checks on the final project", checks=["new_counts", "misplaced", "duplicates"])
    return {
        "format": PLAN_FORMAT,
        "from": old,
        "to": new,
        "path": path,
        "sources": list(SOURCES),
        "files": files,
        "stages": [
            {
                "name": s["name"],
                "folder": f"{STAGES_DIR}/{s['name']}",
                "why": s["why"],
                **diff_projects(prev, s["files"]),  # what this deployment adds, changes and removes
                "files": sorted(s["files"]),
            }
            for prev, s in zip([a] + [x["files"] for x in st], st, strict=False)
        ],
        "steps": steps,
        "gather": {gather_pipe_name(n): gather_sources(n, old, new) for n in range(new) if gather_sources(n, old, new)},
        "verification": verification(old, new) if path != "none" else [],
    }


_PATH_TEXT = {
    "split": "M is a multiple of N: each old bucket b splits into b, b+N, …; a new bucket gathers from one old bucket.",
    "merge": "N is a multiple of M: new bucket n gathers old buckets n+M, n+2M, …; old buckets >= M are removed.",
    "recompute": "neither divides the other: new bucket n gathers from every old bucket b != n with "
    "b = n (mod gcd(N, M)) (the slower path: more copies, each reading several old buckets).",
    "none": "same N: nothing to migrate.",
}


def render_markdown(plan: dict[str, Any]) -> str:
    n, m = plan["from"], plan["to"]
    lines = [
        f"# Tinybird migration: {n} -> {m} buckets (path: {plan['path']})",
        "",
        _PATH_TEXT[plan["path"]],
        "",
        f"Generated by `bucketer tinybird generate --buckets {m} --from {n}`; the same plan as `{PLAN_JSON}`.",
        "",
        "## Tinybird facts this plan relies on",
        "",
    ]
    lines += [f"- {s['fact']} ({s['url']})" for s in plan["sources"]]
    f = plan["files"]
    lines += ["", "## Datafiles (the generated projects diffed)", ""]
    for kind in ("added", "changed", "removed"):
        lines.append(f"- **{kind}** ({len(f[kind])}): " + (", ".join(f"`{x}`" for x in f[kind]) or "none"))
    lines += ["", "## Deploy stages (complete project folders)", ""]
    for s in plan["stages"]:
        lines.append(f"- `{s['folder']}/` ({len(s['files'])} datafiles): {s['why']}")
        for kind in ("added", "changed", "removed"):
            if s[kind]:
                lines.append(f"  - {kind} ({len(s[kind])}): " + ", ".join(f"`{name_of(x)}`" for x in s[kind]))
    lines += [
        "",
        "Deploy a stage from inside its folder (`tb` deploys the folder it runs in). The root of this folder is the "
        "final project too; do not deploy the root while `migration/` is still in it (the stages' datafiles "
        "would be seen twice), move or delete `migration/` after the last stage.",
        "",
        "## Steps, in order",
        "",
    ]
    checks = {c["name"]: c for c in plan["verification"]}
    for s in plan["steps"]:
        lines.append(f"{s['step']}. **{s['action']}**: {s['title']}")
        if "command" in s:
            lines.append(f"   - `{s['command']}`")
        if "also" in s:
            lines.append(f"   - and: {s['also']}")
        if "pipes" in s:
            lines.append("   - pipes: " + ", ".join(f"`{p}`" for p in s["pipes"]))
        for d in s.get("datasources", []):
            lines.append(f"   - `{d['name']}`: delete_condition `{d['delete_condition']}`")
        for c in s.get("checks", []):
            lines.append(f"   - `{c}`: {checks[c]['expect']}")
    lines += ["", "## Verification queries", ""]
    for c in plan["verification"]:
        lines += [f"### {c['name']} ({c['when']})", "", f"Expect: {c['expect']}.", "", "```sql", c["sql"], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_plan(old: int, new: int, out: Path) -> dict[str, Any]:
    """Write ``migration.json``, ``MIGRATION.md`` and the stage folders under ``out``; return the plan."""
    plan = migration_plan(old, new)
    root = out / STAGES_DIR
    if root.exists():
        shutil.rmtree(root)
    for st in stages(old, new) if plan["path"] != "none" else []:
        for rel, text in st["files"].items():
            p = root / st["name"] / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    (out / PLAN_JSON).write_text(json.dumps(plan, indent=2) + "\n")
    (out / PLAN_MD).write_text(render_markdown(plan))
    return plan
