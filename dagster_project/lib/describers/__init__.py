"""LLM backends for describing, classifying and detection-scoring features, and the runners.

One interface, :class:`Describer` (``async complete(LLMRequest) -> LLMResponse``), four backends:

- :class:`AnthropicDescriber` (``anthropic_backend``): the official ``anthropic.AsyncAnthropic`` SDK
  (``base_url`` configurable), prompt caching on the fixed system block, per-call usage and an estimated
  cost, a concurrency limit, and an optional Message Batches path for bulk runs.
- :class:`OpenAICompatDescriber` (``openai_backend``): any OpenAI-compatible chat-completions server
  through the official ``openai`` SDK.
- :class:`ClaudeCLIDescriber` (``cli_backend``): ``claude -p`` run with ``asyncio.create_subprocess_exec``
  (never a shell); the prompt goes on stdin, never on the command line.
- :class:`OfflineDescriber` (``offline_backend``): no network and deterministic. Descriptions come from
  contrastive term statistics, relevance from MiniLM similarity to the rubric plus a keyword lexicon,
  detection from term overlap. It says so in its output (``backend="offline"``).

The modules: ``types`` (requests, replies, errors, prices, the interface), ``sdk`` (what the SDK
backends share), the four backends, ``calls`` (retries, backoff, the batch-API prefetch, bounded
concurrency) and the runners, each a few small per-feature callables: ``describe`` (:func:`run_describe`,
:func:`run_best_of_n`), ``classify`` (:func:`run_classify`) and ``scoring`` (:func:`run_detection`,
:func:`run_fuzzing`).

The runners make one call per feature (so one feature's reply can never alter another's record), look each
call up in the :class:`~dagster_project.lib.llm_cache.LLMCache` first, retry transport errors and invalid
replies with backoff that honours ``retry-after``, store each valid reply the moment it arrives, and record
``failed`` with the error when the attempts run out. Errors that retrying cannot fix (a bad API key, a
missing executable, an embedding model that does not load) abort the run instead.

Secrets: the API key is passed in by the caller, held privately, and never logged, cached or put
in a record or repr.
"""

from dagster_project.lib.describers.anthropic_backend import AnthropicDescriber
from dagster_project.lib.describers.calls import GenerationParams, RetryPolicy
from dagster_project.lib.describers.classify import looks_like_injection, run_classify
from dagster_project.lib.describers.cli_backend import ClaudeCLIDescriber
from dagster_project.lib.describers.describe import (
    CandidateRecord,
    candidate_examples,
    run_best_of_n,
    run_describe,
)
from dagster_project.lib.describers.errors import EmptyReplyError, LLMCallError, LLMConfigError, RefusalError
from dagster_project.lib.describers.interface import Describer
from dagster_project.lib.describers.offline_backend import (
    OfflineDescriber,
    OfflineRelevance,
    TermContrast,
    offline_description,
    term_contrast,
)
from dagster_project.lib.describers.openai_backend import (
    DEFAULT_API_KEY_ENV,
    OpenAICompatDescriber,
    redact_url,
)
from dagster_project.lib.describers.prices import (
    BATCH_DISCOUNT,
    CACHE_READ_MULTIPLIER,
    CACHE_WRITE_MULTIPLIER,
    PRICES_USD_PER_MTOK,
    estimate_cost_usd,
)
from dagster_project.lib.describers.scoring import detection_score_record, run_detection, run_fuzzing
from dagster_project.lib.describers.sdk import map_transport_error
from dagster_project.lib.describers.types import (
    DescribePayload,
    DetectPayload,
    LLMRequest,
    LLMResponse,
    ProgressFn,
)

__all__ = [
    "BATCH_DISCOUNT",
    "CACHE_READ_MULTIPLIER",
    "CACHE_WRITE_MULTIPLIER",
    "DEFAULT_API_KEY_ENV",
    "PRICES_USD_PER_MTOK",
    "AnthropicDescriber",
    "CandidateRecord",
    "ClaudeCLIDescriber",
    "DescribePayload",
    "Describer",
    "DetectPayload",
    "EmptyReplyError",
    "GenerationParams",
    "LLMCallError",
    "LLMConfigError",
    "LLMRequest",
    "LLMResponse",
    "OfflineDescriber",
    "OfflineRelevance",
    "OpenAICompatDescriber",
    "ProgressFn",
    "RefusalError",
    "RetryPolicy",
    "TermContrast",
    "candidate_examples",
    "detection_score_record",
    "estimate_cost_usd",
    "looks_like_injection",
    "map_transport_error",
    "offline_description",
    "redact_url",
    "run_best_of_n",
    "run_classify",
    "run_describe",
    "run_detection",
    "run_fuzzing",
    "term_contrast",
]
