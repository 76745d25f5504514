"""What the two SDK backends (Anthropic, OpenAI-compatible) share: :func:`map_transport_error`, which turns
either SDK's transport errors into the runner's :class:`~dagster_project.lib.describers.errors.LLMCallError`,
and :class:`SDKDescriber`, the base that maps every SDK error of a call, bounds concurrency per event loop
and closes the client."""

from __future__ import annotations

import abc
import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dagster_project.lib.describers.errors import LLMCallError
from dagster_project.lib.describers.interface import Describer, PerLoop

T = TypeVar("T")


def _retry_after_from_headers(headers: Any) -> float | None:
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except (TypeError, ValueError):
            continue
    return None


def map_transport_error(sdk: Any, err: BaseException, timeout_s: float) -> BaseException:
    """An SDK error that is not about credentials or routing, as the runner's :class:`LLMCallError`: HTTP
    status errors (408, 409, 429 and 5xx retryable; ``retry-after`` read on 429 / 503 / 529), timeouts,
    connection errors and malformed bodies. ``sdk`` is the ``anthropic`` or ``openai`` module (both SDKs
    name these exceptions alike); anything else is returned as it is."""
    if isinstance(err, sdk.APIStatusError):
        status = err.status_code
        retryable = status in (408, 409, 429) or status >= 500
        return LLMCallError(
            f"HTTP {status} {type(err).__name__}: {str(err)[:300]}",
            retryable=retryable,
            retry_after=_retry_after_from_headers(err.response.headers) if status in (429, 503, 529) else None,
        )
    if isinstance(err, sdk.APITimeoutError):
        return LLMCallError(f"timeout after {timeout_s}s", retryable=True)
    if isinstance(err, sdk.APIConnectionError):
        return LLMCallError(f"connection error: {err}", retryable=True)
    if isinstance(err, sdk.APIResponseValidationError | json.JSONDecodeError):
        return LLMCallError(f"malformed response body: {str(err)[:300]}", retryable=True)
    return err



class SDKDescriber(Describer):
    """A backend over an async SDK client: ``_client()`` builds it (once per event loop, in ``_per_loop``),
    ``_map_error`` says what each SDK error means, and :meth:`_mapped` runs a call under that mapping."""

    max_concurrency: int
    _per_loop: PerLoop

    @abc.abstractmethod
    def _map_error(self, err: BaseException) -> BaseException:
        """``err`` as an :class:`LLMCallError` or ``LLMConfigError``; an error it does not know, unchanged."""

    def _semaphore(self) -> asyncio.Semaphore:
        return self._per_loop.get("semaphore", lambda: asyncio.Semaphore(self.max_concurrency))

    async def _mapped(self, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call()``; an error it raises leaves as :meth:`_map_error` maps it (chained to the original)."""
        try:
            return await call()
        except Exception as e:
            mapped = self._map_error(e)
            if mapped is e:
                raise
            raise mapped from e

    async def aclose(self) -> None:
        client = self._per_loop.pop_all().get("client")
        if client is not None:
            await client.close()
