"""Probes over the lake for one layer: train, save, evaluate, compare across distributions, report.

Pure functions over a DuckDB connection that has the lake's views (``catalog.views_connection``) and a
:class:`~dagster_project.lib.lake.Lake`; no dagster import. The modules: ``settings`` (:class:`EvalSettings`,
:class:`EvaluationError`), ``data`` (:class:`LayerData`, reading one layer), ``schemas`` (the lake tables'
names and Arrow schemas), ``training``, ``evaluate``, ``summary`` (markdown and figures) and ``report``
(the HTML report, styled by ``report.css``). The flow the ``probes``, ``evaluation`` and ``probe_report``
assets follow:

1. :func:`train_probes`: the SAE probe grid (feature sets from ``feature_stats`` selectivity and, when
   the ``classifications`` view exists, the features classified relevant; L1/L2 x C; the transform
   sweep) and the dense baselines on pooled residuals, cross-validated on the training datasets
   (every ``train``-role dataset unless named). :func:`save_probes` writes each probe with
   ``FittedProbe.save`` under ``probes_saved/layer=L/<probe_id>`` and returns the ``probes`` table.
2. :func:`evaluate_probes`: every saved probe on every dataset it was not trained on (AUROC with a
   bootstrap CI, accuracy at the training threshold, TPR at the training 1% FPR, per-raw-label rates,
   detection rate for positive-only sets); :func:`probe_scores` per-sample scores of the best SAE probe
   and the best dense baseline; :func:`cross_distribution` the best configurations refitted on each
   dataset with both classes and evaluated on every other.
3. :func:`report_figures` and :func:`write_report`: plots and a static HTML report with a page per
   feature of the best SAE probe (description, relevance, weight, selectivity, firing rates, top
   windows with the firing tokens highlighted), written aside and renamed into place.

"Best" is chosen on the training mixture only, never on an evaluation set: by leave-one-group-out (the
worst, or mean, AUROC over held-out groups; ``lib/selection.py``) where the training sets hold at least two
groups, else by training cross-validation (``ProbeGridConfig.selection``). Degenerate probes (no non-zero
weight) are never best. Thresholds are set on the calibration half of the ``control``-role datasets (even
``sample_id``s) where the lake has one; their check half (odd ids) gives the held-out control false-positive
rate. This package re-exports the modules' public names.
"""

from __future__ import annotations

from dagster_project.lib.evaluation.data import (
    LayerData,
    activation_provenance,
    layer_choice,
    polars_of,
    read_classification_scores,
    read_selectivity,
    resolve_train_datasets,
    view_names,
)
from dagster_project.lib.evaluation.evaluate import (
    EvaluationOutput,
    cross_distribution,
    cross_train_datasets,
    evaluate_probes,
    probe_scores,
)
from dagster_project.lib.evaluation.report import (
    REPORT_DIR,
    REPORT_FILES,
    FeatureInfo,
    Window,
    WindowToken,
    feature_infos,
    feature_page,
    feature_page_name,
    render_window,
    report_css,
    report_dir,
    write_report,
)
from dagster_project.lib.evaluation.schemas import (
    CROSS_TABLE,
    LODO_TABLE,
    METRICS_TABLE,
    PROBES_TABLE,
    SCORES_TABLE,
    TOKEN_ACTIVATIONS_VIEW,
)
from dagster_project.lib.evaluation.settings import (
    CALIBRATION,
    CHECK,
    CONTROL_ROLE,
    PROVENANCE_KEYS,
    EvalSettings,
    EvaluationError,
)
from dagster_project.lib.evaluation.summary import (
    auroc_cell,
    headline_numbers,
    report_figures,
    side_by_side,
)
from dagster_project.lib.evaluation.training import (
    SAVED_DIR,
    SAVED_MARKER,
    LoadedProbe,
    TrainedProbes,
    best_probes,
    best_provenance,
    check_probes_match,
    kind_of,
    load_saved_probes,
    lodo_table,
    probe_id,
    registry_control_negatives,
    save_probes,
    saved_dir,
    train_probes,
)
from dagster_project.lib.tables import (
    LODO_SCHEMA,
    PROBE_CROSS_SCHEMA,
    PROBE_METRICS_SCHEMA,
    PROBE_SCORES_SCHEMA,
    PROBES_SCHEMA,
)

__all__ = [
    "CALIBRATION",
    "CHECK",
    "CONTROL_ROLE",
    "CROSS_TABLE",
    "EvalSettings",
    "EvaluationError",
    "EvaluationOutput",
    "FeatureInfo",
    "LODO_SCHEMA",
    "LODO_TABLE",
    "LayerData",
    "LoadedProbe",
    "METRICS_TABLE",
    "PROBES_SCHEMA",
    "PROBES_TABLE",
    "PROBE_CROSS_SCHEMA",
    "PROBE_METRICS_SCHEMA",
    "PROBE_SCORES_SCHEMA",
    "PROVENANCE_KEYS",
    "REPORT_DIR",
    "REPORT_FILES",
    "SAVED_DIR",
    "SAVED_MARKER",
    "SCORES_TABLE",
    "TOKEN_ACTIVATIONS_VIEW",
    "TrainedProbes",
    "Window",
    "WindowToken",
    "activation_provenance",
    "auroc_cell",
    "best_probes",
    "best_provenance",
    "check_probes_match",
    "cross_distribution",
    "cross_train_datasets",
    "evaluate_probes",
    "feature_infos",
    "feature_page",
    "feature_page_name",
    "headline_numbers",
    "kind_of",
    "layer_choice",
    "load_saved_probes",
    "lodo_table",
    "polars_of",
    "probe_id",
    "probe_scores",
    "read_classification_scores",
    "read_selectivity",
    "registry_control_negatives",
    "render_window",
    "report_css",
    "report_dir",
    "report_figures",
    "resolve_train_datasets",
    "save_probes",
    "saved_dir",
    "side_by_side",
    "train_probes",
    "view_names",
    "write_report",
]
