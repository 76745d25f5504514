"""The ``featurelake`` command: run the demo, query the lake, manage and backfill layers.

    featurelake demo                       materialize every asset for the active profile
    featurelake sql "select ..."           read-only SQL over the lake's views (--format table|csv|json)
    featurelake layers add 6 [12 ...]      register layers (dynamic partitions)
    featurelake layers list
    featurelake backfill --layer 6         activations for every dataset at that layer, then downstream
    featurelake ui [--port 3000]           the Dagster UI on 127.0.0.1
    featurelake score --probe ID FILE      score new texts with a saved probe

Runs are recorded in the persistent Dagster instance (``DAGSTER_HOME``, default ``.dagster_home/``), so
the UI shows what the CLI did.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dagster_project import console
from dagster_project.config import REPO_ROOT

log = logging.getLogger("featurelake")


DAGSTER_YAML_MARKER = "# written by featurelake (cli.ensure_dagster_home); delete this line to keep your own edits"
DAGSTER_YAML = DAGSTER_YAML_MARKER + """
telemetry:
  enabled: false
concurrency:
  pools:
    # Steps, not whole runs, wait for a pool slot, so the SQL and LLM steps of a run go on beside a
    # model step. A pool with no limit set in the UI or with `dagster instance concurrency set` gets
    # default_limit. The one pool is `model` (assets sae and activations): one model-running step at
    # a time holds the GPU/CPU. Steps without a pool are never limited (tests/test_ui.py).
    granularity: op
    default_limit: 1
python_logs:
  # What the project's loggers and Python warnings say during a run goes into the run's event log (the
  # UI), also when the CLI keeps it off the console (dagster_project/console.py). No python_log_level:
  # it would also filter Dagster's own DEBUG events out of the event log.
  managed_python_loggers: [""" + ", ".join(console.MANAGED_LOGGERS) + """]
run_monitoring:
  # With one `model` slot, a run that ended without giving its slot back (a killed worker) would block
  # every later model step: the daemon (`featurelake ui`) frees the slots of ended runs after a minute.
  enabled: true
  free_slots_after_run_end_seconds: 60
