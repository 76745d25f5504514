"""The lake's table registry: every table's path, partition keys and Arrow schema, in one place.

Each :class:`TableSpec` is one table of ``lake/README.md``: its name (the path under the namespace,
``stats/<name>`` for the statistics, describe and probe stages), the hive partition keys in path order (they
live only in the path, never in the file), and its Arrow schema (field order, types and nullability exactly
as written). A schema whose width is the model's (``residuals``, ``token_residuals``) is a function of
``d_model``; a table a SQL statement computes (``sql/stats/*.sql``) also names that statement.
Rows a stage builds in Python may be dataclasses whose fields are the schema's names
(:class:`SampleRow`, ...); :func:`table_from_rows` turns them (or plain mappings) into a table of the
registered schema.

Dagster's view of these tables (``dagster/column_schema`` metadata) is built from this registry in
``dagster_project/table_metadata.py``; this module imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import pyarrow as pa

LAYER, DATASET = "layer", "dataset"

# ------------------------------------------------------------------------------------------ corpus and tokens

SAMPLES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int32()),
        ("source_id", pa.string()),
        ("text", pa.string()),
        ("label", pa.string()),
        ("is_positive", pa.bool_()),
        ("role", pa.string()),
        ("n_chars", pa.int32()),
        ("group", pa.string()),
    ]
)
TOKENS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int32()),
        ("token_pos", pa.int32()),
        ("token_id", pa.int32()),
        ("token_text", pa.string()),
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
    ]
)

# ------------------------------------------------------------------------------------------ activations

POOLED_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int32()),
        ("feature_id", pa.int32()),
        ("max_act", pa.float32()),
        ("mean_act", pa.float32()),
        ("argmax_token", pa.int32()),
        ("n_active_tokens", pa.int32()),
    ]
)
TOKEN_ACTS_SCHEMA = pa.schema(
    [("sample_id", pa.int32()), ("token_pos", pa.int32()), ("feature_id", pa.int32()), ("act", pa.float32())]
)


def residual_schema(d_model: int) -> pa.Schema:
    """``residuals``: per sample, the layer's output pooled over its tokens (mean and max), ``d_model`` wide."""
    return pa.schema(
        [
            ("sample_id", pa.int32()),
            ("resid_mean", pa.list_(pa.float32(), d_model)),
            ("resid_max", pa.list_(pa.float32(), d_model)),
        ]
    )


def token_residual_schema(d_model: int) -> pa.Schema:
    """``token_residuals``: per real token, the layer's output as ``resid_scale * resid`` (float16 and a
    power-of-two scale that keeps Gemma's few values beyond float16's range; see ``lake/README.md``)."""
    return pa.schema(
        [
            ("sample_id", pa.int32()),
            ("token_pos", pa.int32()),
            ("resid", pa.list_(pa.float16(), d_model)),
            ("resid_scale", pa.float32()),
        ]
    )


# ------------------------------------------------------------------------------------------ statistics
# The columns of each ``sql/stats`` statement's result as written (its ``layer`` column dropped: it lives in
# the path), given activations of POOLED_SCHEMA; tests/lib/test_tables.py runs the SQL to hold them.

