"""The :class:`Describer` interface every backend implements, and :class:`PerLoop`, the per-event-loop
holder of a backend's clients and semaphores."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from dagster_project.lib.describers.errors import LLMCallError
from dagster_project.lib.describers.types import LLMRequest, LLMResponse

T = TypeVar("T")


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


