"""SQL statistics on fixture Parquet, each compared with numpy on the dense arrays it was written from."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from scipy.stats import false_discovery_control, mannwhitneyu, norm, spearmanr

from dagster_project.lib import plots_stats, stats
from dagster_project.lib.sql import SQLError
from tests.lib.fixtures_stats import LAYERS, MIN_ACT, N_FEATURES, SAE_WIDTH, LakeFixture, build_lake, connect

RTOL = 1e-9


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> LakeFixture:
    return build_lake(tmp_path_factory.mktemp("lake"), seed=7)


@pytest.fixture
def con(lake: LakeFixture) -> Iterator[duckdb.DuckDBPyConnection]:
    c = connect(lake.root)
    yield c
    c.close()


def _col(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table[name].to_numpy(zero_copy_only=False), dtype=np.float64)


# ---- numpy references -------------------------------------------------------------------------


def ref_class_stats(x: np.ndarray, y: np.ndarray, min_act: float = MIN_ACT) -> dict[str, np.ndarray]:
    """Per-feature class statistics of a dense (samples x features) array, for features active at all."""
    present = np.flatnonzero((x > 0).any(axis=0))
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    xp, xn = x[y][:, present], x[~y][:, present]
    with np.errstate(invalid="ignore", divide="ignore"):
        pos_mean = xp.sum(0) / n_pos if n_pos else np.full(len(present), np.nan)
        neg_mean = xn.sum(0) / n_neg if n_neg else np.full(len(present), np.nan)
        out = {
            "feature_id": present,
            "pos_mean": pos_mean,
            "neg_mean": neg_mean,
            "pos_freq": (xp > 0).sum(0) / n_pos if n_pos else np.full(len(present), np.nan),
            "neg_freq": (xn > 0).sum(0) / n_neg if n_neg else np.full(len(present), np.nan),
            "max_act": x[:, present].max(0),
            "selectivity": (pos_mean - neg_mean) / (pos_mean + neg_mean),
        }
    out["is_active"] = out["max_act"] >= min_act
    return out


def assert_matches(table: pa.Table, ref: dict[str, np.ndarray], columns: list[str]) -> None:
    np.testing.assert_array_equal(table["feature_id"].to_numpy(), ref["feature_id"])
    for c in columns:
        np.testing.assert_allclose(_col(table, c), ref[c], rtol=RTOL, atol=0, equal_nan=True, err_msg=c)


def ref_selection(
    ref: dict[str, np.ndarray],
    min_selectivity: float,
    min_freq: float,
    keep_negative: bool,
    max_features: int | None,
) -> tuple[list[int], list[str]]:
    sel = ref["selectivity"]
    direction = np.where(sel >= 0, "positive", "negative")
    freq = np.where(sel >= 0, ref["pos_freq"], ref["neg_freq"])
    keep = ref["is_active"] & (np.abs(sel) >= min_selectivity) & (freq >= min_freq)
    if not keep_negative:
        keep &= direction == "positive"
    idx = np.flatnonzero(keep)
    order = idx[np.lexsort((ref["feature_id"][idx], -freq[idx], -np.abs(sel[idx])))]
    if max_features is not None:
        order = order[:max_features]
    return [int(ref["feature_id"][i]) for i in order], [str(direction[i]) for i in order]


# ---- feature_stats ----------------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_feature_stats_matches_numpy(lake: LakeFixture, con: duckdb.DuckDBPyConnection, layer: int) -> None:
    table = stats.feature_stats(con, layer, min_act=MIN_ACT)
    x, y = lake.stacked(layer, lake.train_datasets())
    ref = ref_class_stats(x, y)
    assert_matches(table, ref, ["pos_mean", "neg_mean", "pos_freq", "neg_freq", "max_act", "selectivity"])
    assert table["is_active"].to_pylist() == ref["is_active"].tolist()
    assert set(table["n_pos"].to_pylist()) == {int(y.sum())}
    assert set(table["n_neg"].to_pylist()) == {int((~y).sum())}
    assert set(table["layer"].to_pylist()) == {layer}
    # the same on mean_act
    xm, _ = lake.stacked(layer, lake.train_datasets(), "mean_act")
    present = ref["feature_id"]
    pm, nm = xm[y][:, present].sum(0) / y.sum(), xm[~y][:, present].sum(0) / (~y).sum()
    np.testing.assert_allclose(_col(table, "pos_mean_mean_act"), pm, rtol=RTOL)
    np.testing.assert_allclose(_col(table, "neg_mean_mean_act"), nm, rtol=RTOL)
    np.testing.assert_allclose(_col(table, "selectivity_mean_act"), (pm - nm) / (pm + nm), rtol=RTOL)


def test_feature_stats_planted_structure(con: duckdb.DuckDBPyConnection) -> None:
    rows = {r["feature_id"]: r for r in stats.feature_stats(con, 3).to_pylist()}
    for f in (5, 6, 7):  # never on positives: mean and frequency 0 there, selectivity exactly -1
        assert rows[f]["pos_mean"] == 0 and rows[f]["pos_freq"] == 0 and rows[f]["selectivity"] == -1
    for f in (8, 9):
        assert rows[f]["neg_mean"] == 0 and rows[f]["neg_freq"] == 0 and rows[f]["selectivity"] == 1
    assert all(rows[f]["selectivity"] > 0.3 for f in range(5))
    assert not ({10, 11, 12} | set(range(45, 50))) & rows.keys()  # never active on the train sets
    assert rows[13]["is_active"] is False and 0 < rows[13]["max_act"] < MIN_ACT


def test_feature_stats_dataset_list(lake: LakeFixture, con: duckdb.DuckDBPyConnection) -> None:
    table = stats.feature_stats(con, 6, min_act=2.0, train_datasets=["train_a", "test_b"])
    x, y = lake.stacked(6, ["train_a", "test_b"])
    ref = ref_class_stats(x, y, min_act=2.0)
    assert_matches(table, ref, ["pos_mean", "neg_mean", "pos_freq", "neg_freq", "max_act", "selectivity"])
    assert table["is_active"].to_pylist() == ref["is_active"].tolist()
    with pytest.raises(TypeError, match="list of dataset names"):
        stats.feature_stats(con, 6, train_datasets="train_a")


def test_feature_stats_missing_class_gives_null_not_nan(con: duckdb.DuckDBPyConnection) -> None:
    table = stats.feature_stats(con, 3, train_datasets=["train_pos"])
    assert table.num_rows > 0
    assert table["selectivity"].null_count == table.num_rows
    assert table["neg_mean"].null_count == table.num_rows
    assert table["p_value"].null_count == table["q_value"].null_count == table.num_rows  # no test, not p = 1
    assert stats.evaluate_check(con, "feature_stats_nan", {"layer": 3}, {"feature_stats": table}).passed


# ---- significance: Mann-Whitney U and Benjamini-Hochberg --------------------------------------


def ref_rank_test(x: np.ndarray, y: np.ndarray, feature_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's two-sided asymptotic Mann-Whitney p (continuity corrected) per feature, and BH q over them."""
    p = np.array(
        [
            mannwhitneyu(
                x[y, f], x[~y, f], alternative="two-sided", method="asymptotic", use_continuity=True
            ).pvalue
            for f in feature_ids
        ]
    )
    return p, false_discovery_control(p, method="bh")


