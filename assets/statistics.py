"""Statistics: class selectivity, activation profiles, feature selection and cross-distribution transfer.

Every asset here is partitioned by layer only. The SQL in ``sql/stats`` does the work over the lake's
DuckDB views (``dagster_project.lib.stats``); each asset writes ``stats/<table>/layer=L/part-0.parquet``
(the ``layer`` column lives only in the path) and reports previews and PNG plots as metadata. Plots are also
saved under ``<lake>/<profile>/report/layer=L/``.

``activation_profile`` and the cross-distribution tables hold one row per dataset (or pair of datasets) of
the layer rather than being partitioned by ``layer x dataset``: they compare datasets with each other, so
they are computed together from every dataset that has activations at the layer. Rematerialize a layer
after adding a dataset.
"""

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from dagster_project.config import StatsConfig
from dagster_project.lib import plots_stats, stats
from dagster_project.lib.catalog import table_globs, views_connection
from dagster_project.lib.lake import Lake, LakeError, LakePath, write_bytes
from dagster_project.lib.markdown import md_table, png_md
from dagster_project.partitions import layer_partitions
from dagster_project.provenance import check_layer, partitions
from dagster_project.resources import LakeResource, SAEResource
from dagster_project.table_metadata import column_schema_metadata, table_asset

GROUP = "statistics"
KINDS = {"duckdb", "parquet"}


# ------------------------------------------------------------------------------------------ helpers


# A layer-partitioned statistics asset writing the lake table it names.
_layer_asset = functools.partial(table_asset, partitions_def=layer_partitions, group_name=GROUP, kinds=KINDS)


def sae_width(sae: SAEResource, lake: Lake, layer: int) -> int:
    """Number of features of the layer's SAE: the configured width when trained here, else the loaded SAE's."""
    return sae.n_features(layer, lake)


def _connect(
    lake: Lake, layer: int, needs: Sequence[str] = ("samples", "activations")
) -> duckdb.DuckDBPyConnection:
    """The lake's views, after checking that the tables the SQL reads exist (activations at ``layer``, made
    with the current profile: ``provenance.check_layer``)."""
    missing = [t for t in needs if t not in table_globs(lake)]
    if "activations" in needs and "activations" not in missing and not partitions(lake, layer, ("activations",)):
        missing.append(f"activations for layer {layer}")
    if missing:
        raise dg.Failure(
            f"lake {lake.base} has no {', '.join(missing)}: materialize samples and activations first"
        )
    if "activations" in needs:
        try:
            check_layer(lake, layer)
        except LakeError as e:
            raise dg.Failure(str(e)) from e
    return views_connection(lake)


def read_stat(lake: Lake, name: str, layer: int) -> pa.Table:
    """``stats/<name>`` of one layer, with its ``layer`` column put back (the SQL filters on it)."""
    try:
        table = lake.read(f"stats/{name}", layer=layer)
    except LakeError as e:
        raise dg.Failure(f"{name} of layer {layer} is not in the lake: materialize it first ({e})") from e
    return table.add_column(0, "layer", pa.array([layer] * table.num_rows, pa.int32()))


def recorded(lake: Lake, name: str, layer: int) -> dict[str, Any]:
    """The record ``stats/<name>`` of ``layer`` was written with (its Parquet ``featurelake`` metadata)."""
    try:
        return lake.read_meta(f"stats/{name}", layer=layer)
    except LakeError as e:
        raise dg.Failure(f"{name} of layer {layer} is not in the lake: materialize it first ({e})") from e


def write_stat(lake: Lake, name: str, table: pa.Table, layer: int, meta: dict[str, Any]) -> LakePath:
    return lake.write(f"stats/{name}", table.drop_columns(["layer"]), layer=layer, meta=meta)


def save_png(lake: Lake, layer: int, name: str, png: bytes) -> LakePath:
    """Write ``report/layer=L/<name>.png`` atomically (aside and renamed; one PUT on S3)."""
    return write_bytes(lake.base / "report" / f"layer={layer}" / f"{name}.png", png)


def plot_metadata(lake: Lake, layer: int, name: str, png: bytes) -> dict[str, dg.MetadataValue]:
    path = save_png(lake, layer, name, png)
    return {name: dg.MetadataValue.md(png_md(png, name)), f"{name}_png": dg.MetadataValue.path(str(path))}


