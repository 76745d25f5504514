"""Names and Arrow schemas of the probe stages' lake tables (``probes``, ``lodo_metrics``, ``probe_metrics``,
``probe_scores``, ``probe_cross_distribution``) and the empty ``token_activations`` the report falls back on."""

from __future__ import annotations

import pyarrow as pa

# The lake tables the probe stages write (one file per layer).
PROBES_TABLE = "stats/probes"
METRICS_TABLE = "stats/probe_metrics"
SCORES_TABLE = "stats/probe_scores"
CROSS_TABLE = "stats/probe_cross_distribution"
LODO_TABLE = "stats/lodo_metrics"

PROBES_SCHEMA = pa.schema(
    [
        ("probe_id", pa.string()),
        ("kind", pa.string()),
        ("feature_set", pa.string()),
        ("penalty", pa.string()),
        ("C", pa.float64()),
        ("transform", pa.string()),
        ("value", pa.string()),
        ("aggregation", pa.string()),
        ("stage", pa.string()),
        ("n_features", pa.int32()),
        ("n_nonzero", pa.int32()),
        ("cv_auroc", pa.float64()),
        ("cv_std", pa.float64()),
        ("cv_rank", pa.int32()),
        ("rank", pa.int32()),
        ("is_best", pa.bool_()),
        ("degenerate", pa.bool_()),
        ("selection", pa.string()),
        ("selection_score", pa.float64()),
        ("lodo_worst_auroc", pa.float64()),
        ("lodo_mean_auroc", pa.float64()),
        ("converged", pa.bool_()),
        ("train_threshold", pa.float64()),
        ("fpr1_threshold", pa.float64()),
        ("threshold_source", pa.string()),
        ("train_datasets", pa.list_(pa.string())),
        ("n_pos", pa.int32()),
        ("n_neg", pa.int32()),
        ("path", pa.string()),
    ]
)

LODO_SCHEMA = pa.schema(
    [
        ("probe", pa.string()),
        ("kind", pa.string()),
        ("feature_set", pa.string()),
        ("aggregation", pa.string()),
        ("is_best", pa.bool_()),
        ("selection", pa.string()),
        ("held_out_group", pa.string()),
        ("n_train", pa.int32()),
        ("n_dropped_near_dup", pa.int32()),
        ("n", pa.int32()),
        ("n_pos", pa.int32()),
        ("n_neg", pa.int32()),
        ("auroc", pa.float64()),
        ("auroc_ci_low", pa.float64()),
        ("auroc_ci_high", pa.float64()),
        ("auroc_vs", pa.string()),
        ("detection_rate", pa.float64()),
        ("fpr", pa.float64()),
        ("threshold", pa.float64()),
        ("n_nonzero", pa.int32()),
    ]
)


PROBE_METRICS_SCHEMA = pa.schema(
    [
        ("probe", pa.string()),
        ("kind", pa.string()),
        ("feature_set", pa.string()),
        ("penalty", pa.string()),
        ("C", pa.float64()),
        ("transform", pa.string()),
        ("aggregation", pa.string()),
        ("is_best", pa.bool_()),
        ("rank", pa.int32()),
        ("degenerate", pa.bool_()),
        ("selection", pa.string()),
        ("selection_score", pa.float64()),
        ("cv_auroc", pa.float64()),
        ("eval_dataset", pa.string()),
        ("eval_role", pa.string()),
        ("auroc", pa.float64()),
        ("auroc_ci_low", pa.float64()),
        ("auroc_ci_high", pa.float64()),
        ("accuracy", pa.float64()),
        ("tpr_at_1pct_fpr", pa.float64()),
        ("fpr_at_1pct_fpr", pa.float64()),
        ("detection_rate", pa.float64()),
        ("mean_score", pa.float64()),
        ("mean_score_pos", pa.float64()),
        ("mean_score_neg", pa.float64()),
        ("train_threshold", pa.float64()),
        ("fpr1_threshold", pa.float64()),
        ("threshold_source", pa.string()),
        ("n", pa.int32()),
        ("n_pos", pa.int32()),
        ("n_neg", pa.int32()),
        ("n_nonzero", pa.int32()),
        ("train_datasets", pa.list_(pa.string())),
        ("by_label", pa.string()),
    ]
)


PROBE_SCORES_SCHEMA = pa.schema(
    [
        ("probe", pa.string()),
        ("kind", pa.string()),
        ("dataset", pa.string()),
        ("sample_id", pa.int32()),
        ("score", pa.float64()),
    ]
)


PROBE_CROSS_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("probe", pa.string()),
        ("train_dataset", pa.string()),
        ("eval_dataset", pa.string()),
        ("eval_role", pa.string()),
        ("in_distribution", pa.bool_()),
        ("auroc", pa.float64()),
        ("auroc_ci_low", pa.float64()),
        ("auroc_ci_high", pa.float64()),
        ("cv_std", pa.float64()),
        ("accuracy", pa.float64()),
        ("tpr_at_1pct_fpr", pa.float64()),
        ("detection_rate", pa.float64()),
        ("mean_score", pa.float64()),
        ("n", pa.int32()),
        ("n_pos", pa.int32()),
        ("n_neg", pa.int32()),
        ("n_nonzero", pa.int32()),
    ]
)


# The columns of the ``token_activations`` view, registered empty where the lake has no per-token activations.
TOKEN_ACTIVATIONS_VIEW = pa.schema(
    [("layer", pa.int64()), ("dataset", pa.string()), ("sample_id", pa.int32()), ("token_pos", pa.int32()),
     ("feature_id", pa.int32()), ("act", pa.float32())]
)
