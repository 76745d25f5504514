"""Describe: what each selected feature fires on, how relevant that is to the behaviour, how well the
description predicts held-out activations, and the themes the descriptions fall into.

Every asset here is partitioned by layer and writes ``stats/<name>/layer=L/part-0.parquet`` (the ``layer``
column lives only in the path, so the lake's DuckDB view of the same name has it back):

- ``descriptions``: one row per selected feature (``stats/selected_features``), ``status`` ok or failed. The
  windows are chosen in SQL (``sql/describe``): activating samples drawn by ``sampling`` (top-k by pooled
  max_act, activation deciles, or random) and zero-activation samples matched on class, dataset and length
  (or near misses by residual similarity), with a token window around each peak. The differential
  prompt (activating windows against the negatives) goes to the describer resource's backend,
  ``n_candidates`` times on different subsets of those windows; each candidate is scored by detection on
  validation windows and the best kept. Every candidate is in ``stats/description_candidates``.
- ``classifications``: the rubric's 0-10 relevance score, category and themes of every ``ok`` description.
- ``detection_scores``: from its description alone, which held-out windows fire (drawn by
  ``holdout_sampling``, by default from every activation decile, against held-out negatives); accuracy and
  balanced accuracy per feature. The same step runs the other ``scorers`` (fuzzing, embedding) and writes
  ``stats/explanation_scores``: one row per selected feature and scorer, a score or a recorded failure.
- ``themes``: clusters of the ``ok`` descriptions (MiniLM embeddings, agglomerative), each named by its terms.

Every model call goes through a crash-safe cache under ``<lake>/<profile>/llm_cache``: a rerun, or a run
after a crash, makes only the calls not yet made. The API key lives in the describer resource only.
"""

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypedDict, TypeVar

import dagster as dg
import pyarrow as pa

from dagster_project.describe_config import DescribeConfig
from dagster_project.describer_resource import DescriberResource
from dagster_project.lib.autointerp import DescriptionRecord, PromptError, load_rubric
from dagster_project.lib.catalog import views_connection
from dagster_project.lib.describe_examples import ExamplesError, ExampleSettings, LayerExamples, load_examples
from dagster_project.lib.describe_summary import call_metadata, failures_md, mean, scorer_means
from dagster_project.lib.describe_tables import (
    CANDIDATES,
    CLASSIFICATIONS,
    DESCRIPTIONS,
    DETECTION,
    EXPLANATION_SCORES,
    THEMES,
    candidate_row,
    description_records,
    description_rows,
    record_row,
    score_rows,
    theme_rows,
    write_rows,
)
from dagster_project.lib.describers import (
    Describer,
    LLMConfigError,
    RetryPolicy,
    detection_score_record,
    run_best_of_n,
    run_classify,
    run_detection,
    run_fuzzing,
)
from dagster_project.lib.lake import Lake, LakeError
from dagster_project.lib.llm_cache import LLMCache
from dagster_project.lib.markdown import md_rows, png_md
from dagster_project.lib.plots_describe import score_histogram_png
from dagster_project.lib.scorers import complete_scores, embedding_scores
from dagster_project.lib.tables import (
    CANDIDATES_SCHEMA,
    CLASSIFICATIONS_SCHEMA,
    DESCRIPTIONS_SCHEMA,
    DETECTION_SCHEMA,
    EXPLANATION_SCORES_SCHEMA,
    THEMES_SCHEMA,
)
from dagster_project.lib.themes import EmbeddingModelError, cluster_descriptions
from dagster_project.partitions import layer_partitions
from dagster_project.provenance import check_layer
from dagster_project.resources import LakeResource
from dagster_project.table_metadata import table_asset

GROUP = "describe"
KINDS = {"duckdb", "parquet"}
T = TypeVar("T")


# ------------------------------------------------------------------------------------------ helpers


def _layer(context: dg.AssetExecutionContext) -> int:
    return int(context.partition_key)


# A layer-partitioned asset of this stage writing the lake table it names.
_layer_asset = functools.partial(table_asset, partitions_def=layer_partitions, group_name=GROUP, kinds=KINDS)