SIGNIFICANCE_LEVELS = (0.01, 0.05, 0.1)


def n_below(values: pa.ChunkedArray, alpha: float) -> int:
    """How many (non-NULL) values are below ``alpha``."""
    return int(pc.sum(pc.fill_null(pc.less(values, alpha), False).cast(pa.int64())).as_py() or 0)


def top_by_abs_selectivity(table: pa.Table, n: int) -> pa.Table:
    active = table.filter(pc.fill_null(table["is_active"], False))
    active = active.append_column("abs_selectivity", pc.abs(active["selectivity"]))
    return active.sort_by([("abs_selectivity", "descending"), ("feature_id", "ascending")]).slice(0, n)


# ------------------------------------------------------------------------------------------ assets


@_layer_asset("stats/feature_stats", deps=["activations"])
def feature_stats(
    context: dg.AssetExecutionContext, config: StatsConfig, lake: LakeResource
) -> dg.MaterializeResult:
    """Per-feature class statistics of one layer over the training datasets (``train_datasets``, default every
    train-role dataset, pooled): class means of max_act (inactive samples count as 0), firing frequencies,
    peak activation and selectivity = (pos_mean - neg_mean) / (pos_mean + neg_mean), also on mean_act; and
    significance: ``p_value``, a two-sided Mann-Whitney U test of positives vs negatives on max_act (absent
    rows as tied zeros), and ``q_value``, its Benjamini-Hochberg adjustment over the layer's features.
    Writes ``stats/feature_stats/layer=L``, recording ``min_act`` and the resolved training datasets."""
    layer = int(context.partition_key)
    lk = lake.lake
    train = list(config.train_datasets) or None
    con = _connect(lk, layer)
    try:
        classes = stats.run_check(con, "train_classes", {"train_datasets": train})
        resolved = classes.column("dataset").to_pylist()
        unknown = [r["dataset"] for r in classes.to_pylist() if not r["in_samples"]]
        if unknown:
            raise dg.Failure(
                f"configured training datasets {', '.join(unknown)} have no samples in the lake: "
                "fix train_datasets or materialize their samples"
            )
        no_acts = [d for d in resolved if not lk.exists("activations", layer, d)]
        if no_acts:
            raise dg.Failure(
                f"training datasets {', '.join(no_acts)} have no activations at layer {layer}: materialize "
                f"activations for partitions {', '.join(f'{d}|{layer}' for d in no_acts)} first"
            )
        context.log.info(f"layer {layer}: class statistics over {resolved or '(no training dataset)'}")
        table = stats.feature_stats(con, layer, config.min_act, train)
    finally:
        con.close()
    meta = {
        "layer": layer,
        "min_act": config.min_act,
        "train_datasets": resolved,
        "train_datasets_param": train,
    }
    path = write_stat(lk, "feature_stats", table, layer, meta)
    n_active = int(pc.sum(pc.fill_null(table["is_active"], False).cast(pa.int64())).as_py() or 0)
    significant = {str(alpha): n_below(table["q_value"], alpha) for alpha in SIGNIFICANCE_LEVELS}
    context.log.info(
        f"layer {layer}: {table.num_rows} features with activations, {n_active} active, "
        f"{significant['0.05']} with BH q < 0.05 -> {path}"
    )
    png = plots_stats.selectivity_histogram(
        table, min_selectivity=config.min_selectivity, title=f"Selectivity of active features (layer {layer})"
    )
    top = top_by_abs_selectivity(table, 10)
    counts = classes.to_pylist()
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.num_rows,
            "rows": table.num_rows,
            "active_features": n_active,
            "train_datasets": dg.MetadataValue.json(resolved),
            "n_positive": sum(r["n_positive"] for r in counts),
            "n_negative": sum(r["n_negative"] for r in counts),
            "min_act": config.min_act,
            "significant_features": dg.MetadataValue.json(significant),
            "top_10": dg.MetadataValue.md(
                md_table(
                    top,
                    ["feature_id", "selectivity", "pos_mean", "neg_mean", "pos_freq", "neg_freq", "max_act"]
                    + ["p_value", "q_value"],
                )
            ),
            **plot_metadata(lk, layer, "selectivity_histogram", png),
            "path": dg.MetadataValue.path(str(path)),
        }
    )


