"""Dagster's view of the lake's tables: ``dagster/column_schema`` metadata from the table registry.

The registry (``lib/tables.py``) is pure Arrow; this module turns an entry (or any Arrow schema) into a
:class:`dagster.TableSchema`, so the UI
lists each asset's columns with their Arrow types and nullability. The hive partition keys (``layer``,
``dataset``) live only in the path; they are listed last, as the catalog's views show them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dagster as dg
import pyarrow as pa

from dagster_project.lib.tables import table_spec

COLUMN_SCHEMA_KEY = "dagster/column_schema"
# The type of each partition key in the catalog's views (``lib/catalog.py``, ``HIVE_TYPES``).
PARTITION_COLUMN_TYPES = {"layer": "int64", "dataset": "string"}


def arrow_table_schema(schema: pa.Schema, partition_keys: tuple[str, ...] = ()) -> dg.TableSchema:
    """The columns of ``schema`` (name, Arrow type, nullability), then the partition keys."""
    columns = [
        dg.TableColumn(f.name, type=str(f.type), constraints=dg.TableColumnConstraints(nullable=f.nullable))
        for f in schema
    ]
    columns += [
        dg.TableColumn(k, type=PARTITION_COLUMN_TYPES[k], description="partition key: in the path, not the file",
                       constraints=dg.TableColumnConstraints(nullable=False))
        for k in partition_keys
    ]
    return dg.TableSchema(columns=columns)


def column_schema(name: str, d_model: int | None = None) -> dg.TableSchema:
    """The registered columns of the lake table ``name`` (``d_model`` for a width-dependent one)."""
    spec = table_spec(name)
    return arrow_table_schema(spec.arrow_schema(d_model), spec.partition_keys)


def column_schema_metadata(name: str, d_model: int | None = None) -> dict[str, dg.MetadataValue]:
    """``{"dagster/column_schema": ...}`` of the lake table ``name``, for an asset's materialization."""
    return {COLUMN_SCHEMA_KEY: dg.MetadataValue.table_schema(column_schema(name, d_model))}


def table_asset(table: str, **kwargs: Any) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """``@dg.asset(**kwargs)`` for an asset writing the lake table ``table``: its registered columns are
    declared on the asset, so the UI shows them before the first materialization."""
    return dg.asset(metadata=column_schema_metadata(table), **kwargs)
