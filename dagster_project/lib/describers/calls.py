"""Calls: the retry policy, one cached call with retries and backoff, the batch-API prefetch and bounded
concurrency, the pieces every runner is built from.

:class:`Caller` makes one call the runners' way: it looks the request up in the
:class:`~dagster_project.lib.llm_cache.LLMCache` first, retries transport errors and invalid replies with
backoff that honours ``retry-after``, stores each valid reply the moment it arrives and reports a failure
with its errors when the attempts run out. :func:`gather_bounded` runs per-feature jobs with at most
``concurrency`` in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dagster_project.lib.autointerp import CallInfo, DescriptionRecord, Prompt, ReplyParseError
from dagster_project.lib.describers.errors import LLMCallError
from dagster_project.lib.describers.interface import Describer
from dagster_project.lib.describers.types import LLMRequest, LLMResponse, ProgressFn
from dagster_project.lib.llm_cache import LLMCache, cache_key

log = logging.getLogger(__name__)

T = TypeVar("T")
Prefetched = dict[str, LLMResponse | LLMCallError]


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per call and the backoff between them.

    The delay before attempt ``k+1`` is the server's ``retry-after`` when it gave one (capped at
    ``max_retry_after_s``), else ``min(base_delay_s * 2**(k-1), max_delay_s)`` reduced by up to
    ``jitter`` (a fraction) at random.
    """

    max_attempts: int = 4
    base_delay_s: float = 2.0
    max_delay_s: float = 60.0
    max_retry_after_s: float = 600.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def delay(self, attempt: int, error: BaseException, rng: random.Random | None = None) -> float:
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            return min(float(retry_after), self.max_retry_after_s)
        base = min(self.base_delay_s * 2 ** (attempt - 1), self.max_delay_s)
        return base * (1.0 - self.jitter * (rng or random).random())


@dataclass(frozen=True)
class GenerationParams:
    """``temperature=None`` leaves the model's default (the SDK in use has no temperature argument)."""

    max_tokens: int = 600
    temperature: float | None = None


def prompt_request(
    kind: str, prompt: Prompt, prompt_version: str, params: GenerationParams, payload: Any, *,
    max_tokens: int | None = None,
) -> LLMRequest:
    """The call of a built prompt with the run's generation parameters (``max_tokens`` overrides theirs)."""
    return LLMRequest(
        kind=kind,
        system=prompt.system,
        user=prompt.user,
        prompt_version=prompt_version,
        max_tokens=params.max_tokens if max_tokens is None else max_tokens,
        temperature=params.temperature,
        payload=payload,
    )


@dataclass
class Outcome:
    """One call's result: the parsed reply when ``ok``, else the last errors; usage summed over attempts."""

    ok: bool
    parsed: Any
    error: str | None
    info: CallInfo


_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def request_key(describer: Describer, request: LLMRequest, rubric_version: str | None) -> str:
    """The call cache's key of ``request`` sent to ``describer``."""
    return cache_key(
        system=request.system,
        prompt=request.user,
        model=describer.model,
        backend=describer.backend,
        params={**request.params(), **describer.key_params(), "kind": request.kind},
        rubric_version=rubric_version,
    )


def _add_usage(info: CallInfo, resp: LLMResponse) -> None:
    info.input_tokens += resp.input_tokens
    info.output_tokens += resp.output_tokens
    info.cache_creation_input_tokens += resp.cache_creation_input_tokens
    info.cache_read_input_tokens += resp.cache_read_input_tokens
    # An unknown cost (model missing from the price table) makes the record's cost unknown.
    info.cost_usd = None if info.cost_usd is None or resp.cost_usd is None else info.cost_usd + resp.cost_usd
    info.model = resp.model
    info.backend = resp.backend


def _entry(
    resp: LLMResponse, request: LLMRequest, rubric_version: str | None, info: CallInfo
) -> dict[str, Any]:
    """The cache entry: the reply text plus the usage and cost summed over all attempts."""
    return {
        "kind": request.kind,
        "prompt_version": request.prompt_version,
        "rubric_version": rubric_version,
        "text": resp.text,
        "model": resp.model,
        "backend": resp.backend,
        "attempts": info.attempts,
        "input_tokens": info.input_tokens,
        "output_tokens": info.output_tokens,
        "cache_creation_input_tokens": info.cache_creation_input_tokens,
        "cache_read_input_tokens": info.cache_read_input_tokens,
        "cost_usd": info.cost_usd,
    }


def _from_cache(info: CallInfo, entry: dict[str, Any]) -> None:
    """Fill ``info`` from a cache entry: the model, backend, usage and cost of the call that made it."""
    info.cached = True
    info.model = str(entry.get("model", info.model))
    info.backend = str(entry.get("backend", info.backend))
    for f in _USAGE_FIELDS:
        setattr(info, f, int(entry.get(f) or 0))
    cost = entry.get("cost_usd")
    info.cost_usd = float(cost) if isinstance(cost, int | float) else None
    info.attempts = int(entry.get("attempts") or 0)


async def prefetch(
    describer: Describer,
    cache: LLMCache | None,
    requests: Sequence[LLMRequest],
    rubric_version: str | None,
) -> Prefetched:
    """Send the not-yet-cached requests through the describer's batch API, keyed by cache key."""
    todo: dict[str, LLMRequest] = {}
    for r in requests:
        key = request_key(describer, r, rubric_version)
        if key in todo:
            continue
        if cache is not None and key in cache:
            continue
        todo[key] = r
    if not todo:
        return {}
    log.info("sending %d requests through the %s batch API", len(todo), describer.backend)
    return await describer.complete_batch(todo)