FEATURE_STATS_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("n_pos", pa.int64()),
        ("n_neg", pa.int64()),
        ("pos_mean", pa.float64()),
        ("neg_mean", pa.float64()),
        ("pos_freq", pa.float64()),
        ("neg_freq", pa.float64()),
        ("max_act", pa.float32()),
        ("selectivity", pa.float64()),
        ("pos_mean_mean_act", pa.float64()),
        ("neg_mean_mean_act", pa.float64()),
        ("selectivity_mean_act", pa.float64()),
        ("is_active", pa.bool_()),
        ("p_value", pa.float64()),
        ("q_value", pa.float64()),
    ]
)
ACTIVATION_PROFILE_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("n_samples", pa.int64()),
        ("n_tokens", pa.int64()),
        ("active_per_sample_mean", pa.float64()),
        ("active_per_sample_median", pa.float64()),
        ("active_per_sample_p90", pa.float64()),
        ("n_samples_no_active", pa.int64()),
        ("n_active_rows", pa.int64()),
        ("max_act_mean", pa.float64()),
        ("max_act_p50", pa.float32()),
        ("max_act_p99", pa.float32()),
        ("n_features_active", pa.int64()),
        ("n_dead_features", pa.int64()),
    ]
)
SELECTED_FEATURES_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("rank", pa.int64()),
        ("direction", pa.string()),
        ("selectivity", pa.float64()),
        ("abs_selectivity", pa.float64()),
        ("freq", pa.float64()),
        ("pos_mean", pa.float64()),
        ("neg_mean", pa.float64()),
        ("pos_freq", pa.float64()),
        ("neg_freq", pa.float64()),
        ("max_act", pa.float32()),
        ("selectivity_mean_act", pa.float64()),
        ("p_value", pa.float64()),
        ("q_value", pa.float64()),
        ("reason", pa.string()),
    ]
)
CROSS_DISTRIBUTION_SCHEMA = pa.schema(
    [
        ("dataset_a", pa.string()),
        ("dataset_b", pa.string()),
        ("n_active_a", pa.int64()),
        ("n_active_b", pa.int64()),
        ("n_both", pa.int64()),
        ("n_either", pa.int64()),
        ("jaccard", pa.float64()),
        ("frac_a_in_b", pa.float64()),
    ]
)
DATASET_SELECTIVITY_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("role", pa.string()),
        ("feature_id", pa.int32()),
        ("n_pos", pa.int64()),
        ("n_neg", pa.int64()),
        ("pos_mean", pa.float64()),
        ("neg_mean", pa.float64()),
        ("pos_freq", pa.float64()),
        ("neg_freq", pa.float64()),
        ("max_act", pa.float32()),
        ("selectivity", pa.float64()),
        ("is_active", pa.bool_()),
    ]
)
RANK_CORRELATION_SCHEMA = pa.schema(
    [("dataset_a", pa.string()), ("dataset_b", pa.string()), ("n_features", pa.int64()),
     ("spearman", pa.float64()), ("pearson", pa.float64())]
)
SELECTED_TRANSFER_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("role", pa.string()),
        ("direction", pa.string()),
        ("n_samples", pa.int64()),
        ("n_selected", pa.int64()),
        ("n_firing", pa.int64()),
        ("frac_firing", pa.float64()),
        ("mean_act", pa.float64()),
        ("train_mean_act", pa.float64()),
        ("mean_act_ratio", pa.float64()),
    ]
)


# ------------------------------------------------------------------------------------------ describe stage

