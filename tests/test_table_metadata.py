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
