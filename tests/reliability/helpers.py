"""Helpers shared by the reliability tests (``docs/RELIABILITY.md`` lists the promise each file checks)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
KILLED = -signal.SIGKILL


def featurelake_sql(query: str) -> list[dict[str, Any]]:
    """``featurelake sql QUERY --format json`` (the command's own code, in process), as rows."""
    from dagster_project.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["sql", query, "--format", "json"])
    assert rc == 0, f"featurelake sql {query!r} failed ({rc})"
    return json.loads(buf.getvalue() or "[]")


def run_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300,
               wait: bool = True) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """``python -c code args`` in the repository root, with this process's environment (plus ``env``)."""
    argv = [sys.executable, "-c", code, *args]
    full_env = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(argv, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def dataset_partition_names(n: int) -> list[str]:
    """``n`` keys of the ``dataset`` partitions as this process built them.

    The dataset partitions are static, read from the registry when ``dagster_project.partitions`` is first
    imported; an in-process ``materialize`` only accepts those keys. Tests that run dataset-partitioned
    assets in process name their own datasets after them (in a registry of their own).
    """
    from dagster_project.partitions import dataset_partitions

    keys = sorted(dataset_partitions.get_partition_keys())
    assert len(keys) >= n, keys
    return keys[:n]


def failure_message(result: Any) -> str:
    """The error message of the failed step of an ``ExecuteInProcessResult`` (its cause chain included)."""
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures, "expected a failed step"
    err = failures[0].step_failure_data.error
    parts = []
    while err is not None:
        parts.append(err.message)
        err = err.cause
    return "\n".join(parts)
