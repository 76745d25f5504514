"""The describer resource: which LLM backend describes, classifies and detection-scores features.

``backend`` is ``offline`` (no network, deterministic: term contrast + MiniLM), ``anthropic`` (the official
SDK; ``base_url`` may point at a proxy or the local test server) or ``claude-cli`` (``claude -p``).

The API key: :func:`describer_resource` fills ``api_key`` from ``dg.EnvVar("ANTHROPIC_API_KEY")`` and only
when the backend is ``anthropic``, so Dagster stores the variable's *name* in run and job records and reads
its value when the step starts. The value is held by the resource (hidden from its repr), handed to the SDK
client, and never logged, cached, written to the lake or put in asset metadata.
"""

from __future__ import annotations

from typing import Literal

import dagster as dg
from pydantic import Field

from dagster_project.config import DescriberSpec
from dagster_project.lib.describers import (
    AnthropicDescriber,
    ClaudeCLIDescriber,
    Describer,
    LLMConfigError,
    OfflineDescriber,
)

API_KEY_ENV = "ANTHROPIC_API_KEY"
Backend = Literal["offline", "anthropic", "claude-cli"]


class DescriberResource(dg.ConfigurableResource):
    """An LLM backend for the describe assets (see the module docstring)."""

    backend: Backend = Field(default="offline", description="offline | anthropic | claude-cli")
    model: str = Field(
        default="term-contrast+minilm",
        description="the model name recorded (offline) or asked for (anthropic: e.g. claude-sonnet-4-6; "
        "claude-cli: e.g. sonnet)",
    )
    concurrency: int = Field(default=8, ge=1, description="calls in flight at once")
    base_url: str | None = Field(default=None, description="Anthropic API base URL (None: the SDK default)")
    api_key: str | None = Field(
        default=None,
        repr=False,
        description="Anthropic API key; set it with dg.EnvVar('ANTHROPIC_API_KEY'), never as a literal",
    )
    use_message_batches: bool = Field(
        default=False, description="send uncached calls through the Message Batches API (half price, slow)"
    )
    timeout_s: float = Field(default=120.0, gt=0, description="per-call timeout (anthropic, claude-cli)")
    sdk_max_retries: int = Field(default=2, ge=0, description="retries inside the Anthropic SDK per attempt")
    batch_poll_interval_s: float = Field(default=30.0, gt=0, description="Message Batches polling interval")
    claude_executable: str = Field(default="claude", description="the claude CLI (backend claude-cli)")

    def build(self) -> Describer:
        """A fresh describer; errors that no retry can fix (no key) raise :class:`LLMConfigError`."""
        if self.backend == "offline":
            return OfflineDescriber(model=self.model)
        if self.backend == "anthropic":
            if not self.api_key:
                raise LLMConfigError(
                    f"the anthropic describer needs an API key: set {API_KEY_ENV} in the environment of the "
                    "Dagster code location (the profile reads it with dg.EnvVar)"
                )
            return AnthropicDescriber(
                api_key=self.api_key,
                model=self.model,
                base_url=self.base_url,
                max_concurrency=self.concurrency,
                timeout_s=self.timeout_s,
                sdk_max_retries=self.sdk_max_retries,
                batch_poll_interval_s=self.batch_poll_interval_s,
            )
        return ClaudeCLIDescriber(
            model=self.model,
            executable=self.claude_executable,
            timeout_s=self.timeout_s,
            max_concurrency=self.concurrency,
        )

    def identity(self) -> dict[str, object]:
        """What the outputs record about the backend (never the key)."""
        return {
            "backend": self.backend,
            "model": self.model,
            "concurrency": self.concurrency,
            "base_url": self.base_url,
            "use_message_batches": self.use_message_batches,
        }


def describer_resource(spec: DescriberSpec, base_url: str | None = None) -> DescriberResource:
    """The resource of a profile's describer; the API key comes from the environment (anthropic only)."""
    return DescriberResource(
        backend=spec.backend,
        model=spec.model,
        concurrency=spec.concurrency,
        base_url=base_url,
        api_key=dg.EnvVar(API_KEY_ENV) if spec.backend == "anthropic" else None,
    )
