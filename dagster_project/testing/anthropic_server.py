"""A local server speaking enough of the Anthropic Messages API for tests and benchmarks.

Start it as a context manager; it listens on ``127.0.0.1`` on an ephemeral port in a thread::

    with AnthropicTestServer(faults=FaultPlan(schedule={1: "rate_limit"})) as server:
        client = anthropic.AsyncAnthropic(api_key="test", base_url=server.base_url)

Endpoints: ``POST /v1/messages`` (a well-formed Message with ``usage``, including the prompt-cache
fields), and the Message Batches endpoints ``POST /v1/messages/batches``,
``GET /v1/messages/batches/{id}`` and ``GET /v1/messages/batches/{id}/results`` (JSONL).

Faults (:class:`~dagster_project.testing.faults.FaultPlan`) are injected by a deterministic schedule
(n-th messages call), by rules matching prompt text (first ``times`` matching calls, or always), or with
a seeded probability: ``rate_limit`` (429 + ``retry-after``), ``overloaded`` (529 + ``retry-after``),
``server_error`` (500), ``reset`` (the socket is closed with RST), ``timeout`` (the server sleeps past
the client timeout), ``malformed_body`` (HTTP 200 with broken JSON), ``malformed_reply`` (a valid
Message whose text is not JSON), ``empty`` (no content) and ``refusal`` (``stop_reason: "refusal"``).

A pluggable responder turns a request body into reply text
(:func:`~dagster_project.testing.responders.default_responder` answers the featurelake prompts). The
server and its counters are :class:`~dagster_project.testing.fault_server.FaultServer`'s; this module
is the Anthropic wire format. Run ``python -m dagster_project.testing.anthropic_server`` to serve one
for a benchmark.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Unpack

from dagster_project.testing.fault_server import FaultHandler, FaultServer, ServerOptions, serve_main
from dagster_project.testing.faults import FAULT_KINDS, TRANSPORT_FAULTS, FaultKind, FaultPlan, FaultRule
from dagster_project.testing.responders import (
    Responder,
    approx_tokens,
    default_responder,
    gullible_responder,
    has_cache_control,
    prompt_hash,
    request_texts,
    task_of,
    text_of,
)

log = logging.getLogger(__name__)

# The fault plan and responders are named from here too: tests import them beside the server.
__all__ = [
    "FAULT_KINDS",
    "AnthropicTestServer",
    "FaultKind",
    "FaultPlan",
    "FaultRule",
    "Responder",
    "default_responder",
    "gullible_responder",
    "main",
    "prompt_hash",
    "request_texts",
    "task_of",
]

_EMPTY_COUNTS = {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}


@dataclass
class _Batch:
    id: str
    created_at: datetime
    n_requests: int
    lines: list[str]
    counts: dict[str, int]
    polls_left: int


class _AnthropicHandler(FaultHandler["AnthropicTestServer"]):
    fault_errors: ClassVar[Mapping[str, tuple[int, str, str]]] = {
        "rate_limit": (429, "rate_limit_error", "rate limited"),
        "overloaded": (529, "overloaded_error", "overloaded"),
        "server_error": (500, "api_error", "internal server error"),
    }
    malformed_body = b'{"id": "msg_broken", "type": "message", "content": ['

    def error(self, status: int, etype: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_json(status, {"type": "error", "error": {"type": etype, "message": message}}, headers)

    def authorized(self) -> bool:
        """The key comes as ``x-api-key`` or ``authorization: Bearer`` (newer SDKs send the latter); it must
        be present, and equal to the server's ``api_key`` when one is set. Answers 401 otherwise."""
        owner = self.owner
        auth = self.headers.get("authorization") or ""
        keys = [k for k in (self.headers.get("x-api-key"), auth[7:] if auth.lower().startswith("bearer ") else None) if k]
        if not keys or (owner.api_key is not None and owner.api_key not in keys):
            self.error(401, "authentication_error", "invalid x-api-key")
            return False
        return True

    def route_post(self, path: str, body: dict[str, Any]) -> None:
        if path == "/v1/messages":
            self.serve_call(body, lambda fault: self.owner.make_message(body, fault))
        elif path == "/v1/messages/batches":
            self._create_batch(body)
        else:
            self.error(404, "not_found_error", f"no route {path}")

    def route_get(self, path: str) -> None:
        owner = self.owner
        m = re.fullmatch(r"/v1/messages/batches/([A-Za-z0-9_]+)(/results)?", path)
        if not m:
            self.error(404, "not_found_error", f"no route {path}")
            return
        batch = owner._batches.get(m.group(1))
        if batch is None:
            self.error(404, "not_found_error", f"no batch {m.group(1)}")
            return
        if m.group(2):
            if batch.polls_left > 0:
                self.error(400, "invalid_request_error", "batch has not ended")
                return
            self.send_raw(200, ("\n".join(batch.lines) + "\n").encode(), "application/binary")
        else:
            with owner.lock:
                batch.polls_left = max(0, batch.polls_left - 1)
            self.send_json(200, owner.batch_json(batch))

    def _create_batch(self, body: dict[str, Any]) -> None:
        owner = self.owner
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            self.error(400, "invalid_request_error", "requests must be a non-empty list")
            return
        ids = [r.get("custom_id") for r in requests]
        if len(set(ids)) != len(ids) or not all(
            isinstance(i, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids
        ):
            self.error(
                400, "invalid_request_error", "custom_id must be unique and match [A-Za-z0-9_-]{1,64}"
            )
            return
        lines: list[str] = []
        counts = dict(_EMPTY_COUNTS)
        for r in requests:
            params = r.get("params") or {}
            fault, index, phash = owner.begin_call(params, from_schedule=False)
            if fault in TRANSPORT_FAULTS:
                etype = {"rate_limit": "rate_limit_error", "overloaded": "overloaded_error"}.get(
                    fault, "api_error"
                )
                result: dict[str, Any] = {
                    "type": "errored",
                    "error": {"type": "error", "error": {"type": etype, "message": f"injected {fault}"}},
                }
                counts["errored"] += 1
            else:
                result = {"type": "succeeded", "message": owner.make_message(params, fault, batch=True)}
                counts["succeeded"] += 1
            owner.end_call(index, phash, fault, 200 if result["type"] == "succeeded" else 500)
            lines.append(json.dumps({"custom_id": r["custom_id"], "result": result}))
        with owner.lock:
            owner._batch_seq += 1
            batch = _Batch(
                id=f"msgbatch_{owner._batch_seq:06d}",
                created_at=datetime.now(UTC),
                n_requests=len(requests),
                lines=lines,
                counts=counts,
                polls_left=owner.batch_polls_until_end,
            )
            owner._batches[batch.id] = batch
            owner.batches_created += 1
        self.send_json(200, owner.batch_json(batch))


class AnthropicTestServer(FaultServer):
    """The local Anthropic-protocol server (see the module docstring and :class:`FaultServer` for the
    counters). ``messages_calls`` counts messages calls and batch items; ``batches_created`` the batches.
    The API key is checked for presence, or against ``api_key`` when given (a test key).
    ``model_suffix`` is appended to the model a reply names; a batch ends after ``batch_polls_until_end``
    polls."""

    name = "anthropic"
    logger = log
    handler = _AnthropicHandler

    def __init__(self, *, model_suffix: str = "", batch_polls_until_end: int = 1,
                 **options: Unpack[ServerOptions]) -> None:
        super().__init__(**options)
        self.model_suffix = model_suffix
        self.batch_polls_until_end = batch_polls_until_end
        self._batches: dict[str, _Batch] = {}
        self._batch_seq = 0

    def make_message(self, body: Mapping[str, Any], fault: FaultKind | None, *, batch: bool = False) -> dict[str, Any]:
        """The Message answering ``body`` (``fault``: None, or a reply fault), with its usage."""
        system, user = request_texts(body)
        stop_reason = "end_turn"
        if fault == "empty":
            content: list[dict[str, Any]] = []
        elif fault == "refusal":
            content = []
            stop_reason = "refusal"
        elif fault == "malformed_reply":
            content = [{"type": "text", "text": "Sure! Here is my analysis: the feature {probably} fires on"}]
        else:
            content = [{"type": "text", "text": self.responder(body)}]
        out_text = text_of(content)
        cache_creation = cache_read = 0
        input_tokens = approx_tokens(system + user)
        if has_cache_control(body):
            if self.prefix_seen(body.get("model"), system):
                cache_read = approx_tokens(system)
            else:
                cache_creation = approx_tokens(system)
            input_tokens = approx_tokens(user)
        return {
            "id": f"msg_{hashlib.sha256(f'{time.time_ns()}{user}'.encode()).hexdigest()[:24]}",
            "type": "message",
            "role": "assistant",
            "model": f"{body.get('model')}{self.model_suffix}",
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": approx_tokens(out_text) if out_text else 0,
                "cache_creation_input_tokens": cache_creation,
                "cache_read_input_tokens": cache_read,
                "service_tier": "batch" if batch else "standard",
            },
        }

    def batch_json(self, batch: _Batch) -> dict[str, Any]:
        ended = batch.polls_left <= 0
        counts = dict(batch.counts) if ended else dict(_EMPTY_COUNTS)
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": {**counts, "processing": 0 if ended else batch.n_requests},
            "created_at": batch.created_at.isoformat(),
            "expires_at": (batch.created_at + timedelta(days=1)).isoformat(),
            "ended_at": datetime.now(UTC).isoformat() if ended else None,
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"{self.base_url}/v1/messages/batches/{batch.id}/results" if ended else None,
        }


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until interrupted (for benchmarks): logs its address and, at the end, its counters."""
    serve_main(AnthropicTestServer, (__doc__ or "").split("\n", 1)[0], argv)


if __name__ == "__main__":
    main()
