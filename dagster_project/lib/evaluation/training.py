"""Training the probes of one layer and saving them: :func:`train_probes` (the SAE grid and the dense
baselines on the training mixture), :func:`save_probes` / :func:`load_saved_probes` under
``probes_saved/layer=L``, and the ``lodo_metrics`` rows."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from dagster_project.lib.datasets import parse_registry
from dagster_project.lib.evaluation.data import (
    LayerData,
    read_classification_scores,
    read_selectivity,
    resolve_train_datasets,
)
from dagster_project.lib.evaluation.settings import (
    CALIBRATION,
    CHECK,
    PROVENANCE_KEYS,
    EvalSettings,
    EvaluationError,
)
from dagster_project.lib.lake import (
    Lake,
    LakePath,
    lake_path,
    local_copy,
    staged_dir,
)
from dagster_project.lib.probes import (
    Designs,
    FittedProbe,
    ProbeResult,
    ProbeSpec,
    SelectionPlan,
    active_feature_ids,
    feature_sets,
    load_probe,
    rank_key,
    search_dense_baselines,
    search_probes,
    search_token_probes,
    select_columns,
    token_dense_specs,
    token_specs,
)
from dagster_project.lib.probes.fitted import written_aside
from dagster_project.lib.provenance_record import ProvenanceRecord
from dagster_project.lib.selection import group_weights, lodo_splits, near_duplicate_clusters
from dagster_project.lib.tables import LODO_SCHEMA, PROBES_SCHEMA

logger = logging.getLogger(__name__)


SAVED_DIR = "probes_saved"
SAVED_MARKER = "config.json"  # written last into probes_saved/layer=L (uploaded last on S3)


_PROBE_ID = re.compile(r"^[A-Za-z0-9_.+-]{1,200}$")


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


def registry_control_negatives() -> tuple[str, ...]:
    """Control sets the registry marks ``train_as_negatives`` (their calibration half also trains)."""
    return tuple(sorted(n for n, s in parse_registry().items() if s.role == "control" and s.train_as_negatives))


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
    total = trained.balance["total"]
    rows: list[dict[str, Any]] = []
    with written_aside(final) as tmp:
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
    return rows


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


def best_provenance(probes_table: pa.Table) -> dict[str, Any]:
    """The provenance saved with the layer's best probe (model, SAE, hook, config hash, profile, ...)."""
    loaded = best_probes(load_saved_probes(probes_table.filter(pc.field("is_best"))))
    p = loaded.get("sae") or next(iter(loaded.values()), None)
    return dict(p.probe.provenance) if p is not None else {}


def check_probes_match(layer: int, loaded: Sequence[LoadedProbe], current: Mapping[str, Any]) -> None:
    """The saved probes were trained on activations like the layer's current ones (else rerun ``probes``)."""
    now = ProvenanceRecord.from_dict(current)
    differs = {p.probe_id: ProvenanceRecord.from_dict(p.probe.provenance).differences(now, PROVENANCE_KEYS)
               for p in loaded}
    stale = [p.probe_id for p in loaded if current and differs[p.probe_id]]
    if stale:
        diff = "; ".join(f"{k}: probe has {a!r}, lake has {b!r}" for k, (a, b) in differs[stale[0]].items())
        raise EvaluationError(
            f"{len(stale)} saved probes of layer {layer} were trained on activations of another model/SAE/config "
            f"than the layer's activations now ({diff}): materialize probes for layer {layer} again"
        )
