"""Token-level probes: aggregation by hand, the TokenMatrix, and token probes over the fixture lake."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from dagster_project.lib import evaluation as ev
from dagster_project.lib.catalog import views_connection
from dagster_project.lib.probes import ProbeGridConfig, ProbeSpec, fit_probe
from dagster_project.lib.token_probes import TokenMatrix, aggregate, token_matrix_from_rows
from tests.lib.fixtures_probes import LAYER, build_probe_lake

# three texts: 4 tokens, 1 token, 6 tokens
SCORES = np.array([1.0, 5.0, 2.0, 0.0, -3.0, 0.0, 0.0, 9.0, 0.0, 0.0, 3.0])
OFFSETS = np.array([0, 4, 5, 11])


def test_aggregations_equal_a_hand_computation() -> None:
    assert aggregate(SCORES, OFFSETS, "mean").tolist() == [2.0, -3.0, 2.0]
    assert aggregate(SCORES, OFFSETS, "max").tolist() == [5.0, -3.0, 9.0]
    # top-2 mean: (5 + 2) / 2; a one-token text: itself; (9 + 3) / 2
    assert aggregate(SCORES, OFFSETS, "topk_mean", k=2).tolist() == [3.5, -3.0, 6.0]
    # windowed max, w = 3: text 0 windows (1,5,2)=8/3, (5,2,0)=7/3 -> 8/3; text 1 shorter: -3;
    # text 2 windows (0,0,9), (0,9,0), (9,0,0), (0,0,3) -> 3
    assert aggregate(SCORES, OFFSETS, "window_max", window=3) == pytest.approx([8 / 3, -3.0, 3.0])
    # a window as long as the text is its mean; w = 1 is the max
    assert aggregate(SCORES, OFFSETS, "window_max", window=99).tolist() == aggregate(SCORES, OFFSETS, "mean").tolist()
    assert aggregate(SCORES, OFFSETS, "window_max", window=1).tolist() == [5.0, -3.0, 9.0]
    assert np.isnan(aggregate(np.array([1.0]), np.array([0, 0, 1]), "max")[0])  # a text with no token
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(SCORES, OFFSETS, "median")


def test_token_matrix_rows_columns_and_sampling() -> None:
    tm = token_matrix_from_rows([2, 3], [0, 1, 1], [1, 0, 2], [0, 1, 0], [1.5, 2.0, 3.0], n_cols=2)
    assert tm.shape == (2, 2) and tm.tokens.shape == (5, 2)
    assert tm.tokens.toarray().tolist() == [[0, 0], [1.5, 0], [0, 2.0], [0, 0], [3.0, 0]]
    back = tm[[1, 0]]
    assert back.offsets.tolist() == [0, 3, 5] and back.tokens.toarray()[0].tolist() == [0, 2.0]
    assert tm.take_columns([1]).tokens.toarray().ravel().tolist() == [0, 0, 2.0, 0, 0]
    rows, texts = TokenMatrix(sp.csr_matrix(np.ones((10, 1))), np.array([0, 8, 10])).sample(3)
    assert rows.tolist() == [0, 4, 7, 8, 9] and texts.tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="outside"):
        token_matrix_from_rows([2], [0], [2], [0], [1.0], n_cols=1)


def test_a_token_probe_scores_every_token_then_aggregates() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 9, size=40)
    y = np.array([0, 1] * 20, dtype=np.int8)
    toks = rng.random((int(lengths.sum()), 3))
    tm = TokenMatrix(toks, np.concatenate([[0], np.cumsum(lengths)]))
    for agg in ("mean", "max", "topk_mean", "window_max"):
        spec = ProbeSpec("t", "top3", (0, 1, 2), penalty="l2", C=1.0, value="token_act", aggregation=agg, agg_k=2,
                         agg_window=3)
        p = fit_probe(spec, tm, y)
        w, b = p.effective_weights()
        assert p.decision_function(tm) == pytest.approx(aggregate(toks @ w + b, tm.offsets, agg, k=2, window=3))
    with pytest.raises(ValueError, match="pooled"):
        ProbeSpec("x", "top3", (0, 1, 2), value="max_act", aggregation="max")


def test_token_probes_over_the_fixture_lake(tmp_path: Path) -> None:
    lake = build_probe_lake(tmp_path)
    con = views_connection(lake)
    data = ev.LayerData(con, LAYER)
    grid = ProbeGridConfig(top_n=(5,), penalties=("l2",), Cs=(1.0,), transforms=("raw",), dense_poolings=("mean",),
                           dense_Cs=(1.0,), folds=3, token_top_n=(5,), agg_k=2, agg_window=3)
    # the token design holds every token of every sample: counts from the tokens table
    samples = data.samples_of(["te"])
    tm = data.token_sparse_for(samples, [0, 1, 2, 3])
    n_tokens = con.sql("select count(*) from tokens where dataset = 'te'").fetchall()[0][0]
    assert tm.tokens.shape[0] == n_tokens and tm.shape == (samples.height, 4)
    nnz = con.sql("select count(*) from token_activations where dataset = 'te' and feature_id < 4 and act > 0").fetchall()[0][0]
    assert tm.tokens.nnz == nnz
    settings = ev.EvalSettings(grid=grid, n_boot=50)
    trained = ev.train_probes(con, LAYER, settings, data)
    token = [r for r in trained.sae if r.spec.is_token]
    assert sorted(r.spec.aggregation for r in token) == ["max", "mean", "topk_mean", "window_max"]
    assert all(len(r.lodo) == 2 for r in token)  # held out like every other probe
    probes = ev.save_probes(lake, trained, {"profile": "t"})
    assert set(probes.column("aggregation").to_pylist()) == {"pooled", "max", "mean", "topk_mean", "window_max"}
    metrics = ev.evaluate_probes(data, ev.load_saved_probes(probes), settings).metrics.to_pylist()
    te = {m["aggregation"]: m["auroc"] for m in metrics if m["eval_dataset"] == "te" and m["kind"] == "sae"}
    assert set(te) == {"pooled", "max", "mean", "topk_mean", "window_max"} and all(0 <= v <= 1 for v in te.values())


def test_token_level_dense_probes_read_per_token_residuals(tmp_path: Path) -> None:
    lake = build_probe_lake(tmp_path, token_residuals=True)
    con = views_connection(lake)
    data = ev.LayerData(con, LAYER)
    assert data.has_token_residuals("te")
    samples = data.samples_of(["te"])
    tm = data.token_dense_for(samples)
    n_tokens = con.sql("select count(*) from tokens where dataset = 'te'").fetchall()[0][0]
    assert tm.tokens.shape == (n_tokens, 8) and tm.shape == (samples.height, 8)
    # rows in token order: the view's vectors for sample 3 are its block of the matrix
    v = con.sql("select resid from token_residuals where dataset = 'te' and sample_id = 3 order by token_pos").fetchall()
    assert np.allclose(tm.tokens[tm.offsets[3]:tm.offsets[4]], np.array([r[0] for r in v]))
    grid = ProbeGridConfig(top_n=(5,), penalties=("l2",), Cs=(1.0,), transforms=("raw",), dense_poolings=("mean",),
                           dense_Cs=(1.0,), folds=3, token_top_n=(), ksparse=(), aggregations=("mean", "max"))
    trained = ev.train_probes(con, LAYER, ev.EvalSettings(grid=grid, n_boot=50), data)
    tok = {r.spec.aggregation: r for r in trained.dense if r.spec.is_token}
    assert set(tok) == {"mean", "max"}
    # the planted signal sits on one token of each positive: max finds it better than mean dilutes it
    assert tok["max"].cv.mean > tok["mean"].cv.mean
    probes = ev.save_probes(lake, trained, {"profile": "t"})
    metrics = ev.evaluate_probes(data, ev.load_saved_probes(probes), ev.EvalSettings(grid=grid, n_boot=50)).metrics
    te = [m for m in metrics.to_pylist() if m["eval_dataset"] == "te" and m["kind"] == "dense"]
    assert {m["aggregation"] for m in te} == {"pooled", "mean", "max"}
