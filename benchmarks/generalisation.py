"""Generalisation benchmark: which probe does each selection protocol recommend, and how does it do on data
it never saw? Runs on a lake whose activations (and ``feature_stats``) exist, e.g. the AF registry's:

    FEATURELAKE_DATASETS=registries/shared_af.yaml FEATURELAKE_PROFILE=benchmarks/profiles/af_shared.yaml \\
        .venv/bin/python benchmarks/generalisation.py --layer 9 --out benchmarks/out/generalisation.md

Variants (each trains the whole probe grid and the dense baselines through ``lib.evaluation.train_probes``):

- ``baseline``: today's protocol before leave-one-group-out: train on ``gold_alt`` alone, features ranked
  by selectivity on ``gold_alt``, the best probe by training CV, thresholds from out-of-fold training
  negatives (no control sets);
- ``mixture``: the registry's default mixture (every ``train``-role set), chosen by the worst held-out-group
  AUROC, thresholds on the control sets (what ``make demo`` and the UI run by default);
- further variants of the mixture: group weights, controls as extra negatives, the mean criterion.

For the recommended SAE probe and dense baseline of each: held-out-group AUROC (worst / mean), AUROC on
every test set, detection on every positive-only set (for sets a variant trains on: its held-out-group
detection), and the false-positive rate on the control sets' check half. Nothing here is tuned on the test
sets: each variant's choice is made by its own protocol, and the table reports what follows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl

from dagster_project.config import ProbeConfig, load_profile
from dagster_project.lib import evaluation as ev
from dagster_project.lib import stats
from dagster_project.lib.catalog import views_connection
from dagster_project.lib.lake import Lake
from dagster_project.resources import default_lake_root

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"train_datasets": ["gold_alt"], "selection": "cv", "controls": False},
    "mixture": {},
    "mixture_sqrt": {"weighting": "sqrt"},
    "mixture_balanced": {"weighting": "balanced"},
    "mixture_ctlneg": {"control_as_negatives": True},
    "mixture_mean": {"criterion": "mean"},
}


def _loaded(trained: ev.TrainedProbes) -> dict[str, ev.LoadedProbe]:
    """The recommended probe of each kind, as the evaluation stage would load it."""
    out = {}
    for kind, results in (("sae", trained.sae), ("dense", trained.dense)):
        live = [r for r in results if not r.degenerate]
        if live:
            r = live[0]
            out[kind] = ev.LoadedProbe(ev.probe_id(r.spec), kind, True, r.cv.mean, list(trained.train_datasets),
                                       r.probe, 1, False, trained.selection, r.selection_score)
    return out


def run_variant(name: str, lake: Lake, layer: int, extra: dict[str, Any]) -> list[dict[str, Any]]:
    con = views_connection(lake)
    extra = dict(extra)
    use_controls = extra.pop("controls", True)
    train = extra.get("train_datasets")
    if train:  # feature selection on the named sets only, as feature_stats would have been computed then
        table = stats.feature_stats(con, layer, 1.0, train)
        con.register("_fs_override", table)
        con.execute(f"create or replace view feature_stats as select {int(layer)}::bigint as layer, * from _fs_override")
    settings = ProbeConfig(**extra).settings()
    data = ev.LayerData(con, layer)
    controls = set(data.controls())
    if not use_controls:  # no control role: thresholds from out-of-fold training negatives, as before
        data.samples = data.samples.with_columns(
            pl.when(pl.col("role") == "control").then(pl.lit("ood")).otherwise(pl.col("role")).alias("role"))
    t0 = time.perf_counter()
    trained = ev.train_probes(con, layer, settings, data)
    seconds = time.perf_counter() - t0
    best = _loaded(trained)
    metrics = ev.evaluate_probes(data, list(best.values()), replace(settings, n_boot=500)).metrics
    m = pl.from_arrow(metrics)
    assert isinstance(m, pl.DataFrame)
    rows = []
    for kind, lp in best.items():
        r = next(x for x in (trained.sae if kind == "sae" else trained.dense) if ev.probe_id(x.spec) == lp.probe_id)
        mine = m.filter(pl.col("probe") == lp.probe_id)
        row: dict[str, Any] = {
            "variant": name, "kind": kind, "probe": lp.probe_id, "selection": trained.selection,
            "n_train": r.probe.n_train, "n_groups": len(trained.groups), "held_out": len(trained.held_out_groups),
            "cv_auroc": r.cv.mean, "lodo_worst": r.lodo_auroc("worst"), "lodo_mean": r.lodo_auroc("mean"),
            "threshold_source": r.probe.threshold_source, "n_nonzero": r.probe.n_nonzero, "train_seconds": seconds,
        }
        rows.append(_cells(row, mine.iter_rows(named=True), r.lodo, controls))
    return rows


def _cells(row: dict[str, Any], metrics: Any, lodo: Any, controls: set[str]) -> dict[str, Any]:
    """``row`` plus a cell per eval set (AUROC and CI; detection on positive-only sets; flagged share on
    control sets) and per held-out group (AUROC; detection on one-class groups)."""
    for e in metrics:
        d = e["eval_dataset"]
        if e["auroc"] is not None:
            row[f"auroc:{d}"] = e["auroc"]
            row[f"ci:{d}"] = (e["auroc_ci_low"], e["auroc_ci_high"])
        if e["eval_role"] == "control" or d in controls or e["n_pos"] == 0:  # flagged share of negatives
            row[f"fpr:{d}"] = e["fpr_at_1pct_fpr"]
        elif e["n_neg"] == 0:
            row[f"det:{d}"] = e["detection_rate"]
    for g in lodo:
        row[f"lodo:{g['held_out_group']}"] = g["auroc"]
        if g["n_neg"] == 0:
            row[f"lododet:{g['held_out_group']}"] = g["detection_rate"]
    return row


def from_lake(name: str, lake: Lake, layer: int) -> list[dict[str, Any]]:
    """The rows of what the pipeline itself recommended and evaluated (``probes``, ``probe_metrics`` and
    ``lodo_metrics`` of the layer), without training anything again."""
    con = views_connection(lake)
    data = ev.LayerData(con, layer)
    controls = set(data.controls())
    pr = con.sql(f"select * from probes where layer = {int(layer)} and is_best").pl()
    m = con.sql(f"select * from probe_metrics where layer = {int(layer)} and is_best").pl()
    lo = con.sql(f"select * from lodo_metrics where layer = {int(layer)} and is_best").pl()
    rows = []
    for r in pr.iter_rows(named=True):
        row: dict[str, Any] = {
            "variant": name, "kind": r["kind"], "probe": r["probe_id"], "selection": r["selection"],
            "n_train": r["n_pos"] + r["n_neg"], "held_out": lo.filter(pl.col("kind") == r["kind"]).height,
            "cv_auroc": r["cv_auroc"], "lodo_worst": r["lodo_worst_auroc"], "lodo_mean": r["lodo_mean_auroc"],
            "threshold_source": r["threshold_source"], "n_nonzero": r["n_nonzero"],
        }
        rows.append(_cells(row, m.filter(pl.col("probe") == r["probe_id"]).iter_rows(named=True),
                           lo.filter(pl.col("kind") == r["kind"]).iter_rows(named=True), controls))
    return rows


def ensemble_rows(lake: Lake) -> list[dict[str, Any]]:
    """The multi-layer ensembles' rows (``probe_ensemble_metrics``: score mean over the layers' recommended
    probes), in the shape of :func:`from_lake`'s (no held-out groups: an ensemble is not selected)."""
    con = views_connection(lake)
    controls = set(ev.LayerData(con, lake_layers(con)[0]).controls())
    m = con.sql("select * from probe_metrics where feature_set = 'layer_ensemble'").pl()
    rows = []
    for (kind, probe), g in m.group_by(["kind", "probe"], maintain_order=True):
        first = g.row(0, named=True)
        row: dict[str, Any] = {"variant": "ensemble " + "+".join(str(x) for x in first["layers"]), "kind": kind,
                               "probe": probe, "selection": "none", "threshold_source": first["threshold_source"]}
        rows.append(_cells(row, g.iter_rows(named=True), [], controls))
    return rows


