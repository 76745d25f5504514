"""The scoring runners: :func:`run_detection` and :func:`run_fuzzing`, a description judged by a model that
sees only it and held-out windows.

Both are one skeleton (:func:`_run_scorer`: the unique-key check, the ``ok`` descriptions by key, the
batch-API prefetch, bounded concurrency and the log summary) over two small per-feature callables each: a
``prepare`` that builds the feature's job (its windows, their truth and the request; None to skip it) and a
``record`` that turns the call's outcome into the feature's record.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from dagster_project.lib.autointerp import (
    DEFAULT_PROMPT_VERSION,
    DescriptionRecord,
    DetectionRecord,
    FeatureExamples,
    FuzzWindow,
    ScoreRecord,
    Window,
    build_detect_prompt,
    build_fuzz_prompt,
    detection_scores,
    fuzz_windows,
    parse_detect_reply,
    parse_fuzz_reply,
)
from dagster_project.lib.describers.calls import (
    Caller,
    GenerationParams,
    Outcome,
    RetryPolicy,
    check_unique,
    gather_bounded,
    log_summary,
    ok_descriptions,
    prompt_request,
)
from dagster_project.lib.describers.interface import Describer
from dagster_project.lib.describers.types import DetectPayload, FuzzPayload, LLMRequest, ProgressFn
from dagster_project.lib.llm_cache import LLMCache

log = logging.getLogger(__name__)


class _Job(Protocol):
    """One feature's scoring call: the request and how its reply parses."""

    @property
    def request(self) -> LLMRequest: ...

    def parse(self, text: str) -> Any: ...


J = TypeVar("J", bound=_Job)
R = TypeVar("R")


async def _run_scorer(
    name: str,
    features: Sequence[FeatureExamples],
    descriptions: Sequence[DescriptionRecord],
    caller: Caller,
    prepare: Callable[[FeatureExamples, DescriptionRecord], J | None],
    record: Callable[[J, Outcome], R],
    *,
    concurrency: int,
    use_message_batches: bool,
    progress: ProgressFn | None,
) -> list[R]:
    """Score each feature with an ``ok`` description that ``prepare`` makes a job of; records in input order."""
    by_key = ok_descriptions(descriptions)
    check_unique([fx.key for fx in features], f"run_{name}")
    jobs: list[J] = []
    for fx in features:
        d = by_key.get(fx.key)
        job = prepare(fx, d) if d is not None else None
        if job is not None:
            jobs.append(job)
    caller = await caller.with_prefetch([j.request for j in jobs], use_message_batches)

    async def score(job: J) -> R:
        return record(job, await caller(job.request, job.parse))

    calls: list[Callable[[], Awaitable[R]]] = [functools.partial(score, j) for j in jobs]
    records = await gather_bounded(calls, concurrency, progress)
    log_summary(name, records, caller.cache)
    return records


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectJob:
    """A feature's detection call: the shuffled held-out windows and which of them activate."""

    fx: FeatureExamples
    windows: list[Window]
    truth: list[bool]
    request: LLMRequest

    def parse(self, text: str) -> Any:
        return parse_detect_reply(text, len(self.windows))


def detect_job(
    fx: FeatureExamples, d: DescriptionRecord, *, seed: int, prompt_version: str, params: GenerationParams
) -> DetectJob | None:
    """``holdout`` (activating) and ``holdout_negatives`` (not), shuffled with a generator seeded by
    ``(seed, layer, feature)``, and the detect request; None for a feature without held-out windows."""
    windows = [*fx.holdout, *fx.holdout_negatives]
    if not windows:
        log.info("detection: feature %s/%s has no held-out windows; skipped", fx.layer, fx.feature_id)
        return None
    truth = [True] * len(fx.holdout) + [False] * len(fx.holdout_negatives)
    order = list(range(len(windows)))
    random.Random(f"{seed}:{fx.layer}:{fx.feature_id}").shuffle(order)
    windows = [windows[k] for k in order]
    truth = [truth[k] for k in order]
    prompt = build_detect_prompt(d.description or "", windows, prompt_version)
    payload = DetectPayload(d.description or "", tuple(windows))
    return DetectJob(fx, windows, truth, prompt_request("detect", prompt, prompt_version, params, payload))


def detection_record(job: DetectJob, out: Outcome) -> DetectionRecord:
    """The detection record: the choice, confusion counts, accuracy and balanced accuracy (None when failed)."""
    s = detection_scores(out.parsed.chosen, job.truth) if out.ok else None
    return DetectionRecord(
        layer=job.fx.layer,
        feature_id=job.fx.feature_id,
        n_windows=len(job.windows),
        n_activating=sum(job.truth),
        window_sample_ids=[w.ref for w in job.windows],
        window_is_activating=job.truth,
        call=out.info,
        status="ok" if s is not None else "failed",
        error=out.error,
        chosen=sorted(out.parsed.chosen) if s is not None else [],
        true_positives=s.tp if s is not None else None,
        false_positives=s.fp if s is not None else None,
        true_negatives=s.tn if s is not None else None,
        false_negatives=s.fn if s is not None else None,
        accuracy=s.accuracy if s is not None else None,
        balanced_accuracy=s.balanced_accuracy if s is not None else None,
        precision=s.precision if s is not None else None,
        recall=s.recall if s is not None else None,
    )