@_layer_asset("stats/activation_profile", deps=["activations"])
def activation_profile(
    context: dg.AssetExecutionContext, lake: LakeResource, sae: SAEResource
) -> dg.MaterializeResult:
    """How dense and how strong one layer's SAE activations are on each dataset: active features per sample
    (mean, median, p90, samples with none), max_act magnitude (mean, p50, p99), features active and dead
    (against the SAE's width). One row per dataset with activations at the layer (partitioned by layer only:
    the rows are meant to be compared side by side)."""
    layer = int(context.partition_key)
    lk = lake.lake
    width = sae_width(sae, lk, layer)
    con = _connect(lk, layer, ("samples", "tokens", "activations"))
    try:
        table = stats.activation_profile(con, layer, width)
    finally:
        con.close()
    path = write_stat(lk, "activation_profile", table, layer, {"layer": layer, "sae_width": width})
    context.log.info(f"layer {layer}: profiled {table.num_rows} datasets (SAE width {width}) -> {path}")
    png = plots_stats.active_features_bar(table)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.num_rows,
            "datasets": dg.MetadataValue.json(table.column("dataset").to_pylist()),
            "sae_width": width,
            "profile": dg.MetadataValue.md(md_table(table.drop_columns(["layer"]))),
            **plot_metadata(lk, layer, "active_features", png),
            "path": dg.MetadataValue.path(str(path)),
        }
    )


@_layer_asset("stats/selected_features", deps=["feature_stats"])
def selected_features(
    context: dg.AssetExecutionContext, config: StatsConfig, lake: LakeResource
) -> dg.MaterializeResult:
    """The class-selective features of one layer worth describing and probing: active features with
    |selectivity| >= ``min_selectivity`` (and ``min_freq`` in the class they prefer; positive-preferring only
    unless ``keep_negative``; with ``q_value < fdr_alpha`` when that is set), ranked by |selectivity|, at most
    ``max_features``, each with a ``reason``. The effective config is stored in the Parquet metadata."""
    layer = int(context.partition_key)
    lk = lake.lake
    fs = read_stat(lk, "feature_stats", layer)
    rec = recorded(lk, "feature_stats", layer)
    effective = {
        "min_selectivity": config.min_selectivity,
        "min_freq": config.min_freq,
        "keep_negative": config.keep_negative,
        "max_features": config.max_features,
        "fdr_alpha": config.fdr_alpha,
        "min_act": rec.get("min_act"),
        "train_datasets": rec.get("train_datasets"),
    }
    con = duckdb.connect()
    try:
        table = stats.selected_features(
            con,
            layer,
            config.min_selectivity,
            config.min_freq,
            config.keep_negative,
            config.max_features,
            stats=fs,
            fdr_alpha=config.fdr_alpha,
        )
    except ValueError as e:
        raise dg.Failure(str(e)) from e
    finally:
        con.close()
    path = write_stat(lk, "selected_features", table, layer, {"layer": layer, "config": effective})
    directions = table.column("direction").to_pylist()
    context.log.info(f"layer {layer}: selected {table.num_rows} of {fs.num_rows} features -> {path}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.num_rows,
            "rows": table.num_rows,
            "positive": directions.count("positive"),
            "negative": directions.count("negative"),
            "config": dg.MetadataValue.json(effective),
            "top_10": dg.MetadataValue.md(
                md_table(
                    table,
                    ["rank", "feature_id", "direction", "selectivity", "freq", "pos_mean", "neg_mean"]
                    + ["q_value"],
                    10,
                )
            ),
            "path": dg.MetadataValue.path(str(path)),
        }
    )


def _stat_spec(name: str, deps: list[str], description: str) -> dg.AssetSpec:
    """One table of the cross-distribution step, ``stats/<name>``, with its registered columns."""
    return dg.AssetSpec(name, metadata=column_schema_metadata(f"stats/{name}"), deps=deps, kinds=KINDS,
                        description=description)


