"""The fault-injecting HTTP server that the local LLM test servers share, whatever their wire format.

:class:`FaultServer` runs a threaded HTTP server on ``127.0.0.1`` (an ephemeral port by default), adds
``latency_s`` to every POST, chooses each model call's fault from its :class:`FaultPlan`, and keeps the
counters and the request log tests assert on. :class:`FaultHandler` reads bodies, closes sockets with RST
and sends a model call's fault or reply (:meth:`FaultHandler.serve_call`); a subclass per API
(``anthropic_server``, ``openai_server``) gives its error shape, its key check, its routes and its reply.
:func:`serve_main` is both servers' ``python -m`` entry point.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Generic, Self, TypedDict, TypeVar, cast

from dagster_project.testing.faults import RETRY_AFTER_FAULTS, FaultKind, FaultPlan
from dagster_project.testing.responders import (
    Responder,
    default_responder,
    has_cache_control,
    prompt_hash,
    request_texts,
    task_of,
)

log = logging.getLogger(__name__)

S = TypeVar("S", bound="FaultServer")


class ServerOptions(TypedDict, total=False):
    """The keyword arguments every :class:`FaultServer` takes (see its docstring)."""

    responder: Responder | None
    faults: FaultPlan | None
    latency_s: float
    port: int
    api_key: str | None


class FaultHandler(BaseHTTPRequestHandler, Generic[S]):
    """One connection to a :class:`FaultServer` of type ``S``. Subclasses set the wire format's class
    attributes and implement :meth:`error`, :meth:`authorized`, :meth:`route_post` and :meth:`route_get`."""

    protocol_version = "HTTP/1.1"
    server: FaultHTTPServer
    # status, error type and message of the faults that are HTTP errors
    fault_errors: ClassVar[Mapping[str, tuple[int, str, str]]] = {}
    # the body of a ``malformed_body`` fault (HTTP 200, JSON cut short)
    malformed_body: ClassVar[bytes] = b"{"

    @property
    def owner(self) -> S:
        return cast(S, self.server.owner)  # the server a handler class is registered with (its `handler`)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        self.owner.logger.debug(f"{self.owner.name} test server: " + format, *args)

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, OSError, ValueError):
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except (ConnectionError, OSError, ValueError):
            pass

    # -- the wire format's part -----------------------------------------------------------

    def error(self, status: int, etype: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        """Answer an error in the API's shape."""
        raise NotImplementedError

    def authorized(self) -> bool:
        """Check the request's key; answer 401 and return False if it is refused."""
        raise NotImplementedError

    def route_post(self, path: str, body: dict[str, Any]) -> None:
        raise NotImplementedError

    def route_get(self, path: str) -> None:
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------------

    def send_json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        self.send_raw(status, json.dumps(obj).encode(), "application/json", headers)

    def send_raw(self, status: int, data: bytes, ctype: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", f"req_{self.owner.requests_total:06d}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def reset(self) -> None:
        """Close the connection with RST."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def read_body(self) -> dict[str, Any] | None:
        """The request's JSON object, or None after answering 400."""
        n = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self.error(400, "invalid_request_error", "request body is not JSON")
            return None
        if not isinstance(body, dict):
            self.error(400, "invalid_request_error", "request body must be an object")
            return None
        return body

    def serve_call(self, call_body: Mapping[str, Any], reply: Callable[[FaultKind | None], Any]) -> None:
        """One model call: send its fault, or ``reply(fault)`` as JSON (``fault`` is None or a reply fault:
        ``malformed_reply``, ``empty``, ``refusal``); log it with the status sent (0: no answer)."""
        owner = self.owner
        fault, index, phash = owner.begin_call(call_body, from_schedule=True)
        status = 200
        if fault is not None and fault in self.fault_errors:
            status, etype, message = self.fault_errors[fault]
            headers = {"retry-after": str(owner.faults.retry_after_s)} if fault in RETRY_AFTER_FAULTS else None
            self.error(status, etype, message, headers)
        elif fault in ("reset", "timeout"):
            status = 0
            if fault == "timeout":
                owner.stopping.wait(owner.faults.timeout_sleep_s)
            self.reset()
        elif fault == "malformed_body":
            self.send_raw(200, self.malformed_body, "application/json")
        else:
            self.send_json(200, reply(fault))
        owner.end_call(index, phash, fault, status)

    # -- routes ---------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        owner = self.owner
        owner.count_request()
        with owner.lock:
            owner._in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner._in_flight)
        try:
            if owner.latency_s:
                time.sleep(owner.latency_s)
            if not self.authorized():
                return
            path = self.path.split("?", 1)[0]
            body = self.read_body()
            if body is not None:
                self.route_post(path, body)
        finally:
            with owner.lock:
                owner._in_flight -= 1

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self.owner.count_request()
        if self.authorized():
            self.route_get(self.path.split("?", 1)[0])


class FaultHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 drops the SYNs of a burst of new connections, which the
    # client then resends a second later: with 32 clients connecting at once, a third wait 1 s more.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler: type[FaultHandler[Any]], owner: FaultServer) -> None:
        super().__init__(address, handler)
        self.owner = owner


