"""The lake from a notebook or a script: one call opens it as ``featurelake sql`` does, and polars helpers
for the common reads.

    from dagster_project.notebook import open_lake, probe_scores, top_windows

    con = open_lake()        # the active profile's lake (FEATURELAKE_PROFILE, FEATURELAKE_LAKE), read-only
    con.sql("select probe, eval_dataset, auroc from probe_metrics where is_best").pl()
    top_windows(con, layer=9, feature_id=1234)        # where a feature fires hardest, peak token marked
    probe_scores(con, "sae__top50__l1__C1__raw__max_act", layer=9)

Every lake table is a view (``samples``, ``activations``, ``token_activations``, ``tokens``, ``feature_stats``,
``selected_features``, ``descriptions``, ``probe_metrics``, ``probe_scores``, ...; ``lake/README.md``). The
helpers run the project's SQL files (``sql/examples/``, ``sql/notebook/``) with bound parameters.
"""

from __future__ import annotations

import duckdb
import polars as pl

from dagster_project.lib.catalog import read_only_connection
from dagster_project.lib.lake import Lake
from dagster_project.lib.sql import relation


def lake(profile: str | None = None, root: str | None = None) -> Lake:
    """The lake ``featurelake`` uses: the root from ``root``, else ``FEATURELAKE_LAKE``, else ``lake/`` (a
    folder or ``s3://bucket/prefix``); the namespace is the profile's name (``profile``, a built-in name or a
    profile YAML, else ``FEATURELAKE_PROFILE``, else ``default``)."""
    from dagster_project.config import load_profile
    from dagster_project.resources import default_lake_root

    return Lake(root or default_lake_root(), load_profile(profile).name)


def open_lake(profile: str | None = None, root: str | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection with a view per table of the lake (see :func:`lake` for how it is found).

    The views are made when it is called: a table written later needs a new connection. ``.pl()`` on any
    relation gives a polars frame, ``.df()`` pandas.
    """
    return read_only_connection(lake(profile, root))


def top_windows(con: duckdb.DuckDBPyConnection, layer: int, feature_id: int, limit: int = 20) -> pl.DataFrame:
    """The samples on which a feature fires hardest, over every dataset: dataset, sample_id, role, label,
    max_act, the peak token and its context (``[[peak]]`` marked), from ``sql/examples/feature_top_samples.sql``."""
    return relation(con, "examples/feature_top_samples",
                    {"layer": int(layer), "feature_id": int(feature_id), "limit": int(limit)}).pl()


def probe_scores(con: duckdb.DuckDBPyConnection, probe: str, layer: int | None = None,
                 dataset: str | None = None) -> pl.DataFrame:
    """A saved probe's score of every sample it was evaluated on (the ``probe_scores`` view holds the best
    SAE probe and the best dense baseline of each layer), with the sample's role, label and class, from
    ``sql/notebook/probe_scores.sql``. Empty when the probe has no scores."""
    return relation(con, "notebook/probe_scores",
                    {"probe": probe, "layer": None if layer is None else int(layer), "dataset": dataset}).pl()
