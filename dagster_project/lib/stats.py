"""Feature statistics computed in DuckDB from the lake's views (``sql/stats``, ``sql/checks``; the relations
they share are in ``sql/views``).

Every function takes a DuckDB connection that already has the lake views (``samples``, ``tokens``,
``activations``; the catalog or an asset creates them) and returns a ``pyarrow.Table``. Inputs that are
themselves statistics (``feature_stats`` for selection, ``selected_features`` for transfer, any table a
check reads) can be passed as Arrow tables: they are then registered under the view name on a separate
cursor of the same database, shadowing a catalog view of that name for this call only.

Significance: ``feature_stats`` carries a two-sided Mann-Whitney U test per feature (positives vs negatives
of the training datasets on pooled ``max_act``, absent rows as tied zeros; the SQL computes the z) as
``p_value``, and Benjamini-Hochberg ``q_value``s over the layer's features (:func:`bh_q_values`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from dagster_project.lib.sql import SQLError, relation

CHECKS = ("feature_stats_nan", "feature_id_range", "selectivity_range", "train_classes")


@contextmanager
def _with_tables(
    con: duckdb.DuckDBPyConnection, tables: Mapping[str, pa.Table] | None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Yield ``con``, or a cursor of it with ``tables`` registered as (temporary) views."""
    if not tables:
        yield con
        return
    cur = con.cursor()
    try:
        for name, table in tables.items():
            cur.register(name, table)
        yield cur
    finally:
        cur.close()


def _query(
    con: duckdb.DuckDBPyConnection,
    name: str,
    params: dict[str, Any],
    tables: Mapping[str, pa.Table] | None = None,
) -> pa.Table:
    with _with_tables(con, tables) as c:
        return relation(c, name, params).to_arrow_table()


def _datasets(datasets: Sequence[str] | None) -> list[str] | None:
    if isinstance(datasets, str):
        raise TypeError(f"expected a list of dataset names, got the string {datasets!r}")
    return None if datasets is None else [str(d) for d in datasets]


SIGNIFICANCE_COLUMNS = ("p_value", "q_value")


def rank_test_p_values(z: Sequence[float | None] | np.ndarray) -> np.ndarray:
    """Two-sided p-values of standard normal deviates (``rank_z`` of the SQL): ``2 * P(Z > z)``, at most 1.

    None or NaN gives NaN. ``erfc`` keeps the far tail exact (no ``1 - cdf`` cancellation).
    """
    out = np.array([math.nan if v is None else float(v) for v in z], dtype=np.float64)
    ok = ~np.isnan(out)
    out[ok] = np.minimum(1.0, [math.erfc(v / math.sqrt(2.0)) for v in out[ok]])
    return out


def bh_q_values(p: Sequence[float | None] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) over the non-missing entries of ``p``.

    ``q_(i) = min over j >= i of p_(j) * m / j`` for the p-values sorted ascending, capped at 1, with m the
    number of non-missing p-values; None or NaN stays NaN and does not count. Features that ``q < alpha``
    selects have a false discovery rate of at most alpha under independence or positive dependence (PRDS).
    """
    p = np.array([math.nan if v is None else float(v) for v in p], dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return q


def _nullable(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float64(), mask=np.isnan(values))


def with_significance(table: pa.Table) -> pa.Table:
    """Replace the SQL's ``rank_z`` by ``p_value`` and the layer's Benjamini-Hochberg ``q_value`` (NULL where
    a class is empty)."""
    p = rank_test_p_values(table["rank_z"].to_pylist())
    q = bh_q_values(p)
    table = table.drop_columns(["rank_z"])
    return table.append_column("p_value", _nullable(p)).append_column("q_value", _nullable(q))


def feature_stats(
    con: duckdb.DuckDBPyConnection,
    layer: int,
    min_act: float = 1.0,
    train_datasets: Sequence[str] | None = None,
) -> pa.Table:
    """Per-feature class means, frequencies, selectivity and rank-test significance over the training datasets
    of ``layer``.

    ``train_datasets`` None pools every dataset whose role is ``train``. One row per feature active
    anywhere in those datasets; see ``sql/stats/feature_stats.sql`` for the columns. ``p_value`` is the
    two-sided Mann-Whitney U test (asymptotic, tie and continuity corrected, as
    ``scipy.stats.mannwhitneyu(method="asymptotic")``) of positives vs negatives on pooled max_act, a sample
    without a row for the feature counting as 0; ``q_value`` is its Benjamini-Hochberg adjustment over every
    row of the layer (every feature that fires on a training sample, ``is_active`` or not).
    """
    table = _query(
        con,
        "stats/feature_stats",
        {"layer": int(layer), "min_act": float(min_act), "train_datasets": _datasets(train_datasets)},
    )
    return with_significance(table)


def activation_profile(
    con: duckdb.DuckDBPyConnection,
    layer: int,
    sae_width: int,
    datasets: Sequence[str] | None = None,
) -> pa.Table:
    """Per-dataset density and magnitude of ``layer``'s activations (None: every dataset it has)."""
    return _query(
        con,
        "stats/activation_profile",
        {"layer": int(layer), "sae_width": int(sae_width), "datasets": _datasets(datasets)},
    )