async def run_detection(
    features: Sequence[FeatureExamples],
    descriptions: Sequence[DescriptionRecord],
    describer: Describer,
    cache: LLMCache | None = None,
    *,
    prompt_version: str = DEFAULT_PROMPT_VERSION,
    seed: int = 0,
    params: GenerationParams | None = None,
    retry: RetryPolicy | None = None,
    concurrency: int = 8,
    use_message_batches: bool = False,
    progress: ProgressFn | None = None,
) -> list[DetectionRecord]:
    """Detection scoring: from its description alone, pick the held-out windows that activate.

    For each feature with an ``ok`` description and held-out windows, ``holdout`` (activating) and
    ``holdout_negatives`` (not) are shuffled with a generator seeded by ``(seed, layer, feature)``;
    the record stores the choice, confusion counts, accuracy and balanced accuracy.
    """
    params = params or GenerationParams(max_tokens=300)
    prepare = functools.partial(detect_job, seed=seed, prompt_version=prompt_version, params=params)
    return await _run_scorer(
        "detection", features, descriptions, Caller(describer, cache, retry or RetryPolicy()),
        prepare, detection_record,
        concurrency=concurrency, use_message_batches=use_message_batches, progress=progress,
    )


def detection_score_record(r: DetectionRecord) -> ScoreRecord:
    """A detection record as a row of ``explanation_scores`` (scorer ``detection``)."""
    return ScoreRecord(
        layer=r.layer,
        feature_id=r.feature_id,
        scorer="detection",
        status=r.status,
        error=r.error,
        score=r.balanced_accuracy,
        metric="balanced_accuracy",
        balanced_accuracy=r.balanced_accuracy,
        n=r.n_windows,
        n_activating=r.n_activating,
        window_sample_ids=list(r.window_sample_ids),
        window_is_activating=list(r.window_is_activating),
        chosen=list(r.chosen),
        call=r.call,
    )


# --------------------------------------------------------------------------------------------
# Fuzzing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FuzzJob:
    """A feature's fuzzing call: its held-out activating windows, each marked once."""

    fx: FeatureExamples
    windows: list[FuzzWindow]
    request: LLMRequest

    def parse(self, text: str) -> Any:
        return parse_fuzz_reply(text, len(self.windows))


def fuzz_job(
    fx: FeatureExamples,
    d: DescriptionRecord,
    *,
    seed: int,
    threshold_frac: float,
    prompt_version: str,
    params: GenerationParams,
) -> FuzzJob | None:
    """The feature's marked windows (:func:`~dagster_project.lib.autointerp.fuzz_windows`) and the fuzz
    request; None for a feature without held-out activating windows."""
    if not fx.holdout:
        return None
    fws = fuzz_windows(fx.holdout, threshold_frac=threshold_frac, seed=f"{seed}:{fx.layer}:{fx.feature_id}")
    prompt = build_fuzz_prompt(d.description or "", fws, prompt_version)
    payload = FuzzPayload(d.description or "", tuple(fws))
    return FuzzJob(fx, fws, prompt_request("fuzz", prompt, prompt_version, params, payload))


def fuzzing_record(job: FuzzJob, out: Outcome) -> ScoreRecord:
    """The fuzzing row of ``explanation_scores``: balanced accuracy of the chosen marks (None when failed)."""
    truth = [fw.correct for fw in job.windows]
    s = detection_scores(out.parsed.chosen, truth) if out.ok else None
    return ScoreRecord(
        layer=job.fx.layer,
        feature_id=job.fx.feature_id,
        scorer="fuzzing",
        metric="balanced_accuracy",
        n=len(job.windows),
        n_activating=sum(truth),
        window_sample_ids=[fw.window.ref for fw in job.windows],
        window_is_activating=truth,
        call=out.info,
        status="ok" if s is not None else "failed",
        error=out.error,
        score=s.balanced_accuracy if s is not None else None,
        balanced_accuracy=s.balanced_accuracy if s is not None else None,
        chosen=sorted(out.parsed.chosen) if s is not None else [],
    )


async def run_fuzzing(
    features: Sequence[FeatureExamples],
    descriptions: Sequence[DescriptionRecord],
    describer: Describer,
    cache: LLMCache | None = None,
    *,
    prompt_version: str = DEFAULT_PROMPT_VERSION,
    seed: int = 0,
    threshold_frac: float = 0.2,
    params: GenerationParams | None = None,
    retry: RetryPolicy | None = None,
    concurrency: int = 8,
    use_message_batches: bool = False,
    progress: ProgressFn | None = None,
) -> list[ScoreRecord]:
    """Fuzzing (delphi's token-level scorer): each held-out activating window is shown once with marks, a
    seeded half on its firing tokens and half on as many decoy tokens where the feature is silent
    (:func:`~dagster_project.lib.autointerp.fuzz_windows`); from the description alone the scorer says
    which marks fit. Balanced accuracy of those choices against the truth. Only features with an ``ok``
    description and held-out activating windows are scored (the caller records the others)."""
    params = params or GenerationParams(max_tokens=300)
    prepare = functools.partial(
        fuzz_job, seed=seed, threshold_frac=threshold_frac, prompt_version=prompt_version, params=params
    )
    return await _run_scorer(
        "fuzzing", features, descriptions, Caller(describer, cache, retry or RetryPolicy()),
        prepare, fuzzing_record,
        concurrency=concurrency, use_message_batches=use_message_batches, progress=progress,
    )