@pytest.fixture(scope="module")
def tied_lake(tmp_path_factory: pytest.TempPathFactory) -> LakeFixture:
    return build_lake(tmp_path_factory.mktemp("tied_lake"), seed=11, quantum=0.5)


@pytest.mark.parametrize("which", ["continuous", "tied"])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("train_datasets", [None, ["train_a", "test_b"]])
def test_rank_test_matches_scipy(
    lake: LakeFixture,
    tied_lake: LakeFixture,
    which: str,
    layer: int,
    train_datasets: list[str] | None,
) -> None:
    fx = lake if which == "continuous" else tied_lake
    c = connect(fx.root)
    table = stats.feature_stats(c, layer, train_datasets=train_datasets)
    c.close()
    x, y = fx.stacked(layer, train_datasets or fx.train_datasets())
    fids = table["feature_id"].to_numpy()
    # the fixture has what the sparse ranks must get right: zeros on every feature (absent rows), and in the
    # tied lake, equal active values within a feature
    assert all((x[:, f] == 0).sum() >= 2 for f in fids)
    if which == "tied":
        assert sum(len(np.unique(x[x[:, f] > 0, f])) < (x[:, f] > 0).sum() for f in fids) > len(fids) // 2
    p_ref, q_ref = ref_rank_test(x, y, fids)
    np.testing.assert_allclose(_col(table, "p_value"), p_ref, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(_col(table, "q_value"), q_ref, rtol=1e-9, atol=1e-15)
    assert "rank_z" not in table.column_names
    assert (p_ref < 1e-4).any() and (p_ref > 0.2).any()  # both ends of the range are compared


def _tiny_views(rows: list[tuple[int, int, float]], labels: list[bool]) -> duckdb.DuckDBPyConnection:
    """A connection whose ``samples`` / ``activations`` views hold one train dataset, written by hand."""
    c = duckdb.connect()
    c.register(
        "samples",
        pa.table(
            {
                "dataset": ["d"] * len(labels),
                "sample_id": pa.array(range(len(labels)), pa.int32()),
                "is_positive": labels,
                "role": ["train"] * len(labels),
            }
        ),
    )
    c.register(
        "activations",
        pa.table(
            {
                "layer": pa.array([1] * len(rows), pa.int32()),
                "dataset": ["d"] * len(rows),
                "sample_id": pa.array([r[0] for r in rows], pa.int32()),
                "feature_id": pa.array([r[1] for r in rows], pa.int32()),
                "max_act": pa.array([r[2] for r in rows], pa.float32()),
                "mean_act": pa.array([r[2] / 2 for r in rows], pa.float32()),
            }
        ),
    )
    return c


def test_rank_test_edge_cases_by_hand() -> None:
    labels = [True, True, True, False, False, False, False]
    rows = (
        [(i, 0, 2.0) for i in range(7)]  # feature 0: every sample ties (sigma 0): no evidence, p = 1
        + [(0, 1, 3.0), (1, 1, 3.0), (2, 1, 1.5), (3, 1, 1.5)]  # feature 1: ties among active values and zeros
        + [(5, 2, 0.7)]  # feature 2: a single negative sample
    )
    c = _tiny_views(rows, labels)
    table = stats.feature_stats(c, 1, min_act=1.0)
    c.close()
    dense = np.zeros((7, 3))
    for sid, fid, v in rows:
        dense[sid, fid] = v
    y = np.array(labels)
    p_ref, q_ref = ref_rank_test(dense, y, np.arange(3))
    assert table["feature_id"].to_pylist() == [0, 1, 2]
    assert table["p_value"].to_pylist()[0] == 1.0 == p_ref[0]
    np.testing.assert_allclose(_col(table, "p_value"), p_ref, rtol=1e-12)
    np.testing.assert_allclose(_col(table, "q_value"), q_ref, rtol=1e-12)


def test_rank_test_p_values_from_z() -> None:
    z = np.array([0.0, -0.3, 1.0, 3.0, 12.0, 30.0])
    got = stats.rank_test_p_values([*z, None, 37.5])
    np.testing.assert_allclose(got[:-2], np.minimum(1.0, 2 * norm.sf(z)), rtol=1e-12)
    assert got[0] == got[1] == 1.0  # clipped at 1
    assert np.isnan(got[-2])
    assert 0 < got[-1] < 1e-300  # the far tail is not rounded to 0 (where 1 - cdf would be)


def test_bh_q_values_match_scipy() -> None:
    rng = np.random.default_rng(5)
    p = np.concatenate([rng.uniform(size=60), rng.uniform(0, 1e-4, size=15), [0.02] * 5, [1.0, 0.0]])
    rng.shuffle(p)
    q = stats.bh_q_values(p)
    np.testing.assert_allclose(q, false_discovery_control(p, method="bh"), rtol=1e-12)
    assert ((q >= p) & (q <= 1)).all()
    assert len(set(q[p == 0.02])) == 1  # tied p-values get one q
    # missing p-values are not hypotheses: they stay missing and do not count in m
    with_missing = stats.bh_q_values([*p, None, float("nan")])
    np.testing.assert_allclose(with_missing[:-2], q, rtol=1e-12)
    assert np.isnan(with_missing[-2:]).all()
    assert stats.bh_q_values([]).shape == (0,)


# ---- activation_profile -----------------------------------------------------------------------


@pytest.mark.parametrize("layer", LAYERS)
def test_activation_profile_matches_numpy(
    lake: LakeFixture, con: duckdb.DuckDBPyConnection, layer: int
) -> None:
    table = stats.activation_profile(con, layer, sae_width=SAE_WIDTH)
    rows = {r["dataset"]: r for r in table.to_pylist()}
    assert sorted(rows) == lake.datasets
    for d, r in rows.items():
        x = lake.max_act[(layer, d)].astype(np.float64)
        counts = (x > 0).sum(1)
        values = x[x > 0]
        n_active = int((x > 0).any(0).sum())
        assert r["layer"] == layer
        assert r["n_samples"] == x.shape[0]
        assert r["n_tokens"] == int(lake.n_tokens[d].sum())
        assert r["n_samples_no_active"] == int((counts == 0).sum()) >= 2
        assert r["active_per_sample_mean"] == pytest.approx(counts.mean(), rel=RTOL)
        assert r["active_per_sample_median"] == pytest.approx(np.median(counts), rel=RTOL)
        assert r["active_per_sample_p90"] == pytest.approx(np.percentile(counts, 90), rel=RTOL)
        assert r["n_active_rows"] == values.size
        assert r["max_act_mean"] == pytest.approx(values.mean(), rel=RTOL)
        # quantile_cont interpolates in the column's float32, numpy in float64
        assert r["max_act_p50"] == pytest.approx(np.percentile(values, 50), rel=1e-6)
        assert r["max_act_p99"] == pytest.approx(np.percentile(values, 99), rel=1e-6)
        assert r["n_features_active"] == n_active
        assert r["n_dead_features"] == SAE_WIDTH - n_active


def test_activation_profile_dataset_filter(con: duckdb.DuckDBPyConnection) -> None:
    table = stats.activation_profile(con, 3, sae_width=SAE_WIDTH, datasets=["test_b", "ood_c"])
    assert table["dataset"].to_pylist() == ["ood_c", "test_b"]


# ---- cross_distribution -----------------------------------------------------------------------


@pytest.mark.parametrize("min_act", [MIN_ACT, 3.0])
def test_cross_distribution_jaccard(
    lake: LakeFixture, con: duckdb.DuckDBPyConnection, min_act: float
) -> None:
    table = stats.cross_distribution(con, 6, min_act=min_act)
    sets = {d: set(np.flatnonzero(lake.max_act[(6, d)].max(0) >= min_act).tolist()) for d in lake.datasets}
    assert table.num_rows == len(sets) ** 2
    for r in table.to_pylist():
        a, b = sets[r["dataset_a"]], sets[r["dataset_b"]]
        assert (r["n_active_a"], r["n_active_b"], r["n_both"], r["n_either"]) == (
            len(a),
            len(b),
            len(a & b),
            len(a | b),
        )
        assert r["jaccard"] == pytest.approx(len(a & b) / len(a | b), rel=RTOL)
        assert r["frac_a_in_b"] == pytest.approx(len(a & b) / len(a), rel=RTOL)
        if r["dataset_a"] == r["dataset_b"]:
            assert r["jaccard"] == 1.0
    # features 10-12 fire only outside training: the train sets overlap each other more than test_b
    j = {(r["dataset_a"], r["dataset_b"]): r["jaccard"] for r in table.to_pylist()}
    assert j[("train_a", "test_b")] < 1.0


# ---- selected_features ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("min_selectivity", "min_freq", "keep_negative", "max_features"),
    [
        (0.3, 0.0, True, None),
        (0.3, 0.0, False, None),
        (0.2, 0.5, True, None),
        (0.3, 0.0, True, 4),
        (0.0, 0.0, True, 7),
    ],
)
def test_selected_features_order_and_cap(
    lake: LakeFixture,
    con: duckdb.DuckDBPyConnection,
    min_selectivity: float,
    min_freq: float,
    keep_negative: bool,
    max_features: int | None,
) -> None:
    fs = stats.feature_stats(con, 3)
    table = stats.selected_features(
        con,
        3,
        min_selectivity=min_selectivity,
        min_freq=min_freq,
        keep_negative=keep_negative,
        max_features=max_features,
        stats=fs,
    )
    x, y = lake.stacked(3, lake.train_datasets())
    ids, directions = ref_selection(
        ref_class_stats(x, y), min_selectivity, min_freq, keep_negative, max_features
    )
    assert table["feature_id"].to_pylist() == ids
    assert table["direction"].to_pylist() == directions
    assert table["rank"].to_pylist() == list(range(1, len(ids) + 1))
    assert len(ids) > 0
    if max_features is not None:
        assert len(ids) == max_features
    if not keep_negative:
        assert set(directions) == {"positive"}
    assert all(r.startswith("selectivity ") and "training samples" in r for r in table["reason"].to_pylist())
    # 5-7 / 8-9 tie at |selectivity| = 1; frequency breaks the tie
    if keep_negative and min_freq == 0:
        assert set(ids[:5]) <= {5, 6, 7, 8, 9}


