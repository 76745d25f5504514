"""dagster/column_schema metadata from the table registry (dagster_project/table_metadata.py)."""

from __future__ import annotations

import dagster as dg
import pytest

from dagster_project.table_metadata import COLUMN_SCHEMA_KEY, column_schema, column_schema_metadata


def test_columns_of_a_registered_table_then_its_partition_keys() -> None:
    schema = column_schema("activations")
    names = [c.name for c in schema.columns]
    assert names == ["sample_id", "feature_id", "max_act", "mean_act", "argmax_token", "n_active_tokens",
                     "layer", "dataset"]
    assert schema.columns[2].type == "float"
    assert schema.columns[-1].type == "string" and schema.columns[-1].constraints.nullable is False


def test_width_dependent_and_sql_tables() -> None:
    resid = column_schema("token_residuals", d_model=4).columns[2]
    assert resid.name == "resid" and resid.type == "fixed_size_list<item: halffloat>[4]"
    with pytest.raises(ValueError, match="d_model"):
        column_schema("residuals")
    names = [c.name for c in column_schema("stats/feature_stats").columns]
    assert names[0] == "feature_id" and names[-2:] == ["q_value", "layer"]
    assert column_schema("stats/probe_ensemble_metrics").columns[-1].name == "members"  # unpartitioned


def test_metadata_entry() -> None:
    md = column_schema_metadata("samples")
    assert list(md) == [COLUMN_SCHEMA_KEY]
    value = md[COLUMN_SCHEMA_KEY]
    assert isinstance(value, dg.TableSchemaMetadataValue)
    assert [c.name for c in value.schema.columns][-1] == "dataset"


# Every asset that writes a registered table: the asset key, and the table whose columns the UI shows for it.
ASSET_TABLES = {
    "samples": "samples", "activations": "activations",
    "feature_stats": "stats/feature_stats", "activation_profile": "stats/activation_profile",
    "selected_features": "stats/selected_features", "cross_distribution": "stats/cross_distribution",
    "dataset_selectivity": "stats/dataset_selectivity",
    "selectivity_rank_correlation": "stats/selectivity_rank_correlation",
    "selected_transfer": "stats/selected_transfer", "descriptions": "stats/descriptions",
    "classifications": "stats/classifications", "detection_scores": "stats/detection_scores",
    "themes": "stats/themes", "probes": "stats/probes", "evaluation": "stats/probe_metrics",
    "probe_ensemble": "stats/probe_ensemble_metrics",
}


@pytest.mark.parametrize("asset", sorted(ASSET_TABLES))
def test_every_table_asset_shows_its_columns(asset: str) -> None:
    """The UI lists each table's columns, declared on the asset."""
    from dagster_project.definitions import defs

    declared = defs.resolve_asset_graph().get(dg.AssetKey(asset)).metadata.get(COLUMN_SCHEMA_KEY)
    assert declared is not None, f"asset {asset} declares no {COLUMN_SCHEMA_KEY}"
    assert declared.schema == column_schema(ASSET_TABLES[asset])
