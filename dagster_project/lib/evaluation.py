"""Probes over the lake for one layer: train, save, evaluate, compare across distributions, report.

Pure functions over a DuckDB connection that has the lake's views (``catalog.views_connection``) and a
:class:`~dagster_project.lib.lake.Lake`; no dagster import. The flow the ``probes``, ``evaluation`` and
``probe_report`` assets follow:

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
rate.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
from numpy.typing import NDArray

from dagster_project.lib import generalisation, plots_probes
from dagster_project.lib.lake import (
    Lake,
    LakeError,
    LakePath,
    lake_path,
    local_copy,
    replace_dir,
    staged_dir,
    write_bytes,
)
from dagster_project.lib.markdown import fmt_cell
from dagster_project.lib.metrics import evaluate_scores
from dagster_project.lib.probes import (
    Designs,
    FittedProbe,
    Matrix,
    ProbeGridConfig,
    ProbeResult,
    ProbeSpec,
    SelectionPlan,
    active_feature_ids,
    cross_validate,
    dense_design,
    evaluate_probe,
    feature_sets,
    fit_probe,
    load_probe,
    rank_key,
    search_dense_baselines,
    search_probes,
    search_token_probes,
    select_columns,
    sparse_design,
    token_dense_specs,
    token_specs,
)
from dagster_project.lib.selection import group_weights, lodo_splits, near_duplicate_clusters
from dagster_project.lib.sql import relation
from dagster_project.lib.token_probes import TokenMatrix, token_matrix_from_rows

logger = logging.getLogger(__name__)

PROVENANCE_KEYS = ("model_id", "sae_id", "hook", "dtype", "config_hash")
SAVED_DIR = "probes_saved"
SAVED_MARKER = "config.json"  # written last into probes_saved/layer=L (uploaded last on S3)
REPORT_DIR = "report"
REPORT_FILES = "probes"  # sub-folder of report/layer=L holding this report's figures and feature pages
CONTROL_ROLE = "control"
CALIBRATION, CHECK = "calibration", "check"  # the two halves of a control set: even / odd sample_id
_PROBE_ID = re.compile(r"^[A-Za-z0-9_.+-]{1,200}$")


class EvaluationError(RuntimeError):
    """Inputs a probe stage needs are missing or inconsistent; the message says what to materialize."""


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """Everything the three probe stages take: the grid plus training sets, bootstrap and report sizes.

    ``train_datasets`` empty means every ``train``-role dataset. ``seed`` seeds the bootstrap; the
    grid's own ``seed`` seeds folds and solvers.
    """

    grid: ProbeGridConfig = field(default_factory=ProbeGridConfig)
    train_datasets: tuple[str, ...] = ()
    control_negatives: tuple[str, ...] = ()  # control sets whose calibration half also trains (registry)
    n_boot: int = 1000
    seed: int = 0
    report_max_features: int = 50
    report_top_windows: int = 5
    report_window_tokens: int = 12

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_datasets", tuple(str(d) for d in self.train_datasets))
        if len(set(self.train_datasets)) != len(self.train_datasets):
            raise ValueError(f"EvalSettings.train_datasets has duplicates: {list(self.train_datasets)}")
        for name in ("n_boot", "report_max_features", "report_top_windows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EvalSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.report_window_tokens < 0:
            raise ValueError(f"EvalSettings.report_window_tokens must be >= 0, got {self.report_window_tokens}")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def probe_config_hash(self) -> str:
        """Hash of what decides the fitted probes (grid and training sets)."""
        d = {"grid": asdict(self.grid), "train_datasets": list(self.train_datasets)}
        if self.control_negatives:
            d["control_negatives"] = list(self.control_negatives)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading the lake
# ---------------------------------------------------------------------------------------------


def view_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    """Names of the views and tables visible on ``con``."""
    return {r[0] for r in con.sql("select table_name from information_schema.tables").fetchall()}


def _require_views(con: duckdb.DuckDBPyConnection, names: Iterable[str], hint: str) -> None:
    missing = sorted(set(names) - view_names(con))
    if missing:
        raise EvaluationError(f"the lake has no {', '.join(missing)} view(s): {hint}")


def _pl(rel: duckdb.DuckDBPyRelation) -> pl.DataFrame:
    out = pl.from_arrow(rel.to_arrow_table())
    assert isinstance(out, pl.DataFrame)
    return out


class LayerData:
    """The samples of the lake and, read on first use and cached, the designs of one layer.

    Rows of every design follow the ``samples`` order: dataset, then ``sample_id``.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, layer: int) -> None:
        _require_views(con, ("samples", "activations"), f"materialize samples and activations for layer {layer}")
        self.con = con
        self.layer = int(layer)
        self.samples = _pl(relation(con, "probes/samples")).with_columns(
            pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64)
        )
        extracted = set(_pl(relation(con, "probes/layer_datasets", {"layer": self.layer}))["dataset"].to_list())
        self.extracted = sorted(extracted & set(self.samples["dataset"].unique().to_list()))
        self.has_residual_view = "residuals" in view_names(con)
        self._rows: dict[str, pl.DataFrame] = {}
        self._resid: dict[str, pl.DataFrame] = {}
        self._tok_resid_sets: dict[str, bool] = {}

    # -- datasets --------------------------------------------------------------------------

    def all_datasets(self) -> list[str]:
        """Every dataset of ``samples``, extracted at this layer or not."""
        return sorted(self.samples["dataset"].unique().to_list())

    def role(self, dataset: str) -> str:
        roles = self.samples.filter(pl.col("dataset") == dataset)["role"].unique().to_list()
        return str(roles[0]) if roles else ""

    def samples_of(self, datasets: Sequence[str]) -> pl.DataFrame:
        return self.samples.filter(pl.col("dataset").is_in(list(datasets)))

    def balance(self, datasets: Sequence[str]) -> dict[str, dict[str, int]]:
        """``{dataset: {n, n_pos, n_neg}}`` plus a ``total`` entry."""
        out: dict[str, dict[str, int]] = {}
        for d in datasets:
            y = self.samples_of([d])["is_positive"]
            out[d] = {"n": y.len(), "n_pos": int(y.sum()), "n_neg": int(y.len() - y.sum())}
        out["total"] = {k: sum(v[k] for v in out.values()) for k in ("n", "n_pos", "n_neg")}
        return out

    def raw_labels(self, datasets: Sequence[str]) -> list[Any]:
        return self.samples_of(datasets)["label"].to_list()

    def controls(self, exclude: Sequence[str] = ()) -> list[str]:
        """The ``control``-role datasets extracted at this layer (negatives-only benign or honest text)."""
        return [d for d in self.extracted if self.role(d) == CONTROL_ROLE and d not in exclude]

    def control_half(self, datasets: Sequence[str], half: str) -> pl.DataFrame:
        """The ``calibration`` (even ``sample_id``: thresholds are set here) or ``check`` (odd: held-out
        false-positive rates) half of control sets."""
        parity = 0 if half == CALIBRATION else 1
        return self.samples_of(datasets).filter(pl.col("sample_id") % 2 == parity)

    def eval_samples(self, dataset: str) -> pl.DataFrame:
        """The samples a probe is evaluated on: a control set's check half, any other set whole."""
        if self.role(dataset) == CONTROL_ROLE:
            return self.control_half([dataset], CHECK)
        return self.samples_of([dataset])

    # -- designs ---------------------------------------------------------------------------

    def rows(self, datasets: Sequence[str]) -> pl.DataFrame:
        """Pooled sparse rows of ``datasets`` at this layer (read once per dataset)."""
        todo = [d for d in datasets if d not in self._rows]
        if todo:
            df = _pl(relation(self.con, "probes/pooled_rows", {"layer": self.layer, "datasets": todo}))
            df = df.with_columns(pl.col("dataset").cast(pl.String))
            for d in todo:
                self._rows[d] = df.filter(pl.col("dataset") == d)
        return pl.concat([self._rows[d] for d in datasets]) if datasets else pl.DataFrame()

    def residual_rows(self, datasets: Sequence[str]) -> pl.DataFrame:
        if not self.has_residual_view:
            raise EvaluationError(f"the lake has no residuals view: extract layer {self.layer} with residuals")
        todo = [d for d in datasets if d not in self._resid]
        if todo:
            df = _pl(relation(self.con, "probes/residuals", {"layer": self.layer, "datasets": todo}))
            df = df.with_columns(pl.col("dataset").cast(pl.String))
            for d in todo:
                self._resid[d] = df.filter(pl.col("dataset") == d)
        return pl.concat([self._resid[d] for d in datasets])

    def has_residuals(self, dataset: str) -> bool:
        """Every sample of ``dataset`` has a residual row at this layer."""
        if not self.has_residual_view:
            return False
        return self.residual_rows([dataset]).height == self.samples_of([dataset]).height

    def sparse(
        self, datasets: Sequence[str], feature_ids: Sequence[int] | NDArray[np.int64], value: str
    ) -> tuple[Any, NDArray[np.int8], list[tuple[str, int]]]:
        return sparse_design(self.rows(datasets), self.samples_of(datasets), feature_ids, value)

    def dense(
        self, datasets: Sequence[str], pooling: str
    ) -> tuple[NDArray[np.float64], NDArray[np.int8], list[tuple[str, int]]]:
        return dense_design(self.residual_rows(datasets), self.samples_of(datasets), pooling)  # type: ignore[arg-type]

    def sparse_for(
        self, samples: pl.DataFrame, feature_ids: Sequence[int] | NDArray[np.int64], value: str
    ) -> tuple[Any, NDArray[np.int8], list[tuple[str, int]]]:
        """``sparse`` over any subset of samples (rows follow ``samples``)."""
        datasets = sorted(set(samples["dataset"].to_list()))
        return sparse_design(self.rows(datasets), samples, feature_ids, value)

    def dense_for(
        self, samples: pl.DataFrame, pooling: str
    ) -> tuple[NDArray[np.float64], NDArray[np.int8], list[tuple[str, int]]]:
        datasets = sorted(set(samples["dataset"].to_list()))
        return dense_design(self.residual_rows(datasets), samples, pooling)  # type: ignore[arg-type]

    def design_for(self, probe: FittedProbe, datasets: Sequence[str]) -> tuple[Matrix, NDArray[np.int8], list]:
        """The design ``probe`` scores: its own SAE features, or its residual pooling (per token for a
        token-level probe)."""
        if probe.spec.is_token:
            samples = self.samples_of(datasets)
            y = samples["is_positive"].cast(pl.Int8).to_numpy().astype(np.int8)
            keys = list(zip(samples["dataset"].to_list(), samples["sample_id"].to_list(), strict=True))
            return self.token_design_for(probe, samples), y, keys
        if probe.spec.is_dense:
            return self.dense(datasets, probe.spec.pooling)
        return self.sparse(datasets, probe.spec.feature_ids, probe.spec.value)

    def groups_of(self, samples: pl.DataFrame) -> list[str]:
        return samples["group"].to_list()

    # -- token-level designs -------------------------------------------------------------------

    @property
    def has_token_views(self) -> bool:
        """Per-token SAE activations and the tokens table exist (token-level SAE probes can run)."""
        return {"token_activations", "tokens"} <= view_names(self.con)

    def token_sparse_for(self, samples: pl.DataFrame, feature_ids: Sequence[int] | NDArray[np.int64]) -> TokenMatrix:
        """A :class:`TokenMatrix` of ``samples`` (in order) over ``feature_ids``: every real token of every
        text, a text with no token as one all-zero token."""
        datasets = sorted(set(samples["dataset"].to_list()))
        fids = np.asarray(feature_ids, dtype=np.int64)
        keys = samples.select(pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64)).with_row_index("_row")
        counts = _pl(relation(self.con, "probes/token_counts", {"datasets": datasets})).with_columns(
            pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64))
        n = keys.join(counts, on=["dataset", "sample_id"], how="left").sort("_row")["n_tokens"].fill_null(1)
        rows = _pl(relation(self.con, "probes/token_rows", {"layer": self.layer, "datasets": datasets,
                                                             "feature_ids": fids.tolist()}))
        rows = rows.with_columns(pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64)).join(
            keys, on=["dataset", "sample_id"], how="inner")
        col = pl.DataFrame({"feature_id": fids, "_col": np.arange(fids.size)})
        rows = rows.with_columns(pl.col("feature_id").cast(pl.Int64)).join(col, on="feature_id", how="inner")
        return token_matrix_from_rows(n.clip(lower_bound=1).to_numpy(), rows["_row"].to_numpy(), rows["token_pos"].to_numpy(),
                                      rows["_col"].to_numpy(), rows["act"].to_numpy(), fids.size)

    def token_design_for(self, probe: FittedProbe, samples: pl.DataFrame) -> TokenMatrix:
        if probe.spec.is_dense:
            return self.token_dense_for(samples)
        return self.token_sparse_for(samples, probe.spec.feature_ids)

    def has_token_residuals(self, dataset: str) -> bool:
        """Every sample of ``dataset`` has its per-token residuals at this layer (token-level dense probes)."""
        if "token_residuals" not in view_names(self.con):
            return False
        if dataset not in self._tok_resid_sets:
            n = self.con.sql("select count(distinct sample_id) from token_residuals where layer = $layer and "
                             "dataset = $dataset", params={"layer": self.layer, "dataset": dataset}).fetchall()[0][0]
            self._tok_resid_sets[dataset] = int(n) == self.samples_of([dataset]).height
        return self._tok_resid_sets[dataset]

    def can_score(self, spec: ProbeSpec, dataset: str) -> bool:
        """The lake holds what ``spec`` scores for ``dataset`` (residuals / per-token residuals / tokens)."""
        if spec.is_token:
            return self.has_token_residuals(dataset) if spec.is_dense else self.has_token_views
        return self.has_residuals(dataset) if spec.is_dense else True

    def token_dense_for(self, samples: pl.DataFrame) -> TokenMatrix:
        """A dense :class:`TokenMatrix` of ``samples`` (in order): every real token's residual vector."""
        datasets = sorted(set(samples["dataset"].to_list()))
        missing = [d for d in datasets if not self.has_token_residuals(d)]
        if missing:
            raise EvaluationError(f"no per-token residuals at layer {self.layer} for {missing}: extract them "
                                  "(the profile's token_residuals, or the activations asset's write_token_residuals)")
        keys = samples.select(pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64)).with_row_index("_row")
        rows = _pl(relation(self.con, "probes/token_residuals", {"layer": self.layer, "datasets": datasets}))
        rows = rows.with_columns(pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64)).join(
            keys, on=["dataset", "sample_id"], how="inner").sort(["_row", "token_pos"])
        lengths = rows.group_by("_row").len().sort("_row")
        if lengths.height != keys.height:
            raise EvaluationError(f"{keys.height - lengths.height} sample(s) have no per-token residuals at layer "
                                  f"{self.layer}: re-extract {datasets}")
        width = int(rows["resid"].list.len().max() or 0)
        tokens = rows["resid"].cast(pl.Array(pl.Float32, width)).to_numpy()
        return TokenMatrix(tokens, np.concatenate([[0], np.cumsum(lengths["len"].to_numpy())]))


