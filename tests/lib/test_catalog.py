"""DuckDB over the lake (dagster_project/lib/catalog.py) and ``featurelake sql`` (dagster_project/cli.py)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from dagster_project.lib.catalog import ReadOnlyError, build_catalog, query, views_connection
from dagster_project.lib.lake import Lake

SAMPLES = {
    "train_a": [("AF text one", "alignment_faking", True), ("aligned text", "aligned", False)],
    "ood_b": [("AF text two", "alignment_faking", True), ("AF text three", "alignment_faking", True),
              ("AF text four", "alignment_faking", True)],
}
ROLES = {"train_a": "train", "ood_b": "ood"}
# (layer, dataset) -> rows of (sample_id, feature_id, max_act)
ACTS = {
    (1, "train_a"): [(0, 5, 2.0), (0, 9, 1.0), (1, 9, 3.0)],
    (1, "ood_b"): [(0, 5, 1.5), (2, 5, 0.5)],
    (12, "train_a"): [(0, 7, 4.0)],
}
N_ACTS = sum(len(v) for v in ACTS.values())


def _samples(name: str) -> pa.Table:
    rows = SAMPLES[name]
    return pa.table({"sample_id": pa.array(range(len(rows)), pa.int32()), "text": [r[0] for r in rows],
                     "label": [r[1] for r in rows], "is_positive": [r[2] for r in rows],
                     "role": [ROLES[name]] * len(rows)})


def _acts(rows: list[tuple[int, int, float]]) -> pa.Table:
    return pa.table({"sample_id": pa.array([r[0] for r in rows], pa.int32()),
                     "feature_id": pa.array([r[1] for r in rows], pa.int32()),
                     "max_act": pa.array([r[2] for r in rows], pa.float32())})


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    lk = Lake(str(tmp_path / "lake"), "default")
    for name in SAMPLES:
        lk.write("samples", _samples(name), dataset=name)
    for (layer, name), rows in ACTS.items():
        lk.write("activations", _acts(rows), layer=layer, dataset=name, meta={"model": "m"})
    lk.write("stats/feature_stats", pa.table({"feature_id": pa.array([5, 9], pa.int32()),
                                              "selectivity": [0.25, -1.0]}), layer=1)
    return lk


def _types(con: duckdb.DuckDBPyConnection, view: str) -> dict[str, str]:
    return {r[0]: r[1] for r in con.sql(f"describe {view}").fetchall()}


def test_build_catalog_views(lake: Lake) -> None:
    path, names = build_catalog(lake)
    assert path == lake.base / "lake.duckdb" and path.is_file()
    assert sorted(names) == ["activations", "feature_stats", "samples"]
    assert not list(lake.base.glob(".tmp-*")), "the catalog is written aside and renamed"
    con = duckdb.connect(str(path), read_only=True)
    try:
        acts = _types(con, "activations")
        assert acts["layer"] in ("BIGINT", "INTEGER") and acts["dataset"] == "VARCHAR", acts
        assert _types(con, "samples")["dataset"] == "VARCHAR"
        assert _types(con, "feature_stats")["layer"] in ("BIGINT", "INTEGER")
        got = con.sql("select layer, dataset, count(*) from activations group by all order by all").fetchall()
        assert got == sorted((layer, d, len(rows)) for (layer, d), rows in ACTS.items())
        assert con.sql("select count(*) from activations where layer = 12").fetchall() == [(1,)]
        pos = con.sql("select dataset, sum(is_positive::int), count(*), any_value(role) from samples "
                      "group by all order by all").fetchall()
        assert pos == [("ood_b", 3, 3, "ood"), ("train_a", 1, 2, "train")]
        assert con.sql("select layer, feature_id, selectivity from feature_stats order by feature_id").fetchall() == [
            (1, 5, 0.25), (1, 9, -1.0)]
        # a plain client may read, not write: the catalog file is opened read-only
        with pytest.raises(duckdb.Error):
            con.execute("create table t as select 1")
    finally:
        con.close()


def test_catalog_rebuild_sees_new_partitions(lake: Lake) -> None:
    build_catalog(lake)
    lake.write("activations", _acts([(0, 1, 1.0)] * 4), layer=3, dataset="ood_b")
    # views read the files at query time: the existing catalog already sees the new partition
    with duckdb.connect(str(lake.catalog_path), read_only=True) as con:
        assert con.sql("select count(*) from activations").fetchall() == [(N_ACTS + 4,)]
    lake.write("stats/selected_features", pa.table({"feature_id": [5]}), layer=1)
    _, names = build_catalog(lake)
    assert "selected_features" in names


def test_numeric_looking_dataset_slug_stays_a_string(tmp_path: Path) -> None:
    """hive autocast would read dataset=2024 as a number; the registry's slugs are strings."""
    lk = Lake(str(tmp_path / "lake"))
    lk.write("samples", _samples("train_a"), dataset="2024")
    lk.write("activations", _acts(ACTS[(1, "train_a")]), layer=1, dataset="2024")
    lk.write("stats/activation_profile", pa.table({"n": [1]}), layer=1, dataset="2025")
    con = views_connection(lk)
    assert _types(con, "samples")["dataset"] == "VARCHAR"
    assert _types(con, "activations")["dataset"] == "VARCHAR"
    assert _types(con, "activation_profile")["dataset"] == "VARCHAR"
    assert con.sql("select distinct dataset from activations").fetchall() == [("2024",)]