_IDS = pa.list_(pa.string())
# What every LLM call of the describe stage records beside its result.
CALL_FIELDS: list[tuple[str, pa.DataType]] = [
    ("backend", pa.string()),
    ("model", pa.string()),
    ("prompt_version", pa.string()),
    ("input_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("cache_creation_input_tokens", pa.int64()),
    ("cache_read_input_tokens", pa.int64()),
    ("cost_usd", pa.float64()),
    ("cached", pa.bool_()),
    ("attempts", pa.int32()),
    ("cache_key", pa.string()),
]
# A description as written by a call, and the windows it was written from (descriptions and candidates).
_DESCRIBED: list[tuple[str, pa.DataType]] = [
    ("status", pa.string()),
    ("description", pa.string()),
    ("confidence", pa.int32()),
    ("error", pa.string()),
    *CALL_FIELDS,
    ("top_sample_ids", _IDS),
    ("negative_sample_ids", _IDS),
]
# The windows a scorer judged (detection_scores, explanation_scores).
_WINDOWS: list[tuple[str, pa.DataType]] = [("window_sample_ids", _IDS), ("window_is_activating", pa.list_(pa.bool_()))]
DESCRIPTIONS_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("feature_rank", pa.int32()),
        ("direction", pa.string()),
        ("selectivity", pa.float64()),
        *_DESCRIBED,
        ("holdout_sample_ids", _IDS),
        ("holdout_negative_sample_ids", _IDS),
        ("top_max_act", pa.float64()),
        ("candidate", pa.int32()),
        ("n_candidates", pa.int32()),
        ("validation_balanced_accuracy", pa.float64()),
    ]
)
CANDIDATES_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("candidate", pa.int32()),
        ("is_best", pa.bool_()),
        *_DESCRIBED,
        ("validation_status", pa.string()),
        ("validation_error", pa.string()),
        ("validation_balanced_accuracy", pa.float64()),
        ("validation_accuracy", pa.float64()),
        ("validation_n", pa.int32()),
        ("validation_sample_ids", _IDS),
        ("validation_cache_key", pa.string()),
    ]
)
EXPLANATION_SCORES_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("scorer", pa.string()),
        ("score", pa.float64()),
        ("n", pa.int32()),
        ("status", pa.string()),
        ("metric", pa.string()),
        ("balanced_accuracy", pa.float64()),
        ("n_activating", pa.int32()),
        ("error", pa.string()),
        ("description", pa.string()),
        ("description_cache_key", pa.string()),
        *_WINDOWS,
        ("chosen", pa.list_(pa.int32())),
        *CALL_FIELDS,
    ]
)
CLASSIFICATIONS_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("status", pa.string()),
        ("score", pa.int32()),
        ("category", pa.string()),
        ("themes", pa.list_(pa.string())),
        ("error", pa.string()),
        ("rubric_version", pa.string()),
        ("batched", pa.bool_()),
        ("description", pa.string()),
        ("description_cache_key", pa.string()),
        *CALL_FIELDS,
    ]
)
DETECTION_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("accuracy", pa.float64()),
        ("balanced_accuracy", pa.float64()),
        ("precision", pa.float64()),
        ("recall", pa.float64()),
        ("true_positives", pa.int32()),
        ("false_positives", pa.int32()),
        ("true_negatives", pa.int32()),
        ("false_negatives", pa.int32()),
        ("n_windows", pa.int32()),
        ("n_activating", pa.int32()),
        ("chosen", pa.list_(pa.int32())),
        *_WINDOWS,
        *CALL_FIELDS,
    ]
)
THEMES_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("theme_id", pa.int32()),
        ("theme_name", pa.string()),
        ("theme_size", pa.int32()),
        ("top_terms", pa.list_(pa.string())),
        ("description", pa.string()),
    ]
)

# ------------------------------------------------------------------------------------------ probe stage

# An AUROC with its bootstrap 95% interval, and the counts a metric was computed on.
_AUROC: list[tuple[str, pa.DataType]] = [
    ("auroc", pa.float64()), ("auroc_ci_low", pa.float64()), ("auroc_ci_high", pa.float64())
]
_COUNTS: list[tuple[str, pa.DataType]] = [("n", pa.int32()), ("n_pos", pa.int32()), ("n_neg", pa.int32())]
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
        *_COUNTS,
        *_AUROC,
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
        *_AUROC,
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
        *_COUNTS,
        ("n_nonzero", pa.int32()),
        ("train_datasets", pa.list_(pa.string())),
        ("by_label", pa.string()),
    ]
)
PROBE_SCORES_SCHEMA = pa.schema(
    [("probe", pa.string()), ("kind", pa.string()), ("dataset", pa.string()), ("sample_id", pa.int32()),
     ("score", pa.float64())]
)
PROBE_CROSS_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("probe", pa.string()),
        ("train_dataset", pa.string()),
        ("eval_dataset", pa.string()),
        ("eval_role", pa.string()),
        ("in_distribution", pa.bool_()),
        *_AUROC,
        ("cv_std", pa.float64()),
        ("accuracy", pa.float64()),
        ("tpr_at_1pct_fpr", pa.float64()),
        ("detection_rate", pa.float64()),
        ("mean_score", pa.float64()),
        *_COUNTS,
        ("n_nonzero", pa.int32()),
    ]
)
# The columns of ``probe_metrics`` an ensemble has (by name, so the two stay one contract), plus its own.
_ENSEMBLE_SHARED = ("probe", "kind", "feature_set", "aggregation", "is_best", "eval_dataset", "eval_role", "auroc",
                    "auroc_ci_low", "auroc_ci_high", "accuracy", "tpr_at_1pct_fpr", "fpr_at_1pct_fpr",
                    "detection_rate", "mean_score", "train_threshold", "fpr1_threshold", "threshold_source",
                    "selection", "n", "n_pos", "n_neg", "train_datasets", "by_label")