def resolve_train_datasets(data: LayerData, requested: Sequence[str] = ()) -> list[str]:
    """The training datasets: ``requested`` if given, else every ``train``-role dataset.

    Every one must be extracted at the layer, and together they must hold at least two samples of
    each class (cross-validation). Positive-only datasets may be mixed in.
    """
    known = data.all_datasets()
    if requested:
        unknown = sorted(set(requested) - set(known))
        if unknown:
            raise EvaluationError(f"train_datasets {unknown} are not in the samples table; known: {known}")
        train = sorted(set(requested))
    else:
        train = [d for d in known if data.role(d) == "train"]  # control sets join only as configured
        if not train:
            raise EvaluationError(f"no dataset has role 'train' (datasets: {known}); name train_datasets in config")
    missing = [d for d in train if d not in data.extracted]
    if missing:
        raise EvaluationError(
            f"training dataset(s) {missing} have no activations at layer {data.layer}: materialize activations "
            f"for partitions {', '.join(f'{d}|{data.layer}' for d in missing)}"
        )
    bal = data.balance(train)["total"]
    if bal["n_pos"] < 2 or bal["n_neg"] < 2:
        raise EvaluationError(
            f"training datasets {train} hold {bal['n_pos']} positive and {bal['n_neg']} negative samples; "
            "probes need at least 2 of each class"
        )
    return train


