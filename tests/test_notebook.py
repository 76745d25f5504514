"""The notebook entry point (dagster_project/notebook.py) on the probe fixture lake: found as the CLI finds it,
read-only, and its helpers' frames."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pytest

from dagster_project.lib.evaluation import PROBE_SCORES_SCHEMA
from dagster_project.lib.lake import Lake
from dagster_project.notebook import lake as active_lake
from dagster_project.notebook import open_lake, probe_scores, top_windows
from tests.lib.fixtures_probes import DATASETS, LAYER, SCRIPT_TOKEN, build_probe_lake

PROBES = ("sae__best", "dense__best")


@pytest.fixture
def fixture_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lake:
    """The probe fixture lake as the `default` profile's namespace, with scores of two probes on te and oo."""
    lk = build_probe_lake(tmp_path / "lake", namespace="default", descriptions=True)
    rows = [{"probe": p, "kind": p.split("__")[0], "dataset": d, "sample_id": i, "score": float(k + i / 100)}
            for k, p in enumerate(PROBES) for d in ("te", "oo") for i in range(5)]
    lk.write("probe_scores", pa.Table.from_pylist(rows, schema=PROBE_SCORES_SCHEMA), layer=LAYER)
    monkeypatch.setenv("FEATURELAKE_LAKE", str(tmp_path / "lake"))
    monkeypatch.delenv("FEATURELAKE_PROFILE", raising=False)
    return lk


def test_open_lake_finds_the_lake_as_the_cli_does(fixture_lake: Lake, capsys: pytest.CaptureFixture[str]) -> None:
    from dagster_project.cli import main

    assert active_lake().base == fixture_lake.base  # FEATURELAKE_LAKE + the default profile's namespace
    con = open_lake()
    views = {r[0] for r in con.sql("select view_name from duckdb_views() where not internal").fetchall()}
    assert {"samples", "tokens", "activations", "token_activations", "feature_stats", "probe_scores"} <= views
    n = sum(r[1] + r[2] + r[3] for r in DATASETS.values())
    assert con.sql("select count(*) from samples").fetchall() == [(n,)]
    assert main(["sql", "select count(*) as n from samples", "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", str(n)]  # the same lake as featurelake sql
    # explicit arguments win over the environment
    assert open_lake(root=str(fixture_lake.root)).sql("select count(*) from activations").fetchall()[0][0] > 0
    assert active_lake(profile="gemma-3-27b").namespace == "gemma-3-27b"


@pytest.mark.parametrize("statement", [
    "create table x as select 1", "drop view samples", "create or replace view samples as select 1 as a",
    "create view mine as select 1 as a", "attach ':memory:' as scratch",
])
def test_open_lake_is_read_only(fixture_lake: Lake, statement: str) -> None:
    con = open_lake()
    with pytest.raises(duckdb.Error, match="read-only|Cannot execute statement of type"):
        con.execute(statement)
    assert con.sql("select count(*) from samples").fetchall()[0][0] > 0


def test_top_windows_of_a_feature(fixture_lake: Lake) -> None:
    frame = top_windows(open_lake(), LAYER, feature_id=0, limit=5)
    assert isinstance(frame, pl.DataFrame) and frame.height == 5
    assert {"dataset", "sample_id", "label", "max_act", "peak_token", "context"} <= set(frame.columns)
    first = frame.row(0, named=True)
    assert (first["dataset"], first["sample_id"], first["peak_token"]) == ("te", 0, SCRIPT_TOKEN)
    assert f"[[{SCRIPT_TOKEN}]]" in first["context"]
    assert frame["max_act"].is_sorted(descending=True)


def test_probe_scores_with_labels(fixture_lake: Lake) -> None:
    con = open_lake()
    every = probe_scores(con, "sae__best")
    assert every.height == 10 and set(every["dataset"]) == {"te", "oo"} and set(every["layer"]) == {LAYER}
    assert every.columns == ["layer", "probe", "kind", "dataset", "role", "sample_id", "label", "is_positive",
                             "score"]
    samples = con.sql("select dataset, sample_id, label, role from samples").pl()
    joined = every.join(samples, on=["dataset", "sample_id"], suffix="_s")
    assert (joined["label"] == joined["label_s"]).all() and (joined["role"] == joined["role_s"]).all()
    oo = probe_scores(con, "dense__best", layer=LAYER, dataset="oo")
    assert oo["score"].to_list() == [1.0 + i / 100 for i in range(5)] and set(oo["kind"]) == {"dense"}
    assert probe_scores(con, "sae__best", layer=LAYER + 1).height == 0
    assert probe_scores(con, "no_such_probe").height == 0
