"""Probes: linear probes on pooled SAE features and dense residual baselines, their evaluation on every
held-out dataset, and the report. Thin wrappers over ``dagster_project.lib.evaluation``."""


from dataclasses import replace
from typing import Any

import dagster as dg
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from dagster_project.config import ProbeConfig
from dagster_project.lib.catalog import views_connection
from dagster_project.lib.ensemble import ENSEMBLE_TABLE, by_layer, layer_ensemble
from dagster_project.lib.evaluation import (
    CROSS_TABLE,
    LODO_TABLE,
    METRICS_TABLE,
    PROBES_TABLE,
    SCORES_TABLE,
    EvaluationError,
    LayerData,
    activation_provenance,
    best_probes,
    best_provenance,
    check_probes_match,
    cross_distribution,
    evaluate_probes,
    feature_infos,
    headline_numbers,
    layer_choice,
    load_saved_probes,
    lodo_table,
    probe_scores,
    registry_control_negatives,
    report_figures,
    save_probes,
    saved_dir,
    side_by_side,
    train_probes,
    write_report,
)
from dagster_project.lib.generalisation import family_table, held_out_table, recommendation
from dagster_project.lib.lake import Lake, LakeError
from dagster_project.lib.markdown import markdown_images, markdown_table
from dagster_project.partitions import layer_partitions
from dagster_project.provenance import check_layer
from dagster_project.resources import LakeResource
from dagster_project.table_metadata import table_asset

_PREVIEW_PROBES = ["probe_id", "kind", "n_features", "n_nonzero", "rank", "selection_score", "lodo_mean_auroc",
                   "cv_auroc", "cv_rank", "degenerate"]
_PREVIEW_METRICS = ["probe", "eval_dataset", "eval_role", "auroc", "auroc_ci_low", "auroc_ci_high", "accuracy",
                    "tpr_at_1pct_fpr", "detection_rate", "n_pos", "n_neg"]


def _read(lake: Lake, table: str, layer: int, producer: str) -> pa.Table:
    if not lake.exists(table, layer=layer):
        raise dg.Failure(f"{lake.file(table, layer=layer)} does not exist: materialize {producer} for layer {layer}")
    return lake.read(table, layer=layer)


