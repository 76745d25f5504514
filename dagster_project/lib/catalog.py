"""DuckDB over the lake: a views-only catalog file and read-only ad-hoc queries.

Every table folder of the lake becomes a view of the same name, read straight from its Parquet files with
hive partitioning (``layer`` an integer, ``dataset`` a string). Statistic tables live under ``stats/`` and
get views named for their folder (``feature_stats``, ``activation_profile``, ...).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import duckdb

from dagster_project.lib.lake import Lake

SKIP = {"sae", "probes_saved", "llm_cache", "report"}
_TABLE = re.compile(r"^[a-z][a-z0-9_]*$")


class ReadOnlyError(PermissionError):
    """A query tried to create, modify or delete something."""


def table_globs(lake: Lake) -> dict[str, str]:
    """``{view name: parquet glob}`` for every table folder that holds at least one Parquet file."""
    out: dict[str, str] = {}
    base = lake.base
    if not base.is_dir():
        return out
    dirs = [p for p in base.iterdir() if p.is_dir() and p.name not in SKIP and not p.name.startswith(".")]
    stats = base / "stats"
    if stats.is_dir():
        dirs = [p for p in dirs if p != stats] + [p for p in stats.iterdir() if p.is_dir()]
    for d in sorted(dirs):
        if _TABLE.match(d.name) and next(d.rglob("*.parquet"), None) is not None:
            out[d.name] = str(d / "**" / "*.parquet")
    return out


def create_views(con: duckdb.DuckDBPyConnection, lake: Lake) -> list[str]:
    names = []
    for name, glob in table_globs(lake).items():
        path = glob.replace("'", "''")
        con.execute(
            f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM "
            f"read_parquet('{path}', hive_partitioning = true, union_by_name = true)"
        )
        names.append(name)
    return names


def views_connection(lake: Lake) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per lake table (what assets run their SQL on)."""
    con = duckdb.connect()
    create_views(con, lake)
    return con


def build_catalog(lake: Lake) -> tuple[Path, list[str]]:
    """(Re)build ``lake.duckdb``, a views-only catalog any DuckDB client can open. Written aside, then renamed."""
    lake.base.mkdir(parents=True, exist_ok=True)
    tmp = lake.base / f".tmp-{uuid.uuid4().hex}.duckdb"
    con = duckdb.connect(str(tmp))
    try:
        names = create_views(con, lake)
    finally:
        con.close()
    os.replace(tmp, lake.catalog_path)
    Path(str(tmp) + ".wal").unlink(missing_ok=True)
    return lake.catalog_path, names


ALLOWED = {"SELECT", "EXPLAIN"}


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise ReadOnlyError(f"could not parse the query: {e}") from e
    if not statements:
        raise ReadOnlyError("empty query")
    for st in statements:
        kind = str(st.type).split(".")[-1].upper()
        if kind not in ALLOWED:
            raise ReadOnlyError(
                f"featurelake sql is read-only: {kind} statements are refused (only SELECT / EXPLAIN run)"
            )


def query(lake: Lake, sql: str) -> duckdb.DuckDBPyRelation | None:
    """Run a read-only query against the lake's views. DDL, DML, COPY, ATTACH, SET ... are refused."""
    con = duckdb.connect()
    check_read_only(con, sql)
    create_views(con, lake)
    return con.sql(sql)
