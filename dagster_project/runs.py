"""Runs the ``featurelake`` command executes in process: which process runs them, and what to do when it dies.

A run executed in process (``featurelake demo`` / ``backfill``) that is killed (``kill -9``, OOM, a lost
machine) stays ``STARTED`` in the persistent instance for ever, and keeps the concurrency-pool slot of the
step it was in: with one ``model`` slot (``dagster.yaml``), every later model step would wait for it without
end, and Dagster's run monitoring does not watch in-process runs. So each run is tagged with the identity of
the process executing it (:func:`process_tags`), and before executing anything the command marks the runs
whose process is gone as failed and frees their slots (:func:`recover_orphaned_runs`). A process is
identified by host, pid and start time, so a recycled pid is not taken for the original process.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROCESS_TAG = "featurelake/process"


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces and ")"


def process_identity(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '?'}"


def process_tags() -> dict[str, str]:
    """Tags to put on every run this process executes in process."""
    return {PROCESS_TAG: process_identity()}


def _alive(identity: str) -> bool | None:
    """Whether the process of ``identity`` still runs; None when it ran on another host (cannot tell)."""
    host, _, rest = identity.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    now = _start_time(pid)
    return start == "?" or now is None or now == start


def recover_orphaned_runs(instance: Any) -> list[str]:
    """Mark the unfinished runs whose executing process is gone as failed and free their pool slots.

    Only runs tagged by :func:`process_tags` on this host are touched (runs launched from the UI or the
    daemon are Dagster's to monitor). Returns the run ids recovered.
    """
    import dagster as dg

    unfinished = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]
    recovered = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=unfinished)):
        identity = run.tags.get(PROCESS_TAG)
        if identity is None or _alive(identity) is not False:
            continue
        message = (f"the featurelake process that executed this run ({identity}) is gone (killed?); "
                   "marked failed and its concurrency slots freed. Rerun its partitions.")
        instance.report_run_failed(run, message)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log.warning("run %s: %s", run.run_id, message)
        recovered.append(run.run_id)
    return recovered
