"""A local server speaking the OpenAI chat-completions protocol, with the Anthropic test server's faults.

What vLLM, llama.cpp's ``llama-server`` and Ollama answer, as far as featurelake uses it::

    with OpenAITestServer(faults=FaultPlan(schedule={1: "rate_limit"})) as server:
        client = openai.AsyncOpenAI(api_key="k", base_url=server.base_url)   # base_url ends in /v1

Endpoints: ``POST /v1/chat/completions`` (a ``chat.completion`` object: ``choices[0].message.content``,
``finish_reason``, ``usage.prompt_tokens`` / ``completion_tokens`` / ``total_tokens``, and
``usage.prompt_tokens_details.cached_tokens`` when ``prefix_cache`` is on, as vLLM reports it) and
``GET /v1/models``. Errors have OpenAI's shape, ``{"error": {"message", "type", "code"}}``.

It is the Anthropic test server's :class:`~dagster_project.testing.fault_server.FaultServer` with another
wire format: the same :class:`~dagster_project.testing.faults.FaultPlan` (schedule, rules matching prompt
text, seeded probability), the same responders (a request is handed to them as its system text and user
messages, so :func:`~dagster_project.testing.responders.default_responder` answers the featurelake
prompts) and the same counters (``messages_calls`` counts chat-completion calls; ``completed_by_prompt_hash``
the calls answered normally, per prompt). The fault kinds, in this protocol:

``rate_limit``: 429 with ``retry-after``; ``overloaded``: 503 with ``retry-after`` (vLLM and llama.cpp
answer 503 while busy or loading); ``server_error``: 500; ``reset``: the socket closed with RST;
``timeout``: the server sleeps past the client's timeout; ``malformed_body``: HTTP 200 with broken JSON;
``malformed_reply``: content that is not the JSON asked for; ``empty``: content ``""``; ``refusal``:
``message.refusal`` set and no content.

Keys: with ``api_key`` set, requests must carry ``Authorization: Bearer <api_key>`` (else 401); without,
any or no key is accepted, as a local server started without ``--api-key`` does. ``keys_seen`` counts
requests that carried an ``Authorization`` header at all (the key itself is never stored).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Unpack

from dagster_project.testing.fault_server import FaultHandler, FaultServer, ServerOptions, serve_main
from dagster_project.testing.faults import FAULT_KINDS, FaultKind, FaultPlan, FaultRule
from dagster_project.testing.responders import (
    approx_tokens,
    default_responder,
    request_texts,
    text_of,
)

log = logging.getLogger(__name__)

__all__ = ["FAULT_KINDS", "FaultPlan", "FaultRule", "OpenAITestServer", "as_messages_body", "default_responder"]


def as_messages_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """A chat-completions request as the servers' responders and counters read one: the system
    messages' text as ``system``, the other messages as they are."""
    messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
    system = "\n".join(text_of(m.get("content", "")) for m in messages if m.get("role") in ("system", "developer"))
    rest = [m for m in messages if m.get("role") not in ("system", "developer")]
    return {"model": body.get("model"), "system": system, "messages": rest}


class _OpenAIHandler(FaultHandler["OpenAITestServer"]):
    fault_errors: ClassVar[Mapping[str, tuple[int, str, str]]] = {
        "rate_limit": (429, "rate_limit_error", "Rate limit reached"),
        "overloaded": (503, "server_error", "The server is overloaded"),
        "server_error": (500, "server_error", "internal server error"),
    }
    malformed_body = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": ['

    def error(self, status: int, etype: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        code = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}.get(status)
        self.send_json(status, {"error": {"message": message, "type": etype, "param": None, "code": code}}, headers)

    def authorized(self) -> bool:
        owner = self.owner
        auth = self.headers.get("authorization")
        if auth is not None:
            with owner.lock:
                owner.keys_seen += 1
        if owner.api_key is None:
            return True
        key = auth[7:] if auth and auth.lower().startswith("bearer ") else None
        if key != owner.api_key:
            self.error(401, "invalid_request_error", "Incorrect API key provided")
            return False
        return True

    def route_post(self, path: str, body: dict[str, Any]) -> None:
        owner = self.owner
        if path != "/v1/chat/completions":
            self.error(404, "invalid_request_error", f"no route {path}")
        elif owner.served_models is not None and body.get("model") not in owner.served_models:
            self.error(404, "invalid_request_error", f"The model `{body.get('model')}` does not exist")
        elif not isinstance(body.get("messages"), list) or not body["messages"]:
            self.error(400, "invalid_request_error", "messages must be a non-empty list")
        else:
            as_msg = as_messages_body(body)
            self.serve_call(as_msg, lambda fault: owner.make_completion(body, as_msg, fault))

    def route_get(self, path: str) -> None:
        if path != "/v1/models":
            self.error(404, "invalid_request_error", f"no route {self.path}")
            return
        models = sorted(self.owner.served_models or {"test-model"})
        self.send_json(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "featurelake-test"} for m in models]})


class OpenAITestServer(FaultServer):
    """The local OpenAI-protocol server (see the module docstring); ``base_url`` ends in ``/v1``.

    ``served_models``: model names the server knows (others get 404, as vLLM answers); None accepts any,
    as llama.cpp does. ``prefix_cache``: report the system prompt's tokens as ``cached_tokens`` from the
    second call with the same model and system text on (vLLM's automatic prefix caching).
    """

    name = "openai"
    logger = log
    handler = _OpenAIHandler

    def __init__(self, *, served_models: Sequence[str] | None = None, prefix_cache: bool = False,
                 **options: Unpack[ServerOptions]) -> None:
        super().__init__(**options)
        self.served_models = set(served_models) if served_models is not None else None
        self.prefix_cache = prefix_cache
        self.keys_seen = 0

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    @property
    def chat_calls(self) -> int:
        """``POST /v1/chat/completions`` calls that reached the model (faulted ones included)."""
        return self.messages_calls

    def make_completion(
        self, body: Mapping[str, Any], as_msg: Mapping[str, Any], fault: FaultKind | None
    ) -> dict[str, Any]:
        """The ``chat.completion`` answering ``body`` (``fault``: None, or a reply fault), with its usage."""
        system, user = request_texts(as_msg)
        content: str | None
        refusal = None
        if fault == "empty":
            content = ""
        elif fault == "refusal":
            content, refusal = None, "I'm sorry, I can't help with that."
        elif fault == "malformed_reply":
            content = "Sure! Here is my analysis: the feature {probably} fires on"
        else:
            content = self.responder(as_msg)
        prompt_tokens = approx_tokens(system + user)
        cached = 0
        if self.prefix_cache:
            cached = approx_tokens(system) if self.prefix_seen(body.get("model"), system) else 0
        completion_tokens = approx_tokens(content or refusal or "") if (content or refusal) else 0
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if self.prefix_cache:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return {
            "id": f"chatcmpl-{hashlib.sha256(f'{time.time_ns()}{user}'.encode()).hexdigest()[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": "stop",
                "logprobs": None,
            }],
            "usage": usage,
        }


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until interrupted (for benchmarks): logs its address and, at the end, its counters."""
    serve_main(OpenAITestServer, (__doc__ or "").split("\n", 1)[0], argv)


if __name__ == "__main__":
    main()
