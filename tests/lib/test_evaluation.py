"""Probe training, evaluation, cross-distribution and report over a fixture lake (lib.evaluation)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dagster_project.lib import evaluation as ev
from dagster_project.lib.catalog import views_connection
from dagster_project.lib.lake import Lake, LakeError
from dagster_project.lib.probes import ProbeGridConfig, dense_baseline_specs, load_probe, probe_grid
from tests.lib.fixtures_probes import DATASETS, LAYER, META, SCRIPT_TOKEN, build_probe_lake

GRID = ProbeGridConfig(
    top_n=(5, 10), penalties=("l1", "l2"), Cs=(1.0, 0.1), transforms=("raw", "binary"),
    dense_poolings=("mean", "both"), dense_Cs=(1.0,), folds=3, relevant_threshold=6.0,
)
SETTINGS = ev.EvalSettings(grid=GRID, n_boot=100, report_max_features=4, report_top_windows=3)
TWO_CLASS = [d for d, (_, p, n, h) in DATASETS.items() if p >= 2 and n + h >= 2]


@dataclass
class Run:
    lake: Lake
    trained: ev.TrainedProbes
    probes: pa.Table
    metrics: pa.Table
    scores: pa.Table
    cross: pa.Table
    features: list[ev.FeatureInfo]
    index: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The whole probe flow once, as the assets run it (tables written into the lake)."""
    lake = build_probe_lake(tmp_path_factory.mktemp("lake"), descriptions=True)
    con = views_connection(lake)
    data = ev.LayerData(con, LAYER)
    trained = ev.train_probes(con, LAYER, SETTINGS, data)
    prov = {**ev.activation_provenance(lake, LAYER, trained.train_datasets), "profile": lake.namespace}
    probes = ev.save_probes(lake, trained, prov)
    lake.write("stats/probes", probes, layer=LAYER)
    loaded = ev.load_saved_probes(probes)
    metrics = ev.evaluate_probes(data, loaded, SETTINGS).metrics
    best = ev.best_probes(loaded)
    scores = ev.probe_scores(data, best.values())
    cross = ev.cross_distribution(data, best.values(), SETTINGS)
    lodo = ev.lodo_table(trained)
    for name, table in (("probe_metrics", metrics), ("probe_scores", scores), ("probe_cross_distribution", cross),
                        ("lodo_metrics", lodo)):
        lake.write(f"stats/{name}", table, layer=LAYER)
    figs = ev.report_figures(data.samples, probes, metrics, scores, cross, lodo=lodo)
    features = ev.feature_infos(con, LAYER, best["sae"].probe, SETTINGS)
    index = ev.write_report(
        lake, LAYER, provenance=prov, probes_table=probes, metrics=metrics, cross=cross, figures=figs,
        features=features, best_probe_name=best["sae"].probe_id, lodo=lodo, layers=ev.layer_choice(con),
    )
    return Run(lake, trained, probes, metrics, scores, cross, features, index)


def test_default_train_sets_are_the_train_role(run: Run) -> None:
    assert run.trained.train_datasets == ["tr_a", "tr_b"]
    assert set(map(tuple, run.probes.column("train_datasets").to_pylist())) == {("tr_a", "tr_b")}
    total = run.trained.balance["total"]
    assert (total["n_pos"], total["n_neg"]) == (34, 36)
    assert set(run.probes.column("n_pos").to_pylist()) == {34}


def test_named_train_sets_may_mix_in_positive_only(run: Run) -> None:
    data = ev.LayerData(views_connection(run.lake), LAYER)
    assert ev.resolve_train_datasets(data, ["oo", "tr_a"]) == ["oo", "tr_a"]
    assert data.balance(["oo", "tr_a"])["oo"] == {"n": 12, "n_pos": 12, "n_neg": 0}
    with pytest.raises(ev.EvaluationError, match="nope"):
        ev.resolve_train_datasets(data, ["tr_a", "nope"])
    with pytest.raises(ev.EvaluationError, match="2 of each class"):
        ev.resolve_train_datasets(data, ["oo"])
    with pytest.raises(ev.EvaluationError, match="no activations at layer 7"):
        ev.resolve_train_datasets(ev.LayerData(views_connection(run.lake), 7))