def test_query_answers(lake: Lake) -> None:
    rel = query(lake, "select dataset, count(*) as n from activations where layer = 1 group by all order by 1")
    assert rel is not None and rel.fetchall() == [("ood_b", 2), ("train_a", 3)]
    assert query(lake, "explain select * from samples") is not None
    assert query(lake, "EXPLAIN ANALYZE select count(*) from samples") is not None
    assert query(lake, "with x as (select 1 as a) select a from x").fetchall() == [(1,)]


REFUSED = [
    "create table t as select 1",
    "create view v as select 1",
    "insert into samples values (1)",
    "update samples set text = 'x'",
    "delete from samples",
    "drop view samples",
    "alter view samples rename to s2",
    "attach 'other.duckdb' as o",
    "detach o",
    "install httpfs",
    "load httpfs",
    "set threads = 1",
    "reset threads",
    "pragma enable_profiling",
    "call pragma_version()",
    "checkpoint",
    "vacuum",
    "export database 'out'",
    "select 1; drop view samples",
    "select 1;\n-- looks harmless\ncreate table t as select 2",
    "begin transaction",
]


@pytest.mark.parametrize("sql", REFUSED)
def test_query_refuses_writes(lake: Lake, sql: str) -> None:
    with pytest.raises(ReadOnlyError):
        query(lake, sql)


@pytest.mark.parametrize("template", [
    "copy (select * from samples) to '{out}'",
    "copy samples to '{out}' (format parquet)",
    "select 1; copy (select 1) to '{out}'",
    "explain analyze copy (select * from samples) to '{out}'",
    "explain (analyze) copy (select 1) to '{out}'",
    "/* hidden */ EXPLAIN -- note\n ANALYZE copy (select 1) to '{out}'",
])
def test_query_refuses_copy_and_writes_nothing(lake: Lake, tmp_path: Path, template: str) -> None:
    out = tmp_path / "out.csv"
    with pytest.raises(ReadOnlyError):
        rel = query(lake, template.format(out=out))
        if rel is not None:
            rel.fetchall()
    assert not out.exists(), f"refused statement {template!r} still wrote {out}"


@pytest.mark.parametrize("sql", ["", "   ", "-- only a comment", "selec 1"])
def test_query_refuses_empty_or_unparsable(lake: Lake, sql: str) -> None:
    with pytest.raises(ReadOnlyError):
        query(lake, sql)


def test_temp_files_are_not_read_by_views(lake: Lake, tmp_path: Path) -> None:
    real = lake.file("activations", 1, "train_a")
    part = real.parent
    shutil.copy(real, part / ".tmp-0123abcd.parquet.inprogress")
    # a table folder with only a temp file gets no view at all
    orphan = lake.base / "tokens" / "dataset=train_a"
    orphan.mkdir(parents=True)
    shutil.copy(real, orphan / ".tmp-4567.parquet.inprogress")
    _, names = build_catalog(lake)
    assert "tokens" not in names
    assert query(lake, "select count(*) from activations").fetchall() == [(N_ACTS,)]
    with duckdb.connect(str(lake.catalog_path), read_only=True) as con:
        assert con.sql("select count(*) from activations").fetchall() == [(N_ACTS,)]
    assert duckdb.sql(f"select count(*) from read_parquet('{lake.glob('activations')}')").fetchall() == [(N_ACTS,)]


def test_skipped_folders_get_no_view(lake: Lake) -> None:
    (lake.base / "sae" / "layer=1").mkdir(parents=True)
    shutil.copy(lake.file("activations", 1, "train_a"), lake.base / "sae" / "layer=1" / "x.parquet")
    _, names = build_catalog(lake)
    assert "sae" not in names