def llm_cache(lake: Lake) -> LLMCache:
    """The lake's call cache (``<lake>/<profile>/llm_cache``; the catalog makes no view of it)."""
    return LLMCache(lake.base / "llm_cache")


def _progress(context: dg.AssetExecutionContext, what: str, every_s: float = 10.0) -> Callable[[int, int], None]:
    last = [time.monotonic()]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= every_s:
            last[0] = now
            context.log.info(f"{what}: {done}/{total}")

    return report


class _RunnerArgs(TypedDict):
    prompt_version: str
    retry: RetryPolicy
    concurrency: int
    use_message_batches: bool
    progress: Callable[[int, int], None]


def _runner_args(
    context: dg.AssetExecutionContext, config: DescribeConfig, describer: DescriberResource, what: str
) -> _RunnerArgs:
    """What every runner takes from the step: the prompts, retries, concurrency, batching and a progress log."""
    return _RunnerArgs(
        prompt_version=config.prompt_version,
        retry=config.retry(),
        concurrency=describer.concurrency,
        use_message_batches=describer.use_message_batches,
        progress=_progress(context, what),
    )


def _run(describer: Describer, work: Callable[[Describer], Awaitable[T]]) -> T:
    """Run ``work`` on a fresh event loop and close the describer's clients; config errors fail the step."""

    async def main() -> T:
        try:
            return await work(describer)
        finally:
            await describer.aclose()

    try:
        return asyncio.run(main())
    except (LLMConfigError, EmbeddingModelError, PromptError) as e:
        raise dg.Failure(f"{type(e).__name__}: {e}") from e


def _build(res: DescriberResource) -> Describer:
    try:
        return res.build()
    except LLMConfigError as e:
        raise dg.Failure(str(e)) from e


def _read(lake: Lake, table: str, layer: int, producer: str) -> pa.Table:
    try:
        return lake.read(table, layer=layer)
    except LakeError as e:
        raise dg.Failure(f"{table} of layer {layer} is not in the lake: materialize {producer} first ({e})") from e


def read_descriptions(lake: Lake, layer: int) -> tuple[list[DescriptionRecord], dict[str, Any]]:
    """The layer's description records (as the runners take them) and the metadata they were written with."""
    table = _read(lake, DESCRIPTIONS, layer, "descriptions")
    meta = lake.read_meta(DESCRIPTIONS, layer=layer)
    return description_records(table, layer), meta


def layer_examples(context: dg.AssetExecutionContext, lake: Lake, layer: int, settings: ExampleSettings) -> LayerExamples:
    if not lake.exists("stats/selected_features", layer=layer):
        raise dg.Failure(
            f"stats/selected_features of layer {layer} is not in the lake: materialize selected_features "
            f"for layer {layer} first"
        )
    try:
        check_layer(lake, layer)  # the windows are cut from activations made with the current profile
    except LakeError as e:
        raise dg.Failure(str(e)) from e
    con = views_connection(lake)
    t0 = time.perf_counter()
    try:
        examples = load_examples(con, layer, settings)
    except ExamplesError as e:
        raise dg.Failure(str(e)) from e
    finally:
        con.close()
    context.log.info(
        f"layer {layer}: {len(examples.examples)} selected features, {examples.windows.num_rows} windows "
        f"chosen in {time.perf_counter() - t0:.1f}s"
    )
    return examples


# ------------------------------------------------------------------------------------------ assets


