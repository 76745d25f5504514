"""benchmarks/scorers.py and the report's per-scorer figure on a small fixture lake: trained probes and
hand-written explanation scores."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from benchmarks import scorers as bench
from dagster_project.lib import evaluation as ev
from dagster_project.lib.catalog import views_connection
from dagster_project.lib.lake import Lake, LakeError
from dagster_project.lib.probes import ProbeGridConfig
from dagster_project.lib.tables import EXPLANATION_SCORES_SCHEMA
from tests.lib.fixtures_probes import LAYER, build_probe_lake

GRID = ProbeGridConfig(top_n=(8,), include_all=False, penalties=("l1",), Cs=(0.3,), transforms=("raw",),
                       dense_poolings=(), folds=3)


def _lake_with_probes(root: Path) -> tuple[Lake, dict[int, float]]:
    lake = build_probe_lake(root)
    con = views_connection(lake)
    trained = ev.train_probes(con, LAYER, ev.EvalSettings(grid=GRID))
    prov = {**ev.activation_provenance(lake, LAYER, trained.train_datasets), "profile": lake.namespace}
    lake.write("stats/probes", ev.save_probes(lake, trained, prov), layer=LAYER)
    best = bench.best_sae_weights(lake, LAYER)
    assert best is not None
    return lake, best[1]


def _write_scores(lake: Lake, rows: list[dict]) -> None:
    full = [{**{f.name: None for f in EXPLANATION_SCORES_SCHEMA}, "n": 20, "window_sample_ids": [],
             "window_is_activating": [], "chosen": [], **r} for r in rows]
    lake.write("stats/explanation_scores", pa.Table.from_pylist(full, schema=EXPLANATION_SCORES_SCHEMA), layer=LAYER)


def test_scorer_table_means_spread_and_relation_to_probe_weight(tmp_path: Path) -> None:
    lake, weights = _lake_with_probes(tmp_path)
    feats = sorted(weights)
    n = len(feats)
    assert n >= 4
    # detection rises with |weight| (rho = 1); fuzzing falls with it (rho = -1); embedding is constant
    order = sorted(feats, key=lambda f: (abs(weights[f]), f))
    rows = []
    for i, f in enumerate(order):
        rows.append({"feature_id": f, "scorer": "detection", "score": 0.5 + 0.05 * i, "status": "ok"})
        rows.append({"feature_id": f, "scorer": "fuzzing", "score": 1.0 - 0.05 * i, "status": "ok"})
        rows.append({"feature_id": f, "scorer": "embedding", "score": 0.7, "status": "ok"})
    rows.append({"feature_id": 999, "scorer": "embedding", "score": None, "status": "failed", "error": "x"})
    _write_scores(lake, rows)
    summary, relation = bench.layer_rows(lake, LAYER)
    by = {r["scorer"]: r for r in summary}
    mid = (n - 1) / 2
    assert by["detection"]["mean"] == pytest.approx(0.5 + 0.05 * mid) and by["detection"]["ok"] == n
    assert by["detection"]["std"] == pytest.approx(0.05 * (sum((i - mid) ** 2 for i in range(n)) / n) ** 0.5)
    assert by["embedding"]["failed"] == 1 and by["embedding"]["std"] == 0.0
    rel = {r["scorer"]: r for r in relation}
    distinct = len({abs(w) for w in weights.values()}) == len(weights)  # no tied weights: rho is exactly +-1
    if distinct:
        assert rel["detection"]["spearman_abs_weight"] == pytest.approx(1.0)
        assert rel["fuzzing"]["spearman_abs_weight"] == pytest.approx(-1.0)
    else:
        assert rel["detection"]["spearman_abs_weight"] > 0.9 and rel["fuzzing"]["spearman_abs_weight"] < -0.9
    assert rel["embedding"]["spearman_abs_weight"] is None  # a constant score has no rank correlation
    assert rel["detection"]["n_in_probe_set"] == n
    assert rel["detection"]["n_nonzero"] == sum(1 for w in weights.values() if w != 0)
    text = bench.report(lake)
    assert "| layer | scorer | metric | ok | failed | mean |" in text
    assert f"| {LAYER} | detection | balanced_accuracy | {n} | 0 |" in text
    assert "spearman_abs_weight" in text and "| – |" in text


def test_spearman_matches_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    x = [1.0, 2.0, 2.0, 3.0, 5.0, 4.0]
    y = [0.1, 0.4, 0.3, 0.3, 0.9, 0.2]
    assert bench._spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)


def test_a_lake_without_scores_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_probe_lake(tmp_path)
    with pytest.raises(LakeError, match="no stats/explanation_scores"):
        bench.report(Lake(str(tmp_path), "t"))
    assert bench.main(["--root", str(tmp_path), "--namespace", "t"]) == 1
    assert "error:" in capsys.readouterr().err


def test_report_plots_and_tabulates_the_scorers(tmp_path: Path) -> None:
    lake, weights = _lake_with_probes(tmp_path)
    rows = [{"feature_id": f, "scorer": s, "score": 0.6 + 0.01 * i, "status": "ok"}
            for i, f in enumerate(sorted(weights)) for s in ("detection", "fuzzing", "embedding")]
    rows.append({"feature_id": 998, "scorer": "fuzzing", "score": None, "status": "failed", "error": "no windows"})
    _write_scores(lake, rows)
    con = views_connection(lake)
    data = ev.LayerData(con, LAYER)
    settings = ev.EvalSettings(grid=GRID, n_boot=20)
    probes = lake.read("stats/probes", layer=LAYER)
    loaded = ev.load_saved_probes(probes)
    metrics = ev.evaluate_probes(data, loaded, settings).metrics
    best = ev.best_probes(loaded)
    cross = ev.cross_distribution(data, best.values(), settings)
    index = ev.write_report(lake, LAYER, provenance={"profile": "t"}, probes_table=probes, metrics=metrics,
                            cross=cross, figures={}, features=[], best_probe_name=best["sae"].probe_id)
    html = Path(str(index)).read_text()
    png = Path(str(index)).parent / "probes" / "figures" / "explanation_scores.png"
    assert png.read_bytes().startswith(b"\x89PNG") and "probes/figures/explanation_scores.png" in html
    assert "How well the descriptions explain their features" in html
    n = len(weights)
    for scorer, metric, failed in (("detection", "balanced_accuracy", 0), ("fuzzing", "balanced_accuracy", 1),
                                   ("embedding", "auroc", 0)):
        assert f"<tr><td>{scorer}</td><td>{metric}</td><td>{n}</td><td>{failed}</td>" in html
    # without explanation scores there is no such section
    lake.remove_partition("stats/explanation_scores", layer=LAYER)
    index = ev.write_report(lake, LAYER, provenance={"profile": "t"}, probes_table=probes, metrics=metrics,
                            cross=cross, figures={}, features=[], best_probe_name=best["sae"].probe_id)
    assert "How well the descriptions explain" not in Path(str(index)).read_text()
