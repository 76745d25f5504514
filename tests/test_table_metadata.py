"""dagster/column_schema metadata from the table registry (dagster_project/table_metadata.py)."""

from __future__ import annotations

import dagster as dg
import pyarrow as pa
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
    with pytest.raises(ValueError, match="sql/stats/feature_stats.sql"):
        column_schema("stats/feature_stats")
    written = pa.schema([("feature_id", pa.int32()), ("selectivity", pa.float64())])
    assert [c.name for c in column_schema("stats/feature_stats", written=written).columns] == [
        "feature_id", "selectivity", "layer"]


def test_metadata_entry() -> None:
    md = column_schema_metadata("samples")
    assert list(md) == [COLUMN_SCHEMA_KEY]
    value = md[COLUMN_SCHEMA_KEY]
    assert isinstance(value, dg.TableSchemaMetadataValue)
    assert [c.name for c in value.schema.columns][-1] == "dataset"
