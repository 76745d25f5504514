"""The multi-layer ensemble: its score is its definition, and its rows are evaluated like a probe's."""

from __future__ import annotations

import duckdb
import numpy as np
import polars as pl
import pytest

from dagster_project.lib.ensemble import ensemble_scores, layer_ensemble
from dagster_project.lib.metrics import auroc, threshold_at_fpr


def _scores() -> pl.DataFrame:
    # two layers, training set "tr" (4 samples) and an eval set "te" (2 samples)
    rows = []
    l6 = {("tr", 0): 1.0, ("tr", 1): 3.0, ("tr", 2): 5.0, ("tr", 3): 7.0, ("te", 0): 9.0, ("te", 1): 1.0}
    l9 = {("tr", 0): 10.0, ("tr", 1): 10.0, ("tr", 2): 20.0, ("tr", 3): 20.0, ("te", 0): 15.0, ("te", 1): 30.0}
    for layer, d in ((6, l6), (9, l9)):
        for (ds, sid), s in d.items():
            rows.append({"layer": layer, "dataset": ds, "sample_id": sid, "score": s})
    return pl.DataFrame(rows)


def test_ensemble_score_is_the_mean_of_train_standardised_layer_scores() -> None:
    train = pl.DataFrame({"dataset": ["tr"] * 4, "sample_id": [0, 1, 2, 3]})
    out = ensemble_scores(_scores(), train)
    # by hand: layer 6 train mean 4, sample std sqrt(20/3); layer 9 mean 15, std sqrt(100/3)
    sd6, sd9 = np.sqrt(20 / 3), np.sqrt(100 / 3)
    want = {("te", 0): ((9 - 4) / sd6 + (15 - 15) / sd9) / 2, ("te", 1): ((1 - 4) / sd6 + (30 - 15) / sd9) / 2,
            ("tr", 0): ((1 - 4) / sd6 + (10 - 15) / sd9) / 2}
    got = {(r["dataset"], r["sample_id"]): r["score"] for r in out.iter_rows(named=True)}
    for k, v in want.items():
        assert got[k] == pytest.approx(v)
    assert set(out["n_layers"].to_list()) == {2}


def test_layer_ensemble_rows_over_views() -> None:
    con = duckdb.connect()
    n = 40
    rng = np.random.default_rng(0)
    samples = []
    for ds, role, k in (("tr", "train", n), ("te", "test", n), ("ctl", "control", n)):
        for i in range(k):
            pos = role != "control" and i % 2 == 0
            samples.append({"dataset": ds, "sample_id": i, "label": "af" if pos else "ok", "is_positive": pos,
                            "role": role})
    sam = pl.DataFrame(samples)
    scores = []
    for layer in (6, 9):
        for r in samples:
            s = float(rng.normal(1.5 if r["is_positive"] else 0.0))
            scores.append({"layer": layer, "kind": "sae", "probe": f"p{layer}", "dataset": r["dataset"],
                           "sample_id": r["sample_id"], "score": s})
    probes = pl.DataFrame({"layer": [6, 9], "kind": ["sae", "sae"], "probe_id": ["p6", "p9"], "is_best": [True, True],
                           "train_datasets": [["tr"], ["tr"]]})
    sc = pl.DataFrame(scores)
    for name, df in (("samples", sam), ("probe_scores", sc), ("probes", probes)):
        con.register(f"_{name}", df.to_arrow())
        con.execute(f"create view {name} as select * from _{name}")
    table = layer_ensemble(con, n_boot=20)
    rows = {r["eval_dataset"]: r for r in table.to_pylist()}
    assert set(rows) == {"te", "ctl"} and rows["te"]["layers"] == [6, 9]
    assert rows["te"]["threshold_source"] == "control" and rows["ctl"]["n"] == n // 2  # the check half
    # the same numbers by hand from the definition
    ens = ensemble_scores(sc.select("layer", "dataset", "sample_id", "score"),
                          sam.filter(pl.col("dataset") == "tr").select("dataset", "sample_id")).join(sam, on=["dataset", "sample_id"])
    te = ens.filter(pl.col("dataset") == "te")
    assert rows["te"]["auroc"] == pytest.approx(auroc(te["is_positive"].cast(pl.Int8).to_numpy(), te["score"].to_numpy()))
    cal = ens.filter((pl.col("dataset") == "ctl") & (pl.col("sample_id") % 2 == 0))
    assert rows["te"]["fpr1_threshold"] == pytest.approx(threshold_at_fpr(cal["score"].to_numpy(), 0.01))


def test_ensemble_of_probes_that_trained_on_the_calibration_half_calibrates_on_unseen_controls() -> None:
    """Controls as negatives: the members scored the even control ids in sample (here: far below the odd
    ones), so a threshold there would flag most unseen controls. The ensemble calibrates on ids % 4 == 1
    and is checked on ids % 4 == 3."""
    con = duckdb.connect()
    n = 80
    rng = np.random.default_rng(1)
    samples = [{"dataset": "tr", "sample_id": i, "label": "af" if i % 2 == 0 else "ok", "is_positive": i % 2 == 0,
                "role": "train"} for i in range(n)]
    samples += [{"dataset": "ctl", "sample_id": i, "label": "ok", "is_positive": False, "role": "control"}
                for i in range(n)]
    scores = []
    for layer in (6, 9):
        for r in samples:
            mu = 2.0 if r["is_positive"] else (-3.0 if r["role"] == "control" and r["sample_id"] % 2 == 0 else 0.0)
            scores.append({"layer": layer, "kind": "sae", "probe": f"p{layer}", "dataset": r["dataset"],
                           "sample_id": r["sample_id"], "score": float(rng.normal(mu, 0.5))})
    probes = pl.DataFrame({"layer": [6, 9], "kind": ["sae", "sae"], "probe_id": ["p6", "p9"], "is_best": [True, True],
                           "train_datasets": [["tr"], ["tr"]], "threshold_source": ["control_oof", "control_oof"]})
    for name, df in (("samples", pl.DataFrame(samples)), ("probe_scores", pl.DataFrame(scores)), ("probes", probes)):
        con.register(f"_{name}", df.to_arrow())
        con.execute(f"create view {name} as select * from _{name}")
    [row] = [r for r in layer_ensemble(con, n_boot=20).to_pylist() if r["eval_dataset"] == "ctl"]
    assert row["threshold_source"] == "control_check_split" and row["n"] == n // 4
    assert row["fpr_at_1pct_fpr"] <= 0.1  # calibrated on the in-sample even half it would flag nearly all
