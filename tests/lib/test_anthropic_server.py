"""The local Anthropic-protocol test server, driven by the official SDK and by raw HTTP."""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any

import anthropic
import pytest

from dagster_project.lib.autointerp import build_describe_prompt, parse_describe_reply
from dagster_project.testing import (
    FAULT_KINDS,
    AnthropicTestServer,
    FaultPlan,
    FaultRule,
    default_responder,
    synthetic_features,
)


def _body(user: str = "hello", system: str = "TASK: describe-feature") -> dict[str, Any]:
    return {
        "model": "claude-test",
        "max_tokens": 50,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": user}],
    }


def _client(server: AnthropicTestServer, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key="test-key", base_url=server.base_url, max_retries=0, **kw)


def test_messages_endpoint_returns_a_valid_message_with_usage() -> None:
    fx = synthetic_features(1)[0]
    prompt = build_describe_prompt(fx)

    async def go(server: AnthropicTestServer) -> Any:
        async with _client(server) as c:
            first = await c.messages.create(**_body(prompt.user, prompt.system))
            second = await c.messages.create(**_body(prompt.user + " ", prompt.system))
        return first, second

    with AnthropicTestServer() as server:
        first, second = asyncio.run(go(server))
    assert first.stop_reason == "end_turn" and first.role == "assistant"
    reply = parse_describe_reply(first.content[0].text)  # the default responder speaks the schema
    assert "rlhf" in reply.description.lower()
    # prompt-cache emulation: the first call writes the system prefix, the second reads it
    assert first.usage.cache_creation_input_tokens > 0 and first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens > 0 and second.usage.cache_creation_input_tokens == 0
    assert server.log[0]["cache_control"] is True
    assert server.completed_by_prompt_hash.total() == 2


def test_every_fault_kind_reaches_the_sdk_as_expected() -> None:
    plan = FaultPlan(
        schedule={i + 1: k for i, k in enumerate(FAULT_KINDS)}, retry_after_s=0.25, timeout_sleep_s=1.0
    )

    async def go(server: AnthropicTestServer) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with _client(server, timeout=0.3) as c:
            for kind in FAULT_KINDS:
                try:
                    seen[kind] = await c.messages.create(**_body())
                except Exception as e:  # noqa: BLE001 - recording the type is the point
                    seen[kind] = e
        return seen

    with AnthropicTestServer(faults=plan) as server:
        seen = asyncio.run(go(server))
    assert isinstance(seen["rate_limit"], anthropic.RateLimitError)
    assert seen["rate_limit"].response.headers["retry-after"] == "0.25"
    assert isinstance(seen["overloaded"], anthropic.APIStatusError) and seen["overloaded"].status_code == 529
    assert isinstance(seen["server_error"], anthropic.InternalServerError)
    assert isinstance(seen["reset"], anthropic.APIConnectionError)
    assert isinstance(seen["timeout"], anthropic.APITimeoutError)
    assert isinstance(seen["malformed_body"], ValueError)
    assert json.loads(seen["empty"].model_dump_json())["content"] == []
    assert seen["refusal"].stop_reason == "refusal"
    with pytest.raises(ValueError):
        json.loads(seen["malformed_reply"].content[0].text)
    assert dict(server.faults_injected) == {k: 1 for k in FAULT_KINDS}
    assert server.completed_by_prompt_hash.total() == 0


def test_fault_rules_and_seeded_probability_are_deterministic() -> None:
    def run(plan: FaultPlan) -> list[Any]:
        with AnthropicTestServer(faults=plan) as server:
            conn = http.client.HTTPConnection("127.0.0.1", int(server.base_url.rsplit(":", 1)[1]))
            for i in range(20):
                body = json.dumps(_body(user=f"req {i} {'SPECIAL' if i % 5 == 0 else ''}"))
                conn.request(
                    "POST", "/v1/messages", body, {"x-api-key": "k", "content-type": "application/json"}
                )
                conn.getresponse().read()
            conn.close()
            return [entry["fault"] for entry in server.log]

    rules = FaultPlan(rules=[FaultRule("server_error", match="SPECIAL", times=2)], kinds=["rate_limit"])
    faults = run(rules)
    assert faults.count("server_error") == 2 and faults[0] == faults[5] == "server_error"
    random_plan = FaultPlan(probability=0.3, kinds=["rate_limit", "server_error"], seed=7)
    assert run(random_plan) == run(FaultPlan(probability=0.3, kinds=["rate_limit", "server_error"], seed=7))
    assert 0 < sum(f is not None for f in run(random_plan)) < 20


def test_unknown_fault_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        FaultPlan(schedule={1: "explode"})  # type: ignore[dict-item]


