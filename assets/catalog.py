"""The views-only DuckDB catalog over the lake."""


import dagster as dg

from dagster_project.lib.catalog import build_catalog
from dagster_project.resources import LakeResource


@dg.asset(group_name="report", deps=["activations", "probe_ensemble"], kinds={"duckdb"})
def lake_catalog(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    """Rebuild ``lake.duckdb``: one view per lake table (samples, tokens, activations, token_activations,
    residuals and every statistic), so any DuckDB client or ``featurelake sql`` can query the lake."""
    path, views = build_catalog(lake.lake)
    context.log.info(f"catalog {path}: views {views}")
    return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(str(path)), "views": views})
