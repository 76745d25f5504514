"""Compare two lakes table by table: the check that a refactor left the pipeline's outputs unchanged.

    python benchmarks/compare_lakes.py LAKE_A LAKE_B [--ignore-column train_seconds ...]

Every folder holding Parquet (a table, or one of its hive partitions' parents) is read in both lakes with
DuckDB, hive columns included, and compared as multisets of rows (``EXCEPT ALL`` both ways), so file
names and row order do not matter but every value does. Two things are allowed to differ: each lake's own
root in a string (saved probes' paths), and doubles beyond ``--digits`` decimals (10), because DuckDB's
parallel sums add in no fixed order (two runs of one commit differ by ~1e-14 in `selected_transfer` and
`selectivity_rank_correlation`). Columns that measure time are left out (``--ignore-column`` adds more).
Prints one row a table and exits 1 if any table differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import duckdb
import numpy as np

TIMING_COLUMNS = ("train_seconds", "seconds", "wall_seconds", "elapsed_s", "duration_s", "created_at",
                  "written_at", "run_id")


def tables(root: Path) -> set[str]:
    """Table folders under ``root``: the part of each Parquet file's path above its hive ``k=v`` folders."""
    out = set()
    for f in root.rglob("*.parquet"):
        parts = f.relative_to(root).parent.parts
        keep = []
        for p in parts:
            if "=" in p:
                break
            keep.append(p)
        out.add("/".join(keep))
    return out


def compare(a: Path, b: Path, name: str, ignore: set[str], con: duckdb.DuckDBPyConnection,
            digits: int = 10) -> tuple[str, str]:
    def rel(root: Path) -> str:
        glob = str(root / name / "**" / "*.parquet")
        return f"read_parquet('{glob}', hive_partitioning = true, union_by_name = true)"

    types = {r[0]: r[1] for r in con.execute(f"describe select * from {rel(a)}").fetchall()}
    cols_a = list(types)
    cols_b = [r[0] for r in con.execute(f"describe select * from {rel(b)}").fetchall()]
    if cols_a != cols_b:
        return "DIFFERS", f"columns {cols_a} != {cols_b}"
    cols = [c for c in cols_a if c not in ignore]

    def sel(root: Path) -> str:
        def one(c: str) -> str:
            if types[c] in ("DOUBLE", "FLOAT"):
                return f'round("{c}", {digits}) as "{c}"'
            if types[c] == "VARCHAR":
                return f"replace(\"{c}\", '{root.resolve()}', '<lake>') as \"{c}\""
            return f'"{c}"'

        return ", ".join(one(c) for c in cols)

    def count(q: str) -> int:
        row = con.execute(q).fetchone()
        assert row is not None
        return int(row[0])

    n_a = count(f"select count(*) from {rel(a)}")
    n_b = count(f"select count(*) from {rel(b)}")
    only_a = count(f"select count(*) from (select {sel(a)} from {rel(a)} except all select {sel(b)} from {rel(b)})")
    only_b = count(f"select count(*) from (select {sel(b)} from {rel(b)} except all select {sel(a)} from {rel(a)})")
    left = sorted(set(cols_a) - set(cols))
    note = f"{n_a} rows" + (f", ignoring {left}" if left else "")
    if n_a != n_b or only_a or only_b:
        return "DIFFERS", f"{n_a} vs {n_b} rows; {only_a} only in A, {only_b} only in B"
    return "same", note


def _json_without_timing(path: Path, root: Path, ignore: set[str]) -> object:
    def strip(v: object) -> object:
        if isinstance(v, str):
            return v.replace(str(root.resolve()), "<lake>")
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in ignore}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(json.loads(path.read_text()))


def compare_files(a: Path, b: Path, ignore: set[str]) -> list[str]:
    """Saved probes and configs (``*.json``, ``*.npz``) outside the LLM cache: the files that differ."""
    def files(root: Path) -> set[str]:
        return {str(f.relative_to(root)) for f in root.rglob("*") if f.suffix in (".json", ".npz")
                and "llm_cache" not in f.parts}

    fa, fb = files(a), files(b)
    bad = sorted(f"{f} (only in {'A' if f in fa else 'B'})" for f in fa ^ fb)
    for f in sorted(fa & fb):
        if f.endswith(".json"):
            same = _json_without_timing(a / f, a, ignore) == _json_without_timing(b / f, b, ignore)
        else:
            with np.load(a / f) as x, np.load(b / f) as y:
                same = x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)
        if not same:
            bad.append(f)
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--ignore-column", action="append", default=[])
    args = ap.parse_args(argv)
    ignore = set(TIMING_COLUMNS) | set(args.ignore_column)
    ta, tb = tables(args.a), tables(args.b)
    con = duckdb.connect()
    bad = 0
    print("| table | result | detail |\n|---|---|---|")
    for name in sorted(ta | tb):
        if name not in ta or name not in tb:
            result, detail = "DIFFERS", f"only in {'A' if name in ta else 'B'}"
        else:
            result, detail = compare(args.a, args.b, name, ignore, con)
        bad += result != "same"
        print(f"| {name} | {result} | {detail} |")
    print(f"\n{len(ta | tb)} tables, {bad} differ")
    files = compare_files(args.a, args.b, ignore)
    print(f"saved files (json, npz) that differ: {len(files)}")
    for f in files:
        print(f"  {f}")
    return 1 if bad or files else 0


if __name__ == "__main__":
    sys.exit(main())
