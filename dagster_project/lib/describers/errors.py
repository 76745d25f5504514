"""The describers' errors: :class:`LLMCallError` (a call without a usable reply; :class:`RefusalError` and
:class:`EmptyReplyError` are its kinds) and :class:`LLMConfigError` (one that no retry can fix)."""

from __future__ import annotations

from dagster_project.lib.describers.types import LLMResponse


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