def test_selected_features_reads_the_view(con: duckdb.DuckDBPyConnection) -> None:
    fs = stats.feature_stats(con, 3)
    con.register("feature_stats", fs)
    from_view = stats.selected_features(con, 3, max_features=5)
    assert from_view.equals(stats.selected_features(con, 3, max_features=5, stats=fs))
    con.unregister("feature_stats")


@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_selected_features_fdr_alpha(lake: LakeFixture, con: duckdb.DuckDBPyConnection, alpha: float) -> None:
    fs = stats.feature_stats(con, 3)
    kwargs = {"min_selectivity": 0.1, "min_freq": 0.0, "keep_negative": True, "max_features": None}
    unfiltered = stats.selected_features(con, 3, stats=fs, **kwargs)
    table = stats.selected_features(con, 3, stats=fs, fdr_alpha=alpha, **kwargs)
    x, y = lake.stacked(3, lake.train_datasets())
    ref = ref_class_stats(x, y)
    _, ref["q_value"] = ref_rank_test(x, y, ref["feature_id"])
    ids, _ = ref_selection(ref, **kwargs)
    q_of = dict(zip(ref["feature_id"].tolist(), ref["q_value"].tolist(), strict=True))
    kept = [f for f in ids if q_of[f] < alpha]
    assert table["feature_id"].to_pylist() == kept
    assert table["rank"].to_pylist() == list(range(1, len(kept) + 1))
    assert 0 < len(kept) < len(ids) == unfiltered.num_rows  # the filter keeps some and drops some
    assert all(q < alpha for q in table["q_value"].to_pylist())
    assert all("BH q " in r and f"< {alpha:g}" in r for r in table["reason"].to_pylist())
    np.testing.assert_allclose(_col(table, "q_value"), [q_of[f] for f in kept], rtol=1e-9)


