"""A multi-layer ensemble: the recommended probe of every layer, scores averaged.

Each layer's ``probe_scores`` hold its recommended SAE probe's and dense baseline's score of every sample
of every extracted dataset. The ensemble of one kind z-scores each layer's scores by their mean and spread
over that layer's training texts (so no layer dominates by scale), averages the z-scores of the layers that
scored a sample, sets its threshold on the control sets' calibration half (even ``sample_id``; where the
members trained on that half, a quarter of the unseen ids, ``sample_id % 4 == 1``, checked on ``% 4 == 3``; else the
training negatives, in sample), and is evaluated like any probe on every set it was not trained on (a
control set on its check half). Rows go to ``probe_ensemble_metrics``, which the catalog also folds into
the ``probe_metrics`` view (``layer`` NULL, ``layers`` the layers averaged).

Pure functions over a DuckDB connection with the lake's views; no dagster import.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from dagster_project.lib.metrics import evaluate_scores, threshold_at_fpr
from dagster_project.lib.tables import ENSEMBLE_SCHEMA  # probe_metrics columns by name, plus its own

ENSEMBLE_TABLE = "stats/probe_ensemble_metrics"


def _frame(con: duckdb.DuckDBPyConnection, sql: str) -> pl.DataFrame:
    out = pl.from_arrow(con.sql(sql).to_arrow_table())
    assert isinstance(out, pl.DataFrame)
    return out


def ensemble_scores(scores: pl.DataFrame, train: pl.DataFrame) -> pl.DataFrame:
    """``dataset, sample_id, score, n_layers``: per sample, the mean over layers of each layer's score
    z-scored by that layer's mean and standard deviation on the training texts (``train``: dataset,
    sample_id). ``scores`` has ``layer, dataset, sample_id, score`` for one kind."""
    keyed = scores.join(train.with_columns(pl.lit(True).alias("_train")), on=["dataset", "sample_id"], how="left")
    stats = keyed.filter(pl.col("_train")).group_by("layer").agg(pl.col("score").mean().alias("_mu"),
                                                                  pl.col("score").std().alias("_sd"))
    z = keyed.join(stats, on="layer", how="inner").with_columns(
        ((pl.col("score") - pl.col("_mu")) / pl.when(pl.col("_sd") > 0).then(pl.col("_sd")).otherwise(1.0)).alias("z"))
    return (z.group_by(["dataset", "sample_id"]).agg(pl.col("z").mean().alias("score"), pl.len().alias("n_layers"))
            .sort(["dataset", "sample_id"]))


def layer_ensemble(con: duckdb.DuckDBPyConnection, n_boot: int = 1000, seed: int = 0, fpr: float = 0.01) -> pa.Table:
    """The ensemble rows of every kind whose recommended probe exists at two layers or more (empty otherwise)."""
    views = {r[0] for r in con.sql("select table_name from information_schema.tables").fetchall()}
    if not {"probes", "probe_scores", "samples"} <= views:
        return ENSEMBLE_SCHEMA.empty_table()
    cols = {r[0] for r in con.sql("describe probes").fetchall()}
    src = "threshold_source" if "threshold_source" in cols else "null::varchar as threshold_source"
    best = _frame(con, f"select layer, kind, probe_id, train_datasets, {src} from probes where is_best")
    scores = _frame(con, "select s.layer, s.kind, s.probe, s.dataset, s.sample_id, s.score from probe_scores s "
                         "join probes p on p.layer = s.layer and p.probe_id = s.probe and p.is_best")
    samples = _frame(con, "select dataset, sample_id, label, is_positive, role from samples")
    rows: list[dict[str, Any]] = []
    for kind in sorted(set(best["kind"].to_list())):
        b = best.filter(pl.col("kind") == kind).sort("layer")
        if b.height < 2:
            continue
        layers = [int(x) for x in b["layer"].to_list()]
        train_sets = sorted({d for ds in b["train_datasets"].to_list() for d in ds})
        members = [f"L{r['layer']}:{r['probe_id']}" for r in b.iter_rows(named=True)]
        sc = scores.filter(pl.col("kind") == kind).select("layer", "dataset", "sample_id", "score")
        train = samples.filter(pl.col("dataset").is_in(train_sets)).select("dataset", "sample_id")
        ens = ensemble_scores(sc, train).filter(pl.col("n_layers") == len(layers)).join(
            samples, on=["dataset", "sample_id"], how="inner")
        # Members that trained on the calibration half (controls as negatives: their thresholds are
        # ``control_oof``) score it in sample, too low for a threshold: the ensemble then calibrates on one
        # half of the unseen check half (sample_id % 4 == 1) and is checked on the other (% 4 == 3).
        seen = bool((b["threshold_source"] == "control_oof").any())
        cal_ids, chk_ids = ((pl.col("sample_id") % 4 == 1), (pl.col("sample_id") % 4 == 3)) if seen else \
            ((pl.col("sample_id") % 2 == 0), (pl.col("sample_id") % 2 == 1))
        cal = ens.filter((pl.col("role") == "control") & cal_ids & ~pl.col("dataset").is_in(train_sets))
        if cal.height:
            t, source = threshold_at_fpr(cal["score"].to_numpy(), fpr), "control_check_split" if seen else "control"
        else:
            neg = ens.filter(pl.col("dataset").is_in(train_sets) & ~pl.col("is_positive"))
            t, source = threshold_at_fpr(neg["score"].to_numpy(), fpr), "in_sample"
        name = f"{kind}__layer_ensemble__L{'+'.join(map(str, layers))}"
        for d in sorted(set(ens["dataset"].to_list()) - set(train_sets)):
            part = ens.filter(pl.col("dataset") == d)
            role = str(part["role"][0])
            if role == "control":
                part = part.filter(chk_ids)
            if not part.height:
                continue
            m = evaluate_scores(part["is_positive"].cast(pl.Int8).to_numpy(), part["score"].to_numpy(),
                                part["label"].to_list(), t, t, n_boot=n_boot, seed=seed)
            rows.append({**{k: m[k] for k in ENSEMBLE_SCHEMA.names if k in m}, "probe": name, "kind": kind,
                         "feature_set": "layer_ensemble", "aggregation": "score_mean", "layers": layers,
                         "members": members, "is_best": False, "eval_dataset": d, "eval_role": role,
                         "threshold_source": source, "selection": "none", "train_datasets": train_sets,
                         "by_label": json.dumps(m["by_label"], sort_keys=True)})
    return pa.Table.from_pylist(rows, schema=ENSEMBLE_SCHEMA)


def by_layer(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """AUROC by layer, in and out of distribution side by side: per kind and layer, the recommended probe's
    held-out-group worst / mean AUROC and its mean AUROC over ``test`` and over ``ood`` sets (the ensemble
    as its own row)."""
    views = {r[0] for r in con.sql("select table_name from information_schema.tables").fetchall()}
    if "probe_metrics" not in views:
        return pl.DataFrame()
    cols = {r[0] for r in con.sql("describe probe_metrics").fetchall()}
    layer_expr = "coalesce(cast(layer as varchar), 'ensemble ' || array_to_string(layers, '+'))" \
        if "layers" in cols else "cast(layer as varchar)"
    where = "is_best or feature_set = 'layer_ensemble'" if "feature_set" in cols else "is_best"
    m = _frame(con, f"select {layer_expr} as layer, kind, probe, eval_role, auroc, detection_rate "
                    f"from probe_metrics where {where}")
    if not m.height:
        return pl.DataFrame()
    out = m.group_by(["kind", "layer", "probe"]).agg(
        pl.col("auroc").filter(pl.col("eval_role") == "test").mean().alias("test_auroc"),
        pl.col("auroc").filter(pl.col("eval_role") == "ood").mean().alias("ood_auroc"),
        pl.col("detection_rate").filter((pl.col("eval_role") == "ood") & pl.col("auroc").is_null()).mean()
        .alias("ood_detection"),
    )
    if "probes" in views:
        held = _frame(con, "select cast(layer as varchar) as layer, kind, probe_id as probe, lodo_worst_auroc, "
                           "lodo_mean_auroc from probes where is_best")
        out = out.join(held, on=["kind", "layer", "probe"], how="left")
    return out.sort(["kind", "layer"], descending=[True, False])
