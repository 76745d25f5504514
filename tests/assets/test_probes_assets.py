"""The probes, evaluation and probe_report assets materialized on the fixture lake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from assets.probes import evaluation, probe_report, probes
from dagster_project.config import PROFILES, ProbeConfig
from dagster_project.lib.catalog import views_connection
from dagster_project.partitions import LAYER_PARTITIONS_NAME
from dagster_project.resources import LakeResource, resources_for
from tests.lib.fixtures_probes import LAYER, build_probe_lake

SMALL = {
    "top_n": [5, 10], "penalties": ["l1", "l2"], "Cs": [1.0, 0.1], "transforms": ["raw", "binary"],
    "dense_poolings": ["mean"], "dense_Cs": [1.0], "folds": 3, "n_boot": 100, "report_max_features": 3,
    "report_top_windows": 2,
}
ASSETS = [probes, evaluation, probe_report]


def _materialize(root: Path, selection: list[Any] | None = None, raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, [str(LAYER)])
    chosen = selection or ASSETS
    return dg.materialize(
        chosen,
        partition_key=str(LAYER),
        resources={"lake": LakeResource(root=str(root), namespace="t")},
        instance=instance,
        run_config={"ops": {a.op.name: {"config": SMALL} for a in chosen}},
        raise_on_error=raise_on_error,
    )


def _meta(result: dg.ExecuteInProcessResult, node: str) -> dict[str, Any]:
    (mat,) = result.asset_materializations_for_node(node)
    assert mat.partition == str(LAYER)
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


def test_materialize_probes_evaluation_and_report(tmp_path: Path) -> None:
    lake = build_probe_lake(tmp_path, descriptions=True)
    result = _materialize(tmp_path)
    assert result.success

    for table in ("probes", "probe_metrics", "probe_scores", "probe_cross_distribution"):
        assert lake.exists(f"stats/{table}", layer=LAYER), table
    con = views_connection(lake)
    n_probes = con.sql("select count(*) from probes where layer = 1").fetchall()[0][0]
    kinds = dict(con.sql("select kind, count(*) from probes group by kind").fetchall())
    assert kinds["dense"] == 1 and kinds["sae"] == n_probes - 1
    evals = con.sql("select distinct eval_dataset from probe_metrics order by 1").fetchall()
    assert evals == [("oo",), ("te",)]
    # chosen on held-out groups (tr_a, tr_b), degenerate probes never best, every row says its threshold source
    assert con.sql("select distinct selection from probe_metrics").fetchall() == [("lodo",)]
    assert con.sql("select count(*) from probe_metrics where threshold_source is null").fetchall()[0][0] == 0
    assert con.sql("select count(*) from lodo_metrics").fetchall()[0][0] == 2 * n_probes
    assert con.sql("select count(*) from probes where is_best and (degenerate or n_nonzero = 0)").fetchall()[0][0] == 0

    pm = _meta(result, "probes")
    assert pm["dagster/row_count"] == n_probes
    assert pm["train_datasets"] == ["tr_a", "tr_b"]
    assert pm["class_balance"]["total"] == {"n": 70, "n_pos": 34, "n_neg": 36}
    assert pm["used_classifications"] is False
    assert pm["best_sae"].startswith("sae__") and pm["best_dense"] == "dense__resid_mean__l2__C1"
    assert "| probe_id |" in pm["preview"] and Path(pm["path"]).is_file()
    assert {"sae_pooled", "dense_pooled"} <= set(pm["train_seconds"]) and all(v >= 0 for v in pm["train_seconds"].values())

    em = _meta(result, "evaluation")
    assert em["dagster/row_count"] == 2 * n_probes
    assert pm["best_sae"] in em["best_vs_dense"] and pm["best_dense"] in em["best_vs_dense"]
    assert "| te | test |" in em["best_vs_dense"] and "detection" in em["best_vs_dense"]
    for k in ("best_sae_cv_auroc", "best_dense_cv_auroc", "best_sae_mean_auroc_test", "best_dense_mean_auroc_test"):
        assert 0.0 <= em[k] <= 1.0, k
    assert em["cross_rows"] == 2 * 3 * 4

    rm = _meta(result, "probe_report")
    index = Path(rm["index"])
    assert index.is_file() and index == lake.base / "report" / f"layer={LAYER}" / "index.html"
    assert 1 <= rm["feature_pages"] <= 3
    assert len(list((index.parent / "probes" / "features").glob("feature_*.html"))) == rm["feature_pages"]
    plots = {k: v for k, v in rm.items() if k.startswith("plot_")}
    assert {"plot_ladder_te", "plot_roc", "plot_cross_sae", "plot_cross_dense", "plot_l1_path"} <= set(plots)
    assert all("](data:image/png;base64," in v for v in plots.values())


def test_probes_fail_clearly_without_feature_stats(tmp_path: Path) -> None:
    lake = build_probe_lake(tmp_path)
    lake.remove_partition("stats/feature_stats", layer=LAYER)
    result = _materialize(tmp_path, [probes], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "feature_stats" in str(failure.step_failure_data.error)


def test_probe_config_names_the_bad_value() -> None:
    with pytest.raises(Exception, match="penalties"):
        ProbeConfig(penalties=["l3"])
    with pytest.raises(Exception, match="relevant_threshold"):
        ProbeConfig(relevant_threshold=11)
    assert ProbeConfig().settings().grid.relevant_threshold == 6.0
    assert ProbeConfig().settings().train_datasets == ()


def test_assets_load_with_the_activations_asset(tmp_path: Path) -> None:
    from assets.activations import activations

    defs = dg.Definitions(assets=[activations, *ASSETS], resources=resources_for(PROFILES["default"], str(tmp_path)))
    graph = defs.resolve_asset_graph()
    assert dg.AssetKey("activations") in graph.get(dg.AssetKey("probes")).parent_keys
    assert {a.key for a in ASSETS} <= set(graph.get_all_asset_keys())
