"""The probe grid: :class:`ProbeGridConfig`, the feature sets (relevant, top-N by selectivity, transfer,
all active), the SAE / k-sparse / transform-sweep / token-level specs and the dense baseline specs."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray

from dagster_project.lib.probes.design import SPARSE_VALUES, Matrix, TableLike, require_columns, to_polars
from dagster_project.lib.probes.fitted import PENALTIES, ProbeSpec, spec_name
from dagster_project.lib.probes.transforms import TRANSFORMS
from dagster_project.lib.token_probes import AGGREGATIONS

logger = logging.getLogger(__name__)


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
    df = to_polars(scores, value_col)
    require_columns(df, ("feature_id", value_col), f"{value_col} table")
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
    X: Matrix, y: ArrayLike, groups: Sequence[str] | NDArray[Any], hard: ArrayLike | None = None, min_act: float = 1.0
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


def fold_feature_ids(
    spec: ProbeSpec, X: Matrix, feature_ids: NDArray[np.int64], y: NDArray[np.int8], min_act: float = 1.0,
    groups: Sequence[str] | NDArray[Any] | None = None, hard: NDArray[np.bool_] | None = None,
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
