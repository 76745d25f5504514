"""The describers' request and reply types: :class:`LLMRequest` (one model call), :class:`LLMResponse`
(its answer with usage and estimated cost), the ``*Payload`` types that carry a request's structured inputs
for the offline backend, and :data:`ProgressFn`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dagster_project.lib.autointerp import (
    DEFAULT_PROMPT_VERSION,
    FeatureExamples,
    FuzzWindow,
    Rubric,
    Window,
)

ProgressFn = Callable[[int, int], None]


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