class FaultServer:
    """A local fault-injecting LLM server; use as a context manager (or ``start``/``stop``).

    Counters (read them after the calls finish): ``requests_total``, ``max_in_flight`` (most POSTs
    being handled at once), ``messages_calls`` (model calls, batch items included),
    ``calls_by_prompt_hash`` (every model call), ``completed_by_prompt_hash`` (calls answered with a
    normal reply), ``faults_injected`` (by kind), ``batches_created`` and ``log`` (one dict per model call:
    index, prompt hash, task, fault, status, model, whether cache_control was present, batch). Request
    keys are never stored or logged.

    Options (:class:`ServerOptions`): ``responder`` (request body to reply text; the default answers the
    featurelake prompts), ``faults`` (the :class:`FaultPlan`), ``latency_s`` (added to every POST), ``port``
    (0: ephemeral) and ``api_key`` (the key a request must carry, where the API checks one).
    """

    name: ClassVar[str] = "fault"
    logger: ClassVar[logging.Logger] = log
    handler: ClassVar[type[FaultHandler[Any]]] = FaultHandler

    def __init__(
        self,
        *,
        responder: Responder | None = None,
        faults: FaultPlan | None = None,
        latency_s: float = 0.0,
        port: int = 0,
        api_key: str | None = None,
    ) -> None:
        self.responder: Responder = responder or default_responder
        self.faults = faults or FaultPlan()
        self.latency_s = latency_s
        self.port = port
        self.api_key = api_key
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._rng = random.Random(self.faults.seed)
        self._rule_hits: Counter[int] = Counter()
        self._cached_prefixes: set[str] = set()
        self._httpd: FaultHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests_total = 0
        self._in_flight = 0
        self.max_in_flight = 0
        self.messages_calls = 0
        self.batches_created = 0
        self.calls_by_prompt_hash: Counter[str] = Counter()
        self.completed_by_prompt_hash: Counter[str] = Counter()
        self.faults_injected: Counter[str] = Counter()
        self.log: list[dict[str, Any]] = []

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        if self._httpd is not None:
            raise RuntimeError("server already started")
        httpd = FaultHTTPServer(("127.0.0.1", self.port), self.handler, self)
        self._httpd = httpd
        self.stopping.clear()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self.logger.info("%s test server on %s", self.name, self.base_url)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def root_url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def base_url(self) -> str:
        """The URL a client is given (the root, unless the API's clients expect a path)."""
        return self.root_url

    # -- bookkeeping ----------------------------------------------------------------------

    def count_request(self) -> None:
        with self.lock:
            self.requests_total += 1

    def _choose_fault(self, text: str, index: int, from_schedule: bool) -> FaultKind | None:
        plan = self.faults
        if from_schedule and index in plan.schedule:
            return plan.schedule[index]
        for i, rule in enumerate(plan.rules):
            if rule.match is None or rule.match in text:
                if rule.times is None or self._rule_hits[i] < rule.times:
                    self._rule_hits[i] += 1
                    return rule.kind
        if plan.probability > 0 and self._rng.random() < plan.probability:
            return self._rng.choice(list(plan.kinds))
        return None

    def begin_call(self, body: Mapping[str, Any], *, from_schedule: bool) -> tuple[FaultKind | None, int, str]:
        """Count and log one model call (a Messages body); its fault, 1-based index and prompt hash."""
        system, user = request_texts(body)
        phash = prompt_hash(body)
        with self.lock:
            self.messages_calls += 1
            index = self.messages_calls
            fault = self._choose_fault(system + "\n" + user, index, from_schedule)
            self.calls_by_prompt_hash[phash] += 1
            if fault:
                self.faults_injected[fault] += 1
            self.log.append(
                {
                    "index": index,
                    "prompt_hash": phash,
                    "task": task_of(system),
                    "fault": fault,
                    "status": None,
                    "model": body.get("model"),
                    "cache_control": has_cache_control(body),
                    "batch": not from_schedule,
                }
            )
        return fault, index, phash

    def end_call(self, index: int, phash: str, fault: FaultKind | None, status: int) -> None:
        with self.lock:
            self.log[index - 1]["status"] = status
            if fault is None and status == 200:
                self.completed_by_prompt_hash[phash] += 1

    def prefix_seen(self, model: Any, system: str) -> bool:
        """Whether a call with this model and system text came before (prompt-cache emulation)."""
        prefix = hashlib.sha256(f"{model}\n{system}".encode()).hexdigest()
        with self.lock:
            seen = prefix in self._cached_prefixes
            self._cached_prefixes.add(prefix)
        return seen

    def stats(self) -> dict[str, Any]:
        """A JSON-able snapshot of the counters."""
        with self.lock:
            return {
                "requests_total": self.requests_total,
                "max_in_flight": self.max_in_flight,
                "messages_calls": self.messages_calls,
                "batches_created": self.batches_created,
                "distinct_prompts": len(self.calls_by_prompt_hash),
                "completed": sum(self.completed_by_prompt_hash.values()),
                "max_completions_per_prompt": max(self.completed_by_prompt_hash.values(), default=0),
                "faults": dict(self.faults_injected),
            }


def serve_main(server_cls: type[FaultServer], description: str, argv: Sequence[str] | None = None) -> None:
    """Serve until interrupted (for benchmarks): logs its address and, at the end, its counters."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    ap.add_argument("--fault-rate", type=float, default=0.0, help="probability of a random fault")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = server_cls(
        faults=FaultPlan(probability=args.fault_rate, seed=args.seed), latency_s=args.latency, port=args.port
    )
    with server:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.logger.info("stats: %s", json.dumps(server.stats()))
