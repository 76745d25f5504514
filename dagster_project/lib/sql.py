"""Load SQL statements from ``sql/`` and run them with bound parameters.

Each file under ``sql/`` holds one statement with a header comment (inputs, output, grain).
Values are always bound as DuckDB ``$params``. The only things ever substituted into the text
are *identifiers* that DuckDB cannot bind (file globs, view names), written in the file as
``{{name}}`` and checked against an allow-list pattern before they are filled in.

Relations that several statements share are written once under ``sql/views/``: each file creates one temp
view, or a temp table macro where the relation needs an argument such as the layer. A statement names the
ones it selects from on a header line ``-- Uses   : views/class_sizes, views/layer_datasets`` (a view file
may name the views it is built on the same way), and :func:`run` / :func:`relation` create them on the
connection, the ones they are built on first, before running it (:func:`install_views`). Temp objects live
on that connection only, so a cursor or a read-only catalog connection gets its own.
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
_USES = re.compile(r"^--\s*Uses\s*:(.*)$")
_VIEW_STATEMENT = re.compile(r"^\s*create\s+or\s+replace\s+temp(orary)?\s+(view|macro)\s", re.IGNORECASE)
VIEWS = "views/"


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


def _header(text: str) -> list[str]:
    """The leading comment lines of a file's text."""
    lines = []
    for line in text.splitlines():
        if not line.lstrip().startswith("--"):
            break
        lines.append(line.strip())
    return lines


def uses(name: str) -> list[str]:
    """The ``views/`` files ``sql/<name>.sql`` names on its ``-- Uses :`` header lines, in order."""
    header = _header(load_sql(name))
    found = [v.strip() for line in header if (m := _USES.match(line)) for v in m.group(1).split(",")]
    views = [v for v in found if v]
    wrong = [v for v in views if not v.startswith(VIEWS)]
    if wrong:
        raise SQLError(f"sql/{name}.sql: a Uses line names files under {VIEWS} only, not {', '.join(wrong)}")
    return views


def view_order(name: str) -> list[str]:
    """Every view ``sql/<name>.sql`` needs, directly or through other views, each once and after the views it
    is built on; refuses a view that needs itself."""
    order: list[str] = []

    def visit(view: str, path: tuple[str, ...]) -> None:
        if view in path:
            raise SQLError(f"sql/{view}.sql uses itself: {' -> '.join((*path[path.index(view):], view))}")
        if view in order:
            return
        for dep in uses(view):
            visit(dep, (*path, view))
        order.append(view)

    for view in uses(name):
        visit(view, (name,))
    return order


def install_views(con: duckdb.DuckDBPyConnection, name: str) -> list[str]:
    """Create on ``con`` the temp views and macros ``sql/<name>.sql`` uses (:func:`view_order`); returns them.

    A view file holds one ``create or replace temp view`` / ``temp macro`` statement and takes no ``$params``
    (a macro takes arguments instead), so running it again replaces it with the same thing.
    """
    order = view_order(name)
    for view in order:
        con.execute(_view_statement(view, load_sql(view)))
    return order


@cache
def _view_statement(view: str, text: str) -> str:
    """``text`` of ``sql/<view>.sql`` checked once (it parses, takes no ``$params``, creates one temp view or
    macro): the check opens a DuckDB parser, which costs ~15 ms a view, and every statement run installs its
    views again. Keyed on the text too, so an edited file is checked anew."""
    bind(view)  # parses, and refuses a $param
    if not _VIEW_STATEMENT.match("\n".join(text.splitlines()[len(_header(text)):])):
        raise SQLError(f"sql/{view}.sql must hold one 'create or replace temp view' or 'temp macro' statement")
    return text


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
    """Execute one SQL file with ``$params`` bound, after :func:`install_views`; returns the connection (``.fetchall()``, ``.df()``).

    For Arrow output use :func:`relation` (DuckDB 2 warns that Arrow from an ``execute`` result copies).
    """
    text, bound = bind(name, params, idents)
    install_views(con, name)
    return con.execute(text, bound)


def relation(
    con: duckdb.DuckDBPyConnection,
    name: str,
    params: dict[str, Any] | None = None,
    idents: dict[str, str] | None = None,
) -> duckdb.DuckDBPyRelation:
    """One SQL file (a query) as a relation with ``$params`` bound, after :func:`install_views`:
    ``.to_arrow_table()``, ``.pl()``."""
    text, bound = bind(name, params, idents)
    install_views(con, name)
    return con.sql(text, params=bound)
