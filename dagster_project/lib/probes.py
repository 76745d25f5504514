"""Linear probes on pooled SAE features (and on pooled residuals, as the dense baseline).

Pure functions and small classes, no dagster import. The flow an asset follows:

1. ``sparse_design(rows, samples, feature_ids)`` turns pooled sparse rows from the lake into a CSR
   sample x feature matrix (columns restricted to ``feature_ids``, in that order), never building a
   dense array of the full SAE width. ``dense_design(residuals, samples, pooling)`` does the same for
   the pooled residual vectors of the baseline.
2. ``probe_grid(config, selectivity, active_feature_ids, classification_scores)`` expands the
   feature sets x penalties x C values to try; ``search_probes`` runs it (cross-validated on the
   training set), sweeps the transforms on the best setting, and fits each spec on all of it.
3. ``FittedProbe.decision_function(X)`` scores any set built with the probe's own feature ids;
   ``FittedProbe.save(dir)`` / ``load_probe(dir)`` round-trip it exactly.

Scores are logistic-regression decision values (log-odds); a sample is flagged when its score is
strictly greater than a threshold (see ``metrics``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp
import sklearn
from numpy.typing import ArrayLike, NDArray
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import QuantileTransformer, StandardScaler

from dagster_project.lib.lake import replace_dir
from dagster_project.lib.metrics import auroc, evaluate_scores, threshold_at_fpr
from dagster_project.lib.selection import HeldOutSplit, group_folds, held_out_score, selection_score
from dagster_project.lib.token_probes import AGGREGATIONS, TokenMatrix, aggregate

logger = logging.getLogger(__name__)

Matrix: TypeAlias = sp.csr_matrix | NDArray[np.float64] | TokenMatrix
TableLike: TypeAlias = pl.DataFrame | pl.LazyFrame | pa.Table
Key: TypeAlias = tuple[str, int]

PROBE_FORMAT_VERSION = 1
PROBE_JSON = "probe.json"
PROBE_ARRAYS = "arrays.npz"

SPARSE_VALUES = ("max_act", "mean_act")
DENSE_VALUES = ("resid_mean", "resid_max", "resid_both")
TOKEN_VALUES = ("token_act", "token_resid")  # per-token SAE activations / residuals (token-level probes)
TRANSFORMS = ("raw", "binary", "log1p", "zscore", "quantile")
PENALTIES = ("l1", "l2")


# ---------------------------------------------------------------------------------------------
# Design matrices
# ---------------------------------------------------------------------------------------------


def _to_polars(table: TableLike, what: str) -> pl.DataFrame:
    if isinstance(table, pl.LazyFrame):
        return table.collect()
    if isinstance(table, pl.DataFrame):
        return table
    if isinstance(table, pa.Table):
        out = pl.from_arrow(table)
        assert isinstance(out, pl.DataFrame)
        return out
    raise TypeError(f"{what} must be a polars DataFrame/LazyFrame or a pyarrow Table, got {type(table)}")


def _require(df: pl.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; it has {df.columns}")


def _sample_index(samples: TableLike) -> tuple[pl.DataFrame, NDArray[np.int8], list[Key]]:
    """Samples in their given order with a row number, their 0/1 labels and their keys."""
    df = _to_polars(samples, "samples")
    _require(df, ("dataset", "sample_id", "is_positive"), "samples")
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
    df = _to_polars(rows, "rows")
    _require(df, ("feature_id",), "rows")
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
    df = _to_polars(rows, "rows")
    _require(df, ("dataset", "sample_id", "feature_id", value), "rows")
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
    df = _to_polars(residuals, "residuals")
    _require(df, ("dataset", "sample_id", *cols), "residuals")
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
    X: Any, feature_ids: Sequence[int] | NDArray[np.integer[Any]], wanted: Sequence[int]
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


def _rows(X: Any) -> Any:
    """``X`` ready for row indexing (CSR, a dense array, or a :class:`TokenMatrix` as it is)."""
    if isinstance(X, TokenMatrix):
        return X
    return X.tocsr() if sp.issparse(X) else np.asarray(X)


# ---------------------------------------------------------------------------------------------
# Transforms: fit on train, apply to anything, save and load
# ---------------------------------------------------------------------------------------------


class Transform(Protocol):
    """A feature transform fitted on training data and applied unchanged to evaluation data."""

    name: str

    def fit(self, X: Matrix) -> Transform: ...

    def apply(self, X: Matrix) -> Matrix: ...

    def state(self) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        """JSON-ready parameters and arrays that ``from_state`` rebuilds this transform from."""
        ...


def _sparse_or_dense(X: Matrix) -> Matrix:
    return sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else np.asarray(X, dtype=np.float64)


class RawTransform:
    """Identity."""

    name = "raw"

    def fit(self, X: Matrix) -> RawTransform:
        return self

    def apply(self, X: Matrix) -> Matrix:
        return _sparse_or_dense(X)

    def state(self) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        return {}, {}


class BinaryTransform:
    """1 where the feature fired (> 0), else 0. Keeps sparsity."""

    name = "binary"

    def fit(self, X: Matrix) -> BinaryTransform:
        return self

    def apply(self, X: Matrix) -> Matrix:
        if sp.issparse(X):
            out = sp.csr_matrix(X, dtype=np.float64, copy=True)
            out.data = (out.data > 0).astype(np.float64)
            out.eliminate_zeros()
            return out
        return (np.asarray(X) > 0).astype(np.float64)

    def state(self) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        return {}, {}


class Log1pTransform:
    """``sign(x) * log1p(|x|)``: ``log1p`` for the non-negative pooled activations. Keeps sparsity."""

    name = "log1p"

    def fit(self, X: Matrix) -> Log1pTransform:
        return self

    def apply(self, X: Matrix) -> Matrix:
        if sp.issparse(X):
            out = sp.csr_matrix(X, dtype=np.float64, copy=True)
            out.data = np.sign(out.data) * np.log1p(np.abs(out.data))
            return out
        arr = np.asarray(X, dtype=np.float64)
        return np.sign(arr) * np.log1p(np.abs(arr))

    def state(self) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        return {}, {}


class ZScoreTransform:
    """Per-sample z-score across the chosen features: ``(x - row mean) / row std``.

    Stateless (each sample is normalised by itself). The output is dense, of size samples x chosen
    features (never the full SAE width); a row with zero spread becomes all zeros.
    """

    name = "zscore"

    def fit(self, X: Matrix) -> ZScoreTransform:
        return self

    def apply(self, X: Matrix) -> Matrix:
        arr = X.toarray() if sp.issparse(X) else np.array(X, dtype=np.float64)
        arr = arr.astype(np.float64, copy=False)
        mu = arr.mean(axis=1, keepdims=True)
        sd = arr.std(axis=1, keepdims=True)
        safe = np.where(sd > 0, sd, 1.0)
        return np.where(sd > 0, (arr - mu) / safe, 0.0)

    def state(self) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        return {}, {}


class QuantileTransform:
    """sklearn ``QuantileTransformer`` (uniform output) fitted on the training samples.

    On sparse input sklearn maps only the stored (non-zero) entries and keeps implicit zeros at 0;
    zero is the floor of pooled activations, so the map stays monotone and the output stays sparse.
    """

    name = "quantile"

    def __init__(self, n_quantiles: int = 1000, seed: int = 0) -> None:
        self.n_quantiles = n_quantiles
        self.seed = seed
        self._qt: QuantileTransformer | None = None

    def fit(self, X: Matrix) -> QuantileTransform:
        n = X.shape[0]
        qt = QuantileTransformer(
            n_quantiles=max(2, min(self.n_quantiles, n)),
            output_distribution="uniform",
            subsample=max(10_000, n),
            random_state=self.seed,
        )
        qt.fit(sp.csc_matrix(X) if sp.issparse(X) else np.asarray(X, dtype=np.float64))
        self._qt = qt
        return self

    def apply(self, X: Matrix) -> Matrix:
        if self._qt is None:
            raise RuntimeError("QuantileTransform.apply called before fit")
        out = self._qt.transform(sp.csc_matrix(X, dtype=np.float64) if sp.issparse(X) else X)
        return sp.csr_matrix(out) if sp.issparse(out) else np.asarray(out, dtype=np.float64)

    def state(self) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        if self._qt is None:
            raise RuntimeError("QuantileTransform.state called before fit")
        params = {"n_quantiles": self.n_quantiles, "seed": self.seed, "n_quantiles_": self._qt.n_quantiles_}
        return params, {"quantiles": self._qt.quantiles_, "references": self._qt.references_}

    @classmethod
    def from_state(cls, params: Mapping[str, Any], arrays: Mapping[str, NDArray[Any]]) -> QuantileTransform:
        obj = cls(n_quantiles=int(params["n_quantiles"]), seed=int(params["seed"]))
        qt = QuantileTransformer(
            n_quantiles=int(params["n_quantiles_"]), output_distribution="uniform", random_state=obj.seed
        )
        qt.n_quantiles_ = int(params["n_quantiles_"])
        qt.quantiles_ = np.asarray(arrays["quantiles"], dtype=np.float64)
        qt.references_ = np.asarray(arrays["references"], dtype=np.float64)
        qt.n_features_in_ = qt.quantiles_.shape[1]
        obj._qt = qt
        return obj


_STATELESS: dict[str, type[RawTransform | BinaryTransform | Log1pTransform | ZScoreTransform]] = {
    "raw": RawTransform,
    "binary": BinaryTransform,
    "log1p": Log1pTransform,
    "zscore": ZScoreTransform,
}


def make_transform(name: str, seed: int = 0) -> Transform:
    """A fresh, unfitted transform by name (one of ``TRANSFORMS``)."""
    if name == "quantile":
        return QuantileTransform(seed=seed)
    if name in _STATELESS:
        return _STATELESS[name]()
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {name!r}")


def transform_from_state(
    name: str, params: Mapping[str, Any], arrays: Mapping[str, NDArray[Any]]
) -> Transform:
    """Rebuild a fitted transform from what its ``state()`` returned."""
    if name == "quantile":
        return QuantileTransform.from_state(params, arrays)
    return make_transform(name)


# ---------------------------------------------------------------------------------------------
# Probe specs and fitted probes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSpec:
    """One probe configuration.

    ``feature_ids`` are SAE feature ids (the columns of the design, in order) for SAE probes; for
    the residual baselines (``value`` one of ``DENSE_VALUES``) they are empty and the columns are
    the residual dimensions. ``scale`` standardises columns after the transform (no centring on
    sparse input, so sparsity survives).
    """

    name: str
    feature_set: str
    feature_ids: tuple[int, ...]
    penalty: Literal["l1", "l2"] = "l1"
    C: float = 1.0
    transform: str = "raw"
    value: str = "max_act"
    scale: bool = True
    aggregation: str = "pooled"
    agg_k: int = 5
    agg_window: int = 16

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ProbeSpec.name must be non-empty")
        if self.penalty not in PENALTIES:
            raise ValueError(f"ProbeSpec.penalty must be one of {PENALTIES}, got {self.penalty!r}")
        try:
            C = float(self.C)
        except (TypeError, ValueError):
            raise ValueError(f"ProbeSpec.C must be a positive finite number, got {self.C!r}") from None
        if not (math.isfinite(C) and C > 0):
            raise ValueError(f"ProbeSpec.C must be a positive finite number, got {self.C!r}")
        object.__setattr__(self, "C", C)
        if self.transform not in TRANSFORMS:
            raise ValueError(f"ProbeSpec.transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.value not in SPARSE_VALUES + DENSE_VALUES + TOKEN_VALUES:
            raise ValueError(
                f"ProbeSpec.value must be one of {SPARSE_VALUES + DENSE_VALUES + TOKEN_VALUES}, got {self.value!r}"
            )
        if self.is_token != (self.aggregation != "pooled") or self.aggregation not in ("pooled", *AGGREGATIONS):
            raise ValueError(
                f"ProbeSpec.aggregation must be 'pooled' for a pooled value and one of {AGGREGATIONS} for a token "
                f"value; got {self.aggregation!r} with value {self.value!r}"
            )
        object.__setattr__(self, "feature_ids", tuple(int(f) for f in self.feature_ids))
        if self.is_dense:
            if self.feature_ids:
                raise ValueError("ProbeSpec.feature_ids must be empty for a residual baseline")
        elif not self.feature_ids:
            raise ValueError(f"ProbeSpec.feature_ids is empty for SAE probe {self.name!r}")
        if len(set(self.feature_ids)) != len(self.feature_ids):
            raise ValueError(f"ProbeSpec.feature_ids has duplicates in {self.name!r}")

    @property
    def is_dense(self) -> bool:
        """True for a residual-stream baseline (pooled or token-level)."""
        return self.value in DENSE_VALUES or self.value == "token_resid"

    @property
    def is_token(self) -> bool:
        """True for a token-level probe (scores every token, then aggregates per text)."""
        return self.value in TOKEN_VALUES

    @property
    def pooling(self) -> Literal["mean", "max", "both"]:
        """``dense_design`` pooling of a residual baseline."""
        if not self.is_dense:
            raise ValueError(f"{self.name!r} is not a residual baseline")
        return self.value.removeprefix("resid_")  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"feature_ids": list(self.feature_ids)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ProbeSpec:
        return cls(**{**d, "feature_ids": tuple(d["feature_ids"])})


def spec_name(feature_set: str, penalty: str, C: float, transform: str, value: str, aggregation: str = "pooled") -> str:
    """The canonical probe name, e.g. ``top50|l1|C=0.1|raw|max_act`` (``...|token_act|window_max`` for a
    token-level probe)."""
    name = f"{feature_set}|{penalty}|C={C:g}|{transform}|{value}"
    return name if aggregation == "pooled" else f"{name}|{aggregation}"


@dataclass
class FittedProbe:
    """A probe fitted on training data: transform, column scaling and logistic weights.

    ``decision_function`` computes ``T(X) @ (coef / scale) + (intercept - (mean / scale) @ coef)``
    with numpy, so a loaded probe reproduces the scores bit for bit.
    """

    spec: ProbeSpec
    coef: NDArray[np.float64]
    intercept: float
    transform: Transform
    scaler_mean: NDArray[np.float64]
    scaler_scale: NDArray[np.float64]
    train_threshold: float
    fpr1_threshold: float
    threshold_source: str
    n_train: int
    n_train_pos: int
    n_iter: int
    converged: bool
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.coef.size)

    @property
    def n_nonzero(self) -> int:
        """Number of non-zero weights (the features an L1 probe kept)."""
        return int(np.count_nonzero(self.coef))

    @property
    def feature_ids(self) -> tuple[int, ...]:
        return self.spec.feature_ids

    def effective_weights(self) -> tuple[NDArray[np.float64], float]:
        """Weights and intercept on the transformed (unscaled) features."""
        w = self.coef / self.scaler_scale
        return w, float(self.intercept - float(self.scaler_mean @ w))

    def decision_function(self, X: Matrix) -> NDArray[np.float64]:
        """Scores (log-odds) for a design whose columns are this probe's features, in order."""
        if X.shape[1] != self.n_features:
            raise ValueError(f"X has {X.shape[1]} columns but probe {self.spec.name!r} has {self.n_features}")
        w, b = self.effective_weights()
        if isinstance(X, TokenMatrix):
            if not self.spec.is_token:
                raise ValueError(f"probe {self.spec.name!r} is pooled; score it on a pooled design")
            tok = np.asarray(self.transform.apply(X.tokens) @ w, dtype=np.float64).ravel() + b
            return aggregate(tok, X.offsets, self.spec.aggregation, self.spec.agg_k, self.spec.agg_window)
        if self.spec.is_token:
            raise ValueError(f"probe {self.spec.name!r} is token-level; score it on a TokenMatrix")
        Xt = self.transform.apply(X)
        return np.asarray(Xt @ w, dtype=np.float64).ravel() + b

    def top_features(self, k: int = 20) -> list[tuple[int, float]]:
        """The ``k`` largest weights by magnitude (standardised scale) as ``(feature_id, weight)``."""
        if self.spec.is_dense:
            ids: Sequence[int] = range(self.n_features)
        else:
            ids = self.spec.feature_ids
        order = np.argsort(-np.abs(self.coef), kind="stable")[:k]
        return [(int(ids[i]), float(self.coef[i])) for i in order if self.coef[i] != 0]

    def score_rows(self, rows: TableLike, samples: TableLike) -> tuple[NDArray[np.float64], list[Key]]:
        """Scores for the samples of an SAE-probe eval set, straight from its pooled sparse rows."""
        if self.spec.is_dense:
            raise ValueError(f"{self.spec.name!r} is a residual baseline; score it on dense_design output")
        X, _, keys = sparse_design(rows, samples, self.spec.feature_ids, self.spec.value)
        return self.decision_function(X), keys

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``probe.json`` and ``arrays.npz`` into ``directory``, replacing it whole.

        Written into a sibling temp folder first and renamed into place, so a reader never sees a
        half-written probe.
        """
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        t_params, t_arrays = self.transform.state()
        arrays: dict[str, NDArray[Any]] = {
            "feature_ids": np.asarray(self.spec.feature_ids, dtype=np.int64),
            "coef": self.coef,
            "scaler_mean": self.scaler_mean,
            "scaler_scale": self.scaler_scale,
            **{f"transform__{k}": v for k, v in t_arrays.items()},
        }
        tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            np.savez_compressed(tmp / PROBE_ARRAYS, **arrays)  # type: ignore[arg-type]
            digest = hashlib.sha256((tmp / PROBE_ARRAYS).read_bytes()).hexdigest()
            ids = self.spec.feature_ids if not self.spec.is_dense else tuple(range(self.n_features))
            doc = {
                "format_version": PROBE_FORMAT_VERSION,
                "spec": self.spec.to_json(),
                "intercept": self.intercept,
                "n_features": self.n_features,
                "n_nonzero": self.n_nonzero,
                "weights": [
                    {"feature_id": int(ids[i]), "weight": float(self.coef[i])}
                    for i in np.argsort(-np.abs(self.coef), kind="stable")
                    if self.coef[i] != 0
                ],
                "weights_note": "logistic weights on standardised features, non-zero only, by |weight|",
                "transform": {"name": self.transform.name, "params": t_params},
                "scaler": {"scale": self.spec.scale, "centred": bool(np.any(self.scaler_mean != 0))},
                "train_threshold": self.train_threshold,
                "fpr1_threshold": self.fpr1_threshold,
                "threshold_source": self.threshold_source,
                "n_train": self.n_train,
                "n_train_pos": self.n_train_pos,
                "n_iter": self.n_iter,
                "converged": self.converged,
                "sklearn_version": sklearn.__version__,
                "provenance": self.provenance,
                "arrays": {"file": PROBE_ARRAYS, "sha256": digest},
            }
            (tmp / PROBE_JSON).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def load_probe(directory: str | os.PathLike[str]) -> FittedProbe:
    """Load a probe written by ``FittedProbe.save``; checks the array file's hash and feature ids."""
    d = Path(directory)
    doc = json.loads((d / PROBE_JSON).read_text())
    if doc.get("format_version") != PROBE_FORMAT_VERSION:
        raise ValueError(
            f"{d / PROBE_JSON} has format_version {doc.get('format_version')!r}, expected {PROBE_FORMAT_VERSION}"
        )
    raw = (d / doc["arrays"]["file"]).read_bytes()
    if hashlib.sha256(raw).hexdigest() != doc["arrays"]["sha256"]:
        raise ValueError(f"{d / doc['arrays']['file']} does not match the hash recorded in {PROBE_JSON}")
    with np.load(d / doc["arrays"]["file"], allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    spec = ProbeSpec.from_json(doc["spec"])
    if tuple(arrays["feature_ids"].tolist()) != spec.feature_ids:
        raise ValueError(f"feature ids in {doc['arrays']['file']} differ from the spec in {PROBE_JSON}")
    t = doc["transform"]
    t_arrays = {k.removeprefix("transform__"): v for k, v in arrays.items() if k.startswith("transform__")}
    return FittedProbe(
        spec=spec,
        coef=arrays["coef"].astype(np.float64),
        intercept=float(doc["intercept"]),
        transform=transform_from_state(t["name"], t["params"], t_arrays),
        scaler_mean=arrays["scaler_mean"].astype(np.float64),
        scaler_scale=arrays["scaler_scale"].astype(np.float64),
        train_threshold=float(doc["train_threshold"]),
        fpr1_threshold=float(doc["fpr1_threshold"]),
        threshold_source=str(doc["threshold_source"]),
        n_train=int(doc["n_train"]),
        n_train_pos=int(doc["n_train_pos"]),
        n_iter=int(doc["n_iter"]),
        converged=bool(doc["converged"]),
        provenance=dict(doc.get("provenance", {})),
    )


# ---------------------------------------------------------------------------------------------
# Fitting and cross-validation
# ---------------------------------------------------------------------------------------------


def _make_classifier(spec: ProbeSpec, seed: int, balanced: bool = True) -> LogisticRegression:
    class_weight = "balanced" if balanced else None
    if spec.penalty == "l1":
        # liblinear: exact zeros, fast on a few thousand samples; it regularises the intercept
        # as a synthetic feature, so give that feature a large scale to leave it nearly free.
        return LogisticRegression(
            l1_ratio=1.0,
            C=spec.C,
            solver="liblinear",
            class_weight=class_weight,
            max_iter=5000,
            intercept_scaling=10.0,
            random_state=seed,
        )
    return LogisticRegression(
        l1_ratio=0.0, C=spec.C, solver="lbfgs", class_weight=class_weight, max_iter=5000, random_state=seed
    )


def fit_probe(
    spec: ProbeSpec,
    X: Matrix,
    y: ArrayLike,
    seed: int = 0,
    *,
    threshold_scores: ArrayLike | None = None,
    fpr: float = 0.01,
    provenance: Mapping[str, Any] | None = None,
    sample_weight: ArrayLike | None = None,
    token_train_max: int = 32,
) -> FittedProbe:
    """Fit ``spec`` on ``(X, y)``; ``X``'s columns are ``spec.feature_ids`` in order.

    Logistic regression with balanced class weights (liblinear for L1, lbfgs for L2), after the
    spec's transform and, if ``spec.scale``, a ``StandardScaler`` (``with_mean=False`` on sparse
    input). ``train_threshold`` is 0, the decision boundary of the balanced fit; ``fpr1_threshold``
    is ``threshold_at_fpr`` on the training negatives' scores, taken from ``threshold_scores``
    (e.g. the out-of-fold scores from ``cross_validate``, which are not flattered by the fit) when
    given, else from the in-sample scores. A convergence warning is logged, not hidden.

    ``sample_weight`` (e.g. ``selection.group_weights``, which already balances the classes) replaces the
    balanced class weights. A :class:`TokenMatrix` ``X`` (a token-level spec) fits on at most
    ``token_train_max`` evenly spaced tokens of each text, each token carrying its text's label and
    ``1 / n`` of its text's weight.
    """
    yy = np.asarray(y).astype(np.int8)
    if yy.ndim != 1 or yy.size != X.shape[0]:
        raise ValueError(f"y has {yy.size} entries but X has {X.shape[0]} rows")
    if not spec.is_dense and X.shape[1] != len(spec.feature_ids):
        raise ValueError(f"X has {X.shape[1]} columns but spec {spec.name!r} has {len(spec.feature_ids)}")
    n_pos = int(yy.sum())
    if n_pos == 0 or n_pos == yy.size:
        raise ValueError(f"fit_probe needs both classes, got {n_pos} positive of {yy.size}")

    sw = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if sw is not None and sw.shape != yy.shape:
        raise ValueError(f"sample_weight has {sw.size} entries but y has {yy.size}")
    fit_X, fit_y, fit_w = X, yy, sw
    if isinstance(X, TokenMatrix):  # token rows, each text weighing the same (balanced classes unless weighted)
        rows, texts = X.sample(token_train_max)
        text_w = sw if sw is not None else np.where(yy == 1, yy.size / (2.0 * n_pos), yy.size / (2.0 * (yy.size - n_pos)))
        per_text = np.bincount(texts, minlength=yy.size).astype(np.float64)
        fit_X, fit_y = X.tokens[rows], yy[texts]
        fit_w = text_w[texts] / per_text[texts]
    transform = make_transform(spec.transform, seed=seed).fit(fit_X)
    Xt = transform.apply(fit_X)
    sparse = sp.issparse(Xt)
    n_cols = Xt.shape[1]
    if spec.scale:
        scaler = StandardScaler(with_mean=not sparse).fit(Xt)
        mean = np.asarray(scaler.mean_, dtype=np.float64) if not sparse else np.zeros(n_cols)
        scale = np.asarray(scaler.scale_, dtype=np.float64)
    else:
        mean, scale = np.zeros(n_cols), np.ones(n_cols)
    Xs = sp.csr_matrix(Xt @ sp.diags(1.0 / scale)) if sparse else (Xt - mean) / scale

    clf = _make_classifier(spec, seed, balanced=fit_w is None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(Xs, fit_y, sample_weight=fit_w)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            logger.warning("probe %s did not converge: %s", spec.name, w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    probe = FittedProbe(
        spec=spec,
        coef=np.asarray(clf.coef_, dtype=np.float64).ravel().copy(),
        intercept=float(np.asarray(clf.intercept_).ravel()[0]),
        transform=transform,
        scaler_mean=mean,
        scaler_scale=scale,
        train_threshold=0.0,
        fpr1_threshold=float("nan"),
        threshold_source="",
        n_train=int(yy.size),
        n_train_pos=n_pos,
        n_iter=int(np.max(clf.n_iter_)),
        converged=converged,
        provenance=dict(provenance or {}),
    )
    if threshold_scores is not None:
        ts = np.asarray(threshold_scores, dtype=np.float64)
        if ts.shape != yy.shape:
            raise ValueError(f"threshold_scores has {ts.size} entries but y has {yy.size}")
        probe.threshold_source = "out_of_fold"
    else:
        ts = probe.decision_function(X)
        probe.threshold_source = "in_sample"
    probe.fpr1_threshold = threshold_at_fpr(ts[yy == 0], fpr)
    return probe


def evaluate_probe(
    probe: FittedProbe,
    X: Matrix,
    y: ArrayLike,
    raw_labels: Sequence[Any] | NDArray[Any] | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """``metrics.evaluate_scores`` of ``probe`` on one eval design, with the probe's own training
    thresholds, plus ``probe`` (name) and ``n_nonzero``: one row of ``probe_metrics``."""
    scores = probe.decision_function(X)
    m = evaluate_scores(
        y, scores, raw_labels, probe.train_threshold, probe.fpr1_threshold, n_boot=n_boot, seed=seed
    )
    return {"probe": probe.spec.name, "n_nonzero": probe.n_nonzero, **m}


@dataclass(frozen=True)
class CVResult:
    """Stratified k-fold result: per-fold AUROC, its mean and spread, and out-of-fold scores."""

    fold_aurocs: tuple[float, ...]
    oof_scores: NDArray[np.float64]
    mean_n_nonzero: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_aurocs))

    @property
    def std(self) -> float:
        return float(np.std(self.fold_aurocs))


def cross_validate(
    spec: ProbeSpec,
    X: Matrix,
    y: ArrayLike,
    folds: int = 5,
    seed: int = 0,
    *,
    clusters: ArrayLike | None = None,
    sample_weight: ArrayLike | None = None,
) -> CVResult:
    """Stratified, shuffled k-fold CV of ``spec`` (``folds`` capped at the smaller class's count).

    With ``clusters`` (``selection.near_duplicate_clusters``) the folds never split a cluster, so a
    near-copy of a test text is never on the training side. Transforms and scaling are re-fitted inside
    each fold. Feature *selection* (which features a spec uses) is not: top-N by selectivity on the
    whole training set makes these numbers optimistic, which is why held-out groups are the real measure.
    """
    yy = np.asarray(y).astype(np.int8)
    sw = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    splits: list[Any] | None = None
    if clusters is not None:
        try:
            splits = group_folds(yy, clusters, folds=folds, seed=seed)
        except ValueError as e:  # clusters too large for folds that keep both classes: plain folds, said so
            logger.warning("%s: group-aware folds impossible (%s); stratified folds that may split near "
                           "duplicates instead", spec.name, e)
    if splits is None:
        k = min(folds, int(yy.sum()), int((1 - yy).sum()))
        if k < 2:
            raise ValueError(
                f"cross-validation needs at least 2 samples of each class, got y counts {np.bincount(yy)}"
            )
        skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = list(skf.split(np.zeros(yy.size), yy))
    oof = np.zeros(yy.size, dtype=np.float64)
    aurocs: list[float] = []
    nonzero: list[int] = []
    Xr = _rows(X)
    for train_idx, test_idx in splits:
        probe = fit_probe(spec, Xr[train_idx], yy[train_idx], seed=seed,
                          sample_weight=None if sw is None else sw[train_idx])
        scores = probe.decision_function(Xr[test_idx])
        oof[test_idx] = scores
        if yy[test_idx].min() != yy[test_idx].max():  # a group-aware fold can hold one class only
            aurocs.append(auroc(yy[test_idx], scores))
        nonzero.append(probe.n_nonzero)
    if not aurocs:  # no fold had both classes: the AUROC of the pooled out-of-fold scores
        aurocs.append(auroc(yy, oof))
    return CVResult(fold_aurocs=tuple(aurocs), oof_scores=oof, mean_n_nonzero=float(np.mean(nonzero)))


def cv_auroc(spec: ProbeSpec, X: Matrix, y: ArrayLike, folds: int = 5, seed: int = 0) -> float:
    """Mean per-fold AUROC of ``cross_validate``."""
    return cross_validate(spec, X, y, folds=folds, seed=seed).mean


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeGridConfig:
    """Which probes to try. The default grid is feature sets x penalties x C with the default
    transform, then every transform on the single best setting; ``full=True`` crosses transforms
    with everything instead (about five times the work)."""

    top_n: tuple[int, ...] = (10, 20, 50, 100, 200, 500)
    include_all: bool = True
    relevant_threshold: float | None = 0.5
    penalties: tuple[str, ...] = ("l1", "l2")
    Cs: tuple[float, ...] = (10.0, 1.0, 0.1, 0.01)
    default_transform: str = "raw"
    transforms: tuple[str, ...] = TRANSFORMS
    value: str = "max_act"
    full: bool = False
    dense_poolings: tuple[str, ...] = ("mean", "max", "both")
    dense_Cs: tuple[float, ...] = (1.0, 0.1, 0.01)
    folds: int = 5
    seed: int = 0
    selection: str = "auto"
    criterion: str = "worst"
    weighting: str = "none"
    min_group: int = 10
    control_as_negatives: bool = False
    control_fpr: float = 0.01
    min_act: float = 1.0
    lodo_n_boot: int = 200
    token_top_n: tuple[int, ...] = (500,)
    token_Cs: tuple[float, ...] = (1.0,)
    aggregations: tuple[str, ...] = AGGREGATIONS
    agg_k: int = 5
    agg_window: int = 16
    token_dense: bool = True
    ksparse: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    ksparse_C: float = 1.0
    hard_negative_labels: tuple[str, ...] = ("hard_negative",)

    def __post_init__(self) -> None:
        from dagster_project.lib.selection import CRITERIA, SELECTIONS, WEIGHTINGS

        for name, allowed in (("selection", SELECTIONS), ("criterion", CRITERIA), ("weighting", WEIGHTINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ProbeGridConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.min_group < 2:
            raise ValueError(f"ProbeGridConfig.min_group must be >= 2, got {self.min_group}")
        if not 0.0 <= self.control_fpr < 1.0:
            raise ValueError(f"ProbeGridConfig.control_fpr must be in [0, 1), got {self.control_fpr}")
        if self.lodo_n_boot < 1:
            raise ValueError(f"ProbeGridConfig.lodo_n_boot must be >= 1, got {self.lodo_n_boot}")
        bad = [a for a in self.aggregations if a not in AGGREGATIONS]
        if bad:
            raise ValueError(f"ProbeGridConfig.aggregations must be in {AGGREGATIONS}, got {bad}")
        if any(n < 1 for n in self.token_top_n) or any(not (c > 0 and math.isfinite(c)) for c in self.token_Cs):
            raise ValueError(f"ProbeGridConfig.token_top_n / token_Cs must be positive, got {self.token_top_n} / "
                             f"{self.token_Cs}")
        if self.agg_k < 1 or self.agg_window < 1:
            raise ValueError(f"ProbeGridConfig.agg_k and agg_window must be >= 1, got {self.agg_k}, {self.agg_window}")
        if any(n < 1 for n in self.top_n):
            raise ValueError(f"ProbeGridConfig.top_n must be positive, got {self.top_n}")
        bad = [p for p in self.penalties if p not in PENALTIES]
        if bad or not self.penalties:
            raise ValueError(
                f"ProbeGridConfig.penalties must be a non-empty subset of {PENALTIES}, got {self.penalties}"
            )
        if not self.Cs or any(not (c > 0 and math.isfinite(c)) for c in self.Cs):
            raise ValueError(f"ProbeGridConfig.Cs must be positive finite numbers, got {self.Cs}")
        if any(not (c > 0 and math.isfinite(c)) for c in self.dense_Cs):
            raise ValueError(f"ProbeGridConfig.dense_Cs must be positive finite numbers, got {self.dense_Cs}")
        bad = [t for t in (*self.transforms, self.default_transform) if t not in TRANSFORMS]
        if bad:
            raise ValueError(f"ProbeGridConfig transforms must be in {TRANSFORMS}, got {bad}")
        if self.value not in SPARSE_VALUES:
            raise ValueError(f"ProbeGridConfig.value must be one of {SPARSE_VALUES}, got {self.value!r}")
        bad = [p for p in self.dense_poolings if p not in ("mean", "max", "both")]
        if bad:
            raise ValueError(f"ProbeGridConfig.dense_poolings must be in ('mean', 'max', 'both'), got {bad}")
        if self.folds < 2:
            raise ValueError(f"ProbeGridConfig.folds must be >= 2, got {self.folds}")


def _as_score_map(scores: Mapping[int, float] | TableLike, value_col: str) -> dict[int, float]:
    if isinstance(scores, Mapping):
        return {int(k): float(v) for k, v in scores.items()}
    df = _to_polars(scores, value_col)
    _require(df, ("feature_id", value_col), f"{value_col} table")
    df = df.drop_nulls(value_col)
    if df["feature_id"].is_duplicated().any():
        raise ValueError(f"{value_col} table has more than one row per feature_id (filter to one layer)")
    return dict(
        zip(df["feature_id"].cast(pl.Int64).to_list(), df[value_col].cast(pl.Float64).to_list(), strict=True)
    )


def feature_sets(
    config: ProbeGridConfig,
    selectivity: Mapping[int, float] | TableLike,
    active_feature_ids: Sequence[int] | NDArray[np.integer[Any]],
    classification_scores: Mapping[int, float] | TableLike | None = None,
) -> dict[str, tuple[int, ...]]:
    """Named feature sets, each sorted by feature id, duplicates of an earlier set dropped.

    ``topN``: the N active features of largest ``|selectivity|`` (ties by feature id);
    ``relevant``: active features whose classification score is ``>= relevant_threshold``;
    ``all``: every active feature. ``selectivity`` and ``classification_scores`` are mappings
    ``feature_id -> value`` or tables with ``feature_id`` and ``selectivity`` / ``score``.
    """
    active = {int(f) for f in np.asarray(active_feature_ids).tolist()}
    sel = {f: v for f, v in _as_score_map(selectivity, "selectivity").items() if f in active}
    ranked = sorted(sel, key=lambda f: (-abs(sel[f]), f))
    candidates: list[tuple[str, tuple[int, ...]]] = [
        (f"top{n}", tuple(sorted(ranked[:n]))) for n in sorted(set(config.top_n))
    ]
    if classification_scores is not None and config.relevant_threshold is not None:
        cls = _as_score_map(classification_scores, "score")
        ids = (f for f, s in cls.items() if s >= config.relevant_threshold and f in active)
        candidates.append(("relevant", tuple(sorted(ids))))
    if config.include_all:
        candidates.append(("all", tuple(sorted(active))))
    # Duplicates keep the most meaningful name: "all" over "relevant" over the smallest topN.
    priority = {"all": 0, "relevant": 1}
    keep: dict[tuple[int, ...], str] = {}
    for name, ids_t in sorted(candidates, key=lambda c: (priority.get(c[0], 2), len(c[1]))):
        if not ids_t:
            logger.warning("feature set %s is empty; skipped", name)
        elif ids_t in keep:
            logger.info("feature set %s equals %s; skipped", name, keep[ids_t])
        else:
            keep[ids_t] = name
    kept = set(keep.values())
    return {name: ids_t for name, ids_t in candidates if name in kept}


def probe_grid(
    config: ProbeGridConfig,
    selectivity: Mapping[int, float] | TableLike,
    active_feature_ids: Sequence[int] | NDArray[np.integer[Any]],
    classification_scores: Mapping[int, float] | TableLike | None = None,
) -> list[ProbeSpec]:
    """The SAE probe specs of the first stage: feature sets x penalties x Cs, with the default
    transform (``config.full``: x every transform too). See ``transform_sweep`` for stage two."""
    sets = feature_sets(config, selectivity, active_feature_ids, classification_scores)
    transforms = config.transforms if config.full else (config.default_transform,)
    specs = []
    for fs_name, ids in sets.items():
        for penalty in config.penalties:
            for C in config.Cs:
                for t in transforms:
                    specs.append(
                        ProbeSpec(
                            name=spec_name(fs_name, penalty, C, t, config.value),
                            feature_set=fs_name,
                            feature_ids=ids,
                            penalty=penalty,  # type: ignore[arg-type]
                            C=float(C),
                            transform=t,
                            value=config.value,
                        )
                    )
    return specs


def _col_mean(Xc: Any, mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Per column, the sum over the rows in ``mask`` over their count (0 where ``mask`` is empty)."""
    if not mask.any():
        return np.zeros(Xc.shape[1])
    return np.asarray(Xc[mask].sum(axis=0)).ravel() / float(mask.sum())


def _selectivity(p: NDArray[np.float64], n: NDArray[np.float64]) -> NDArray[np.float64]:
    """``(p - n) / (p + n)``, 0 where both are 0 (``feature_stats``' selectivity on class means)."""
    d = p + n
    return np.where(d > 0, (p - n) / np.where(d > 0, d, 1.0), 0.0)


def _col_max(Xc: Any) -> NDArray[np.float64]:
    return np.asarray(Xc.max(axis=0).toarray()).ravel() if sp.issparse(Xc) else np.asarray(Xc).max(axis=0)


def _transfer_ranked(feature_ids: NDArray[np.int64], scores: NDArray[np.float64]) -> NDArray[np.int64]:
    """Active feature ids (score above -1) by descending :func:`transfer_scores`, ties by feature id."""
    order = np.lexsort((feature_ids, -scores))
    return feature_ids[order[scores[order] > -1.0]]


def transfer_scores(
    X: Matrix, y: ArrayLike, groups: Sequence[str], hard: ArrayLike | None = None, min_act: float = 1.0
) -> NDArray[np.float64]:
    """Per column: how selective a feature is in *every* training group, the rule of the ``transfer{k}``
    sets (features that transfer). For each group, selectivity ``(p - n) / (p + n)`` of its own positives
    against its own negatives (the pooled ones of the other class where it has one class only, so a
    positive-only generator still counts); the score is the minimum over groups of a feature's selectivity
    in its preferred direction (the sign of the pooled selectivity), so one group where it does not fire
    sinks it. Where ``hard`` marks hard negatives (``hard_negative`` raw labels), a feature whose
    selectivity against hard negatives and against the other negatives differ in sign scores 0. Inactive
    columns (max below ``min_act``) score -1."""
    Xc = sp.csc_matrix(X) if sp.issparse(X) else np.asarray(X)
    yy = np.asarray(y).astype(np.int8)
    g = np.asarray(list(groups), dtype=object)

    def col_mean(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
        return _col_mean(Xc, mask)

    sel = _selectivity
    pos_all, neg_all = col_mean(yy == 1), col_mean(yy == 0)
    direction = np.sign(sel(pos_all, neg_all))
    per_group = []
    for name in sorted(set(g.tolist())):
        m = g == name
        p = col_mean(m & (yy == 1)) if (m & (yy == 1)).any() else pos_all
        n = col_mean(m & (yy == 0)) if (m & (yy == 0)).any() else neg_all
        per_group.append(sel(p, n) * direction)
    score = np.min(np.vstack(per_group), axis=0) if per_group else np.zeros(Xc.shape[1])
    if hard is not None:
        h = np.asarray(hard, dtype=bool) & (yy == 0)
        rest = (yy == 0) & ~h
        if h.any() and rest.any():
            agree = np.sign(sel(pos_all, col_mean(h))) == np.sign(sel(pos_all, col_mean(rest)))
            score = np.where(agree, score, np.minimum(score, 0.0))
    return np.where(_col_max(Xc) >= min_act, score, -1.0)


def ksparse_specs(config: ProbeGridConfig, feature_ids: NDArray[np.int64], scores: NDArray[np.float64]) -> list[ProbeSpec]:
    """The k-sparse curve: an L2 probe (``ksparse_C``) on the ``k`` features of highest
    :func:`transfer_scores` (ties by feature id), for each ``k`` of ``config.ksparse`` that fits."""
    ranked = _transfer_ranked(feature_ids, scores)
    specs = []
    for k in sorted(set(config.ksparse)):
        if k > ranked.size:
            break
        ids = tuple(sorted(int(f) for f in ranked[:k]))
        specs.append(ProbeSpec(name=spec_name(f"transfer{k}", "l2", config.ksparse_C, "raw", config.value),
                               feature_set=f"transfer{k}", feature_ids=ids, penalty="l2", C=float(config.ksparse_C),
                               value=config.value))
    return specs


def transform_sweep(best: ProbeSpec, config: ProbeGridConfig) -> list[ProbeSpec]:
    """``best`` with each of ``config.transforms`` other than its own (stage two of the default grid)."""
    return [
        replace(best, transform=t, name=spec_name(best.feature_set, best.penalty, best.C, t, best.value))
        for t in config.transforms
        if t != best.transform
    ]


def token_specs(config: ProbeGridConfig, sets: Mapping[str, tuple[int, ...]]) -> list[ProbeSpec]:
    """Token-level SAE probes: each ``top{N}`` set of ``config.token_top_n`` (the pooled grid's own feature
    sets), L2 at each of ``token_Cs``, scored per token and aggregated each of the ``aggregations`` ways."""
    specs = []
    for n in config.token_top_n:
        ids = sets.get(f"top{n}")
        if not ids:
            continue
        for C in config.token_Cs:
            for agg in config.aggregations:
                specs.append(ProbeSpec(
                    name=spec_name(f"top{n}", "l2", C, "raw", "token_act", agg), feature_set=f"top{n}",
                    feature_ids=ids, penalty="l2", C=float(C), value="token_act", aggregation=agg,
                    agg_k=config.agg_k, agg_window=config.agg_window,
                ))
    return specs


def token_dense_specs(config: ProbeGridConfig) -> list[ProbeSpec]:
    """Token-level residual baselines: L2 on standardised per-token residuals, each aggregation."""
    if not config.token_dense:
        return []
    return [
        ProbeSpec(name=spec_name("tok_resid", "l2", C, "raw", "token_resid", agg), feature_set="tok_resid",
                  feature_ids=(), penalty="l2", C=float(C), value="token_resid", aggregation=agg,
                  agg_k=config.agg_k, agg_window=config.agg_window)
        for C in config.token_Cs
        for agg in config.aggregations
    ]


def search_token_probes(
    config: ProbeGridConfig,
    specs: Sequence[ProbeSpec],
    designs: Designs,
    y: ArrayLike,
    plan: SelectionPlan | None = None,
) -> list[ProbeResult]:
    """Cross-validate (and hold out groups for) token-level specs on a :class:`TokenMatrix` design; best first."""
    yy = np.asarray(y).astype(np.int8)
    return sorted((_run(s, designs, yy, config, "token", plan) for s in specs), key=rank_key)


def dense_baseline_specs(config: ProbeGridConfig) -> list[ProbeSpec]:
    """L2 logistic regression on standardised pooled residuals, per pooling and C."""
    return [
        ProbeSpec(
            name=spec_name(f"resid_{p}", "l2", C, "raw", f"resid_{p}"),
            feature_set=f"resid_{p}",
            feature_ids=(),
            penalty="l2",
            C=float(C),
            transform="raw",
            value=f"resid_{p}",
        )
        for p in config.dense_poolings
        for C in config.dense_Cs
    ]


@dataclass
class Designs:
    """The matrices one probe family is searched on: the training rows and, where the lake has a control
    set, its calibration half (thresholds) and its check half (held-out false-positive rates, and the
    negatives a one-class held-out group is scored against).

    SAE designs have every active feature as columns (``feature_ids``) and :meth:`take` selects a spec's;
    a dense design is one pooling's matrix and ``feature_ids`` is None.
    """

    X: Matrix
    cal: Matrix | None = None
    chk: Matrix | None = None
    feature_ids: NDArray[np.int64] | None = None
    rank_X: sp.csr_matrix | None = None  # pooled max_act over the same rows and columns (re-ranks token-level sets)

    def take(self, ids: Sequence[int] | None) -> tuple[Matrix, Matrix | None, Matrix | None]:
        if self.feature_ids is None or ids is None:
            return self.X, self.cal, self.chk
        fids = self.feature_ids

        def cols(M: Matrix | None) -> Matrix | None:
            if M is None:
                return None
            return select_columns(M if isinstance(M, TokenMatrix) else sp.csr_matrix(M), fids, ids)

        return cols(self.X), cols(self.cal), cols(self.chk)


@dataclass
class SelectionPlan:
    """How probes are chosen: ``mode`` ``cv`` (training CV) or ``lodo`` (held-out groups, scored by
    ``criterion`` over ``splits``); per-row ``clusters`` (near duplicates: group-aware CV folds),
    ``weights`` (sample weights, or None for balanced classes) and ``control_rows`` (training rows that
    are control texts, whose out-of-fold scores set the thresholds when controls train as negatives)."""

    mode: str = "cv"
    criterion: str = "worst"
    splits: list[HeldOutSplit] = field(default_factory=list)
    clusters: NDArray[np.int64] | None = None
    weights: NDArray[np.float64] | None = None
    control_rows: NDArray[np.int64] | None = None
    control_fpr: float = 0.01
    min_act: float = 1.0
    n_boot: int = 200
    groups: NDArray[Any] | None = None  # per training row (transfer sets re-ranked per held-out split)
    hard: NDArray[np.bool_] | None = None  # per training row: a hard negative


@dataclass
class ProbeResult:
    """One spec of a search: its CV result, its held-out-group figures and its fit on all the data."""

    spec: ProbeSpec
    cv: CVResult
    probe: FittedProbe
    stage: str
    lodo: list[dict[str, Any]] = field(default_factory=list)
    selection_score: float | None = None

    @property
    def degenerate(self) -> bool:
        """No non-zero weight: the probe scores every text alike (an L1 fit regularised to nothing)."""
        return self.probe.n_nonzero == 0

    def lodo_auroc(self, how: str) -> float | None:
        return selection_score([r["auroc"] for r in self.lodo], how) if self.lodo else None

    def summary(self) -> dict[str, Any]:
        """A flat row for a table of the search."""
        return {
            "probe": self.spec.name,
            "feature_set": self.spec.feature_set,
            "n_features": self.probe.n_features,
            "penalty": self.spec.penalty,
            "C": self.spec.C,
            "transform": self.spec.transform,
            "value": self.spec.value,
            "stage": self.stage,
            "cv_auroc": self.cv.mean,
            "cv_auroc_std": self.cv.std,
            "n_nonzero": self.probe.n_nonzero,
            "converged": self.probe.converged,
            "degenerate": self.degenerate,
            "selection_score": self.selection_score,
        }


def fold_feature_ids(
    spec: ProbeSpec, X: Matrix, feature_ids: NDArray[np.int64], y: NDArray[np.int8], min_act: float = 1.0,
    groups: Sequence[str] | None = None, hard: NDArray[np.bool_] | None = None,
) -> tuple[int, ...]:
    """The features ``spec`` would use had it been chosen on ``(X, y)`` alone (a held-out group's training
    side): ``topN`` re-ranks by selectivity ``(pos_mean - neg_mean) / (pos_mean + neg_mean)`` over the
    features active there (max >= ``min_act``, as ``feature_stats``), ``all`` takes those active features;
    ``transfer{k}`` re-ranks by :func:`transfer_scores` over the training side's ``groups``; any other set
    (``relevant``) keeps its own. Never empty: falls back to the spec's own features."""
    if not spec.is_dense and spec.feature_set.startswith("transfer") and groups is not None:
        k = int(spec.feature_set.removeprefix("transfer"))
        ids = tuple(sorted(int(f) for f in _transfer_ranked(feature_ids, transfer_scores(X, y, groups, hard, min_act))[:k]))
        return ids if len(ids) == k else spec.feature_ids
    if spec.is_dense or not (spec.feature_set.startswith("top") or spec.feature_set == "all"):
        return spec.feature_ids
    Xc = sp.csc_matrix(X)
    sel = _selectivity(_col_mean(Xc, y == 1), _col_mean(Xc, y == 0))
    cand = np.flatnonzero(_col_max(Xc) >= min_act)
    if spec.feature_set == "all":
        chosen = cand
    else:
        n = int(spec.feature_set.removeprefix("top") or 0)
        order = np.lexsort((feature_ids[cand], -np.abs(sel[cand])))
        chosen = cand[order[:n]]
    ids = tuple(sorted(int(f) for f in feature_ids[chosen]))
    return ids or spec.feature_ids


def _threshold(probe: FittedProbe, cal: Matrix | None, oof: NDArray[np.float64] | None, plan: SelectionPlan) -> None:
    """Set the probe's thresholds on control scores where there are any (``control`` / ``control_oof``)."""
    if plan.control_rows is not None and plan.control_rows.size and oof is not None:
        scores = oof[plan.control_rows]  # with the calibration half of controls that did not train, if any
        if cal is not None and cal.shape[0]:
            scores = np.concatenate([scores, probe.decision_function(cal)])
        t, source = threshold_at_fpr(scores, plan.control_fpr), "control_oof"
    elif cal is not None and cal.shape[0]:
        t, source = threshold_at_fpr(probe.decision_function(cal), plan.control_fpr), "control"
    else:
        return
    probe.train_threshold = probe.fpr1_threshold = t
    probe.threshold_source = source


def _lodo(
    spec: ProbeSpec, designs: Designs, y: NDArray[np.int8], config: ProbeGridConfig, plan: SelectionPlan
) -> list[dict[str, Any]]:
    """Every held-out group of ``plan``: refit ``spec`` (features re-chosen on the training side) without
    the group and score it; thresholds from the control calibration half where there is one."""
    out = []
    ranker = designs.rank_X if designs.rank_X is not None else designs.X
    Xall = _rows(ranker)
    for split in plan.splits:
        tr, te = split.train_idx, split.test_idx
        ids = None
        fspec = spec
        if designs.feature_ids is not None and not isinstance(Xall, TokenMatrix):
            ids = fold_feature_ids(spec, Xall[tr], designs.feature_ids, y[tr], plan.min_act,
                                   None if plan.groups is None else plan.groups[tr],
                                   None if plan.hard is None else plan.hard[tr])
            if ids != spec.feature_ids:
                fspec = replace(spec, feature_ids=ids)
        X, cal, chk = designs.take(ids if ids is not None else (None if spec.is_dense else spec.feature_ids))
        Xr = _rows(X)
        w = None if plan.weights is None else plan.weights[tr]
        probe = fit_probe(fspec, Xr[tr], y[tr], seed=config.seed, sample_weight=w)
        scores = probe.decision_function(Xr[te])
        ctrl_rows = None if plan.control_rows is None else np.setdiff1d(plan.control_rows, te)
        if ctrl_rows is not None and ctrl_rows.size:  # controls trained on: use the check half for thresholds
            threshold: float | None = (threshold_at_fpr(probe.decision_function(chk), plan.control_fpr)
                                       if chk is not None and chk.shape[0] else None)
        elif cal is not None and cal.shape[0]:
            threshold = threshold_at_fpr(probe.decision_function(cal), plan.control_fpr)
        else:
            threshold = None
        ctrl = probe.decision_function(chk) if chk is not None and chk.shape[0] else None
        m = held_out_score(y[te], scores, ctrl, threshold, n_boot=plan.n_boot, seed=config.seed)
        out.append({"held_out_group": split.group, "n_train": int(tr.size), "n_dropped_near_dup":
                    split.n_dropped_near_dup, "n_nonzero": probe.n_nonzero, "threshold": threshold, **m})
    return out


def _run(
    spec: ProbeSpec, designs: Designs, y: NDArray[np.int8], config: ProbeGridConfig, stage: str,
    plan: SelectionPlan | None = None,
) -> ProbeResult:
    plan = plan or SelectionPlan()
    X, cal, _ = designs.take(None if spec.is_dense else spec.feature_ids)
    cv = cross_validate(spec, X, y, folds=config.folds, seed=config.seed, clusters=plan.clusters,
                        sample_weight=plan.weights)
    probe = fit_probe(spec, X, y, seed=config.seed, threshold_scores=cv.oof_scores, sample_weight=plan.weights)
    _threshold(probe, cal, cv.oof_scores, plan)
    result = ProbeResult(spec=spec, cv=cv, probe=probe, stage=stage)
    if plan.mode == "lodo" and plan.splits:
        result.lodo = _lodo(spec, designs, y, config, plan)
        result.selection_score = result.lodo_auroc(plan.criterion)
    else:
        result.selection_score = cv.mean
    logger.info("%s: cv auroc %.4f +/- %.4f, %s %s, %d non-zero", spec.name, cv.mean, cv.std,
                plan.mode, "-" if result.selection_score is None else f"{result.selection_score:.4f}",
                probe.n_nonzero)
    return result


def rank_key(r: ProbeResult) -> tuple[bool, float, float, int, str]:
    """Best first: a degenerate probe (no non-zero weight) last, then the selection score (held-out
    groups or CV, as the plan said), then training CV, then fewer features, then the name."""
    score = r.selection_score if r.selection_score is not None else -math.inf
    return (r.degenerate, -score, -r.cv.mean, r.probe.n_features, r.spec.name)


def search_probes(
    config: ProbeGridConfig,
    X: sp.csr_matrix,
    feature_ids: Sequence[int] | NDArray[np.integer[Any]],
    y: ArrayLike,
    selectivity: Mapping[int, float] | TableLike,
    classification_scores: Mapping[int, float] | TableLike | None = None,
    plan: SelectionPlan | None = None,
    control: tuple[sp.csr_matrix | None, sp.csr_matrix | None] = (None, None),
) -> list[ProbeResult]:
    """Cross-validate (and, with a ``lodo`` plan, hold out each group) and fit every SAE probe of the grid;
    best first (:func:`rank_key`).

    ``X`` is a training design over ``feature_ids`` (e.g. every active feature); the active set is
    the columns with at least one non-zero. Unless ``config.full``, the transforms are then swept
    on the best (feature set, penalty, C). ``control`` holds the control set's calibration and check
    designs over the same columns; each final probe's thresholds come from the calibration half, else
    from its out-of-fold training scores.
    """
    yy = np.asarray(y).astype(np.int8)
    fids = np.asarray(feature_ids, dtype=np.int64)
    Xc = sp.csr_matrix(X)
    active = fids[np.asarray(Xc.getnnz(axis=0)) > 0]
    designs = Designs(Xc, control[0], control[1], fids)
    specs = probe_grid(config, selectivity, active, classification_scores)
    results = [_run(s, designs, yy, config, "grid", plan) for s in specs]
    if not config.full and results and len(config.transforms) > 1:
        best = min(results, key=rank_key).spec
        for s in transform_sweep(best, config):
            results.append(_run(s, designs, yy, config, "transform_sweep", plan))
    if config.ksparse:
        groups = plan.groups if plan is not None and plan.groups is not None else np.zeros(yy.size, dtype=object)
        hard = None if plan is None else plan.hard
        scores = transfer_scores(select_columns(Xc, fids, active), yy, list(groups), hard, config.min_act)
        for s in ksparse_specs(config, active, scores):
            results.append(_run(s, designs, yy, config, "ksparse", plan))
    return sorted(results, key=rank_key)


def search_dense_baselines(
    config: ProbeGridConfig,
    designs: Mapping[str, NDArray[np.float64]],
    y: ArrayLike,
    plan: SelectionPlan | None = None,
    control: Mapping[str, tuple[NDArray[np.float64] | None, NDArray[np.float64] | None]] | None = None,
) -> list[ProbeResult]:
    """Cross-validate and fit the residual baselines; ``designs`` maps a pooling (``mean``,
    ``max``, ``both``) to its ``dense_design`` matrix (``control`` to its control calibration and
    check matrices). Poolings absent from ``designs`` are skipped."""
    yy = np.asarray(y).astype(np.int8)
    control = control or {}
    results = [
        _run(s, Designs(designs[s.pooling], *control.get(s.pooling, (None, None))), yy, config, "baseline", plan)
        for s in dense_baseline_specs(config)
        if s.pooling in designs
    ]
    return sorted(results, key=rank_key)
