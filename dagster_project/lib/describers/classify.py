"""The classify runner: :func:`run_classify` judges each ``ok`` description against a rubric.

One call per description (:func:`classify_single`), or with ``batch_size > 1`` several descriptions per
call (:func:`classify_batch`) whose reply must name exactly the ids asked; a batch that fails falls back to
single calls. A description that :func:`looks_like_injection` is never batched with others, so even a
model that obeyed it could only affect its own record.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from dagster_project.lib.autointerp import (
    DEFAULT_PROMPT_VERSION,
    CallInfo,
    ClassificationRecord,
    ClassifyReply,
    DescriptionRecord,
    Rubric,
    build_classify_batch_prompt,
    build_classify_prompt,
    parse_classify_batch_reply,
    parse_classify_reply,
)
from dagster_project.lib.describers.calls import (
    Caller,
    GenerationParams,
    RetryPolicy,
    check_unique,
    gather_bounded,
    log_summary,
    prompt_request,
    request_key,
)
from dagster_project.lib.describers.interface import Describer
from dagster_project.lib.describers.types import ClassifyBatchPayload, ClassifyPayload, LLMRequest, ProgressFn
from dagster_project.lib.llm_cache import LLMCache

log = logging.getLogger(__name__)

_INJECTION_PATTERNS = re.compile(
    r"ignore (all |any )?(the )?(previous|prior|above|earlier)|disregard|system prompt|\binstructions?\b|"
    r"\boutput (a |the )?score|\bscore (of )?10\b|for (every|each|all) (other )?features?|you are now|"
    r"\bassistant\s*:|[{}]|\"(score|category|results|id)\"",
    re.I,
)


def looks_like_injection(text: str) -> bool:
    """Heuristic: does a description contain instruction-like text? Such descriptions are never
    batched with others, so even a model that obeyed them could only affect their own record."""
    return bool(_INJECTION_PATTERNS.search(text))


@dataclass(frozen=True)
class _Classify:
    """What every classify call of one run shares."""

    rubric: Rubric
    prompt_version: str
    params: GenerationParams

    def request(self, description: str) -> LLMRequest:
        """The single classify call for ``description``."""
        prompt = build_classify_prompt(description, self.rubric, self.prompt_version)
        payload = ClassifyPayload(description, self.rubric)
        return prompt_request("classify", prompt, self.prompt_version, self.params, payload)

    def batch_request(self, items: tuple[tuple[str, str], ...]) -> LLMRequest:
        """The batched classify call for ``items`` ((id, description) pairs)."""
        prompt = build_classify_batch_prompt(items, self.rubric, self.prompt_version)
        payload = ClassifyBatchPayload(items, self.rubric)
        return prompt_request(
            "classify_batch", prompt, self.prompt_version, self.params, payload,
            max_tokens=max(self.params.max_tokens, 120 * len(items)),
        )

    def record(
        self, d: DescriptionRecord, info: CallInfo, reply: ClassifyReply | None, batched: bool,
        error: str | None = None,
    ) -> ClassificationRecord:
        """The classification record of ``d``: ``ok`` with the reply, else ``failed`` with ``error``."""
        return ClassificationRecord(
            layer=d.layer,
            feature_id=d.feature_id,
            status="ok" if reply is not None else "failed",
            score=reply.score if reply else None,
            category=reply.category if reply else None,
            themes=list(reply.themes) if reply else [],
            error=None if reply is not None else error,
            rubric_version=self.rubric.version,
            description=d.description or "",
            description_cache_key=d.call.cache_key,
            batched=batched,
            call=info,
        )


class _Progress:
    """Counts classified features for ``progress(done, total)``."""

    def __init__(self, progress: ProgressFn | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        if progress is not None:
            progress(0, total)

    def tick(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


def _split(
    todo: Sequence[DescriptionRecord], batch_size: int
) -> tuple[list[DescriptionRecord], list[list[DescriptionRecord]]]:
    """(classified singly, batches): with ``batch_size > 1`` the clean descriptions go in batches of that
    size and those that look like prompt injection singly; otherwise all singly."""
    if batch_size <= 1:
        return list(todo), []
    clean = [d for d in todo if not looks_like_injection(d.description or "")]
    flagged = [d for d in todo if looks_like_injection(d.description or "")]
    if flagged:
        log.warning("classify: %d descriptions look like prompt injection; classified singly", len(flagged))
    return flagged, [clean[i : i + batch_size] for i in range(0, len(clean), batch_size)]


def _prime(describer: Describer, cache: LLMCache | None, todo: Sequence[DescriptionRecord], how: _Classify) -> None:
    """Hand the descriptions not yet classified in the cache to the describer's ``prime_classify``."""
    uncached = [
        d.description or ""
        for d in todo
        if cache is None or request_key(describer, how.request(d.description or ""), how.rubric.version) not in cache
    ]
    if uncached:
        describer.prime_classify(uncached)


