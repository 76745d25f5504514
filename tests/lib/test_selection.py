"""Out-of-distribution model selection on tiny fixed cases (lib.selection and its use in lib.probes)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from dagster_project.lib import probes as pr
from dagster_project.lib import selection as sel
from dagster_project.lib.metrics import threshold_at_fpr
from dagster_project.lib.probes import search

BASE = "the model considered the request carefully and decided to {} because the rules said so today"


def _texts() -> list[str]:
    """Ten distinct texts; 1 is a re-wrapped near copy of 0, 5 an exact copy of 4, 8 half of 7's grams."""
    t = [BASE.format(f"answer number {i} with words w{i} x{i} y{i} z{i}") for i in range(10)]
    t[1] = "<think>\n" + t[0] + " indeed</think>"
    t[5] = t[4]
    t[8] = " ".join(t[7].split()[:12]) + " and then something entirely different happened next in the story"
    return t


def test_near_duplicate_clusters_join_shared_grams_only() -> None:
    texts = _texts()
    cl = sel.near_duplicate_clusters(texts)
    assert cl[0] == cl[1]  # tags stripped: the same 5-grams
    assert cl[4] == cl[5]  # exact copies
    assert len({cl[i] for i in (0, 2, 3, 4, 6, 7, 9)}) == 7  # the template alone is not "half the grams"
    # 8 keeps 7's first twelve words: it shares some 5-grams with 7, but fewer than half of its own
    s7, s8 = sel.shingles(texts[7]), sel.shingles(texts[8])
    assert len(s7 & s8) < 0.5 * min(len(s7), len(s8))
    assert cl[7] != cl[8]
    assert sel.near_duplicate_clusters(texts, min_share=0.3)[7] == sel.near_duplicate_clusters(texts, min_share=0.3)[8]


def test_group_folds_never_split_a_near_duplicate_pair() -> None:
    rng = np.random.default_rng(0)
    n = 60
    clusters = np.arange(n)
    pairs = [(i, i + 1) for i in range(0, n, 6)]  # a near-duplicate pair every six samples
    for a, b in pairs:
        clusters[b] = clusters[a]
    y = (rng.random(n) < 0.5).astype(np.int8)
    y[:4] = [0, 1, 0, 1]
    for seed in range(5):
        folds = sel.group_folds(y, clusters, folds=5, seed=seed)
        assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(n))
        for tr, te in folds:
            for a, b in pairs:
                assert (a in te) == (b in te) and (a in tr) == (b in tr)
    # cross_validate takes the same clusters: every out-of-fold score comes from a fold without the twin
    X = sp.csr_matrix(rng.random((n, 4)))
    spec = pr.ProbeSpec("p", "s", (0, 1, 2, 3), penalty="l2", C=1.0)
    cv = pr.cross_validate(spec, X, y, folds=5, seed=0, clusters=clusters)
    assert len(cv.fold_aurocs) == 5 and cv.oof_scores.shape == (n,)


def test_held_out_group_loop_never_trains_on_the_held_out_group() -> None:
    groups = ["a"] * 12 + ["b"] * 12 + ["c"] * 12 + ["tiny"] * 3
    y = np.array(([1, 0] * 6) * 3 + [1, 1, 1], dtype=np.int8)
    clusters = np.arange(len(y))
    clusters[30] = clusters[0]  # a sample of group c is a near copy of one of group a
    splits = sel.lodo_splits(groups, y, clusters, min_group=10)
    assert [s.group for s in splits] == ["a", "b", "c"]  # "tiny" is never held out
    g = np.array(groups)
    for s in splits:
        assert set(g[s.test_idx]) == {s.group}
        assert s.group not in set(g[s.train_idx])
        assert not set(clusters[s.train_idx]) & set(clusters[s.test_idx])
    a, c = splits[0], splits[2]
    assert 30 not in a.train_idx and a.n_dropped_near_dup == 1
    assert 0 not in c.train_idx and c.n_dropped_near_dup == 1

    # and the probe search's loop: a spy on fit_probe sees no held-out row in any held-out fit
    rng = np.random.default_rng(1)
    X = sp.csr_matrix(rng.random((len(y), 6)) + y[:, None] * np.array([1.0, 0, 0, 0, 0, 0]))
    marked = sp.csr_matrix(np.hstack([X.toarray(), np.arange(len(y))[:, None] + 1.0]))  # column 6: row id + 1
    seen: list[set[int]] = []
    real_fit = search.fit_probe

    def spy(spec, Xf, yf, seed=0, **kw):  # noqa: ANN001, ANN202
        ids = np.asarray(sp.csr_matrix(Xf)[:, -1].toarray()).ravel() if 6 in spec.feature_ids else None
        if ids is not None:
            seen.append({int(i) - 1 for i in ids})
        return real_fit(spec, Xf, yf, seed=seed, **kw)

    search.fit_probe = spy  # type: ignore[assignment]
    try:
        plan = pr.SelectionPlan(mode="lodo", splits=splits, clusters=clusters)
        cfg = pr.ProbeGridConfig(folds=3)
        designs = pr.Designs(marked, feature_ids=np.arange(7))
        spec = pr.ProbeSpec("p", "fixed", tuple(range(7)), penalty="l2", C=1.0)
        result = search._run(spec, designs, y, cfg, "grid", plan)
    finally:
        search.fit_probe = real_fit  # type: ignore[assignment]
    assert [r["held_out_group"] for r in result.lodo] == ["a", "b", "c"]
    held_fits = seen[-3:]  # the last three fits are the held-out ones, in split order
    for s, rows in zip(splits, held_fits, strict=True):
        assert rows == set(s.train_idx.tolist())
        assert not rows & set(s.test_idx.tolist())
    assert result.selection_score == min(r["auroc"] for r in result.lodo)