@dg.multi_asset(
    name="cross_distribution",
    partitions_def=layer_partitions,
    group_name=GROUP,
    specs=[
        _stat_spec("cross_distribution", ["activations"],
                   "Jaccard overlap of the active feature sets of every ordered pair of datasets."),
        _stat_spec("dataset_selectivity", ["activations"],
                   "Per (dataset, feature) selectivity on every dataset with both classes."),
        _stat_spec("selectivity_rank_correlation", ["activations"],
                   "Spearman / Pearson correlation of per-dataset selectivity, per dataset pair."),
        _stat_spec("selected_transfer", ["activations", "selected_features"],
                   "Per dataset and direction: how many selected features fire, how strongly "
                   "relative to the training datasets."),
    ],
)
def cross_distribution(
    context: dg.AssetExecutionContext, config: StatsConfig, lake: LakeResource
) -> Iterator[dg.MaterializeResult]:
    """Does what the training datasets taught transfer to the other datasets of the layer? Active-set overlap
    (``min_act``), per-dataset selectivity and its rank agreement, and the selected features' firing on each
    dataset against the training datasets ``selected_features`` recorded. Tables ``stats/<asset>/layer=L``."""
    layer = int(context.partition_key)
    lk = lake.lake
    selected = read_stat(lk, "selected_features", layer)
    train = recorded(lk, "selected_features", layer).get("config", {}).get("train_datasets") or None
    con = _connect(lk, layer)
    try:
        tables = {
            "cross_distribution": stats.cross_distribution(con, layer, config.min_act),
            "dataset_selectivity": stats.dataset_selectivity(con, layer, config.min_act),
            "selectivity_rank_correlation": stats.rank_correlation(con, layer, config.min_act),
            "selected_transfer": stats.selected_transfer(con, layer, train, selected=selected),
        }
    finally:
        con.close()
    meta = {"layer": layer, "min_act": config.min_act, "train_datasets": train}
    paths = {name: write_stat(lk, name, t, layer, meta) for name, t in tables.items()}
    for name, t in tables.items():
        context.log.info(f"layer {layer}: {name} {t.num_rows} rows -> {paths[name]}")

    def result(name: str, **extra: Any) -> dg.MaterializeResult:
        t = tables[name]
        return dg.MaterializeResult(
            asset_key=name,
            metadata={
                "dagster/row_count": t.num_rows,
                "path": dg.MetadataValue.path(str(paths[name])),
                **extra,
            },
        )

    cross = tables["cross_distribution"]
    yield result(
        "cross_distribution",
        jaccard=dg.MetadataValue.md(md_table(cross.drop_columns(["layer"]))),
        **plot_metadata(lk, layer, "jaccard_heatmap", plots_stats.jaccard_heatmap(cross)),
    )
    ds = tables["dataset_selectivity"]
    yield result(
        "dataset_selectivity", datasets=dg.MetadataValue.json(sorted(set(ds.column("dataset").to_pylist())))
    )
    yield result(
        "selectivity_rank_correlation",
        correlations=dg.MetadataValue.md(
            md_table(tables["selectivity_rank_correlation"].drop_columns(["layer"]))
        ),
    )
    yield result(
        "selected_transfer",
        transfer=dg.MetadataValue.md(md_table(tables["selected_transfer"].drop_columns(["layer"]))),
    )


# ------------------------------------------------------------------------------------------ checks


def _outcome(outcome: stats.CheckOutcome, **metadata: Any) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=outcome.passed,
        description=outcome.description,
        metadata={"violations": outcome.n_violations, **metadata},
    )


def _missing(name: str, layer: int, e: Exception) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, description=f"{name} of layer {layer} is not in the lake ({e})")


@dg.asset_check(asset=feature_stats, partitions_def=layer_partitions, blocking=True)
def feature_stats_non_empty(
    context: dg.AssetCheckExecutionContext, lake: LakeResource
) -> dg.AssetCheckResult:
    """At least one feature is active (max_act >= min_act) on the training datasets."""
    layer = int(context.partition_key)
    try:
        table = read_stat(lake.lake, "feature_stats", layer)
    except dg.Failure as e:
        return _missing("feature_stats", layer, e)
    n_active = int(pc.sum(pc.fill_null(table["is_active"], False).cast(pa.int64())).as_py() or 0)
    return dg.AssetCheckResult(
        passed=n_active > 0,
        description=f"{table.num_rows} features with activations, {n_active} active on the training datasets",
        metadata={"rows": table.num_rows, "active_features": n_active},
    )


