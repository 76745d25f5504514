"""The describer resource: which LLM backend describes, classifies and detection-scores features.

``backend`` is ``offline`` (no network, deterministic: term contrast + MiniLM), ``anthropic`` (the official
SDK; ``base_url`` may point at a proxy or the local test server), ``claude-cli`` (``claude -p``) or ``openai``
(any OpenAI-compatible chat-completions server: vLLM, llama.cpp's ``llama-server``, Ollama, OpenAI itself;
``base_url`` is its API root, e.g. ``http://localhost:8000/v1``; see
:mod:`dagster_project.lib.describers.openai_backend`).

Each backend is a class behind one interface, :class:`DescriberResource` (``build`` makes the describer,
``identity`` says what the outputs record about it): :class:`OfflineDescriberResource`,
:class:`AnthropicDescriberResource`, :class:`OpenAIDescriberResource`, :class:`ClaudeCLIDescriberResource`.
:func:`describer_resource` (called by ``resources_for``) picks the class of a profile's backend;
``DescriberResource(backend=..., ...)`` builds the same class (see :data:`BACKENDS`).

The API key: :func:`describer_resource` fills ``api_key`` from ``dg.EnvVar("ANTHROPIC_API_KEY")`` when the
backend is ``anthropic``, and from ``dg.EnvVar(spec.api_key_env)`` (``OPENAI_API_KEY`` by default) when it
is ``openai`` and that variable is set (local servers need no key: when it is unset, none is sent). Dagster
stores the variable's *name* in run and job records and reads its value when the step starts. The value is
held by the resource (hidden from its repr), handed to the SDK client, and never logged, cached, written to
the lake or put in asset metadata.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Mapping
from typing import Literal, Self

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
from dagster_project.lib.describers.openai_backend import (
    DEFAULT_API_KEY_ENV,
    OpenAICompatDescriber,
    redact_url,
)
from dagster_project.resource_kinds import KindedResource

API_KEY_ENV = "ANTHROPIC_API_KEY"
OPENAI_API_KEY_ENV = DEFAULT_API_KEY_ENV
OPENAI_BASE_URL_ENV = "OPENAI_BASE_URL"


class DescriberResource(KindedResource):
    """An LLM backend for the describe assets (see the module docstring): the settings every backend has."""

    KIND_FIELD, KIND_DEFAULT, KIND_NAME, KIND_ERROR = "backend", "offline", "describer backend", LLMConfigError

    backend: str = Field(default="offline", description="offline | anthropic | claude-cli | openai")
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
        "a literal (openai: None sends no key; offline and claude-cli send none)",
    )
    use_message_batches: bool = Field(
        default=False, description="send uncached calls through the Message Batches API (half price, slow)"
    )
    timeout_s: float = Field(default=120.0, gt=0, description="per-call timeout (anthropic, openai, claude-cli)")

    @classmethod
    def kinds(cls) -> Mapping[str, type[DescriberResource]]:
        return BACKENDS

    @classmethod
    def from_spec(cls, spec: DescriberSpec, base_url: str | None) -> Self:
        """The resource of a profile's describer (``base_url``: the spec's, or the caller's in its place)."""
        return cls(model=spec.model, concurrency=spec.concurrency, base_url=base_url)

    @abstractmethod
    def build(self) -> Describer:
        """A fresh describer; errors that no retry can fix (no key) raise :class:`LLMConfigError`."""

    def identity(self) -> dict[str, object]:
        """What the outputs record about the backend (never the key)."""
        return {
            "backend": self.backend,
            "model": self.model,
            "concurrency": self.concurrency,
            "base_url": redact_url(self.base_url),
            "use_message_batches": self.use_message_batches,
        }


class OfflineDescriberResource(DescriberResource):
    """No network, deterministic: term contrast + MiniLM."""

    backend: Literal["offline"] = Field(default="offline", description="offline")

    def build(self) -> Describer:
        return OfflineDescriber(model=self.model)