def test_selected_features_on_feature_stats_without_significance(con: duckdb.DuckDBPyConnection) -> None:
    """A feature_stats written before the rank test: selection still runs, but not with fdr_alpha."""
    fs = stats.feature_stats(con, 3)
    old = fs.drop_columns(["p_value", "q_value"])
    table = stats.selected_features(con, 3, max_features=5, stats=old)
    new = stats.selected_features(con, 3, max_features=5, stats=fs)
    assert table["feature_id"].to_pylist() == new["feature_id"].to_pylist()
    assert table["q_value"].null_count == table.num_rows == 5
    assert all("BH q" not in r for r in table["reason"].to_pylist())
    with pytest.raises(ValueError, match="rematerialize feature_stats"):
        stats.selected_features(con, 3, stats=old, fdr_alpha=0.05)


@pytest.mark.parametrize(
    "kwargs",
    [{"min_selectivity": 1.5}, {"min_freq": -0.1}, {"max_features": 0}, {"fdr_alpha": 0.0}, {"fdr_alpha": 1.5}],
)
def test_selected_features_rejects_bad_config(con: duckdb.DuckDBPyConnection, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        stats.selected_features(con, 3, **kwargs)


# ---- selected_transfer ------------------------------------------------------------------------


def test_selected_transfer_matches_numpy(lake: LakeFixture, con: duckdb.DuckDBPyConnection) -> None:
    selected = stats.selected_features(con, 3, min_selectivity=0.3, stats=stats.feature_stats(con, 3))
    # a catalog view of the same name must be shadowed by the table passed in
    con.execute(
        "create view selected_features as select 3 as layer, 0 as feature_id, 'positive' as direction"
    )
    table = stats.selected_transfer(con, 3, selected=selected)
    feats = {r["feature_id"]: r["direction"] for r in selected.to_pylist()}
    x_train, _ = lake.stacked(3, lake.train_datasets())
    train_mean = {f: x_train[:, f].sum() / x_train.shape[0] for f in feats}
    got = {(r["dataset"], r["direction"]): r for r in table.to_pylist()}
    assert len(got) == len(lake.datasets) * 3
    for d in lake.datasets:
        x = lake.max_act[(3, d)].astype(np.float64)
        for direction in ("positive", "negative", "all"):
            fs = [f for f, dr in feats.items() if direction in ("all", dr)]
            r = got[(d, direction)]
            n_firing = sum(bool((x[:, f] > 0).any()) for f in fs)
            mean_act = np.mean([x[:, f].sum() / x.shape[0] for f in fs])
            tmean = np.mean([train_mean[f] for f in fs])
            assert (r["n_selected"], r["n_firing"], r["n_samples"]) == (len(fs), n_firing, x.shape[0])
            assert r["frac_firing"] == pytest.approx(n_firing / len(fs))
            assert r["mean_act"] == pytest.approx(mean_act, rel=RTOL)
            assert r["train_mean_act"] == pytest.approx(tmean, rel=RTOL)
            assert r["mean_act_ratio"] == pytest.approx(mean_act / tmean, rel=RTOL)
    # the planted negative-only features 5-7 never fire on the positive-only dataset
    assert {5, 6, 7} <= {f for f, dr in feats.items() if dr == "negative"}
    r = got[("train_pos", "negative")]
    assert r["n_firing"] <= r["n_selected"] - 3


# ---- per-dataset selectivity and rank correlation --------------------------------------------

BOTH_CLASSES = ["ood_c", "test_b", "train_a"]


@pytest.mark.parametrize("layer", LAYERS)
def test_dataset_selectivity_matches_numpy(
    lake: LakeFixture, con: duckdb.DuckDBPyConnection, layer: int
) -> None:
    table = stats.dataset_selectivity(con, layer)
    assert sorted(set(table["dataset"].to_pylist())) == BOTH_CLASSES  # train_pos has one class only
    for d in BOTH_CLASSES:
        part = table.filter(pc.equal(table["dataset"], d))
        x, y = lake.stacked(layer, [d])
        ref = ref_class_stats(x, y)
        assert_matches(part, ref, ["pos_mean", "neg_mean", "pos_freq", "neg_freq", "max_act", "selectivity"])
        assert part["is_active"].to_pylist() == ref["is_active"].tolist()


@pytest.mark.parametrize(("layer", "min_act"), [(3, MIN_ACT), (6, MIN_ACT), (6, 0.0)])
def test_rank_correlation_matches_scipy(
    lake: LakeFixture, con: duckdb.DuckDBPyConnection, layer: int, min_act: float
) -> None:
    table = stats.rank_correlation(con, layer, min_act=min_act)
    sel = {}
    for d in BOTH_CLASSES:
        x, y = lake.stacked(layer, [d])
        ref = ref_class_stats(x, y, min_act=min_act)
        sel[d] = dict(
            zip(
                ref["feature_id"][ref["is_active"]].tolist(),
                ref["selectivity"][ref["is_active"]],
                strict=True,
            )
        )
    rows = table.to_pylist()
    assert [(r["dataset_a"], r["dataset_b"]) for r in rows] == [
        ("ood_c", "test_b"),
        ("ood_c", "train_a"),
        ("test_b", "train_a"),
    ]
    saw_ties = False
    for r in rows:
        common = sorted(sel[r["dataset_a"]].keys() & sel[r["dataset_b"]].keys())
        a = np.array([sel[r["dataset_a"]][f] for f in common])
        b = np.array([sel[r["dataset_b"]][f] for f in common])
        saw_ties |= len(np.unique(a)) < len(a)
        assert r["n_features"] == len(common)
        assert r["spearman"] == pytest.approx(spearmanr(a, b).statistic, rel=1e-9)
        assert r["pearson"] == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-9)
    assert saw_ties  # selectivity +/-1 ties: average ranks are exercised