@dataclass(frozen=True)
class CheckInputs:
    """What a SQL check of one layer has read: the layer's feature_stats table, or its record (the Parquet
    ``featurelake`` metadata) for a check on how it was computed, and the SAE width when the check needs it."""

    layer: int
    feature_stats: pa.Table | None = None
    record: dict[str, Any] | None = None
    sae_width: int | None = None


def _layer_param(inputs: CheckInputs) -> dict[str, Any]:
    return {"layer": inputs.layer}


def _no_metadata(inputs: CheckInputs, outcome: stats.CheckOutcome) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class SQLCheck:
    """A blocking check on ``feature_stats`` that ``sql/checks/<sql>.sql`` decides (``stats.evaluate_check``).

    The SQL runs over the layer's feature_stats table alone, or, when ``views`` names lake tables, over the
    lake's views (checked first: :func:`_connect`). ``on_record`` reads feature_stats' record instead of its
    rows; ``needs_sae`` adds the SAE width (and the ``sae`` resource). ``params`` builds the SQL's ``$params``
    and ``metadata`` the result's metadata beyond ``violations``.
    """

    name: str
    sql: str
    description: str
    views: tuple[str, ...] = ()
    on_record: bool = False
    needs_sae: bool = False
    params: Callable[[CheckInputs], dict[str, Any]] = _layer_param
    metadata: Callable[[CheckInputs, stats.CheckOutcome], dict[str, Any]] = _no_metadata


def run_sql_check(spec: SQLCheck, lake: Lake, sae: SAEResource | None, layer: int) -> dg.AssetCheckResult:
    """Read what ``spec`` needs for ``layer``, run its SQL and judge the rows (a missing table fails it)."""
    try:
        record = lake.read_meta("stats/feature_stats", layer=layer) if spec.on_record else None
        table = None if spec.on_record else read_stat(lake, "feature_stats", layer)
    except (dg.Failure, LakeError) as e:
        return _missing("feature_stats", layer, e)
    width = sae_width(sae, lake, layer) if sae is not None else None
    inputs = CheckInputs(layer, table, record, width)
    con = _connect(lake, layer, spec.views) if spec.views else duckdb.connect()
    tables = None if spec.views or table is None else {"feature_stats": table}
    try:
        outcome = stats.evaluate_check(con, spec.sql, spec.params(inputs), tables)
    finally:
        con.close()
    return _outcome(outcome, **spec.metadata(inputs, outcome))


def sql_check(spec: SQLCheck) -> dg.AssetChecksDefinition:
    """The asset check ``spec`` describes, on feature_stats, per layer, blocking."""

    @dg.asset_check(
        name=spec.name,
        asset=feature_stats,
        partitions_def=layer_partitions,
        blocking=True,
        description=spec.description,
        required_resource_keys={"lake", "sae"} if spec.needs_sae else {"lake"},
    )
    def check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        sae = context.resources.sae if spec.needs_sae else None
        return run_sql_check(spec, context.resources.lake.lake, sae, int(context.partition_key))

    return check


def _id_range_params(inputs: CheckInputs) -> dict[str, Any]:
    return {"layer": inputs.layer, "sae_width": inputs.sae_width}


def _id_range_metadata(inputs: CheckInputs, outcome: stats.CheckOutcome) -> dict[str, Any]:
    table = inputs.feature_stats
    max_id = pc.max(table["feature_id"]).as_py() if table is not None and table.num_rows else None
    return {"sae_width": inputs.sae_width, "max_feature_id": -1 if max_id is None else int(max_id)}


def _train_classes_params(inputs: CheckInputs) -> dict[str, Any]:
    return {"train_datasets": (inputs.record or {}).get("train_datasets_param")}


def _train_classes_metadata(inputs: CheckInputs, outcome: stats.CheckOutcome) -> dict[str, Any]:
    return {"counts": dg.MetadataValue.md(md_table(outcome.rows))}


