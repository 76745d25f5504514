"""Fitting one probe and scoring it: :func:`fit_probe` (logistic regression, thresholds from the control or
training scores), :func:`evaluate_probe` on a held-out set, and (group-aware) :func:`cross_validate`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from dagster_project.lib.metrics import auroc, evaluate_scores, threshold_at_fpr
from dagster_project.lib.probes.design import Matrix, indexable_rows
from dagster_project.lib.probes.fitted import FittedProbe, ProbeSpec
from dagster_project.lib.probes.transforms import make_transform
from dagster_project.lib.selection import group_folds
from dagster_project.lib.token_probes import TokenMatrix

logger = logging.getLogger(__name__)


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
    Xr = indexable_rows(X)
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