ENSEMBLE_SCHEMA = pa.schema([PROBE_METRICS_SCHEMA.field(n) for n in _ENSEMBLE_SHARED]
                            + [pa.field("layers", pa.list_(pa.int64())), pa.field("members", pa.list_(pa.string()))])


# ------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class TableSpec:
    """One lake table: ``name`` (its path under the namespace), ``partition_keys`` (hive keys in path order),
    exactly one of ``schema`` (fixed) and ``width_schema`` (a function of ``d_model``), and ``sql``, the
    statement under ``sql/`` that computes it, where one does."""

    name: str
    partition_keys: tuple[str, ...]
    description: str
    schema: pa.Schema | None = None
    width_schema: Callable[[int], pa.Schema] | None = None
    sql: str | None = None

    def __post_init__(self) -> None:
        if (self.schema is None) == (self.width_schema is None):
            raise ValueError(f"table {self.name!r}: give exactly one of schema and width_schema")

    def arrow_schema(self, d_model: int | None = None) -> pa.Schema:
        """The Arrow schema written (``d_model`` for a width-dependent table)."""
        if self.width_schema is not None:
            if d_model is None:
                raise ValueError(f"table {self.name!r} is d_model wide: give d_model")
            return self.width_schema(int(d_model))
        assert self.schema is not None
        return self.schema


def _stat(name: str, description: str, **kw: Any) -> TableSpec:
    return TableSpec(f"stats/{name}", (LAYER,), description, **kw)


def _sql_stat(name: str, description: str, schema: pa.Schema) -> TableSpec:
    return _stat(name, description, schema=schema, sql=f"stats/{name}.sql")


