"""A local server speaking the OpenAI chat-completions protocol, with the Anthropic test server's faults.

What vLLM, llama.cpp's ``llama-server`` and Ollama answer, as far as featurelake uses it::

    with OpenAITestServer(faults=FaultPlan(schedule={1: "rate_limit"})) as server:
        client = openai.AsyncOpenAI(api_key="k", base_url=server.base_url)   # base_url ends in /v1

Endpoints: ``POST /v1/chat/completions`` (a ``chat.completion`` object: ``choices[0].message.content``,
``finish_reason``, ``usage.prompt_tokens`` / ``completion_tokens`` / ``total_tokens``, and
``usage.prompt_tokens_details.cached_tokens`` when ``prefix_cache`` is on, as vLLM reports it) and
``GET /v1/models``. Errors have OpenAI's shape, ``{"error": {"message", "type", "code"}}``.

It is :class:`~dagster_project.testing.anthropic_server.AnthropicTestServer` with another wire format:
the same :class:`~dagster_project.testing.anthropic_server.FaultPlan` (schedule, rules matching prompt
text, seeded probability), the same responders (a request is handed to them as its system text and user
messages, so :func:`~dagster_project.testing.anthropic_server.default_responder` answers the featurelake
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

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from dagster_project.testing.anthropic_server import (
    FAULT_KINDS,
    AnthropicTestServer,
    FaultKind,
    FaultPlan,
    FaultRule,
    Responder,
    _approx_tokens,
    _Handler,
    _Server,
    _text_of,
    default_responder,
    request_texts,
)

log = logging.getLogger(__name__)

__all__ = ["FAULT_KINDS", "FaultPlan", "FaultRule", "OpenAITestServer", "as_messages_body", "default_responder"]


def as_messages_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """A chat-completions request as the Anthropic server's responders and counters read one: the system
    messages' text as ``system``, the other messages as they are."""
    messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
    system = "\n".join(_text_of(m.get("content", "")) for m in messages if m.get("role") in ("system", "developer"))
    rest = [m for m in messages if m.get("role") not in ("system", "developer")]
    return {"model": body.get("model"), "system": system, "messages": rest}


class _OpenAIHandler(_Handler):
    server: _OpenAIServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("openai test server: " + format, *args)

    def _error(self, status: int, etype: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        code = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}.get(status)
        self._send_json(status, {"error": {"message": message, "type": etype, "param": None, "code": code}}, headers)

    def _authorized(self) -> bool:
        owner = self.server.owner
        auth = self.headers.get("authorization")
        if auth is not None:
            with owner._lock:
                owner.keys_seen += 1
        if owner.api_key is None:
            return True
        key = auth[7:] if auth and auth.lower().startswith("bearer ") else None
        if key != owner.api_key:
            self._error(401, "invalid_request_error", "Incorrect API key provided")
            return False
        return True

    def _post(self) -> None:
        owner = self.server.owner
        if owner.latency_s:
            time.sleep(owner.latency_s)
        if not self._authorized():
            return
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        if body is None:
            return
        if path != "/v1/chat/completions":
            self._error(404, "invalid_request_error", f"no route {path}")
        elif owner.served_models is not None and body.get("model") not in owner.served_models:
            self._error(404, "invalid_request_error", f"The model `{body.get('model')}` does not exist")
        elif not isinstance(body.get("messages"), list) or not body["messages"]:
            self._error(400, "invalid_request_error", "messages must be a non-empty list")
        else:
            self._chat(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        owner = self.server.owner
        owner._count_request()
        if not self._authorized():
            return
        if self.path.split("?", 1)[0] != "/v1/models":
            self._error(404, "invalid_request_error", f"no route {self.path}")
            return
        models = sorted(owner.served_models or {"test-model"})
        self._send_json(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "featurelake-test"} for m in models]})

    def _chat(self, body: dict[str, Any]) -> None:
        owner = self.server.owner
        as_msg = as_messages_body(body)
        fault, index, phash = owner._begin_call(as_msg, from_schedule=True)
        status = 200
        retry_after = {"retry-after": str(owner.faults.retry_after_s)}
        if fault == "rate_limit":
            status = 429
            self._error(429, "rate_limit_error", "Rate limit reached", retry_after)
        elif fault == "overloaded":
            status = 503
            self._error(503, "server_error", "The server is overloaded", retry_after)
        elif fault == "server_error":
            status = 500
            self._error(500, "server_error", "internal server error")
        elif fault == "reset":
            status = 0
            self._reset()
        elif fault == "timeout":
            status = 0
            owner._stop.wait(owner.faults.timeout_sleep_s)
            self._reset()
        elif fault == "malformed_body":
            self._send_raw(200, b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [',
                           "application/json")
        else:
            self._send_json(200, owner._make_completion(body, as_msg, fault))
        owner._end_call(index, phash, fault, status)


class _OpenAIServer(_Server):
    owner: OpenAITestServer  # type: ignore[assignment]


class OpenAITestServer(AnthropicTestServer):
    """The local OpenAI-protocol server (see the module docstring); ``base_url`` ends in ``/v1``.

    ``served_models``: model names the server knows (others get 404, as vLLM answers); None accepts any,
    as llama.cpp does. ``prefix_cache``: report the system prompt's tokens as ``cached_tokens`` from the
    second call with the same model and system text on (vLLM's automatic prefix caching).
    """

    def __init__(
        self,
        *,
        responder: Responder | None = None,
        faults: FaultPlan | None = None,
        latency_s: float = 0.0,
        port: int = 0,
        api_key: str | None = None,
        served_models: Sequence[str] | None = None,
        prefix_cache: bool = False,
    ) -> None:
        super().__init__(responder=responder, faults=faults, latency_s=latency_s, port=port, api_key=api_key)
        self.served_models = set(served_models) if served_models is not None else None
        self.prefix_cache = prefix_cache
        self.keys_seen = 0

    def start(self) -> OpenAITestServer:
        if self._httpd is not None:
            raise RuntimeError("server already started")
        import threading

        httpd = _OpenAIServer(("127.0.0.1", self.port), _OpenAIHandler)
        httpd.owner = self
        self._httpd = httpd
        self._stop.clear()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        log.info("openai test server on %s", self.base_url)
        return self

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    @property
    def base_url(self) -> str:
        return super().base_url + "/v1"

    @property
    def chat_calls(self) -> int:
        """``POST /v1/chat/completions`` calls that reached the model (faulted ones included)."""
        return self.messages_calls

    def _make_completion(
        self, body: Mapping[str, Any], as_msg: Mapping[str, Any], fault: FaultKind | None
    ) -> dict[str, Any]:
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
        prompt_tokens = _approx_tokens(system + user)
        cached = 0
        if self.prefix_cache:
            prefix = hashlib.sha256(f"{body.get('model')}\n{system}".encode()).hexdigest()
            with self._lock:
                seen = prefix in self._cached_prefixes
                self._cached_prefixes.add(prefix)
            cached = _approx_tokens(system) if seen else 0
        completion_tokens = _approx_tokens(content or refusal or "") if (content or refusal) else 0
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    ap.add_argument("--fault-rate", type=float, default=0.0, help="probability of a random fault")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = OpenAITestServer(
        faults=FaultPlan(probability=args.fault_rate, seed=args.seed), latency_s=args.latency, port=args.port
    )
    with server:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log.info("stats: %s", json.dumps(server.stats()))


if __name__ == "__main__":
    main()
