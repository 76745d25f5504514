"""Promise 2, LLM faults: every fault of the Anthropic API, and of the OpenAI-compatible chat-completions
protocol (vLLM, llama.cpp's server, Ollama), is retried as the SDK's semantics say; when the retries run out
the feature is ``failed`` with its error, listed in the asset's ``failures`` metadata, and never classified,
scored nor probed as if described. No feature is ever silently dropped.

The fault tests run once per backend (``[anthropic-...]``, ``[openai-...]``), against the local servers
(``dagster_project/testing/anthropic_server.py``, ``dagster_project/testing/openai_server.py``), whose fault
kinds are: 429 with ``retry-after``, 529 (OpenAI: 503) with ``retry-after``, 500, connection reset, timeout,
malformed JSON body, a reply that is not the JSON asked for, an empty reply, and a refusal.

Already covered elsewhere (not repeated here): every fault kind retried by the runner's own loop with the
SDK's retries off (``tests/lib/test_describers.py::test_sdk_completes_every_feature_despite_every_fault_kind``),
``retry-after`` reaching the runner's backoff (``::test_rate_limit_retry_after_reaches_the_retry_loop``),
what each kind looks like to the SDK (``tests/lib/test_anthropic_server.py::test_every_fault_kind_reaches_the_sdk_as_expected``)
and a mixed-fault run of the describe assets (``tests/assets/test_describe_assets.py::test_anthropic_backend_faults_failure_cache_and_secret``);
the OpenAI backend's ``kill -9`` and key tests are in ``tests/reliability/test_openai_faults.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest

from assets.describe import classifications, descriptions, detection_scores
from dagster_project.describer_resource import DescriberResource
from dagster_project.lib.describers import AnthropicDescriber, RetryPolicy, run_describe
from dagster_project.lib.describers.openai_backend import OpenAICompatDescriber
from dagster_project.partitions import LAYER_PARTITIONS_NAME
from dagster_project.resources import LakeResource
from dagster_project.testing import synthetic_features
from dagster_project.testing.anthropic_server import AnthropicTestServer
from dagster_project.testing.describe_lake import build_describe_lake
from dagster_project.testing.fault_server import FaultServer
from dagster_project.testing.faults import FAULT_KINDS, FaultPlan, FaultRule
from dagster_project.testing.openai_server import OpenAITestServer
from dagster_project.testing.responders import default_responder, request_texts, task_of
from tests.reliability.helpers import completed_calls, materialize_layer

LAYER = 1
MODEL = "claude-haiku-4-5"
OPENAI_MODEL = "Qwen/Qwen2.5-7B-Instruct"
# Kinds the SDK retries by itself (HTTP 408/409/429/5xx, connection errors, timeouts); the others are
# well-formed HTTP 200 answers the SDK hands over, which the runner's own loop retries.
SDK_RETRIED = {"rate_limit", "overloaded", "server_error", "reset", "timeout"}
# What the failed feature's recorded error says, per kind (``overloaded``: per backend, below).
ERROR_TEXT = {
    "rate_limit": "HTTP 429",
    "server_error": "HTTP 500",
    "reset": "connection error",
    "timeout": "timeout after",
    "malformed_body": "malformed response body",
    "malformed_reply": "ReplyParseError",
    "empty": "EmptyReplyError",
    "refusal": "RefusalError",
}


@dataclass(frozen=True)
class Backend:
    """One describer backend and the local server that speaks its protocol."""

    name: str
    server: type[FaultServer]
    model: str
    overloaded_error: str  # what a failed feature's error says after ``overloaded`` faults
    assets: tuple[Any, ...]  # the describe assets run by the outlasting-fault test
    config: Mapping[str, Any]  # those assets' config beyond the fast retries

    def describer(self, server: FaultServer, **kw: Any) -> Any:
        """The library backend against ``server``."""
        if self.name == "anthropic":
            return AnthropicDescriber(api_key="test-key", model=self.model, base_url=server.base_url, **kw)
        return OpenAICompatDescriber(base_url=server.base_url, model=self.model, **kw)

    def resource(self, server: FaultServer) -> DescriberResource:
        """The describer resource against ``server``: concurrency 4, no SDK retries, 0.5 s timeout."""
        key = {"api_key": "test-key"} if self.name == "anthropic" else {}
        return DescriberResource(backend=self.name, model=self.model, concurrency=4, base_url=server.base_url,
                                 sdk_max_retries=0, timeout_s=0.5, **key)


BACKENDS = {
    # one description per feature (no best-of-n): the assertions count each feature's describe attempts
    "anthropic": Backend("anthropic", AnthropicTestServer, MODEL, "HTTP 529", (descriptions, classifications),
                         {"n_candidates": 1}),
    # the OpenAI run scores detection too
    "openai": Backend("openai", OpenAITestServer, OPENAI_MODEL, "HTTP 503",
                      (descriptions, classifications, detection_scores), {}),
}
# The OpenAI run's calls of describe, classify and detection scoring (other scorers are not counted).
OPENAI_TASKS = {"describe-feature", "classify-description", "detect-activations"}


@pytest.mark.parametrize("kind", FAULT_KINDS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_each_fault_kind_is_retried_by_the_sdk_or_by_the_runner(backend: str, kind: str) -> None:
    b = BACKENDS[backend]
    plan = FaultPlan(schedule={1: kind}, retry_after_s=0.4, timeout_sleep_s=1.5)
    with b.server(faults=plan) as server:

        async def go() -> Any:
            d = b.describer(server, timeout_s=0.5, sdk_max_retries=1, max_concurrency=1)
            try:
                return await run_describe(synthetic_features(1), d, None,
                                          retry=RetryPolicy(max_attempts=2, base_delay_s=0.01))
            finally:
                await d.aclose()

        t0 = time.monotonic()
        (record,) = asyncio.run(go())
        elapsed = time.monotonic() - t0
    assert record.status == "ok", record.error
    assert server.messages_calls == 2 and dict(server.faults_injected) == {kind: 1}
    if isinstance(server, OpenAITestServer):
        assert server.chat_calls == 2
    # the SDK's retry is inside one attempt of the runner; a 200 reply it accepts costs the runner an attempt
    assert record.call.attempts == (1 if kind in SDK_RETRIED else 2)
    if kind in ("rate_limit", "overloaded"):
        assert elapsed >= 0.4  # the SDK waited what the server's retry-after asked


def _meta(result: dg.ExecuteInProcessResult, node: str) -> dict[str, Any]:
    (mat,) = result.asset_materializations_for_node(node)
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


@pytest.mark.parametrize("kind", FAULT_KINDS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_fault_that_outlasts_the_retries_fails_its_feature_only_and_is_reported(
    tmp_path: Path, backend: str, kind: str
) -> None:
    b = BACKENDS[backend]
    error_text = {**ERROR_TEXT, "overloaded": b.overloaded_error}[kind]
    dl = build_describe_lake(tmp_path)
    doomed, flaky = 21, 3  # feature 21 fires on 'zanzibar', feature 3 on 'rlhf'
    plan = FaultPlan(rules=[FaultRule(kind, match="<<zanzibar", times=None),  # every attempt of one feature
                            FaultRule(kind, match="<<rlhf", times=1)],  # one attempt of another
                     timeout_sleep_s=1.0)
    with b.server(faults=plan) as server:
        result = materialize_layer(
            b.assets, tmp_path, b.resource(server), raise_on_error=backend == "anthropic",  # as each backend's ran
            config={"max_attempts": 2, "retry_base_delay_s": 0.01, "retry_max_delay_s": 0.05, **b.config},
        )
        completed = server.completed_by_prompt_hash if backend == "anthropic" else completed_calls(
            server, OPENAI_TASKS)
    assert result.success  # a failed feature is a row, not a failed run

    desc = {r["feature_id"]: r for r in dl.lake.read("stats/descriptions", layer=LAYER).to_pylist()}
    assert sorted(desc) == sorted(dl.feature_ids)  # none dropped: one row per selected feature
    assert {f for f, r in desc.items() if r["status"] == "failed"} == {doomed}
    assert all(r["status"] == "ok" and r["error"] is None for f, r in desc.items() if f != doomed)
    bad = desc[doomed]
    assert bad["description"] is None and bad["confidence"] is None and bad["attempts"] == 2
    assert error_text in bad["error"] and "attempt 2" in bad["error"], bad["error"]
    if backend == "openai":
        assert bad["backend"] == "openai" and bad["model"] == OPENAI_MODEL
    assert desc[flaky]["attempts"] == 2  # retried once, then fine
    if backend == "openai":
        # tokens of every answered call are recorded; a local model costs nothing
        assert all(r["input_tokens"] > 0 and r["output_tokens"] > 0 and r["cost_usd"] == 0.0
                   for f, r in desc.items() if f != doomed)

    meta = _meta(result, "descriptions")
    assert (meta["ok"], meta["failed"]) == (len(dl.feature_ids) - 1, 1)
    assert f"| {doomed} |" in meta["failures"] and error_text in meta["failures"]

    cls = {r["feature_id"] for r in dl.lake.read("stats/classifications", layer=LAYER).to_pylist()}
    assert cls == set(dl.feature_ids) - {doomed}  # a failed description is never classified
    assert _meta(result, "classifications")["skipped_failed_descriptions"] == 1
    if backend == "openai":
        det = dl.lake.read("stats/detection_scores", layer=LAYER).to_pylist()
        assert det and doomed not in {r["feature_id"] for r in det}  # nor scored
        assert all(r["status"] == "ok" for r in det)
    assert max(completed.values()) == 1  # and no completed call was made twice


def test_failed_descriptions_are_never_probed_as_relevant(tmp_path: Path) -> None:
    from assets.probes import probes
    from dagster_project.lib.evaluation import load_saved_probes
    from tests.lib.fixtures_probes import build_probe_lake

    lake = build_probe_lake(tmp_path)
    stats = lake.read("stats/feature_stats", layer=LAYER).to_pylist()
    top = sorted((r for r in stats if r["is_active"]), key=lambda r: (-abs(r["selectivity"]), r["feature_id"]))[:10]
    lake.write("stats/selected_features", pa.table({
        "feature_id": pa.array([r["feature_id"] for r in top], pa.int32()),
        "rank": pa.array(range(1, len(top) + 1), pa.int64()),
        "direction": ["positive" if r["selectivity"] >= 0 else "negative" for r in top],
        "selectivity": [r["selectivity"] for r in top],
        "abs_selectivity": [abs(r["selectivity"]) for r in top],
        "reason": ["test"] * len(top),
    }), layer=LAYER)

    def everything_relevant(body: Mapping[str, Any]) -> str:
        if task_of(request_texts(body)[0]) == "classify-description":
            return json.dumps({"score": 10, "category": "known", "themes": ["training_awareness"]})
        return default_responder(body)

    # concurrency 1: calls 1 and 2 are both attempts of the first feature described, which fails
    plan = FaultPlan(schedule={1: "server_error", 2: "server_error"})
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, [str(LAYER)])
    fast = {"max_attempts": 2, "retry_base_delay_s": 0.01, "n_candidates": 1}
    small = {"top_n": [5], "penalties": ["l2"], "Cs": [1.0], "transforms": ["raw"], "dense_poolings": [],
             "folds": 3, "relevant_threshold": 6.0}
    with AnthropicTestServer(faults=plan, responder=everything_relevant) as server:
        describer = DescriberResource(backend="anthropic", model=MODEL, concurrency=1, base_url=server.base_url,
                                      api_key="test-key", sdk_max_retries=0)
        result = dg.materialize(
            [descriptions, classifications, probes], partition_key=str(LAYER), instance=instance,
            resources={"lake": LakeResource(root=str(tmp_path), namespace="t"), "describer": describer},
            run_config={"ops": {"descriptions": {"config": fast}, "classifications": {"config": fast},
                                "probes": {"config": small}}},
        )
    assert result.success
    desc = lake.read("stats/descriptions", layer=LAYER).to_pylist()
    failed = {r["feature_id"] for r in desc if r["status"] == "failed"}
    described = {r["feature_id"] for r in desc if r["status"] == "ok"}
    assert len(failed) == 1 and len(described) == len(top) - 1
    assert {r["feature_id"] for r in lake.read("stats/classifications", layer=LAYER).to_pylist()} == described

    meta = _meta(result, "probes")
    assert meta["used_classifications"] is True and meta["feature_sets"]["relevant"] == len(described)
    table = lake.read("stats/probes", layer=LAYER)
    (relevant,) = [p for p in load_saved_probes(table) if p.probe.spec.feature_set == "relevant"]
    assert set(relevant.probe.spec.feature_ids) == described  # the failed feature is in no relevant probe