def cross_distribution(con: duckdb.DuckDBPyConnection, layer: int, min_act: float = 1.0) -> pa.Table:
    """Jaccard overlap of active feature sets for every ordered pair of datasets (diagonal included)."""
    return _query(con, "stats/cross_distribution", {"layer": int(layer), "min_act": float(min_act)})


def _stats_with_significance(
    con: duckdb.DuckDBPyConnection, stats: pa.Table | None, fdr_alpha: float | None
) -> pa.Table | None:
    """``stats`` (or the ``feature_stats`` view) ready for selection: a table written before feature_stats had
    p_value / q_value gets NULL ones, unless ``fdr_alpha`` needs them."""
    if stats is None:
        columns = con.sql("select * from feature_stats limit 0").columns
    else:
        columns = stats.column_names
    missing = [c for c in SIGNIFICANCE_COLUMNS if c not in columns]
    if not missing:
        return stats
    if fdr_alpha is not None:
        raise ValueError(
            f"feature_stats has no {', '.join(missing)} (written before the rank test): rematerialize "
            "feature_stats to select with fdr_alpha"
        )
    if stats is None:
        stats = con.sql("select * from feature_stats").to_arrow_table()
    for c in missing:
        stats = stats.append_column(c, pa.nulls(stats.num_rows, pa.float64()))
    return stats


def selected_features(
    con: duckdb.DuckDBPyConnection,
    layer: int,
    min_selectivity: float = 0.3,
    min_freq: float = 0.0,
    keep_negative: bool = True,
    max_features: int | None = None,
    stats: pa.Table | None = None,
    fdr_alpha: float | None = None,
) -> pa.Table:
    """Active features with ``|selectivity| >= min_selectivity``, ranked, with a ``reason``.

    ``fdr_alpha`` (None: off) also requires ``q_value < fdr_alpha``. Reads the ``feature_stats`` view, or
    ``stats`` (the output of :func:`feature_stats`) when given.
    """
    if not 0.0 <= min_selectivity <= 1.0:
        raise ValueError(f"min_selectivity must be in [0, 1], got {min_selectivity!r}")
    if not 0.0 <= min_freq <= 1.0:
        raise ValueError(f"min_freq must be in [0, 1], got {min_freq!r}")
    if max_features is not None and max_features < 1:
        raise ValueError(f"max_features must be at least 1 (or None for no cap), got {max_features!r}")
    if fdr_alpha is not None and not 0.0 < fdr_alpha <= 1.0:
        raise ValueError(f"fdr_alpha must be in (0, 1] (None: no significance filter), got {fdr_alpha!r}")
    stats = _stats_with_significance(con, stats, fdr_alpha)
    return _query(
        con,
        "stats/selected_features",
        {
            "layer": int(layer),
            "min_selectivity": float(min_selectivity),
            "min_freq": float(min_freq),
            "keep_negative": bool(keep_negative),
            "max_features": None if max_features is None else int(max_features),
            "fdr_alpha": None if fdr_alpha is None else float(fdr_alpha),
        },
        tables=None if stats is None else {"feature_stats": stats},
    )