@table_asset(
    "stats/probes",
    partitions_def=layer_partitions,
    group_name="probes",
    deps=["activations", "feature_stats", "classifications"],
    kinds={"sklearn", "parquet"},
)
def probes(context: dg.AssetExecutionContext, config: ProbeConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Linear probes for alignment faking on the pooled SAE activations of one layer, read from the lake
    as sparse matrices. Feature sets: the features classified relevant (score >= ``relevant_threshold``,
    when ``classifications`` exist), the top-N by ``feature_stats`` selectivity, and every active feature;
    L1 and L2 logistic regression over the C grid, then the transforms on the best setting; a dense L2
    baseline on the pooled residual vectors. Trained on a mixture of groups (every ``train``-role dataset
    unless ``train_datasets`` names others; a group is one generator or source) and chosen out of
    distribution: leave one group out (``lodo_metrics``, the worst or mean held-out-group AUROC) where
    there are two groups or more, else group-aware CV (near-duplicate texts in one fold). Thresholds are
    set on the ``control`` sets. Degenerate probes (no non-zero weight) are marked and never best.
    Every probe is saved under ``probes_saved/layer=L/<probe_id>`` with its provenance; the ``probes``
    table lists them."""
    layer = int(context.partition_key)
    lk = lake.lake
    settings = replace(config.settings(), control_negatives=registry_control_negatives())
    try:
        check_layer(lk, layer)  # every dataset of the layer made with the current model / SAE / config
        con = views_connection(lk)
        trained = train_probes(con, layer, settings, LayerData(con, layer))
        provenance = {
            **activation_provenance(lk, layer, trained.train_datasets),
            "profile": lk.namespace,
            "probe_config_hash": settings.probe_config_hash(),
        }
    except (EvaluationError, LakeError) as e:
        raise dg.Failure(str(e)) from e
    table = save_probes(lk, trained, provenance)
    path = lk.write(PROBES_TABLE, table, layer=layer, meta={**provenance, "layer": layer})
    lodo = lodo_table(trained)
    lodo_path = lk.write(LODO_TABLE, lodo, layer=layer, meta={**provenance, "layer": layer})
    by_rank = table.sort_by([("kind", "descending"), ("rank", "ascending")])
    best = {r["kind"]: r for r in table.to_pylist() if r["is_best"]}

    def said(v: dict[str, Any]) -> str:
        score = v["selection_score"]
        return (f"{v['probe_id']} ({trained.selection} {trained.criterion if trained.selection == 'lodo' else ''} "
                f"{'-' if score is None else f'{score:.3f}'}, CV {v['cv_auroc']:.3f})")

    context.log.info(
        f"layer {layer}: {table.num_rows} probes on {trained.train_datasets} ({len(trained.groups)} groups, "
        f"{len(trained.held_out_groups)} held out in turn, controls {trained.control_datasets}); best "
        + ", ".join(f"{k} {said(v)}" for k, v in best.items())
    )
    metadata: dict[str, Any] = {
        "dagster/row_count": table.num_rows,
        "sae_probes": len(trained.sae),
        "dense_probes": len(trained.dense),
        "train_datasets": dg.MetadataValue.json(trained.train_datasets),
        "class_balance": dg.MetadataValue.json(trained.balance),
        "active_features": trained.n_active,
        "feature_sets": dg.MetadataValue.json(trained.feature_set_sizes),
        "used_classifications": trained.used_classifications,
        "selection": trained.selection,
        "criterion": trained.criterion,
        "groups": dg.MetadataValue.json(trained.groups),
        "held_out_groups": dg.MetadataValue.json(trained.held_out_groups),
        "control_datasets": dg.MetadataValue.json(trained.control_datasets),
        "near_duplicate_clusters": trained.n_near_dup_clusters,
        "train_seconds": dg.MetadataValue.json(trained.seconds),
        "degenerate_probes": int(sum(bool(x) for x in table.column("degenerate").to_pylist())),
        "lodo_rows": lodo.num_rows,
        "best_cv": dg.MetadataValue.md(
            markdown_table(table.filter(pc.field("is_best")),
                           ["kind", "probe_id", "n_features", "n_nonzero", "selection_score", "lodo_mean_auroc",
                            "cv_auroc", "cv_std", "threshold_source"])
        ),
        "preview": dg.MetadataValue.md(markdown_table(by_rank, _PREVIEW_PROBES, max_rows=25)),
        "config": dg.MetadataValue.json(settings.to_json()),
        "provenance": dg.MetadataValue.json(provenance),
        "path": dg.MetadataValue.path(str(path)),
        "lodo_path": dg.MetadataValue.path(str(lodo_path)),
        "probes_dir": dg.MetadataValue.path(str(saved_dir(lk, layer))),
    }
    for k, v in best.items():
        metadata[f"best_{k}"] = v["probe_id"]
        metadata[f"best_{k}_cv_auroc"] = float(v["cv_auroc"])
        if v["selection_score"] is not None:
            metadata[f"best_{k}_selection_score"] = float(v["selection_score"])
    if trained.dense_skipped:
        metadata["dense_skipped"] = trained.dense_skipped
    return dg.MaterializeResult(metadata=metadata)


@table_asset(
    "stats/probe_metrics",
    partitions_def=layer_partitions,
    group_name="probes",
    deps=[probes],
    kinds={"sklearn", "parquet"},
)
def evaluation(context: dg.AssetExecutionContext, config: ProbeConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Every saved probe of one layer on every dataset it was not trained on: AUROC with a bootstrap 95%
    CI, accuracy at the training threshold, TPR at the training 1% FPR, per-raw-label rates (e.g.
    ``hard_negative``), and detection rate + mean score on positive-only sets (``probe_metrics``).
    Per-sample scores of the best SAE probe and the best dense baseline (``probe_scores``). The
    cross-distribution matrix: both best configurations refitted on each dataset with both classes and
    evaluated on every other (``probe_cross_distribution``; diagonal = CV on the dataset itself)."""
    layer = int(context.partition_key)
    lk = lake.lake
    settings = config.settings()
    probes_table = _read(lk, PROBES_TABLE, layer, "probes")
    try:
        loaded = load_saved_probes(probes_table)
        check_probes_match(layer, loaded, check_layer(lk, layer))
        con = views_connection(lk)
        data = LayerData(con, layer)
        ev = evaluate_probes(data, loaded, settings)
        best = best_probes(loaded)
        scores = probe_scores(data, best.values())
        cross = cross_distribution(data, best.values(), settings)
    except (EvaluationError, LakeError) as e:
        raise dg.Failure(str(e)) from e
    for msg in ev.skipped:
        context.log.warning(f"layer {layer}: skipped {msg}")
    meta = {**best_provenance(probes_table), "layer": layer, "settings": settings.to_json()}
    paths = {
        "metrics": lk.write(METRICS_TABLE, ev.metrics, layer=layer, meta=meta),
        "scores": lk.write(SCORES_TABLE, scores, layer=layer, meta=meta),
        "cross": lk.write(CROSS_TABLE, cross, layer=layer, meta=meta),
    }
    head = side_by_side(ev.metrics, probes_table)
    lodo = lk.read(LODO_TABLE, layer=layer) if lk.exists(LODO_TABLE, layer=layer) else None
    said = recommendation(probes_table, ev.metrics, lodo)
    context.log.info(f"layer {layer}: {ev.metrics.num_rows} evaluations\n{head}\n{said}")
    best_rows = ev.metrics.filter(pc.field("is_best"))
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": ev.metrics.num_rows,
            "probes": len(loaded),
            "eval_datasets": dg.MetadataValue.json(sorted(set(ev.metrics.column("eval_dataset").to_pylist()))),
            "score_rows": scores.num_rows,
            "cross_rows": cross.num_rows,
            "best_vs_dense": dg.MetadataValue.md(head),
            "recommendation": dg.MetadataValue.md(said),
            "families": dg.MetadataValue.md(markdown_table(family_table(probes_table, ev.metrics), max_rows=40)),
            "held_out_groups": dg.MetadataValue.md(markdown_table(held_out_table(lodo), max_rows=40)),
            "threshold_source": dg.MetadataValue.json(sorted(set(ev.metrics.column("threshold_source").to_pylist()))),
            **headline_numbers(ev.metrics, probes_table),
            "best_preview": dg.MetadataValue.md(markdown_table(best_rows, ["kind", *_PREVIEW_METRICS], max_rows=40)),
            "preview": dg.MetadataValue.md(markdown_table(ev.metrics, _PREVIEW_METRICS, max_rows=25)),
            "cross_preview": dg.MetadataValue.md(
                markdown_table(cross, ["kind", "train_dataset", "eval_dataset", "in_distribution", "auroc",
                                       "auroc_ci_low", "auroc_ci_high", "detection_rate"], max_rows=40)
            ),
            "skipped": dg.MetadataValue.json(ev.skipped),
            **{f"path_{k}": dg.MetadataValue.path(str(v)) for k, v in paths.items()},
        }
    )


