"""Linear probes on pooled SAE features (and on pooled residuals, as the dense baseline).

Pure functions and small classes, no dagster import. The modules, in the order an asset uses them:

- ``design``: ``sparse_design(rows, samples, feature_ids)`` turns pooled sparse rows from the lake into a
  CSR sample x feature matrix (columns restricted to ``feature_ids``, in that order), never building a
  dense array of the full SAE width; ``dense_design(residuals, samples, pooling)`` does the same for the
  pooled residual vectors of the baseline.
- ``transforms``: the feature transforms (raw, binary, log1p, zscore, quantile), fitted, applied, saved.
- ``fitted``: ``ProbeSpec`` and ``FittedProbe``; ``FittedProbe.decision_function(X)`` scores any set built
  with the probe's own feature ids; ``FittedProbe.save(dir)`` / ``load_probe(dir)`` round-trip it exactly.
- ``fitting``: ``fit_probe``, ``evaluate_probe`` and (group-aware) ``cross_validate``.
- ``grid``: ``probe_grid(config, selectivity, active_feature_ids, classification_scores)`` expands the
  feature sets x penalties x C values to try, and the k-sparse, transform-sweep, token and dense specs.
- ``search``: ``search_probes`` runs the grid (cross-validated on the training set, held out group by
  group), sweeps the transforms on the best setting, and fits each spec on all of it.

Scores are logistic-regression decision values (log-odds); a sample is flagged when its score is
strictly greater than a threshold (see ``metrics``). This package re-exports the modules' public names.
"""

from __future__ import annotations

from dagster_project.lib.probes.design import (
    DENSE_VALUES,
    SPARSE_VALUES,
    TOKEN_VALUES,
    Key,
    Matrix,
    TableLike,
    active_feature_ids,
    dense_design,
    select_columns,
    sparse_design,
)
from dagster_project.lib.probes.fitted import (
    PENALTIES,
    PROBE_ARRAYS,
    PROBE_FORMAT_VERSION,
    PROBE_JSON,
    FittedProbe,
    ProbeSpec,
    load_probe,
    spec_name,
)
from dagster_project.lib.probes.fitting import (
    CVResult,
    cross_validate,
    cv_auroc,
    evaluate_probe,
    fit_probe,
)
from dagster_project.lib.probes.grid import (
    ProbeGridConfig,
    dense_baseline_specs,
    feature_sets,
    fold_feature_ids,
    ksparse_specs,
    probe_grid,
    token_dense_specs,
    token_specs,
    transfer_scores,
    transform_sweep,
)
from dagster_project.lib.probes.search import (
    Designs,
    ProbeResult,
    SelectionPlan,
    rank_key,
    search_dense_baselines,
    search_probes,
    search_token_probes,
)
from dagster_project.lib.probes.transforms import (
    TRANSFORMS,
    BinaryTransform,
    Log1pTransform,
    QuantileTransform,
    RawTransform,
    Transform,
    ZScoreTransform,
    make_transform,
    transform_from_state,
)

__all__ = [
    "BinaryTransform",
    "CVResult",
    "DENSE_VALUES",
    "Designs",
    "FittedProbe",
    "Key",
    "Log1pTransform",
    "Matrix",
    "PENALTIES",
    "PROBE_ARRAYS",
    "PROBE_FORMAT_VERSION",
    "PROBE_JSON",
    "ProbeGridConfig",
    "ProbeResult",
    "ProbeSpec",
    "QuantileTransform",
    "RawTransform",
    "SPARSE_VALUES",
    "SelectionPlan",
    "TOKEN_VALUES",
    "TRANSFORMS",
    "TableLike",
    "Transform",
    "ZScoreTransform",
    "active_feature_ids",
    "cross_validate",
    "cv_auroc",
    "dense_baseline_specs",
    "dense_design",
    "evaluate_probe",
    "feature_sets",
    "fit_probe",
    "fold_feature_ids",
    "ksparse_specs",
    "load_probe",
    "make_transform",
    "probe_grid",
    "rank_key",
    "search_dense_baselines",
    "search_probes",
    "search_token_probes",
    "select_columns",
    "sparse_design",
    "spec_name",
    "token_dense_specs",
    "token_specs",
    "transfer_scores",
    "transform_from_state",
    "transform_sweep",
]
