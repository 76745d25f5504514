"""The describe runners: :func:`run_describe` (one description per feature) and :func:`run_best_of_n`
(several candidates per feature, the best kept on validation windows).

Each feature is one call (so one feature's reply can never alter another's record): :func:`describe_request`
builds it, :func:`describe_feature` makes it and returns the feature's record, ``failed`` with the error when
the attempts run out.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from dagster_project.lib.autointerp import (
    DEFAULT_PROMPT_VERSION,
    CallInfo,
    DescribeReply,
    DescriptionRecord,
    DetectionRecord,
    FeatureExamples,
    PromptError,
    build_describe_prompt,
    parse_describe_reply,
)
from dagster_project.lib.describers.calls import (
    Caller,
    GenerationParams,
    RetryPolicy,
    check_unique,
    gather_bounded,
    log_summary,
    prompt_request,
)
from dagster_project.lib.describers.interface import Describer
from dagster_project.lib.describers.scoring import run_detection
from dagster_project.lib.describers.types import DescribePayload, LLMRequest, ProgressFn
from dagster_project.lib.llm_cache import LLMCache

log = logging.getLogger(__name__)


def describe_request(
    fx: FeatureExamples, prompt_version: str, params: GenerationParams, threshold_frac: float
) -> LLMRequest:
    """The describe call for one feature; raises :class:`PromptError` when its examples make no prompt."""
    prompt = build_describe_prompt(fx, prompt_version, threshold_frac=threshold_frac)
    return prompt_request("describe", prompt, prompt_version, params, DescribePayload(fx, threshold_frac))


async def describe_feature(
    fx: FeatureExamples, request: LLMRequest | PromptError, caller: Caller, prompt_version: str
) -> DescriptionRecord:
    """One feature's description record: its call's reply, or ``failed`` with the prompt's or the call's error."""
    record = functools.partial(
        DescriptionRecord,
        layer=fx.layer,
        feature_id=fx.feature_id,
        top_sample_ids=[w.ref for w in fx.top],
        negative_sample_ids=[w.ref for w in fx.negatives],
    )
    if isinstance(request, PromptError):
        describer = caller.describer
        info = CallInfo(backend=describer.backend, model=describer.model, prompt_version=prompt_version)
        return record(status="failed", description=None, confidence=None, error=str(request), call=info)
    out = await caller(request, parse_describe_reply)
    if out.ok:
        reply: DescribeReply = out.parsed
        return record(
            status="ok", description=reply.description, confidence=reply.confidence, error=None, call=out.info
        )
    log.warning("describe failed for layer %s feature %s: %s", fx.layer, fx.feature_id, out.error)
    return record(status="failed", description=None, confidence=None, error=out.error, call=out.info)


def _request_or_error(
    fx: FeatureExamples, prompt_version: str, params: GenerationParams, threshold_frac: float
) -> LLMRequest | PromptError:
    try:
        return describe_request(fx, prompt_version, params, threshold_frac)
    except PromptError as e:
        return e


async def run_describe(
    features: Sequence[FeatureExamples],
    describer: Describer,
    cache: LLMCache | None = None,
    *,
    prompt_version: str = DEFAULT_PROMPT_VERSION,
    params: GenerationParams | None = None,
    retry: RetryPolicy | None = None,
    concurrency: int = 8,
    threshold_frac: float = 0.2,
    use_message_batches: bool = False,
    progress: ProgressFn | None = None,
) -> list[DescriptionRecord]:
    """Describe every feature (one call each); records in input order, ``failed`` ones with errors."""
    params = params or GenerationParams()
    retry = retry or RetryPolicy()
    check_unique([fx.key for fx in features], "run_describe")
    requests = [_request_or_error(fx, prompt_version, params, threshold_frac) for fx in features]
    caller = await Caller(describer, cache, retry).with_prefetch(
        [r for r in requests if isinstance(r, LLMRequest)], use_message_batches
    )
    jobs = [
        functools.partial(describe_feature, fx, req, caller, prompt_version)
        for fx, req in zip(features, requests, strict=True)
    ]
    records = await gather_bounded(jobs, concurrency, progress)
    log_summary("describe", records, cache)
    return records


# --------------------------------------------------------------------------------------------
# Best of n: several candidate descriptions per feature, chosen on validation windows
# --------------------------------------------------------------------------------------------


def candidate_examples(fx: FeatureExamples, n_candidates: int, seed: int = 0) -> list[FeatureExamples]:
    """The examples each candidate description is written from: candidate 1 sees every describer window;
    each further candidate a different seeded subset (about two thirds of the top and of the negative
    windows, at least one top window), as HypotheSAEs draws a fresh sample of examples per candidate. Only
    the describer's windows are ever used; a feature with too few windows for distinct subsets gets
    fewer candidates."""
    out = [fx]
    if n_candidates <= 1 or not fx.top:
        return out
    seen = {(tuple(range(len(fx.top))), tuple(range(len(fx.negatives))))}
    rng = random.Random(f"candidates:{seed}:{fx.layer}:{fx.feature_id}")
    k_top = max(1, math.ceil(2 * len(fx.top) / 3))
    k_neg = math.ceil(2 * len(fx.negatives) / 3)
    tries = 0
    while len(out) < n_candidates and tries < 50:
        tries += 1
        top = tuple(sorted(rng.sample(range(len(fx.top)), k_top)))
        neg = tuple(sorted(rng.sample(range(len(fx.negatives)), k_neg)))
        if (top, neg) in seen:
            continue
        seen.add((top, neg))
        out.append(dataclasses.replace(fx, top=[fx.top[i] for i in top], negatives=[fx.negatives[i] for i in neg]))
    return out


@dataclass
class CandidateRecord:
    """One candidate description of a feature with its validation detection score."""

    candidate: int
    description: DescriptionRecord
    validation: DetectionRecord | None
    is_best: bool = False

    @property
    def validation_score(self) -> float | None:
        v = self.validation
        return v.balanced_accuracy if v is not None and v.status == "ok" else None


def _best(cs: Sequence[CandidateRecord]) -> CandidateRecord:
    """The candidate kept: among the ``ok`` ones (all when none is), the highest validation score, ties and
    unscored ones to the lower candidate number."""
    pool = [c for c in cs if c.description.status == "ok"] or list(cs)
    return max(pool, key=lambda c: (c.validation_score if c.validation_score is not None else -1.0, -c.candidate))


async def run_best_of_n(
    features: Sequence[FeatureExamples],
    describer: Describer,
    cache: LLMCache | None = None,
    *,
    n_candidates: int = 1,
    seed: int = 0,
    prompt_version: str = DEFAULT_PROMPT_VERSION,
    retry: RetryPolicy | None = None,
    concurrency: int = 8,
    threshold_frac: float = 0.2,
    use_message_batches: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[list[DescriptionRecord], list[list[CandidateRecord]]]:
    """Describe every feature ``n_candidates`` times (:func:`candidate_examples`), score each ``ok``
    candidate by detection on the feature's validation windows (shown to no describer and never used by
    the scorers of ``explanation_scores``) and keep the best (highest balanced accuracy; ties and
    unscored candidates: the lower candidate number, so candidate 1 when nothing could be scored).

    Returns the kept record per feature (input order) and every feature's candidates. With one
    candidate this is :func:`run_describe` and no validation call is made."""
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    retry = retry or RetryPolicy()
    per_feature = [candidate_examples(fx, n_candidates, seed) for fx in features]
    rounds = max((len(c) for c in per_feature), default=0)
    cands: list[list[CandidateRecord]] = [[] for _ in features]
    for k in range(rounds):  # one round per candidate number: (layer, feature) is unique within a round
        idx = [i for i, c in enumerate(per_feature) if len(c) > k]
        recs = await run_describe(
            [per_feature[i][k] for i in idx], describer, cache, prompt_version=prompt_version, retry=retry,
            concurrency=concurrency, threshold_frac=threshold_frac, use_message_batches=use_message_batches,
            progress=progress if k == 0 else None,
        )
        vals: dict[int, DetectionRecord] = {}
        if n_candidates > 1:
            held = [dataclasses.replace(features[i], holdout=features[i].validation,
                                        holdout_negatives=features[i].validation_negatives) for i in idx]
            det = await run_detection(
                [h for h in held if h.holdout or h.holdout_negatives], recs, describer, cache,
                prompt_version=prompt_version, seed=seed, retry=retry, concurrency=concurrency,
                use_message_batches=use_message_batches,
            )
            vals = {r.feature_id: r for r in det}
        for i, rec in zip(idx, recs, strict=True):
            cands[i].append(CandidateRecord(candidate=k + 1, description=rec, validation=vals.get(rec.feature_id)))
    kept: list[DescriptionRecord] = []
    for cs in cands:
        best = _best(cs)
        best.is_best = True
        kept.append(best.description)
    return kept, cands