"""


def ensure_dagster_home() -> Path:
    """The persistent Dagster instance: ``$DAGSTER_HOME``, else the project's ``.dagster_home/``.

    Writes ``dagster.yaml`` when it is missing, and refreshes it while it still carries the marker
    line (a file a user edited and unmarked is left alone).
    """
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / ".dagster_home"))).resolve()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    yaml_path = home / "dagster.yaml"
    current = yaml_path.read_text() if yaml_path.exists() else None
    if current is None or (current.startswith(DAGSTER_YAML_MARKER) and current != DAGSTER_YAML):
        tmp = yaml_path.with_name(f".dagster.yaml.{os.getpid()}")
        tmp.write_text(DAGSTER_YAML)
        tmp.replace(yaml_path)  # another process (the UI, a CLI run) never reads half a file
    return home


def _instance():  # noqa: ANN202
    import dagster as dg

    ensure_dagster_home()
    return dg.DagsterInstance.get()


def _emit(text: str) -> None:
    sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))


# ------------------------------------------------------------------------------------------ pipeline


class StepFailed(RuntimeError):
    """A step of :func:`materialize_steps` failed; the message names the step, its run and the error."""


def materialize_steps(layers: Sequence[int] | None = None, datasets: Sequence[str] | None = None,
                      stages: Sequence[str] = ("corpus", "sae", "activations", "downstream"),
                      instance=None, lake_root: str | None = None, verbose: bool = True,  # noqa: ANN001
                      on_result: Callable[[str, Any], None] | None = None) -> list[str]:
    """Materialize the pipeline step by step in the persistent instance; returns the run ids.

    Each step is one run of a stage's job (``dagster_project/jobs.py``, :func:`~dagster_project.jobs.plan_steps`).
    Activations run one (dataset, all layers) run at a time, so several layers of one dataset share one
    forward pass. A progress bar over the steps goes to stderr; with ``verbose`` Dagster's event lines of
    each run go to the console too, otherwise only to the instance (``console.QUIET_RUN_CONFIG``).
    ``on_result(step name, result)`` is called after each run. A failed run raises :class:`StepFailed` (the
    steps after it do not run).
    """
    from tqdm import tqdm

    from dagster_project.config import load_profile
    from dagster_project.definitions import build_defs
    from dagster_project.jobs import plan_steps
    from dagster_project.lib.datasets import parse_registry
    from dagster_project.partitions import LAYER_PARTITIONS_NAME
    from dagster_project.runs import recover_orphaned_runs

    instance = instance or _instance()
    recover_orphaned_runs(instance)  # a killed earlier run must not hold the `model` slot for ever
    defs = build_defs(lake_root=lake_root)
    profile = load_profile()
    layers = list(layers or profile.layers)
    datasets = list(datasets or sorted(parse_registry()))
    instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, [str(x) for x in layers])
    steps = plan_steps(layers, datasets, instance.get_dynamic_partitions(LAYER_PARTITIONS_NAME), stages)
    jobs = {name: defs.resolve_job_def(name) for name in dict.fromkeys(s.job for s in steps)}
    run_ids = []
    with tqdm(steps, desc="featurelake", unit="step", file=sys.stderr, disable=False) as bar:
        for step in bar:
            if verbose:
                tqdm.write(f"-> {step.name}", file=sys.stderr)
            else:
                bar.set_postfix_str(step.name)
            with console.in_run():
                result = _execute(jobs[step.job], step.tags, instance, verbose)
            run_ids.append(result.run_id)
            if not result.success:
                raise StepFailed(f"{step.name} failed (run {result.run_id}): {console.failure_text(result)}")
            if on_result is not None:
                on_result(step.name, result)
    return run_ids


def _execute(job: Any, tags: dict[str, str], instance: Any, verbose: bool = True) -> Any:
    """One run of ``job`` in this process: a partition key, or a partition range in the tags."""
    from dagster_project.runs import process_tags

    partition_key = tags.get("dagster/partition")
    other = {**{k: v for k, v in tags.items() if k != "dagster/partition"}, **process_tags()}
    return job.execute_in_process(
        instance=instance, partition_key=partition_key, tags=other,
        run_config=None if verbose else console.QUIET_RUN_CONFIG, raise_on_error=False,
    )


def _print_stages(_name: str, result: Any) -> None:
    for line in console.stage_lines(result):
        console.write_line(line)


# ------------------------------------------------------------------------------------------ commands


def cmd_demo(args: argparse.Namespace) -> int:
    """Every asset of the active profile: a progress bar, one line per stage, then the summary."""
    from dagster_project.config import load_profile
    from dagster_project.lib.lake import Lake
    from dagster_project.resources import default_lake_root

    t0 = time.monotonic()
    profile = load_profile()
    layers = list(args.layer or profile.layers)
    try:
        run_ids = materialize_steps(layers=layers, verbose=args.verbose, on_result=_print_stages)
    except StepFailed as e:
        sys.stderr.write(f"featurelake demo: {e}\n  every event of the run: featurelake ui (Runs), or rerun with "
                         "--verbose\n")
        return 1
    lake = Lake(default_lake_root(), profile.name)
    for line in console.demo_summary(lake, layers, len(run_ids), time.monotonic() - t0):
        _emit(line)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    """Run one read-only query and print its rows; every failure is one line on stderr, never a traceback.

    Exit status: 0 answered, 1 the query or the lake failed (syntax, unknown view, unreadable Parquet,
    an error while the rows are fetched or formatted), 2 the statement was refused (not read-only).
    """
    from dagster_project.config import load_profile
    from dagster_project.lib.catalog import ReadOnlyError, find_damaged, is_data_error, query
    from dagster_project.lib.lake import Lake
    from dagster_project.resources import default_lake_root

    lake, query_text = None, ""
    try:
        query_text = args.query if args.query != "-" else sys.stdin.read()
        lake = Lake(default_lake_root(), load_profile().name)
        rel = query(lake, query_text)
        text = None if rel is None else format_relation(rel, args.format, args.max_rows)
    except ReadOnlyError as e:
        sys.stderr.write(f"featurelake sql: {one_line(e)}\n")
        return 2
    except Exception as e:  # duckdb, the lake, a profile: say it plainly, on one line
        msg = one_line(e)
        if lake is not None and is_data_error(e):  # DuckDB names no file when a file's pages are bad
            try:
                found = find_damaged(lake, query_text)
            except Exception:  # noqa: BLE001 - the search only explains the error; it must not replace it
                found = None
            msg = (f"{found[0]} is not a readable Parquet file ({one_line(Exception(found[1]))}); rerun the "
                   "partition that wrote it to rewrite it" if found else
                   f"{msg} (a Parquet file under {lake.base} may be damaged)")
        sys.stderr.write(f"featurelake sql: {msg}\n")
        return 1
    if text is not None:
        try:
            _emit(text)
            sys.stdout.flush()
        except BrokenPipeError:  # `featurelake sql ... | head`: the reader has gone, which is no error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


# DuckDB types polars cannot hold or CSV cannot write: nested ones become JSON text, the others their SQL text.
_NESTED = {"list", "struct", "map", "array", "union"}
_AS_TEXT = {"interval", "bit", "blob", "varint", "bignum"}


def format_relation(rel: Any, fmt: str, max_rows: int = 50) -> str:
    """A query's rows as ``csv`` (nested values as JSON text in their cells), ``json`` (a list of objects,
    nested values as JSON arrays / objects) or ``table`` (polars' table, nested values as JSON text)."""
    q = rel.query("q", "select * from q")  # duplicate column names get suffixes (a, a_1) here
    if fmt == "json":
        rows = [json.loads(r[0]) for r in q.query("q", "select to_json(q) from q").fetchall()]
        return json.dumps(rows, indent=1)
    cols = []
    for name, typ in zip(q.columns, q.types, strict=True):
        ident = '"' + name.replace('"', '""') + '"'
        kind = str(typ.id).lower()
        cols.append(f"to_json({ident})::varchar as {ident}" if kind in _NESTED else
                    f"cast({ident} as varchar) as {ident}" if kind in _AS_TEXT else ident)
    frame = q.query("q", f"select {', '.join(cols)} from q").pl() if cols else q.pl()
    if fmt == "csv":
        return frame.write_csv()
    import polars as pl

    with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
        return str(frame)


def one_line(e: BaseException) -> str:
    """An error as one line: DuckDB's multi-line messages joined, their ``LINE 1: ... ^^^`` pointer dropped."""
    lines = [x.strip() for x in str(e).splitlines()]
    kept = [x for x in lines if x and not x.startswith("LINE ") and set(x) - {"^", " "}]
    return " ".join(kept) or type(e).__name__


def cmd_layers(args: argparse.Namespace) -> int:
    from dagster_project.partitions import LAYER_PARTITIONS_NAME

    instance = _instance()
    if args.action == "add":
        if not args.layers:
            sys.stderr.write("featurelake layers add: give at least one layer number\n")
            return 2
        _check_layers(args.layers)
        instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, [str(x) for x in args.layers])
        _emit(f"layers registered: {sorted(int(x) for x in instance.get_dynamic_partitions(LAYER_PARTITIONS_NAME))}")
    elif args.action == "remove":
        for x in args.layers:
            instance.delete_dynamic_partition(LAYER_PARTITIONS_NAME, str(x))
        _emit(f"layers registered: {sorted(int(x) for x in instance.get_dynamic_partitions(LAYER_PARTITIONS_NAME))}")
    else:
        _emit(" ".join(str(x) for x in sorted(int(x) for x in instance.get_dynamic_partitions(LAYER_PARTITIONS_NAME))))
    return 0


