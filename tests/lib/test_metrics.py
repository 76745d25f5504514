"""Hand-computed checks of the detection metrics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dagster_project.lib.metrics import (
    Detection,
    accuracy_at_threshold,
    auroc,
    bootstrap_auroc_ci,
    detection_rate,
    evaluate_scores,
    fpr_at_threshold,
    threshold_at_fpr,
    tpr_at_threshold,
)


def test_auroc_known_ranking() -> None:
    # pairs (pos, neg): .35>.1 yes, .35>.4 no, .8>.1 yes, .8>.4 yes -> 3/4
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auroc_ties_count_half() -> None:
    assert auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    # pos .5 vs neg .2 -> 1, vs neg .5 -> 0.5; pos .9 beats both -> 2; 3.5 / 4
    assert auroc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert auroc(np.array([True, False, True]), [1.0, 1.0, 1.0]) == pytest.approx(0.5)


def test_auroc_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # rounding makes ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_auroc_rejects_one_class_and_bad_input() -> None:
    with pytest.raises(ValueError, match="one class"):
        auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="non-finite"):
        auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="entries"):
        auroc([0, 1, 1], [0.1, 0.2])


def test_threshold_at_fpr_hand_built() -> None:
    neg = np.arange(200) / 100.0  # 0.00 .. 1.99
    t = threshold_at_fpr(neg, 0.01)  # k = 2 may exceed it: the 3rd largest, 1.97
    assert t == pytest.approx(1.97)
    assert (neg > t).mean() == pytest.approx(0.01)
    # fewer than 100 negatives: nothing may be flagged, so the max
    assert threshold_at_fpr([0.3, 0.9, 0.1], 0.01) == pytest.approx(0.9)
    # ties at the threshold are not flagged
    tied = np.array([5.0] * 10 + [1.0] * 190)
    t = threshold_at_fpr(tied, 0.01)
    assert t == 5.0 and (tied > t).mean() == 0.0
    with pytest.raises(ValueError):
        threshold_at_fpr([], 0.01)


def test_rates_at_threshold() -> None:
    y = [0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.6, 0.2, 0.5, 0.7, 0.4, 0.9]
    assert tpr_at_threshold(y, s, 0.5) == pytest.approx(0.5)  # .7, .9 (0.5 itself is not > 0.5)
    assert fpr_at_threshold(y, s, 0.5) == pytest.approx(1 / 3)
    assert accuracy_at_threshold(y, s, 0.5) == pytest.approx(4 / 7)  # .1 .2 right; .7 .9 right
    assert tpr_at_threshold([0, 0], [0.1, 0.2], 0.0) is None
    assert fpr_at_threshold([1], [0.1], 0.0) is None


def test_detection_rate_positive_only() -> None:
    d = detection_rate([-1.0, 0.5, 2.0, 3.0], 0.0)
    assert d == Detection(rate=0.75, mean_score=1.125, n=4)
    with pytest.raises(ValueError):
        detection_rate([], 0.0)


def test_bootstrap_ci_contains_estimate_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60), np.ones(40)].astype(int)
    s = rng.normal(size=100) + 0.8 * y
    point = auroc(y, s)
    lo, hi = bootstrap_auroc_ci(y, s, n_boot=500, seed=7)
    assert lo <= point <= hi
    assert 0.0 <= lo < hi <= 1.0
    assert bootstrap_auroc_ci(y, s, n_boot=500, seed=7) == (lo, hi)
    assert bootstrap_auroc_ci(y, s, n_boot=500, seed=8) != (lo, hi)


def test_bootstrap_degenerate_cases() -> None:
    # perfectly separated: every stratified resample is separated too
    assert bootstrap_auroc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_boot=50) == (1.0, 1.0)
    # all scores tied: every resample is 0.5, a real value, not a failure
    assert bootstrap_auroc_ci([0, 1, 0, 1], [0.3] * 4, n_boot=50) == (0.5, 0.5)
    # a single positive still resamples (it is always drawn)
    lo, hi = bootstrap_auroc_ci([0, 0, 0, 1], [0.1, 0.5, 0.9, 0.6], n_boot=200)
    assert 0.0 <= lo <= auroc([0, 0, 0, 1], [0.1, 0.5, 0.9, 0.6]) <= hi <= 1.0
    with pytest.raises(ValueError, match="one class"):
        bootstrap_auroc_ci([1, 1], [0.1, 0.2])


def test_evaluate_scores_two_class_with_labels() -> None:
    y = [0, 0, 0, 1, 1]
    s = [-2.0, 1.5, -1.0, 1.0, 3.0]
    raw = ["aligned", "hard_negative", "hard_negative", "alignment_faking", "alignment_faking"]
    m = evaluate_scores(y, s, raw, train_threshold=0.0, fpr1_threshold=2.0, n_boot=100)
    assert (m["n"], m["n_pos"], m["n_neg"]) == (5, 2, 3)
    assert m["auroc"] == pytest.approx(5 / 6)  # only the pair (1.0, 1.5) is misordered
    assert m["auroc_ci_low"] <= m["auroc"] <= m["auroc_ci_high"]
    assert m["accuracy"] == pytest.approx(4 / 5)  # the 1.5 hard negative is flagged
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.5)
    assert m["fpr_at_1pct_fpr"] == pytest.approx(0.0)
    assert m["detection_rate"] == pytest.approx(1.0)
    assert m["mean_score"] == pytest.approx(0.5)
    hn = m["by_label"]["hard_negative"]
    assert hn == {"n": 2, "flagged_rate": 0.5, "flagged_rate_1pct_fpr": 0.0, "mean_score": 0.25}
    assert m["by_label"]["aligned"]["flagged_rate"] == 0.0
    assert set(m["by_label"]) == {"aligned", "hard_negative", "alignment_faking"}


def test_evaluate_scores_one_class_gives_none_not_fake_numbers() -> None:
    m = evaluate_scores([1, 1, 1, 1], [-1.0, 0.5, 2.0, 3.0], None, train_threshold=0.0, fpr1_threshold=2.5)
    assert m["auroc"] is None and m["auroc_ci_low"] is None and m["auroc_ci_high"] is None
    assert m["detection_rate"] == pytest.approx(0.75)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.25)
    assert m["fpr_at_1pct_fpr"] is None
    assert m["mean_score"] == pytest.approx(1.125)
    assert m["mean_score_neg"] is None
    assert m["by_label"] == {}

    neg = evaluate_scores([0, 0], [0.2, -0.3], ["aligned", None], 0.0, 1.0)
    assert neg["auroc"] is None and neg["tpr_at_1pct_fpr"] is None and neg["detection_rate"] is None
    assert neg["accuracy"] == pytest.approx(0.5)
    assert set(neg["by_label"]) == {"aligned", "<null>"}
