"""The describer resource: which LLM backend describes, classifies and detection-scores features.

``backend`` is ``offline`` (no network, deterministic: term contrast + MiniLM), ``anthropic`` (the official
SDK; ``base_url`` may point at a proxy or the local test server), ``claude-cli`` (``claude -p``) or ``openai``
(any OpenAI-compatible chat-completions server: vLLM, llama.cpp's ``llama-server``, Ollama, OpenAI itself;
``base_url`` is its API root, e.g. ``http://localhost:8000/v1``; see
:mod:`dagster_project.lib.openai_backend`).

The API key: :func:`describer_resource` fills ``api_key`` from ``dg.EnvVar("ANTHROPIC_API_KEY")`` when the
backend is ``anthropic``, and from ``dg.EnvVar(spec.api_key_env)`` (``OPENAI_API_KEY`` by default) when it
is ``openai`` and that variable is set (local servers need no key: when it is unset, none is sent). Dagster
stores the variable's *name* in run and job records and reads its value when the step starts. The value is
held by the resource (hidden from its repr), handed to the SDK client, and never logged, cached, written to
the lake or put in asset metadata.
"""

from __future__ import annotations

import os
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
from dagster_project.lib.openai_backend import DEFAULT_API_KEY_ENV, OpenAICompatDescriber, redact_url

API_KEY_ENV = "ANTHROPIC_API_KEY"
OPENAI_API_KEY_ENV = DEFAULT_API_KEY_ENV
OPENAI_BASE_URL_ENV = "OPENAI_BASE_URL"
Backend = Literal["offline", "anthropic", "claude-cli", "openai"]


class DescriberResource(dg.ConfigurableResource):
    """An LLM backend for the describe assets (see the module docstring)."""

    backend: Backend = Field(default="offline", description="offline | anthropic | claude-cli | openai")
    model: str = Field(
        default="term-contrast+minilm",
        description="the model name recorded (offline) or asked for (anthropic: e.g. claude-sonnet-4-6; "
        "claude-cli: e.g. sonnet; openai: the name the server serves, e.g. Qwen/Qwen2.5-7B-Instruct or llama3.1:8b)",
    )
    concurrency: int = Field(default=8, ge=1, description="calls in flight at once")
    base_url: str | None = Field(
        default=None,
        description="API base URL: anthropic (None: the SDK default) or openai (required: the server's root, "
        "e.g. http://localhost:8000/v1)",
    )
    api_key: str | None = Field(
        default=None,
        repr=False,
        description="API key; set it with dg.EnvVar('ANTHROPIC_API_KEY') / dg.EnvVar('OPENAI_API_KEY'), never as "
        "a literal (openai: None sends no key)",
    )
    api_key_env: str = Field(
        default=OPENAI_API_KEY_ENV, description="openai: the variable the key comes from (named in errors)"
    )
    price_input_usd_per_mtok: float | None = Field(
        default=0.0, ge=0, description="openai: USD per million prompt tokens (0: a local model; None: unknown)"
    )
    price_output_usd_per_mtok: float | None = Field(
        default=0.0, ge=0, description="openai: USD per million completion tokens (0: a local model; None: unknown)"
    )
    use_message_batches: bool = Field(
        default=False, description="send uncached calls through the Message Batches API (half price, slow)"
    )
    timeout_s: float = Field(default=120.0, gt=0, description="per-call timeout (anthropic, openai, claude-cli)")
    sdk_max_retries: int = Field(
        default=2, ge=0, description="retries inside the Anthropic / OpenAI SDK per attempt"
    )
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
        if self.backend == "openai":
            if not self.base_url:
                raise LLMConfigError(
                    "the openai describer needs base_url, the OpenAI-compatible server's API root: set the "
                    f"profile's describer.base_url or {OPENAI_BASE_URL_ENV} (e.g. http://localhost:8000/v1 for "
                    "vLLM, http://localhost:8080/v1 for llama.cpp, http://localhost:11434/v1 for Ollama)"
                )
            if self.use_message_batches:
                raise LLMConfigError(
                    "use_message_batches is an Anthropic feature; the openai describer makes single calls"
                )
            prices = (self.price_input_usd_per_mtok, self.price_output_usd_per_mtok)
            return OpenAICompatDescriber(
                base_url=self.base_url,
                model=self.model,
                api_key=self.api_key or None,
                api_key_env=self.api_key_env,
                max_concurrency=self.concurrency,
                timeout_s=self.timeout_s,
                sdk_max_retries=self.sdk_max_retries,
                price_usd_per_mtok=None if None in prices else (float(prices[0]), float(prices[1])),  # type: ignore[arg-type]
            )
        return ClaudeCLIDescriber(
            model=self.model,
            executable=self.claude_executable,
            timeout_s=self.timeout_s,
            max_concurrency=self.concurrency,
        )

    def identity(self) -> dict[str, object]:
        """What the outputs record about the backend (never the key)."""
        out: dict[str, object] = {
            "backend": self.backend,
            "model": self.model,
            "concurrency": self.concurrency,
            "base_url": redact_url(self.base_url),
            "use_message_batches": self.use_message_batches,
        }
        if self.backend == "openai":
            out["api_key_sent"] = bool(self.api_key)
            out["price_usd_per_mtok"] = [self.price_input_usd_per_mtok, self.price_output_usd_per_mtok]
        return out


def describer_resource(spec: DescriberSpec, base_url: str | None = None) -> DescriberResource:
    """The resource of a profile's describer; the API key comes from the environment (anthropic, openai)."""
    url = base_url or spec.base_url
    api_key: str | dg.EnvVar | None = None
    extra: dict[str, object] = {}
    if spec.backend == "anthropic":
        api_key = dg.EnvVar(API_KEY_ENV)
    elif spec.backend == "openai":
        url = url or os.environ.get(OPENAI_BASE_URL_ENV) or None
        # A key only when the variable is set: many local servers take none, and EnvVar of an unset variable
        # would fail the step. Its value is read by Dagster when the step starts, never here.
        api_key = dg.EnvVar(spec.api_key_env) if os.environ.get(spec.api_key_env) else None
        price = spec.price_usd_per_mtok
        extra = {
            "api_key_env": spec.api_key_env,
            "price_input_usd_per_mtok": None if price is None else price[0],
            "price_output_usd_per_mtok": None if price is None else price[1],
        }
    return DescriberResource(
        backend=spec.backend,
        model=spec.model,
        concurrency=spec.concurrency,
        base_url=url,
        api_key=api_key,
        **extra,  # type: ignore[arg-type]
    )
