"""Design matrices for probes: pooled sparse SAE rows from the lake as a CSR sample x feature matrix
(``sparse_design``, never the full SAE width), pooled residual vectors for the dense baseline
(``dense_design``), column selection, and the value kinds a probe reads."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp
from numpy.typing import NDArray

from dagster_project.lib.token_probes import TokenMatrix

logger = logging.getLogger(__name__)


Matrix: TypeAlias = sp.csr_matrix | NDArray[np.float64] | TokenMatrix
Pooled: TypeAlias = sp.csr_matrix | NDArray[np.float64]  # a design with one row per text (what transforms take)
TableLike: TypeAlias = pl.DataFrame | pl.LazyFrame | pa.Table
Key: TypeAlias = tuple[str, int]


SPARSE_VALUES = ("max_act", "mean_act")
DENSE_VALUES = ("resid_mean", "resid_max", "resid_both")
TOKEN_VALUES = ("token_act", "token_resid")  # per-token SAE activations / residuals (token-level probes)


def to_polars(table: TableLike, what: str) -> pl.DataFrame:
    if isinstance(table, pl.LazyFrame):
        return table.collect()
    if isinstance(table, pl.DataFrame):
        return table
    if isinstance(table, pa.Table):
        out = pl.from_arrow(table)
        assert isinstance(out, pl.DataFrame)
        return out
    raise TypeError(f"{what} must be a polars DataFrame/LazyFrame or a pyarrow Table, got {type(table)}")


def require_columns(df: pl.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; it has {df.columns}")


def _sample_index(samples: TableLike) -> tuple[pl.DataFrame, NDArray[np.int8], list[Key]]:
    """Samples in their given order with a row number, their 0/1 labels and their keys."""
    df = to_polars(samples, "samples")
    require_columns(df, ("dataset", "sample_id", "is_positive"), "samples")
    df = df.with_columns(
        pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64)
    ).with_row_index("_row")
    if df.select(pl.struct("dataset", "sample_id").is_duplicated().any()).item():
        raise ValueError("samples has duplicate (dataset, sample_id) keys")
    n_null = df["is_positive"].null_count()
    if n_null:
        raise ValueError(f"samples has {n_null} row(s) with a null is_positive; label them or drop them")
    y = df["is_positive"].cast(pl.Int8).to_numpy().astype(np.int8)
    keys = list(zip(df["dataset"].to_list(), df["sample_id"].to_list(), strict=True))
    return df.select("_row", "dataset", "sample_id"), y, keys


def active_feature_ids(rows: TableLike) -> NDArray[np.int64]:
    """Sorted distinct ``feature_id`` values present in pooled sparse rows (the active features)."""
    df = to_polars(rows, "rows")
    require_columns(df, ("feature_id",), "rows")
    return np.sort(df["feature_id"].unique().cast(pl.Int64).to_numpy())


def sparse_design(
    rows: TableLike,
    samples: TableLike,
    feature_ids: Sequence[int] | NDArray[np.integer[Any]],
    value: str = "max_act",
) -> tuple[sp.csr_matrix, NDArray[np.int8], list[Key]]:
    """Sample x feature CSR matrix straight from pooled sparse rows.

    Rows follow the order of ``samples`` (so ``samples["label"]`` lines up with them), columns the
    order of ``feature_ids``. Rows of features outside ``feature_ids`` or of samples outside
    ``samples`` are dropped; a sample with no rows is an all-zero row (no feature fired). Returns
    ``(X, y, keys)`` with ``y`` from ``samples.is_positive`` and ``keys`` the ``(dataset,
    sample_id)`` of each row.
    """
    if value not in SPARSE_VALUES:
        raise ValueError(f"value must be one of {SPARSE_VALUES}, got {value!r}")
    index, y, keys = _sample_index(samples)
    fids = np.asarray(feature_ids, dtype=np.int64)
    if fids.ndim != 1:
        raise ValueError(f"feature_ids must be one-dimensional, got shape {fids.shape}")
    if np.unique(fids).size != fids.size:
        raise ValueError("feature_ids has duplicates")
    df = to_polars(rows, "rows")
    require_columns(df, ("dataset", "sample_id", "feature_id", value), "rows")
    cols = pl.DataFrame({"feature_id": fids, "_col": np.arange(fids.size, dtype=np.int64)})
    joined = (
        df.lazy()
        .select(
            pl.col("dataset").cast(pl.String),
            pl.col("sample_id").cast(pl.Int64),
            pl.col("feature_id").cast(pl.Int64),
            pl.col(value).cast(pl.Float64).alias("_value"),
        )
        .join(cols.lazy(), on="feature_id", how="inner")
        .join(index.lazy(), on=["dataset", "sample_id"], how="inner")
        .select("_row", "_col", "_value")
        .collect()
    )
    if joined["_value"].null_count():
        raise ValueError(f"rows has null {value} values")
    if joined.select(pl.struct("_row", "_col").is_duplicated().any()).item():
        raise ValueError("rows has more than one row for some (dataset, sample_id, feature_id)")
    dropped = df.height - joined.height
    if dropped:
        logger.debug("sparse_design: %d rows outside the samples/feature set were left out", dropped)
    X = sp.csr_matrix(
        (
            joined["_value"].to_numpy(),
            (joined["_row"].cast(pl.Int64).to_numpy(), joined["_col"].to_numpy()),
        ),
        shape=(len(keys), fids.size),
        dtype=np.float64,
    )
    X.sort_indices()
    return X, y, keys


def dense_design(
    residuals: TableLike, samples: TableLike, pooling: Literal["mean", "max", "both"] = "mean"
) -> tuple[NDArray[np.float64], NDArray[np.int8], list[Key]]:
    """Sample x d_model matrix of pooled residuals (``both``: mean then max, concatenated).

    Rows follow the order of ``samples``; every sample must have a residual row (a missing one is
    an extraction gap, not a zero vector) and every vector the same width.
    """
    if pooling not in ("mean", "max", "both"):
        raise ValueError(f"pooling must be 'mean', 'max' or 'both', got {pooling!r}")
    index, y, keys = _sample_index(samples)
    cols = ["resid_mean", "resid_max"] if pooling == "both" else [f"resid_{pooling}"]
    df = to_polars(residuals, "residuals")
    require_columns(df, ("dataset", "sample_id", *cols), "residuals")
    joined = index.join(
        df.select(pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64), *cols),
        on=["dataset", "sample_id"],
        how="left",
    ).sort("_row")
    if joined.height != len(keys):
        raise ValueError("residuals has more than one row for some (dataset, sample_id)")
    parts = []
    for c in cols:
        missing = joined[c].null_count()
        if missing:
            raise ValueError(f"{missing} sample(s) have no {c} vector in residuals")
        widths = joined[c].list.len().unique()
        if widths.len() != 1:
            raise ValueError(f"{c} vectors have different lengths: {sorted(widths.to_list())}")
        width = int(widths[0])
        parts.append(joined[c].cast(pl.Array(pl.Float64, width)).to_numpy().astype(np.float64, copy=False))
    X = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return X, y, keys


def select_columns(
    X: Any, feature_ids: Sequence[int] | NDArray[np.integer[Any]], wanted: Sequence[int] | NDArray[np.integer[Any]]
) -> Any:
    """Columns of ``X`` (whose columns are ``feature_ids``) for ``wanted``, in that order (a
    :class:`TokenMatrix` stays one)."""
    pos = {int(f): i for i, f in enumerate(np.asarray(feature_ids).tolist())}
    missing = [int(f) for f in wanted if int(f) not in pos]
    if missing:
        raise ValueError(f"{len(missing)} wanted feature(s) are not columns of X, e.g. {missing[:5]}")
    cols = [pos[int(f)] for f in wanted]
    if isinstance(X, TokenMatrix):
        return X.take_columns(cols)
    return sp.csr_matrix(X[:, cols])


def indexable_rows(X: Any) -> Any:
    """``X`` ready for row indexing (CSR, a dense array, or a :class:`TokenMatrix` as it is)."""
    if isinstance(X, TokenMatrix):
        return X
    return X.tocsr() if sp.issparse(X) else np.asarray(X)
