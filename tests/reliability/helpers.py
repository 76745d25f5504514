"""Helpers shared by the reliability tests (``docs/RELIABILITY.md`` lists the promise each file checks)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
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


def kill_9_when(proc: subprocess.Popen[str], ready: Callable[[], bool], *, timeout_s: float, poll_s: float) -> None:
    """Wait until ``ready()`` (at most ``timeout_s``; the process must stay alive meanwhile), then ``kill -9``
    the process and reap it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(poll_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == KILLED


def materialize_layer(assets: Sequence[Any], root: Path | str, describer: Any, *, layer: int = 1,
                      instance: Any = None, raise_on_error: bool = True,
                      config: Mapping[str, Any] | None = None) -> Any:
    """``dg.materialize`` of ``assets`` at one layer partition, over the lake at ``root`` (namespace ``t``)
    with ``describer``, every asset's op given ``config``; in a fresh ephemeral instance unless one is given."""
    import dagster as dg

    from dagster_project.partitions import LAYER_PARTITIONS_NAME
    from dagster_project.resources import LakeResource

    if instance is None:
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, [str(layer)])
    return dg.materialize(
        assets, partition_key=str(layer), instance=instance, raise_on_error=raise_on_error,
        resources={"lake": LakeResource(root=str(root), namespace="t"), "describer": describer},
        run_config={"ops": {a.op.name: {"config": dict(config or {})} for a in assets}},
    )


def completed_calls(server: Any, tasks: Iterable[str]) -> Counter[str]:
    """A test server's calls answered normally, per prompt hash, of the given tasks only."""
    wanted = set(tasks)
    return Counter(e["prompt_hash"] for e in list(server.log)
                   if e["task"] in wanted and e["fault"] is None and e["status"] == 200)


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
