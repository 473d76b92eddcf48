"""The data model (connectors/model.py) is the one statement of each fact, and the parts that derive from it agree
with each other: the gerrit rule in Python and in SQL (run on the embedded ClickHouse engine), the bucket SQL
and the Python bucket function, the decoder's and the loader's required columns, the schedule slots of the
scheduler and of the Tinybird cleaning pipes; and the model and the decoder import nothing of stream/."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import orjson
import pytest

from connectors import model, sequin
from connectors.sequin import BadMessage, decode
from stream.buckets import bucket_of
from stream.row_sql import problem
from stream.schedule import ScheduleConfig
from stream.tinybird_project import generate_project

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chdb_query():  # type: ignore[no-untyped-def]
    from chdb import session

    sess = session.Session()

    def query(sql: str) -> list[list[str]]:
        text = sess.query(sql, "TabSeparated").bytes().decode()
        return [line.split("\t") for line in text.splitlines()]

    yield query
    sess.close()


def imports_of(path: Path) -> list[str]:
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append(node.module or "")
    return out


def test_the_model_imports_nothing_of_ours_and_the_decoder_nothing_of_stream() -> None:
    assert [m for m in imports_of(ROOT / "connectors" / "model.py") if m.startswith(("connectors", "stream"))] == []
    for name in ("sequin.py", "topics.py"):
        assert [m for m in imports_of(ROOT / "connectors" / name) if m.startswith(("stream", "bucketer"))] == []
    assert not (ROOT / "connectors" / "tinybird_project.py").exists()  # the generator lives in stream/


def test_the_gerrit_rule_in_sql_is_the_gerrit_rule_in_python(chdb_query) -> None:  # type: ignore[no-untyped-def]
    urls = [
        "https://review.example.org/r/org/repo",
        "https://review.example.org/r/a/r/b",  # only the first /r/
        "https://gerrit.example.org/gerrit/org/repo",
        "https://gerrit.example.org/gerrit/x/r/y",  # /r/ wins over /gerrit/
        "https://host.example.org/org/repo",
        "https://host.example.org",
        "http://h:8080/p/q",
    ]
    for sep in (", ", ",\n        "):
        sql = " UNION ALL ".join(
            f"SELECT {i} AS i, {model.gerrit_variant_sql(repr(u), sep)} AS v" for i, u in enumerate(urls)
        )
        got = {int(i): v for i, v in chdb_query(f"SELECT i, v FROM ({sql}) ORDER BY i")}
        assert got == {i: model.gerrit_query_url(u) for i, u in enumerate(urls)}
    assert model.gerrit_query_url("https://host.example.org") == "https://host.example.org/q/project:"


def test_bucket_sql_is_the_python_bucket_function(chdb_query) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(5)
    ids = [f"seg-{rng.getrandbits(64):x}" for _ in range(200)] + ["", "é", "a" * 100]
    for n in (1, 7, 10, 20):
        values = ", ".join(repr(i) for i in ids)
        rows = chdb_query(f"SELECT s, {model.bucket_sql('s', n)} FROM (SELECT arrayJoin([{values}]) AS s)")
        assert {s: int(b) for s, b in rows} == {i: bucket_of(i, n) for i in ids}


def test_the_decoder_and_the_loader_require_the_models_columns() -> None:
    record = {c.name: "x" for c in model.ACTIVITY_COLUMNS} | {
        c: "2025-03-01T10:00:00.000000Z" for c in model.REQUIRED_TIMESTAMPS
    }
    for c in model.ACTIVITY_COLUMNS:
        if c.type in ("Int8", "UInt8", "UInt32"):
            record[c.name] = 1
    good = orjson.dumps({"action": "insert", "record": record})
    assert decode(good).segment_id == "x" and problem(good, "activityRelations") is None
    assert set(model.ACTIVITY_REQUIRED) == {model.BUCKET_KEY, *sequin.STRING_COLUMNS, *sequin.TIMESTAMP_COLUMNS}
    for name in model.ACTIVITY_NAMES:
        value = orjson.dumps({"action": "insert", "record": {k: v for k, v in record.items() if k != name}})
        if name in model.ACTIVITY_REQUIRED:
            with pytest.raises(BadMessage):
                decode(value)
            assert problem(value, "activityRelations") == f"required field {name} is missing or null"
        else:
            assert decode(value).segment_id == "x" and problem(value, "activityRelations") is None, name
    for action in model.ACTIONS:
        assert decode(orjson.dumps({"action": action, "record": record})).action == action
    with pytest.raises(BadMessage):
        decode(orjson.dumps({"action": "upsert", "record": record}))


def test_every_column_reads_the_json_path_the_loader_reads() -> None:
    # stream/row_sql.py reads ``record.<name>``, and a member flag from ``record.attributes.<flag>.default``.
    for table, cols in [("activityRelations", model.ACTIVITY_COLUMNS), *model.REFERENCE_COLUMNS.items()]:
        for c in cols:
            if table == "members" and c.name in model.MEMBER_FLAGS:
                assert c.path == f"$.record.{model.MEMBER_ATTRIBUTES}.{c.name}.default"
            else:
                assert c.path == f"$.record.{c.name}", (table, c)
    assert all(c.path is None for c in model.VERSION_COLUMNS + model.CLEANED_EXTRA)


def test_the_schedule_slots_of_the_scheduler_and_of_the_tinybird_pipes_are_one_formula() -> None:
    n = 40
    cfg = ScheduleConfig(buckets=n)
    files = generate_project(n)
    for b in range(n):
        cron = files[f"pipes/activityRelations_deduplicated_cleaned_bucket_{b}.pipe"].split("COPY_SCHEDULE ")[1]
        assert cron.split()[0] == str(cfg.minute(b)) == str(model.slot_minute(b))
    assert [model.slot_offset(b) for b in (0, 1, 2, 3, 26)] == [10, 10, 14, 14, 62]
    assert model.slot_minute(26) == 2
