"""An OpenAI-compatible describer: any server speaking the chat-completions protocol.

vLLM (``vllm serve M``: ``http://localhost:8000/v1``), llama.cpp's ``llama-server``
(``http://localhost:8080/v1``), Ollama (``http://localhost:11434/v1``) and OpenAI itself all answer
``POST {base_url}/chat/completions``. :class:`OpenAICompatDescriber` talks to them through the official
``openai`` SDK (``AsyncOpenAI``) with the same contract as the Anthropic backend, so the runners
(:func:`~dagster_project.lib.describers.describe.run_describe`, ``run_classify``, ``run_detection``) give it the
same concurrency limit, call cache, retries with ``retry-after`` and failure recording:

- the fixed instructions go in a ``system`` message, the data in a ``user`` message; the reply is
  ``choices[0].message.content``;
- usage is ``usage.prompt_tokens`` / ``completion_tokens``; the prompt tokens a server read from its
  prefix cache (``usage.prompt_tokens_details.cached_tokens``, reported by OpenAI and by vLLM with prefix
  caching) are recorded as cache reads and left out of ``input_tokens``, as the Anthropic backend records
  them;
- cost: a local model has no per-token price, so the default price is zero and every call records cost
  ``0.0`` with its real token counts. ``price_usd_per_mtok=(input, output)`` prices a paid endpoint
  (cached prompt tokens are charged at the input price: an upper bound); ``None`` records the cost as
  unknown;
- the SDK's own retries (``sdk_max_retries``, 2 by default as in the Anthropic backend) handle short blips
  and honour ``retry-after``; errors it gives up on become
  :class:`~dagster_project.lib.describers.errors.LLMCallError` with the server's ``retry-after`` for the runner's
  loop. A rejected key (401/403) or an unknown model or route (404) is an
  :class:`~dagster_project.lib.describers.errors.LLMConfigError`, which aborts the run instead of failing every
  feature;
- a refusal (``message.refusal``, or ``finish_reason == "content_filter"``) and an empty reply raise
  :class:`~dagster_project.lib.describers.errors.RefusalError` / ``EmptyReplyError`` with the call's usage.

The API key is optional: many local servers need none, and then no ``Authorization`` header is sent at
all. When given, it is held privately, handed to the SDK, and never logged, cached or put in a record or
repr. There is no batch API here (``supports_message_batches`` is False): the runners make single calls.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dagster_project.lib.describers.errors import EmptyReplyError, LLMCallError, LLMConfigError, RefusalError
from dagster_project.lib.describers.interface import PerLoop
from dagster_project.lib.describers.sdk import SDKDescriber, map_transport_error
from dagster_project.lib.describers.types import LLMRequest, LLMResponse

log = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
# The SDK insists on a key when it builds a client; when there is none this placeholder satisfies it and
# every request omits the Authorization header, so the placeholder never leaves the process.
_NO_KEY = "no-key"


def redact_url(url: str | None) -> str | None:
    """``url`` without any ``user:password@`` part (a base URL may carry credentials)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class OpenAICompatDescriber(SDKDescriber):
    """A model behind an OpenAI-compatible chat-completions endpoint (see the module docstring)."""

    backend = "openai"
    supports_message_batches = False

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        max_concurrency: int = 8,
        timeout_s: float = 120.0,
        sdk_max_retries: int = 2,
        price_usd_per_mtok: tuple[float, float] | None = (0.0, 0.0),
    ) -> None:
        if not base_url or not str(base_url).startswith(("http://", "https://")):
            raise LLMConfigError(
                f"the openai backend needs base_url, the server's OpenAI-compatible root (got {base_url!r}): "
                "e.g. http://localhost:8000/v1 (vLLM), http://localhost:8080/v1 (llama.cpp's llama-server), "
                "http://localhost:11434/v1 (Ollama)"
            )
        if not model:
            raise LLMConfigError(
                "the openai backend needs a model name: the one the server serves (vLLM: the id passed to "
                "`vllm serve`; Ollama: e.g. llama3.1:8b; llama.cpp answers to any name)"
            )
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if sdk_max_retries < 0:
            raise ValueError(f"sdk_max_retries must be >= 0, got {sdk_max_retries}")
        if price_usd_per_mtok is not None:
            price = tuple(float(p) for p in price_usd_per_mtok)
            if len(price) != 2 or any(p < 0 for p in price):
                raise ValueError(
                    f"price_usd_per_mtok must be two non-negative numbers (input, output), got {price_usd_per_mtok!r}"
                )
            price_usd_per_mtok = (price[0], price[1])
        self.model = model
        self.base_url = str(base_url).rstrip("/")
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.sdk_max_retries = sdk_max_retries
        self.price_usd_per_mtok = price_usd_per_mtok
        self.__api_key = api_key or None
        self._per_loop = PerLoop()

    def __repr__(self) -> str:
        key = "<hidden>" if self.__api_key else "None"
        return (
            f"OpenAICompatDescriber(model={self.model!r}, base_url={redact_url(self.base_url)!r}, api_key={key})"
        )

    @property
    def has_api_key(self) -> bool:
        return self.__api_key is not None

    def _client(self) -> Any:
        import openai

        return self._per_loop.get(
            "client",
            lambda: openai.AsyncOpenAI(
                api_key=self.__api_key or _NO_KEY,
                base_url=self.base_url,
                max_retries=self.sdk_max_retries,
                timeout=self.timeout_s,
            ),
        )

    def _params(self, request: LLMRequest) -> dict[str, Any]:
        import openai

        params: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "messages": [
                {"role": "system", "content": request.system},
                {"role": "user", "content": request.user},
            ],
        }
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if self.__api_key is None:
            params["extra_headers"] = {"Authorization": openai.Omit()}
        return params

    def cost_usd(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float | None:
        """The call's cost at ``price_usd_per_mtok``; None when no price is configured."""
        if self.price_usd_per_mtok is None:
            return None
        price_in, price_out = self.price_usd_per_mtok
        return ((input_tokens + cached_tokens) * price_in + output_tokens * price_out) / 1e6

    def _map_error(self, err: BaseException) -> BaseException:
        import openai

        where = redact_url(self.base_url)
        if isinstance(err, openai.AuthenticationError | openai.PermissionDeniedError):
            how = (
                f"check {self.api_key_env}" if self.__api_key else f"it needs a key: set {self.api_key_env}"
            )
            return LLMConfigError(
                f"the OpenAI-compatible server at {where} refused the credentials "
                f"({type(err).__name__}, HTTP {err.status_code}): {how} in the environment of the Dagster code "
                "location"
            )
        if isinstance(err, openai.NotFoundError):
            return LLMConfigError(
                f"the OpenAI-compatible server at {where} answered 404 for {where}/chat/completions with model "
                f"{self.model!r}: an unknown model, or a base_url without its /v1? ({str(err)[:300]})"
            )
        return map_transport_error(openai, err, self.timeout_s)

    def _to_response(self, completion: Any) -> LLMResponse:
        usage = getattr(completion, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        tok_out = int(getattr(usage, "completion_tokens", 0) or 0)
        details = getattr(usage, "prompt_tokens_details", None)
        cached = min(prompt_tokens, int(getattr(details, "cached_tokens", 0) or 0))
        tok_in = prompt_tokens - cached
        model = str(getattr(completion, "model", None) or self.model)
        choices = getattr(completion, "choices", None)
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = getattr(choice, "message", None)
        text = getattr(message, "content", None)
        text = text if isinstance(text, str) else ""
        refusal = getattr(message, "refusal", None)
        finish = getattr(choice, "finish_reason", None)
        resp = LLMResponse(
            text=text,
            model=model,
            backend=self.backend,
            input_tokens=tok_in,
            output_tokens=tok_out,
            cache_read_input_tokens=cached,
            cost_usd=self.cost_usd(tok_in, tok_out, cached),
            stop_reason=str(finish) if finish is not None else None,
        )
        if choice is None:
            raise LLMCallError("malformed response body: no choices in the chat completion", response=resp)
        if refusal or finish == "content_filter":
            detail = f": {str(refusal)[:200]}" if refusal else ""
            raise RefusalError(f"the model refused (finish_reason={finish}){detail}", response=resp)
        if not text.strip():
            raise EmptyReplyError(f"empty reply (finish_reason={finish})", response=resp)
        return resp

    async def complete(self, request: LLMRequest) -> LLMResponse:
        client = self._client()
        async with self._semaphore():
            completion = await self._mapped(lambda: client.chat.completions.create(**self._params(request)))
        return self._to_response(completion)