def test_probes_table_and_saved_probes(run: Run) -> None:
    t = run.probes.to_pylist()
    assert {r["kind"] for r in t} == {"sae", "dense"}
    assert sum(r["is_best"] for r in t) == 2
    # no classifications in this lake: selectivity alone chooses the features
    assert not run.trained.used_classifications
    assert {r["feature_set"] for r in t if r["kind"] == "sae" and r["stage"] != "ksparse"} == {"top5", "top10", "all"}
    assert [r["n_features"] for r in sorted((r for r in t if r["stage"] == "ksparse"), key=lambda r: r["n_features"])] \
        == [1, 2, 5, 10, 20]  # the k-sparse curve up to the active features it has (100 > 40 active: stops at 20)
    assert {r["feature_set"] for r in t if r["kind"] == "dense"} == {"resid_mean", "resid_both"}
    for r in t:
        assert 0.0 <= r["cv_auroc"] <= 1.0 and r["n_nonzero"] <= r["n_features"]
        doc = json.loads((Path(r["path"]) / "probe.json").read_text())
        prov = doc["provenance"]
        assert {k: prov[k] for k in ("model_id", "sae_id", "hook", "config_hash")} == {
            k: META[k] for k in ("model_id", "sae_id", "hook", "config_hash")}
        assert (prov["layer"], prov["profile"], prov["probe_id"]) == (LAYER, "t", r["probe_id"])
        assert prov["train_datasets"] == ["tr_a", "tr_b"]
    saved = sorted(p.name for p in ev.saved_dir(run.lake, LAYER).iterdir() if p.is_dir())
    assert saved == sorted(r["probe_id"] for r in t)
    # two training groups (tr_a, tr_b): chosen by the worst held-out-group AUROC, not by CV
    assert run.trained.selection == "lodo" and run.trained.held_out_groups == ["tr_a", "tr_b"]
    assert {r["selection"] for r in t} == {"lodo"}
    for kind in ("sae", "dense"):
        rows = [r for r in t if r["kind"] == kind]
        best = next(r for r in rows if r["is_best"])
        assert best["rank"] == 1 and not best["degenerate"] and best["n_nonzero"] > 0
        assert best["selection_score"] == best["lodo_worst_auroc"]
        assert best["selection_score"] == max(r["selection_score"] for r in rows if not r["degenerate"])
        cv_first = next(r for r in rows if r["cv_rank"] == 1)
        assert cv_first["cv_auroc"] == max(r["cv_auroc"] for r in rows)


def test_every_probe_on_every_dataset_it_was_not_trained_on(run: Run) -> None:
    m = run.metrics.to_pylist()
    pairs = {(r["probe"], r["eval_dataset"]) for r in m}
    assert len(pairs) == len(m)
    assert pairs == {(p, d) for p in run.probes.column("probe_id").to_pylist() for d in ("te", "oo")}
    assert {r["eval_role"] for r in m} == {"test", "ood"}


def test_positive_only_set_gets_detection_rate_and_no_auroc(run: Run) -> None:
    rows = [r for r in run.metrics.to_pylist() if r["eval_dataset"] == "oo"]
    assert rows
    for r in rows:
        assert r["auroc"] is None and r["auroc_ci_low"] is None and r["auroc_ci_high"] is None
        assert r["n_neg"] == 0 and r["n_pos"] == 12
        assert 0.0 <= r["detection_rate"] <= 1.0 and r["mean_score"] is not None
    best = next(r for r in rows if r["is_best"] and r["kind"] == "sae")
    assert best["detection_rate"] > 0.7


