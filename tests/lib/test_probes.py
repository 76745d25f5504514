"""Probe library: design matrices, transforms, fitting, grid, persistence and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import scipy.sparse as sp

from dagster_project.lib import plots_probes
from dagster_project.lib.probes import (
    TRANSFORMS,
    FittedProbe,
    ProbeGridConfig,
    ProbeSpec,
    active_feature_ids,
    cross_validate,
    cv_auroc,
    dense_baseline_specs,
    dense_design,
    evaluate_probe,
    feature_sets,
    fit_probe,
    load_probe,
    make_transform,
    probe_grid,
    search_dense_baselines,
    search_probes,
    select_columns,
    sparse_design,
    transform_from_state,
    transform_sweep,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- fixtures ---------------------------------------------------------------------------------


def _samples() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "dataset": ["a", "a", "a", "b"],
            "sample_id": [0, 1, 2, 0],
            "label": ["aligned", "alignment_faking", "hard_negative", "alignment_faking"],
            "is_positive": [False, True, False, True],
            "role": ["train"] * 4,
        }
    )


def _rows() -> pl.DataFrame:
    # (dataset, sample_id, feature_id, max_act, mean_act); sample a/2 has no rows at all,
    # feature 99 is outside the chosen set, dataset c is outside the samples
    data = [
        ("a", 0, 5, 1.0, 0.1),
        ("a", 0, 7, 2.0, 0.2),
        ("a", 1, 7, 3.0, 0.3),
        ("a", 1, 99, 9.0, 0.9),
        ("b", 0, 3, 4.0, 0.4),
        ("b", 0, 5, 0.5, 0.05),
        ("c", 0, 5, 8.0, 0.8),
    ]
    return pl.DataFrame(
        data, schema=["dataset", "sample_id", "feature_id", "max_act", "mean_act"], orient="row"
    )


def _planted(
    n: int = 300, d: int = 400, planted: tuple[int, ...] = (11, 42, 123, 250, 377), seed: int = 0
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Sparse exponential noise; each planted feature fires in ~60% of positives with a bigger value."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int8)
    X = sp.random(
        n, d, density=0.05, random_state=seed, format="lil", data_rvs=lambda k: rng.exponential(1.0, k)
    )
    for f in planted:
        X[:, f] = 0.0
        on = np.where((y == 1) & (rng.random(n) < 0.6))[0]
        for i in on:
            X[i, f] = 1.0 + rng.exponential(2.0)
        off = np.where((y == 0) & (rng.random(n) < 0.03))[0]
        for i in off:
            X[i, f] = rng.exponential(1.0)
    return X.tocsr(), y, np.asarray(planted)


# --- design matrices --------------------------------------------------------------------------


@pytest.mark.parametrize("as_arrow", [False, True])
def test_sparse_design_equals_dense_construction(as_arrow: bool) -> None:
    rows, samples = _rows(), _samples()
    fids = [7, 3, 5]  # column order is the given order, not sorted
    if as_arrow:
        X, y, keys = sparse_design(rows.to_arrow(), samples.to_arrow(), fids, value="max_act")
    else:
        X, y, keys = sparse_design(rows, samples, fids, value="max_act")
    assert sp.issparse(X) and X.shape == (4, 3)
    expected = np.zeros((4, 3))
    row_of = {("a", 0): 0, ("a", 1): 1, ("a", 2): 2, ("b", 0): 3}
    for ds, sid, f, mx, _ in rows.iter_rows():
        if (ds, sid) in row_of and f in fids:
            expected[row_of[(ds, sid)], fids.index(f)] = mx
    np.testing.assert_array_equal(X.toarray(), expected)
    assert X.getnnz() == 5
    np.testing.assert_array_equal(y, [0, 1, 0, 1])
    assert keys == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]

    Xm, _, _ = sparse_design(rows, samples, fids, value="mean_act")
    np.testing.assert_allclose(Xm.toarray(), expected / 10)


def test_sparse_design_rejects_bad_input() -> None:
    rows, samples = _rows(), _samples()
    dup = pl.concat([rows, rows.head(1)])
    with pytest.raises(ValueError, match="more than one row"):
        sparse_design(dup, samples, [5, 7])
    with pytest.raises(ValueError, match="duplicates"):
        sparse_design(rows, samples, [5, 5])
    with pytest.raises(ValueError, match="value"):
        sparse_design(rows, samples, [5], value="act")
    with pytest.raises(ValueError, match="missing column"):
        sparse_design(rows.drop("dataset"), samples, [5])
    with pytest.raises(ValueError, match="null is_positive"):
        sparse_design(rows, samples.with_columns(pl.lit(None, pl.Boolean).alias("is_positive")), [5])


def test_active_feature_ids_and_select_columns() -> None:
    rows, samples = _rows(), _samples()
    ids = active_feature_ids(rows)
    np.testing.assert_array_equal(ids, [3, 5, 7, 99])
    X, _, _ = sparse_design(rows, samples, ids)
    sub = select_columns(X, ids, [7, 3])
    np.testing.assert_array_equal(sub.toarray(), sparse_design(rows, samples, [7, 3])[0].toarray())
    with pytest.raises(ValueError, match="not columns"):
        select_columns(X, ids, [1000])


def test_dense_design_poolings() -> None:
    samples = _samples()
    resid = pl.DataFrame(
        {
            "dataset": ["b", "a", "a", "a"],  # order differs from samples
            "sample_id": [0, 2, 1, 0],
            "resid_mean": [[3.0, 3.5], [2.0, 2.5], [1.0, 1.5], [0.0, 0.5]],
            "resid_max": [[13.0, 13.5], [12.0, 12.5], [11.0, 11.5], [10.0, 10.5]],
        },
        schema_overrides={"resid_mean": pl.List(pl.Float32), "resid_max": pl.List(pl.Float32)},
    )
    Xm, y, keys = dense_design(resid, samples, "mean")
    np.testing.assert_array_equal(Xm, [[0, 0.5], [1, 1.5], [2, 2.5], [3, 3.5]])
    Xb, _, _ = dense_design(resid.to_arrow(), samples, "both")
    assert Xb.shape == (4, 4)
    np.testing.assert_array_equal(Xb[:, 2:], Xm + 10)
    np.testing.assert_array_equal(y, [0, 1, 0, 1])
    with pytest.raises(ValueError, match="no resid_mean"):
        dense_design(resid.head(3), samples, "mean")


# --- transforms -------------------------------------------------------------------------------


def test_stateless_transforms_hand_values() -> None:
    X = sp.csr_matrix(np.array([[0.0, 1.0, 3.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(make_transform("raw").fit(X).apply(X).toarray(), X.toarray())
    b = make_transform("binary").fit(X).apply(X)
    assert sp.issparse(b)
    np.testing.assert_array_equal(b.toarray(), [[0, 1, 1], [1, 0, 0], [0, 0, 0]])
    lg = make_transform("log1p").fit(X).apply(X)
    assert sp.issparse(lg)
    np.testing.assert_allclose(lg.toarray(), np.log1p(X.toarray()))
    z = make_transform("zscore").fit(X).apply(X)
    row0 = np.array([0.0, 1.0, 3.0])
    np.testing.assert_allclose(z[0], (row0 - row0.mean()) / row0.std())
    np.testing.assert_allclose(z[1], [2 / np.sqrt(2), -1 / np.sqrt(2), -1 / np.sqrt(2)])
    np.testing.assert_array_equal(z[2], [0.0, 0.0, 0.0])  # no spread: zeros, not NaN


def test_quantile_fit_on_train_apply_on_eval_and_state() -> None:
    rng = np.random.default_rng(1)
    train = sp.random(
        200, 6, density=0.4, random_state=2, format="csr", data_rvs=lambda k: rng.exponential(1, k)
    )
    evals = sp.random(
        50, 6, density=0.4, random_state=3, format="csr", data_rvs=lambda k: rng.exponential(1, k)
    )
    t = make_transform("quantile", seed=0).fit(train)
    out = t.apply(evals).toarray()
    assert out.min() >= 0.0 and out.max() <= 1.0
    col = evals[:, 0].toarray().ravel()
    nz = col > 0
    order = np.argsort(col[nz])
    assert np.all(np.diff(out[:, 0][nz][order]) >= 0)  # monotone in the input
    assert np.all(out[~nz, 0] == 0.0)  # implicit zeros stay at zero
    params, arrays = t.state()
    json.dumps(params)
    again = transform_from_state("quantile", params, arrays)
    np.testing.assert_array_equal(again.apply(evals).toarray(), out)
    with pytest.raises(RuntimeError):
        make_transform("quantile").apply(evals)
    with pytest.raises(ValueError, match="transform"):
        make_transform("sqrt")


# --- specs, fitting, CV -----------------------------------------------------------------------


def test_probe_spec_validation() -> None:
    with pytest.raises(ValueError, match="penalty"):
        ProbeSpec("p", "s", (1,), penalty="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="C must"):
        ProbeSpec("p", "s", (1,), C=0.0)
    with pytest.raises(ValueError, match="transform"):
        ProbeSpec("p", "s", (1,), transform="sqrt")
    with pytest.raises(ValueError, match="empty"):
        ProbeSpec("p", "s", ())
    with pytest.raises(ValueError, match="must be empty"):
        ProbeSpec("p", "s", (1,), value="resid_mean")
    spec = ProbeSpec("p", "s", (np.int64(3), 1), C=np.float32(0.5))
    assert spec.feature_ids == (3, 1) and isinstance(spec.C, float)
    assert ProbeSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_l1_probe_finds_planted_features() -> None:
    X, y, planted = _planted()
    spec = ProbeSpec("l1", "all", tuple(range(X.shape[1])), penalty="l1", C=0.05)
    probe = fit_probe(spec, X, y, seed=0)
    kept = {f for f, _ in probe.top_features(len(planted))}
    assert kept == set(planted.tolist())
    assert all(w > 0 for _, w in probe.top_features(len(planted)))
    assert 0 < probe.n_nonzero < 40
    assert probe.converged and probe.threshold_source == "in_sample"
    assert cv_auroc(spec, X, y, folds=5, seed=0) > 0.9


def test_cross_validate_and_thresholds() -> None:
    X, y, _ = _planted(n=200, d=100, planted=(1, 2, 3))
    spec = ProbeSpec("l2", "all", tuple(range(100)), penalty="l2", C=0.1)
    cv = cross_validate(spec, X, y, folds=4, seed=0)
    assert len(cv.fold_aurocs) == 4 and cv.oof_scores.shape == (200,)
    assert cv.mean == pytest.approx(np.mean(cv.fold_aurocs))
    assert cross_validate(spec, X, y, folds=4, seed=0).fold_aurocs == cv.fold_aurocs
    probe = fit_probe(spec, X, y, threshold_scores=cv.oof_scores)
    assert probe.threshold_source == "out_of_fold"
    oof_neg = cv.oof_scores[y == 0]
    assert (oof_neg > probe.fpr1_threshold).mean() <= 0.01
    assert probe.train_threshold == 0.0
    m = evaluate_probe(probe, X, y, np.where(y == 1, "af", "aligned"), n_boot=50)
    assert m["probe"] == "l2" and m["n_nonzero"] == probe.n_nonzero
    assert m["auroc"] > 0.9 and m["auroc_ci_low"] <= m["auroc"] <= m["auroc_ci_high"]
    assert set(m["by_label"]) == {"af", "aligned"}
    with pytest.raises(ValueError, match="both classes"):
        fit_probe(spec, X, np.zeros(200, dtype=np.int8))
    with pytest.raises(ValueError, match="columns"):
        fit_probe(spec, X[:, :50], y)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_save_load_roundtrip_identical_scores(tmp_path: Path, transform: str) -> None:
    X, y, _ = _planted(n=120, d=60, planted=(4, 9))
    spec = ProbeSpec(
        f"p-{transform}", "all", tuple(range(100, 160)), penalty="l1", C=0.5, transform=transform
    )
    probe = fit_probe(spec, X, y, seed=0, provenance={"model": "m", "sae_id": "s", "layer": 6})
    out = probe.save(tmp_path / "probe")
    assert sorted(p.name for p in out.iterdir()) == ["arrays.npz", "probe.json"]
    loaded = load_probe(out)
    X_eval, _, _ = _planted(n=40, d=60, planted=(4, 9), seed=5)
    np.testing.assert_array_equal(loaded.decision_function(X_eval), probe.decision_function(X_eval))
    np.testing.assert_array_equal(loaded.decision_function(X), probe.decision_function(X))
    assert loaded.spec == probe.spec
    assert (loaded.fpr1_threshold, loaded.train_threshold) == (probe.fpr1_threshold, probe.train_threshold)
    assert loaded.provenance == {"model": "m", "sae_id": "s", "layer": 6}
    doc = json.loads((out / "probe.json").read_text())
    assert doc["spec"]["feature_ids"][:2] == [100, 101]
    assert len(doc["weights"]) == probe.n_nonzero
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_save_replaces_and_load_checks_hash(tmp_path: Path) -> None:
    X, y, _ = _planted(n=80, d=20, planted=(1,))
    spec = ProbeSpec("p", "all", tuple(range(20)), penalty="l2", C=1.0)
    target = tmp_path / "probe"
    fit_probe(spec, X, y, seed=0).save(target)
    probe2 = fit_probe(ProbeSpec("p", "all", tuple(range(20)), penalty="l2", C=0.01), X, y)
    probe2.save(target)
    assert load_probe(target).spec.C == 0.01
    assert [p.name for p in tmp_path.iterdir()] == ["probe"]
    (target / "arrays.npz").write_bytes((target / "arrays.npz").read_bytes() + b"x")
    with pytest.raises(ValueError, match="hash"):
        load_probe(target)


def test_score_rows_matches_design() -> None:
    rows, samples = _rows(), _samples()
    X, y, _ = sparse_design(rows, samples, [3, 5, 7])
    probe = fit_probe(ProbeSpec("p", "s", (3, 5, 7), penalty="l2", C=1.0, scale=False), X, y)
    scores, keys = probe.score_rows(rows, samples)
    np.testing.assert_array_equal(scores, probe.decision_function(X))
    assert keys[0] == ("a", 0)
    with pytest.raises(ValueError, match="columns"):
        probe.decision_function(X[:, :2])


def test_dense_baseline_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = (np.arange(100) % 2).astype(np.int8)
    Xm = rng.normal(size=(100, 16)) + 0.8 * y[:, None] * (np.arange(16) < 2)
    designs = {"mean": Xm, "max": np.abs(Xm), "both": np.hstack([Xm, np.abs(Xm)])}
    cfg = ProbeGridConfig(dense_Cs=(1.0, 0.1), folds=3)
    assert len(dense_baseline_specs(cfg)) == 6
    results = search_dense_baselines(cfg, designs, y)
    assert len(results) == 6 and results[0].cv.mean >= results[-1].cv.mean
    best = results[0]
    assert best.spec.is_dense and best.spec.feature_ids == ()
    assert best.cv.mean > 0.8
    loaded = load_probe(best.probe.save(tmp_path / "b"))
    X = designs[best.spec.pooling]
    np.testing.assert_array_equal(loaded.decision_function(X), best.probe.decision_function(X))


# --- grid -------------------------------------------------------------------------------------


def test_feature_sets_and_default_grid() -> None:
    active = np.arange(30)
    selectivity = {f: (-1) ** f * f / 10 for f in range(40)}  # 30..39 not active: ignored
    cfg = ProbeGridConfig(top_n=(5, 10, 50))
    sets = feature_sets(cfg, selectivity, active, classification_scores={1: 0.9, 2: 0.2, 35: 1.0})
    # top50 > 30 active features equals "all", so only "all" is kept
    assert list(sets) == ["top5", "top10", "relevant", "all"]
    assert sets["top5"] == (25, 26, 27, 28, 29)  # largest |selectivity|, sorted by id
    assert sets["relevant"] == (1,)
    assert sets["all"] == tuple(range(30))

    specs = probe_grid(cfg, selectivity, active)
    assert len(specs) == 3 * 2 * 4  # top5, top10, all x l1/l2 x 4 Cs, one transform
    assert {s.transform for s in specs} == {"raw"}
    assert len({s.name for s in specs}) == len(specs)
    assert specs[0].name == "top5|l1|C=10|raw|max_act"

    full = probe_grid(ProbeGridConfig(top_n=(5, 10, 50), full=True), selectivity, active)
    assert len(full) == len(specs) * len(TRANSFORMS)

    sweep = transform_sweep(specs[0], cfg)
    assert [s.transform for s in sweep] == ["binary", "log1p", "zscore", "quantile"]
    assert all(s.feature_ids == specs[0].feature_ids and s.C == specs[0].C for s in sweep)

    table = pl.DataFrame({"feature_id": list(selectivity), "selectivity": list(selectivity.values())})
    assert feature_sets(cfg, table, active) == {k: v for k, v in sets.items() if k != "relevant"}


def test_grid_config_validation() -> None:
    with pytest.raises(ValueError, match="penalties"):
        ProbeGridConfig(penalties=("l0",))
    with pytest.raises(ValueError, match="Cs"):
        ProbeGridConfig(Cs=(1.0, -1.0))
    with pytest.raises(ValueError, match="transforms"):
        ProbeGridConfig(transforms=("raw", "cube"))


def test_search_probes_small() -> None:
    X, y, planted = _planted(n=160, d=80, planted=(5, 6, 7))
    fids = np.arange(1000, 1080)
    dense = X.toarray()
    sel = dict(zip(fids.tolist(), (dense[y == 1].mean(0) - dense[y == 0].mean(0)).tolist(), strict=True))
    cfg = ProbeGridConfig(top_n=(3, 10), Cs=(1.0, 0.1), folds=3)
    results = search_probes(cfg, X, fids, y, sel)
    grid = [r for r in results if r.stage == "grid"]
    sweep = [r for r in results if r.stage == "transform_sweep"]
    assert len(grid) == 3 * 2 * 2 and len(sweep) == 4
    assert [r.cv.mean for r in results] == sorted((r.cv.mean for r in results), reverse=True)
    top3 = next(r for r in grid if r.spec.feature_set == "top3")
    assert set(top3.spec.feature_ids) == {1005, 1006, 1007}
    assert results[0].cv.mean > 0.9
    row = results[0].summary()
    assert {"probe", "cv_auroc", "n_nonzero", "stage"} <= set(row)
    assert isinstance(results[0].probe, FittedProbe)
    assert results[0].probe.threshold_source == "out_of_fold"


# --- plots ------------------------------------------------------------------------------------


def test_plots_return_png_bytes() -> None:
    ladder = [
        plots_probes.LadderRow("top10|l1", 0.91, 0.88, 0.94, "l1"),
        {
            "name": "resid_mean",
            "auroc": 0.95,
            "auroc_ci_low": 0.93,
            "auroc_ci_high": 0.97,
            "group": "baseline",
        },
        {"name": "one-class", "auroc": None},
    ]
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30), np.ones(30)]
    pngs = [
        plots_probes.plot_auroc_ladder(ladder),
        plots_probes.plot_auroc_ladder([]),
        plots_probes.plot_roc_curves({"a": (y, rng.normal(size=60) + y), "one": (np.ones(3), [1, 2, 3])}),
        plots_probes.plot_cross_distribution_heatmap(
            [("tr", "ev1", 0.9), ("tr", "ev2", None), ("tr2", "ev1", 0.7)]
        ),
        plots_probes.plot_l1_path([("all", 1.0, 40, 0.9), ("all", 0.1, 8, 0.88), ("all", 0.01, 0, 0.5)]),
    ]
    for png in pngs:
        assert isinstance(png, bytes) and png.startswith(PNG_MAGIC) and len(png) > 1000


def test_plot_input_arrow_table_compat() -> None:
    # the lake hands pyarrow tables around; the ladder takes their pylist rows directly
    tbl = pa.table(
        {"name": ["x", "y"], "auroc": [0.7, 0.8], "auroc_ci_low": [0.6, 0.7], "auroc_ci_high": [0.8, 0.9]}
    )
    assert plots_probes.plot_auroc_ladder(tbl.to_pylist()).startswith(PNG_MAGIC)