def test_empty_lake_builds_an_empty_catalog(tmp_path: Path) -> None:
    path, names = build_catalog(Lake(str(tmp_path / "lake")))
    assert names == [] and path.is_file()


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def cli_env(lake: Lake, monkeypatch: pytest.MonkeyPatch) -> Lake:
    monkeypatch.setenv("FEATURELAKE_LAKE", lake.root)
    monkeypatch.delenv("FEATURELAKE_PROFILE", raising=False)  # profile `default` -> namespace `default`
    return lake


def test_cli_sql_json(cli_env: Lake, capsys: pytest.CaptureFixture[str]) -> None:
    from dagster_project.cli import main

    assert main(["sql", "select count(*) as n from activations", "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == [{"n": N_ACTS}], out
    assert main(["sql", "select dataset, layer, count(*) as n from activations group by all order by all",
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"dataset": d, "layer": layer, "n": len(r)} for (layer, d), r in sorted(
        ACTS.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def test_cli_sql_csv_and_table(cli_env: Lake, capsys: pytest.CaptureFixture[str]) -> None:
    from dagster_project.cli import main

    assert main(["sql", "select dataset, count(*) as n from samples group by all order by 1", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows == [{"dataset": "ood_b", "n": "3"}, {"dataset": "train_a", "n": "2"}]
    assert main(["sql", "select 42 as answer"]) == 0
    assert "answer" in capsys.readouterr().out


def test_cli_sql_refused_and_failing(cli_env: Lake, capsys: pytest.CaptureFixture[str]) -> None:
    from dagster_project.cli import main

    assert main(["sql", "drop view activations"]) == 2
    err = capsys.readouterr()
    assert "read-only" in err.err and "DROP" in err.err and err.out == ""
    assert main(["sql", "select * from no_such_view"]) == 1
    err = capsys.readouterr()
    assert "no_such_view" in err.err and err.out == ""
    assert main(["sql", "select count(*) as n from activations", "--format", "json"]) == 0, "views must survive"


NESTED = "select [1, 2] as x, {'a': 1} as y"


def test_cli_sql_nested_values_in_csv(cli_env: Lake, capsys: pytest.CaptureFixture[str]) -> None:
    """Lists and structs become JSON text in their CSV cells (polars cannot write them as they are)."""
    from dagster_project.cli import main

    assert main(["sql", NESTED, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [{k: json.loads(v) for k, v in r.items()} for r in rows] == [{"x": [1, 2], "y": {"a": 1}}]
    assert main(["sql", "select map {'k': 2} as m, [{'b': [1.5]}] as z, interval 1 day as iv", "--format", "csv"]) == 0
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert json.loads(row["m"]) == {"k": 2} and json.loads(row["z"]) == [{"b": [1.5]}] and row["iv"] == "1 day"


def test_cli_sql_nested_values_in_json(cli_env: Lake, capsys: pytest.CaptureFixture[str]) -> None:
    """Nested values stay nested; decimals are numbers; repeated column names get suffixes, not dropped."""
    from dagster_project.cli import main

    assert main(["sql", NESTED, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"x": [1, 2], "y": {"a": 1}}]
    assert main(["sql", "select 1.5 as d, 2 as d, [{'b': [1.5]}] as z, null as n", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"d": 1.5, "d_1": 2, "z": [{"b": [1.5]}], "n": None}]


def test_cli_sql_nested_values_in_table(cli_env: Lake, capsys: pytest.CaptureFixture[str]) -> None:
    from dagster_project.cli import main

    assert main(["sql", NESTED]) == 0
    out = capsys.readouterr().out
    assert "[1,2]" in out and '{"a":1}' in out, out


def test_cli_sql_errors_are_one_line(cli_env: Lake, capsys: pytest.CaptureFixture[str]) -> None:
    """Syntax error, unknown view, refused statement, an error raised while the rows are fetched: one line
    on stderr naming the problem, nothing on stdout, a non-zero exit, no traceback."""
    from dagster_project.cli import main

    cases = [("selec 1", 2, "syntax error"), ("select * from no_such_view", 1, "no_such_view"),
             ("copy samples to 'x.csv'", 2, "read-only"), ("select error('boom at fetch') as x", 1, "boom at fetch")]
    for sql, rc, expect in cases:
        for fmt in ("table", "csv", "json"):
            assert main(["sql", sql, "--format", fmt]) == rc, (sql, fmt)
            got = capsys.readouterr()
            assert got.out == "" and expect in got.err, (sql, fmt, got)
            assert got.err.startswith("featurelake sql: ") and got.err.count("\n") == 1, got.err
            assert "Traceback" not in got.err and "LINE 1" not in got.err, got.err


def test_cli_sql_torn_and_corrupt_parquet_are_one_line(cli_env: Lake, capsys: pytest.CaptureFixture[str]) -> None:
    """A torn file (no footer) fails when the views are built; a file with garbage in its data pages only when
    the rows are read: both are one line naming the file."""
    from dagster_project.cli import main

    part = cli_env.file("activations", 1, "train_a")
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    assert main(["sql", "select count(*) from samples", "--format", "csv"]) == 1
    got = capsys.readouterr()
    assert str(part) in got.err and got.err.count("\n") == 1 and got.out == "", got

    footer = int.from_bytes(data[-8:-4], "little") + 8  # the footer and its length stay: the schema reads
    garbled = bytearray(data)
    garbled[4 : len(data) - footer] = b"\xff" * (len(data) - footer - 4)
    part.write_bytes(bytes(garbled))
    for fmt in ("table", "csv", "json"):
        assert main(["sql", "select sum(max_act) from activations", "--format", fmt]) == 1, fmt
        got = capsys.readouterr()
        assert got.out == "" and got.err.count("\n") == 1 and "Traceback" not in got.err, got
        assert f"{part} is not a readable Parquet file" in got.err, got.err  # found by reading the files


# ------------------------------------------------------------------------------------------ token residuals


def _write_token_residuals(lake: Lake, x: np.ndarray, layer: int = 1, dataset: str = "train_a") -> None:
    import torch

    from dagster_project.lib.extraction import float16_scaled, token_residual_schema

    q, scale = float16_scaled(torch.from_numpy(x))
    n, d = x.shape
    lake.write("token_residuals", pa.table(
        [pa.array(np.zeros(n, np.int32)), pa.array(np.arange(n, dtype=np.int32)),
         pa.FixedSizeListArray.from_arrays(pa.array(q.numpy().reshape(-1)), d), pa.array(scale.numpy())],
        schema=token_residual_schema(d)), layer=layer, dataset=dataset, meta={"model": "m"})


def test_token_residuals_view_reads_float16_with_the_scale_applied(lake: Lake) -> None:
    """DuckDB reads the Parquet Float16 column (as FLOAT[]); the view multiplies each row by its scale, so a
    value beyond float16's range reads back as itself, and leaves no scale column to apply twice."""
    from dagster_project.lib.lake import read_token_residuals

    x = np.array([[1.5, -2.25, 0.0], [70656.0, 3.0, -0.5], [1e-3, 200.0, -7.0]], np.float32)
    _write_token_residuals(lake, x)
    _, names = build_catalog(lake)
    assert "token_residuals" in names
    with duckdb.connect(str(lake.catalog_path), read_only=True) as con:
        types = _types(con, "token_residuals")
        assert types == {"sample_id": "INTEGER", "token_pos": "INTEGER", "resid": "FLOAT[]", "layer": "BIGINT",
                         "dataset": "VARCHAR"}, types
        rows = con.sql("select token_pos, resid from token_residuals order by token_pos").fetchall()
        got = np.array([r[1] for r in rows], np.float32)
        assert [r[0] for r in rows] == [0, 1, 2]
        np.testing.assert_allclose(got, x, rtol=2.0**-11)
        assert got[1, 0] == 70656.0
        np.testing.assert_array_equal(got, read_token_residuals(lake, 1, ["train_a"]).resid)
        # raw float16 Parquet reads as FLOAT too, without the view
        raw = con.sql(f"select resid, resid_scale from read_parquet('{lake.file('token_residuals', 1, 'train_a')}') "
                      "order by token_pos").fetchall()
        assert raw[1][1] == 2.0 and raw[1][0][0] == 35328.0 and raw[0][1] == 1.0


def test_cli_sql_reads_token_residuals(cli_env: Lake, capsys: pytest.CaptureFixture[str]) -> None:
    from dagster_project.cli import main

    _write_token_residuals(cli_env, np.array([[0.5, -1.0], [70656.0, 2.0]], np.float32))
    q = "select token_pos, resid, len(resid) as d from token_residuals where layer = 1 order by token_pos"
    assert main(["sql", q, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"token_pos": 0, "resid": [0.5, -1.0], "d": 2},
                                                   {"token_pos": 1, "resid": [70656.0, 2.0], "d": 2}]
    assert main(["sql", q, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert json.loads(rows[1]["resid"]) == [70656.0, 2.0]
