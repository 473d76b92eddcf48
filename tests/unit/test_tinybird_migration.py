"""The Tinybird migration plan (stream/tinybird_migration.py) for 10 -> 20 (split), 10 -> 16 (recompute) and
20 -> 10 (merge): written by the CLI next to the new project, its file lists are the diff of the generated
projects on disk, its deploy stages never drop something a remaining datafile still reads or writes, and its
verification SQL parses on the real engine (chdb's EXPLAIN AST) and, run on a chdb warehouse in the product's
layout (stream/schema.py) through the plan's own gather copies and prune conditions, gives the expected counts,
and reports misplaced and duplicated rows when the prune is skipped."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bucketer.cli import app
from stream.buckets import bucket_of, cleaned_table, raw_table
from stream.schema import cleaned_table_ddl, raw_table_ddl, schema_statements
from stream.tinybird_migration import PLAN_JSON, PLAN_MD, STAGES_DIR, diff_projects, references
from stream.tinybird_project import generate_project

CASES = [(10, 20, "split"), (10, 16, "recompute"), (20, 10, "merge")]
KEY = ("segmentId", "timestamp", "type", "platform", "channel", "sourceId")


def files_of(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text()
        for sub in ("datasources", "pipes")
        for p in (root / sub).rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}to{c[1]}")
def planned(request: Any, tmp_path_factory: Any) -> tuple[int, int, str, Path, dict[str, Any], dict[str, str]]:
    old, new, path = request.param
    out = tmp_path_factory.mktemp(f"tb{old}to{new}")
    cli = CliRunner()
    first = cli.invoke(app, ["tinybird", "generate", "--buckets", str(old), "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = files_of(out)
    result = cli.invoke(app, ["tinybird", "generate", "--buckets", str(new), "--from", str(old), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"(path: {path})" in result.output
    plan = json.loads((out / PLAN_JSON).read_text())
    return old, new, path, out, plan, before


def test_the_plan_lists_the_diff_of_the_generated_projects_on_disk(planned: Any) -> None:
    old, new, path, out, plan, before = planned
    after = files_of(out)
    assert before == generate_project(old) and after == generate_project(new)
    assert plan["from"] == old and plan["to"] == new and plan["path"] == path
    expected = {
        "added": sorted(set(after) - set(before)),
        "changed": sorted(f for f in set(before) & set(after) if before[f] != after[f]),
        "removed": sorted(set(before) - set(after)),
    }
    assert plan["files"] == expected
    if new > old:
        assert len(expected["added"]) == 5 * (new - old) and not expected["removed"]
    else:
        assert len(expected["removed"]) == 5 * (old - new) and not expected["added"]
    for rel in expected["added"] + expected["changed"]:
        assert (out / rel).read_text() == generate_project(new)[rel]  # every added/changed file is in DIR
    for rel in expected["removed"]:
        assert not (out / rel).exists()
    # the stage folders hold exactly the plan's stage file lists, and the last one is the new project
    for st in plan["stages"]:
        assert sorted(files_of(out / st["folder"])) == st["files"]
    assert files_of(out / plan["stages"][-1]["folder"]) == generate_project(new)
    md = (out / PLAN_MD).read_text()
    assert f"path: {path}" in md and "tb deployment create --wait --auto" in md
    assert all(s["url"] in md for s in plan["sources"])
    for c in plan["verification"]:
        assert c["sql"] in md


def _node_names(text: str) -> set[str]:
    return set(re.findall(r"^NODE (\w+)$", text, re.M))


def test_deploy_order_never_removes_what_is_still_read(planned: Any) -> None:
    old, new, _, out, plan, _ = planned
    previous = generate_project(old)
    deployed: list[str] = []
    for st in plan["stages"]:
        files = files_of(out / st["folder"])
        sources = {Path(f).stem for f in files if f.endswith(".datasource")}
        for rel, text in files.items():
            if rel.endswith(".pipe"):  # every FROM/JOIN/TARGET is a data source of this stage or a node of its own
                missing = references(text) - sources - _node_names(text)
                assert not missing, (st["name"], rel, missing)
        assert st == {**st, **diff_projects(previous, files)}  # the plan's per-stage lists are the real diff
        previous = files
        deployed.append(st["name"])
    steps = plan["steps"]
    order = {s.get("stage"): s["step"] for s in steps if s["action"] == "deploy"}
    gather = next(s for s in steps if s["action"] == "copy" and s["mode"] == "append")
    assert order["2-switch-writers"] < gather["step"] < order["3-switch-readers"] < order["4-final"]
    # the gather copies read every old bucket that loses rows, and those are removed only at the final stage
    removed_raw = {raw_table(b) for b in range(new, old)}
    read_by_gather = {
        t for p in gather["pipes"] for t in references((out / STAGES_DIR / "1-add" / "pipes" / f"{p}.pipe").read_text())
    }
    assert removed_raw <= read_by_gather
    for name in ("1-add", "2-switch-writers", "3-switch-readers"):
        assert all((out / STAGES_DIR / name / "datasources" / f"{t}.datasource").exists() for t in removed_raw)
    # readers switch together in one stage; writers all route by % new from stage 2 on
    readers = [s for s in plan["stages"] if "pipes/project_buckets.pipe" in s["changed"]]
    assert len(readers) == 1 and {
        "pipes/activityRelations_deduplicated_cleaned_bucket_union.pipe",
        "pipes/activityRelations_bucket_routing.pipe",
    } <= set(readers[0]["changed"])
    stage2 = files_of(out / STAGES_DIR / "2-switch-writers")
    mvs = [t for f, t in stage2.items() if re.search(r"bucket_MV_\d+\.pipe$", f)]
    assert len(mvs) == new and all(f"% {new} =" in t for t in mvs)
    deletes = [s for s in steps if s["action"] == "delete"]
    if plan["path"] == "merge":
        assert not deletes  # a merged bucket keeps all its rows
    else:
        assert deletes and deletes[0]["step"] > order["3-switch-readers"]


def test_the_verification_sql_parses_on_the_engine(planned: Any) -> None:
    from chdb import session

    *_, plan, _ = planned
    sess = session.Session()
    try:
        names = [c["name"] for c in plan["verification"]]
        assert {"old_counts", "expected_new_counts", "new_counts", "misplaced", "duplicates"} <= set(names)
        for c in plan["verification"]:
            ast = sess.query(f"EXPLAIN AST {c['sql']}", "TabSeparated").bytes().decode()
            assert "SelectWithUnionQuery" in ast, c["name"]
    finally:
        sess.close()


# --- the plan run on chdb, in the product's layout ---------------------------------------------------------------
def _rows(sess: Any, sql: str) -> list[tuple[Any, ...]]:
    out = sess.query(sql, "JSONCompactEachRow").bytes().decode()
    return [tuple(json.loads(line)) for line in out.splitlines() if line]


def _node_sql(pipe: str) -> str:
    body = pipe.split("SQL >\n", 1)[1].split("\n\nTYPE ", 1)[0]
    return "\n".join(line[4:] for line in body.split("\n"))


class Model:
    """The test's own record of the live rows: key -> (segmentId, version, deleted); ``write`` routes a row
    version to its bucket of ``buckets`` (inserted in one statement per bucket at ``flush``)."""

    def __init__(self, sess: Any) -> None:
        self.sess, self.rows, self.clock = sess, {}, 1000
        self.pending: dict[int, list[str]] = {}

    def write(self, key: tuple[str, ...], buckets: int, deleted: int = 0) -> None:
        self.clock += 2
        seg = key[0]
        self.rows[key] = (seg, self.clock, deleted)
        self.pending.setdefault(bucket_of(seg, buckets), []).append(
            f"('{seg}', '2026-01-0{1 + int(key[1]) % 9} 00:00:00', '{key[2]}', 'github', '{key[4]}', '{key[5]}', "
            f"{deleted}, {self.clock * 2 + deleted})"
        )

    def flush(self) -> None:
        for b, values in sorted(self.pending.items()):
            self.sess.query(
                f"INSERT INTO {raw_table(b)} (segmentId, timestamp, type, platform, channel, sourceId, _deleted, "
                f"_version) VALUES " + ", ".join(values)
            )
        self.pending.clear()

    def live(self, buckets: int) -> list[tuple[int, int]]:
        counts = [0] * buckets
        for seg, _v, deleted in self.rows.values():
            if not deleted:
                counts[bucket_of(seg, buckets)] += 1
        return list(enumerate(counts))


def _rebuild_cleaned(sess: Any, n: int) -> None:
    cols = ", ".join(KEY)
    sess.query(f"TRUNCATE TABLE {cleaned_table(n)}")
    sess.query(f"INSERT INTO {cleaned_table(n)} ({cols}) SELECT {cols} FROM {raw_table(n)} FINAL")


def _check(sess: Any, plan: dict[str, Any], name: str) -> list[tuple[Any, ...]]:
    sql = next(c["sql"] for c in plan["verification"] if c["name"] == name)
    return _rows(sess, sql)


@pytest.mark.parametrize("prune", [True, False], ids=["pruned", "prune-skipped"])
def test_the_plan_run_on_chdb_gives_the_expected_counts(planned: Any, prune: bool) -> None:
    from chdb import session

    old, new, path, out, plan, _ = planned
    sess = session.Session()
    try:
        sess.query("CREATE DATABASE wh ENGINE = Atomic")
        sess.query("USE wh")
        for stmt in schema_statements(old):
            sess.query(stmt)
        model = Model(sess)
        rnd = random.Random(old * 100 + new)
        segments = [f"seg-{i}" for i in range(60)]
        keys = [(rnd.choice(segments), str(i), "commit", "github", f"ch{i % 7}", f"src{i}") for i in range(600)]
        for k in keys:  # the old layout, with some updates and deletes
            model.write(k, old)
        for k in rnd.sample(keys, 80):
            model.write(k, old)
        for k in rnd.sample(keys, 40):
            model.write(k, old, deleted=1)
        model.flush()
        for n in range(old):
            _rebuild_cleaned(sess, n)
        assert _check(sess, plan, "old_counts") == model.live(old)
        expected = _check(sess, plan, "expected_new_counts")
        assert expected == [(n, c) for n, c in model.live(new) if c]

        # stage 1 + 2: the new buckets' tables, then every write goes by % new: updates and deletes of rows that
        # move, and new rows
        for n in range(old, new):
            sess.query(raw_table_ddl(n))
            sess.query(cleaned_table_ddl(n))
        moved = [k for k in keys if bucket_of(k[0], old) != bucket_of(k[0], new) and not model.rows[k][2]]
        assert len(moved) > 20
        for k in moved[:10]:
            model.write(k, new)
        for k in moved[10:20]:
            model.write(k, new, deleted=1)
        for i in range(600, 700):
            model.write((rnd.choice(segments), str(i), "issue", "github", "chx", f"src{i}"), new)
        model.flush()

        # the gather copies, exactly as the plan's copy pipes say (INSERT of their node's SQL into the target)
        for pipe in plan["gather"]:
            text = (out / STAGES_DIR / "1-add" / "pipes" / f"{pipe}.pipe").read_text()
            target = re.search(r"^TARGET_DATASOURCE (\w+)$", text, re.M)[1]  # type: ignore[index]
            sess.query(f"INSERT INTO {target} {_node_sql(text)}")
        if "gathered" in {c["name"] for c in plan["verification"]}:
            assert all(missing == 0 for _, missing in _check(sess, plan, "gathered"))
        for n in range(new):
            _rebuild_cleaned(sess, n)
        deletes = [s for s in plan["steps"] if s["action"] == "delete"]
        if prune:
            for d in (x for s in deletes for x in s["datasources"]):
                sess.query(f"ALTER TABLE {d['name']} DELETE WHERE {d['delete_condition']} SETTINGS mutations_sync = 2")
            for n in range(min(old, new)):
                _rebuild_cleaned(sess, n)

        final = model.live(new)
        counts = _check(sess, plan, "new_counts")
        misplaced = dict(_check(sess, plan, "misplaced"))
        duplicates = dict(_check(sess, plan, "duplicates"))
        if prune or path == "merge":
            # every deleted row stays deleted (the tombstone's version beats the copied row), every live row once
            assert counts == final and sum(c for _, c in counts) == sum(c for _, c in final)
            assert misplaced == {"cleaned": 0, "raw": 0}
            assert duplicates == {}
            union = sum(_rows(sess, f"SELECT count() FROM {cleaned_table(n)}")[0][0] for n in range(new))
            assert union == sum(c for _, c in final)
        else:  # the checks catch a skipped prune: rows left behind in their old bucket, counted twice
            assert misplaced["raw"] > 0 and misplaced["cleaned"] > 0
            assert duplicates.get("raw", 0) > 0 and duplicates.get("cleaned", 0) > 0
            assert counts != final
    finally:
        sess.close()
