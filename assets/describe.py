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
import io
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import dagster as dg
import pyarrow as pa
from pydantic import Field

from dagster_project.describer_resource import DescriberResource
from dagster_project.lib.autointerp import (
    DEFAULT_PROMPT_VERSION,
    DEFAULT_RUBRIC,
    CallInfo,
    DescriptionRecord,
    PromptError,
    load_rubric,
)
from dagster_project.lib.catalog import views_connection
from dagster_project.lib.describe_examples import ExamplesError, ExampleSettings, LayerExamples, load_examples
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
from dagster_project.lib.scorers import SCORERS, complete_scores, embedding_scores
from dagster_project.lib.themes import EmbeddingModelError, cluster_descriptions
from dagster_project.partitions import layer_partitions
from dagster_project.provenance import check_layer
from dagster_project.resources import LakeResource

GROUP = "describe"
KINDS = {"duckdb", "parquet"}
T = TypeVar("T")

DESCRIPTIONS = "stats/descriptions"
CLASSIFICATIONS = "stats/classifications"
DETECTION = "stats/detection_scores"
THEMES = "stats/themes"
CANDIDATES = "stats/description_candidates"
EXPLANATION_SCORES = "stats/explanation_scores"

_IDS = pa.list_(pa.string())
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
DESCRIPTIONS_SCHEMA = pa.schema(
    [
        ("feature_id", pa.int32()),
        ("feature_rank", pa.int32()),
        ("direction", pa.string()),
        ("selectivity", pa.float64()),
        ("status", pa.string()),
        ("description", pa.string()),
        ("confidence", pa.int32()),
        ("error", pa.string()),
        *CALL_FIELDS,
        ("top_sample_ids", _IDS),
        ("negative_sample_ids", _IDS),
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
        ("status", pa.string()),
        ("description", pa.string()),
        ("confidence", pa.int32()),
        ("error", pa.string()),
        *CALL_FIELDS,
        ("top_sample_ids", _IDS),
        ("negative_sample_ids", _IDS),
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
        ("window_sample_ids", _IDS),
        ("window_is_activating", pa.list_(pa.bool_())),
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
        ("window_sample_ids", _IDS),
        ("window_is_activating", pa.list_(pa.bool_())),
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


class DescribeConfig(dg.Config):
    """Launchpad config of the describe assets (group ``describe``).

    ``descriptions`` uses the example fields (how many windows of each kind, how wide) and records them in
    its Parquet metadata; ``detection_scores`` reads them back from there, so its held-out windows are
    exactly those the describer never saw. ``classifications`` uses the rubric; ``themes`` the threshold.
    """

    top_k: int = Field(5, ge=1, description="activating windows shown to the describer (drawn by `sampling`)")
    n_negatives: int = Field(5, ge=0, description="matched zero-activation windows shown to the describer")
    n_holdout: int = Field(10, ge=0, description="activating windows held out for scoring (drawn by holdout_sampling)")
    n_holdout_negatives: int = Field(10, ge=0, description="zero-activation windows held out for scoring")
    sampling: str = Field("top", description="describer's activating windows: top | deciles | random")
    holdout_sampling: str = Field("deciles", description="held-out windows: next (ranks after top_k) | deciles "
                                  "(round-robin over activation deciles: n_holdout >= 10 covers each) | random")
    negatives: str = Field("matched", description="negatives: matched (class, dataset, length) | near_miss "
                           "(class, then nearest pooled residual)")
    sampling_seed: int = Field(0, description="seeds the deciles / random draws and the candidate subsets")
    n_candidates: int = Field(2, ge=1, description="candidate descriptions per feature (best-of-n on validation)")
    n_validation: int = Field(5, ge=0, description="activating validation windows for best-of-n (n_candidates > 1)")
    n_validation_negatives: int = Field(5, ge=0, description="zero-activation validation windows for best-of-n")
    scorers: list[str] = Field(["detection", "fuzzing", "embedding"],
                               description="explanation_scores scorers (detection always runs)")
    embedding_max_windows: int | None = Field(8, ge=2, description="held-out windows the embedding scorer "
                                              "embeds per feature, half of each kind (None: all)")
    window_tokens: int = Field(12, ge=0, description="tokens each side of a window's peak")
    max_features: int | None = Field(None, ge=1, description="describe the first N selected features; None: all")
    prompt_version: str = Field(DEFAULT_PROMPT_VERSION, description="prompt templates (dagster_project/prompts)")
    rubric: str = Field(DEFAULT_RUBRIC, description="rubric name (dagster_project/rubrics) or a YAML path")
    threshold_frac: float = Field(0.2, gt=0, lt=1, description="tokens above this fraction of the peak are marked")
    max_attempts: int = Field(4, ge=1, description="attempts per call (transport errors and invalid replies)")
    retry_base_delay_s: float = Field(2.0, ge=0, description="first backoff (doubles; the server's retry-after wins)")
    retry_max_delay_s: float = Field(60.0, ge=0, description="longest backoff between attempts")
    classify_batch_size: int = Field(1, ge=1, description="descriptions per classify call (1: one call each)")
    detection_seed: int = Field(0, description="seeds the order of the held-out windows")
    theme_distance_threshold: float = Field(0.45, gt=0, lt=2, description="cosine distance merging themes")

    def examples(self) -> ExampleSettings:
        many = self.n_candidates > 1
        try:
            return ExampleSettings(
                top_k=self.top_k,
                n_negatives=self.n_negatives,
                n_holdout=self.n_holdout,
                n_holdout_negatives=self.n_holdout_negatives,
                window=self.window_tokens,
                max_features=self.max_features,
                sampling=self.sampling,
                holdout_sampling=self.holdout_sampling,
                negatives=self.negatives,
                n_validation=self.n_validation if many else 0,
                n_validation_negatives=self.n_validation_negatives if many else 0,
                seed=self.sampling_seed,
            )
        except ExamplesError as e:
            raise dg.Failure(f"describe config: {e}") from e

    def scorer_list(self) -> list[str]:
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad:
            raise dg.Failure(f"describe config: unknown scorers {bad}; expected some of {list(SCORERS)}")
        return ["detection", *[s for s in SCORERS if s in self.scorers and s != "detection"]]

    def retry(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            base_delay_s=self.retry_base_delay_s,
            max_delay_s=max(self.retry_max_delay_s, self.retry_base_delay_s),
        )


# ------------------------------------------------------------------------------------------ helpers


def _layer(context: dg.AssetExecutionContext) -> int:
    return int(context.partition_key)


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


def _write(lake: Lake, table: str, rows: list[dict[str, Any]], schema: pa.Schema, layer: int,
           meta: dict[str, Any]) -> str:
    data = pa.Table.from_pylist(rows, schema=schema)
    return str(lake.write(table, data, layer=layer, meta=meta))


def _call_row(info: CallInfo) -> dict[str, Any]:
    return {
        "backend": info.backend,
        "model": info.model,
        "prompt_version": info.prompt_version,
        "input_tokens": info.input_tokens,
        "output_tokens": info.output_tokens,
        "cache_creation_input_tokens": info.cache_creation_input_tokens,
        "cache_read_input_tokens": info.cache_read_input_tokens,
        "cost_usd": info.cost_usd,
        "cached": info.cached,
        "attempts": info.attempts,
        "cache_key": info.cache_key,
    }


def call_metadata(records: Sequence[Any], cache: LLMCache) -> dict[str, Any]:
    """Counts, cache hits/misses, tokens and cost of a runner's records (cost of this run's calls only)."""
    ok = sum(1 for r in records if r.status == "ok")
    fresh = [r for r in records if not r.call.cached]
    costs = [r.call.cost_usd for r in fresh]
    all_costs = [r.call.cost_usd for r in records]
    meta: dict[str, Any] = {
        "ok": ok,
        "failed": len(records) - ok,
        "from_cache": len(records) - len(fresh),
        "cache_hits": cache.stats.hits,
        "cache_misses": cache.stats.misses,
        "attempts": sum(r.call.attempts for r in fresh),
        "input_tokens": sum(r.call.input_tokens for r in fresh),
        "output_tokens": sum(r.call.output_tokens for r in fresh),
    }
    if any(c is None for c in costs):
        meta["cost_usd"] = dg.MetadataValue.text("unknown (a model without a price)")
    else:
        meta["cost_usd"] = float(sum(costs))  # type: ignore[arg-type]
    if all(c is not None for c in all_costs):
        meta["cost_usd_incl_cached"] = float(sum(all_costs))  # type: ignore[arg-type]
    return meta


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def failures_md(records: Sequence[Any], limit: int = 50) -> str:
    failed = [{"feature_id": r.feature_id, "error": r.error} for r in records if r.status != "ok"]
    return md_rows(failed, ["feature_id", "error"], limit) if failed else "_(none)_"


def score_histogram_png(scores: Sequence[int], title: str) -> bytes:
    """Bars of the 0-10 relevance scores (matplotlib Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = Counter(scores)
    fig = Figure(figsize=(6.0, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(11), [counts.get(s, 0) for s in range(11)], color="#4c72b0")
    ax.set_xticks(range(11))
    ax.set_xlabel("relevance score (0-10)")
    ax.set_ylabel("features")
    ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def read_descriptions(lake: Lake, layer: int) -> tuple[list[DescriptionRecord], dict[str, Any]]:
    """The layer's description records (as the runners take them) and the metadata they were written with."""
    table = _read(lake, DESCRIPTIONS, layer, "descriptions")
    meta = lake.read_meta(DESCRIPTIONS, layer=layer)
    records = [
        DescriptionRecord(
            layer=layer,
            feature_id=int(r["feature_id"]),
            status=r["status"],
            description=r["description"],
            confidence=r["confidence"],
            error=r["error"],
            top_sample_ids=list(r["top_sample_ids"] or []),
            negative_sample_ids=list(r["negative_sample_ids"] or []),
            call=CallInfo(
                backend=r["backend"] or "",
                model=r["model"] or "",
                prompt_version=r["prompt_version"] or "",
                cache_key=r["cache_key"] or "",
            ),
        )
        for r in table.to_pylist()
    ]
    return records, meta


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


@dg.asset(
    partitions_def=layer_partitions,
    group_name=GROUP,
    deps=["selected_features", "activations"],
    kinds=KINDS,
    pool="describer",
)
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
            prompt_version=config.prompt_version,
            retry=config.retry(),
            concurrency=describer.concurrency,
            threshold_frac=config.threshold_frac,
            use_message_batches=describer.use_message_batches,
            progress=_progress(context, f"layer {layer} describe"),
        ),
    )
    seconds = time.perf_counter() - t0
    if [r.feature_id for r in records] != [fx.feature_id for fx in ex.examples]:
        raise dg.Failure("describe returned records that do not match the features asked (lost or duplicated)")
    features = {r["feature_id"]: r for r in ex.features.to_pylist()}
    by_id = ex.by_id
    best = {cs[0].description.feature_id: next(c for c in cs if c.is_best) for cs in candidates if cs}
    n_cands = {cs[0].description.feature_id: len(cs) for cs in candidates if cs}
    rows = []
    for rec in records:
        fx = by_id[rec.feature_id]
        sel = features[rec.feature_id]
        kept = best[rec.feature_id]
        rows.append(
            {
                "feature_id": rec.feature_id,
                "feature_rank": sel["feature_rank"],
                "direction": sel["direction"],
                "selectivity": sel["selectivity"],
                "status": rec.status,
                "description": rec.description,
                "confidence": rec.confidence,
                "error": rec.error,
                **_call_row(rec.call),
                "top_sample_ids": rec.top_sample_ids,
                "negative_sample_ids": rec.negative_sample_ids,
                "holdout_sample_ids": [w.ref for w in fx.holdout],
                "holdout_negative_sample_ids": [w.ref for w in fx.holdout_negatives],
                "top_max_act": fx.scale,
                "candidate": kept.candidate,
                "n_candidates": n_cands[rec.feature_id],
                "validation_balanced_accuracy": kept.validation_score,
            }
        )
    cand_rows = [_candidate_row(c) for cs in candidates for c in cs]
    meta = {
        "layer": layer,
        "examples": settings.record(),
        "n_candidates": config.n_candidates,
        "prompt_version": config.prompt_version,
        "threshold_frac": config.threshold_frac,
        "describer": describer.identity(),
    }
    # candidates first: the descriptions table is the one downstream steps read, written last
    _write(lk, CANDIDATES, cand_rows, CANDIDATES_SCHEMA, layer, meta)
    path = _write(lk, DESCRIPTIONS, rows, DESCRIPTIONS_SCHEMA, layer, meta)
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


