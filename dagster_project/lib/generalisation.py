"""What the probe report says about generalisation: in- vs out-of-distribution per probe family, the
held-out-group table, control false-positive rates and the recommendation in one plain sentence.

Inputs are the layer's ``probes``, ``probe_metrics`` and ``lodo_metrics`` tables (pyarrow or polars);
outputs are polars frames and strings. Pure functions, no dagster import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeAlias

import polars as pl
import pyarrow as pa

Frame: TypeAlias = pa.Table | pl.DataFrame


def frame(t: Frame | None) -> pl.DataFrame:
    if t is None:
        return pl.DataFrame()
    out = t if isinstance(t, pl.DataFrame) else pl.from_arrow(t)
    assert isinstance(out, pl.DataFrame)
    return out


def family_of(row: Mapping[str, Any]) -> str:
    """A probe family: SAE features by feature set, penalty and token aggregation (``sae top50 l1``,
    ``sae top50 l2 window_max``), dense by pooling (``dense resid_mean``, ``dense tok_resid max``)."""
    agg = row.get("aggregation") or "pooled"
    tail = "" if agg == "pooled" else f" {agg}"
    if row["kind"] == "dense":
        return f"dense {row['feature_set']}{tail}"
    return f"sae {row['feature_set']} {row['penalty']}{tail}"


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def family_table(probes: Frame, metrics: Frame) -> pl.DataFrame:
    """One row per probe family, for its best-ranked non-degenerate member: held-out-group AUROC (worst,
    mean), training CV, mean AUROC on ``test`` sets (in distribution) and on ``ood`` sets, mean detection
    on positive-only ``ood`` sets, and the false-positive rate on the control sets' check half."""
    pr, m = frame(probes), frame(metrics)
    if not pr.height:
        return pl.DataFrame()
    rows = []
    live = pr.filter(~pl.col("degenerate").fill_null(False)) if "degenerate" in pr.columns else pr
    rank_col = "rank" if "rank" in pr.columns else "cv_rank"
    by_family: dict[str, dict[str, Any]] = {}
    for r in live.sort(rank_col).iter_rows(named=True):
        by_family.setdefault(family_of(r), r)
    for fam, r in by_family.items():
        mine = m.filter(pl.col("probe") == r["probe_id"]) if m.height else m
        role = {k: mine.filter(pl.col("eval_role") == k) if mine.height else mine for k in ("test", "ood", "control")}
        ood_one_class = role["ood"].filter(pl.col("auroc").is_null()) if role["ood"].height else role["ood"]
        rows.append({
            "family": fam,
            "probe": r["probe_id"],
            "rank": r[rank_col],
            "is_best": bool(r["is_best"]),
            "held_out_worst": r.get("lodo_worst_auroc"),
            "held_out_mean": r.get("lodo_mean_auroc"),
            "cv_auroc": r["cv_auroc"],
            "test_auroc": _mean(role["test"]["auroc"].to_list()) if role["test"].height else None,
            "ood_auroc": _mean(role["ood"]["auroc"].to_list()) if role["ood"].height else None,
            "ood_detection": _mean(ood_one_class["detection_rate"].to_list()) if ood_one_class.height else None,
            "control_fpr": _mean(role["control"]["fpr_at_1pct_fpr"].to_list()) if role["control"].height else None,
            "n_nonzero": r["n_nonzero"],
        })
    return pl.DataFrame(rows).sort(["rank", "family"])


def held_out_table(lodo: Frame | None) -> pl.DataFrame:
    """The best SAE probe and the best dense baseline on every held-out group, side by side."""
    lo = frame(lodo)
    if not lo.height:
        return pl.DataFrame()
    best = lo.filter(pl.col("is_best"))
    out = []
    for g in sorted(set(best["held_out_group"].to_list())):
        row: dict[str, Any] = {"held_out_group": g}
        for kind in ("sae", "dense"):
            hit = best.filter((pl.col("kind") == kind) & (pl.col("held_out_group") == g))
            r = hit.row(0, named=True) if hit.height else {}
            row.update({"n_pos": r.get("n_pos", row.get("n_pos")), "n_neg": r.get("n_neg", row.get("n_neg")),
                        f"{kind}_auroc": r.get("auroc"), f"{kind}_auroc_vs": r.get("auroc_vs"),
                        f"{kind}_detection": r.get("detection_rate"), f"{kind}_fpr": r.get("fpr")})
        out.append(row)
    return pl.DataFrame(out)


def control_table(metrics: Frame) -> pl.DataFrame:
    """False-positive rate of the best probes on each control set's check half, at the probe's threshold."""
    m = frame(metrics)
    if not m.height:
        return pl.DataFrame()
    c = m.filter((pl.col("eval_role") == "control") & pl.col("is_best"))
    cols = [x for x in ("kind", "probe", "eval_dataset", "n", "fpr_at_1pct_fpr", "threshold_source") if x in c.columns]
    return c.select(cols).sort(["eval_dataset", "kind"])


def fmt_metric(v: Any, pct: bool = False) -> str:
    """A metric as ``0.912`` (or ``91.2%`` with ``pct``); ``n/a`` for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * float(v):.1f}%" if pct else f"{float(v):.3f}"


def recommendation(probes: Frame, metrics: Frame, lodo: Frame | None = None) -> str:
    """One plain sentence (or two) naming the probe the tool recommends and why."""
    pr, m = frame(probes), frame(metrics)
    best = {r["kind"]: r for r in pr.filter(pl.col("is_best")).iter_rows(named=True)} if pr.height else {}
    if not best:
        return "No probe is recommended: every probe of this layer is degenerate (no non-zero weight) or none was trained."
    lead = best.get("sae") or best["dense"]
    other = best.get("dense") if lead is best.get("sae") else None
    selection = lead.get("selection") or "cv"
    held = frame(lodo)
    n_groups = len(set(held["held_out_group"].to_list())) if held.height else 0
    if selection == "lodo":
        why = (f"it has the best worst-case AUROC over the {n_groups} held-out training groups "
               f"({fmt_metric(lead.get('lodo_worst_auroc'))}; mean {fmt_metric(lead.get('lodo_mean_auroc'))}); its training CV AUROC "
               f"({fmt_metric(lead['cv_auroc'])}) was not used to choose it, since CV on the training mixture says little "
               "about other sources")
    else:
        why = (f"it has the best training cross-validation AUROC ({fmt_metric(lead['cv_auroc'])}); the training sets hold "
               "fewer than two groups that can be held out, so this choice says nothing about other sources")
    kind = "SAE probe" if lead["kind"] == "sae" else "dense baseline"
    text = f"The tool recommends the {kind} `{lead['probe_id']}` ({lead['n_nonzero']} non-zero weights): {why}."
    if other is not None:
        if selection == "lodo":
            text += (f" The best dense baseline `{other['probe_id']}` scores {fmt_metric(other.get('lodo_worst_auroc'))} "
                     f"worst-case / {fmt_metric(other.get('lodo_mean_auroc'))} mean on the same held-out groups.")
        else:
            text += f" The best dense baseline `{other['probe_id']}` has training CV {fmt_metric(other['cv_auroc'])}."
    ctl = control_table(m)
    if ctl.height and "fpr_at_1pct_fpr" in ctl.columns:
        mine = ctl.filter(pl.col("probe") == lead["probe_id"])
        if mine.height:
            text += (f" At the threshold set on the control sets it flags "
                     f"{fmt_metric(_mean(mine['fpr_at_1pct_fpr'].to_list()), pct=True)} of held-out control texts.")
    return text