def lake_layers(con: Any) -> list[int]:
    return [int(r[0]) for r in con.sql("select distinct layer from probes order by layer").fetchall()]


def coarse_family(r: dict[str, Any]) -> str:
    """A probe's family for the benchmark's table, coarser than the report's ``generalisation.family_of``
    (which splits by feature set): kind, then pooled by penalty (the L1 path vs L2) / k-sparse
    (``transfer{k}``) / token-level by aggregation."""
    agg = r.get("aggregation") or "pooled"
    if agg != "pooled":
        return f"{r['kind']} token {agg}"
    if r["kind"] == "sae" and str(r["feature_set"]).startswith("transfer"):
        return "sae k-sparse"
    return f"{r['kind']} pooled {r['penalty']}"


def families_from_lake(lake: Lake) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per layer and family (kind x aggregation / feature-set rule), the member with the best selection
    score: held-out-group worst / mean AUROC, training CV, mean (min) AUROC over the test sets, the flagged
    share of the control check halves and of the negative-only OOD sets. And the k-sparse curve: per layer
    and k, the ``transfer{k}`` probe's held-out and test AUROC."""
    con = views_connection(lake)
    pr = con.sql("select * from probes where not degenerate").pl()
    m = con.sql("select * from probe_metrics where layer is not null").pl()
    per = m.group_by(["layer", "probe"]).agg(
        pl.col("auroc").filter(pl.col("eval_role") == "test").mean().alias("test_mean"),
        pl.col("auroc").filter(pl.col("eval_role") == "test").min().alias("test_min"),
        pl.col("fpr_at_1pct_fpr").filter(pl.col("eval_role") == "control").mean().alias("control_flagged"),
        pl.col("fpr_at_1pct_fpr").filter((pl.col("eval_role") == "ood") & (pl.col("n_pos") == 0)).mean()
        .alias("ood_neg_flagged"),
        pl.col("detection_rate").filter((pl.col("eval_role") == "ood") & (pl.col("n_neg") == 0)).mean()
        .alias("ood_pos_detected"),
    ).rename({"probe": "probe_id"})
    pr = pr.join(per, on=["layer", "probe_id"], how="left")
    pr = pr.with_columns(pl.Series("family", [coarse_family(r) for r in pr.iter_rows(named=True)]))
    best = (pr.sort(["selection_score", "cv_auroc"], descending=True, nulls_last=True)
            .group_by(["layer", "family"], maintain_order=True).first().sort(["family", "layer"]))
    fam = [{k: r[k] for k in ("family", "layer", "probe_id", "n_nonzero", "lodo_worst_auroc", "lodo_mean_auroc",
                              "cv_auroc", "test_mean", "test_min", "control_flagged", "ood_neg_flagged",
                              "ood_pos_detected", "is_best")} for r in best.iter_rows(named=True)]
    ks = pr.filter(pl.col("feature_set").str.starts_with("transfer") & (pl.col("aggregation") == "pooled"))
    ks = ks.with_columns(pl.col("feature_set").str.strip_prefix("transfer").cast(pl.Int64).alias("k"))
    curve = [{k: r[k] for k in ("layer", "k", "probe_id", "lodo_worst_auroc", "lodo_mean_auroc", "cv_auroc",
                                "test_mean", "test_min", "control_flagged")}
             for r in ks.sort(["layer", "k"]).iter_rows(named=True)]
    return fam, curve


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    keys = list(rows[0])
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      *("| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows)])


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, tuple):
        return f"[{v[0]:.2f}, {v[1]:.2f}]"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = ["variant", "kind", "probe", "selection", "n_train", "held_out", "cv_auroc", "lodo_worst", "lodo_mean",
            "threshold_source", "n_nonzero"]
    extra = sorted({k for r in rows for k in r if ":" in k and not k.startswith(("ci:", "lodo:", "lododet:"))})
    head = "| " + " | ".join(keys + extra) + " |"
    lines = [head, "|" + "---|" * (len(keys) + len(extra))]
    for r in rows:
        cells = [_fmt(r.get(k)) for k in keys]
        for k in extra:
            v = r.get(k)
            ci = r.get("ci:" + k.split(":", 1)[1]) if k.startswith("auroc:") else None
            cells.append(_fmt(v) + (f" {_fmt(ci)}" if ci else ""))
        lines.append("| " + " | ".join(cells) + " |")
    groups = sorted({k for r in rows for k in r if k.startswith("lodo:")})
    if groups:
        lines += ["", "Held-out groups (AUROC; one-class groups against the control check half; detection at the "
                  "control threshold after `/`):", "",
                  "| variant | kind | " + " | ".join(g.split(":", 1)[1] for g in groups) + " |",
                  "|---|---|" + "---|" * len(groups)]
        for r in rows:
            cells = []
            for g in groups:
                det = r.get("lododet:" + g.split(":", 1)[1])
                cells.append(_fmt(r.get(g)) + (f" / {det:.2f}" if det is not None else ""))
            lines.append(f"| {r['variant']} | {r['kind']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", type=int, nargs="+", default=[9], help="one or more layers")
    ap.add_argument("--families", action="store_true",
                    help="with the pipeline variant: the per-family / aggregation table of every layer, the "
                         "k-sparse curve and the multi-layer ensembles, from what the pipeline wrote")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS),
                    help=f"of {[*VARIANTS, 'pipeline']}; 'pipeline' reads what the probes/evaluation assets wrote")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/generalisation.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    lake = Lake(default_lake_root(), load_profile().name)
    rows: list[dict[str, Any]] = []
    extra = ""
    for name in args.variants:
        t0 = time.perf_counter()
        for layer in args.layer:
            if name == "pipeline":
                rows += [{**r, "variant": f"{name} layer {layer}"} for r in from_lake(name, lake, layer)]
            else:
                rows += [{**r, "variant": f"{name} layer {layer}"} if len(args.layer) > 1 else r
                         for r in run_variant(name, lake, layer, VARIANTS[name])]
        if name == "pipeline" and args.families:
            rows += ensemble_rows(lake)
            fam, curve = families_from_lake(lake)
            extra = ("\n\nPer layer and family (the member with the best selection score):\n\n" + _table(fam)
                     + "\n\nThe k-sparse curve (`transfer{k}`):\n\n" + _table(curve))
        sys.stderr.write(f"{name}: {time.perf_counter() - t0:.0f} s\n")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(rows) + extra + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    sys.stdout.write(markdown(rows) + extra + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