def _candidate_row(c: Any) -> dict[str, Any]:
    rec, val = c.description, c.validation
    return {
        "feature_id": rec.feature_id,
        "candidate": c.candidate,
        "is_best": c.is_best,
        "status": rec.status,
        "description": rec.description,
        "confidence": rec.confidence,
        "error": rec.error,
        **_call_row(rec.call),
        "top_sample_ids": rec.top_sample_ids,
        "negative_sample_ids": rec.negative_sample_ids,
        "validation_status": val.status if val is not None else None,
        "validation_error": val.error if val is not None else None,
        "validation_balanced_accuracy": c.validation_score,
        "validation_accuracy": val.accuracy if val is not None else None,
        "validation_n": val.n_windows if val is not None else 0,
        "validation_sample_ids": val.window_sample_ids if val is not None else [],
        "validation_cache_key": val.call.cache_key if val is not None else None,
    }


@dg.asset(partitions_def=layer_partitions, group_name=GROUP, deps=[descriptions], kinds=KINDS, pool="describer")
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
            prompt_version=config.prompt_version,
            retry=config.retry(),
            concurrency=describer.concurrency,
            batch_size=config.classify_batch_size,
            use_message_batches=describer.use_message_batches,
            progress=_progress(context, f"layer {layer} classify"),
        ),
    )
    rows = [
        {
            "feature_id": r.feature_id,
            "status": r.status,
            "score": r.score,
            "category": r.category,
            "themes": list(r.themes),
            "error": r.error,
            "rubric_version": r.rubric_version,
            "batched": r.batched,
            "description": r.description,
            "description_cache_key": r.description_cache_key,
            **_call_row(r.call),
        }
        for r in records
    ]
    meta = {"layer": layer, "rubric": rubric.version, "prompt_version": config.prompt_version,
            "describer": describer.identity()}
    path = _write(lk, CLASSIFICATIONS, rows, CLASSIFICATIONS_SCHEMA, layer, meta)
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


