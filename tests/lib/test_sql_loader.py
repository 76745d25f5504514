"""The SQL file loader (dagster_project/lib/sql.py): placeholders, $params, and what it refuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from dagster_project.lib import sql
from dagster_project.lib.sql import SQLError, bind, load_sql, relation, render, run

FILES = {
    "q/by_layer": "-- by_layer: rows of {{table}} at one layer.\n-- Params: $layer\n"
                  "select * from {{table}} where layer = $layer order by v",
    "q/glob": "-- glob: count the files' rows.\nselect count(*) as n from read_parquet({{acts_glob}})",
    "q/comments": "-- comments: $unused in a comment and a '$literal' string are not parameters.\n"
                  "select '$literal' as s, $x as x /* $also_unused */",
    "q/upper": "-- upper: DuckDB parameters ignore case.\nselect $Layer as v",
    "q/no_header": "select 1",
    "q/bad": "-- bad: does not parse.\nselec 1",
    "q/missing_ident": "-- missing: needs two identifiers.\nselect * from {{table}} join {{other}} using (v)",
}


@pytest.fixture
def sql_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name, text in FILES.items():
        path = tmp_path / "sql" / f"{name}.sql"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "outside.sql").write_text("-- outside sql/\nselect 'escaped' as s")
    monkeypatch.setattr(sql, "SQL_DIR", tmp_path / "sql")
    load_sql.cache_clear()
    yield tmp_path / "sql"
    load_sql.cache_clear()


@pytest.fixture
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    c = duckdb.connect()
    c.execute("create table t as select * from (values (1, 'a'), (2, 'b'), (1, 'c')) as x(layer, v)")
    yield c
    c.close()


def test_render_fills_identifiers_and_quotes_paths(sql_dir: Path) -> None:
    assert "select * from t where layer = $layer" in render("q/by_layer", {"table": "t"})
    text = render("q/glob", {"acts_glob": "/lake/default/activations/*/*/*.parquet"})
    assert "read_parquet('/lake/default/activations/*/*/*.parquet')" in text


@pytest.mark.parametrize("value", ["t; drop table t", "t--", "1t", "t.x", "t t", "", "t'"])
def test_render_refuses_unsafe_identifiers(sql_dir: Path, value: str) -> None:
    with pytest.raises(SQLError, match=r"unsafe identifier for \{\{table\}\} in sql/q/by_layer.sql"):
        render("q/by_layer", {"table": value})


@pytest.mark.parametrize("value", ["/lake/x') union select 1 --", "/la ke/*.parquet", "/lake/$x", "a;b", "",
                                   "/lake/\n/x"])
def test_render_refuses_unsafe_paths(sql_dir: Path, value: str) -> None:
    with pytest.raises(SQLError, match=r"unsafe path for \{\{acts_glob\}\} in sql/q/glob.sql"):
        render("q/glob", {"acts_glob": value})


def test_render_reports_missing_placeholder(sql_dir: Path) -> None:
    with pytest.raises(SQLError, match=r"sql/q/missing_ident.sql needs identifier \{\{other\}\} but it was not given"):
        render("q/missing_ident", {"table": "t"})


@pytest.mark.parametrize("name", ["../outside", "q/../../outside", "..", "q/.."])
def test_load_refuses_dotdot(sql_dir: Path, name: str) -> None:
    with pytest.raises(SQLError, match="may not contain '..'"):
        load_sql(name)


def test_load_refuses_absolute_name(sql_dir: Path) -> None:
    with pytest.raises(SQLError, match="must be a relative name"):
        load_sql(str(sql_dir.parent / "outside"))


def test_load_requires_existing_file_with_header(sql_dir: Path) -> None:
    with pytest.raises(SQLError, match="no SQL file .*q/absent.sql"):
        load_sql("q/absent")
    with pytest.raises(SQLError, match="q/no_header.sql must start with a header comment"):
        load_sql("q/no_header")


def test_bind_reports_missing_params(sql_dir: Path) -> None:
    with pytest.raises(SQLError, match=r"sql/q/by_layer.sql needs parameters \['layer'\]"):
        bind("q/by_layer", {"lyr": 1}, {"table": "t"})


def test_bind_ignores_params_in_comments_and_strings(sql_dir: Path, con: duckdb.DuckDBPyConnection) -> None:
    text, bound = bind("q/comments", {"x": 5, "unused": 1, "literal": 2, "also_unused": 3})
    assert bound == {"x": 5}
    assert con.execute(text, bound).fetchall() == [("$literal", 5)]
    assert run(con, "q/comments", {"x": 7}).fetchall() == [("$literal", 7)]


def test_bind_unparsable_file_names_it(sql_dir: Path) -> None:
    with pytest.raises(SQLError, match="sql/q/bad.sql does not parse"):
        bind("q/bad")


def test_run_binds_params(sql_dir: Path, con: duckdb.DuckDBPyConnection) -> None:
    assert run(con, "q/by_layer", {"layer": 1, "extra": "dropped"}, {"table": "t"}).fetchall() == [(1, "a"), (1, "c")]
    assert run(con, "q/by_layer", {"layer": 2}, {"table": "t"}).fetchall() == [(2, "b")]
    # a value that looks like SQL stays a value: it fails to convert to the column's type, matches nothing
    with pytest.raises(duckdb.ConversionException):
        run(con, "q/by_layer", {"layer": "1 or 1=1"}, {"table": "t"}).fetchall()
    assert relation(con, "q/by_layer", {"layer": 2}, {"table": "t"}).fetchall() == [(2, "b")]
    assert run(con, "q/upper", {"layer": 4}).fetchall() == [(4,)]


def test_run_glob_path(sql_dir: Path, tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    out = tmp_path / "lake" / "x.parquet"
    out.parent.mkdir()
    con.execute(f"copy (select * from t) to '{out}'")
    assert run(con, "q/glob", idents={"acts_glob": str(out.parent / "*.parquet")}).fetchall() == [(3,)]


VIEW_FILES = {
    "views/evens": "-- evens: the rows of t with an even v.\ncreate or replace temp view evens as select * from t where layer % 2 = 0",
    "views/by_layer": "-- by_layer: t at one layer.\n-- Uses : views/evens\n"
                "create or replace temp macro by_layer(at_layer) as table select * from t where layer = at_layer",
    "views/loop_a": "-- loop_a\n-- Uses : views/loop_b\ncreate or replace temp view loop_a as select 1",
    "views/loop_b": "-- loop_b\n-- Uses : views/loop_a\ncreate or replace temp view loop_b as select 1",
    "views/not_temp": "-- not_temp: a view file must only create temp objects.\ncreate view kept as select 1",
    "q/uses": "-- uses: two views.\n-- Uses   : views/by_layer, views/evens\n"
              "select (select count(*) from by_layer($layer)) as n_at, (select count(*) from evens) as n_evens",
    "q/loop": "-- loop\n-- Uses : views/loop_a\nselect 1",
    "q/not_views": "-- not views\n-- Uses : q/uses\nselect 1",
    "q/not_temp": "-- not temp\n-- Uses : views/not_temp\nselect 1",
}


@pytest.fixture
def views_dir(sql_dir: Path) -> Path:
    for name, text in VIEW_FILES.items():
        path = sql_dir / f"{name}.sql"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return sql_dir


def test_uses_lists_the_header_views(views_dir: Path) -> None:
    assert sql.uses("q/uses") == ["views/by_layer", "views/evens"]
    assert sql.uses("q/by_layer") == []
    # views a view is built on come first, each once
    assert sql.view_order("q/uses") == ["views/evens", "views/by_layer"]


def test_run_and_relation_install_the_views_first(views_dir: Path, con: duckdb.DuckDBPyConnection) -> None:
    assert run(con, "q/uses", {"layer": 1}).fetchall() == [(2, 1)]
    assert relation(con, "q/uses", {"layer": 2}).fetchall() == [(1, 1)]
    # temp objects: another connection (a cursor) gets its own, installed when it runs the statement
    cur = con.cursor()
    with pytest.raises(duckdb.CatalogException):
        cur.execute("select * from evens")
    cur.close()
    assert sql.install_views(con, "q/uses") == ["views/evens", "views/by_layer"]


def test_views_refuse_cycles_other_files_and_non_temp_statements(
    views_dir: Path, con: duckdb.DuckDBPyConnection
) -> None:
    with pytest.raises(SQLError, match="uses itself: views/loop_a -> views/loop_b -> views/loop_a"):
        run(con, "q/loop")
    with pytest.raises(SQLError, match="names files under views/ only, not q/uses"):
        run(con, "q/not_views")
    with pytest.raises(SQLError, match="views/not_temp.sql must hold one 'create or replace temp view'"):
        run(con, "q/not_temp")
    assert "kept" not in {r[0] for r in con.execute("select view_name from duckdb_views()").fetchall()}
