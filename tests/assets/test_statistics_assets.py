"""The statistics assets and checks (assets/statistics.py), materialized on the SQL-statistics fixture lake."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from assets import statistics
from dagster_project.lib import stats
from dagster_project.lib.lake import META_KEY, Lake
from dagster_project.resources import LakeResource, SAEResource
from tests.lib.fixtures_stats import DATASETS, SAE_WIDTH, LakeFixture, build_lake, connect

LAYER = 3
NS = "t"
ASSETS = [
    statistics.feature_stats,
    statistics.activation_profile,
    statistics.selected_features,
    statistics.cross_distribution,
]
FEATURE_STATS_CHECKS = [
    statistics.feature_stats_non_empty,
    statistics.feature_stats_no_nan,
    statistics.feature_stats_selectivity_range,
    statistics.feature_stats_feature_id_range,
    statistics.feature_stats_train_classes,
]
CHECKS = [*FEATURE_STATS_CHECKS, statistics.selected_features_non_empty, statistics.selected_features_valid]


@pytest.fixture
def fx(tmp_path: Path) -> LakeFixture:
    return build_lake(tmp_path / "lake" / NS, seed=3)


def _materialize(
    fx: LakeFixture,
    defs: list[dg.AssetsDefinition],
    run_config: dict | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("layer", [str(LAYER)])
    return dg.materialize(
        defs,
        partition_key=str(LAYER),
        resources={
            "lake": LakeResource(root=str(fx.root.parent), namespace=NS),
            "sae": SAEResource(source="train", width=SAE_WIDTH),
        },
        instance=instance,
        run_config=run_config,
        raise_on_error=raise_on_error,
    )


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict:
    [mat] = [m for m in result.get_asset_materialization_events() if m.asset_key == dg.AssetKey(key)]
    return mat.materialization.metadata


def test_statistics_assets_write_tables_and_pass_checks(fx: LakeFixture) -> None:
    result = _materialize(fx, [*ASSETS, *CHECKS])
    assert result.success
    lake = Lake(str(fx.root.parent), NS)

    # feature_stats equals the library on the same views, layer column moved into the path
    con = connect(fx.root)
    expected = stats.feature_stats(con, LAYER, 1.0, None)
    con.close()
    fs = lake.read("stats/feature_stats", layer=LAYER)
    assert "layer" not in fs.column_names
    assert fs.equals(expected.drop_columns(["layer"]))
    assert lake.read_meta("stats/feature_stats", layer=LAYER)["train_datasets"] == fx.train_datasets()
    # significance: the rank test's p and its BH q, NULL nowhere (both classes are present)
    assert {"p_value", "q_value"} <= set(fs.column_names)
    p, q = fs.column("p_value").to_pylist(), fs.column("q_value").to_pylist()
    assert None not in p and None not in q
    assert all(0 <= pv <= qv <= 1 for pv, qv in zip(p, q, strict=True))
    q_of = dict(zip(fs.column("feature_id").to_pylist(), q, strict=True))
    assert all(q_of[f] < 0.01 for f in (0, 1, 5, 8))  # planted class-selective features
    assert q_of[13] > 0.05  # fires at random on both classes
    significant = _metadata(result, "feature_stats")["significant_features"].value
    assert significant["0.05"] == sum(v < 0.05 for v in q) > 0

    # one row per dataset; ordered pairs with the diagonal; a transfer row per dataset and direction
    assert lake.read("stats/activation_profile", layer=LAYER).num_rows == len(DATASETS)
    assert lake.read("stats/cross_distribution", layer=LAYER).num_rows == len(DATASETS) ** 2
    assert lake.read("stats/selected_transfer", layer=LAYER).num_rows == 3 * len(DATASETS)
    assert lake.read("stats/dataset_selectivity", layer=LAYER).num_rows > 0
    assert lake.read("stats/selectivity_rank_correlation", layer=LAYER).num_rows > 0

    sel = lake.read("stats/selected_features", layer=LAYER)
    assert 0 < sel.num_rows <= 200
    assert {0, 1, 5, 8} <= set(sel.column("feature_id").to_pylist())  # planted selective features
    raw = pq.read_schema(lake.file("stats/selected_features", layer=LAYER)).metadata[META_KEY]
    cfg = json.loads(raw)["config"]
    assert cfg["min_selectivity"] == 0.3 and cfg["max_features"] == 200 and cfg["keep_negative"] is True
    assert cfg["fdr_alpha"] is None
    assert sel.column("q_value").to_pylist() == [q_of[f] for f in sel.column("feature_id").to_pylist()]
    assert _metadata(result, "selected_features")["config"].value == cfg

    evaluations = result.get_asset_check_evaluations()
    names = sorted(k.name for c in CHECKS for k in c.check_keys)
    assert sorted(e.check_name for e in evaluations) == names
    assert all(e.passed for e in evaluations), [
        (e.check_name, e.description) for e in evaluations if not e.passed
    ]

    md = _metadata(result, "feature_stats")
    assert md["selectivity_histogram"].value.startswith("![selectivity_histogram](data:image/png;base64,")
    assert md["rows"].value == fs.num_rows
    assert Path(md["selectivity_histogram_png"].value).is_file()
    assert "data:image/png;base64," in _metadata(result, "cross_distribution")["jaccard_heatmap"].value
    for png in ("selectivity_histogram", "active_features", "jaccard_heatmap"):
        assert (lake.base / "report" / f"layer={LAYER}" / f"{png}.png").is_file()


def test_selected_features_with_fdr_alpha_drops_features_not_significant(fx: LakeFixture) -> None:
    alpha = 0.001
    config = {"min_selectivity": 0.1, "max_features": None}
    defs = [statistics.feature_stats, statistics.selected_features, statistics.selected_features_valid]
    lake = Lake(str(fx.root.parent), NS)

    assert _materialize(fx, defs, {"ops": {"selected_features": {"config": config}}}).success
    without = lake.read("stats/selected_features", layer=LAYER)
    run_config = {"ops": {"selected_features": {"config": {**config, "fdr_alpha": alpha}}}}
    result = _materialize(fx, defs, run_config)
    assert result.success
    [check] = result.get_asset_check_evaluations()
    assert check.passed, check.description
    sel = lake.read("stats/selected_features", layer=LAYER)

    kept = [r["feature_id"] for r in without.to_pylist() if r["q_value"] < alpha]
    assert sel.column("feature_id").to_pylist() == kept
    assert 0 < len(kept) < without.num_rows  # features with q >= alpha were dropped, the rest kept in order
    assert all(q < alpha for q in sel.column("q_value").to_pylist())
    raw = pq.read_schema(lake.file("stats/selected_features", layer=LAYER)).metadata[META_KEY]
    assert json.loads(raw)["config"]["fdr_alpha"] == alpha
    assert _metadata(result, "selected_features")["config"].value["fdr_alpha"] == alpha


def test_train_classes_check_names_datasets_without_negatives(fx: LakeFixture) -> None:
    run_config = {"ops": {"feature_stats": {"config": {"train_datasets": ["train_pos"]}}}}
    result = _materialize(
        fx, [statistics.feature_stats, *FEATURE_STATS_CHECKS], run_config, raise_on_error=False
    )
    assert not result.success  # the check is blocking
    by_name = {e.check_name: e for e in result.get_asset_check_evaluations()}
    failed = by_name["feature_stats_train_classes"]
    assert not failed.passed
    assert "train_pos" in failed.description and "no negative" in failed.description
    assert "20 pos / 0 neg" in failed.description
    assert by_name["feature_stats_non_empty"].passed


def test_feature_stats_fails_without_activations_at_the_layer(fx: LakeFixture) -> None:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("layer", ["7"])
    result = dg.materialize(
        [statistics.feature_stats],
        partition_key="7",
        resources={"lake": LakeResource(root=str(fx.root.parent), namespace=NS)},
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "activations for layer 7" in str(failure.step_failure_data.error)
