"""DuckDB over the lake: a views-only catalog file and read-only ad-hoc queries.

Every table folder of the lake becomes a view of the same name, read straight from its Parquet files with
hive partitioning (``layer`` an integer, ``dataset`` a string). Statistic tables live under ``stats/`` and
get views named for their folder (``feature_stats``, ``activation_profile``, the describe stage's
``descriptions``, ``description_candidates`` and ``explanation_scores``, ...). A table stored in a
coded form is shown decoded (``VIEW_SELECT``: ``token_residuals``' float16 vectors times their scale).

A remote lake (``s3://...``) is read through its fsspec filesystem registered on the DuckDB connection
(:func:`connect`), so no DuckDB extension has to be downloaded.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import uuid
from pathlib import Path

import duckdb
from upath import UPath

from dagster_project.lib.lake import Lake, LakeError, LakePath

SKIP = {"sae", "probes_saved", "llm_cache", "report"}
_TABLE = re.compile(r"^[a-z][a-z0-9_]*$")


class ReadOnlyError(PermissionError):
    """A query tried to create, modify or delete something."""


def table_globs(lake: Lake) -> dict[str, str]:
    """``{view name: parquet glob}`` for every table folder that holds at least one Parquet file."""
    return {name: glob for name, (glob, _) in _tables(lake).items()}


# Partition columns get fixed types: hive autocast alone would turn a dataset slug such as "2024" into a number.
HIVE_TYPES = {"layer": "BIGINT", "dataset": "VARCHAR"}

# Views that show a table's stored form decoded: ``token_residuals`` stores float16 vectors and a power-of-two
# scale per row (float16 alone overflows on Gemma's largest residual values; ``lib/extraction/pooling.py``,
# ``float16_scaled``); its view gives the vectors as FLOAT[] with the scale applied, and no scale column
# that a query could apply twice.
VIEW_SELECT = {"token_residuals": "* EXCLUDE (resid_scale) REPLACE ([x * resid_scale for x in resid] AS resid)"}


def _tables(lake: Lake) -> dict[str, tuple[str, list[str]]]:
    """``{view name: (parquet glob, hive keys of its first file)}``, read from a local or a remote lake."""
    return _remote_tables(lake) if isinstance(lake.base, UPath) else _local_tables(lake.base)


def _local_tables(base: Path) -> dict[str, tuple[str, list[str]]]:
    out: dict[str, tuple[str, list[str]]] = {}
    if not base.is_dir():
        return out
    dirs = [p for p in base.iterdir() if p.is_dir() and p.name not in SKIP and not p.name.startswith(".")]
    stats = base / "stats"
    if stats.is_dir():
        dirs = [p for p in dirs if p != stats] + [p for p in stats.iterdir() if p.is_dir()]
    for d in sorted(dirs):
        first = next(d.rglob("*.parquet"), None) if _TABLE.match(d.name) else None
        if first is not None:
            keys = [p.split("=", 1)[0] for p in first.relative_to(d).parts[:-1] if "=" in p]
            out[d.name] = (str(d / "**" / "*.parquet"), keys)
    return out


def _remote_tables(lake: Lake) -> dict[str, tuple[str, list[str]]]:
    """The same from one recursive listing of the namespace (objects only exist once complete)."""
    base = lake.base
    assert isinstance(base, UPath)
    root = base.path.rstrip("/")
    try:
        keys = lake.fs.find(root)
    except (FileNotFoundError, PermissionError) as e:
        raise LakeError(f"cannot list the lake {base}: {e}") from e
    found: dict[str, tuple[UPath, list[str]]] = {}
    for key in sorted(keys):
        parts = key[len(root) + 1 :].split("/")
        if not key.endswith(".parquet") or any(p.startswith(".") for p in parts) or parts[0] in SKIP:
            continue
        n = 2 if parts[0] == "stats" else 1
        if len(parts) <= n or not _TABLE.match(parts[n - 1]) or parts[n - 1] in found:
            continue
        found[parts[n - 1]] = (base.joinpath(*parts[:n]), [p.split("=", 1)[0] for p in parts[n:-1] if "=" in p])
    return {name: (str(d / "**" / "*.parquet"), keys) for name, (d, keys) in sorted(found.items())}


# Views that also take the rows of another table: the multi-layer ensemble's metrics (no layer partition:
# `layer` NULL, `layers` the layers it averages) sit in `probe_metrics` beside every layer's own.
FOLDED = {"probe_metrics": "probe_ensemble_metrics"}


def create_views(con: duckdb.DuckDBPyConnection, lake: Lake) -> list[str]:
    names = []
    tables = _tables(lake)

    def source(name: str, glob: str, keys: list[str]) -> str:
        path = glob.replace("'", "''")
        types = [f"'{k}': {HIVE_TYPES[k]}" for k in keys if k in HIVE_TYPES]
        hive_types = f", hive_types = {{{', '.join(types)}}}" if types else ""
        return (f"SELECT {VIEW_SELECT.get(name, '*')} FROM "
                f"read_parquet('{path}', hive_partitioning = true, union_by_name = true{hive_types})")

    for name, (glob, keys) in tables.items():
        sql = source(name, glob, keys)
        folded = FOLDED.get(name)
        if folded in tables:
            sql += f" UNION ALL BY NAME {source(folded, *tables[folded])}"
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
        names.append(name)
    return names


def connect(lake: Lake, database: str = ":memory:", read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that can read the lake: a remote lake's fsspec filesystem is registered on it
    (DuckDB's own httpfs extension is not needed)."""
    con = duckdb.connect(database, read_only=read_only)
    if lake.remote:
        con.register_filesystem(lake.fs)
    return con