@_layer_asset("stats/descriptions", deps=["selected_features", "activations"], pool="describer")
def descriptions(
    context: dg.AssetExecutionContext, config: DescribeConfig, lake: LakeResource, describer: DescriberResource
) -> dg.MaterializeResult:
    """A description of what each selected feature fires on, from a differential prompt: its activating
    windows (by ``sampling``; activating tokens marked, with their activations) against zero-activation
    windows of samples matched on class, dataset and length. ``n_candidates`` calls per feature (candidate 1
    on every describer window, the others on seeded subsets), cached; with more than one, each ``ok``
    candidate is scored by detection on validation windows and the best is kept, every candidate with its
    score going to ``stats/description_candidates``. ``status`` is ``failed`` (with the error) when every
    candidate's attempts ran out. The samples shown are recorded as ``dataset:sample_id`` lists."""
    layer = _layer(context)
    lk = lake.lake
    settings = config.examples()
    ex = layer_examples(context, lk, layer, settings)
    cache = llm_cache(lk)
    backend = _build(describer)
    context.log.info(f"layer {layer}: describing {len(ex.examples)} features with {describer.backend} "
                     f"({describer.model}), concurrency {describer.concurrency}")
    t0 = time.perf_counter()
    records, candidates = _run(
        backend,
        lambda d: run_best_of_n(
            ex.examples,
            d,
            cache,
            n_candidates=config.n_candidates,
            seed=config.sampling_seed,
            threshold_frac=config.threshold_frac,
            **_runner_args(context, config, describer, f"layer {layer} describe"),
        ),
    )
    seconds = time.perf_counter() - t0
    if [r.feature_id for r in records] != [fx.feature_id for fx in ex.examples]:
        raise dg.Failure("describe returned records that do not match the features asked (lost or duplicated)")
    rows = description_rows(records, candidates, ex)
    cand_rows = [candidate_row(c) for cs in candidates for c in cs]
    meta = {
        "layer": layer,
        "examples": settings.record(),
        "n_candidates": config.n_candidates,
        "prompt_version": config.prompt_version,
        "threshold_frac": config.threshold_frac,
        "describer": describer.identity(),
    }
    # candidates first: the descriptions table is the one downstream steps read, written last
    write_rows(lk, CANDIDATES, cand_rows, CANDIDATES_SCHEMA, layer, meta)
    path = write_rows(lk, DESCRIPTIONS, rows, DESCRIPTIONS_SCHEMA, layer, meta)
    stats = call_metadata(records, cache)
    context.log.info(
        f"layer {layer}: {stats['ok']} described, {stats['failed']} failed, {stats['from_cache']} from cache "
        f"in {seconds:.1f}s -> {path}"
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(rows),
            **stats,
            "seconds": round(seconds, 2),
            "features_per_minute": round(60 * len(rows) / max(seconds, 1e-9), 1),
            "backend": describer.backend,
            "model": describer.model,
            "prompt_version": config.prompt_version,
            "failures": dg.MetadataValue.md(failures_md(records)),
            "preview": dg.MetadataValue.md(
                md_rows(rows, ["feature_rank", "feature_id", "status", "confidence", "candidate",
                               "validation_balanced_accuracy", "description"], 10)
            ),
            "n_candidates": config.n_candidates,
            "candidates": len(cand_rows),
            "kept_not_first": sum(1 for r in rows if (r["candidate"] or 1) > 1),
            "path": dg.MetadataValue.path(path),
        }
    )