# ---- checks -----------------------------------------------------------------------------------


def _replace(table: pa.Table, column: str, index: int, value: float) -> pa.Table:
    values = table[column].to_pylist()
    values[index] = value
    i = table.column_names.index(column)
    return table.set_column(i, column, pa.array(values, table.schema.field(column).type))


def test_checks_pass_on_clean_stats(con: duckdb.DuckDBPyConnection) -> None:
    fs = {"feature_stats": stats.feature_stats(con, 3)}
    for name in ("feature_stats_nan", "selectivity_range"):
        outcome = stats.evaluate_check(con, name, {"layer": 3}, fs)
        assert outcome.passed and outcome.n_violations == 0, outcome.description
    assert stats.evaluate_check(con, "feature_id_range", {"layer": 3, "sae_width": SAE_WIDTH}).passed
    outcome = stats.evaluate_check(con, "train_classes", {"train_datasets": None})
    assert outcome.passed, outcome.description
    assert outcome.rows["dataset"].to_pylist() == ["train_a", "train_pos"]


def test_check_flags_nan_and_inf(con: duckdb.DuckDBPyConnection) -> None:
    fs = stats.feature_stats(con, 3)
    ids = fs["feature_id"].to_pylist()
    bad = _replace(_replace(fs, "selectivity", 0, float("nan")), "pos_mean", 1, float("inf"))
    outcome = stats.evaluate_check(con, "feature_stats_nan", {"layer": 3}, {"feature_stats": bad})
    assert not outcome.passed
    got = sorted((r["feature_id"], r["stat"]) for r in outcome.rows.to_pylist())
    assert got == sorted([(ids[0], "selectivity"), (ids[1], "pos_mean")])
    # another layer's rows are not this partition's problem
    assert stats.evaluate_check(con, "feature_stats_nan", {"layer": 6}, {"feature_stats": bad}).passed


