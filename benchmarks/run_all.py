"""`make bench`: the CPU benchmark of every stage, then one summary table.

Runs, each in its own process: extraction (project vs the seed's method), statistics (DuckDB vs numpy with
load, at the seed's scale), describe (local Anthropic-protocol server: sequential vs concurrent vs batches),
and the end-to-end `featurelake demo` on the default profile in a fresh lake and Dagster home (the converted
model in the cache is reused), with its wall time and peak RSS. Each benchmark's own table goes to
``benchmarks/out/<name>.md``; the summary is printed and written to ``benchmarks/out/summary.md``. Copy what
matters into BENCHMARKS.md with the machine and date.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"


def run(name: str, cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float]:
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    dt = time.time() - t
    (OUT / f"{name}.md").write_text(proc.stdout)
    (OUT / f"{name}.log").write_text(proc.stderr)
    if proc.returncode:
        raise SystemExit(f"benchmark {name} failed ({proc.returncode}); see {OUT / (name + '.log')}")
    return proc.stdout, dt


def table_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("|") and not re.match(r"^\|[-: |]+\|$", line)]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    summary: list[tuple[str, str, str]] = []

    md, _ = run("extract", [py, "benchmarks/extract.py", "--sizes", "110"])
    rows = {r[0]: r for r in table_rows(md)[1:]}
    summary.append(("extract (270M, layer 9, 110 texts)", f"{rows['project'][3]} tok/s vs seed {rows['seed'][3]}",
                    f"{rows['project'][4]} the seed's; pooled storage {rows['project'][7]}"))

    md, _ = run("stats", [py, "benchmarks/stats.py", "--samples", "2689", "--repeats", "3"])
    row = next((r for r in table_rows(md) if r[0] == "2,689"), None)
    summary.append(("stats (2,689 x 16,384, ~3,700 active)",
                    f"DuckDB {row[4]} s, {row[5]} MiB" if row else "see benchmarks/out/stats.md",
                    f"numpy with load {row[6]} s, {row[7]} MiB" if row else ""))

    md, _ = run("describe", [py, "benchmarks/describe.py", "--latency", "3", "--sequential", "5", "--features", "256"])
    rows = table_rows(md)
    conc = next((r for r in rows if r[0] == "concurrent"), None)
    summary.append(("describe (local server, 3 s latency)",
                    f"{conc[4]} features/min at concurrency {conc[2]}" if conc else "see describe.md",
                    f"{conc[5]} the sequential rate" if conc else ""))

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FEATURELAKE_LAKE": f"{tmp}/lake", "DAGSTER_HOME": f"{tmp}/dagster_home"}
        env.pop("FEATURELAKE_PROFILE", None)
        env.pop("FEATURELAKE_DATASETS", None)
        _, dt = run("demo", ["/usr/bin/time", "-v", str(ROOT / ".venv" / "bin" / "featurelake"), "demo"], env)
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", (OUT / "demo.log").read_text())
        peak = int(m.group(1)) / 1024 if m else float("nan")
    summary.append(("end-to-end `featurelake demo` (default profile)", f"{dt / 60:.1f} min wall",
                    f"peak RSS {peak:,.0f} MiB"))

    head = (f"{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}, "
            f"commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}")
    lines = [f"# make bench: {head}", "", "| stage | result | compared with |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary]
    text = "\n".join(lines) + "\n"
    (OUT / "summary.md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
