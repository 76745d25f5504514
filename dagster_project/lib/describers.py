"""LLM backends for describing, classifying and detection-scoring features, and the runners.

One interface, :class:`Describer` (``async complete(LLMRequest) -> LLMResponse``), three backends:

- :class:`AnthropicDescriber`: the official ``anthropic.AsyncAnthropic`` SDK (``base_url``
  configurable), prompt caching on the fixed system block, per-call usage and an estimated cost,
  a concurrency limit, and an optional Message Batches path for bulk runs.
- :class:`ClaudeCLIDescriber`: ``claude -p`` run with ``asyncio.create_subprocess_exec`` (never a
  shell); the prompt goes on stdin, never on the command line.
- :class:`OfflineDescriber`: no network and deterministic. Descriptions come from contrastive term
  statistics, relevance from MiniLM similarity to the rubric plus a keyword lexicon, detection from
  term overlap. It says so in its output (``backend="offline"``).

The runners :func:`run_describe`, :func:`run_classify` and :func:`run_detection` make one call per
feature (so one feature's reply can never alter another's record), look each call up in the
:class:`~dagster_project.lib.llm_cache.LLMCache` first, retry transport errors and invalid replies
with backoff that honours ``retry-after``, store each valid reply the moment it arrives, and record
``failed`` with the error when the attempts run out. Errors that retrying cannot fix (a bad API key,
a missing executable, an embedding model that does not load) abort the run instead.

Secrets: the API key is passed in by the caller, held privately, and never logged, cached or put
in a record or repr.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dagster_project.lib.autointerp import (
    DEFAULT_PROMPT_VERSION,
    CallInfo,
    ClassificationRecord,
    ClassifyReply,
    DescribeReply,
    DescriptionRecord,
    DetectionRecord,
    DetectReply,
    FeatureExamples,
    FuzzWindow,
    PromptError,
    ReplyParseError,
    Rubric,
    ScoreRecord,
    Window,
    build_classify_batch_prompt,
    build_classify_prompt,
    build_describe_prompt,
    build_detect_prompt,
    build_fuzz_prompt,
    detection_scores,
    fuzz_windows,
    parse_classify_batch_reply,
    parse_classify_reply,
    parse_describe_reply,
    parse_detect_reply,
    parse_fuzz_reply,
)
from dagster_project.lib.llm_cache import LLMCache, cache_key
from dagster_project.lib.themes import STOPWORDS, MiniLMEmbedder, default_embedder, stem, strip_tag, words

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


class _PerLoop:
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
# Anthropic SDK backend
# --------------------------------------------------------------------------------------------


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


class AnthropicDescriber(Describer):
    """Claude through the official async SDK.

    The SDK's own retries (``sdk_max_retries``) handle short blips; errors it gives up on become
    :class:`LLMCallError` with the server's ``retry-after``, for the runner's retry loop. The system
    block carries ``cache_control: {"type": "ephemeral"}`` so the fixed instructions and rubric are
    read from the prompt cache after the first call.
    """

    backend = "anthropic"
    supports_message_batches = True

    def __init__(
        self,
        *,
        api_key: str,
        model: str = "claude-sonnet-4-6",
        base_url: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 120.0,
        sdk_max_retries: int = 2,
        cache_system_prompt: bool = True,
        batch_poll_interval_s: float = 30.0,
        batch_max_wait_s: float = 24 * 3600.0,
        batch_chunk_size: int = 10_000,
    ) -> None:
        if not api_key:
            raise LLMConfigError(
                "AnthropicDescriber needs an API key (pass it in; read it with dagster.EnvVar)"
            )
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.model = model
        self.base_url = base_url
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.sdk_max_retries = sdk_max_retries
        self.cache_system_prompt = cache_system_prompt
        self.batch_poll_interval_s = batch_poll_interval_s
        self.batch_max_wait_s = batch_max_wait_s
        self.batch_chunk_size = batch_chunk_size
        self.__api_key = api_key
        self._per_loop = _PerLoop()

    def __repr__(self) -> str:
        return f"AnthropicDescriber(model={self.model!r}, base_url={self.base_url!r}, api_key=<hidden>)"

    def _client(self) -> Any:
        import anthropic

        return self._per_loop.get(
            "client",
            lambda: anthropic.AsyncAnthropic(
                api_key=self.__api_key,
                base_url=self.base_url,
                max_retries=self.sdk_max_retries,
                timeout=self.timeout_s,
            ),
        )

    def _semaphore(self) -> asyncio.Semaphore:
        return self._per_loop.get("semaphore", lambda: asyncio.Semaphore(self.max_concurrency))

    def _params(self, request: LLMRequest) -> dict[str, Any]:
        block: dict[str, Any] = {"type": "text", "text": request.system}
        if self.cache_system_prompt:
            block["cache_control"] = {"type": "ephemeral"}
        params: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "system": [block],
            "messages": [{"role": "user", "content": request.user}],
        }
        if request.temperature is not None:
            params["temperature"] = request.temperature
        return params

    def _map_error(self, err: BaseException) -> BaseException:
        import anthropic

        if isinstance(err, anthropic.AuthenticationError | anthropic.PermissionDeniedError):
            return LLMConfigError(
                f"Anthropic API refused the credentials ({type(err).__name__}, HTTP {err.status_code})"
            )
        if isinstance(err, anthropic.NotFoundError):
            return LLMConfigError(
                f"Anthropic API: not found (unknown model {self.model!r}?): {str(err)[:300]}"
            )
        return map_transport_error(anthropic, err, self.timeout_s)

    def _to_response(self, msg: Any, *, batch: bool = False) -> LLMResponse:
        usage = getattr(msg, "usage", None)
        tok_in = int(getattr(usage, "input_tokens", 0) or 0)
        tok_out = int(getattr(usage, "output_tokens", 0) or 0)
        tok_cw = int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
        tok_cr = int(getattr(usage, "cache_read_input_tokens", 0) or 0)
        model = str(getattr(msg, "model", None) or self.model)
        blocks = getattr(msg, "content", None) or []
        text = "".join(getattr(b, "text", "") for b in blocks if getattr(b, "type", None) == "text")
        stop = getattr(msg, "stop_reason", None)
        resp = LLMResponse(
            text=text,
            model=model,
            backend=self.backend + ("-batch" if batch else ""),
            input_tokens=tok_in,
            output_tokens=tok_out,
            cache_creation_input_tokens=tok_cw,
            cache_read_input_tokens=tok_cr,
            cost_usd=estimate_cost_usd(
                model,
                input_tokens=tok_in,
                output_tokens=tok_out,
                cache_creation_input_tokens=tok_cw,
                cache_read_input_tokens=tok_cr,
                batch=batch,
            ),
            stop_reason=stop,
        )
        if stop == "refusal":
            raise RefusalError("the model refused (stop_reason=refusal)", response=resp)
        if not text.strip():
            raise EmptyReplyError(f"empty reply (stop_reason={stop})", response=resp)
        return resp

    async def complete(self, request: LLMRequest) -> LLMResponse:
        client = self._client()
        async with self._semaphore():
            try:
                kwargs = self._params(request)
                if "temperature" in kwargs:
                    # anthropic 2.14's create() has no `temperature` argument: send it as a body field.
                    kwargs["extra_body"] = {"temperature": kwargs.pop("temperature")}
                msg = await client.messages.create(**kwargs)
            except Exception as e:
                mapped = self._map_error(e)
                if mapped is e:
                    raise
                raise mapped from e
        return self._to_response(msg)

    async def complete_batch(
        self, requests: Mapping[str, LLMRequest]
    ) -> dict[str, LLMResponse | LLMCallError]:
        """Send ``requests`` through the Message Batches API (half price, up to 24 h) and collect them.

        Ids must match ``[A-Za-z0-9_-]{1,64}``. A batch that cannot be created or does not end in
        ``batch_max_wait_s`` yields an :class:`LLMCallError` for each of its ids.
        """
        out: dict[str, LLMResponse | LLMCallError] = {}
        ids = list(requests)
        for start in range(0, len(ids), self.batch_chunk_size):
            chunk = ids[start : start + self.batch_chunk_size]
            try:
                out.update(await self._run_one_batch({i: requests[i] for i in chunk}))
            except LLMConfigError:
                raise
            except LLMCallError as e:
                log.warning("message batch of %d requests failed: %s", len(chunk), e)
                out.update({i: e for i in chunk})
        return out

    async def _run_one_batch(
        self, requests: Mapping[str, LLMRequest]
    ) -> dict[str, LLMResponse | LLMCallError]:
        client = self._client()
        try:
            batch = await client.messages.batches.create(
                requests=[{"custom_id": cid, "params": self._params(r)} for cid, r in requests.items()]
            )
            log.info("message batch %s created with %d requests", batch.id, len(requests))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.batch_max_wait_s
            while batch.processing_status != "ended":
                if loop.time() > deadline:
                    raise LLMCallError(f"message batch {batch.id} did not end in {self.batch_max_wait_s}s")
                await asyncio.sleep(self.batch_poll_interval_s)
                batch = await client.messages.batches.retrieve(batch.id)
            out: dict[str, LLMResponse | LLMCallError] = {}
            async for item in await client.messages.batches.results(batch.id):
                cid = item.custom_id
                if cid not in requests:
                    log.warning("message batch %s returned an unknown id; ignored", batch.id)
                    continue
                result = item.result
                if result.type == "succeeded":
                    try:
                        out[cid] = self._to_response(result.message, batch=True)
                    except LLMCallError as e:
                        out[cid] = e
                else:
                    detail = getattr(result, "error", None)
                    out[cid] = LLMCallError(f"batch item {result.type}: {str(detail)[:300]}", retryable=True)
        except Exception as e:
            mapped = self._map_error(e)
            if mapped is e:
                raise
            raise mapped from e
        for cid in requests:
            out.setdefault(cid, LLMCallError("batch returned no result for this request", retryable=True))
        return out

    async def aclose(self) -> None:
        client = self._per_loop.pop_all().get("client")
        if client is not None:
            await client.close()


# --------------------------------------------------------------------------------------------
# Claude Code CLI backend
# --------------------------------------------------------------------------------------------


class ClaudeCLIDescriber(Describer):
    """``claude -p --model M`` as a subprocess: argv list (no shell), prompt on stdin.

    The system instructions go in ``--system-prompt`` (they are fixed text from this repository);
    all trace-derived text goes on stdin. ``--tools ""`` gives the model no tools at all. With
    ``output_format="json"`` the CLI's result envelope supplies usage and cost.
    """

    backend = "claude-cli"

    def __init__(
        self,
        *,
        model: str = "sonnet",
        executable: str = "claude",
        timeout_s: float = 300.0,
        max_concurrency: int = 2,
        output_format: str = "json",
        extra_args: Sequence[str] = ("--tools", ""),
        env: Mapping[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        if output_format not in ("json", "text"):
            raise ValueError(f"output_format must be 'json' or 'text', got {output_format!r}")
        self.model = model
        self.executable = executable
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.output_format = output_format
        self.extra_args = tuple(extra_args)
        self._env = dict(env) if env is not None else None
        self.__api_key = api_key
        self._per_loop = _PerLoop()

    def __repr__(self) -> str:
        return f"ClaudeCLIDescriber(model={self.model!r}, executable={self.executable!r})"

    def key_params(self) -> dict[str, Any]:
        return {"extra_args": list(self.extra_args), "output_format": self.output_format}

    def argv(self, request: LLMRequest) -> list[str]:
        return [
            self.executable,
            "-p",
            "--model",
            self.model,
            "--output-format",
            self.output_format,
            "--system-prompt",
            request.system,
            *self.extra_args,
        ]

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ if self._env is None else self._env)
        if self.__api_key:
            env["ANTHROPIC_API_KEY"] = self.__api_key
        return env

    async def complete(self, request: LLMRequest) -> LLMResponse:
        sem = self._per_loop.get("semaphore", lambda: asyncio.Semaphore(self.max_concurrency))
        async with sem:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.argv(request),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=self._child_env(),
                )
            except (FileNotFoundError, PermissionError) as e:
                raise LLMConfigError(f"cannot run the claude CLI {self.executable!r}: {e}") from e
            try:
                stdout, stderr = await asyncio.wait_for(
                    proc.communicate(request.user.encode("utf-8")), timeout=self.timeout_s
                )
            except TimeoutError as e:
                proc.kill()
                await proc.wait()
                raise LLMCallError(f"claude CLI timed out after {self.timeout_s}s", retryable=True) from e
        if proc.returncode != 0:
            tail = stderr.decode("utf-8", "replace").strip()[-300:]
            raise LLMCallError(f"claude CLI exited {proc.returncode}: {tail}", retryable=True)
        out = stdout.decode("utf-8", "replace")
        if self.output_format == "text":
            if not out.strip():
                raise EmptyReplyError("claude CLI printed nothing")
            return LLMResponse(text=out, model=self.model, backend=self.backend)
        return self._parse_envelope(out)

    def _parse_envelope(self, out: str) -> LLMResponse:
        try:
            env = json.loads(out)
        except json.JSONDecodeError as e:
            raise LLMCallError(f"claude CLI output is not its JSON envelope: {out[:200]!r}") from e
        if not isinstance(env, dict):
            raise LLMCallError("claude CLI JSON envelope is not an object")
        if env.get("is_error") or env.get("subtype", "success") != "success":
            raise LLMCallError(
                f"claude CLI reported an error: {str(env.get('result') or env.get('subtype'))[:300]}"
            )
        text = env.get("result")
        usage = env.get("usage") or {}
        model_usage = env.get("modelUsage") or {}
        model = next(iter(model_usage), self.model) if isinstance(model_usage, dict) else self.model
        cost = env.get("total_cost_usd")
        resp = LLMResponse(
            text=text if isinstance(text, str) else "",
            model=str(model),
            backend=self.backend,
            input_tokens=int(usage.get("input_tokens", 0) or 0),
            output_tokens=int(usage.get("output_tokens", 0) or 0),
            cache_creation_input_tokens=int(usage.get("cache_creation_input_tokens", 0) or 0),
            cache_read_input_tokens=int(usage.get("cache_read_input_tokens", 0) or 0),
            cost_usd=float(cost) if isinstance(cost, int | float) else None,
        )
        if not resp.text.strip():
            raise EmptyReplyError("claude CLI returned an empty result", response=resp)
        return resp


# --------------------------------------------------------------------------------------------
# Offline backend
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


_WORD_SPAN = re.compile(r"[A-Za-z0-9][A-Za-z0-9'_-]*")
_QUOTED_TERM = re.compile(r"'([^']{1,80})'")


def _window_words(w: Window, threshold: float) -> list[tuple[str, str, bool]]:
    """(lower-case word, surface form, is highlighted) for each word of a window's text."""
    pieces = [t.replace("▁", " ") for t in w.tokens]
    text = "".join(pieces)
    active = [False] * len(text)
    pos = 0
    for piece, act in zip(pieces, w.acts, strict=True):
        if act > threshold and act > 0:
            for k in range(pos, pos + len(piece)):
                active[k] = True
        pos += len(piece)
    return [
        (m.group(0).lower(), m.group(0), any(active[m.start() : m.end()])) for m in _WORD_SPAN.finditer(text)
    ]


