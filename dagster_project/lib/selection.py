"""Model selection out of distribution: near-duplicate clusters, group-aware folds, leave one group out.

In-distribution cross-validation of an alignment-faking probe is 0.99+ almost everywhere and cannot tell
probes apart (DESIGN.md §7). A **group** is one generator or source (the registry's ``group`` /
``group_field``); training mixes groups, and a probe is chosen by how it does on a group it never saw:

- :func:`near_duplicate_clusters` joins texts that share at least half of their word 5-grams (after
  stripping ``<SCRATCHPAD_REASONING>`` / ``<think>`` tags), so no fold and no held-out group has a
  near-copy on the training side;
- :func:`group_folds` is stratified k-fold over those clusters (``StratifiedGroupKFold``);
- :func:`lodo_splits` holds out each group in turn (groups of at least ``min_group`` samples); the
  training side drops the held-out group *and* every sample in a near-duplicate cluster with it;
- :func:`group_weights` weights samples so that, within each class, groups count alike (``balanced``),
  by the square root of their size (``sqrt``), or by size (``none``: plain class balance);
- :func:`held_out_score` is the figure a held-out group contributes to selection: its AUROC when it has
  both classes, else its samples against the control negatives (``vs_control``);
- :func:`selection_score` folds per-group figures into one number (``worst`` or ``mean``).

Pure functions, no dagster import.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.model_selection import StratifiedGroupKFold

from dagster_project.lib.metrics import auroc, bootstrap_auroc_ci, fpr_at_threshold, tpr_at_threshold

SELECTIONS = ("auto", "cv", "lodo")
CRITERIA = ("worst", "mean")
WEIGHTINGS = ("none", "sqrt", "balanced")
Weighting = Literal["none", "sqrt", "balanced"]

_TAGS = re.compile(r"</?\s*(scratchpad_reasoning|think|output)\s*>", re.IGNORECASE)
_WORD = re.compile(r"\w+")


# ---------------------------------------------------------------------------------------------
# Near duplicates
# ---------------------------------------------------------------------------------------------


def shingles(text: str, n: int = 5) -> set[int]:
    """Hashes of the word ``n``-grams of ``text`` (lower-cased, tags stripped); short texts give one gram."""
    words = _WORD.findall(_TAGS.sub(" ", text).lower())
    if len(words) < n:
        return {hash(tuple(words))} if words else set()
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def near_duplicate_clusters(texts: Sequence[str], n: int = 5, min_share: float = 0.5) -> NDArray[np.int64]:
    """A cluster id per text: texts sharing at least ``min_share`` of the smaller one's word ``n``-grams
    are joined (transitively, union-find). Exact duplicates always share a cluster.

    Candidate pairs come from an inverted index over the grams, so the cost follows the shared grams,
    not the number of pairs. Ids are the smallest index of each cluster's members.
    """
    sets = [shingles(t, n) for t in texts]
    parent = list(range(len(sets)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index: dict[int, list[int]] = {}
    for i, s in enumerate(sets):
        for g in s:
            index.setdefault(g, []).append(i)
    for i, s in enumerate(sets):
        if not s:
            continue
        counts: dict[int, int] = {}
        for g in s:
            for j in index[g]:
                if j < i:
                    counts[j] = counts.get(j, 0) + 1
        for j, shared in counts.items():
            if shared >= min_share * min(len(s), len(sets[j])):
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(len(sets))], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Folds and held-out groups
# ---------------------------------------------------------------------------------------------


def group_folds(
    y: ArrayLike, clusters: ArrayLike, folds: int = 5, seed: int = 0
) -> list[tuple[NDArray[np.int64], NDArray[np.int64]]]:
    """Stratified k-fold whose folds never split a cluster (``folds`` capped by the smaller class)."""
    yy = np.asarray(y).astype(np.int8)
    cl = np.asarray(clusters)
    if cl.shape != yy.shape:
        raise ValueError(f"clusters has {cl.size} entries but y has {yy.size}")
    k = min(folds, int(yy.sum()), int((1 - yy).sum()), int(np.unique(cl).size))
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 samples of each class, got y counts {np.bincount(yy)}")
    skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    out = []
    for tr, te in skf.split(np.zeros(yy.size), yy, groups=cl):
        if yy[tr].min() == yy[tr].max():  # a fold whose training side lost a class: rare with tiny classes
            raise ValueError("a group-aware fold left one class out of training; lower folds")
        out.append((np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64)))
    return out


@dataclass(frozen=True)
class HeldOutSplit:
    """One leave-one-group-out split: train on ``train_idx``, evaluate on ``test_idx`` (the group)."""

    group: str
    train_idx: NDArray[np.int64]
    test_idx: NDArray[np.int64]
    n_dropped_near_dup: int


def lodo_splits(
    groups: Sequence[str], y: ArrayLike, clusters: ArrayLike | None = None, min_group: int = 10
) -> list[HeldOutSplit]:
    """A split per group of at least ``min_group`` samples whose training side keeps both classes.

    The training side never holds a sample of the held-out group, nor one in a near-duplicate cluster
    with any of its samples. Smaller groups are never held out (they stay in every training side).
    """
    g = np.asarray(list(groups), dtype=object)
    yy = np.asarray(y).astype(np.int8)
    cl = np.arange(yy.size) if clusters is None else np.asarray(clusters)
    if not (g.size == yy.size == cl.size):
        raise ValueError(f"groups ({g.size}), y ({yy.size}) and clusters ({cl.size}) differ in length")
    out = []
    for name in sorted(set(g.tolist())):
        held = g == name
        if int(held.sum()) < min_group:
            continue
        near = np.isin(cl, cl[held]) & ~held
        train = ~held & ~near
        if yy[train].min(initial=1) == yy[train].max(initial=0):
            continue
        out.append(HeldOutSplit(str(name), np.flatnonzero(train), np.flatnonzero(held), int(near.sum())))
    return out


def group_weights(groups: Sequence[str], y: ArrayLike, weighting: Weighting = "none") -> NDArray[np.float64]:
    """Sample weights: each class sums to half the samples; within a class, a group of ``n`` samples
    weighs ``n`` (``none``), ``sqrt(n)`` (``sqrt``) or ``1`` (``balanced``) in all."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    g = np.asarray(list(groups), dtype=object)
    yy = np.asarray(y).astype(np.int8)
    w = np.zeros(yy.size, dtype=np.float64)
    for c in (0, 1):
        in_c = yy == c
        if not in_c.any():
            continue
        names, inverse, counts = np.unique(g[in_c], return_inverse=True, return_counts=True)
        share = {"none": counts.astype(np.float64), "sqrt": np.sqrt(counts), "balanced": np.ones(len(names))}
        group_total = share[weighting] / share[weighting].sum() * (yy.size / 2.0)
        w[in_c] = (group_total / counts)[inverse]
    return w