@dg.asset(
    partitions_def=layer_partitions,
    group_name="report",
    deps=[evaluation, "detection_scores"],  # the describe stage's explanation_scores go in the report too
    kinds={"html"},
)
def probe_report(context: dg.AssetExecutionContext, config: ProbeConfig, lake: LakeResource) -> dg.MaterializeResult:
    """The probe report of one layer: AUROC ladders, ROC curves of the best probes, cross-distribution
    heatmaps and the L1 path as plots here, and a static HTML report (``report/layer=L/index.html``)
    with a page per feature of the best SAE probe: description and relevance, weight, selectivity,
    per-dataset firing rates and its top windows with the firing tokens highlighted."""
    layer = int(context.partition_key)
    lk = lake.lake
    settings = config.settings()
    probes_table = _read(lk, PROBES_TABLE, layer, "probes")
    metrics = _read(lk, METRICS_TABLE, layer, "evaluation")
    scores = _read(lk, SCORES_TABLE, layer, "evaluation")
    cross = _read(lk, CROSS_TABLE, layer, "evaluation")
    lodo = lk.read(LODO_TABLE, layer=layer) if lk.exists(LODO_TABLE, layer=layer) else None
    try:
        best = best_probes(load_saved_probes(probes_table.filter(pc.field("is_best"))))
        con = views_connection(lk)
        data = LayerData(con, layer)
        figs = report_figures(data.samples, probes_table, metrics, scores, cross, settings.grid.default_transform,
                              lodo=lodo)
        layers = layer_choice(con)
        sae = best.get("sae")
        features = feature_infos(con, layer, sae.probe, settings) if sae is not None else []
    except (EvaluationError, LakeError) as e:
        raise dg.Failure(str(e)) from e
    provenance = dict(sae.probe.provenance) if sae is not None else best_provenance(probes_table)
    index = write_report(
        lk, layer, provenance=provenance, probes_table=probes_table, metrics=metrics, cross=cross,
        figures=figs, features=features, best_probe_name=sae.probe_id if sae is not None else None,
        lodo=lodo, layers=layers,
    )
    context.log.info(f"layer {layer}: report {index} with {len(features)} feature pages and {len(figs)} figures")
    return dg.MaterializeResult(
        metadata={
            "index": dg.MetadataValue.path(str(index)),
            "feature_pages": len(features),
            "figures": dg.MetadataValue.json(sorted(figs)),
            "best_vs_dense": dg.MetadataValue.md(side_by_side(metrics, probes_table)),
            "recommendation": dg.MetadataValue.md(recommendation(probes_table, metrics, lodo)),
            **{f"plot_{name}": dg.MetadataValue.md(markdown_images({name: png})) for name, png in figs.items()},
        }
    )