def test_one_class_group_is_scored_against_control_negatives() -> None:
    m = sel.held_out_score([1, 1, 1, 1], [2.0, 3.0, 0.5, 4.0], [0.0, 1.0, -1.0], threshold=1.0, n_boot=20)
    assert m["auroc_vs"] == "control"
    assert m["auroc"] == pytest.approx((3 + 3 + 2 + 3) / 12)  # by hand: positives over the 3 control scores
    assert m["detection_rate"] == 0.75 and m["fpr"] is None
    none = sel.held_out_score([0, 0], [1.0, 2.0], [0.0], threshold=1.5, n_boot=20)
    assert none["auroc"] is None and none["fpr"] == 0.5


def test_all_zero_weights_are_degenerate_and_never_best() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30, dtype=np.int8)
    X = sp.csr_matrix(rng.random((60, 5)) + y[:, None] * 0.5)
    strong = search._run(pr.ProbeSpec("strong", "s", tuple(range(5)), penalty="l2", C=1.0), pr.Designs(X, feature_ids=np.arange(5)), y,
                     pr.ProbeGridConfig(folds=3), "grid")
    # an L1 probe regularised so hard that every weight is zero
    zero = search._run(pr.ProbeSpec("zero", "s", tuple(range(5)), penalty="l1", C=1e-6), pr.Designs(X, feature_ids=np.arange(5)), y,
                   pr.ProbeGridConfig(folds=3), "grid")
    assert zero.probe.n_nonzero == 0 and zero.degenerate
    assert not strong.degenerate
    zero.selection_score = 1.0  # even a perfect score does not lift a degenerate probe above a working one
    assert sorted([zero, strong], key=pr.rank_key)[0] is strong


def test_control_threshold_gives_the_control_fpr_asked_for() -> None:
    rng = np.random.default_rng(2)
    y = np.array([0, 1] * 40, dtype=np.int8)
    X = sp.csr_matrix(rng.random((80, 4)) + y[:, None] * np.array([1.0, 0.5, 0, 0]))
    cal = sp.csr_matrix(rng.random((200, 4)) * 1.5)
    for fpr in (0.01, 0.05, 0.2):
        plan = pr.SelectionPlan(control_fpr=fpr)
        r = search._run(pr.ProbeSpec("p", "s", tuple(range(4)), penalty="l2", C=1.0), pr.Designs(X, cal, None, np.arange(4)),
                    y, pr.ProbeGridConfig(folds=3), "grid", plan)
        scores = r.probe.decision_function(cal)
        assert r.probe.threshold_source == "control"
        assert r.probe.fpr1_threshold == r.probe.train_threshold == threshold_at_fpr(scores, fpr)
        flagged = float((scores > r.probe.fpr1_threshold).mean())
        assert flagged <= fpr and flagged >= fpr - 1.0 / 200  # as close to the asked rate as 200 texts allow


def test_group_weights_balance_groups_within_each_class() -> None:
    groups = ["a"] * 8 + ["b"] * 2 + ["a"] * 5
    y = np.array([1] * 10 + [0] * 5, dtype=np.int8)
    w = sel.group_weights(groups, y, "balanced")
    assert w[:8].sum() == pytest.approx(w[8:10].sum())  # both positive groups weigh the same in all
    assert w[y == 1].sum() == pytest.approx(w[y == 0].sum()) == pytest.approx(7.5)
    w0 = sel.group_weights(groups, y, "none")
    assert np.allclose(w0[y == 1], 0.75) and np.allclose(w0[y == 0], 1.5)  # sklearn's "balanced" class weights
    ws = sel.group_weights(groups, y, "sqrt")
    assert ws[:8].sum() / ws[8:10].sum() == pytest.approx(2.0)  # sqrt(8) / sqrt(2)


