"""The OpenAI-compatible backend and the local chat-completions server it is tested against.

The server (``dagster_project/testing/openai_server.py``) speaks what vLLM, llama.cpp's server and Ollama
speak; the backend (``dagster_project/lib/describers/openai_backend.py``) goes through the official ``openai`` SDK.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path
from typing import Any

import openai
import pytest

from dagster_project.config import DescriberSpec
from dagster_project.describer_resource import DescriberResource, describer_resource
from dagster_project.lib.autointerp import build_describe_prompt, load_rubric, parse_describe_reply
from dagster_project.lib.describers import (
    EmptyReplyError,
    LLMCallError,
    LLMConfigError,
    LLMRequest,
    RefusalError,
    RetryPolicy,
    run_classify,
    run_describe,
    run_detection,
)
from dagster_project.lib.describers.openai_backend import OpenAICompatDescriber, redact_url
from dagster_project.lib.llm_cache import LLMCache
from dagster_project.testing import synthetic_features
from dagster_project.testing.openai_server import FAULT_KINDS, FaultPlan, FaultRule, OpenAITestServer

MODEL = "qwen2.5-7b-instruct"
FAST = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.05)
REQ = LLMRequest(kind="describe", system="TASK: describe-feature", user="hello")


def _backend(server: OpenAITestServer, **kw: Any) -> OpenAICompatDescriber:
    opts: dict[str, Any] = {"timeout_s": 0.5, "sdk_max_retries": 0, "max_concurrency": 4}
    opts.update(kw)
    return OpenAICompatDescriber(base_url=server.base_url, model=MODEL, **opts)


def _complete(d: OpenAICompatDescriber, request: LLMRequest = REQ) -> Any:
    """One call on a fresh event loop, the client closed on the same loop."""

    async def go() -> Any:
        try:
            return await d.complete(request)
        finally:
            await d.aclose()

    return asyncio.run(go())


def _port(server: OpenAITestServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1].split("/", 1)[0])


def test_chat_completions_endpoint_answers_the_sdk_with_usage() -> None:
    fx = synthetic_features(1)[0]
    prompt = build_describe_prompt(fx)

    async def go(server: OpenAITestServer) -> Any:
        async with openai.AsyncOpenAI(api_key="k", base_url=server.base_url, max_retries=0) as c:
            msgs = [{"role": "system", "content": prompt.system}, {"role": "user", "content": prompt.user}]
            first = await c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=50)
            second = await c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=50)
            models = await c.models.list()
        return first, second, models

    with OpenAITestServer(prefix_cache=True, served_models=[MODEL]) as server:
        first, second, models = asyncio.run(go(server))
        stats = server.stats()
    assert first.object == "chat.completion" and first.choices[0].finish_reason == "stop"
    assert "rlhf" in parse_describe_reply(first.choices[0].message.content).description.lower()
    assert first.usage.prompt_tokens > 0 and first.usage.completion_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    # prefix caching as vLLM reports it: nothing cached on the first call, the system prompt on the second
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert [m.id for m in models.data] == [MODEL]
    assert stats["completed"] == 2 and stats["max_completions_per_prompt"] == 2  # the same prompt, twice


def test_every_fault_kind_reaches_the_sdk_as_expected() -> None:
    plan = FaultPlan(
        schedule={i + 1: k for i, k in enumerate(FAULT_KINDS)}, retry_after_s=0.25, timeout_sleep_s=1.0
    )

    async def go(server: OpenAITestServer) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with openai.AsyncOpenAI(api_key="k", base_url=server.base_url, max_retries=0, timeout=0.3) as c:
            for kind in FAULT_KINDS:
                try:
                    seen[kind] = await c.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5
                    )
                except Exception as e:  # noqa: BLE001 - recording the type is the point
                    seen[kind] = e
        return seen

    with OpenAITestServer(faults=plan) as server:
        seen = asyncio.run(go(server))
    assert isinstance(seen["rate_limit"], openai.RateLimitError)
    assert seen["rate_limit"].response.headers["retry-after"] == "0.25"
    assert seen["rate_limit"].body["code"] == "rate_limit_exceeded"  # OpenAI's error shape
    assert isinstance(seen["overloaded"], openai.InternalServerError) and seen["overloaded"].status_code == 503
    assert seen["overloaded"].response.headers["retry-after"] == "0.25"
    assert isinstance(seen["server_error"], openai.InternalServerError) and seen["server_error"].status_code == 500
    assert isinstance(seen["reset"], openai.APIConnectionError)
    assert isinstance(seen["timeout"], openai.APITimeoutError)
    assert isinstance(seen["malformed_body"], ValueError)
    assert seen["empty"].choices[0].message.content == ""
    assert seen["refusal"].choices[0].message.content is None and seen["refusal"].choices[0].message.refusal
    with pytest.raises(ValueError):
        json.loads(seen["malformed_reply"].choices[0].message.content)
    assert dict(server.faults_injected) == {k: 1 for k in FAULT_KINDS}
    assert server.completed_by_prompt_hash.total() == 0


def test_backend_maps_every_fault_to_the_runners_errors() -> None:
    plan = FaultPlan(
        schedule={i + 1: k for i, k in enumerate(FAULT_KINDS)}, retry_after_s=0.25, timeout_sleep_s=1.0
    )

    async def go(server: OpenAITestServer) -> dict[str, Any]:
        d = _backend(server, timeout_s=0.3)
        seen: dict[str, Any] = {}
        for kind in FAULT_KINDS:
            try:
                seen[kind] = await d.complete(REQ)
            except LLMCallError as e:
                seen[kind] = e
        await d.aclose()
        return seen

    with OpenAITestServer(faults=plan) as server:
        seen = asyncio.run(go(server))
    transport = {"rate_limit": "HTTP 429", "overloaded": "HTTP 503", "server_error": "HTTP 500",
                 "reset": "connection error", "timeout": "timeout after 0.3s",
                 "malformed_body": "malformed response body"}
    for kind, text in transport.items():
        err = seen[kind]
        assert type(err) is LLMCallError and err.retryable and text in str(err), (kind, err)
    assert seen["rate_limit"].retry_after == 0.25 and seen["overloaded"].retry_after == 0.25
    assert seen["server_error"].retry_after is None
    assert FAST.delay(1, seen["rate_limit"]) == 0.25  # the runner waits what the server asked
    # a 200 the runner must retry: usage is kept on the error, the text parses as nothing
    assert isinstance(seen["empty"], EmptyReplyError) and seen["empty"].response.input_tokens > 0
    assert isinstance(seen["refusal"], RefusalError) and "can't help" in str(seen["refusal"])
    assert seen["malformed_reply"].text.startswith("Sure!") and seen["malformed_reply"].backend == "openai"


def test_runners_describe_classify_and_score_despite_every_fault_kind(tmp_path: Path) -> None:
    features = synthetic_features(6)
    rubric = load_rubric()
    plan = FaultPlan(schedule={i + 1: k for i, k in enumerate(FAULT_KINDS)}, timeout_sleep_s=1.0)
    progress: list[tuple[int, int]] = []

    async def go(server: OpenAITestServer) -> tuple[list, list, list]:
        d = _backend(server)
        try:
            desc = await run_describe(features, d, LLMCache(tmp_path), retry=FAST,
                                      progress=lambda a, b: progress.append((a, b)))
            cls = await run_classify(desc, d, LLMCache(tmp_path), rubric=rubric, retry=FAST)
            det = await run_detection(features, desc, d, LLMCache(tmp_path), retry=FAST)
        finally:
            await d.aclose()
        return desc, cls, det

    with OpenAITestServer(faults=plan, prefix_cache=True) as server:
        desc, cls, det = asyncio.run(go(server))
    assert [r.status for r in desc] == ["ok"] * 6, [r.error for r in desc]
    assert [r.status for r in cls] == ["ok"] * 6 and [r.status for r in det] == ["ok"] * 6
    assert dict(server.faults_injected) == {k: 1 for k in FAULT_KINDS}
    assert sum(r.call.attempts for r in desc) == 6 + len(FAULT_KINDS)  # all nine hit the describe calls
    assert progress[0] == (0, 6) and progress[-1] == (6, 6)
    assert max(server.completed_by_prompt_hash.values()) == 1  # no completed call made twice
    # tokens recorded honestly, cost zero for a local model, the prefix-cache reads kept apart
    for r in [*desc, *cls, *det]:
        assert r.call.backend == "openai" and r.call.model == MODEL
        assert r.call.input_tokens > 0 and r.call.output_tokens > 0 and r.call.cost_usd == 0.0
    assert sum(r.call.cache_read_input_tokens for r in desc) > 0
    assert all(0 <= r.accuracy <= 1 for r in det)
    assert len(LLMCache(tmp_path)) == 18  # 6 describe + 6 classify + 6 detect, nothing failed was cached


def test_cost_is_zero_priced_or_unknown() -> None:
    async def go(server: OpenAITestServer, price: Any) -> float | None:
        d = _backend(server, price_usd_per_mtok=price)
        try:
            return (await d.complete(REQ)).cost_usd
        finally:
            await d.aclose()

    with OpenAITestServer() as server:
        assert asyncio.run(go(server, (0.0, 0.0))) == 0.0
        assert asyncio.run(go(server, None)) is None
        priced = asyncio.run(go(server, (1.0, 2.0)))
    d = OpenAICompatDescriber(base_url="http://localhost:8000/v1", model=MODEL, price_usd_per_mtok=(1.0, 2.0))
    assert d.cost_usd(1_000_000, 500_000, 1_000_000) == pytest.approx(1.0 + 1.0 + 1.0)
    assert priced is not None and priced > 0
    with pytest.raises(ValueError, match="price_usd_per_mtok"):
        OpenAICompatDescriber(base_url="http://localhost:8000/v1", model=MODEL, price_usd_per_mtok=(-1.0, 0.0))


def test_no_key_sends_no_authorization_and_a_refused_key_aborts() -> None:
    with OpenAITestServer() as server:  # a local server started without --api-key
        assert _complete(_backend(server)).text
        assert server.keys_seen == 0 and server.chat_calls == 1  # no Authorization header, not even a placeholder
    with OpenAITestServer(api_key="the-right-key") as server:
        with pytest.raises(LLMConfigError, match="it needs a key: set OPENAI_API_KEY"):
            asyncio.run(run_describe(synthetic_features(2), _backend(server), None, retry=FAST))
        with pytest.raises(LLMConfigError, match="refused the credentials .* check MY_KEY"):
            asyncio.run(run_describe(synthetic_features(2), _backend(server, api_key="wrong", api_key_env="MY_KEY"),
                                     None, retry=FAST))
        good = _backend(server, api_key="the-right-key")
        assert _complete(good).text
        assert server.chat_calls == 1  # the refused ones never reached the model
    assert "the-right-key" not in repr(good) and "api_key=<hidden>" in repr(good)


def test_unknown_model_or_route_aborts_with_a_clear_error() -> None:
    with OpenAITestServer(served_models=["llama3.1:8b"]) as server:
        with pytest.raises(LLMConfigError, match=f"404 .*model '{MODEL}'"):
            _complete(_backend(server))
        no_v1 = OpenAICompatDescriber(base_url=server.base_url.removesuffix("/v1"), model="llama3.1:8b",
                                      sdk_max_retries=0)
        with pytest.raises(LLMConfigError, match="without its /v1"):
            _complete(no_v1)
    with pytest.raises(LLMConfigError, match="needs base_url"):
        OpenAICompatDescriber(base_url="", model=MODEL)
    with pytest.raises(LLMConfigError, match="needs a model name"):
        OpenAICompatDescriber(base_url="http://localhost:8000/v1", model="")


def test_fault_rules_match_prompt_text_and_errors_have_openai_shape() -> None:
    plan = FaultPlan(rules=[FaultRule("server_error", match="SPECIAL", times=2)])
    with OpenAITestServer(faults=plan, api_key="k") as server:
        conn = http.client.HTTPConnection("127.0.0.1", _port(server))
        statuses = []
        for i in range(6):
            body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": f"{i} SPECIAL"}]})
            conn.request("POST", "/v1/chat/completions", body,
                         {"authorization": "Bearer k", "content-type": "application/json"})
            resp = conn.getresponse()
            statuses.append(resp.status)
            payload = json.loads(resp.read())
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}),
                     {"content-type": "application/json"})
        unauthorized = conn.getresponse()
        err = json.loads(unauthorized.read())
        conn.close()
    assert statuses == [500, 500, 200, 200, 200, 200]
    assert payload["choices"][0]["message"]["role"] == "assistant"
    assert unauthorized.status == 401 and err["error"]["code"] == "invalid_api_key"


def test_describer_resource_builds_the_openai_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    spec = DescriberSpec(backend="openai", model="llama3.1:8b", concurrency=16,
                         base_url="http://localhost:11434/v1")
    res = describer_resource(spec)
    assert res.api_key is None  # no variable set: no key, no EnvVar that would fail the step
    d = res.build()
    assert isinstance(d, OpenAICompatDescriber) and not d.has_api_key
    assert (d.base_url, d.model, d.max_concurrency, d.price_usd_per_mtok) == (
        "http://localhost:11434/v1", "llama3.1:8b", 16, (0.0, 0.0))
    assert res.identity()["api_key_sent"] is False

    monkeypatch.setenv("OPENAI_API_KEY", "sk-PLANTED-value")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:8000/v1")
    res = describer_resource(DescriberSpec(backend="openai", model="m", price_usd_per_mtok=None))
    assert res.base_url == "http://localhost:8000/v1"  # from OPENAI_BASE_URL
    assert "sk-PLANTED-value" not in repr(res)  # an EnvVar: Dagster reads the value when a step starts
    assert (res.price_input_usd_per_mtok, res.price_output_usd_per_mtok) == (None, None)

    # a profile YAML's describer block
    spec = DescriberSpec.model_validate({"backend": "openai", "model": "llama3.1:8b", "api_key_env": "OLLAMA_KEY",
                                         "base_url": "http://localhost:11434/v1", "price_usd_per_mtok": [0.1, 0.4]})
    res = describer_resource(spec)
    assert (res.api_key, res.api_key_env, res.price_output_usd_per_mtok) == (None, "OLLAMA_KEY", 0.4)
    assert res.build().price_usd_per_mtok == (0.1, 0.4)

    with pytest.raises(LLMConfigError, match="OPENAI_BASE_URL"):
        DescriberResource(backend="openai", model="m").build()
    with pytest.raises(LLMConfigError, match="Message Batches|Anthropic feature"):
        DescriberResource(backend="openai", model="m", base_url="http://x/v1", use_message_batches=True).build()
    assert redact_url("http://user:pw@host:8000/v1") == "http://host:8000/v1"
    assert DescriberResource(backend="openai", model="m", base_url="http://u:secret@h/v1").identity()[
        "base_url"] == "http://h/v1"