def _check_layers(layers: Sequence[int]) -> None:
    bad = [x for x in layers if x < 0]
    if bad:
        raise SystemExit(f"featurelake: layers must be >= 0, got {bad}")


def cmd_backfill(args: argparse.Namespace) -> int:
    from dagster_project.partitions import LAYER_PARTITIONS_NAME

    instance = _instance()
    known = {int(x) for x in instance.get_dynamic_partitions(LAYER_PARTITIONS_NAME)}
    unknown = [x for x in args.layer if x not in known]
    if unknown:
        sys.stderr.write(f"featurelake backfill: unknown layer(s) {unknown}; add them first: "
                         f"featurelake layers add {' '.join(map(str, unknown))}\n")
        return 2
    from dagster_project.lib.datasets import parse_registry, registry_path

    specs = parse_registry()
    unknown_ds = [d for d in args.dataset or [] if d not in specs]
    if unknown_ds:
        sys.stderr.write(f"featurelake backfill: unknown dataset(s) {unknown_ds}; the registry {registry_path()} "
                         f"has {sorted(specs)}\n")
        return 2
    stages = ["sae", "activations", "downstream"]
    try:
        run_ids = materialize_steps(layers=args.layer, datasets=args.dataset or None, stages=stages,
                                    instance=instance, verbose=args.verbose, on_result=_print_stages)
    except StepFailed as e:
        sys.stderr.write(f"featurelake backfill: {e}\n  every event of the run: featurelake ui (Runs), or rerun "
                         "with --verbose\n")
        return 1
    _emit(f"backfill of layers {args.layer} finished: {len(run_ids)} runs")
    return 0


def ui_command(host: str, port: int) -> list[str]:
    """``dagster dev`` on the workspace: webserver, daemon (queued runs, backfills, sensors), code server."""
    return [sys.executable, "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
            "-h", host, "-p", str(port)]


