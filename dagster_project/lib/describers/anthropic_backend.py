"""The Anthropic backend: :class:`AnthropicDescriber`, Claude through the official ``anthropic.AsyncAnthropic``
SDK (``base_url`` configurable), with prompt caching on the fixed system block, per-call usage and an
estimated cost, a concurrency limit, and an optional Message Batches path for bulk runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from dagster_project.lib.describers.errors import EmptyReplyError, LLMCallError, LLMConfigError, RefusalError
from dagster_project.lib.describers.interface import PerLoop
from dagster_project.lib.describers.prices import estimate_cost_usd
from dagster_project.lib.describers.sdk import SDKDescriber, map_transport_error
from dagster_project.lib.describers.types import LLMRequest, LLMResponse

log = logging.getLogger(__name__)


class AnthropicDescriber(SDKDescriber):
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
        self._per_loop = PerLoop()

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

    def _create_kwargs(self, request: LLMRequest) -> dict[str, Any]:
        kwargs = self._params(request)
        if "temperature" in kwargs:
            # anthropic 2.14's create() has no `temperature` argument: send it as a body field.
            kwargs["extra_body"] = {"temperature": kwargs.pop("temperature")}
        return kwargs

    async def complete(self, request: LLMRequest) -> LLMResponse:
        client = self._client()
        async with self._semaphore():
            msg = await self._mapped(lambda: client.messages.create(**self._create_kwargs(request)))
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
        out = await self._mapped(lambda: self._batch_results(client, requests))
        for cid in requests:
            out.setdefault(cid, LLMCallError("batch returned no result for this request", retryable=True))
        return out

    async def _batch_results(
        self, client: Any, requests: Mapping[str, LLMRequest]
    ) -> dict[str, LLMResponse | LLMCallError]:
        """Create one message batch, poll it until it ends (or ``batch_max_wait_s``) and read its results."""
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
        return out