@dg.asset(partitions_def=layer_partitions, group_name=GROUP, deps=[descriptions], kinds=KINDS, pool="describer")
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
            prompt_version=config.prompt_version,
            seed=config.detection_seed,
            retry=config.retry(),
            concurrency=describer.concurrency,
            use_message_batches=describer.use_message_batches,
            progress=_progress(context, f"layer {layer} detection"),
        ),
    )
    rows = [
        {
            "feature_id": r.feature_id,
            "status": r.status,
            "error": r.error,
            "accuracy": r.accuracy,
            "balanced_accuracy": r.balanced_accuracy,
            "precision": r.precision,
            "recall": r.recall,
            "true_positives": r.true_positives,
            "false_positives": r.false_positives,
            "true_negatives": r.true_negatives,
            "false_negatives": r.false_negatives,
            "n_windows": r.n_windows,
            "n_activating": r.n_activating,
            "chosen": r.chosen,
            "window_sample_ids": r.window_sample_ids,
            "window_is_activating": r.window_is_activating,
            **_call_row(r.call),
        }
        for r in records
    ]
    meta = {"layer": layer, "examples": recorded, "seed": config.detection_seed,
            "prompt_version": config.prompt_version, "describer": describer.identity()}
    scorers = config.scorer_list()
    scored: dict[str, Any] = {"detection": [detection_score_record(r) for r in records]}
    if "fuzzing" in scorers:
        scored["fuzzing"] = _run(
            _build(describer),
            lambda d: run_fuzzing(
                features, recs, d, cache, prompt_version=config.prompt_version, seed=config.detection_seed,
                threshold_frac=float(dmeta.get("threshold_frac", config.threshold_frac)), retry=config.retry(),
                concurrency=describer.concurrency, use_message_batches=describer.use_message_batches,
                progress=_progress(context, f"layer {layer} fuzzing"),
            ),
        )
    if "embedding" in scorers:
        try:
            scored["embedding"] = embedding_scores(features, recs, max_windows=config.embedding_max_windows)
        except EmbeddingModelError as e:
            raise dg.Failure(f"EmbeddingModelError: {e}") from e
    score_rows = _score_rows(complete_scores(ex.examples, recs, scored), recs)
    path = _write(lk, DETECTION, rows, DETECTION_SCHEMA, layer, meta)
    _write(lk, EXPLANATION_SCORES, score_rows, EXPLANATION_SCORES_SCHEMA, layer, {**meta, "scorers": scorers})
    ok = [r for r in records if r.status == "ok"]
    context.log.info(f"layer {layer}: detection scored {len(ok)} features -> {path}")
    summary = _scorer_summary(score_rows)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(rows),
            **call_metadata(records, cache),
            "skipped_no_holdout": len(no_holdout),
            "examples_changed": len(changed),
            "mean_accuracy": _mean([r.accuracy for r in ok if r.accuracy is not None]),
            "mean_balanced_accuracy": _mean([r.balanced_accuracy for r in ok if r.balanced_accuracy is not None]),
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