@_layer_asset("stats/classifications", deps=[descriptions], pool="describer")
def classifications(
    context: dg.AssetExecutionContext, config: DescribeConfig, lake: LakeResource, describer: DescriberResource
) -> dg.MaterializeResult:
    """Relevance of each ``ok`` description to the rubric: a 0-10 score, a category (known pattern,
    discovery, unrelated) and the rubric themes it touches. Features whose description failed are not
    classified (and have no row). One call per feature unless ``classify_batch_size`` > 1."""
    layer = _layer(context)
    lk = lake.lake
    recs, _ = read_descriptions(lk, layer)
    try:
        rubric = load_rubric(config.rubric)
    except PromptError as e:
        raise dg.Failure(str(e)) from e
    cache = llm_cache(lk)
    backend = _build(describer)
    todo = sum(1 for r in recs if r.status == "ok" and r.description)
    context.log.info(f"layer {layer}: classifying {todo} of {len(recs)} descriptions against {rubric.version}")
    records = _run(
        backend,
        lambda d: run_classify(
            recs,
            d,
            cache,
            rubric=rubric,
            batch_size=config.classify_batch_size,
            **_runner_args(context, config, describer, f"layer {layer} classify"),
        ),
    )
    rows = [record_row(CLASSIFICATIONS_SCHEMA, r, themes=list(r.themes)) for r in records]
    meta = {"layer": layer, "rubric": rubric.version, "prompt_version": config.prompt_version,
            "describer": describer.identity()}
    path = write_rows(lk, CLASSIFICATIONS, rows, CLASSIFICATIONS_SCHEMA, layer, meta)
    ok = [r for r in records if r.status == "ok"]
    categories = Counter(r.category for r in ok)
    scores = [int(r.score) for r in ok if r.score is not None]
    png = score_histogram_png(scores, f"Relevance scores, layer {layer} ({len(scores)} features)")
    context.log.info(f"layer {layer}: classified {len(ok)} ({dict(categories)}) -> {path}")
    top = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (-r["score"], r["feature_id"]))
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(rows),
            **call_metadata(records, cache),
            "skipped_failed_descriptions": len(recs) - todo,
            "rubric_version": rubric.version,
            "category_counts": dg.MetadataValue.json({c: categories.get(c, 0) for c in ("known", "discovery", "unrelated")}),
            "mean_score": float(sum(scores) / len(scores)) if scores else 0.0,
            "score_histogram": dg.MetadataValue.md(png_md(png, "score histogram")),
            "failures": dg.MetadataValue.md(failures_md(records)),
            "top_scores": dg.MetadataValue.md(md_rows(top, ["feature_id", "score", "category", "themes", "description"], 10)),
            "path": dg.MetadataValue.path(path),
        }
    )


@_layer_asset("stats/detection_scores", deps=[descriptions], pool="describer")
def detection_scores(
    context: dg.AssetExecutionContext, config: DescribeConfig, lake: LakeResource, describer: DescriberResource
) -> dg.MaterializeResult:
    """How well each ``ok`` description predicts activations: given only the description, the scorer picks
    which of the shuffled held-out windows fire (activating ones drawn by ``holdout_sampling``, by default
    from every activation decile, and matched zero-activation windows the describer never saw). Accuracy,
    balanced accuracy, precision and recall per feature. The windows follow the example settings recorded
    by ``descriptions``.

    The same step writes ``stats/explanation_scores``, one row per selected feature and scorer of
    ``scorers``: ``detection`` (these figures), ``fuzzing`` (held-out activating windows with their firing
    tokens or decoy tokens marked; which marks fit the description) and ``embedding`` (MiniLM similarity of
    description and held-out window, AUROC; no model call). A feature a scorer could not score (failed
    description, no held-out windows, failed call) has a ``failed`` row with the reason."""
    layer = _layer(context)
    lk = lake.lake
    recs, dmeta = read_descriptions(lk, layer)
    recorded = dmeta.get("examples") or {}
    try:
        settings = ExampleSettings(**recorded) if recorded else config.examples()
    except (TypeError, ExamplesError) as e:
        raise dg.Failure(f"descriptions of layer {layer} recorded unusable example settings {recorded}: {e}") from e
    ex = layer_examples(context, lk, layer, settings)
    by_id = ex.by_id
    # a candidate description was written from a subset of the describer's windows
    changed = [
        r.feature_id for r in recs
        if r.status == "ok" and r.feature_id in by_id
        and not set(r.top_sample_ids) <= {w.ref for w in by_id[r.feature_id].top}
    ]
    if changed:
        context.log.warning(
            f"layer {layer}: the top windows of {len(changed)} features differ from those described "
            f"(e.g. {changed[:5]}); rematerialize descriptions"
        )
    described = {r.feature_id for r in recs if r.status == "ok"}
    features = [fx for fx in ex.examples if fx.feature_id in described]
    no_holdout = [fx.feature_id for fx in features if not (fx.holdout or fx.holdout_negatives)]
    cache = llm_cache(lk)
    backend = _build(describer)
    records = _run(
        backend,
        lambda d: run_detection(
            features,
            recs,
            d,
            cache,
            seed=config.detection_seed,
            **_runner_args(context, config, describer, f"layer {layer} detection"),
        ),
    )
    rows = [record_row(DETECTION_SCHEMA, r) for r in records]
    meta = {"layer": layer, "examples": recorded, "seed": config.detection_seed,
            "prompt_version": config.prompt_version, "describer": describer.identity()}
    scorers = config.scorer_list()
    scored: dict[str, Any] = {"detection": [detection_score_record(r) for r in records]}
    if "fuzzing" in scorers:
        scored["fuzzing"] = _run(
            _build(describer),
            lambda d: run_fuzzing(
                features, recs, d, cache, seed=config.detection_seed,
                threshold_frac=float(dmeta.get("threshold_frac", config.threshold_frac)),
                **_runner_args(context, config, describer, f"layer {layer} fuzzing"),
            ),
        )
    if "embedding" in scorers:
        try:
            scored["embedding"] = embedding_scores(features, recs, max_windows=config.embedding_max_windows)
        except EmbeddingModelError as e:
            raise dg.Failure(f"EmbeddingModelError: {e}") from e
    scores = score_rows(complete_scores(ex.examples, recs, scored), recs)
    path = write_rows(lk, DETECTION, rows, DETECTION_SCHEMA, layer, meta)
    write_rows(lk, EXPLANATION_SCORES, scores, EXPLANATION_SCORES_SCHEMA, layer, {**meta, "scorers": scorers})
    ok = [r for r in records if r.status == "ok"]
    context.log.info(f"layer {layer}: detection scored {len(ok)} features -> {path}")
    summary = scorer_means(scores)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(rows),
            **call_metadata(records, cache),
            "skipped_no_holdout": len(no_holdout),
            "examples_changed": len(changed),
            "mean_accuracy": mean([r.accuracy for r in ok if r.accuracy is not None]),
            "mean_balanced_accuracy": mean([r.balanced_accuracy for r in ok if r.balanced_accuracy is not None]),
            "scorers": dg.MetadataValue.md(md_rows(summary, ["scorer", "metric", "ok", "failed", "mean", "std"],
                                                   len(summary))),
            "failures": dg.MetadataValue.md(failures_md(records)),
            "preview": dg.MetadataValue.md(
                md_rows(sorted(rows, key=lambda r: -(r["balanced_accuracy"] or 0)),
                        ["feature_id", "status", "balanced_accuracy", "accuracy", "n_windows", "n_activating"], 10)
            ),
            "path": dg.MetadataValue.path(path),
        }
    )