def _share(info: CallInfo, n: int) -> CallInfo:
    """An equal share (of ``n``) of a batch call's usage and cost, for each feature's record."""
    return dataclasses.replace(
        info,
        input_tokens=info.input_tokens // n,
        output_tokens=info.output_tokens // n,
        cache_creation_input_tokens=info.cache_creation_input_tokens // n,
        cache_read_input_tokens=info.cache_read_input_tokens // n,
        cost_usd=info.cost_usd / n if info.cost_usd is not None else None,
    )


async def classify_single(
    d: DescriptionRecord, caller: Caller, how: _Classify, progress: _Progress
) -> ClassificationRecord:
    """Classify one description in a call of its own."""
    out = await caller(how.request(d.description or ""), functools.partial(parse_classify_reply, rubric=how.rubric))
    progress.tick(1)
    return how.record(d, out.info, out.parsed if out.ok else None, False, out.error)


async def classify_batch(
    group: Sequence[DescriptionRecord], caller: Caller, how: _Classify, progress: _Progress
) -> list[ClassificationRecord] | None:
    """Classify ``group`` in one call; None when the call fails (its features are then classified singly)."""
    ids = [f"item-{k}" for k in range(1, len(group) + 1)]
    items = tuple(zip(ids, (d.description or "" for d in group), strict=True))
    out = await caller(how.batch_request(items), lambda t: parse_classify_batch_reply(t, ids, how.rubric))
    if not out.ok:
        log.warning("classify batch of %d failed (%s); classifying its features singly", len(group), out.error)
        return None
    share = _share(out.info, len(group))
    records = [how.record(d, share, out.parsed[item_id], True) for item_id, d in zip(ids, group, strict=True)]
    progress.tick(len(group))
    return records


async def run_classify(
    descriptions: Sequence[DescriptionRecord],
    describer: Describer,
    cache: LLMCache | None = None,
    *,
    rubric: Rubric,
    prompt_version: str = DEFAULT_PROMPT_VERSION,
    params: GenerationParams | None = None,
    retry: RetryPolicy | None = None,
    concurrency: int = 8,
    batch_size: int = 1,
    batch_attempts: int = 2,
    use_message_batches: bool = False,
    progress: ProgressFn | None = None,
) -> list[ClassificationRecord]:
    """Classify each ``ok`` description against ``rubric``; ``failed`` descriptions are skipped.

    ``batch_size > 1`` puts several descriptions in one call; the reply's ids must match exactly
    the ids asked, otherwise (after ``batch_attempts``) the batch's features are classified singly.
    Descriptions that look like prompt injection are always classified singly.
    """
    how = _Classify(rubric, prompt_version, params or GenerationParams(max_tokens=200))
    retry = retry or RetryPolicy()
    todo = [d for d in descriptions if d.status == "ok" and d.description]
    skipped = len(descriptions) - len(todo)
    if skipped:
        log.info("classify: skipping %d features whose description failed", skipped)
    check_unique([(d.layer, d.feature_id) for d in todo], "run_classify")
    caller = Caller(describer, cache, retry, rubric_version=rubric.version)
    singles, batches = _split(todo, batch_size)
    _prime(describer, cache, todo, how)
    ticks = _Progress(progress, len(todo))
    records: dict[tuple[int, int], ClassificationRecord] = {}
    if batches:
        batch_caller = dataclasses.replace(
            caller, policy=dataclasses.replace(retry, max_attempts=min(batch_attempts, retry.max_attempts))
        )
        batch_jobs: list[Callable[[], Awaitable[list[ClassificationRecord] | None]]] = [
            functools.partial(classify_batch, g, batch_caller, how, ticks) for g in batches
        ]
        for group, got in zip(batches, await gather_bounded(batch_jobs, concurrency, None), strict=True):
            if got is None:
                singles.extend(group)
            else:
                records.update({(r.layer, r.feature_id): r for r in got})
    caller = await caller.with_prefetch([how.request(d.description or "") for d in singles], use_message_batches)
    single_jobs = [functools.partial(classify_single, d, caller, how, ticks) for d in singles]
    records.update({(r.layer, r.feature_id): r for r in await gather_bounded(single_jobs, concurrency, None)})
    out_records = [records[(d.layer, d.feature_id)] for d in todo]
    log_summary("classify", out_records, cache)
    return out_records
