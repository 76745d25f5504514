"""The probe types and their on-disk format: :class:`ProbeSpec` (one configuration), :class:`FittedProbe`
(transform, column scaling and logistic weights; ``save`` / :func:`load_probe` round-trip it exactly)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sklearn
from numpy.typing import NDArray

from dagster_project.lib.lake import replace_dir
from dagster_project.lib.probes.design import (
    DENSE_VALUES,
    SPARSE_VALUES,
    TOKEN_VALUES,
    Key,
    Matrix,
    TableLike,
    sparse_design,
)
from dagster_project.lib.probes.transforms import TRANSFORMS, Transform, transform_from_state
from dagster_project.lib.token_probes import AGGREGATIONS, TokenMatrix, aggregate

PROBE_FORMAT_VERSION = 1
PROBE_JSON = "probe.json"
PROBE_ARRAYS = "arrays.npz"


PENALTIES = ("l1", "l2")



@contextmanager
def written_aside(final: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``final`` to write into: renamed over ``final`` (``lake.replace_dir``)
    when the block ends, deleted when it raises, so a reader never sees a half-written folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        t_params, t_arrays = self.transform.state()
        arrays: dict[str, NDArray[Any]] = {
            "feature_ids": np.asarray(self.spec.feature_ids, dtype=np.int64),
            "coef": self.coef,
            "scaler_mean": self.scaler_mean,
            "scaler_scale": self.scaler_scale,
            **{f"transform__{k}": v for k, v in t_arrays.items()},
        }
        with written_aside(target) as tmp:
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