def views_connection(lake: Lake) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per lake table (what assets run their SQL on)."""
    con = connect(lake)
    create_views(con, lake)
    return con


def read_only_connection(lake: Lake) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection with a view per lake table, as they are now (not the ``lake.duckdb``
    of the last catalog run, which may predate a table).

    The views are written to a database file of their own in a temp folder, which is then opened read-only:
    DuckDB refuses CREATE, DROP, INSERT, ATTACH ... on it. The folder is removed at once; the open
    connection keeps the file (POSIX). ``COPY ... TO`` a file is not a database write and DuckDB allows it
    (``featurelake sql`` refuses it: :func:`check_read_only`).
    """
    with tempfile.TemporaryDirectory(prefix="featurelake-views-", ignore_cleanup_errors=True) as tmpdir:
        path = str(Path(tmpdir) / "views.duckdb")
        con = connect(lake, path)
        try:
            create_views(con, lake)
        finally:
            con.close()
        return connect(lake, path, read_only=True)


def build_catalog(lake: Lake) -> tuple[LakePath, list[str]]:
    """(Re)build ``lake.duckdb``, a views-only catalog any DuckDB client can open. Written aside, then renamed.

    For a remote lake the file is built in a local temp folder and uploaded whole (one object). Its views
    read ``s3://...`` globs, so a client that opens it needs a filesystem for them: register the lake's
    fsspec filesystem (``con.register_filesystem(Lake(root).fs)``, as ``featurelake sql`` does) or load
    DuckDB's httpfs extension.
    """
    if isinstance(lake.catalog_path, UPath):
        with tempfile.TemporaryDirectory(prefix="featurelake-catalog-") as tmpdir:
            local = Path(tmpdir) / "lake.duckdb"
            con = connect(lake, str(local))
            try:
                names = create_views(con, lake)
            finally:
                con.close()
            lake.fs.put_file(str(local), lake.catalog_path.path)
        return lake.catalog_path, names
    lake.base.mkdir(parents=True, exist_ok=True)
    tmp = lake.base / f".tmp-{uuid.uuid4().hex}.duckdb"
    con = duckdb.connect(str(tmp))
    try:
        names = create_views(con, lake)
    finally:
        con.close()
    os.replace(str(tmp), str(lake.catalog_path))
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
    con = connect(lake)
    check_read_only(con, sql)
    create_views(con, lake)
    return con.sql(sql)


# Errors DuckDB raises when the bytes of a Parquet file are bad (a thrift or decompression failure) rather
# than the query: its message then names no file.
_DATA_ERROR = re.compile(r"parquet|thrift|zstd|snappy|decompress|don't know what type|corrupt|invalid page", re.I)


def is_data_error(e: BaseException) -> bool:
    """Whether ``e`` looks like a damaged file rather than a bad query (DuckDB names no file for these)."""
    if not isinstance(e, duckdb.Error) or ".parquet" in str(e):
        return False
    return type(e) in (duckdb.Error, duckdb.IOException, duckdb.InternalException) or bool(_DATA_ERROR.search(str(e)))


def find_damaged(lake: Lake, sql: str = "", budget_s: float = 20.0) -> tuple[str, str] | None:
    """``(path, error)`` of the first Parquet file of the lake that DuckDB cannot read in full, else ``None``.

    Looks at the tables the query names first (every table when it names none), reading each file whole;
    gives up after ``budget_s`` seconds (a large lake is not scanned to the end to explain one error).
    A remote lake is not scanned.
    """
    if lake.remote:
        return None
    tables = _tables(lake)
    words = set(re.findall(r"[a-z_][a-z0-9_]*", sql.lower()))
    named = [t for t in tables if t in words] or list(tables)
    deadline = time.monotonic() + budget_s
    con = duckdb.connect()
    try:
        for name in named:
            root = Path(tables[name][0]).parent.parent  # <folder>/**/*.parquet
            for f in sorted(root.rglob("*.parquet")):
                if any(p.startswith(".") for p in f.relative_to(root).parts):
                    continue
                if time.monotonic() > deadline:
                    return None
                try:
                    con.sql("select * from read_parquet($path)", params={"path": str(f)}).to_arrow_table()
                except duckdb.Error as e:
                    return str(f), str(e).strip()
    finally:
        con.close()
    return None