# ---------------------------------------------------------------------------------------------
# Per-group figures and the selection score
# ---------------------------------------------------------------------------------------------


def held_out_score(
    y: ArrayLike,
    scores: ArrayLike,
    control_scores: ArrayLike | None,
    threshold: float | None,
    *,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """What a held-out group says about a probe: AUROC (with a bootstrap CI) on its own two classes,
    or, for a one-class group, its samples against the control negatives (``auroc_vs = 'control'``);
    detection (positives flagged) and false-positive rate at ``threshold``. Undefined figures are None."""
    yy = np.asarray(y).astype(np.int8)
    ss = np.asarray(scores, dtype=np.float64)
    out: dict[str, Any] = {"n": int(yy.size), "n_pos": int(yy.sum()), "n_neg": int((1 - yy).sum())}
    ya, sa, vs = yy, ss, "group"
    if (out["n_pos"] == 0 or out["n_neg"] == 0) and control_scores is not None and out["n_pos"] > 0:
        cs = np.asarray(control_scores, dtype=np.float64)
        if cs.size:
            ya = np.concatenate([yy, np.zeros(cs.size, np.int8)])
            sa = np.concatenate([ss, cs])
            vs = "control"
    if ya.min(initial=1) != ya.max(initial=0):
        out["auroc"] = auroc(ya, sa)
        out["auroc_ci_low"], out["auroc_ci_high"] = bootstrap_auroc_ci(ya, sa, n_boot=n_boot, seed=seed)
        out["auroc_vs"] = vs
    else:
        out["auroc"] = out["auroc_ci_low"] = out["auroc_ci_high"] = None
        out["auroc_vs"] = None
    out["detection_rate"] = tpr_at_threshold(yy, ss, threshold) if threshold is not None else None
    out["fpr"] = fpr_at_threshold(yy, ss, threshold) if threshold is not None else None
    return out


def selection_score(aurocs: Sequence[float | None], criterion: str = "worst") -> float | None:
    """The worst (or mean) of the defined held-out AUROCs; None when no group has one."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    vals = [float(a) for a in aurocs if a is not None and np.isfinite(a)]
    if not vals:
        return None
    return min(vals) if criterion == "worst" else float(np.mean(vals))