@_layer_asset("stats/themes", deps=[descriptions])
def themes(context: dg.AssetExecutionContext, config: DescribeConfig, lake: LakeResource) -> dg.MaterializeResult:
    """Themes of a layer's features: the ``ok`` descriptions embedded with the bundled MiniLM model and
    clustered (average linkage, cosine distance below ``theme_distance_threshold``), each cluster named by
    its most distinctive terms. Runs offline whatever the describer backend."""
    layer = _layer(context)
    lk = lake.lake
    recs, _ = read_descriptions(lk, layer)
    items = [(r.feature_id, r.description) for r in recs if r.status == "ok" and r.description]
    try:
        clustering = cluster_descriptions(items, distance_threshold=config.theme_distance_threshold)
    except EmbeddingModelError as e:
        raise dg.Failure(str(e)) from e
    rows = theme_rows(clustering, dict(items))
    meta = {"layer": layer, "distance_threshold": config.theme_distance_threshold,
            "embedding_model": clustering.embedding_model}
    path = write_rows(lk, THEMES, rows, THEMES_SCHEMA, layer, meta)
    summary = [
        {"theme_id": c.cluster_id, "theme_name": c.name, "size": c.size,
         "features": ", ".join(str(m) for m in c.members[:8]) + (" ..." if c.size > 8 else "")}
        for c in clustering.clusters
    ]
    context.log.info(f"layer {layer}: {len(items)} descriptions in {len(clustering.clusters)} themes -> {path}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(rows),
            "themes": len(clustering.clusters),
            "singletons": sum(1 for c in clustering.clusters if c.size == 1),
            "embedding_model": clustering.embedding_model,
            "preview": dg.MetadataValue.md(md_rows(summary, ["theme_id", "theme_name", "size", "features"], 20)),
            "path": dg.MetadataValue.path(path),
        }
    )