@table_asset(
    "stats/probe_ensemble_metrics",
    group_name="probes",
    deps=[evaluation],
    kinds={"parquet"},
)
def probe_ensemble(context: dg.AssetExecutionContext, config: ProbeConfig, lake: LakeResource) -> dg.MaterializeResult:
    """The multi-layer ensemble: every layer's recommended SAE probe (and dense baseline) z-scored on its
    training texts and averaged, thresholded on the control sets, evaluated on every set it was not
    trained on (``probe_ensemble_metrics``; the ``probe_metrics`` view holds these rows with ``layer``
    NULL). Also the table of AUROC by layer, in and out of distribution side by side, and the layer the
    held-out-group protocol recommends for each kind. Needs two layers or more with probes."""
    lk = lake.lake
    settings = config.settings()
    con = views_connection(lk)
    table = layer_ensemble(con, n_boot=settings.n_boot, seed=settings.seed, fpr=settings.grid.control_fpr)
    path = lk.write(ENSEMBLE_TABLE, table, meta={"settings": settings.to_json()})
    con = views_connection(lk)  # the view now folds the ensemble rows in
    layers = by_layer(con)
    choice = layer_choice(con)
    picked = {r["kind"]: r for r in choice.filter(pl.col("layer_rank") == 1).iter_rows(named=True)} if choice.height else {}
    context.log.info(f"layer ensemble: {table.num_rows} rows; recommended layer per kind: "
                     + ", ".join(f"{k} layer {v['layer']} ({v['probe_id']})" for k, v in picked.items()))
    return dg.MaterializeResult(metadata={
        "dagster/row_count": table.num_rows,
        "path": dg.MetadataValue.path(str(path)),
        "ensembles": dg.MetadataValue.json(sorted(set(table.column("probe").to_pylist()))),
        "by_layer": dg.MetadataValue.md(markdown_table(layers, max_rows=40)),
        "layer_choice": dg.MetadataValue.md(markdown_table(choice, max_rows=40)),
        **{f"recommended_layer_{k}": int(v["layer"]) for k, v in picked.items()},
    })