def test_fold_feature_ids_rerank_on_the_training_side_only() -> None:
    # feature 0 separates the classes on rows 0-3, feature 1 on rows 4-7
    X = sp.csr_matrix(np.array([[3, 0, 1], [0, 0, 1], [3, 0, 1], [0, 0, 1],
                                [0, 3, 1], [0, 0, 1], [0, 3, 1], [0, 0, 1]], dtype=float))
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0], dtype=np.int8)
    spec = pr.ProbeSpec("p", "top1", (2,), penalty="l2")
    fids = np.array([10, 11, 12])
    assert pr.fold_feature_ids(spec, X[:4], fids, y[:4]) == (10,)
    assert pr.fold_feature_ids(spec, X[4:], fids, y[4:]) == (11,)
    assert pr.fold_feature_ids(pr.ProbeSpec("q", "all", (2,)), X[:4], fids, y[:4]) == (10, 12)
    assert pr.fold_feature_ids(pr.ProbeSpec("r", "relevant", (12,)), X[:4], fids, y[:4]) == (12,)


def test_ksparse_curve_takes_the_features_its_rule_names() -> None:
    """transfer_scores by hand: the minimum over groups of each feature's selectivity in its direction."""
    # columns: 0 fires on positives of both groups; 1 on positives of group a only; 2 on negatives of both;
    # 3 on hard negatives and positives alike (its sign flips between hard and other negatives); 4 never
    X = np.array([
        # a: pos, pos, neg, neg(hard)   b: pos, pos, neg, neg
        [4, 4, 0, 0, 0], [4, 2, 0, 2, 0], [0, 0, 3, 0, 0], [0, 0, 3, 4, 0],
        [4, 0, 0, 2, 0], [2, 0, 0, 0, 0], [0, 0, 3, 0, 0], [0, 0, 3, 0, 0],
    ], dtype=float)
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=np.int8)
    groups = ["a"] * 4 + ["b"] * 4
    hard = np.array([0, 0, 0, 1, 0, 0, 0, 0], dtype=bool)
    s = pr.transfer_scores(sp.csr_matrix(X), y, groups, hard)
    assert s[0] == 1.0  # selectivity 1 in both groups
    assert s[1] == 0.0  # group b: never fires (p = n = 0)
    assert s[2] == 1.0  # a negative-direction feature, selective against positives in both groups
    assert s[3] <= 0.0  # fires on a hard negative more than on positives there: sign disagrees, sunk to <= 0
    assert s[4] == -1.0  # inactive
    cfg = pr.ProbeGridConfig(ksparse=(1, 2, 3, 10))
    fids = np.array([10, 11, 12, 13, 14])
    specs = pr.ksparse_specs(cfg, fids, s)
    assert [sp_.feature_ids for sp_ in specs] == [(10,), (10, 12), (10, 11, 12)]  # ties by id; 10 > 4 usable
    assert [sp_.feature_set for sp_ in specs] == ["transfer1", "transfer2", "transfer3"]
    # re-ranked on a held-out split's training side with the same rule
    ids = pr.fold_feature_ids(specs[1], sp.csr_matrix(X[:4]), fids, y[:4], groups=groups[:4], hard=hard[:4])
    assert ids == tuple(sorted(int(f) for f in fids[np.lexsort((fids, -pr.transfer_scores(X[:4], y[:4], groups[:4],
                                                                                           hard[:4])))[:2]]))


def test_cross_validation_survives_clusters_that_unbalance_folds() -> None:
    """Big near-duplicate clusters can leave a test fold with one class, or a training side without one:
    CV then scores the folds it can (or falls back to plain stratified folds), never crashes."""
    rng = np.random.default_rng(3)
    y = np.array([1] * 6 + [0] * 14, dtype=np.int8)
    X = sp.csr_matrix(rng.random((20, 3)) + y[:, None])
    spec = pr.ProbeSpec("p", "s", (0, 1, 2), penalty="l2", C=1.0)
    one_cluster_of_positives = np.where(y == 1, 0, np.arange(20))
    cv = pr.cross_validate(spec, X, y, folds=5, clusters=one_cluster_of_positives)
    assert cv.fold_aurocs and all(0.0 <= a <= 1.0 for a in cv.fold_aurocs)
    everything_one_cluster = np.zeros(20, dtype=np.int64)
    cv = pr.cross_validate(spec, X, y, folds=5, clusters=everything_one_cluster)
    assert len(cv.fold_aurocs) == 5  # fell back to stratified folds