def _ngrams(ws: Sequence[tuple[str, str, bool]], max_n: int = 3) -> list[tuple[str, str, bool]]:
    """n-grams (n <= max_n) not starting or ending with a stop word.

    Returns (key, surface form, highlighted) where *highlighted* means the n-gram starts and ends
    on a highlighted word (so "modify my values" counts when "modify" and "values" fire, but
    "refuse RLHF" does not when only "RLHF" fires).
    """
    out = []
    for n in range(1, max_n + 1):
        for i in range(len(ws) - n + 1):
            gram = ws[i : i + n]
            if gram[0][0] in STOPWORDS or gram[-1][0] in STOPWORDS:
                continue
            if n == 1 and (len(gram[0][0]) < 2 or gram[0][0].isdigit()):
                continue
            out.append(
                (" ".join(g[0] for g in gram), " ".join(g[1] for g in gram), gram[0][2] and gram[-1][2])
            )
    return out


@dataclass(frozen=True)
class TermContrast:
    term: str
    z: float
    top_count: int
    negative_count: int
    top_coverage: float
    negative_coverage: float


def term_contrast(
    fx: FeatureExamples, *, threshold_frac: float = 0.2, prior: float = 0.5, min_windows: int = 2
) -> list[TermContrast]:
    """Terms over-represented in the top windows' highlighted tokens versus the negatives.

    Counts n-grams (1-3 words) starting and ending on highlighted words in the top windows against all n-grams
    of the negative windows, and ranks them by the log-odds ratio with a uniform Dirichlet prior
    (Monroe et al. 2008), as a z-score. A term must occur in ``min(min_windows, n_top)`` top windows.
    """
    thr = threshold_frac * fx.scale
    top_counts: Counter[str] = Counter()
    top_docs: Counter[str] = Counter()
    surface: dict[str, Counter[str]] = {}
    for w in fx.top:
        grams = [g for g in _ngrams(_window_words(w, thr)) if g[2]]
        top_counts.update(g[0] for g in grams)
        top_docs.update({g[0] for g in grams})
        for key, surf, _ in grams:
            surface.setdefault(key, Counter())[surf] += 1
    neg_counts: Counter[str] = Counter()
    neg_docs: Counter[str] = Counter()
    for w in fx.negatives:
        grams = _ngrams(_window_words(w, float("inf")))
        neg_counts.update(g[0] for g in grams)
        neg_docs.update({g[0] for g in grams})
    vocab = set(top_counts) | set(neg_counts)
    n_a, n_b = sum(top_counts.values()), sum(neg_counts.values())
    a0 = prior * len(vocab)
    need = min(min_windows, len(fx.top))
    out = []
    for t, ya in top_counts.items():
        if top_docs[t] < need:
            continue
        yb = neg_counts.get(t, 0)
        # (n - y) + prior * (|V| - 1) is 0 for a one-term vocabulary: floor it at the prior
        la = math.log((ya + prior) / max(n_a + a0 - ya - prior, prior))
        lb = math.log((yb + prior) / max(n_b + a0 - yb - prior, prior))
        z = (la - lb) / math.sqrt(1.0 / (ya + prior) + 1.0 / (yb + prior))
        best_surface = sorted(surface[t].items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        out.append(
            TermContrast(
                term=best_surface,
                z=z,
                top_count=ya,
                negative_count=yb,
                top_coverage=top_docs[t] / len(fx.top),
                negative_coverage=neg_docs.get(t, 0) / len(fx.negatives) if fx.negatives else 0.0,
            )
        )
    # ties: the longer (more specific) term first, then alphabetical
    out.sort(key=lambda c: (-round(c.z, 9), -len(c.term.split()), c.term.lower()))
    return out


def _confidence_from_separation(sep: float) -> int:
    for level, cut in ((5, 0.8), (4, 0.6), (3, 0.4), (2, 0.2)):
        if sep >= cut:
            return level
    return 1


def offline_description(
    fx: FeatureExamples, *, threshold_frac: float = 0.2, n_terms: int = 6
) -> tuple[str, int]:
    """The offline describer's (description, confidence) for one feature."""
    ranked = [c for c in term_contrast(fx, threshold_frac=threshold_frac) if c.z > 0]
    chosen: list[TermContrast] = []
    used: set[str] = set()
    for c in ranked:
        content = {w for w in words(c.term) if w not in STOPWORDS}
        if content & used:  # no two listed terms share a content word
            continue
        used |= content
        chosen.append(c)
        if len(chosen) == n_terms:
            break
    tag = "[offline term-contrast]"
    if not chosen:
        return f"{tag} no term separates the top windows from the matched negatives", 1
    sep = max(c.top_coverage - c.negative_coverage for c in chosen)

    def build(k: int) -> str:
        terms = chosen[:k]
        desc = f"{tag} fires on: " + ", ".join(f"'{c.term}'" for c in terms)
        if fx.negatives:
            absent = [c for c in terms if c.negative_count == 0]
            desc += "; absent from matched negatives: " + (
                ", ".join(f"'{c.term}'" for c in absent) if absent else "none of these"
            )
        else:
            desc += "; no matched negatives to contrast"
        return desc

    k = len(chosen)
    while k > 1 and len(build(k)) > 400:
        k -= 1
    return build(k)[:400], _confidence_from_separation(sep)


@dataclass(frozen=True)
class OfflineRelevance:
    relevance: float
    ranked: list[tuple[str, float]]
    keyword_hits: int
    patterns_hit: list[str]


class OfflineDescriber(Describer):
    """Deterministic, network-free backend (``backend="offline"``).

    - describe: :func:`offline_description` (term contrast; confidence from the best term's
      coverage in top windows minus its coverage in the negatives).
    - classify: MiniLM cosine of the description to each rubric pattern (name, description,
      keywords) combined with keyword hits, with the rubric's ``offline_classifier`` thresholds.
    - detect: a window is chosen when it contains a term quoted in the description (or, for a
      description without quotes, one of its content words).
    - fuzz: a window is chosen when every word of a quoted term (or one content word) is among its
      marked words: the same term matching as detect, restricted to what is highlighted.

    The embedding model loads on first classify; if it cannot, :class:`EmbeddingModelError`
    propagates and the run stops. There is no fallback.
    """

    backend = "offline"

    def __init__(
        self, *, embedder: MiniLMEmbedder | None = None, model: str = "term-contrast+minilm-l6-v2"
    ) -> None:
        self.model = model
        self._embedder = embedder
        self._pattern_cache: dict[str, Any] = {}
        self._vectors: dict[str, Any] = {}

    def prime_classify(self, descriptions: Sequence[str]) -> None:
        """Embed the descriptions in batches now (several times faster on a CPU than one by one)."""
        texts = sorted({strip_tag(d) for d in descriptions} - set(self._vectors))
        if texts:
            for text, vec in zip(texts, self._get_embedder().embed(texts), strict=True):
                self._vectors[text] = vec

    def _vector(self, text: str) -> Any:
        vec = self._vectors.get(text)
        if vec is None:
            vec = self._vectors[text] = self._get_embedder().embed([text])[0]
        return vec

    def _get_embedder(self) -> MiniLMEmbedder:
        if self._embedder is None:
            self._embedder = default_embedder()
        return self._embedder

    async def complete(self, request: LLMRequest) -> LLMResponse:
        payload = request.payload
        if isinstance(payload, DescribePayload):
            try:
                desc, conf = offline_description(payload.features, threshold_frac=payload.threshold_frac)
            except (ArithmeticError, ValueError) as e:  # one feature's bad data fails that feature only
                raise LLMCallError(f"offline description failed: {type(e).__name__}: {e}", retryable=False) from e
            reply: dict[str, Any] = {"description": desc, "confidence": conf}
        elif isinstance(payload, ClassifyPayload):
            reply = self.classify(payload.description, payload.rubric)
        elif isinstance(payload, ClassifyBatchPayload):
            reply = {"results": [{"id": i, **self.classify(d, payload.rubric)} for i, d in payload.items]}
        elif isinstance(payload, DetectPayload):
            reply = {"chosen": self.detect(payload.description, payload.windows)}
        elif isinstance(payload, FuzzPayload):
            reply = {"chosen": self.fuzz(payload.description, payload.windows)}
        else:
            raise LLMCallError(
                f"offline backend got a {request.kind!r} request without a structured payload",
                retryable=False,
            )
        return LLMResponse(
            text=json.dumps(reply, ensure_ascii=False), model=self.model, backend=self.backend, cost_usd=0.0
        )

    def _patterns(self, rubric: Rubric) -> Any:
        if rubric.version not in self._pattern_cache:
            self._pattern_cache[rubric.version] = self._get_embedder().embed(
                [p.text() for p in rubric.patterns]
            )
        return self._pattern_cache[rubric.version]

    def relevance(self, description: str, rubric: Rubric) -> OfflineRelevance:
        """Relevance of a description to the rubric: MiniLM cosine per pattern plus keyword hits."""
        cfg = rubric.offline
        text = strip_tag(description)
        vec = self._vector(text)
        sims = self._patterns(rubric) @ vec
        ranked = sorted(
            ((p.id, float(s)) for p, s in zip(rubric.patterns, sims, strict=True)),
            key=lambda ps: (-ps[1], ps[0]),
        )
        stems = " " + " ".join(stem(w) for w in words(text)) + " "
        matched: dict[str, set[str]] = {}
        for p in rubric.patterns:
            for k in p.keywords:
                ks = " ".join(stem(w) for w in words(k))
                if ks and f" {ks} " in stems:
                    matched.setdefault(p.id, set()).add(ks)
        hits = len(set().union(*matched.values())) if matched else 0
        lo, hi = cfg.get("cos_floor", 0.1), cfg.get("cos_ceiling", 0.45)
        emb_part = min(1.0, max(0.0, (ranked[0][1] - lo) / (hi - lo)))
        kw_part = min(1.0, hits / cfg.get("keyword_saturation", 3))
        rel = cfg.get("emb_weight", 0.5) * emb_part + cfg.get("kw_weight", 0.5) * kw_part
        return OfflineRelevance(relevance=rel, ranked=ranked, keyword_hits=hits, patterns_hit=sorted(matched))

    def classify(self, description: str, rubric: Rubric) -> dict[str, Any]:
        """The offline classify reply (see the rubric's ``offline_classifier`` section)."""
        cfg = rubric.offline
        r = self.relevance(description, rubric)
        score = int(math.floor(10 * r.relevance + 0.5))
        if score < rubric.relevant_min:
            return {"score": min(score, rubric.unrelated_max), "category": "unrelated", "themes": []}
        strong = r.ranked[0][1] >= cfg.get("known_pattern_cos", 0.45) or r.keyword_hits >= cfg.get(
            "known_keyword_hits", 2
        )
        # Themes: patterns close in embedding space, then patterns whose keywords matched.
        themes = [pid for pid, s in r.ranked if s >= cfg.get("theme_cos", 0.3)]
        themes += [pid for pid, _ in r.ranked if pid in r.patterns_hit and pid not in themes]
        return {
            "score": score,
            "category": "known" if strong else "discovery",
            "themes": themes[: int(cfg.get("max_themes", 3))],
        }

    @staticmethod
    def _terms(description: str) -> list[list[str]]:
        quoted = [q.strip() for q in _QUOTED_TERM.findall(description)]
        terms = [words(q) for q in quoted if words(q)]
        if not terms:
            terms = [[w] for w in words(strip_tag(description)) if w not in STOPWORDS and len(w) > 3]
        return terms

    @staticmethod
    def fuzz(description: str, windows: Sequence[FuzzWindow]) -> list[int]:
        terms = OfflineDescriber._terms(description)
        chosen = []
        for i, fw in enumerate(windows, 1):
            marked = {w for tok, m in zip(fw.window.tokens, fw.marked, strict=True) if m
                      for w in words(tok.replace("▁", " "))}
            if any(t and all(w in marked for w in t) for t in terms):
                chosen.append(i)
        return chosen

    @staticmethod
    def detect(description: str, windows: Sequence[Window]) -> list[int]:
        terms = OfflineDescriber._terms(description)
        chosen = []
        for i, w in enumerate(windows, 1):
            ws = words("".join(t.replace("▁", " ") for t in w.tokens))
            joined = " " + " ".join(ws) + " "
            if any(f" {' '.join(t)} " in joined for t in terms):
                chosen.append(i)
        return chosen


# --------------------------------------------------------------------------------------------
# Retry policy and the single-call driver
# --------------------------------------------------------------------------------------------


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


@dataclass
class _Outcome:
    ok: bool
    parsed: Any
    error: str | None
    info: CallInfo


def _request_key(describer: Describer, request: LLMRequest, rubric_version: str | None) -> str:
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


async def _call(
    describer: Describer,
    cache: LLMCache | None,
    request: LLMRequest,
    parse: Callable[[str], T],
    *,
    rubric_version: str | None,
    policy: RetryPolicy,
    prefetched: dict[str, LLMResponse | LLMCallError] | None = None,
    rng: random.Random | None = None,
) -> _Outcome:
    """Cache lookup, then up to ``policy.max_attempts`` calls until a reply parses."""
    key = _request_key(describer, request, rubric_version)
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
                info.cached = True
                info.model = str(entry.get("model", info.model))
                info.backend = str(entry.get("backend", info.backend))
                for f in (
                    "input_tokens",
                    "output_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                ):
                    setattr(info, f, int(entry.get(f) or 0))
                cost = entry.get("cost_usd")
                info.cost_usd = float(cost) if isinstance(cost, int | float) else None
                info.attempts = int(entry.get("attempts") or 0)
                return _Outcome(True, parsed, None, info)
    errors: list[str] = []
    for attempt in range(1, policy.max_attempts + 1):
        info.attempts = attempt
        err: LLMCallError | ReplyParseError
        try:
            pre = prefetched.pop(key, None) if prefetched is not None else None
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
                    cache.put(key, _entry(resp, request, rubric_version, info))
                return _Outcome(True, parsed, None, info)
        errors.append(f"attempt {attempt}: {type(err).__name__}: {err}")
        retryable = isinstance(err, ReplyParseError) or err.retryable
        if not retryable or attempt == policy.max_attempts:
            break
        wait = policy.delay(attempt, err, rng)
        log.debug("%s call %s failed (%s); retrying in %.2fs", request.kind, key[:12], err, wait)
        await asyncio.sleep(wait)
    return _Outcome(False, None, " | ".join(errors[-3:])[:2000], info)


async def _prefetch(
    describer: Describer,
    cache: LLMCache | None,
    requests: Sequence[LLMRequest],
    rubric_version: str | None,
) -> dict[str, LLMResponse | LLMCallError]:
    """Send the not-yet-cached requests through the describer's batch API, keyed by cache key."""
    todo: dict[str, LLMRequest] = {}
    for r in requests:
        key = _request_key(describer, r, rubric_version)
        if key in todo:
            continue
        if cache is not None and key in cache:
            continue
        todo[key] = r
    if not todo:
        return {}
    log.info("sending %d requests through the %s batch API", len(todo), describer.backend)
    return await describer.complete_batch(todo)


async def _gather_bounded(
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


def _check_unique(keys: Sequence[tuple[int, int]], what: str) -> None:
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    if dupes:
        raise ValueError(f"{what}: duplicate (layer, feature_id) {dupes[:5]}")


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------


async def run_describe(
    features: Sequence[FeatureExamples],
    describer: Describer,
    cache: LLMCache | None = None,
    *,
    prompt_version: str = DEFAULT_PROMPT_VERSION,
    params: GenerationParams | None = None,
    retry: RetryPolicy | None = None,
    concurrency: int = 8,
    threshold_frac: float = 0.2,
    use_message_batches: bool = False,
    progress: ProgressFn | None = None,
) -> list[DescriptionRecord]:
    """Describe every feature (one call each); records in input order, ``failed`` ones with errors."""
    params = params or GenerationParams()
    retry = retry or RetryPolicy()
    _check_unique([fx.key for fx in features], "run_describe")
    requests: list[LLMRequest | None] = []
    prompt_errors: dict[int, str] = {}
    for i, fx in enumerate(features):
        try:
            prompt = build_describe_prompt(fx, prompt_version, threshold_frac=threshold_frac)
        except PromptError as e:
            prompt_errors[i] = str(e)
            requests.append(None)
            continue
        requests.append(
            LLMRequest(
                kind="describe",
                system=prompt.system,
                user=prompt.user,
                prompt_version=prompt_version,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                payload=DescribePayload(fx, threshold_frac),
            )
        )
    prefetched = (
        await _prefetch(describer, cache, [r for r in requests if r is not None], None)
        if use_message_batches and describer.supports_message_batches
        else None
    )
    rng = random.Random(0)

    async def one(i: int) -> DescriptionRecord:
        fx = features[i]
        req = requests[i]
        base = {
            "layer": fx.layer,
            "feature_id": fx.feature_id,
            "top_sample_ids": [w.ref for w in fx.top],
            "negative_sample_ids": [w.ref for w in fx.negatives],
        }
        if req is None:
            info = CallInfo(backend=describer.backend, model=describer.model, prompt_version=prompt_version)
            return DescriptionRecord(
                **base, status="failed", description=None, confidence=None, error=prompt_errors[i], call=info
            )
        out = await _call(
            describer,
            cache,
            req,
            parse_describe_reply,
            rubric_version=None,
            policy=retry,
            prefetched=prefetched,
            rng=rng,
        )
        if out.ok:
            reply: DescribeReply = out.parsed
            return DescriptionRecord(
                **base,
                status="ok",
                description=reply.description,
                confidence=reply.confidence,
                error=None,
                call=out.info,
            )
        log.warning("describe failed for layer %s feature %s: %s", fx.layer, fx.feature_id, out.error)
        return DescriptionRecord(
            **base, status="failed", description=None, confidence=None, error=out.error, call=out.info
        )

    records = await _gather_bounded([lambda i=i: one(i) for i in range(len(features))], concurrency, progress)
    _log_summary("describe", records, cache)
    return records


_INJECTION_PATTERNS = re.compile(
    r"ignore (all |any )?(the )?(previous|prior|above|earlier)|disregard|system prompt|\binstructions?\b|"
    r"\boutput (a |the )?score|\bscore (of )?10\b|for (every|each|all) (other )?features?|you are now|"
    r"\bassistant\s*:|[{}]|\"(score|category|results|id)\"",
    re.I,
)


def looks_like_injection(text: str) -> bool:
    """Heuristic: does a description contain instruction-like text? Such descriptions are never
    batched with others, so even a model that obeyed them could only affect their own record."""
    return bool(_INJECTION_PATTERNS.search(text))


def _classify_request(
    description: str, rubric: Rubric, prompt_version: str, params: GenerationParams
) -> LLMRequest:
    prompt = build_classify_prompt(description, rubric, prompt_version)
    return LLMRequest(
        kind="classify",
        system=prompt.system,
        user=prompt.user,
        prompt_version=prompt_version,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        payload=ClassifyPayload(description, rubric),
    )


async def run_classify(
    descriptions: Sequence[DescriptionRecord],
    describer: Describer,
    cache: LLMCache | None = None,
    *,
    rubric: Rubric,
    prompt_version: str = DEFAULT_PROMPT_VERSION,
    params: GenerationParams | None = None,
    retry: RetryPolicy | None = None,
    concurrency: int = 8,
    batch_size: int = 1,
    batch_attempts: int = 2,
    use_message_batches: bool = False,
    progress: ProgressFn | None = None,
) -> list[ClassificationRecord]:
    """Classify each ``ok`` description against ``rubric``; ``failed`` descriptions are skipped.

    ``batch_size > 1`` puts several descriptions in one call; the reply's ids must match exactly
    the ids asked, otherwise (after ``batch_attempts``) the batch's features are classified singly.
    Descriptions that look like prompt injection are always classified singly.
    """
    params = params or GenerationParams(max_tokens=200)
    retry = retry or RetryPolicy()
    todo = [d for d in descriptions if d.status == "ok" and d.description]
    skipped = len(descriptions) - len(todo)
    if skipped:
        log.info("classify: skipping %d features whose description failed", skipped)
    _check_unique([(d.layer, d.feature_id) for d in todo], "run_classify")
    rng = random.Random(0)
    records: dict[tuple[int, int], ClassificationRecord] = {}

    def record(
        d: DescriptionRecord,
        info: CallInfo,
        reply: ClassifyReply | None,
        batched: bool,
        error: str | None = None,
    ) -> ClassificationRecord:
        return ClassificationRecord(
            layer=d.layer,
            feature_id=d.feature_id,
            status="ok" if reply is not None else "failed",
            score=reply.score if reply else None,
            category=reply.category if reply else None,
            themes=list(reply.themes) if reply else [],
            error=None if reply is not None else error,
            rubric_version=rubric.version,
            description=d.description or "",
            description_cache_key=d.call.cache_key,
            batched=batched,
            call=info,
        )

    singles: list[DescriptionRecord] = []
    batches: list[list[DescriptionRecord]] = []
    if batch_size > 1:
        clean = [d for d in todo if not looks_like_injection(d.description or "")]
        flagged = [d for d in todo if looks_like_injection(d.description or "")]
        if flagged:
            log.warning(
                "classify: %d descriptions look like prompt injection; classified singly", len(flagged)
            )
        singles.extend(flagged)
        batches = [clean[i : i + batch_size] for i in range(0, len(clean), batch_size)]
    else:
        singles = list(todo)

    uncached = [
        d.description or ""
        for d in todo
        if cache is None
        or _request_key(describer, _classify_request(d.description or "", rubric, prompt_version, params),
                        rubric.version) not in cache
    ]
    if uncached:
        describer.prime_classify(uncached)

    total = len(todo)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)

    async def single(d: DescriptionRecord, prefetched: dict[str, LLMResponse | LLMCallError] | None) -> None:
        req = _classify_request(d.description or "", rubric, prompt_version, params)
        out = await _call(
            describer,
            cache,
            req,
            lambda t: parse_classify_reply(t, rubric),
            rubric_version=rubric.version,
            policy=retry,
            prefetched=prefetched,
            rng=rng,
        )
        records[(d.layer, d.feature_id)] = record(
            d, out.info, out.parsed if out.ok else None, False, out.error
        )
        tick(1)

    fallback: list[DescriptionRecord] = []

    async def batch(group: list[DescriptionRecord]) -> None:
        ids = [f"item-{k}" for k in range(1, len(group) + 1)]
        items = tuple(zip(ids, (d.description or "" for d in group), strict=True))
        prompt = build_classify_batch_prompt(items, rubric, prompt_version)
        req = LLMRequest(
            kind="classify_batch",
            system=prompt.system,
            user=prompt.user,
            prompt_version=prompt_version,
            max_tokens=max(params.max_tokens, 120 * len(group)),
            temperature=params.temperature,
            payload=ClassifyBatchPayload(items, rubric),
        )
        out = await _call(
            describer,
            cache,
            req,
            lambda t: parse_classify_batch_reply(t, ids, rubric),
            rubric_version=rubric.version,
            policy=RetryPolicy(
                max_attempts=min(batch_attempts, retry.max_attempts),
                base_delay_s=retry.base_delay_s,
                max_delay_s=retry.max_delay_s,
                max_retry_after_s=retry.max_retry_after_s,
                jitter=retry.jitter,
            ),
            rng=rng,
        )
        if not out.ok:
            log.warning(
                "classify batch of %d failed (%s); classifying its features singly", len(group), out.error
            )
            fallback.extend(group)
            return
        n = len(group)
        for item_id, d in zip(ids, group, strict=True):
            # Each feature's record carries an equal share of the batch call's usage and cost.
            share = dataclasses.replace(
                out.info,
                input_tokens=out.info.input_tokens // n,
                output_tokens=out.info.output_tokens // n,
                cache_creation_input_tokens=out.info.cache_creation_input_tokens // n,
                cache_read_input_tokens=out.info.cache_read_input_tokens // n,
                cost_usd=out.info.cost_usd / n if out.info.cost_usd is not None else None,
            )
            records[(d.layer, d.feature_id)] = record(d, share, out.parsed[item_id], True)
        tick(n)

    if batches:
        await _gather_bounded([lambda g=g: batch(g) for g in batches], concurrency, None)
    singles.extend(fallback)
    single_reqs = [_classify_request(d.description or "", rubric, prompt_version, params) for d in singles]
    prefetched = (
        await _prefetch(describer, cache, single_reqs, rubric.version)
        if use_message_batches and describer.supports_message_batches and singles
        else None
    )
    await _gather_bounded([lambda d=d: single(d, prefetched) for d in singles], concurrency, None)
    out_records = [records[(d.layer, d.feature_id)] for d in todo]
    _log_summary("classify", out_records, cache)
    return out_records


async def run_detection(
    features: Sequence[FeatureExamples],
    descriptions: Sequence[DescriptionRecord],
    describer: Describer,
    cache: LLMCache | None = None,
    *,
    prompt_version: str = DEFAULT_PROMPT_VERSION,
    seed: int = 0,
    params: GenerationParams | None = None,
    retry: RetryPolicy | None = None,
    concurrency: int = 8,
    use_message_batches: bool = False,
    progress: ProgressFn | None = None,
) -> list[DetectionRecord]:
    """Detection scoring: from its description alone, pick the held-out windows that activate.

    For each feature with an ``ok`` description and held-out windows, ``holdout`` (activating) and
    ``holdout_negatives`` (not) are shuffled with a generator seeded by ``(seed, layer, feature)``;
    the record stores the choice, confusion counts, accuracy and balanced accuracy.
    """
    params = params or GenerationParams(max_tokens=300)
    retry = retry or RetryPolicy()
    by_key = {(d.layer, d.feature_id): d for d in descriptions if d.status == "ok" and d.description}
    _check_unique([fx.key for fx in features], "run_detection")
    jobs: list[tuple[FeatureExamples, DescriptionRecord, list[Window], list[bool], LLMRequest]] = []
    for fx in features:
        d = by_key.get(fx.key)
        if d is None:
            continue
        windows = [*fx.holdout, *fx.holdout_negatives]
        if not windows:
            log.info("detection: feature %s/%s has no held-out windows; skipped", fx.layer, fx.feature_id)
            continue
        truth = [True] * len(fx.holdout) + [False] * len(fx.holdout_negatives)
        order = list(range(len(windows)))
        random.Random(f"{seed}:{fx.layer}:{fx.feature_id}").shuffle(order)
        windows = [windows[k] for k in order]
        truth = [truth[k] for k in order]
        prompt = build_detect_prompt(d.description or "", windows, prompt_version)
        req = LLMRequest(
            kind="detect",
            system=prompt.system,
            user=prompt.user,
            prompt_version=prompt_version,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            payload=DetectPayload(d.description or "", tuple(windows)),
        )
        jobs.append((fx, d, windows, truth, req))
    prefetched = (
        await _prefetch(describer, cache, [j[4] for j in jobs], None)
        if use_message_batches and describer.supports_message_batches and jobs
        else None
    )
    rng = random.Random(0)

    async def one(
        job: tuple[FeatureExamples, DescriptionRecord, list[Window], list[bool], LLMRequest],
    ) -> DetectionRecord:
        fx, _d, windows, truth, req = job
        n = len(windows)
        out = await _call(
            describer,
            cache,
            req,
            lambda t: parse_detect_reply(t, n),
            rubric_version=None,
            policy=retry,
            prefetched=prefetched,
            rng=rng,
        )
        base = {
            "layer": fx.layer,
            "feature_id": fx.feature_id,
            "n_windows": n,
            "n_activating": sum(truth),
            "window_sample_ids": [w.ref for w in windows],
            "window_is_activating": truth,
            "call": out.info,
        }
        if not out.ok:
            return DetectionRecord(
                **base,
                status="failed",
                error=out.error,
                chosen=[],
                true_positives=None,
                false_positives=None,
                true_negatives=None,
                false_negatives=None,
                accuracy=None,
                balanced_accuracy=None,
                precision=None,
                recall=None,
            )
        reply: DetectReply = out.parsed
        s = detection_scores(reply.chosen, truth)
        return DetectionRecord(
            **base,
            status="ok",
            error=None,
            chosen=sorted(reply.chosen),
            true_positives=s.tp,
            false_positives=s.fp,
            true_negatives=s.tn,
            false_negatives=s.fn,
            accuracy=s.accuracy,
            balanced_accuracy=s.balanced_accuracy,
            precision=s.precision,
            recall=s.recall,
        )

    records = await _gather_bounded([lambda j=j: one(j) for j in jobs], concurrency, progress)
    _log_summary("detection", records, cache)
    return records


def detection_score_record(r: DetectionRecord) -> ScoreRecord:
    """A detection record as a row of ``explanation_scores`` (scorer ``detection``)."""
    return ScoreRecord(
        layer=r.layer,
        feature_id=r.feature_id,
        scorer="detection",
        status=r.status,
        error=r.error,
        score=r.balanced_accuracy,
        metric="balanced_accuracy",
        balanced_accuracy=r.balanced_accuracy,
        n=r.n_windows,
        n_activating=r.n_activating,
        window_sample_ids=list(r.window_sample_ids),
        window_is_activating=list(r.window_is_activating),
        chosen=list(r.chosen),
        call=r.call,
    )


async def run_fuzzing(
    features: Sequence[FeatureExamples],
    descriptions: Sequence[DescriptionRecord],
    describer: Describer,
    cache: LLMCache | None = None,
    *,
    prompt_version: str = DEFAULT_PROMPT_VERSION,
    seed: int = 0,
    threshold_frac: float = 0.2,
    params: GenerationParams | None = None,
    retry: RetryPolicy | None = None,
    concurrency: int = 8,
    use_message_batches: bool = False,
    progress: ProgressFn | None = None,
) -> list[ScoreRecord]:
    """Fuzzing (delphi's token-level scorer): each held-out activating window is shown once with marks, a
    seeded half on its firing tokens and half on as many decoy tokens where the feature is silent
    (:func:`~dagster_project.lib.autointerp.fuzz_windows`); from the description alone the scorer says
    which marks fit. Balanced accuracy of those choices against the truth. Only features with an ``ok``
    description and held-out activating windows are scored (the caller records the others)."""
    params = params or GenerationParams(max_tokens=300)
    retry = retry or RetryPolicy()
    by_key = {(d.layer, d.feature_id): d for d in descriptions if d.status == "ok" and d.description}
    _check_unique([fx.key for fx in features], "run_fuzzing")
    jobs: list[tuple[FeatureExamples, list[FuzzWindow], LLMRequest]] = []
    for fx in features:
        d = by_key.get(fx.key)
        if d is None or not fx.holdout:
            continue
        fws = fuzz_windows(fx.holdout, threshold_frac=threshold_frac, seed=f"{seed}:{fx.layer}:{fx.feature_id}")
        prompt = build_fuzz_prompt(d.description or "", fws, prompt_version)
        req = LLMRequest(
            kind="fuzz",
            system=prompt.system,
            user=prompt.user,
            prompt_version=prompt_version,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            payload=FuzzPayload(d.description or "", tuple(fws)),
        )
        jobs.append((fx, fws, req))
    prefetched = (
        await _prefetch(describer, cache, [j[2] for j in jobs], None)
        if use_message_batches and describer.supports_message_batches and jobs
        else None
    )
    rng = random.Random(0)

    async def one(job: tuple[FeatureExamples, list[FuzzWindow], LLMRequest]) -> ScoreRecord:
        fx, fws, req = job
        n = len(fws)
        truth = [fw.correct for fw in fws]
        out = await _call(
            describer, cache, req, lambda t: parse_fuzz_reply(t, n), rubric_version=None, policy=retry,
            prefetched=prefetched, rng=rng,
        )
        base = {
            "layer": fx.layer, "feature_id": fx.feature_id, "scorer": "fuzzing", "metric": "balanced_accuracy",
            "n": n, "n_activating": sum(truth), "window_sample_ids": [fw.window.ref for fw in fws],
            "window_is_activating": truth, "call": out.info,
        }
        if not out.ok:
            return ScoreRecord(**base, status="failed", error=out.error, score=None, balanced_accuracy=None,
                               chosen=[])
        s = detection_scores(out.parsed.chosen, truth)
        return ScoreRecord(**base, status="ok", error=None, score=s.balanced_accuracy,
                           balanced_accuracy=s.balanced_accuracy, chosen=sorted(out.parsed.chosen))

    records = await _gather_bounded([lambda j=j: one(j) for j in jobs], concurrency, progress)
    _log_summary("fuzzing", records, cache)
    return records


# --------------------------------------------------------------------------------------------
# Best of n: several candidate descriptions per feature, chosen on validation windows
# --------------------------------------------------------------------------------------------


def candidate_examples(fx: FeatureExamples, n_candidates: int, seed: int = 0) -> list[FeatureExamples]:
    """The examples each candidate description is written from: candidate 1 sees every describer window;
    each further candidate a different seeded subset (about two thirds of the top and of the negative
    windows, at least one top window), as HypotheSAEs draws a fresh sample of examples per candidate. Only
    the describer's windows are ever used; a feature with too few windows for distinct subsets gets
    fewer candidates."""
    out = [fx]
    if n_candidates <= 1 or not fx.top:
        return out
    seen = {(tuple(range(len(fx.top))), tuple(range(len(fx.negatives))))}
    rng = random.Random(f"candidates:{seed}:{fx.layer}:{fx.feature_id}")
    k_top = max(1, math.ceil(2 * len(fx.top) / 3))
    k_neg = math.ceil(2 * len(fx.negatives) / 3)
    tries = 0
    while len(out) < n_candidates and tries < 50:
        tries += 1
        top = tuple(sorted(rng.sample(range(len(fx.top)), k_top)))
        neg = tuple(sorted(rng.sample(range(len(fx.negatives)), k_neg)))
        if (top, neg) in seen:
            continue
        seen.add((top, neg))
        out.append(dataclasses.replace(fx, top=[fx.top[i] for i in top], negatives=[fx.negatives[i] for i in neg]))
    return out


@dataclass
class CandidateRecord:
    """One candidate description of a feature with its validation detection score."""

    candidate: int
    description: DescriptionRecord
    validation: DetectionRecord | None
    is_best: bool = False

    @property
    def validation_score(self) -> float | None:
        v = self.validation
        return v.balanced_accuracy if v is not None and v.status == "ok" else None


async def run_best_of_n(
    features: Sequence[FeatureExamples],
    describer: Describer,
    cache: LLMCache | None = None,
    *,
    n_candidates: int = 1,
    seed: int = 0,
    prompt_version: str = DEFAULT_PROMPT_VERSION,
    retry: RetryPolicy | None = None,
    concurrency: int = 8,
    threshold_frac: float = 0.2,
    use_message_batches: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[list[DescriptionRecord], list[list[CandidateRecord]]]:
    """Describe every feature ``n_candidates`` times (:func:`candidate_examples`), score each ``ok``
    candidate by detection on the feature's validation windows (shown to no describer and never used by
    the scorers of ``explanation_scores``) and keep the best (highest balanced accuracy; ties and
    unscored candidates: the lower candidate number, so candidate 1 when nothing could be scored).

    Returns the kept record per feature (input order) and every feature's candidates. With one
    candidate this is :func:`run_describe` and no validation call is made."""
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    retry = retry or RetryPolicy()
    per_feature = [candidate_examples(fx, n_candidates, seed) for fx in features]
    rounds = max((len(c) for c in per_feature), default=0)
    cands: list[list[CandidateRecord]] = [[] for _ in features]
    for k in range(rounds):  # one round per candidate number: (layer, feature) is unique within a round
        idx = [i for i, c in enumerate(per_feature) if len(c) > k]
        recs = await run_describe(
            [per_feature[i][k] for i in idx], describer, cache, prompt_version=prompt_version, retry=retry,
            concurrency=concurrency, threshold_frac=threshold_frac, use_message_batches=use_message_batches,
            progress=progress if k == 0 else None,
        )
        vals: dict[int, DetectionRecord] = {}
        if n_candidates > 1:
            held = [dataclasses.replace(features[i], holdout=features[i].validation,
                                        holdout_negatives=features[i].validation_negatives) for i in idx]
            det = await run_detection(
                [h for h in held if h.holdout or h.holdout_negatives], recs, describer, cache,
                prompt_version=prompt_version, seed=seed, retry=retry, concurrency=concurrency,
                use_message_batches=use_message_batches,
            )
            vals = {r.feature_id: r for r in det}
        for i, rec in zip(idx, recs, strict=True):
            cands[i].append(CandidateRecord(candidate=k + 1, description=rec, validation=vals.get(rec.feature_id)))
    kept: list[DescriptionRecord] = []
    for cs in cands:
        ok = [c for c in cs if c.description.status == "ok"]
        pool = ok or cs
        best = max(pool, key=lambda c: (c.validation_score if c.validation_score is not None else -1.0,
                                        -c.candidate))
        best.is_best = True
        kept.append(best.description)
    return kept, cands


def _log_summary(what: str, records: Sequence[Any], cache: LLMCache | None) -> None:
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