def test_check_flags_selectivity_out_of_range(con: duckdb.DuckDBPyConnection) -> None:
    fs = stats.feature_stats(con, 3)
    ids = fs["feature_id"].to_pylist()
    bad = _replace(_replace(fs, "selectivity", 2, 1.5), "selectivity_mean_act", 3, -1.2)
    rows = stats.run_check(con, "selectivity_range", {"layer": 3}, {"feature_stats": bad})
    assert rows["feature_id"].to_pylist() == sorted([ids[2], ids[3]])


def test_check_flags_feature_ids_beyond_width(lake: LakeFixture, con: duckdb.DuckDBPyConnection) -> None:
    width = 40  # the fixture has features up to 49
    outcome = stats.evaluate_check(con, "feature_id_range", {"layer": 6, "sae_width": width})
    assert not outcome.passed
    for r in outcome.rows.to_pylist():
        x = lake.max_act[(6, r["dataset"])]
        assert r["n_rows"] == int((x[:, width:] > 0).sum()) > 0
        assert r["min_feature_id"] >= width and r["max_feature_id"] < N_FEATURES


def test_check_train_classes_names_the_datasets(con: duckdb.DuckDBPyConnection) -> None:
    outcome = stats.evaluate_check(con, "train_classes", {"train_datasets": ["train_pos"]})
    assert not outcome.passed
    assert "train_pos" in outcome.description and "no negative" in outcome.description
    assert outcome.rows.to_pylist()[0] == {
        "dataset": "train_pos",
        "role": "train",
        "n_samples": 20,
        "n_positive": 20,
        "n_negative": 0,
        "in_samples": True,
    }
    outcome = stats.evaluate_check(con, "train_classes", {"train_datasets": ["train_a", "nope"]})
    assert not outcome.passed and "nope" in outcome.description
    with pytest.raises(SQLError, match="unknown check"):
        stats.run_check(con, "no_such_check", {})


# ---- plots ------------------------------------------------------------------------------------


def test_plots_are_png(con: duckdb.DuckDBPyConnection) -> None:
    pngs = [
        plots_stats.selectivity_histogram(stats.feature_stats(con, 3)),
        plots_stats.active_features_bar(stats.activation_profile(con, 3, sae_width=SAE_WIDTH)),
        plots_stats.jaccard_heatmap(stats.cross_distribution(con, 3)),
    ]
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_fixture_written_in_lake_layout(lake: LakeFixture) -> None:
    root: Path = lake.root
    assert (root / "activations" / "layer=3" / "dataset=train_a" / "part-0.parquet").is_file()
    assert (root / "samples" / "dataset=ood_c" / "part-0.parquet").is_file()