def read_selectivity(con: duckdb.DuckDBPyConnection, layer: int) -> pl.DataFrame:
    """``feature_id, selectivity`` of the active features of ``layer`` from the ``feature_stats`` view."""
    _require_views(con, ("feature_stats",), f"materialize feature_stats for layer {layer}")
    df = _pl(relation(con, "probes/selectivity", {"layer": int(layer)}))
    if df.height == 0:
        raise EvaluationError(f"feature_stats has no active feature for layer {layer}: materialize feature_stats")
    return df


def read_classification_scores(con: duckdb.DuckDBPyConnection, layer: int) -> pl.DataFrame | None:
    """``feature_id, score`` (0-10) of the classified features of ``layer``; ``None`` when there are none."""
    if "classifications" not in view_names(con):
        return None
    df = _pl(relation(con, "probes/classification_scores", {"layer": int(layer)}))
    return df if df.height else None


def activation_provenance(lake: Lake, layer: int, datasets: Sequence[str]) -> dict[str, Any]:
    """The model, SAE, hook, dtype and config hash recorded in the activation files of ``datasets``.

    They must agree: a probe trained on activations of two different SAEs would be meaningless.
    """
    seen: dict[str, dict[str, Any]] = {}
    for d in datasets:
        meta = lake.read_meta("activations", layer, d)
        seen[d] = {k: meta.get(k) for k in PROVENANCE_KEYS}
    distinct = {json.dumps(v, sort_keys=True) for v in seen.values()}
    if len(distinct) > 1:
        detail = "; ".join(f"{d}: {v}" for d, v in seen.items())
        raise LakeError(
            f"activations of layer {layer} were extracted with different models/SAEs/configs ({detail}); "
            "re-extract them with one profile"
        )
    return next(iter(seen.values())) if seen else {}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def kind_of(spec: ProbeSpec) -> str:
    return "dense" if spec.is_dense else "sae"


def probe_id(spec: ProbeSpec) -> str:
    """A path-safe, unique id: ``sae__top50__l1__C0.1__raw__max_act`` or ``dense__resid_mean__l2__C1``."""
    if spec.is_dense:
        pid = f"dense__{spec.feature_set}__{spec.penalty}__C{spec.C:g}"
    else:
        pid = f"sae__{spec.feature_set}__{spec.penalty}__C{spec.C:g}__{spec.transform}__{spec.value}"
    if spec.is_token:
        pid += f"__{spec.aggregation}"
    if not _PROBE_ID.match(pid):
        raise ValueError(f"probe id {pid!r} is not path-safe")
    return pid


@dataclass
class TrainedProbes:
    """The outcome of :func:`train_probes` for one layer (nothing written yet)."""

    layer: int
    settings: EvalSettings
    train_datasets: list[str]
    balance: dict[str, dict[str, int]]
    feature_set_sizes: dict[str, int]
    n_active: int
    used_classifications: bool
    sae: list[ProbeResult]
    dense: list[ProbeResult]
    dense_skipped: str | None = None
    selection: str = "cv"
    criterion: str = "worst"
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    held_out_groups: list[str] = field(default_factory=list)
    control_datasets: list[str] = field(default_factory=list)
    control_negatives: list[str] = field(default_factory=list)
    n_near_dup_clusters: int = 0
    # wall seconds per family: building its designs, cross-validating, holding out groups, fitting
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def results(self) -> list[ProbeResult]:
        return [*self.sae, *self.dense]


def _group_balance(samples: pl.DataFrame) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (g,), sub in sorted(samples.group_by(["group"]), key=lambda kv: str(kv[0][0])):
        n_pos = int(sub["is_positive"].sum())
        out[str(g)] = {"n": sub.height, "n_pos": n_pos, "n_neg": sub.height - n_pos}
    return out


def train_probes(
    con: duckdb.DuckDBPyConnection, layer: int, settings: EvalSettings, data: LayerData | None = None
) -> TrainedProbes:
    """Search the SAE probe grid and the dense baselines on the training mixture and choose among them.

    Each probe is cross-validated with folds that keep near-duplicate texts together and, when the
    mixture holds at least two groups (or ``selection`` is ``lodo``), held out group by group; the
    results come back best first by the plan's selection score. Thresholds come from the control sets'
    calibration half where the lake has control sets (``control_as_negatives``: that half trains as
    extra negatives and the thresholds come from its out-of-fold scores)."""
    data = data or LayerData(con, layer)
    grid = settings.grid
    train = resolve_train_datasets(data, settings.train_datasets)
    controls = data.controls(exclude=train)
    cal, chk = data.control_half(controls, CALIBRATION), data.control_half(controls, CHECK)
    tr_samples = data.samples_of(train)
    control_rows = None
    as_negatives = controls if grid.control_as_negatives else [c for c in controls if c in settings.control_negatives]
    joining = cal.filter(pl.col("dataset").is_in(as_negatives))
    if joining.height:  # their calibration half trains; thresholds then come from its out-of-fold scores
        control_rows = np.arange(tr_samples.height, tr_samples.height + joining.height, dtype=np.int64)
        tr_samples = pl.concat([tr_samples, joining])
        cal = cal.filter(~pl.col("dataset").is_in(as_negatives))
    balance = data.balance(train)
    active = active_feature_ids(data.rows(sorted(set(tr_samples["dataset"].to_list()))))
    if active.size == 0:
        raise EvaluationError(f"no SAE feature fires on the training datasets {train} at layer {layer}")
    X, y, _ = data.sparse_for(tr_samples, active, grid.value)
    groups = data.groups_of(tr_samples)
    clusters = near_duplicate_clusters(tr_samples["text"].to_list())
    weights = None if grid.weighting == "none" else group_weights(groups, y, grid.weighting)  # type: ignore[arg-type]
    splits = lodo_splits(groups, y, clusters, grid.min_group)
    mode = grid.selection
    if mode == "auto":
        mode = "lodo" if len(splits) >= 2 else "cv"
    if mode == "lodo" and not splits:
        raise EvaluationError(
            f"selection 'lodo' needs a training group of at least {grid.min_group} samples whose removal leaves "
            f"both classes; the mixture {train} has groups {_group_balance(tr_samples)}: add groups "
            "(registry 'group' / 'group_field') or set selection to 'cv'"
        )
    plan = SelectionPlan(
        mode=mode, criterion=grid.criterion, splits=splits if mode == "lodo" else [], clusters=clusters,
        weights=weights, control_rows=control_rows, control_fpr=grid.control_fpr, min_act=grid.min_act,
        n_boot=grid.lodo_n_boot, groups=np.asarray(groups, dtype=object),
        hard=tr_samples["label"].is_in(list(grid.hard_negative_labels)).to_numpy(),
    )
    selectivity = read_selectivity(con, layer)
    classes = read_classification_scores(con, layer)
    sets = feature_sets(grid, selectivity, active, classes)
    logger.info("layer %d: training on %s (%s), %d groups, selection %s (%d held-out groups), controls %s, "
                "feature sets %s", layer, train, balance["total"], len(set(groups)), mode, len(plan.splits),
                controls, {k: len(v) for k, v in sets.items()})

    def sae_control(frame: pl.DataFrame) -> Any:
        return data.sparse_for(frame, active, grid.value)[0] if frame.height else None

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    sae = search_probes(grid, X, active, y, selectivity, classes, plan, (sae_control(cal), sae_control(chk)))
    seconds["sae_pooled"] = time.perf_counter() - t0
    tspecs = token_specs(grid, sets) if data.has_token_views else []
    if tspecs:
        t0 = time.perf_counter()
        tfids = np.array(sorted(set().union(*(s_.feature_ids for s_ in tspecs))), dtype=np.int64)
        tok = [data.token_sparse_for(f, tfids) if f.height else None for f in (tr_samples, cal, chk)]
        assert tok[0] is not None
        designs_t = Designs(tok[0], tok[1], tok[2], tfids, rank_X=select_columns(X, active, tfids))
        sae = sorted([*sae, *search_token_probes(grid, tspecs, designs_t, y, plan)], key=rank_key)
        seconds["sae_token"] = time.perf_counter() - t0

    dense: list[ProbeResult] = []
    skipped: str | None = None
    needed = sorted(set(tr_samples["dataset"].to_list()) | set(controls))
    if not grid.dense_poolings:
        skipped = "no dense pooling configured"
    elif not all(data.has_residuals(d) for d in needed):
        skipped = f"no residual vectors for every training and control sample at layer {layer}"
    else:
        t0 = time.perf_counter()
        designs = {p: data.dense_for(tr_samples, p)[0] for p in grid.dense_poolings}
        ctrl = {p: (data.dense_for(cal, p)[0] if cal.height else None, data.dense_for(chk, p)[0] if chk.height
                    else None) for p in grid.dense_poolings}
        dense = search_dense_baselines(grid, designs, y, plan, ctrl)
        seconds["dense_pooled"] = time.perf_counter() - t0
    dspecs = token_dense_specs(grid)
    if dspecs and all(data.has_token_residuals(d) for d in needed):
        t0 = time.perf_counter()
        tok = [data.token_dense_for(f) if f.height else None for f in (tr_samples, cal, chk)]
        assert tok[0] is not None
        dense = sorted([*dense, *search_token_probes(grid, dspecs, Designs(tok[0], tok[1], tok[2]), y, plan)],
                       key=rank_key)
        seconds["dense_token"] = time.perf_counter() - t0
    elif dspecs:
        logger.info("layer %d: token-level dense baselines skipped: no per-token residuals", layer)
    if skipped:
        logger.warning("layer %d: dense baselines skipped: %s", layer, skipped)
    return TrainedProbes(
        layer=int(layer),
        settings=settings,
        train_datasets=train,
        balance=balance,
        feature_set_sizes={k: len(v) for k, v in sets.items()},
        n_active=int(active.size),
        used_classifications=classes is not None and "relevant" in sets,
        sae=sae,
        dense=dense,
        dense_skipped=skipped,
        selection=mode,
        criterion=grid.criterion,
        groups=_group_balance(tr_samples),
        held_out_groups=[sp_.group for sp_ in plan.splits],
        control_datasets=controls,
        control_negatives=sorted(set(joining["dataset"].to_list())),
        n_near_dup_clusters=int(np.unique(clusters).size),
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )


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