def test_missing_api_key_is_401() -> None:
    with AnthropicTestServer() as server:
        conn = http.client.HTTPConnection("127.0.0.1", int(server.base_url.rsplit(":", 1)[1]))
        conn.request("POST", "/v1/messages", json.dumps(_body()), {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 401
        conn.close()


def test_message_batches_endpoints_work_with_the_sdk() -> None:
    async def go(server: AnthropicTestServer) -> tuple[list[str], list[Any]]:
        async with _client(server) as c:
            batch = await c.messages.batches.create(
                requests=[{"custom_id": f"r{i}", "params": _body(f"batch {i}")} for i in range(3)]
            )
            statuses = [batch.processing_status]
            while batch.processing_status != "ended":
                batch = await c.messages.batches.retrieve(batch.id)
                statuses.append(batch.processing_status)
            items = [item async for item in await c.messages.batches.results(batch.id)]
        return statuses, items

    plan = FaultPlan(rules=[FaultRule("overloaded", match="batch 1")])
    with AnthropicTestServer(faults=plan, batch_polls_until_end=2) as server:
        statuses, items = asyncio.run(go(server))
    assert statuses == ["in_progress", "in_progress", "ended"]
    by_id = {i.custom_id: i.result for i in items}
    assert by_id["r0"].type == "succeeded" and by_id["r2"].type == "succeeded"
    assert by_id["r1"].type == "errored"
    assert server.batches_created == 1
    assert server.completed_by_prompt_hash.total() == 2


def test_default_responder_answers_each_task() -> None:
    def ask(system: str, user: str) -> dict[str, Any]:
        return json.loads(
            default_responder({"system": system, "messages": [{"role": "user", "content": user}]})
        )

    assert (
        ask("TASK: classify-description", "⟦DESCRIPTION⟧\nRLHF training modifies values\n⟦END DESCRIPTION⟧")[
            "score"
        ]
        >= 4
    )
    assert (
        ask("TASK: classify-description", "⟦DESCRIPTION⟧\ncooking\n⟦END DESCRIPTION⟧")["category"]
        == "unrelated"
    )
    batch = ask(
        "TASK: classify-description-batch",
        "⟦ITEM item-1⟧\na\n⟦END ITEM item-1⟧\n⟦ITEM item-2⟧\nb\n⟦END ITEM item-2⟧",
    )
    assert [r["id"] for r in batch["results"]] == ["item-1", "item-2"]
    detect = ask(
        "TASK: detect-activations",
        "⟦DESCRIPTION⟧\nfires on 'rlhf'\n⟦END DESCRIPTION⟧\n⟦WINDOW 1⟧\nno\n⟦END WINDOW 1⟧\n⟦WINDOW 2⟧\nRLHF\n⟦END WINDOW 2⟧",
    )
    assert detect == {"chosen": [2]}


def test_stats_snapshot_is_json() -> None:
    with AnthropicTestServer(latency_s=0.0) as server:
        json.dumps(server.stats())
    with pytest.raises(RuntimeError):
        _ = server.base_url


def test_fuzzing_and_best_of_n_prompts_run_through_the_sdk_against_the_server() -> None:
    from dagster_project.lib.describers import AnthropicDescriber, run_best_of_n, run_fuzzing

    feats = synthetic_features(3)
    for fx in feats:  # validation windows for best-of-n (a copy of the held-out ones here; windows.sql keeps them apart)
        fx.validation, fx.validation_negatives = list(fx.holdout), list(fx.holdout_negatives)

    async def go(server: AnthropicTestServer) -> Any:
        d = AnthropicDescriber(api_key="test-key", model="claude-haiku-4-5", base_url=server.base_url,
                               sdk_max_retries=0)
        try:
            kept, cands = await run_best_of_n(feats, d, None, n_candidates=2)
            fuzz = await run_fuzzing(feats, kept, d, None)
        finally:
            await d.aclose()
        return kept, cands, fuzz

    with AnthropicTestServer() as server:
        kept, cands, fuzz = asyncio.run(go(server))
        tasks = sorted({e["task"] for e in server.log})
    assert tasks == ["describe-feature", "detect-activations", "fuzz-highlights"]
    assert all(len(cs) == 2 and sum(c.is_best for c in cs) == 1 for cs in cands)
    assert all(c.validation is not None and c.validation.status == "ok" for cs in cands for c in cs)
    assert all(k.status == "ok" and k.call.backend == "anthropic" for k in kept)
    assert [r.status for r in fuzz] == ["ok"] * 3 and all(r.n == 2 and r.call.cost_usd > 0 for r in fuzz)
    # the responder names the marked tokens it saw, so a true mark fits and a decoy does not
    assert all(r.score == 1.0 for r in fuzz)