def test_two_class_rows_have_auroc_inside_its_ci(run: Run) -> None:
    rows = [r for r in run.metrics.to_pylist() if r["n_pos"] and r["n_neg"]]
    assert rows
    for r in rows:
        assert r["auroc_ci_low"] <= r["auroc"] <= r["auroc_ci_high"], r["probe"]
        assert r["accuracy"] is not None and r["tpr_at_1pct_fpr"] is not None
    best = next(r for r in rows if r["is_best"] and r["kind"] == "sae")
    assert best["auroc"] > 0.85


def test_per_label_breakdown(run: Run) -> None:
    r = next(r for r in run.metrics.to_pylist() if r["eval_dataset"] == "te")
    by_label = json.loads(r["by_label"])
    assert set(by_label) == {"alignment_faking", "aligned", "hard_negative"}
    assert by_label["hard_negative"]["n"] == 6
    assert 0.0 <= by_label["hard_negative"]["flagged_rate"] <= 1.0


def test_cross_distribution_matrix_shape(run: Run) -> None:
    c = run.cross.to_pylist()
    for kind in ("sae", "dense"):
        rows = [r for r in c if r["kind"] == kind]
        assert {r["train_dataset"] for r in rows} == set(TWO_CLASS) == {"tr_a", "tr_b", "te"}
        assert {(r["train_dataset"], r["eval_dataset"]) for r in rows} == {
            (t, e) for t in TWO_CLASS for e in DATASETS}
        assert len(rows) == len(TWO_CLASS) * len(DATASETS)
        for r in rows:
            assert r["in_distribution"] == (r["train_dataset"] == r["eval_dataset"])
            if r["eval_dataset"] == "oo":
                assert r["auroc"] is None and r["detection_rate"] is not None
            else:
                assert r["auroc"] is not None
            if not r["in_distribution"] and r["auroc"] is not None:
                assert r["auroc_ci_low"] <= r["auroc"] <= r["auroc_ci_high"]


def test_saved_probes_reproduce_the_scores_table_exactly(run: Run) -> None:
    data = ev.LayerData(views_connection(run.lake), LAYER)  # fresh reads from the lake
    written = run.lake.read("stats/probe_scores", layer=LAYER).to_pylist()
    paths = dict(zip(run.probes.column("probe_id").to_pylist(), run.probes.column("path").to_pylist(), strict=True))
    by_probe: dict[str, list[dict]] = {}
    for r in written:
        by_probe.setdefault(r["probe"], []).append(r)
    assert set(by_probe) == {r["probe_id"] for r in run.probes.to_pylist() if r["is_best"]}
    for pid, rows in by_probe.items():
        probe = load_probe(paths[pid])
        for d in DATASETS:
            want = [(r["sample_id"], r["score"]) for r in rows if r["dataset"] == d]
            X, _, keys = data.design_for(probe, [d])
            got = list(zip([k[1] for k in keys], probe.decision_function(X).tolist(), strict=True))
            assert got == want, (pid, d)  # bit-for-bit
    n = sum(sum(v[1:]) for v in DATASETS.values())
    assert len(written) == 2 * n


def test_views_answer(run: Run) -> None:
    con = views_connection(run.lake)
    rows = con.sql(
        "select layer, probe, eval_dataset, auroc, auroc_ci_low, auroc_ci_high, accuracy, tpr_at_1pct_fpr, n_nonzero "
        "from probe_metrics where is_best and kind = 'sae' order by eval_dataset"
    ).fetchall()
    assert [(r[0], r[2]) for r in rows] == [(LAYER, "oo"), (LAYER, "te")]
    assert con.sql("select count(*) from probes where layer = 1").fetchall() == [(run.probes.num_rows,)]
    assert con.sql("select count(*) from probe_cross_distribution").fetchall() == [(run.cross.num_rows,)]


