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


# Partition columns get fixed types: hive autocast alone would turn a dataset slug such as "2024" into a number.
HIVE_TYPES = {"layer": "BIGINT", "dataset": "VARCHAR"}


def _hive_types(glob: str) -> str:
    table_dir = Path(glob).parent.parent  # <table>/**/*.parquet
    first = next(table_dir.rglob("*.parquet"), None)
    keys = [] if first is None else [p.split("=", 1)[0] for p in first.relative_to(table_dir).parts[:-1] if "=" in p]
    types = [f"'{k}': {HIVE_TYPES[k]}" for k in keys if k in HIVE_TYPES]
    return f", hive_types = {{{', '.join(types)}}}" if types else ""


def create_views(con: duckdb.DuckDBPyConnection, lake: Lake) -> list[str]:
    names = []
    for name, glob in table_globs(lake).items():
        path = glob.replace("'", "''")
        con.execute(
            f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM "
            f"read_parquet('{path}', hive_partitioning = true, union_by_name = true{_hive_types(glob)})"
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
        if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: EXPLAIN ANALYZE COPY ... TO writes a file
            check_read_only(con, _explained(st.query))


def _explained(text: str) -> str:
    """The statement an ``EXPLAIN [ANALYZE | (options)]`` statement wraps."""
    every = duckdb.tokenize(text)
    ends = [pos for pos, _ in every[1:]] + [len(text)]
    spans = [(a, b) for (a, kind), b in zip(every, ends, strict=True) if kind != duckdb.token_type.comment]
    toks = [a for a, _ in spans]
    words = [text[a:b].strip().lower() for a, b in spans]
    i = 1  # words[0] is EXPLAIN
    if i < len(words) and words[i] in ("analyze", "analyse"):
        i += 1
    elif i < len(words) and words[i] == "(":
        depth = 0
        while i < len(words):
            depth += words[i].count("(") - words[i].count(")")
            i += 1
            if depth <= 0:
                break
    if i >= len(words):
        raise ReadOnlyError("EXPLAIN without a statement")
    return text[toks[i]:]


def query(lake: Lake, sql: str) -> duckdb.DuckDBPyRelation | None:
    """Run a read-only query against the lake's views. DDL, DML, COPY, ATTACH, SET ... are refused."""
    con = duckdb.connect()
    check_read_only(con, sql)
    create_views(con, lake)
    return con.sql(sql)