def _score_rows(records: Sequence[Any], descs: Sequence[DescriptionRecord]) -> list[dict[str, Any]]:
    by_id = {d.feature_id: d for d in descs}
    rows = []
    for r in records:
        d = by_id.get(r.feature_id)
        rows.append({
            "feature_id": r.feature_id,
            "scorer": r.scorer,
            "score": r.score,
            "n": r.n,
            "status": r.status,
            "metric": r.metric,
            "balanced_accuracy": r.balanced_accuracy,
            "n_activating": r.n_activating,
            "error": r.error,
            "description": d.description if d is not None else None,
            "description_cache_key": d.call.cache_key if d is not None else None,
            "window_sample_ids": r.window_sample_ids,
            "window_is_activating": r.window_is_activating,
            "chosen": r.chosen,
            **_call_row(r.call),
        })
    return rows


def _scorer_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for scorer in dict.fromkeys(r["scorer"] for r in rows):
        sub = [r for r in rows if r["scorer"] == scorer]
        vals = [r["score"] for r in sub if r["status"] == "ok" and r["score"] is not None]
        mean = _mean(vals)
        std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5 if vals else 0.0
        out.append({"scorer": scorer, "metric": sub[0]["metric"], "ok": len(vals), "failed": len(sub) - len(vals),
                    "mean": mean, "std": std})
    return out


@dg.asset(partitions_def=layer_partitions, group_name=GROUP, deps=[descriptions], kinds=KINDS)
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
    text = dict(items)
    rows = [
        {
            "feature_id": int(fid),
            "theme_id": c.cluster_id,
            "theme_name": c.name,
            "theme_size": c.size,
            "top_terms": c.top_terms,
            "description": text[fid],
        }
        for c in clustering.clusters
        for fid in c.members
    ]
    meta = {"layer": layer, "distance_threshold": config.theme_distance_threshold,
            "embedding_model": clustering.embedding_model}
    path = _write(lk, THEMES, rows, THEMES_SCHEMA, layer, meta)
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
