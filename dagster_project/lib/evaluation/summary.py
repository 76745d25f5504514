"""Summaries of the probe stages for Dagster metadata: the best SAE probe next to the dense baseline
(markdown), flat headline numbers, and the report's PNG figures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl
import pyarrow as pa

from dagster_project.lib import generalisation, plots_probes


def auroc_cell(r: Mapping[str, Any] | None) -> str:
    if r is None:
        return "–"
    if r.get("auroc") is None:
        dr = r.get("detection_rate")
        return f"detection {dr:.3f}" if dr is not None else "–"
    lo, hi = r.get("auroc_ci_low"), r.get("auroc_ci_high")
    ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{r['auroc']:.3f}{ci}"


def side_by_side(metrics: pa.Table | pl.DataFrame, probes_table: pa.Table | pl.DataFrame) -> str:
    """Markdown: the best SAE probe next to the best dense baseline, training CV then every eval set.

    Positive-only sets show the detection rate (no AUROC exists there).
    """
    m, pr = generalisation.frame(metrics), generalisation.frame(probes_table)
    best = {r["kind"]: r for r in pr.filter(pl.col("is_best")).iter_rows(named=True)}
    names = {k: best[k]["probe_id"] if k in best else "none" for k in ("sae", "dense")}
    lines = [
        f"| eval set | role | SAE `{names['sae']}` | dense `{names['dense']}` |",
        "|---|---|---|---|",
        "| training CV | train | "
        + " | ".join(
            f"{best[k]['cv_auroc']:.3f} ± {best[k]['cv_std']:.3f}" if k in best else "–" for k in ("sae", "dense")
        )
        + " |",
    ]
    if any(best[k].get("lodo_worst_auroc") is not None for k in best):
        lines.append(
            "| held-out groups (worst / mean) | train | "
            + " | ".join(
                f"{generalisation.fmt_metric(best[k].get('lodo_worst_auroc'))} / {generalisation.fmt_metric(best[k].get('lodo_mean_auroc'))}"
                if k in best else "–" for k in ("sae", "dense")
            )
            + " |"
        )
    mb = m.filter(pl.col("is_best")) if m.height else m
    datasets = sorted(
        {(r["eval_role"], r["eval_dataset"]) for r in mb.iter_rows(named=True)},
        key=lambda x: ({"test": 0, "train": 1, "ood": 2, "control": 3}.get(x[0], 4), x[1]),
    )
    for role, d in datasets:
        cells = []
        for k in ("sae", "dense"):
            hit = mb.filter((pl.col("kind") == k) & (pl.col("eval_dataset") == d))
            r = hit.row(0, named=True) if hit.height else None
            if r is not None and role == "control":
                cells.append(f"flagged {generalisation.fmt_metric(r.get('fpr_at_1pct_fpr'), pct=True)}")
            else:
                cells.append(auroc_cell(r))
        lines.append(f"| {d} | {role} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def headline_numbers(metrics: pa.Table | pl.DataFrame, probes_table: pa.Table | pl.DataFrame) -> dict[str, float]:
    """Flat numbers for metadata: best SAE / dense CV AUROC and mean AUROC over test and ood sets."""
    m, pr = generalisation.frame(metrics), generalisation.frame(probes_table)
    out: dict[str, float] = {}
    for r in pr.filter(pl.col("is_best")).iter_rows(named=True):
        out[f"best_{r['kind']}_cv_auroc"] = float(r["cv_auroc"])
    if m.height:
        for (kind, role), g in m.filter(pl.col("is_best")).group_by(["kind", "eval_role"]):
            vals = g["auroc"].drop_nulls()
            if vals.len():
                out[f"best_{kind}_mean_auroc_{role}"] = float(vals.mean())  # type: ignore[arg-type]
    return out


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def report_figures(
    samples: pl.DataFrame,
    probes_table: pa.Table | pl.DataFrame,
    metrics: pa.Table | pl.DataFrame,
    scores: pa.Table | pl.DataFrame,
    cross: pa.Table | pl.DataFrame,
    default_transform: str = "raw",
    lodo: pa.Table | pl.DataFrame | None = None,
) -> dict[str, bytes]:
    """PNG figures by file stem: the held-out-group AUROC of the best SAE probe and dense baseline, an
    AUROC ladder per two-class eval set (degenerate probes left out), ROC curves of the best probes, the
    cross-distribution heatmaps and the L1 path (CV AUROC vs non-zero weights per set)."""

    pr, m, sc, cr = (generalisation.frame(t) for t in (probes_table, metrics, scores, cross))
    figs: dict[str, bytes] = {}
    lo = generalisation.frame(lodo)
    if lo.height and lo.filter(pl.col("is_best")).height:
        held = [
            {"name": f"{r['held_out_group']} ({r['kind']}{', vs control' if r['auroc_vs'] == 'control' else ''})",
             "auroc": r["auroc"], "ci_low": r["auroc_ci_low"], "ci_high": r["auroc_ci_high"], "group": r["kind"]}
            for r in lo.filter(pl.col("is_best")).sort(["held_out_group", "kind"]).iter_rows(named=True)
        ]
        figs["held_out_groups"] = plots_probes.plot_auroc_ladder(
            held, title="Held-out groups: AUROC of the recommended SAE probe and dense baseline, each group unseen")
    if m.height and "degenerate" in m.columns:
        m = m.filter(~pl.col("degenerate").fill_null(False))
    if m.height:
        two_class = m.filter(pl.col("auroc").is_not_null())
        for d in sorted(two_class["eval_dataset"].unique().to_list()):
            sub = two_class.filter(pl.col("eval_dataset") == d)
            ladder = [
                {
                    "name": r["probe"],
                    "auroc": r["auroc"],
                    "ci_low": r["auroc_ci_low"],
                    "ci_high": r["auroc_ci_high"],
                    "group": "dense" if r["kind"] == "dense" else r["penalty"],
                }
                for r in sub.iter_rows(named=True)
            ]
            figs[f"ladder_{d}"] = plots_probes.plot_auroc_ladder(ladder, title=f"AUROC on {d} ({sub['eval_role'][0]})")
    if sc.height:
        lab = sc.join(
            samples.select(
                pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int32), "is_positive"
            ),
            on=["dataset", "sample_id"],
            how="inner",
        )
        curves: dict[str, tuple[Any, Any]] = {}
        for (kind, d), g in sorted(lab.group_by(["kind", "dataset"]), key=lambda kv: (str(kv[0][1]), str(kv[0][0]))):
            curves[f"{kind} on {d}"] = (g["is_positive"].cast(pl.Int8).to_numpy(), g["score"].to_numpy())
        figs["roc"] = plots_probes.plot_roc_curves(curves, title="ROC: best SAE probe and best dense baseline")
    if cr.height:
        for kind in sorted(cr["kind"].unique().to_list()):
            sub = cr.filter(pl.col("kind") == kind)
            cells = [(r["train_dataset"], r["eval_dataset"], r["auroc"]) for r in sub.iter_rows(named=True)]
            figs[f"cross_{kind}"] = plots_probes.plot_cross_distribution_heatmap(
                cells,
                title=f"AUROC, {kind} probe {sub['probe'][0]} refitted per train set (diagonal: CV)",
                train_order=sorted(sub["train_dataset"].unique().to_list()),
                eval_order=sorted(sub["eval_dataset"].unique().to_list()),
            )
    if pr.height and "stage" in pr.columns:
        ks = pr.filter((pl.col("kind") == "sae") & (pl.col("stage") == "ksparse"))
        if ks.height:
            curve = {"training CV": [(r["n_features"], r["cv_auroc"]) for r in ks.iter_rows(named=True)]}
            if "lodo_worst_auroc" in ks.columns and ks["lodo_worst_auroc"].drop_nulls().len():
                curve["held-out groups, worst"] = [(r["n_features"], r["lodo_worst_auroc"]) for r in ks.iter_rows(named=True)]
                curve["held-out groups, mean"] = [(r["n_features"], r["lodo_mean_auroc"]) for r in ks.iter_rows(named=True)]
            figs["ksparse"] = plots_probes.plot_ksparse_curve(curve, title="k-sparse curve: L2 probes on the k features "
                                                              "most selective in every training group")
    if pr.height:
        l1 = pr.filter((pl.col("kind") == "sae") & (pl.col("penalty") == "l1") & (pl.col("transform") == default_transform))
        points = [(r["feature_set"], r["C"], r["n_nonzero"], r["cv_auroc"]) for r in l1.iter_rows(named=True)]
        figs["l1_path"] = plots_probes.plot_l1_path(points, title="L1 path: non-zero weights vs training CV AUROC")
        if "lodo_mean_auroc" in l1.columns and l1["lodo_mean_auroc"].drop_nulls().len():
            held_path = [(r["feature_set"], r["C"], r["n_nonzero"], r["lodo_mean_auroc"])
                         for r in l1.iter_rows(named=True) if r["lodo_mean_auroc"] is not None]
            figs["l1_path_held_out"] = plots_probes.plot_l1_path(
                held_path, title="L1 path: non-zero weights vs mean held-out-group AUROC")
    return figs