def cmd_score(args: argparse.Namespace) -> int:
    from dagster_project.config import load_profile
    from dagster_project.lib.lake import Lake
    from dagster_project.resources import default_lake_root, resources_for
    from dagster_project.scoring import ScoreError, read_texts, score_texts

    profile = load_profile()
    res = resources_for(profile)
    try:
        texts = read_texts(args.file, sys.stdin.read() if args.file == "-" else None)
        out = score_texts(profile, Lake(default_lake_root(), profile.name), res["model"], res["sae"], args.probe,
                          texts, args.layer)
    except ScoreError as e:
        sys.stderr.write(f"featurelake score: {e}\n")
        return 2
    rows = [{"index": i, "score": sc, "flagged": fl, "chars": len(t)}
            for i, (sc, fl, t) in enumerate(zip(out.scores, out.flagged, texts, strict=True))]
    if args.format == "json":
        _emit(json.dumps({"probe": out.probe_id, "layer": out.layer, "threshold": out.threshold,
                          "truncated_texts": out.n_truncated, "scores": rows}, indent=1))
    else:
        import polars as pl

        frame = pl.DataFrame(rows)
        _emit(frame.write_csv() if args.format == "csv" else str(frame))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Run the Dagster UI until Ctrl-C or SIGTERM, then stop it and every process it started.

    ``dagster dev`` runs in a process group of its own (webserver, daemon, code server, run workers).
    Ctrl-C, SIGTERM or SIGHUP to this process is passed on to that group as SIGINT, which dagster
    handles as a clean shutdown; after ``--stop-timeout`` seconds whatever is left gets SIGKILL.
    """
    import signal
    import subprocess
    import time

    home = ensure_dagster_home()
    stop: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stop.append(signum)
        _signal_group(proc.pid, signal.SIGINT if len(stop) == 1 else signal.SIGKILL)  # twice: no waiting

    log.info(f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={home}); Ctrl-C stops it")
    proc = subprocess.Popen(ui_command(args.host, args.port), cwd=REPO_ROOT, process_group=0,
                            preexec_fn=_child_setup)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    deadline, killed = None, False
    try:
        while True:
            rc = proc.poll()
            if stop and deadline is None:
                deadline = time.monotonic() + args.stop_timeout
            # Stopping: wait for the whole group, run workers included (they record the run as ended
            # and give back their pool slots), not only for dagster dev.
            if rc is not None and (not stop or killed or not _group_alive(proc.pid)):
                break
            if deadline is not None and time.monotonic() > deadline and not killed:
                log.warning(f"dagster dev still running {args.stop_timeout:.0f}s after the signal: killing it")
                _signal_group(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
    finally:
        _signal_group(proc.pid, signal.SIGKILL)  # whatever is left, if this loop ended early
    return 0 if stop else rc


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _child_setup() -> None:
    """In the child before exec: default signal handling, and SIGTERM when this process dies.

    A shell that starts us in the background (``featurelake ui &``, a CI step) may have left SIGINT
    ignored, and an ignored signal stays ignored across exec; dagster dev maps SIGTERM onto its SIGINT
    handler, so both would then be ignored and the server could not be stopped.
    """
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="featurelake", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="materialize every asset for the active profile")
    d.add_argument("--layer", type=int, action="append", help="layer(s) to run (default: the profile's)")
    d.add_argument("--verbose", action="store_true", help="also print Dagster's event log of every run")
    d.set_defaults(fn=cmd_demo)
    s = sub.add_parser("sql", help="read-only SQL over the lake")
    s.add_argument("query", help="a SELECT statement, or - to read it from stdin")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.add_argument("--max-rows", type=int, default=50)
    s.set_defaults(fn=cmd_sql)
    la = sub.add_parser("layers", help="list, add or remove layers (dynamic partitions)")
    la.add_argument("action", choices=["list", "add", "remove"], nargs="?", default="list")
    la.add_argument("layers", type=int, nargs="*")
    la.set_defaults(fn=cmd_layers)
    b = sub.add_parser("backfill", help="materialize a layer for every dataset, then the per-layer assets")
    b.add_argument("--layer", type=int, action="append", required=True)
    b.add_argument("--dataset", action="append")
    b.add_argument("--verbose", action="store_true", help="also print Dagster's event log of every run")
    b.set_defaults(fn=cmd_backfill)
    u = sub.add_parser("ui", help="the Dagster UI")
    u.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; the UI has no login)")
    u.add_argument("--port", type=int, default=3000)
    u.add_argument("--stop-timeout", type=float, default=30.0,
                   help="seconds to wait for a clean shutdown before killing what is left")
    u.set_defaults(fn=cmd_ui)
    sc = sub.add_parser("score", help="apply a saved probe to new texts (JSON, JSONL, or - for stdin)")
    sc.add_argument("--probe", required=True, help="probe id (see: featurelake sql \"select probe_id from probes\")")
    sc.add_argument("--layer", type=int, help="layer of the probe (default: search every layer)")
    sc.add_argument("file", help="a JSON list / {samples: [...]} / JSONL file of texts or {text: ...}; - for stdin")
    sc.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sc.set_defaults(fn=cmd_score)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs = args.command in ("demo", "backfill")
    console.setup_logging("verbose" if getattr(args, "verbose", False) else "quiet" if runs else "normal")
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
