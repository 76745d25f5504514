"""Feature transforms of a probe (raw, binary, log1p, z-score, quantile): fitted on the training design,
applied to any other, saved and loaded with the probe."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, Self

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from sklearn.preprocessing import QuantileTransformer

from dagster_project.lib.probes.design import Pooled

TRANSFORMS = ("raw", "binary", "log1p", "zscore", "quantile")


class Transform(Protocol):
    """A feature transform fitted on training data and applied unchanged to evaluation data."""

    name: str

    def fit(self, X: Pooled) -> Transform: ...

    def apply(self, X: Pooled) -> Pooled: ...

    def state(self) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        """JSON-ready parameters and arrays that ``from_state`` rebuilds this transform from."""
        ...


def _sparse_or_dense(X: Pooled) -> Pooled:
    return sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else np.asarray(X, dtype=np.float64)


class _Stateless:
    """A transform with nothing to learn: ``fit`` returns it as it is, its state is empty."""

    def fit(self, X: Pooled) -> Self:
        return self

    def state(self) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        return {}, {}


class RawTransform(_Stateless):
    """Identity."""

    name = "raw"

    def apply(self, X: Pooled) -> Pooled:
        return _sparse_or_dense(X)


class BinaryTransform(_Stateless):
    """1 where the feature fired (> 0), else 0. Keeps sparsity."""

    name = "binary"

    def apply(self, X: Pooled) -> Pooled:
        if sp.issparse(X):
            out = sp.csr_matrix(X, dtype=np.float64, copy=True)
            out.data = (out.data > 0).astype(np.float64)
            out.eliminate_zeros()
            return out
        return (np.asarray(X) > 0).astype(np.float64)


class Log1pTransform(_Stateless):
    """``sign(x) * log1p(|x|)``: ``log1p`` for the non-negative pooled activations. Keeps sparsity."""

    name = "log1p"

    def apply(self, X: Pooled) -> Pooled:
        if sp.issparse(X):
            out = sp.csr_matrix(X, dtype=np.float64, copy=True)
            out.data = np.sign(out.data) * np.log1p(np.abs(out.data))
            return out
        arr = np.asarray(X, dtype=np.float64)
        return np.sign(arr) * np.log1p(np.abs(arr))


class ZScoreTransform(_Stateless):
    """Per-sample z-score across the chosen features: ``(x - row mean) / row std``.

    Stateless (each sample is normalised by itself). The output is dense, of size samples x chosen
    features (never the full SAE width); a row with zero spread becomes all zeros.
    """

    name = "zscore"

    def apply(self, X: Pooled) -> Pooled:
        arr = sp.csr_matrix(X).toarray() if sp.issparse(X) else np.array(X, dtype=np.float64)
        arr = arr.astype(np.float64, copy=False)
        mu = arr.mean(axis=1, keepdims=True)
        sd = arr.std(axis=1, keepdims=True)
        safe = np.where(sd > 0, sd, 1.0)
        return np.where(sd > 0, (arr - mu) / safe, 0.0)


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

    def fit(self, X: Pooled) -> QuantileTransform:
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

    def apply(self, X: Pooled) -> Pooled:
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
