"""The describers' request and reply types, errors, prices and the :class:`Describer` interface.

:class:`LLMRequest` / :class:`LLMResponse` are one model call and its answer; :class:`LLMCallError` (with
:class:`RefusalError`, :class:`EmptyReplyError`) a call without a usable reply, :class:`LLMConfigError` one
that no retry can fix. :func:`estimate_cost_usd` prices a call from :data:`PRICES_USD_PER_MTOK`. The
``*Payload`` types carry a request's structured inputs for the offline backend. :class:`PerLoop` holds a
backend's clients and semaphores per event loop.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dagster_project.lib.autointerp import (
    DEFAULT_PROMPT_VERSION,
    FeatureExamples,
    FuzzWindow,
    Rubric,
    Window,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
ProgressFn = Callable[[int, int], None]

# --------------------------------------------------------------------------------------------
# Requests, responses, errors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMRequest:
    """One model call. ``system`` is the fixed (cacheable) instruction block, ``user`` the data.

    ``payload`` carries the structured inputs the prompt was built from; only the offline backend
    reads it. It is not sent anywhere and not part of the cache key (the prompt text is).
    """

    kind: str
    system: str
    user: str
    prompt_version: str = DEFAULT_PROMPT_VERSION
    max_tokens: int = 600
    temperature: float | None = None
    payload: Any = field(default=None, compare=False, repr=False)

    def params(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature}


@dataclass(frozen=True)
class LLMResponse:
    text: str
    model: str
    backend: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float | None = None
    stop_reason: str | None = None


class LLMCallError(Exception):
    """A call that produced no usable reply. ``retryable`` says whether trying again can help;
    ``retry_after`` is the server's requested wait in seconds; ``response`` keeps the usage of a
    call that did complete (a refusal or an empty reply still costs tokens)."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        retry_after: float | None = None,
        response: LLMResponse | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.response = response


class RefusalError(LLMCallError):
    """The model stopped with ``stop_reason == "refusal"``."""


class EmptyReplyError(LLMCallError):
    """The reply had no text."""


class LLMConfigError(RuntimeError):
    """A configuration error no retry can fix (bad API key, missing executable): aborts the run."""


# --------------------------------------------------------------------------------------------
# Prices (estimates)
# --------------------------------------------------------------------------------------------

# USD per million tokens (input, output) by model-name prefix (longest prefix wins), from Anthropic's
# public price list when this was written. A model not listed gets cost None (unknown) and a warning. An ESTIMATE for budgeting, not a bill: check current prices. Cache writes
# (5-minute TTL) cost 1.25x input, cache reads 0.1x input; the Batches API halves everything.
PRICES_USD_PER_MTOK: dict[str, tuple[float, float]] = {
    # 4.6 models: assumed equal to the previous model of their tier. Verify before budgeting.
    "claude-opus-4-6": (5.0, 25.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "claude-3-haiku": (0.25, 1.25),
}
CACHE_WRITE_MULTIPLIER = 1.25
CACHE_READ_MULTIPLIER = 0.10
BATCH_DISCOUNT = 0.5
_warned_models: set[str] = set()


def estimate_cost_usd(
    model: str,
    *,
    input_tokens: int,
    output_tokens: int,
    cache_creation_input_tokens: int = 0,
    cache_read_input_tokens: int = 0,
    batch: bool = False,
) -> float | None:
    """Estimated USD cost of one call from :data:`PRICES_USD_PER_MTOK`; None for an unknown model."""
    match = max((p for p in PRICES_USD_PER_MTOK if model.startswith(p)), key=len, default=None)
    if match is None:
        if model not in _warned_models:
            _warned_models.add(model)
            log.warning("no price for model %r: cost recorded as unknown", model)
        return None
    price_in, price_out = PRICES_USD_PER_MTOK[match]
    cost = (
        input_tokens * price_in
        + cache_creation_input_tokens * price_in * CACHE_WRITE_MULTIPLIER
        + cache_read_input_tokens * price_in * CACHE_READ_MULTIPLIER
        + output_tokens * price_out
    ) / 1e6
    return cost * (BATCH_DISCOUNT if batch else 1.0)


# --------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------


class Describer(abc.ABC):
    """A backend that answers one prompt. ``backend`` and ``model`` are recorded and keyed on."""

    backend: str = ""
    model: str = ""
    supports_message_batches: bool = False

    @abc.abstractmethod
    async def complete(self, request: LLMRequest) -> LLMResponse:
        """Answer ``request``; raise :class:`LLMCallError` (or :class:`LLMConfigError`) on failure."""

    async def complete_batch(
        self, requests: Mapping[str, LLMRequest]
    ) -> dict[str, LLMResponse | LLMCallError]:
        """Answer many requests at once (keys are ids); only backends with a batch API override it."""
        raise NotImplementedError(f"{type(self).__name__} has no batch API")

    def key_params(self) -> dict[str, Any]:
        """Backend settings that change replies and so belong in the cache key."""
        return {}

    def prime_classify(self, descriptions: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Called with the descriptions about to be classified (uncached ones) before any classify call;
        a backend may precompute for them in bulk. A no-op by default."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release clients and connections."""


class PerLoop:
    """Objects (clients, semaphores) bound to the running event loop, rebuilt for a new loop.

    Dagster assets may call ``asyncio.run`` more than once on the same describer instance.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._items: dict[str, Any] = {}

    def get(self, name: str, factory: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._items = {}
        if name not in self._items:
            self._items[name] = factory()
        return self._items[name]

    def pop_all(self) -> dict[str, Any]:
        items, self._items, self._loop = self._items, {}, None
        return items



# --------------------------------------------------------------------------------------------
# Structured request payloads (read by the offline backend only)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DescribePayload:
    features: FeatureExamples
    threshold_frac: float = 0.2


@dataclass(frozen=True)
class ClassifyPayload:
    description: str
    rubric: Rubric


@dataclass(frozen=True)
class ClassifyBatchPayload:
    items: tuple[tuple[str, str], ...]
    rubric: Rubric


@dataclass(frozen=True)
class DetectPayload:
    description: str
    windows: tuple[Window, ...]


@dataclass(frozen=True)
class FuzzPayload:
    description: str
    windows: tuple[FuzzWindow, ...]

