"""The generated Tinybird project: deterministic, 10 -> 20 buckets touches exactly the files that depend on N,
and the generated SQL runs on the embedded ClickHouse engine (chdb) against tables built from the generated
schemas, giving the same cleaned rows as the product's own enrichment (stream/enrich.py) on the same data."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bucketer.cli import app
from connectors.countries import organization_country_code
from connectors.sequin import BadMessage, decode
from stream.buckets import bucket_of, cleaned_table, raw_table
from stream.loadgen import LoadgenConfig, generate
from stream.tinybird_project import ProjectBucketsError, generate_project, project_buckets, write_project

REFERENCE = ("members", "organizations", "repositories", "insightsProjects", "integrations")


# --- reading datafiles (the test's own small parser) -------------------------------------------------------------
def parse_datasource(text: str) -> tuple[list[tuple[str, str, str | None, str | None]], dict[str, str]]:
    schema = text.split("SCHEMA >\n", 1)[1].split("\n\n", 1)[0]
    cols = []
    for line in schema.splitlines():
        m = re.match(r"\s*`(\w+)` (.+?)(?: `json:([^`]+)`)?(?: DEFAULT (.+?))?,?$", line)
        assert m, line
        cols.append((m[1], m[2], m[3], m[4]))
    engine = dict(re.findall(r'^(ENGINE\w*) "(.*)"$', text, re.M))
    return cols, engine


def ddl(name: str, text: str) -> str:
    cols, eng = parse_datasource(text)
    body = ",\n".join(f"`{n}` {t}" + (f" DEFAULT {d}" if d else "") for n, t, _, d in cols)
    params = ", ".join(x for x in (eng.get("ENGINE_VER"), eng.get("ENGINE_IS_DELETED")) if x)
    out = f"CREATE TABLE {name} ({body}) ENGINE = {eng['ENGINE']}({params})"
    if eng.get("ENGINE_PARTITION_KEY"):
        out += f" PARTITION BY {eng['ENGINE_PARTITION_KEY']}"
    return out + f" ORDER BY ({eng['ENGINE_SORTING_KEY']})"


def parse_pipe(text: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    nodes = []
    for chunk in re.split(r"^NODE ", text, flags=re.M)[1:]:
        name = chunk.split("\n", 1)[0]
        sql_block = chunk.split("SQL >\n", 1)[1]
        lines = []
        for line in sql_block.split("\n"):
            if line and not line.startswith("    "):
                break
            lines.append(line[4:])
        nodes.append((name, "\n".join(lines).strip()))
    settings = dict(re.findall(r"^(TYPE|TARGET_DATASOURCE|DATASOURCE|COPY_MODE|COPY_SCHEDULE) (.+)$", text, re.M))
    return nodes, settings


def render(sql: str, params: dict[str, Any]) -> str:
    """Tinybird's template subset used here: the leading '%' line and {{ Type(name, default...) }}."""
    if sql.startswith("%\n"):
        sql = sql[2:]

    def sub(m: re.Match[str]) -> str:
        kind, name = m[1], m[2]
        if name not in params:
            return m[3].strip() if m[3] and "required" not in m[3] else "NULL"
        value = params[name]
        return f"'{value}'" if kind == "String" else str(int(value))

    return re.sub(r"\{\{\s*(\w+)\((\w+)(?:,\s*([^)]*))?\)\s*\}\}", sub, sql)


def pipe_query(text: str, params: dict[str, Any] | None = None) -> str:
    nodes, _ = parse_pipe(text)
    *first, (_, last) = [(n, render(s, params or {})) for n, s in nodes]
    with_ = ",\n".join(f"{n} AS ({s})" for n, s in first)
    return (f"WITH {with_}\n" if with_ else "") + last


