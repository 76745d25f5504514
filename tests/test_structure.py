"""The layering the tools hold (issue 16): module sizes, no import circle, lib/ free of Dagster.

Ruff's banned-api rule (dagster_project/lib/ruff.toml) also holds the last one at lint time; this test
reads every import, including those inside functions, which ruff's rule reads too but a reviewer may miss.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dagster_project", "assets")
MAX_LINES = 700
# The demo corpus's template data is the one exception the issue names.
SIZE_EXEMPT = {"dagster_project/lib/demo_corpus.py"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import of ``name`` loads (a name inside a module resolves to the module)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, *, type_checking: bool = False) -> set[str]:
    """Project modules ``module`` imports anywhere in its body (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip: set[int] = set()
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for b in node.body for n in ast.walk(b))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for n in names:
            target = _resolve(n)
            if target and target != module:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_parents(module: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first: edges a circle can go through."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))} & MODULES.keys()


def test_no_import_circle_among_project_modules() -> None:
    graph = {m: _imports(m, p) for m, p in MODULES.items()}
    # A package's __init__ is not an edge to its own submodules' importers; it is part of what they import.
    for m in list(graph):
        graph[m] |= {p for t in graph[m] for p in _package_parents(t) if not m.startswith(p + ".")}
    assert _cycles(graph) == [], "modules that import each other (directly or round a circle)"


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _banned_in_lib() -> tuple[str, ...]:
    """The modules ruff's banned-api rule keeps out of ``lib/`` (one list: ``dagster_project/lib/ruff.toml``)."""
    config = tomllib.loads((ROOT / "dagster_project" / "lib" / "ruff.toml").read_text())
    return tuple(config["lint"]["flake8-tidy-imports"]["banned-api"])


def test_the_banned_list_names_dagster_the_cli_and_the_tests() -> None:
    assert {"dagster", "dagster_project.cli", "tests", "assets"} <= set(_banned_in_lib())


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("dagster_project.lib")))
def test_lib_imports_no_dagster_cli_or_tests(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    banned = _banned_in_lib()
    bad = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        bad += [n for n in names if any(n == b or n.startswith(b + ".") for b in banned)]
    assert bad == [], f"{module} is library code and imports {bad}"


def test_no_module_over_the_size_limit() -> None:
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for m, p in MODULES.items()
        if m.startswith("dagster_project")
    }
    over = {f: n for f, n in sizes.items() if n > MAX_LINES and f not in SIZE_EXEMPT}
    assert over == {}, f"modules of dagster_project/ over {MAX_LINES} lines (split them along their seams)"