@dataclass(frozen=True)
class Caller:
    """How a runner calls: the describer, the cache, the retry policy, the rubric version keyed on, the
    replies a batch API already gave (``prefetched``, consumed as they are used) and the jitter's random
    generator (one per run, shared by the run's calls)."""

    describer: Describer
    cache: LLMCache | None
    policy: RetryPolicy
    rubric_version: str | None = None
    prefetched: Prefetched | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    async def with_prefetch(self, requests: Sequence[LLMRequest], use_message_batches: bool) -> Caller:
        """This caller with ``requests`` sent through the batch API first, when asked and the describer
        has one (and there are requests); otherwise this caller."""
        if not (use_message_batches and self.describer.supports_message_batches and requests):
            return self
        got = await prefetch(self.describer, self.cache, requests, self.rubric_version)
        return dataclasses.replace(self, prefetched=got)

    async def __call__(self, request: LLMRequest, parse: Callable[[str], Any]) -> Outcome:
        """Cache lookup, then up to ``policy.max_attempts`` calls until a reply parses."""
        describer, cache, policy = self.describer, self.cache, self.policy
        key = request_key(describer, request, self.rubric_version)
        info = CallInfo(
            backend=describer.backend, model=describer.model, prompt_version=request.prompt_version, cache_key=key
        )
        if cache is not None:
            entry = cache.get(key)
            if entry is not None:
                try:
                    parsed = parse(str(entry.get("text", "")))
                except ReplyParseError as e:
                    log.warning("cached reply %s no longer validates (%s); calling again", key[:12], e)
                    cache.invalidate(key)
                else:
                    _from_cache(info, entry)
                    return Outcome(True, parsed, None, info)
        errors: list[str] = []
        for attempt in range(1, policy.max_attempts + 1):
            info.attempts = attempt
            err: LLMCallError | ReplyParseError
            try:
                pre = self.prefetched.pop(key, None) if self.prefetched is not None else None
                if isinstance(pre, LLMCallError):
                    raise pre
                resp = pre if pre is not None else await describer.complete(request)
            except LLMCallError as e:
                if e.response is not None:
                    _add_usage(info, e.response)
                err = e
            else:
                _add_usage(info, resp)
                try:
                    parsed = parse(resp.text)
                except ReplyParseError as e:
                    err = e
                else:
                    if cache is not None:
                        cache.put(key, _entry(resp, request, self.rubric_version, info))
                    return Outcome(True, parsed, None, info)
            errors.append(f"attempt {attempt}: {type(err).__name__}: {err}")
            retryable = isinstance(err, ReplyParseError) or err.retryable
            if not retryable or attempt == policy.max_attempts:
                break
            wait = policy.delay(attempt, err, self.rng)
            log.debug("%s call %s failed (%s); retrying in %.2fs", request.kind, key[:12], err, wait)
            await asyncio.sleep(wait)
        return Outcome(False, None, " | ".join(errors[-3:])[:2000], info)


async def gather_bounded(
    jobs: Sequence[Callable[[], Awaitable[T]]], concurrency: int, progress: ProgressFn | None
) -> list[T]:
    """Run ``jobs`` with at most ``concurrency`` in flight; results in job order; a job that raises
    cancels the others (TaskGroup) and the error propagates."""
    sem = asyncio.Semaphore(max(1, concurrency))
    results: list[Any] = [None] * len(jobs)
    done = 0
    total = len(jobs)

    async def run(i: int, job: Callable[[], Awaitable[T]]) -> None:
        nonlocal done
        async with sem:
            results[i] = await job()
        done += 1
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    try:
        async with asyncio.TaskGroup() as tg:
            for i, job in enumerate(jobs):
                tg.create_task(run(i, job))
    except BaseExceptionGroup as eg:
        # Surface the first real error (e.g. LLMConfigError) rather than the group wrapper.
        first = eg.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return results


def check_unique(keys: Sequence[tuple[int, int]], what: str) -> None:
    """Raise ``ValueError`` when a (layer, feature_id) stands twice in ``keys``."""
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    if dupes:
        raise ValueError(f"{what}: duplicate (layer, feature_id) {dupes[:5]}")


def ok_descriptions(descriptions: Sequence[DescriptionRecord]) -> dict[tuple[int, int], DescriptionRecord]:
    """The descriptions that came back ``ok`` (and not empty), by (layer, feature_id)."""
    return {(d.layer, d.feature_id): d for d in descriptions if d.status == "ok" and d.description}


def log_summary(what: str, records: Sequence[Any], cache: LLMCache | None) -> None:
    """Log a run's ok / failed / cached counts and its estimated cost."""
    ok = sum(1 for r in records if r.status == "ok")
    cached = sum(1 for r in records if r.call.cached)
    costs = [r.call.cost_usd for r in records if not r.call.cached and r.call.cost_usd is not None]
    log.info(
        "%s: %d ok, %d failed, %d from cache, est. cost this run $%.4f%s",
        what,
        ok,
        len(records) - ok,
        cached,
        sum(costs),
        f" (cache hits={cache.stats.hits} misses={cache.stats.misses})" if cache is not None else "",
    )