# one check per file of sql/checks (keyed by the file's name)
SQL_CHECKS = {
    "feature_stats_nan": SQLCheck(
        "feature_stats_no_nan",
        "feature_stats_nan",
        "No statistic is NaN or infinite (NULL selectivity means a missing class: see the train-classes check).",
    ),
    "selectivity_range": SQLCheck(
        "feature_stats_selectivity_range",
        "selectivity_range",
        "Selectivity (on max_act and on mean_act) lies in [-1, 1]; outside means negative activations.",
    ),
    "feature_id_range": SQLCheck(
        "feature_stats_feature_id_range",
        "feature_id_range",
        "Every feature id of the layer's activations (so of feature_stats) is below the SAE width.",
        views=("activations",),
        needs_sae=True,
        params=_id_range_params,
        metadata=_id_range_metadata,
    ),
    "train_classes": SQLCheck(
        "feature_stats_train_classes",
        "train_classes",
        "The training datasets feature_stats pooled hold both positive and negative samples (else selectivity\n"
        "is undefined); a failure names the datasets and their class counts.",
        views=("samples",),
        on_record=True,
        params=_train_classes_params,
        metadata=_train_classes_metadata,
    ),
}

feature_stats_no_nan = sql_check(SQL_CHECKS["feature_stats_nan"])
feature_stats_selectivity_range = sql_check(SQL_CHECKS["selectivity_range"])
feature_stats_feature_id_range = sql_check(SQL_CHECKS["feature_id_range"])
feature_stats_train_classes = sql_check(SQL_CHECKS["train_classes"])


@dg.asset_check(asset=selected_features, partitions_def=layer_partitions, blocking=False)
def selected_features_non_empty(
    context: dg.AssetCheckExecutionContext, lake: LakeResource
) -> dg.AssetCheckResult:
    """At least one feature was selected (a warning: lower ``min_selectivity`` if none)."""
    layer = int(context.partition_key)
    try:
        table = read_stat(lake.lake, "selected_features", layer)
    except dg.Failure as e:
        return _missing("selected_features", layer, e)
    return dg.AssetCheckResult(
        passed=table.num_rows > 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{table.num_rows} features selected at layer {layer}",
        metadata={"rows": table.num_rows},
    )


@dg.asset_check(asset=selected_features, partitions_def=layer_partitions, blocking=True)
def selected_features_valid(
    context: dg.AssetCheckExecutionContext, lake: LakeResource, sae: SAEResource
) -> dg.AssetCheckResult:
    """Every selected feature has an id below the SAE width, a finite selectivity in [-1, 1] that reaches the
    recorded ``min_selectivity``, a direction that matches its sign, and (when ``fdr_alpha`` was recorded)
    a q_value below it."""
    layer = int(context.partition_key)
    lk = lake.lake
    try:
        table = read_stat(lk, "selected_features", layer)
        cfg = recorded(lk, "selected_features", layer).get("config", {})
    except dg.Failure as e:
        return _missing("selected_features", layer, e)
    width = sae_width(sae, lk, layer)
    min_sel = float(cfg.get("min_selectivity") or 0.0)
    alpha = cfg.get("fdr_alpha")
    problems = []
    for r in table.to_pylist():
        fid, s = r["feature_id"], r["selectivity"]
        if not 0 <= fid < width:
            problems.append(f"feature {fid}: id outside [0, {width})")
        elif s is None or not math.isfinite(s) or abs(s) > 1:
            problems.append(f"feature {fid}: selectivity {s} not a number in [-1, 1]")
        elif abs(s) < min_sel - 1e-12:
            problems.append(f"feature {fid}: |selectivity| {abs(s):.3f} below min_selectivity {min_sel}")
        elif (s >= 0) != (r["direction"] == "positive"):
            problems.append(f"feature {fid}: direction {r['direction']!r} but selectivity {s:+.3f}")
        elif alpha is not None and not (r.get("q_value") is not None and r["q_value"] < alpha):
            problems.append(f"feature {fid}: q_value {r.get('q_value')} not below fdr_alpha {alpha}")
    desc = (
        f"{table.num_rows} selected features valid"
        if not problems
        else f"{len(problems)} invalid selected features: {'; '.join(problems[:5])}"
    )
    return dg.AssetCheckResult(
        passed=not problems, description=desc, metadata={"violations": len(problems), "sae_width": width}
    )