_SPECS = (
    TableSpec("samples", (DATASET,), "One row per labelled sample of a dataset (exact duplicates dropped).",
              schema=SAMPLES_SCHEMA),
    TableSpec("tokens", (DATASET,), "One row per real token of a sample (BOS dropped).", schema=TOKENS_SCHEMA),
    TableSpec("activations", (LAYER, DATASET), "Pooled SAE activations: one row per sample and active feature.",
              schema=POOLED_SCHEMA),
    TableSpec("token_activations", (LAYER, DATASET), "One row per token and active feature.",
              schema=TOKEN_ACTS_SCHEMA),
    TableSpec("residuals", (LAYER, DATASET), "Per sample, the layer's output pooled (mean, max).",
              width_schema=residual_schema),
    TableSpec("token_residuals", (LAYER, DATASET), "Per real token, the layer's output (float16 x a scale).",
              width_schema=token_residual_schema),
    _sql_stat("feature_stats", "Per feature: class means, frequencies, selectivity and significance.",
              FEATURE_STATS_SCHEMA),
    _sql_stat("activation_profile", "Per dataset: density and magnitude of the layer's activations.",
              ACTIVATION_PROFILE_SCHEMA),
    _sql_stat("selected_features", "The features kept for describing and probing, ranked, with a reason.",
              SELECTED_FEATURES_SCHEMA),
    _sql_stat("cross_distribution", "Per ordered dataset pair: Jaccard overlap of active feature sets.",
              CROSS_DISTRIBUTION_SCHEMA),
    _sql_stat("dataset_selectivity", "Per (dataset, feature): selectivity on every dataset with both classes.",
              DATASET_SELECTIVITY_SCHEMA),
    _sql_stat("selectivity_rank_correlation", "Per dataset pair: rank correlation of per-dataset selectivity.",
              RANK_CORRELATION_SCHEMA),
    _sql_stat("selected_transfer", "Per dataset and direction: how the selected features fire vs training.",
              SELECTED_TRANSFER_SCHEMA),
    _stat("descriptions", "The kept description per selected feature.", schema=DESCRIPTIONS_SCHEMA),
    _stat("description_candidates", "Every candidate description, with its validation detection score.",
          schema=CANDIDATES_SCHEMA),
    _stat("classifications", "Per described feature: relevance score, category and themes.",
          schema=CLASSIFICATIONS_SCHEMA),
    _stat("detection_scores", "Per described feature: the detection scorer's confusion counts.",
          schema=DETECTION_SCHEMA),
    _stat("explanation_scores", "Per selected feature and scorer: the description's score.",
          schema=EXPLANATION_SCORES_SCHEMA),
    _stat("themes", "Per described feature: its theme (a cluster of descriptions).", schema=THEMES_SCHEMA),
    _stat("probes", "Every probe of the layer, ranked by its selection.", schema=PROBES_SCHEMA),
    _stat("lodo_metrics", "Per probe and held-out group: leave-one-group-out metrics.", schema=LODO_SCHEMA),
    _stat("probe_metrics", "Every probe on every set it was not trained on.", schema=PROBE_METRICS_SCHEMA),
    _stat("probe_scores", "Per probe and sample: the probe's score.", schema=PROBE_SCORES_SCHEMA),
    _stat("probe_cross_distribution", "Per kind, training set and evaluation set: cross-distribution metrics.",
          schema=PROBE_CROSS_SCHEMA),
    TableSpec("stats/probe_ensemble_metrics", (), "The multi-layer ensembles of the recommended probes.",
              schema=ENSEMBLE_SCHEMA),
)
TABLES: dict[str, TableSpec] = {t.name: t for t in _SPECS}
# The tables of one (layer, dataset) activation partition, written by one extraction, in write order.
ACTIVATION_TABLES = ("activations", "token_activations", "residuals", "token_residuals")


def table_spec(name: str) -> TableSpec:
    """The registry entry of ``name`` (a lake path such as ``samples`` or ``stats/probe_metrics``)."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a lake table; known: {sorted(TABLES)}") from None


def schema_of(name: str, d_model: int | None = None) -> pa.Schema:
    """The Arrow schema of the table ``name`` (``d_model`` for a width-dependent one)."""
    return table_spec(name).arrow_schema(d_model)


# ------------------------------------------------------------------------------------------ rows


@dataclass(frozen=True)
class SampleRow:
    """One row of ``samples``."""

    sample_id: int
    source_id: str | None
    text: str
    label: str
    is_positive: bool
    role: str
    n_chars: int
    group: str


@dataclass(frozen=True)
class ThemeRow:
    """One row of ``stats/themes``."""

    feature_id: int
    theme_id: int
    theme_name: str
    theme_size: int
    top_terms: list[str]
    description: str


@dataclass(frozen=True)
class ProbeScoreRow:
    """One row of ``stats/probe_scores``."""

    probe: str
    kind: str
    dataset: str
    sample_id: int
    score: float


# Each row type and the table whose schema names its fields in order (tests/lib/test_tables.py holds that).
ROW_TYPES: dict[type, str] = {SampleRow: "samples", ThemeRow: "stats/themes", ProbeScoreRow: "stats/probe_scores"}


def table_from_rows(name: str, rows: Iterable[Any], d_model: int | None = None) -> pa.Table:
    """A table of ``name``'s registered schema from ``rows``: row dataclasses or mappings (keys the schema
    does not name are dropped, missing ones are NULL, as ``pa.Table.from_pylist`` does)."""
    dicts: list[Mapping[str, Any]] = [
        asdict(r) if is_dataclass(r) and not isinstance(r, type) else r for r in rows
    ]
    return pa.Table.from_pylist(dicts, schema=schema_of(name, d_model))
