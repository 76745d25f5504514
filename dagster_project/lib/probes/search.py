"""Searching the grid on a training mixture: each spec cross-validated (group-aware folds), held out group
by group when the plan says so, thresholded on the control sets, ranked by the selection score and fitted."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray

from dagster_project.lib.metrics import threshold_at_fpr
from dagster_project.lib.probes.design import Matrix, TableLike, indexable_rows, select_columns
from dagster_project.lib.probes.fitted import FittedProbe, ProbeSpec
from dagster_project.lib.probes.fitting import CVResult, cross_validate, fit_probe
from dagster_project.lib.probes.grid import (
    ProbeGridConfig,
    dense_baseline_specs,
    fold_feature_ids,
    ksparse_specs,
    probe_grid,
    transfer_scores,
    transform_sweep,
)
from dagster_project.lib.selection import HeldOutSplit, held_out_score, selection_score
from dagster_project.lib.token_probes import TokenMatrix

logger = logging.getLogger(__name__)


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
    Xall = indexable_rows(ranker)
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
        Xr = indexable_rows(X)
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
