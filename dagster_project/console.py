"""What the ``featurelake`` command prints: the console's log filter, one line per stage from each run's
materialization metadata, and the summary at the end of ``featurelake demo``.

Dagster writes every event of a run twice: into the instance (``DAGSTER_HOME``: the event log the UI shows)
and to the console through the run's ``console`` logger (DEBUG and up, one line per event). A quiet run sets
that logger's level to CRITICAL in its run config (:data:`QUIET_RUN_CONFIG`); the instance's event log
handler is not a run logger, so the event log keeps every event. The project's own Python loggers
(``dagster_project``, ``assets``) and Python warnings (``py.warnings``) are *managed* loggers in
``dagster.yaml`` (``python_logs``), so what they say during a run lands in the event log too; on the console
the CLI's handler (:func:`setup_logging`) shows them by mode:

- ``quiet`` (``featurelake demo`` / ``backfill``): errors, the project's warnings between runs (during a run
  they go to its event log), and the CLI's own ``featurelake`` logger;
- ``normal`` (the other commands): warnings and up, and the CLI's own logger at INFO;
- ``verbose`` (``--verbose``): everything at INFO, with the runs' event lines (DEBUG) from Dagster.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Loggers whose records a run copies into its event log (dagster.yaml, python_logs.managed_python_loggers).
MANAGED_LOGGERS = ("dagster_project", "assets", "py.warnings")
# The run config that keeps Dagster's event lines off the console (they stay in the instance).
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}

_MARK = "_featurelake_console"


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class ConsoleFilter(logging.Filter):
    """Which log records the console shows, by mode (see the module docstring)."""

    def __init__(self, mode: str = "normal") -> None:
        super().__init__()
        self.mode = mode
        self.in_run = False

    def filter(self, record: logging.LogRecord) -> bool:
        if _under(record.name, ("featurelake",)):
            return True
        if self.mode == "verbose":
            # during a run the run's console logger already prints what the managed loggers say
            return not (self.in_run and _under(record.name, MANAGED_LOGGERS))
        if self.mode == "quiet":  # between runs the project's own warnings still show (an orphaned run ended)
            own = not self.in_run and _under(record.name, ("dagster_project", "assets"))
            return record.levelno >= (logging.WARNING if own else logging.ERROR)
        return record.levelno >= logging.WARNING


FILTER = ConsoleFilter()


def setup_logging(mode: str = "normal") -> None:
    """The console handler of the CLI (stderr) with :data:`FILTER` set to ``mode``; Python warnings go
    through logging (``py.warnings``), so a quiet run keeps them in its event log, off the console; quiet
    also turns off other libraries' progress bars (sae-lens training, model loading), leaving the CLI's.

    Like ``logging.basicConfig`` it adds no handler where the root logger already has one of someone
    else's (pytest's capture, an embedding program), and only one of its own however often it is called.
    """
    FILTER.mode = mode
    if mode == "quiet":  # other progress bars (sae-lens training, model loading): read when tqdm is imported
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    if not any(getattr(h, _MARK, False) for h in root.handlers):
        if root.handlers:
            return
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(FILTER)
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


@contextmanager
def in_run() -> Iterator[None]:
    """Mark the time a Dagster run executes in this process (the console filter tells runs apart)."""
    FILTER.in_run = True
    try:
        yield
    finally:
        FILTER.in_run = False


# ------------------------------------------------------------------------------------------ run results


def _value(meta: dict[str, Any], key: str) -> Any:
    v = meta.get(key)
    return getattr(v, "value", v)


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "?" if x is None else format(x, spec)  # a key the metadata lacks


def _line(stage: str, where: str, text: str) -> str:
    return f"{stage:<13}{where}: {text}"


def stage_line(asset: str, partition: str | None, meta: dict[str, Any]) -> str | None:
    """The one line ``featurelake demo`` prints for a materialized asset (its key figure), or ``None``
    for assets it says nothing about. Keys missing from the metadata print as ``?``."""
    raw = lambda k: _value(meta, k)  # noqa: E731
    g = lambda k: "?" if raw(k) is None else raw(k)  # noqa: E731
    layer = f"layer {partition}"
    if asset == "samples":
        role = f", role {raw('role')}" if raw("role") else ""
        return _line("samples", str(partition), f"{g('rows')} samples ({g('positives')} positive, "
                                                f"{g('negatives')} negative{role})")
    if asset == "sae":  # a run over several layers suffixes each layer's fields with _layer{L}
        sfx = f"_layer{partition}" if _value(meta, f"sae_id_layer{partition}") is not None else ""
        raw_s = lambda k: raw(k + sfx)  # noqa: E731
        if raw_s("variance_explained_heldout") is None:
            return _line("sae", layer, f"loaded {g('sae_id' + sfx)} ({g('d_sae' + sfx)} features)")
        return _line("sae", layer, f"trained, variance explained {_fmt(raw_s('variance_explained_heldout'), '.1%')} "
                                   f"on held-out vectors, L0 {_fmt(raw_s('l0'), '.0f')}, "
                                   f"{_fmt(raw_s('train_seconds'), '.0f')} s")
    if asset == "activations":
        parts = raw("partitions") or {}
        where = ", ".join(sorted(parts)) if isinstance(parts, dict) and parts else str(partition)
        return _line("activations", where, f"{g('samples')} samples, {_fmt(raw('tokens'), ',')} tokens at "
                                           f"{_fmt(raw('tokens_per_s'), ',.0f')} tokens/s")
    if asset == "selected_features":
        return _line("selection", layer, f"{g('rows')} features selected ({g('positive')} preferring the "
                                         f"positive class, {g('negative')} the negative)")
    if asset == "descriptions":
        return _line("descriptions", layer, f"{g('ok')} ok, {g('failed')} failed")
    if asset == "probes":
        lodo = raw("selection") == "lodo"

        def why(kind: str) -> str:
            cv = f"CV AUROC {_fmt(raw(f'best_{kind}_cv_auroc'))}"
            if lodo and raw(f"best_{kind}_selection_score") is not None:
                return f"worst held-out group AUROC {_fmt(raw(f'best_{kind}_selection_score'))}, {cv}"
            return cv

        best = [f"{kind} {raw(f'best_{kind}')} ({why(kind)})" for kind in ("sae", "dense")
                if raw(f"best_{kind}") is not None]
        chosen = "chosen on held-out groups" if lodo else "chosen by training CV"
        return _line("probes", layer, f"{g('sae_probes')} SAE and {g('dense_probes')} dense probes, {chosen}; best "
                                      + ("; ".join(best) or "none"))
    return None


def stage_lines(result: Any) -> list[str]:
    """One line per materialized asset of a run that has a key figure, and one for failed checks."""
    lines = []
    for ev in result.get_asset_materialization_events():
        mat = ev.step_materialization_data.materialization
        line = stage_line(mat.asset_key.to_user_string(), mat.partition, dict(mat.metadata))
        if line is not None and line not in lines:  # a run over several partitions: one line for them all
            lines.append(line)
    failed = sorted({f"{c.asset_key.to_user_string()}:{c.check_name}" for c in result.get_asset_check_evaluations()
                     if not c.passed})
    if failed:
        lines.append(_line("checks", "failed", ", ".join(failed) + " (see the UI's asset checks)"))
    return lines


def failure_text(result: Any) -> str:
    """The error of a failed run: the first error of the failed step that is not one of Dagster's wrappers
    (the asset's own ``Failure`` message, or ``ValueError: ...``), naming the step."""
    for ev in result.get_step_failure_events():
        err = ev.step_failure_data.error
        chain = []
        while err is not None:
            chain.append(err)
            err = err.cause
        own = next((e for e in chain if not (e.cls_name or "").startswith("Dagster")), chain[0] if chain else None)
        if own is None:
            continue
        msg = own.message.strip()
        head = re.match(r"^(?:[A-Za-z_][\w]*\.)*(\w+): ", msg)  # "pkg.mod.ModelError: ..." -> "ModelError: ..."
        if head and head.group(1) == own.cls_name:
            msg = msg[head.end():] if own.cls_name == "Failure" else f"{own.cls_name}: {msg[head.end():]}"
        return f"step {ev.step_key}: {msg}"
    return "the run failed before any step ran (its event log in the UI says why)"


# ------------------------------------------------------------------------------------------ demo summary


TRY_QUERIES = (
    "select kind, probe, eval_dataset, eval_role, auroc, auroc_ci_low, auroc_ci_high from probe_metrics "
    "where is_best order by kind, eval_role, eval_dataset",
    "select s.rank, s.feature_id, s.direction, round(s.selectivity, 3) as selectivity, d.description "
    "from selected_features s join descriptions d using (layer, feature_id) order by s.layer, s.rank limit 10",
    "select dataset, role, count(*) as samples, sum(is_positive::int) as positives from samples "
    "group by all order by all",
)


def _shown(path: Any) -> str:
    """A path relative to the working directory when it lies under it (as the user would type it)."""
    text = str(path)
    if "://" in text:
        return text
    try:
        return str(Path(text).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return text


def best_probe_rows(lake: Any, layers: Sequence[int]) -> list[dict[str, Any]]:
    """The best SAE probe and the best dense baseline of each layer (``probe_metrics`` rows with ``is_best``),
    read through the catalog: ``layer, kind, probe``, mean AUROC over the test sets (``auroc_test``) and
    over the ood sets (``auroc_ood``), and the mean detection rate on ood sets without negatives, whose
    AUROC is undefined (``detection_ood``, when the view has ``detection_rate``). Other columns of the view
    are not touched."""
    from dagster_project.lib.catalog import query

    columns = {r[0] for r in query(lake, "select column_name from (describe probe_metrics)").fetchall()}  # type: ignore[union-attr]
    detection = ("avg(detection_rate) filter (where eval_role = 'ood' and auroc is null)"
                 if "detection_rate" in columns else "null")
    wanted = ", ".join(str(int(x)) for x in layers) or "null"
    rel = query(lake, f"""
        select layer, kind, probe,
            avg(auroc) filter (where eval_role = 'test') as auroc_test,
            avg(auroc) filter (where eval_role = 'ood') as auroc_ood,
            {detection} as detection_ood
        from probe_metrics
        where is_best and kind in ('sae', 'dense') and layer in ({wanted})
        group by layer, kind, probe
        order by layer, kind desc, probe""")
    assert rel is not None
    return [dict(zip(rel.columns, r, strict=True)) for r in rel.fetchall()]


def demo_summary(lake: Any, layers: Sequence[int], n_runs: int, seconds: float) -> list[str]:
    """The lines ``featurelake demo`` ends with: best probes in- vs out-of-distribution, where the report
    is, and three queries to try."""
    out = [f"featurelake demo finished: {n_runs} runs in {seconds // 60:.0f} min {seconds % 60:.0f} s; every "
           "run's full log is in the UI (featurelake ui)", ""]
    try:
        rows = best_probe_rows(lake, layers)
    except Exception as e:  # noqa: BLE001 - a summary that cannot be read says so; the demo itself succeeded
        rows = []
        out.append(f"(no probe summary: {str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if rows:
        na = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        det = any(r["detection_ood"] is not None for r in rows)
        width = max(len("probe"), *(len(r["probe"]) for r in rows))
        out.append("best probes: mean AUROC in-distribution (test sets) vs out-of-distribution (ood sets)"
                   + ("; detection rate on ood sets without negatives" if det else ""))
        out.append(f"  {'layer':>5}  {'kind':<5}  {'probe':<{width}}  {'test':>6}  {'ood':>6}"
                   + (f"  {'ood detection':>13}" if det else ""))
        for r in rows:
            out.append(f"  {r['layer']:>5}  {r['kind']:<5}  {r['probe']:<{width}}  {na(r['auroc_test']):>6}  "
                       f"{na(r['auroc_ood']):>6}" + (f"  {na(r['detection_ood']):>13}" if det else ""))
    out.append("")
    for layer in layers:
        index = lake.base / "report" / f"layer={int(layer)}" / "index.html"
        out.append(f"report, layer {layer}: {_shown(index)}")
    out.append("try:")
    out += [f'  featurelake sql "{q}"' for q in TRY_QUERIES]
    return out


def write_line(text: str) -> None:
    """A line on stdout that leaves a progress bar on stderr intact."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)
