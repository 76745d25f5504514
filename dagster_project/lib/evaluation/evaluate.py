"""Evaluating saved probes: every probe on every dataset it was not trained on (``probe_metrics``),
per-sample scores of the best probes (``probe_scores``) and the cross-distribution matrix (the best
configurations refitted on each dataset and scored on every other)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from dagster_project.lib.evaluation.data import LayerData
from dagster_project.lib.evaluation.settings import EvalSettings
from dagster_project.lib.evaluation.training import LoadedProbe
from dagster_project.lib.metrics import evaluate_scores
from dagster_project.lib.probes import (
    Matrix,
    cross_validate,
    evaluate_probe,
    fit_probe,
    select_columns,
)
from dagster_project.lib.tables import (
    PROBE_CROSS_SCHEMA,
    PROBE_METRICS_SCHEMA,
    PROBE_SCORES_SCHEMA,
)


@dataclass
class EvaluationOutput:
    metrics: pa.Table
    skipped: list[str]


def evaluate_probes(data: LayerData, loaded: Sequence[LoadedProbe], settings: EvalSettings) -> EvaluationOutput:
    """Every probe on every dataset extracted at the layer that it was not trained on (a control set:
    its check half, never used for thresholds or training), at the probe's saved thresholds.

    SAE designs are built once per (dataset, value) over the union of the probes' features; dense
    designs once per (dataset, pooling). A dataset not extracted at the layer is skipped, and one
    without residual vectors is skipped for the dense baselines (both listed in ``skipped``).
    """
    sae_ids: dict[str, set[int]] = {}
    for p in loaded:
        if not p.probe.spec.is_dense:  # token-level SAE probes share one token design per dataset too
            sae_ids.setdefault(p.probe.spec.value, set()).update(p.probe.spec.feature_ids)
    union = {v: np.array(sorted(ids), dtype=np.int64) for v, ids in sae_ids.items()}
    cache: dict[tuple[str, str], Matrix] = {}
    skipped = [f"{d}: no activations at layer {data.layer}" for d in data.all_datasets() if d not in data.extracted]
    rows: list[dict[str, Any]] = []
    for p in loaded:
        spec = p.probe.spec
        for d in data.extracted:
            if d in p.train_datasets:
                continue
            if spec.is_dense:
                if not data.can_score(spec, d):
                    what = "per-token residual" if spec.is_token else "residual"
                    msg = f"{d}: no {what} vectors ({'token-level ' if spec.is_token else ''}dense baselines not evaluated)"
                    if msg not in skipped:
                        skipped.append(msg)
                    continue
            if spec.is_token and not spec.is_dense and not data.can_score(spec, d):
                continue  # no token views: token-level SAE probes were not trained either
            ev = data.eval_samples(d)
            key = (d, spec.value)
            if spec.is_token and spec.is_dense:
                if key not in cache:
                    cache[key] = data.token_dense_for(ev)
                X = cache[key]
            elif spec.is_token:
                if key not in cache:
                    cache[key] = data.token_sparse_for(ev, union[spec.value])
                X = select_columns(cache[key], union[spec.value], spec.feature_ids)
            elif spec.is_dense:
                if key not in cache:
                    cache[key] = data.dense_for(ev, spec.pooling)[0]
                X = cache[key]
            else:
                if key not in cache:
                    cache[key] = data.sparse_for(ev, union[spec.value], spec.value)[0]
                X = select_columns(cache[key], union[spec.value], spec.feature_ids)
            y = ev["is_positive"].cast(pl.Int8).to_numpy()
            m = evaluate_probe(p.probe, X, y, ev["label"].to_list(), n_boot=settings.n_boot, seed=settings.seed)
            rows.append(
                {
                    **{k: m[k] for k in PROBE_METRICS_SCHEMA.names if k in m},
                    "probe": p.probe_id,
                    "kind": p.kind,
                    "feature_set": spec.feature_set,
                    "penalty": spec.penalty,
                    "C": spec.C,
                    "transform": spec.transform,
                    "aggregation": spec.aggregation,
                    "is_best": p.is_best,
                    "rank": p.rank,
                    "degenerate": p.degenerate,
                    "selection": p.selection,
                    "selection_score": p.selection_score,
                    "threshold_source": p.probe.threshold_source,
                    "cv_auroc": p.cv_auroc,
                    "eval_dataset": d,
                    "eval_role": data.role(d),
                    "train_datasets": list(p.train_datasets),
                    "by_label": json.dumps(m["by_label"], sort_keys=True),
                }
            )
    return EvaluationOutput(metrics=pa.Table.from_pylist(rows, schema=PROBE_METRICS_SCHEMA), skipped=skipped)


def probe_scores(data: LayerData, probes: Iterable[LoadedProbe]) -> pa.Table:
    """Per-sample scores of ``probes`` on every dataset extracted at the layer (training sets included)."""
    parts: list[pa.Table] = []
    for p in probes:
        for d in data.extracted:
            if not data.can_score(p.probe.spec, d):
                continue
            X, _, keys = data.design_for(p.probe, [d])
            s = p.probe.decision_function(X)
            parts.append(
                pa.table(
                    {
                        "probe": [p.probe_id] * len(keys),
                        "kind": [p.kind] * len(keys),
                        "dataset": [k[0] for k in keys],
                        "sample_id": pa.array([k[1] for k in keys], pa.int32()),
                        "score": pa.array(s, pa.float64()),
                    },
                    schema=PROBE_SCORES_SCHEMA,
                )
            )
    return pa.concat_tables(parts) if parts else PROBE_SCORES_SCHEMA.empty_table()


def cross_train_datasets(data: LayerData) -> list[str]:
    """Datasets that can train a probe alone: extracted, with at least two samples of each class."""
    out = []
    for d in data.extracted:
        b = data.balance([d])[d]
        if b["n_pos"] >= 2 and b["n_neg"] >= 2:
            out.append(d)
    return out


def cross_distribution(
    data: LayerData, probes: Iterable[LoadedProbe], settings: EvalSettings
) -> pa.Table:
    """Refit each probe's configuration on every dataset with both classes; evaluate on every other.

    The configuration (features, penalty, C, transform; or the residual pooling) is the probe's own,
    so an SAE row's features are still those chosen by selectivity on the original training sets.
    The diagonal cell (``in_distribution``) is the cross-validated AUROC on the dataset itself (its
    spread in ``cv_std``); off-diagonal cells are AUROC with a bootstrap CI, ``None`` on a one-class
    eval set, whose ``detection_rate`` is then the number to read.
    """
    grid = settings.grid
    rows: list[dict[str, Any]] = []
    trainers = cross_train_datasets(data)
    for p in probes:
        spec = p.probe.spec
        datasets = [d for d in data.extracted if data.can_score(spec, d)]
        for t in trainers:
            if t not in datasets:
                continue
            X, y, _ = data.design_for(p.probe, [t])
            cv = cross_validate(spec, X, y, folds=grid.folds, seed=grid.seed)
            fitted = fit_probe(spec, X, y, seed=grid.seed, threshold_scores=cv.oof_scores)
            for e in datasets:
                base = {
                    "kind": p.kind, "probe": p.probe_id, "train_dataset": t, "eval_dataset": e,
                    "eval_role": data.role(e), "in_distribution": e == t, "n_nonzero": fitted.n_nonzero,
                }
                if e == t:
                    b = data.balance([t])[t]
                    rows.append({**base, "auroc": cv.mean, "cv_std": cv.std, **b})
                    continue
                Xe, ye, _ = data.design_for(fitted, [e])
                m = evaluate_scores(
                    ye, fitted.decision_function(Xe), None, fitted.train_threshold, fitted.fpr1_threshold,
                    n_boot=settings.n_boot, seed=settings.seed,
                )
                rows.append({**base, **{k: m[k] for k in PROBE_CROSS_SCHEMA.names if k in m and k not in base}})
    return pa.Table.from_pylist(rows, schema=PROBE_CROSS_SCHEMA)


# ---------------------------------------------------------------------------------------------