def test_report_has_a_page_per_feature_and_escapes_tokens(run: Run) -> None:
    assert run.index.is_file()
    index = run.index.read_text()
    best = next(r for r in run.probes.to_pylist() if r["is_best"] and r["kind"] == "sae")
    weights = load_probe(best["path"]).top_features(SETTINGS.report_max_features)
    pages = sorted((run.index.parent / "probes" / "features").glob("*.html"))
    assert [p.name for p in pages] == sorted(f"feature_{f}.html" for f, _ in weights)
    assert len(run.features) == len(weights) >= 1
    for p in pages:
        assert f'href="probes/features/{p.name}"' in index
    texts = [p.read_text() for p in pages]
    assert all(SCRIPT_TOKEN not in t for t in [*texts, index])
    assert all("<b>faking</b>" not in t for t in texts)
    # features 0-3 peak on the planted token; at least one of them is a page
    planted = [t for p, t in zip(pages, texts, strict=True) if int(p.stem.split("_")[1]) in (0, 1, 2, 3)]
    assert planted and all("&lt;script&gt;alert(1)&lt;/script&gt;" in t for t in planted)
    assert all("&lt;b&gt;faking&lt;/b&gt;" in t for t in planted)
    for name in ("ladder_te", "roc", "cross_sae", "cross_dense", "l1_path"):
        assert (run.index.parent / "probes" / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        assert f"probes/figures/{name}.png" in index
    assert not [p for p in run.index.parent.rglob(".tmp-*")]


def test_classified_relevant_features_form_a_set(tmp_path: Path) -> None:
    lake = build_probe_lake(tmp_path, classifications=True)
    grid = ProbeGridConfig(top_n=(5,), include_all=False, penalties=("l2",), Cs=(1.0,), transforms=("raw",),
                           dense_poolings=(), folds=3, relevant_threshold=6.0)
    trained = ev.train_probes(views_connection(lake), LAYER, ev.EvalSettings(grid=grid))
    assert trained.used_classifications
    relevant = next(r for r in trained.sae if r.spec.feature_set == "relevant")
    assert relevant.spec.feature_ids == (0, 1, 2, 4)  # score >= 6 and status ok (3 failed)
    assert trained.dense == [] and trained.dense_skipped


def test_missing_feature_stats_is_an_error(tmp_path: Path) -> None:
    lake = build_probe_lake(tmp_path)
    lake.remove_partition("stats/feature_stats", layer=LAYER)
    with pytest.raises(ev.EvaluationError, match="feature_stats"):
        ev.train_probes(views_connection(lake), LAYER, SETTINGS)


def test_mixed_activation_provenance_is_an_error(tmp_path: Path) -> None:
    lake = build_probe_lake(tmp_path)
    t = lake.read("activations", LAYER, "tr_b")
    lake.write("activations", t, LAYER, "tr_b", meta={**META, "sae_id": "other-sae"})
    with pytest.raises(LakeError, match="other-sae"):
        ev.activation_provenance(lake, LAYER, ["tr_a", "tr_b"])


def test_probe_ids_are_path_safe_and_distinct() -> None:
    sel = {i: 1.0 - i / 100 for i in range(30)}
    all_specs = probe_grid(GRID, sel, np.arange(30)) + dense_baseline_specs(GRID)
    ids = [ev.probe_id(s) for s in all_specs]
    assert len(set(ids)) == len(ids)
    assert all("/" not in i and "|" not in i for i in ids)


def test_control_set_sets_thresholds_and_reports_held_out_fpr(tmp_path: Path) -> None:
    """A control set: thresholds on its calibration half (even ids), its check half evaluated, never trained."""
    lake = build_probe_lake(tmp_path, control=True)
    con = views_connection(lake)
    data = ev.LayerData(con, LAYER)
    assert data.controls() == ["ctl"]
    trained = ev.train_probes(con, LAYER, SETTINGS, data)
    assert trained.control_datasets == ["ctl"] and "ctl" not in trained.train_datasets
    cal = data.control_half(["ctl"], ev.CALIBRATION)
    assert set(cal["sample_id"].to_list()) == set(range(0, 40, 2))
    for r in trained.results:
        assert r.probe.threshold_source == "control"
        X, _, _ = data.design_for(r.probe, ["ctl"])
        scores = r.probe.decision_function(X)[::2]  # rows follow sample_id: even rows are the calibration half
        assert float((scores > r.probe.fpr1_threshold).mean()) <= GRID.control_fpr
    probes = ev.save_probes(lake, trained, {"profile": "t"})
    assert set(probes.column("threshold_source").to_pylist()) == {"control"}
    metrics = ev.evaluate_probes(data, ev.load_saved_probes(probes), SETTINGS).metrics.to_pylist()
    ctl = [m for m in metrics if m["eval_dataset"] == "ctl"]
    assert ctl and all(m["n"] == 20 and m["n_pos"] == 0 and m["eval_role"] == "control" for m in ctl)
    assert all(m["threshold_source"] == "control" and m["fpr_at_1pct_fpr"] is not None for m in ctl)
    # controls as extra negatives: the calibration half trains, thresholds from its out-of-fold scores
    grid = ProbeGridConfig(**{**GRID.__dict__, "control_as_negatives": True})
    again = ev.train_probes(con, LAYER, ev.EvalSettings(grid=grid, n_boot=50), data)
    assert {r.probe.threshold_source for r in again.results} == {"control_oof"}
    assert again.results[0].probe.n_train == trained.results[0].probe.n_train + 20
    # the same, asked per control set (the registry's train_as_negatives)
    named = ev.train_probes(con, LAYER, ev.EvalSettings(grid=GRID, n_boot=50, control_negatives=("ctl",)), data)
    assert named.control_negatives == ["ctl"] and {r.probe.threshold_source for r in named.results} == {"control_oof"}


def test_selection_cv_is_todays_choice(run: Run) -> None:
    grid = ProbeGridConfig(**{**GRID.__dict__, "selection": "cv"})
    data = ev.LayerData(views_connection(run.lake), LAYER)
    trained = ev.train_probes(data.con, LAYER, ev.EvalSettings(grid=grid, n_boot=50), data)
    assert trained.selection == "cv" and not trained.held_out_groups
    best = trained.sae[0]
    assert best.selection_score == best.cv.mean == max(r.cv.mean for r in trained.sae if not r.degenerate)
    assert all(not r.lodo for r in trained.results)


def test_lodo_metrics_and_the_recommendation_in_the_report(run: Run) -> None:
    from dagster_project.lib.generalisation import family_table, recommendation

    con = views_connection(run.lake)
    lodo = con.sql("select * from lodo_metrics").pl()
    n_probes = run.probes.num_rows
    assert lodo.height == 2 * n_probes  # every probe x both held-out groups
    assert set(lodo["held_out_group"].to_list()) == {"tr_a", "tr_b"}
    for r in lodo.iter_rows(named=True):  # the held-out group's own samples only
        assert (r["n"], r["n_pos"]) == ({"tr_a": 40, "tr_b": 30}[r["held_out_group"]],
                                        {"tr_a": 20, "tr_b": 14}[r["held_out_group"]])
        assert r["n_train"] == 70 - r["n"] - r["n_dropped_near_dup"]
    best = next(r for r in run.probes.to_pylist() if r["is_best"] and r["kind"] == "sae")
    mine = lodo.filter(lodo["probe"] == best["probe_id"])
    assert min(mine["auroc"].to_list()) == pytest.approx(best["lodo_worst_auroc"])
    said = recommendation(run.probes, run.metrics, lodo)
    assert best["probe_id"] in said and "held-out training groups" in said
    fam = family_table(run.probes, run.metrics)
    assert fam.filter(fam["is_best"]).height == 2 and set(fam["family"].to_list()) >= {"dense resid_mean"}
    page = run.index.read_text()
    assert "Recommendation." in page and "Held-out groups (leave one group out)" in page
    assert "In distribution vs out of distribution" in page
    for fig in ("held_out_groups", "ksparse", "l1_path", "l1_path_held_out"):
        assert (run.index.parent / "probes" / "figures" / f"{fig}.png").is_file(), fig