# --- determinism and diffs ---------------------------------------------------------------------------------
def test_generation_is_deterministic_and_the_cli_writes_it(tmp_path: Path) -> None:
    assert generate_project(10) == generate_project(10)
    result = CliRunner().invoke(app, ["tinybird", "generate", "--buckets", "10", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    on_disk = {str(p.relative_to(tmp_path)): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    assert on_disk == generate_project(10)
    assert len(on_disk) == 7 + 5 * 10 + 3


def test_ten_to_twenty_buckets_changes_exactly_the_files_that_depend_on_n(tmp_path: Path) -> None:
    write_project(10, tmp_path)
    before = {str(p.relative_to(tmp_path)): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    write_project(20, tmp_path, rebucket=True)
    after = {str(p.relative_to(tmp_path)): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    added = set(after) - set(before)
    changed = {f for f in before if f in after and before[f] != after[f]}
    assert set(before) <= set(after)
    new_buckets = range(10, 20)
    assert added == (
        {f"datasources/{raw_table(n)}.datasource" for n in new_buckets}
        | {f"datasources/{cleaned_table(n)}.datasource" for n in new_buckets}
        | {f"pipes/activityRelations_bucket_MV_{n}.pipe" for n in new_buckets}
        | {f"pipes/activityRelations_bucket_snapshot_{n}.pipe" for n in new_buckets}
        | {f"pipes/activityRelations_deduplicated_cleaned_bucket_{n}.pipe" for n in new_buckets}
    )
    # the bucketing filters of the old buckets (% N) and the three N-wide pipes; nothing else
    assert changed == (
        {f"pipes/activityRelations_bucket_MV_{n}.pipe" for n in range(10)}
        | {f"pipes/activityRelations_bucket_snapshot_{n}.pipe" for n in range(10)}
        | {
            "pipes/activityRelations_deduplicated_cleaned_bucket_union.pipe",
            "pipes/activityRelations_bucket_routing.pipe",
            "pipes/project_buckets.pipe",
        }
    )
    for f in changed:
        assert "% 20" in after[f] or "0 AND 19" in after[f] or "bucket_19_ds" in after[f]
    write_project(10, tmp_path, rebucket=True)  # and back: the extra buckets' files are removed
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()} == set(before)


def files_of(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_an_existing_project_keeps_its_n_unless_rebucket_is_asked(tmp_path: Path) -> None:
    cli = CliRunner()
    fresh = cli.invoke(app, ["tinybird", "generate", "--out", str(tmp_path)], env={"BUCKETER_BUCKETS": None})
    assert fresh.exit_code == 0, fresh.output
    assert "for 10 buckets" in fresh.output and project_buckets(tmp_path) == 10  # a fresh folder: the default 10
    before = files_of(tmp_path)

    other = cli.invoke(app, ["tinybird", "generate", "--buckets", "20", "--out", str(tmp_path)])
    assert other.exit_code == 1
    lines = other.output.strip().splitlines()
    assert len(lines) == 1 and "has 10 buckets, not 20" in lines[0] and "--rebucket --buckets 20" in lines[0]
    assert files_of(tmp_path) == before  # nothing written
    with pytest.raises(ProjectBucketsError):
        write_project(20, tmp_path)

    same = cli.invoke(app, ["tinybird", "generate", "--out", str(tmp_path)], env={"BUCKETER_BUCKETS": None})
    assert same.exit_code == 0 and "for 10 buckets" in same.output  # without --buckets: the project's own N
    assert files_of(tmp_path) == before

    alone = cli.invoke(
        app, ["tinybird", "generate", "--rebucket", "--out", str(tmp_path)], env={"BUCKETER_BUCKETS": None}
    )
    assert alone.exit_code == 2 and files_of(tmp_path) == before

    moved = cli.invoke(app, ["tinybird", "generate", "--rebucket", "--buckets", "20", "--out", str(tmp_path)])
    assert moved.exit_code == 0, moved.output
    assert project_buckets(tmp_path) == 20 and files_of(tmp_path) == generate_project(20)


def test_a_project_with_gaps_in_its_buckets_is_refused(tmp_path: Path) -> None:
    write_project(4, tmp_path)
    (tmp_path / "datasources" / f"{raw_table(2)}.datasource").unlink()
    with pytest.raises(ProjectBucketsError, match="gaps"):
        project_buckets(tmp_path)
    result = CliRunner().invoke(app, ["tinybird", "generate", "--buckets", "4", "--out", str(tmp_path)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert write_project(4, tmp_path, rebucket=True) and project_buckets(tmp_path) == 4


def test_cleaning_schedule_is_staggered_in_pairs() -> None:
    files = generate_project(20)
    minute = {
        n: parse_pipe(files[f"pipes/activityRelations_deduplicated_cleaned_bucket_{n}.pipe"])[1] for n in range(20)
    }
    for n, s in minute.items():
        assert s["TYPE"] == "COPY" and s["COPY_MODE"] == "replace"
        assert s["TARGET_DATASOURCE"] == cleaned_table(n)
    cron = {n: s["COPY_SCHEDULE"] for n, s in minute.items()}
    assert [cron[n] for n in range(10)] == ["10 * * * *"] * 2 + ["14 * * * *"] * 2 + ["18 * * * *"] * 2 + [
        "22 * * * *"
    ] * 2 + ["26 * * * *"] * 2
    assert cron[18] == cron[19] == "46 * * * *"
    assert all(
        parse_pipe(files[f"pipes/activityRelations_bucket_snapshot_{n}.pipe"])[1]["TYPE"] == "COPY" for n in range(20)
    )


# --- the SQL on chdb ---------------------------------------------------------------------------------------
def jsonpath(msg: dict[str, Any], path: str) -> Any:
    node: Any = msg
    for part in path.removeprefix("$.").split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return json.dumps(node) if isinstance(node, dict) else node


def ingest(sess: Any, table: str, datasource: str, values: list[bytes]) -> None:
    """What the Events API does with a data source's JSONPaths: one row per message, nulls -> DEFAULT."""
    cols, _ = parse_datasource(datasource)
    rows = []
    for v in values:
        msg = json.loads(v)
        rows.append(json.dumps({n: jsonpath(msg, p) for n, _, p, _ in cols if p}))
    for i in range(0, len(rows), 2000):
        sess.query(
            f"INSERT INTO {table} SETTINGS date_time_input_format='best_effort' FORMAT JSONEachRow\n"
            + "\n".join(rows[i : i + 2000])
        )


def rows_of(sess: Any, sql: str) -> list[tuple[Any, ...]]:
    out = sess.query(sql, "JSONCompactEachRow").bytes().decode()
    return [tuple(json.loads(line)) for line in out.splitlines() if line]


@pytest.fixture(scope="module")
def warehouses() -> Any:
    """One chdb session: database ``tb`` built from the generated datafiles, database ``product`` built by the
    product's schema and loader SQL; the same Sequin messages in both."""
    from chdb import session

    from stream.row_sql import insert_sql
    from stream.schema import schema_statements

    buckets = 4
    files = generate_project(buckets)
    sess = session.Session()
    sess.query("SET session_timezone = 'UTC'")
    routed: dict[int, list[bytes]] = {n: [] for n in range(buckets)}
    refs: dict[str, list[bytes]] = {t: [] for t in REFERENCE}
    for topic, _key, value in generate(LoadgenConfig(count=4000, seed=31, segments=24, bad_fraction=0.0)):
        if topic != "activityRelations":
            refs[topic].append(value)
            continue
        try:
            change = decode(value)
        except BadMessage:
            continue
        routed[bucket_of(change.segment_id, buckets)].append(value)
        if change.retirement is not None:
            routed[bucket_of(change.retirement.segment_id, buckets)].append(change.retirement.value)

    assert all(routed.values()), "every bucket needs data for the comparison to mean something"
    sess.query("CREATE DATABASE tb")
    sess.query("USE tb")
    for rel, text in files.items():
        if rel.endswith(".datasource"):
            sess.query(ddl(Path(rel).stem, text))
    for t in REFERENCE:
        ingest(sess, t, files[f"datasources/{t}.datasource"], refs[t])
    for n in range(buckets):
        ingest(sess, raw_table(n), files[f"datasources/{raw_table(n)}.datasource"], routed[n])
    pairs = rows_of(sess, "SELECT DISTINCT country, location FROM organizations FINAL")
    codes = [(c, loc, organization_country_code(c, loc)) for c, loc in pairs]
    sess.query(
        "INSERT INTO organization_country_codes (country, location, code, resolverVersion) VALUES "
        + ", ".join(f"({quote(c)}, {quote(loc)}, '{code}', 1)" for c, loc, code in codes)
    )

    sess.query("CREATE DATABASE product")
    sess.query("USE product")
    for stmt in schema_statements(buckets):
        sess.query(stmt)
    sess.query("CREATE TABLE staging (v String) ENGINE = Memory")

    def load(table: str, kind: str, values: list[bytes]) -> None:
        sess.query("TRUNCATE TABLE staging")
        for i in range(0, len(values), 2000):
            sess.query(
                "INSERT INTO staging FORMAT JSONAsString\n" + "\n".join(x.decode() for x in values[i : i + 2000])
            )
        columns, select = insert_sql(kind)
        sess.query(f"INSERT INTO {table} ({columns}) " + select.replace("{source}", "staging"))

    for t in REFERENCE:
        load(t, t, refs[t])
    for n in range(buckets):
        load(raw_table(n), "activityRelations", routed[n])
    yield sess, files, buckets, routed
    sess.close()


def quote(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(int(value))


class SessionWarehouse:
    """The product's Warehouse protocol over this test's chdb session, in database ``product``."""

    def __init__(self, sess: Any) -> None:
        self.sess = sess

    def __enter__(self) -> SessionWarehouse:
        self.sess.query("USE product")
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def _sql(self, sql: str, params: Any) -> str:
        return re.sub(r"\{(\w+):(\w+)\}", lambda m: quote((params or {})[m[1]]), sql)

    def command(self, sql: str, params: Any = None) -> None:
        self.sess.query(self._sql(sql, params))

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return rows_of(self.sess, self._sql(sql, params))

    def insert(self, table: str, columns: Any, rows: Any) -> None:
        if rows:
            values = ", ".join("(" + ", ".join(quote(v) for v in r) + ")" for r in rows)
            self.sess.query(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}")

    def exchange(self, a: str, b: str) -> None:
        self.command(f"EXCHANGE TABLES {a} AND {b}")  # the session's databases are Atomic


def test_cleaning_pipes_give_the_products_cleaned_rows(warehouses: Any) -> None:
    from stream.enrich import Enricher

    sess, files, buckets, routed = warehouses
    enricher = Enricher(lambda: SessionWarehouse(sess))
    total = 0
    codes: set[str] = set()
    for n in range(buckets):
        sess.query("USE tb")
        mine = rows_of(sess, pipe_query(files[f"pipes/activityRelations_deduplicated_cleaned_bucket_{n}.pipe"]))
        assert enricher.rebuild(n).rows > 0  # the product's own rebuild of the same bucket
        from stream.schema import cleaned_select_list

        theirs = rows_of(sess, f"SELECT {cleaned_select_list()} FROM product.{cleaned_table(n)} FINAL")
        diff = sorted(set(r[:-1] for r in mine) ^ set(r[:-1] for r in theirs))
        assert diff == [], "\n".join(map(str, diff[:4]))
        assert sorted(r[:-1] for r in mine) == sorted(r[:-1] for r in theirs)  # all but snapshotId
        assert len({r[-1] for r in mine}) <= 1
        total += len(mine)
        codes.update(r[-3] for r in mine)
        raw_live = rows_of(sess, f"SELECT count() FROM tb.{raw_table(n)} FINAL")[0][0]
        assert 0 < len(mine) < raw_live  # the rules dropped some rows and kept others
    assert total > 500
    assert "XX" in codes and len(codes) >= 4  # resolved countries and unknown ones both compared
    # the copy into the generated cleaned data source works (same columns, same order)
    sess.query("USE tb")
    sess.query(
        f"INSERT INTO {cleaned_table(0)} "
        + pipe_query(files["pipes/activityRelations_deduplicated_cleaned_bucket_0.pipe"])
    )
    assert rows_of(sess, f"SELECT count() FROM {cleaned_table(0)}")[0][0] > 0


def test_bucketing_routing_and_project_pipes(warehouses: Any) -> None:
    sess, files, buckets, _ = warehouses
    sess.query("USE tb")
    # the bucketing materialized view's filter agrees with the product's bucket function
    for n in range(buckets):
        sql = pipe_query(files[f"pipes/activityRelations_bucket_MV_{n}.pipe"])
        segs = rows_of(
            sess,
            sql.replace("SELECT *", "SELECT DISTINCT segmentId", 1).replace(
                "FROM activityRelations", f"FROM {raw_table(n)}"
            ),
        )
        assert segs and all(bucket_of(s, buckets) == n for (s,) in segs)
    for n in range(buckets):
        sess.query(
            f"INSERT INTO {cleaned_table(n)} "
            + pipe_query(files[f"pipes/activityRelations_deduplicated_cleaned_bucket_{n}.pipe"])
        )
    routing = files["pipes/activityRelations_bucket_routing.pipe"]
    got = rows_of(sess, f"SELECT count() FROM ({pipe_query(routing, {'bucketId': 2})})")[0][0]
    assert got == rows_of(sess, f"SELECT count() FROM {cleaned_table(2)}")[0][0] > 0
    for bad in ({"bucketId": buckets}, {"bucketId": -3}, {}):
        with pytest.raises(Exception, match="invalid bucketId"):
            rows_of(sess, pipe_query(routing, bad))
    union_sql = pipe_query(files["pipes/activityRelations_deduplicated_cleaned_bucket_union.pipe"])
    union = rows_of(sess, f"SELECT count() FROM ({union_sql})")
    assert union[0][0] == sum(rows_of(sess, f"SELECT count() FROM {cleaned_table(n)}")[0][0] for n in range(buckets))
    projects = rows_of(sess, "SELECT slug, segmentId, enabled, deletedAt IS NULL FROM insightsProjects FINAL")
    live = [(s, seg) for s, seg, en, alive in projects if en and alive]
    dead = [s for s, _, en, alive in projects if not (en and alive)]
    assert live and dead
    slug, seg = live[0]
    assert rows_of(sess, pipe_query(files["pipes/project_buckets.pipe"], {"project": slug}))[0][3] == bucket_of(
        seg, buckets
    )
    assert rows_of(sess, pipe_query(files["pipes/project_buckets.pipe"], {"project": dead[0]})) == []
