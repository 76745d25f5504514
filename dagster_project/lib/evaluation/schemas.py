"""Names of the probe stages' lake tables (``probes``, ``lodo_metrics``, ``probe_metrics``, ``probe_scores``,
``probe_cross_distribution``; their Arrow schemas are the table registry's, :mod:`dagster_project.lib.tables`)
and the empty ``token_activations`` the report falls back on."""

from __future__ import annotations

import pyarrow as pa

# The lake tables the probe stages write (one file per layer).
PROBES_TABLE = "stats/probes"
METRICS_TABLE = "stats/probe_metrics"
SCORES_TABLE = "stats/probe_scores"
CROSS_TABLE = "stats/probe_cross_distribution"
LODO_TABLE = "stats/lodo_metrics"

# The columns of the ``token_activations`` view, registered empty where the lake has no per-token activations.
TOKEN_ACTIVATIONS_VIEW = pa.schema(
    [("layer", pa.int64()), ("dataset", pa.string()), ("sample_id", pa.int32()), ("token_pos", pa.int32()),
     ("feature_id", pa.int32()), ("act", pa.float32())]
)