def selected_transfer(
    con: duckdb.DuckDBPyConnection,
    layer: int,
    train_datasets: Sequence[str] | None = None,
    selected: pa.Table | None = None,
) -> pa.Table:
    """Per dataset and direction: how many selected features fire, and how strongly vs. training.

    Reads the ``selected_features`` view, or ``selected`` (output of :func:`selected_features`).
    """
    return _query(
        con,
        "stats/selected_transfer",
        {"layer": int(layer), "train_datasets": _datasets(train_datasets)},
        tables=None if selected is None else {"selected_features": selected},
    )


def dataset_selectivity(con: duckdb.DuckDBPyConnection, layer: int, min_act: float = 1.0) -> pa.Table:
    """Per (dataset, feature) selectivity on every dataset that has both classes."""
    return _query(con, "stats/dataset_selectivity", {"layer": int(layer), "min_act": float(min_act)})


def rank_correlation(con: duckdb.DuckDBPyConnection, layer: int, min_act: float = 1.0) -> pa.Table:
    """Spearman correlation of per-dataset selectivity for each pair of datasets with both classes."""
    return _query(con, "stats/selectivity_rank_correlation", {"layer": int(layer), "min_act": float(min_act)})


def run_check(
    con: duckdb.DuckDBPyConnection,
    name: str,
    params: Mapping[str, Any],
    tables: Mapping[str, pa.Table] | None = None,
) -> pa.Table:
    """Run ``sql/checks/<name>.sql``; rows are violations (``train_classes``: the per-dataset counts)."""
    if name not in CHECKS:
        raise SQLError(f"unknown check {name!r}; known: {', '.join(CHECKS)}")
    return _query(con, f"checks/{name}", dict(params), tables)


@dataclass(frozen=True)
class CheckOutcome:
    """What an asset check needs: pass/fail, a sentence naming what is wrong, and the rows."""

    passed: bool
    description: str
    rows: pa.Table

    @property
    def n_violations(self) -> int:
        return 0 if self.passed else self.rows.num_rows


def evaluate_check(
    con: duckdb.DuckDBPyConnection,
    name: str,
    params: Mapping[str, Any],
    tables: Mapping[str, pa.Table] | None = None,
) -> CheckOutcome:
    """Run a check and judge it: no rows passes, except ``train_classes`` (both classes present)."""
    rows = run_check(con, name, params, tables)
    if name == "train_classes":
        return _judge_train_classes(rows)
    if rows.num_rows == 0:
        return CheckOutcome(True, f"{name}: no violations", rows)
    preview = rows.slice(0, 5).to_pylist()
    return CheckOutcome(False, f"{name}: {rows.num_rows} violating rows, e.g. {preview}", rows)


def _judge_train_classes(rows: pa.Table) -> CheckOutcome:
    records = rows.to_pylist()
    names = ", ".join(r["dataset"] for r in records) or "(none)"
    if not records:
        return CheckOutcome(
            False, "no training datasets: no dataset has role 'train' and none was configured", rows
        )
    missing = [r["dataset"] for r in records if not r["in_samples"]]
    if missing:
        return CheckOutcome(
            False, f"configured training datasets not in the lake: {', '.join(missing)}", rows
        )
    n_pos = sum(r["n_positive"] for r in records)
    n_neg = sum(r["n_negative"] for r in records)
    counts = "; ".join(f"{r['dataset']}: {r['n_positive']} pos / {r['n_negative']} neg" for r in records)
    if n_pos == 0 or n_neg == 0:
        lacking = "positive" if n_pos == 0 else "negative"
        return CheckOutcome(
            False,
            f"training datasets {names} have no {lacking} sample ({counts}): selectivity is undefined",
            rows,
        )
    return CheckOutcome(True, f"training datasets have both classes ({counts})", rows)