def lodo_table(trained: TrainedProbes) -> pa.Table:
    """The ``lodo_metrics`` rows of one layer: every probe x held-out group (empty under ``cv`` selection)."""
    rows = []
    for kind, results in (("sae", trained.sae), ("dense", trained.dense)):
        for rank, r in enumerate(results):
            for m in r.lodo:
                rows.append({**{k: m.get(k) for k in LODO_SCHEMA.names}, "probe": probe_id(r.spec), "kind": kind,
                             "feature_set": r.spec.feature_set, "aggregation": r.spec.aggregation,
                             "is_best": rank == 0 and not r.degenerate,
                             "selection": trained.selection})
    return pa.Table.from_pylist(rows, schema=LODO_SCHEMA)


def saved_dir(lake: Lake, layer: int) -> LakePath:
    return lake.base / SAVED_DIR / f"layer={int(layer)}"


def save_probes(lake: Lake, trained: TrainedProbes, provenance: Mapping[str, Any]) -> pa.Table:
    """Save every probe under ``probes_saved/layer=L/<probe_id>`` and return the ``probes`` table.

    The whole layer folder is written aside and renamed into place, so probes of an older grid do not
    linger. Each probe's provenance holds ``provenance`` (model, SAE, hook, config hash, profile, ...)
    plus its layer, id, kind and training sets; ``config.json`` beside them holds the settings. On S3 the
    folder is built locally and uploaded with ``config.json`` last (``lake.staged_dir``); loaders refuse a
    folder without it.
    """
    location = saved_dir(lake, trained.layer)
    with staged_dir(location, SAVED_MARKER) as final:
        rows = _save_probes_into(final, location, trained, provenance)
    ids = [r["probe_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise EvaluationError(f"duplicate probe ids in the grid: {sorted({i for i in ids if ids.count(i) > 1})}")
    return pa.Table.from_pylist(rows, schema=PROBES_SCHEMA)


def _save_probes_into(
    final: Path, location: LakePath, trained: TrainedProbes, provenance: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Write the layer's probes folder at the local ``final``; rows name each probe under ``location``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    total = trained.balance["total"]
    rows: list[dict[str, Any]] = []
    try:
        for kind, results in (("sae", trained.sae), ("dense", trained.dense)):
            by_cv = {id(r): i + 1 for i, r in enumerate(sorted(results, key=lambda r: (-r.cv.mean, r.probe.n_features,
                                                                                          r.spec.name)))}
            for rank, r in enumerate(results):
                pid = probe_id(r.spec)
                r.probe.provenance = {
                    **dict(provenance),
                    "layer": trained.layer,
                    "probe_id": pid,
                    "kind": kind,
                    "train_datasets": list(trained.train_datasets),
                    "probe_config_hash": trained.settings.probe_config_hash(),
                }
                r.probe.save(tmp / pid)
                rows.append(
                    {
                        "probe_id": pid,
                        "kind": kind,
                        "feature_set": r.spec.feature_set,
                        "penalty": r.spec.penalty,
                        "C": r.spec.C,
                        "transform": r.spec.transform,
                        "value": r.spec.value,
                        "aggregation": r.spec.aggregation,
                        "stage": r.stage,
                        "n_features": r.probe.n_features,
                        "n_nonzero": r.probe.n_nonzero,
                        "cv_auroc": r.cv.mean,
                        "cv_std": r.cv.std,
                        "cv_rank": by_cv[id(r)],
                        "rank": rank + 1,
                        "is_best": rank == 0 and not r.degenerate,
                        "degenerate": r.degenerate,
                        "selection": trained.selection,
                        "selection_score": r.selection_score,
                        "lodo_worst_auroc": r.lodo_auroc("worst"),
                        "lodo_mean_auroc": r.lodo_auroc("mean"),
                        "converged": r.probe.converged,
                        "train_threshold": r.probe.train_threshold,
                        "fpr1_threshold": r.probe.fpr1_threshold,
                        "threshold_source": r.probe.threshold_source,
                        "train_datasets": list(trained.train_datasets),
                        "n_pos": total["n_pos"],
                        "n_neg": total["n_neg"],
                        "path": str(location / pid),
                    }
                )
        doc = {
            "layer": trained.layer,
            "provenance": dict(provenance),
            "settings": trained.settings.to_json(),
            "probe_config_hash": trained.settings.probe_config_hash(),
            "train_datasets": trained.train_datasets,
            "class_balance": trained.balance,
            "feature_sets": trained.feature_set_sizes,
            "selection": trained.selection,
            "criterion": trained.criterion,
            "groups": trained.groups,
            "held_out_groups": trained.held_out_groups,
            "control_datasets": trained.control_datasets,
            "control_negatives": trained.control_negatives,
        }
        (tmp / SAVED_MARKER).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedProbe:
    """A saved probe and its row of the ``probes`` table."""

    probe_id: str
    kind: str
    is_best: bool
    cv_auroc: float
    train_datasets: list[str]
    probe: FittedProbe
    rank: int = 0
    degenerate: bool = False
    selection: str = "cv"
    selection_score: float | None = None


def load_saved_probes(probes_table: pa.Table | pl.DataFrame) -> list[LoadedProbe]:
    """Load every probe listed in a ``probes`` table from its ``path``, in table order.

    A path in an S3 lake is read from a local copy of its layer folder, downloaded once and refused
    (``LakeError``) while the folder lacks its ``config.json``."""
    df = probes_table if isinstance(probes_table, pl.DataFrame) else pl.from_arrow(probes_table)
    assert isinstance(df, pl.DataFrame)
    out = []
    copies: dict[str, Path] = {}
    for r in df.iter_rows(named=True):
        where = lake_path(r["path"])
        if isinstance(where, Path):
            path = where
        else:
            folder = str(where.parent)
            if folder not in copies:
                copies[folder] = local_copy(where.parent, SAVED_MARKER)
            path = copies[folder] / where.name
        if not (path / "probe.json").is_file():
            raise EvaluationError(f"saved probe {r['probe_id']} is missing at {path}: materialize probes again")
        out.append(
            LoadedProbe(
                probe_id=r["probe_id"],
                kind=r["kind"],
                is_best=bool(r["is_best"]),
                cv_auroc=float(r["cv_auroc"]),
                train_datasets=list(r["train_datasets"]),
                probe=load_probe(path),
                rank=int(r.get("rank") or r.get("cv_rank") or 0),
                degenerate=bool(r.get("degenerate") or False),
                selection=str(r.get("selection") or "cv"),
                selection_score=r.get("selection_score"),
            )
        )
    return out


def best_probes(loaded: Sequence[LoadedProbe]) -> dict[str, LoadedProbe]:
    """``{kind: the best probe of that kind}`` (by the layer's selection, as marked in the ``probes`` table)."""
    return {p.kind: p for p in loaded if p.is_best}


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


@dataclass
class EvaluationOutput:
    metrics: pa.Table
    skipped: list[str]


def evaluate_probes(data: LayerData, loaded: Sequence[LoadedProbe], settings: EvalSettings) -> EvaluationOutput:
    """Every probe on every dataset extracted at the layer that it was not trained on (a control set:
    its check half, never used for thresholds or training), at the probe's saved thresholds.

    SAE designs are built once per (dataset, value) over the union of the probes' features; dense
    designs once per (dataset, pooling). A dataset not extracted at the layer is skipped, and one
    without residual vectors is skipped for the dense baselines (both listed in ``skipped``).
    """
    sae_ids: dict[str, set[int]] = {}
    for p in loaded:
        if not p.probe.spec.is_dense:  # token-level SAE probes share one token design per dataset too
            sae_ids.setdefault(p.probe.spec.value, set()).update(p.probe.spec.feature_ids)
    union = {v: np.array(sorted(ids), dtype=np.int64) for v, ids in sae_ids.items()}
    cache: dict[tuple[str, str], Matrix] = {}
    skipped = [f"{d}: no activations at layer {data.layer}" for d in data.all_datasets() if d not in data.extracted]
    rows: list[dict[str, Any]] = []
    for p in loaded:
        spec = p.probe.spec
        for d in data.extracted:
            if d in p.train_datasets:
                continue
            if spec.is_dense:
                if not data.can_score(spec, d):
                    what = "per-token residual" if spec.is_token else "residual"
                    msg = f"{d}: no {what} vectors ({'token-level ' if spec.is_token else ''}dense baselines not evaluated)"
                    if msg not in skipped:
                        skipped.append(msg)
                    continue
            if spec.is_token and not spec.is_dense and not data.can_score(spec, d):
                continue  # no token views: token-level SAE probes were not trained either
            ev = data.eval_samples(d)
            key = (d, spec.value)
            if spec.is_token and spec.is_dense:
                if key not in cache:
                    cache[key] = data.token_dense_for(ev)
                X = cache[key]
            elif spec.is_token:
                if key not in cache:
                    cache[key] = data.token_sparse_for(ev, union[spec.value])
                X = select_columns(cache[key], union[spec.value], spec.feature_ids)
            elif spec.is_dense:
                if key not in cache:
                    cache[key] = data.dense_for(ev, spec.pooling)[0]
                X = cache[key]
            else:
                if key not in cache:
                    cache[key] = data.sparse_for(ev, union[spec.value], spec.value)[0]
                X = select_columns(cache[key], union[spec.value], spec.feature_ids)
            y = ev["is_positive"].cast(pl.Int8).to_numpy()
            m = evaluate_probe(p.probe, X, y, ev["label"].to_list(), n_boot=settings.n_boot, seed=settings.seed)
            rows.append(
                {
                    **{k: m[k] for k in PROBE_METRICS_SCHEMA.names if k in m},
                    "probe": p.probe_id,
                    "kind": p.kind,
                    "feature_set": spec.feature_set,
                    "penalty": spec.penalty,
                    "C": spec.C,
                    "transform": spec.transform,
                    "aggregation": spec.aggregation,
                    "is_best": p.is_best,
                    "rank": p.rank,
                    "degenerate": p.degenerate,
                    "selection": p.selection,
                    "selection_score": p.selection_score,
                    "threshold_source": p.probe.threshold_source,
                    "cv_auroc": p.cv_auroc,
                    "eval_dataset": d,
                    "eval_role": data.role(d),
                    "train_datasets": list(p.train_datasets),
                    "by_label": json.dumps(m["by_label"], sort_keys=True),
                }
            )
    return EvaluationOutput(metrics=pa.Table.from_pylist(rows, schema=PROBE_METRICS_SCHEMA), skipped=skipped)


PROBE_SCORES_SCHEMA = pa.schema(
    [
        ("probe", pa.string()),
        ("kind", pa.string()),
        ("dataset", pa.string()),
        ("sample_id", pa.int32()),
        ("score", pa.float64()),
    ]
)


def probe_scores(data: LayerData, probes: Iterable[LoadedProbe]) -> pa.Table:
    """Per-sample scores of ``probes`` on every dataset extracted at the layer (training sets included)."""
    parts: list[pa.Table] = []
    for p in probes:
        for d in data.extracted:
            if not data.can_score(p.probe.spec, d):
                continue
            X, _, keys = data.design_for(p.probe, [d])
            s = p.probe.decision_function(X)
            parts.append(
                pa.table(
                    {
                        "probe": [p.probe_id] * len(keys),
                        "kind": [p.kind] * len(keys),
                        "dataset": [k[0] for k in keys],
                        "sample_id": pa.array([k[1] for k in keys], pa.int32()),
                        "score": pa.array(s, pa.float64()),
                    },
                    schema=PROBE_SCORES_SCHEMA,
                )
            )
    return pa.concat_tables(parts) if parts else PROBE_SCORES_SCHEMA.empty_table()


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


def cross_train_datasets(data: LayerData) -> list[str]:
    """Datasets that can train a probe alone: extracted, with at least two samples of each class."""
    out = []
    for d in data.extracted:
        b = data.balance([d])[d]
        if b["n_pos"] >= 2 and b["n_neg"] >= 2:
            out.append(d)
    return out


def cross_distribution(
    data: LayerData, probes: Iterable[LoadedProbe], settings: EvalSettings
) -> pa.Table:
    """Refit each probe's configuration on every dataset with both classes; evaluate on every other.

    The configuration (features, penalty, C, transform; or the residual pooling) is the probe's own,
    so an SAE row's features are still those chosen by selectivity on the original training sets.
    The diagonal cell (``in_distribution``) is the cross-validated AUROC on the dataset itself (its
    spread in ``cv_std``); off-diagonal cells are AUROC with a bootstrap CI, ``None`` on a one-class
    eval set, whose ``detection_rate`` is then the number to read.
    """
    grid = settings.grid
    rows: list[dict[str, Any]] = []
    trainers = cross_train_datasets(data)
    for p in probes:
        spec = p.probe.spec
        datasets = [d for d in data.extracted if data.can_score(spec, d)]
        for t in trainers:
            if t not in datasets:
                continue
            X, y, _ = data.design_for(p.probe, [t])
            cv = cross_validate(spec, X, y, folds=grid.folds, seed=grid.seed)
            fitted = fit_probe(spec, X, y, seed=grid.seed, threshold_scores=cv.oof_scores)
            for e in datasets:
                base = {
                    "kind": p.kind, "probe": p.probe_id, "train_dataset": t, "eval_dataset": e,
                    "eval_role": data.role(e), "in_distribution": e == t, "n_nonzero": fitted.n_nonzero,
                }
                if e == t:
                    b = data.balance([t])[t]
                    rows.append({**base, "auroc": cv.mean, "cv_std": cv.std, **b})
                    continue
                Xe, ye, _ = data.design_for(fitted, [e])
                m = evaluate_scores(
                    ye, fitted.decision_function(Xe), None, fitted.train_threshold, fitted.fpr1_threshold,
                    n_boot=settings.n_boot, seed=settings.seed,
                )
                rows.append({**base, **{k: m[k] for k in PROBE_CROSS_SCHEMA.names if k in m and k not in base}})
    return pa.Table.from_pylist(rows, schema=PROBE_CROSS_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Summaries (markdown for Dagster metadata)
# ---------------------------------------------------------------------------------------------


def _auroc_cell(r: Mapping[str, Any] | None) -> str:
    if r is None:
        return "–"
    if r.get("auroc") is None:
        dr = r.get("detection_rate")
        return f"detection {dr:.3f}" if dr is not None else "–"
    lo, hi = r.get("auroc_ci_low"), r.get("auroc_ci_high")
    ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{r['auroc']:.3f}{ci}"


def side_by_side(metrics: pa.Table | pl.DataFrame, probes_table: pa.Table | pl.DataFrame) -> str:
    """Markdown: the best SAE probe next to the best dense baseline, training CV then every eval set.

    Positive-only sets show the detection rate (no AUROC exists there).
    """
    m = metrics if isinstance(metrics, pl.DataFrame) else pl.from_arrow(metrics)
    pr = probes_table if isinstance(probes_table, pl.DataFrame) else pl.from_arrow(probes_table)
    assert isinstance(m, pl.DataFrame) and isinstance(pr, pl.DataFrame)
    best = {r["kind"]: r for r in pr.filter(pl.col("is_best")).iter_rows(named=True)}
    names = {k: best[k]["probe_id"] if k in best else "none" for k in ("sae", "dense")}
    lines = [
        f"| eval set | role | SAE `{names['sae']}` | dense `{names['dense']}` |",
        "|---|---|---|---|",
        "| training CV | train | "
        + " | ".join(
            f"{best[k]['cv_auroc']:.3f} ± {best[k]['cv_std']:.3f}" if k in best else "–" for k in ("sae", "dense")
        )
        + " |",
    ]
    if any(best[k].get("lodo_worst_auroc") is not None for k in best):
        lines.append(
            "| held-out groups (worst / mean) | train | "
            + " | ".join(
                f"{generalisation._f(best[k].get('lodo_worst_auroc'))} / {generalisation._f(best[k].get('lodo_mean_auroc'))}"
                if k in best else "–" for k in ("sae", "dense")
            )
            + " |"
        )
    mb = m.filter(pl.col("is_best")) if m.height else m
    datasets = sorted(
        {(r["eval_role"], r["eval_dataset"]) for r in mb.iter_rows(named=True)},
        key=lambda x: ({"test": 0, "train": 1, "ood": 2, "control": 3}.get(x[0], 4), x[1]),
    )
    for role, d in datasets:
        cells = []
        for k in ("sae", "dense"):
            hit = mb.filter((pl.col("kind") == k) & (pl.col("eval_dataset") == d))
            r = hit.row(0, named=True) if hit.height else None
            if r is not None and role == "control":
                cells.append(f"flagged {generalisation._f(r.get('fpr_at_1pct_fpr'), pct=True)}")
            else:
                cells.append(_auroc_cell(r))
        lines.append(f"| {d} | {role} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def headline_numbers(metrics: pa.Table | pl.DataFrame, probes_table: pa.Table | pl.DataFrame) -> dict[str, float]:
    """Flat numbers for metadata: best SAE / dense CV AUROC and mean AUROC over test and ood sets."""
    m = metrics if isinstance(metrics, pl.DataFrame) else pl.from_arrow(metrics)
    pr = probes_table if isinstance(probes_table, pl.DataFrame) else pl.from_arrow(probes_table)
    assert isinstance(m, pl.DataFrame) and isinstance(pr, pl.DataFrame)
    out: dict[str, float] = {}
    for r in pr.filter(pl.col("is_best")).iter_rows(named=True):
        out[f"best_{r['kind']}_cv_auroc"] = float(r["cv_auroc"])
    if m.height:
        for (kind, role), g in m.filter(pl.col("is_best")).group_by(["kind", "eval_role"]):
            vals = g["auroc"].drop_nulls()
            if vals.len():
                out[f"best_{kind}_mean_auroc_{role}"] = float(vals.mean())  # type: ignore[arg-type]
    return out


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def report_figures(
    samples: pl.DataFrame,
    probes_table: pa.Table | pl.DataFrame,
    metrics: pa.Table | pl.DataFrame,
    scores: pa.Table | pl.DataFrame,
    cross: pa.Table | pl.DataFrame,
    default_transform: str = "raw",
    lodo: pa.Table | pl.DataFrame | None = None,
) -> dict[str, bytes]:
    """PNG figures by file stem: the held-out-group AUROC of the best SAE probe and dense baseline, an
    AUROC ladder per two-class eval set (degenerate probes left out), ROC curves of the best probes, the
    cross-distribution heatmaps and the L1 path (CV AUROC vs non-zero weights per set)."""

    def frame(t: pa.Table | pl.DataFrame) -> pl.DataFrame:
        out = t if isinstance(t, pl.DataFrame) else pl.from_arrow(t)
        assert isinstance(out, pl.DataFrame)
        return out

    pr, m, sc, cr = frame(probes_table), frame(metrics), frame(scores), frame(cross)
    figs: dict[str, bytes] = {}
    lo = generalisation.frame(lodo)
    if lo.height and lo.filter(pl.col("is_best")).height:
        held = [
            {"name": f"{r['held_out_group']} ({r['kind']}{', vs control' if r['auroc_vs'] == 'control' else ''})",
             "auroc": r["auroc"], "ci_low": r["auroc_ci_low"], "ci_high": r["auroc_ci_high"], "group": r["kind"]}
            for r in lo.filter(pl.col("is_best")).sort(["held_out_group", "kind"]).iter_rows(named=True)
        ]
        figs["held_out_groups"] = plots_probes.plot_auroc_ladder(
            held, title="Held-out groups: AUROC of the recommended SAE probe and dense baseline, each group unseen")
    if m.height and "degenerate" in m.columns:
        m = m.filter(~pl.col("degenerate").fill_null(False))
    if m.height:
        two_class = m.filter(pl.col("auroc").is_not_null())
        for d in sorted(two_class["eval_dataset"].unique().to_list()):
            sub = two_class.filter(pl.col("eval_dataset") == d)
            ladder = [
                {
                    "name": r["probe"],
                    "auroc": r["auroc"],
                    "ci_low": r["auroc_ci_low"],
                    "ci_high": r["auroc_ci_high"],
                    "group": "dense" if r["kind"] == "dense" else r["penalty"],
                }
                for r in sub.iter_rows(named=True)
            ]
            figs[f"ladder_{d}"] = plots_probes.plot_auroc_ladder(ladder, title=f"AUROC on {d} ({sub['eval_role'][0]})")
    if sc.height:
        lab = sc.join(
            samples.select(
                pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int32), "is_positive"
            ),
            on=["dataset", "sample_id"],
            how="inner",
        )
        curves: dict[str, tuple[Any, Any]] = {}
        for (kind, d), g in sorted(lab.group_by(["kind", "dataset"]), key=lambda kv: (str(kv[0][1]), str(kv[0][0]))):
            curves[f"{kind} on {d}"] = (g["is_positive"].cast(pl.Int8).to_numpy(), g["score"].to_numpy())
        figs["roc"] = plots_probes.plot_roc_curves(curves, title="ROC: best SAE probe and best dense baseline")
    if cr.height:
        for kind in sorted(cr["kind"].unique().to_list()):
            sub = cr.filter(pl.col("kind") == kind)
            cells = [(r["train_dataset"], r["eval_dataset"], r["auroc"]) for r in sub.iter_rows(named=True)]
            figs[f"cross_{kind}"] = plots_probes.plot_cross_distribution_heatmap(
                cells,
                title=f"AUROC, {kind} probe {sub['probe'][0]} refitted per train set (diagonal: CV)",
                train_order=sorted(sub["train_dataset"].unique().to_list()),
                eval_order=sorted(sub["eval_dataset"].unique().to_list()),
            )
    if pr.height and "stage" in pr.columns:
        ks = pr.filter((pl.col("kind") == "sae") & (pl.col("stage") == "ksparse"))
        if ks.height:
            curve = {"training CV": [(r["n_features"], r["cv_auroc"]) for r in ks.iter_rows(named=True)]}
            if "lodo_worst_auroc" in ks.columns and ks["lodo_worst_auroc"].drop_nulls().len():
                curve["held-out groups, worst"] = [(r["n_features"], r["lodo_worst_auroc"]) for r in ks.iter_rows(named=True)]
                curve["held-out groups, mean"] = [(r["n_features"], r["lodo_mean_auroc"]) for r in ks.iter_rows(named=True)]
            figs["ksparse"] = plots_probes.plot_ksparse_curve(curve, title="k-sparse curve: L2 probes on the k features "
                                                              "most selective in every training group")
    if pr.height:
        l1 = pr.filter((pl.col("kind") == "sae") & (pl.col("penalty") == "l1") & (pl.col("transform") == default_transform))
        points = [(r["feature_set"], r["C"], r["n_nonzero"], r["cv_auroc"]) for r in l1.iter_rows(named=True)]
        figs["l1_path"] = plots_probes.plot_l1_path(points, title="L1 path: non-zero weights vs training CV AUROC")
        if "lodo_mean_auroc" in l1.columns and l1["lodo_mean_auroc"].drop_nulls().len():
            held = [(r["feature_set"], r["C"], r["n_nonzero"], r["lodo_mean_auroc"]) for r in l1.iter_rows(named=True)
                    if r["lodo_mean_auroc"] is not None]
            figs["l1_path_held_out"] = plots_probes.plot_l1_path(
                held, title="L1 path: non-zero weights vs mean held-out-group AUROC")
    return figs


def layer_choice(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """The best probe of every layer in the lake by kind, ranked by selection score (``probes/layer_choice``):
    the layer is chosen like the probe, on held-out groups where the layers were selected that way."""
    if "probes" not in view_names(con):
        return pl.DataFrame()
    return _pl(relation(con, "probes/layer_choice"))


# ---------------------------------------------------------------------------------------------
# Feature pages and the HTML report
# ---------------------------------------------------------------------------------------------


@dataclass
class WindowToken:
    token_pos: int
    text: str
    act: float


@dataclass
class Window:
    rank: int
    dataset: str
    sample_id: int
    role: str
    label: str
    is_positive: bool | None
    max_act: float
    argmax_token: int
    n_tokens: int
    tokens: list[WindowToken]


@dataclass
class FeatureInfo:
    """What a feature page shows."""

    feature_id: int
    weight: float
    stats: dict[str, Any]
    description: str | None
    classification: dict[str, Any] | None
    firing: list[dict[str, Any]]
    windows: list[Window]


def _cursor_with_empty(
    con: duckdb.DuckDBPyConnection, needed: Mapping[str, pa.Schema]
) -> duckdb.DuckDBPyConnection:
    """A cursor on which every view of ``needed`` exists (missing ones as empty tables)."""
    cur = con.cursor()
    have = view_names(cur)
    for name, schema in needed.items():
        if name not in have:
            cur.register(name, schema.empty_table())
    return cur


_TOKEN_ACTS_EMPTY = pa.schema(
    [("layer", pa.int64()), ("dataset", pa.string()), ("sample_id", pa.int32()), ("token_pos", pa.int32()),
     ("feature_id", pa.int32()), ("act", pa.float32())]
)


def feature_infos(
    con: duckdb.DuckDBPyConnection, layer: int, probe: FittedProbe, settings: EvalSettings
) -> list[FeatureInfo]:
    """The report's features: the probe's non-zero weights by magnitude, at most ``report_max_features``."""
    top = probe.top_features(settings.report_max_features)
    if not top:
        return []
    ids = [f for f, _ in top]
    params = {"layer": int(layer), "feature_ids": ids}
    views = view_names(con)
    stats: dict[int, dict[str, Any]] = {}
    if "feature_stats" in views:
        for r in _pl(relation(con, "probes/feature_selectivity", params)).iter_rows(named=True):
            stats[int(r.pop("feature_id"))] = r
    descriptions: dict[int, str] = {}
    if "descriptions" in views:
        for r in _pl(relation(con, "probes/feature_descriptions", params)).iter_rows(named=True):
            descriptions[int(r["feature_id"])] = str(r["description"])
    classes: dict[int, dict[str, Any]] = {}
    if "classifications" in views:
        for r in _pl(relation(con, "probes/feature_classifications", params)).iter_rows(named=True):
            classes[int(r.pop("feature_id"))] = r
    firing: dict[int, list[dict[str, Any]]] = {}
    for r in _pl(relation(con, "probes/feature_firing", params)).iter_rows(named=True):
        firing.setdefault(int(r.pop("feature_id")), []).append(r)
    windows: dict[int, list[Window]] = {}
    if "tokens" in views:
        cur = _cursor_with_empty(con, {"token_activations": _TOKEN_ACTS_EMPTY})
        try:
            wdf = _pl(
                relation(
                    cur,
                    "probes/feature_windows",
                    {**params, "top_k": settings.report_top_windows, "window": settings.report_window_tokens},
                )
            )
        finally:
            cur.close()
        for (fid, rank), g in wdf.group_by(["feature_id", "rank"], maintain_order=True):
            first = g.row(0, named=True)
            windows.setdefault(int(fid), []).append(  # type: ignore[arg-type]
                Window(
                    rank=int(rank),  # type: ignore[arg-type]
                    dataset=str(first["dataset"]),
                    sample_id=int(first["sample_id"]),
                    role=str(first["role"]),
                    label=str(first["label"]),
                    is_positive=first["is_positive"],
                    max_act=float(first["max_act"]),
                    argmax_token=int(first["argmax_token"]),
                    n_tokens=int(first["n_tokens"]),
                    tokens=[
                        WindowToken(int(p), str(t) if t is not None else "", float(a))
                        for p, t, a in zip(g["token_pos"], g["token_text"], g["act"], strict=True)
                    ],
                )
            )
    return [
        FeatureInfo(
            feature_id=f,
            weight=w,
            stats=stats.get(f, {}),
            description=descriptions.get(f),
            classification=classes.get(f),
            firing=firing.get(f, []),
            windows=sorted(windows.get(f, []), key=lambda x: x.rank),
        )
        for f, w in top
    ]


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.window { font-family: ui-monospace, monospace; white-space: pre-wrap; background: #fafafa;
          border: 1px solid #ddd; padding: 6px; margin: 4px 0 12px; line-height: 1.7; }
.tok { border-radius: 2px; }
.peak { outline: 2px solid #c00; }
.muted { color: #777; }
"""


def _e(v: Any) -> str:
    return html.escape(fmt_cell(v), quote=True)


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], links: Mapping[str, str] | None = None) -> str:
    """An HTML table, every cell escaped; ``links`` maps a column to an href template with ``{value}``."""
    links = links or {}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            text = _e(r.get(c))
            if c in links and r.get(c) is not None:
                href = html.escape(links[c].format(value=r[c]), quote=True)
                text = f'<a href="{href}">{text}</a>'
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def render_window(w: Window) -> str:
    """One window as HTML: tokens escaped, shaded by the feature's activation, the peak outlined."""
    peak = max([t.act for t in w.tokens] + [w.max_act, 1e-12])
    parts = []
    if w.tokens and w.tokens[0].token_pos > 0:
        parts.append('<span class="muted">… </span>')
    for t in w.tokens:
        cls = "tok peak" if t.token_pos == w.argmax_token else "tok"
        style = ""
        if t.act > 0:
            alpha = 0.15 + 0.85 * min(1.0, t.act / peak)
            style = f' style="background: rgba(255, 140, 0, {alpha:.2f})"'
        title = html.escape(f"pos {t.token_pos}, act {t.act:.3f}", quote=True)
        parts.append(f'<span class="{cls}"{style} title="{title}">{html.escape(t.text)}</span>')
    if w.tokens and w.tokens[-1].token_pos < w.n_tokens - 1:
        parts.append('<span class="muted"> …</span>')
    return "".join(parts)


def feature_page(info: FeatureInfo, layer: int, probe_name: str) -> str:
    title = f"Feature {info.feature_id} (layer {layer})"
    body = [f"<p><a href=\"../../index.html\">← report for layer {layer}</a></p>", f"<h1>{html.escape(title)}</h1>"]
    desc = html.escape(info.description) if info.description else '<span class="muted">no description yet</span>'
    body.append(f"<p><b>Description:</b> {desc}</p>")
    if info.classification:
        c = info.classification
        body.append(
            f"<p><b>Relevance:</b> score {_e(c.get('score'))} / 10, category {_e(c.get('category'))}, "
            f"themes {_e(c.get('themes'))}</p>"
        )
    else:
        body.append('<p><b>Relevance:</b> <span class="muted">not classified</span></p>')
    body.append(
        f"<p><b>Weight</b> in <code>{html.escape(probe_name)}</code> (standardised feature): "
        f"{info.weight:+.4f}</p>"
    )
    if info.stats:
        body.append("<h2>Training statistics</h2>")
        body.append(_html_table([info.stats], list(info.stats)))
    body.append("<h2>Firing rates per dataset</h2>")
    body.append(
        _html_table(
            info.firing, ["dataset", "role", "n", "firing_rate", "firing_rate_pos", "firing_rate_neg", "mean_max_act"]
        )
    )
    body.append("<h2>Top windows</h2>")
    if not info.windows:
        body.append('<p class="muted">no token windows (tokens or token_activations not in the lake)</p>')
    for w in info.windows:
        body.append(
            f"<p>#{w.rank}: <b>{html.escape(w.dataset)}</b> sample {w.sample_id} ({html.escape(w.role)}, "
            f"label {html.escape(w.label)}), max act {w.max_act:.3f} at token {w.argmax_token}</p>"
            f'<div class="window">{render_window(w)}</div>'
        )
    return _page(title, "\n".join(body))


def feature_page_name(feature_id: int) -> str:
    return f"feature_{int(feature_id)}.html"


def _explanation_score_rows(lake: Lake, layer: int) -> list[dict[str, Any]]:
    """The layer's ``stats/explanation_scores`` rows (written by the describe stage's scorers), if any."""
    if not lake.exists("stats/explanation_scores", layer=layer):
        return []
    return lake.read("stats/explanation_scores", layer=layer).select(["feature_id", "scorer", "score", "status"]).to_pylist()


def report_dir(lake: Lake, layer: int) -> LakePath:
    return lake.base / REPORT_DIR / f"layer={int(layer)}"


def write_report(
    lake: Lake,
    layer: int,
    *,
    provenance: Mapping[str, Any],
    probes_table: pa.Table | pl.DataFrame,
    metrics: pa.Table | pl.DataFrame,
    cross: pa.Table | pl.DataFrame,
    figures: Mapping[str, bytes],
    features: Sequence[FeatureInfo],
    best_probe_name: str | None,
    lodo: pa.Table | pl.DataFrame | None = None,
    layers: pl.DataFrame | None = None,
) -> LakePath:
    """Write ``report/layer=L/index.html`` and its files under ``report/layer=L/probes/``.

    The ``probes/`` folder (figures, one page per feature) is built aside and renamed into place, then
    ``index.html`` is written aside and renamed over the old one. Other files of the folder are left alone.
    On S3 the ``probes/`` folder is built locally and uploaded (each object whole, stale pages deleted),
    then ``index.html`` is uploaded last in one PUT.
    """
    base = report_dir(lake, layer)
    scorer_rows = _explanation_score_rows(lake, layer)
    if scorer_rows:
        from dagster_project.lib.scorers import scorer_figure

        figures = {**figures, "explanation_scores": scorer_figure(
            scorer_rows, f"Description scores by scorer, layer {int(layer)} (held-out windows)")}
    with staged_dir(base / REPORT_FILES) as files_dir:
        files_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = files_dir.parent / f".tmp-{REPORT_FILES}-{uuid.uuid4().hex[:8]}"
        (tmp / "figures").mkdir(parents=True)
        (tmp / "features").mkdir()
        try:
            for name, png in figures.items():
                (tmp / "figures" / f"{name}.png").write_bytes(png)
            for info in features:
                (tmp / "features" / feature_page_name(info.feature_id)).write_text(
                    feature_page(info, layer, best_probe_name or ""), encoding="utf-8"
                )
            replace_dir(tmp, files_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def frame(t: pa.Table | pl.DataFrame) -> pl.DataFrame:
        out = t if isinstance(t, pl.DataFrame) else pl.from_arrow(t)
        assert isinstance(out, pl.DataFrame)
        return out

    pr, m, cr = frame(probes_table), frame(metrics), frame(cross)
    body = [f"<h1>Probes, layer {int(layer)}</h1>"]
    prov = {k: provenance.get(k) for k in ("profile", *PROVENANCE_KEYS, "train_datasets") if k in provenance}
    body.append(_html_table([prov], list(prov)))
    body.append("<h2>Recommended SAE probe vs dense baseline</h2>")
    head_rows = []
    for r in m.filter(pl.col("is_best")).sort(["eval_role", "eval_dataset", "kind"]).iter_rows(named=True):
        head_rows.append({**r, "auroc [95% CI]": _auroc_cell(r)})
    body.append(f"<p><b>Recommendation.</b> {html.escape(generalisation.recommendation(pr, m, lodo))}</p>")
    if layers is not None and layers.height > 1:
        body.append("<h3>Across layers (best probe of each layer by its selection score)</h3>")
        body.append(_html_table(list(layers.iter_rows(named=True)), layers.columns))
    body.append(
        _html_table(
            head_rows,
            ["kind", "probe", "eval_dataset", "eval_role", "auroc [95% CI]", "accuracy", "tpr_at_1pct_fpr",
             "fpr_at_1pct_fpr", "detection_rate", "threshold_source", "n_pos", "n_neg"],
        )
    )
    held = generalisation.held_out_table(lodo)
    body.append("<h2>Held-out groups (leave one group out)</h2>")
    if held.height:
        body.append("<p>Each row: the probe's configuration refitted without that group (and without its near "
                    "duplicates), features re-chosen without it, scored on it. A one-class group is scored against "
                    "the control sets' check half (<code>vs control</code>).</p>")
        body.append(_html_table(list(held.iter_rows(named=True)), held.columns))
    else:
        body.append('<p class="muted">none: the training mixture has fewer than two groups that can be held out, '
                    "so the probes were chosen by training cross-validation</p>")
    fam = generalisation.family_table(pr, m)
    if fam.height:
        body.append("<h2>In distribution vs out of distribution, per probe family</h2>")
        body.append(_html_table(list(fam.iter_rows(named=True)), fam.columns))
    ctl = generalisation.control_table(m)
    if ctl.height:
        body.append("<h2>Control sets: false positives at the chosen threshold (check half)</h2>")
        body.append(_html_table(list(ctl.iter_rows(named=True)), ctl.columns))
    if scorer_rows:
        from dagster_project.lib.scorers import scorer_summary

        body.append("<h2>How well the descriptions explain their features</h2>")
        body.append("<p>Each selected feature's description scored on held-out windows it was not written from: "
                    "<b>detection</b> (which windows fire, activating ones from every activation decile), "
                    "<b>fuzzing</b> (whether marked tokens are the firing ones or decoys) and <b>embedding</b> "
                    "(MiniLM similarity of description and window, AUROC; no model call). 0.5 is chance. "
                    "The <code>explanation_scores</code> view has every row; the figure "
                    "<code>explanation_scores</code> below plots them.</p>")
        summary = scorer_summary(scorer_rows)
        body.append(_html_table(summary, ["scorer", "metric", "ok", "failed", "mean", "std", "q25", "median", "q75"]))
    body.append("<h2>Figures</h2>")
    for name in figures:
        src = html.escape(f"{REPORT_FILES}/figures/{name}.png", quote=True)
        body.append(f'<h3>{html.escape(name)}</h3><img src="{src}" alt="{html.escape(name, quote=True)}">')
    body.append(f"<h2>Features of the best SAE probe ({len(features)})</h2>")
    feat_rows = [
        {
            "feature_id": f.feature_id,
            "weight": f.weight,
            "selectivity": f.stats.get("selectivity"),
            "relevance": (f.classification or {}).get("score"),
            "description": f.description,
        }
        for f in features
    ]
    body.append(
        _html_table(
            feat_rows,
            ["feature_id", "weight", "selectivity", "relevance", "description"],
            links={"feature_id": f"{REPORT_FILES}/features/feature_{{value}}.html"},
        )
    )
    body.append("<h2>Cross-distribution (best configurations refitted per dataset)</h2>")
    body.append(
        _html_table(
            [{**r, "auroc [95% CI]": _auroc_cell(r)} for r in cr.iter_rows(named=True)],
            ["kind", "train_dataset", "eval_dataset", "eval_role", "in_distribution", "auroc [95% CI]", "cv_std",
             "detection_rate", "n_pos", "n_neg"],
        )
    )
    body.append("<h2>All probes (by rank: held-out groups, else training CV)</h2>")
    cols = [c for c in ("probe_id", "kind", "feature_set", "penalty", "C", "transform", "n_features", "n_nonzero",
                        "rank", "selection_score", "lodo_worst_auroc", "lodo_mean_auroc", "cv_auroc", "cv_std",
                        "cv_rank", "degenerate", "converged") if c in pr.columns]
    body.append(_html_table(list(pr.sort("rank" if "rank" in pr.columns else "cv_rank").iter_rows(named=True)), cols))
    body.append("<h2>All evaluations</h2>")
    body.append(
        _html_table(
            [{**r, "auroc [95% CI]": _auroc_cell(r)} for r in m.iter_rows(named=True)],
            ["probe", "kind", "eval_dataset", "eval_role", "auroc [95% CI]", "accuracy", "tpr_at_1pct_fpr",
             "detection_rate", "mean_score", "n", "by_label"],
        )
    )
    page = _page(f"featurelake probes, layer {int(layer)}", "\n".join(body))
    return write_bytes(base / "index.html", page.encode("utf-8"))
