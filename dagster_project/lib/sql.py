"""Load SQL statements from ``sql/`` and run them with bound parameters.

Each file under ``sql/`` holds one statement with a header comment (inputs, output, grain).
Values are always bound as DuckDB ``$params``. The only things ever substituted into the text
are *identifiers* that DuckDB cannot bind (file globs, view names), written in the file as
``{{name}}`` and checked against an allow-list pattern before they are filled in.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import duckdb

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"

_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")
# Identifiers we fill in: view/table names, or quoted paths/globs that come from the lake resource.
_SAFE_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./*=:+@~\-]+$")
_SQL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")


class SQLError(ValueError):
    """A SQL file is missing, malformed, or was given an unsafe identifier."""


@cache
def load_sql(name: str) -> str:
    """Return the text of ``sql/<name>.sql`` (``name`` like ``stats/feature_stats``)."""
    if ".." in Path(name).parts:
        raise SQLError(f"SQL name {name!r} may not contain '..'")
    if not _SQL_NAME.match(name):  # an absolute name would make SQL_DIR / name point outside sql/
        raise SQLError(f"SQL name {name!r} must be a relative name like 'stats/feature_stats'")
    path = SQL_DIR / f"{name}.sql"
    if not path.is_file():
        raise SQLError(f"no SQL file {path}")
    text = path.read_text()
    if not text.lstrip().startswith("--"):
        raise SQLError(f"{path} must start with a header comment (inputs, output, grain)")
    return text


def render(name: str, idents: dict[str, str] | None = None) -> str:
    """Fill ``{{ident}}`` placeholders of ``sql/<name>.sql`` from an allow-listed mapping.

    Values that look like paths must match a conservative path pattern and are emitted as
    single-quoted SQL string literals; other values must be plain identifiers.
    """
    idents = idents or {}
    text = load_sql(name)

    def fill(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in idents:
            raise SQLError(f"sql/{name}.sql needs identifier {{{{{key}}}}} but it was not given")
        value = str(idents[key])
        if key.endswith(("_path", "_glob")):
            if not _SAFE_PATH.match(value):
                raise SQLError(f"unsafe path for {{{{{key}}}}} in sql/{name}.sql: {value!r}")
            return "'" + value + "'"
        if not _SAFE_IDENT.match(value):
            raise SQLError(f"unsafe identifier for {{{{{key}}}}} in sql/{name}.sql: {value!r}")
        return value

    return _PLACEHOLDER.sub(fill, text)


def bind(
    name: str,
    params: dict[str, Any] | None = None,
    idents: dict[str, str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Render ``sql/<name>.sql`` and keep the ``$params`` it uses; error naming any that are missing."""
    text = render(name, idents)
    params = params or {}
    # Ask DuckDB's parser which $params the statement uses: a regex would also find them in comments and
    # string literals, and binding a parameter the statement does not use is an error in DuckDB.
    try:
        with duckdb.connect() as parser:
            statements = parser.extract_statements(text)
    except duckdb.Error as e:
        raise SQLError(f"sql/{name}.sql does not parse: {e}") from e
    used = {p.lower() for st in statements for p in st.named_parameters}  # DuckDB ignores their case
    missing = used - {k.lower() for k in params}
    if missing:
        raise SQLError(f"sql/{name}.sql needs parameters {sorted(missing)}")
    return text, {k: v for k, v in params.items() if k.lower() in used}


def run(
    con: duckdb.DuckDBPyConnection,
    name: str,
    params: dict[str, Any] | None = None,
    idents: dict[str, str] | None = None,
) -> duckdb.DuckDBPyConnection:
    """Execute one SQL file with ``$params`` bound; returns the connection (``.fetchall()``, ``.df()``).

    For Arrow output use :func:`relation` (DuckDB 2 warns that Arrow from an ``execute`` result copies).
    """
    text, bound = bind(name, params, idents)
    return con.execute(text, bound)


def relation(
    con: duckdb.DuckDBPyConnection,
    name: str,
    params: dict[str, Any] | None = None,
    idents: dict[str, str] | None = None,
) -> duckdb.DuckDBPyRelation:
    """One SQL file (a query) as a relation with ``$params`` bound: ``.to_arrow_table()``, ``.pl()``."""
    text, bound = bind(name, params, idents)
    return con.sql(text, params=bound)