class AnthropicDescriberResource(DescriberResource):
    """The official Anthropic SDK; ``base_url`` may point at a proxy or the local test server."""

    backend: Literal["anthropic"] = Field(default="anthropic", description="anthropic")
    sdk_max_retries: int = Field(default=2, ge=0, description="retries inside the Anthropic SDK per attempt")
    batch_poll_interval_s: float = Field(default=30.0, gt=0, description="Message Batches polling interval")

    @classmethod
    def from_spec(cls, spec: DescriberSpec, base_url: str | None) -> Self:
        """The key from ``dg.EnvVar("ANTHROPIC_API_KEY")``: Dagster reads it when the step starts."""
        return cls(model=spec.model, concurrency=spec.concurrency, base_url=base_url, api_key=dg.EnvVar(API_KEY_ENV))

    def build(self) -> Describer:
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


class OpenAIDescriberResource(DescriberResource):
    """Any OpenAI-compatible chat-completions server (:mod:`dagster_project.lib.describers.openai_backend`)."""

    backend: Literal["openai"] = Field(default="openai", description="openai")
    api_key_env: str = Field(default=OPENAI_API_KEY_ENV, description="the variable the key comes from (named in errors)")
    price_input_usd_per_mtok: float | None = Field(
        default=0.0, ge=0, description="USD per million prompt tokens (0: a local model; None: unknown)"
    )
    price_output_usd_per_mtok: float | None = Field(
        default=0.0, ge=0, description="USD per million completion tokens (0: a local model; None: unknown)"
    )
    sdk_max_retries: int = Field(default=2, ge=0, description="retries inside the OpenAI SDK per attempt")

    @classmethod
    def from_spec(cls, spec: DescriberSpec, base_url: str | None) -> Self:
        """``base_url`` else ``OPENAI_BASE_URL``; the key from ``dg.EnvVar(spec.api_key_env)`` when it is set."""
        price = spec.price_usd_per_mtok
        # A key only when the variable is set: many local servers take none, and EnvVar of an unset variable
        # would fail the step. Its value is read by Dagster when the step starts, never here.
        return cls(
            model=spec.model,
            concurrency=spec.concurrency,
            base_url=base_url or os.environ.get(OPENAI_BASE_URL_ENV) or None,
            api_key=dg.EnvVar(spec.api_key_env) if os.environ.get(spec.api_key_env) else None,
            api_key_env=spec.api_key_env,
            price_input_usd_per_mtok=None if price is None else price[0],
            price_output_usd_per_mtok=None if price is None else price[1],
        )

    def build(self) -> Describer:
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
        pin, pout = self.price_input_usd_per_mtok, self.price_output_usd_per_mtok
        return OpenAICompatDescriber(
            base_url=self.base_url,
            model=self.model,
            api_key=self.api_key or None,
            api_key_env=self.api_key_env,
            max_concurrency=self.concurrency,
            timeout_s=self.timeout_s,
            sdk_max_retries=self.sdk_max_retries,
            price_usd_per_mtok=None if pin is None or pout is None else (float(pin), float(pout)),
        )

    def identity(self) -> dict[str, object]:
        return {
            **super().identity(),
            "api_key_sent": bool(self.api_key),
            "price_usd_per_mtok": [self.price_input_usd_per_mtok, self.price_output_usd_per_mtok],
        }


class ClaudeCLIDescriberResource(DescriberResource):
    """The claude CLI (``claude -p``)."""

    backend: Literal["claude-cli"] = Field(default="claude-cli", description="claude-cli")
    claude_executable: str = Field(default="claude", description="the claude CLI")

    def build(self) -> Describer:
        return ClaudeCLIDescriber(
            model=self.model,
            executable=self.claude_executable,
            timeout_s=self.timeout_s,
            max_concurrency=self.concurrency,
        )


#: The describer resource of each backend.
BACKENDS: dict[str, type[DescriberResource]] = {
    "offline": OfflineDescriberResource,
    "anthropic": AnthropicDescriberResource,
    "openai": OpenAIDescriberResource,
    "claude-cli": ClaudeCLIDescriberResource,
}


def describer_resource(spec: DescriberSpec, base_url: str | None = None) -> DescriberResource:
    """The resource of a profile's describer; the API key comes from the environment (anthropic, openai)."""
    return BACKENDS[spec.backend].from_spec(spec, base_url or spec.base_url)
