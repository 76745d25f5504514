"""Promises 1 and 6 for the OpenAI-compatible backend (vLLM, llama.cpp's server, Ollama): a ``kill -9`` in the
middle of describe, classify and scoring loses no completed call and, after a rerun, leaves one row per feature
in each table, none duplicated; the API key reaches the server and no record.

All against the local OpenAI-protocol server (``dagster_project/testing/openai_server.py``), with the fault
kinds of the Anthropic tests: 429 with ``retry-after``, 503 with ``retry-after``, 500, connection reset,
timeout, malformed JSON body, a reply that is not the JSON asked for, an empty reply and a refusal. Each kind
retried, and each outlasting the retries, is tested for both backends in ``tests/reliability/test_llm_faults.py``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._serdes import serialize_value

from assets.describe import classifications, descriptions, detection_scores
from dagster_project.config import DescriberSpec
from dagster_project.describer_resource import DescriberResource, describer_resource
from dagster_project.partitions import LAYER_PARTITIONS_NAME
from dagster_project.testing.describe_lake import build_describe_lake, many_features
from dagster_project.testing.openai_server import FAULT_KINDS, FaultPlan, OpenAITestServer
from tests.reliability.helpers import completed_calls, kill_9_when, materialize_layer, run_python

LAYER = 1
MODEL = "Qwen/Qwen2.5-7B-Instruct"
ASSETS = [descriptions, classifications, detection_scores]


def _resource(server: OpenAITestServer, **kw: Any) -> DescriberResource:
    opts: dict[str, Any] = {"concurrency": 4, "sdk_max_retries": 0, "timeout_s": 0.5}
    opts.update(kw)
    return DescriberResource(backend="openai", model=MODEL, base_url=server.base_url, **opts)


def _materialize(root: Path, describer: DescriberResource, instance: dg.DagsterInstance | None = None,
                 **config: Any) -> dg.ExecuteInProcessResult:
    cfg = {"max_attempts": 2, "retry_base_delay_s": 0.01, "retry_max_delay_s": 0.05, **config}
    return materialize_layer(ASSETS, root, describer, instance=instance, raise_on_error=False, config=cfg)


# The calls of describe, classify and detection scoring (the three tables checked here), by the server's task
# names and by the cache's request kinds. Other scorers that run in the detection step are not counted.
TASKS = {"describe-feature", "classify-description", "detect-activations"}
KINDS = {"describe", "classify", "detect"}


def _completed(server: OpenAITestServer) -> Counter[str]:
    """Calls answered normally, per prompt, of the three tasks."""
    return completed_calls(server, TASKS)


def _rows(lake: Any, table: str) -> list[dict[str, Any]]:
    return lake.read(f"stats/{table}", layer=LAYER).to_pylist()


# --------------------------------------------------------------------------------------- kill -9

_RUN = r"""
import sys
import dagster as dg
from assets.describe import classifications, descriptions, detection_scores
from dagster_project.describer_resource import DescriberResource
from dagster_project.partitions import LAYER_PARTITIONS_NAME
from dagster_project.resources import LakeResource

root, url = sys.argv[1], sys.argv[2]
assets = [descriptions, classifications, detection_scores]
instance = dg.DagsterInstance.ephemeral()
instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, ["1"])
dg.materialize(
    assets, partition_key="1", instance=instance,
    resources={"lake": LakeResource(root=root, namespace="t"),
               "describer": DescriberResource(backend="openai", model="Qwen/Qwen2.5-7B-Instruct", base_url=url,
                                              concurrency=2, sdk_max_retries=1, timeout_s=1.0)},
    run_config={"ops": {a.op.name: {"config": {"max_attempts": 6, "retry_base_delay_s": 0.01}} for a in assets}},
)
"""
# Every kind of fault, at random, in the killed run and in the rerun.
FAULTS = FaultPlan(probability=0.15, kinds=FAULT_KINDS, seed=3, retry_after_s=0.01, timeout_sleep_s=1.5)


class _CacheWatch:
    """The call cache's entries by kind, read incrementally (an entry is renamed into place whole)."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = cache_dir
        self.kinds: dict[str, str] = {}  # key -> kind
        self._seen: set[Path] = set()

    def scan(self) -> dict[str, str]:
        for p in self.dir.glob("??/[0-9a-f]*.json"):
            if p not in self._seen:
                entry = json.loads(p.read_text())
                self._seen.add(p)
                self.kinds[entry["key"]] = entry["kind"]
        return self.kinds

    def count(self, kind: str) -> int:
        return sum(1 for k in self.scan().values() if k == kind)

    def keys(self) -> set[str]:
        return {key for key, kind in self.scan().items() if kind in KINDS}


@pytest.mark.parametrize("kill_in", ["classify", "scoring"])
def test_kill_9_during_describe_classify_scoring_loses_nothing_and_repeats_nothing(tmp_path: Path, kill_in: str) -> None:
    n = 20
    dl = build_describe_lake(tmp_path, features=many_features(n, p_pos=0.4, p_neg=0.1))
    watch = _CacheWatch(dl.lake.base / "llm_cache")
    described = [False]

    def time_to_kill() -> bool:
        if kill_in == "classify":  # a few classify calls stored
            return watch.count("classify") >= 4
        # scoring: a few detection calls stored after the descriptions step wrote its table
        if not described[0]:
            described[0] = dl.lake.exists("stats/descriptions", layer=LAYER)
            detect_before[0] = watch.count("detect")
            return False
        return watch.count("detect") >= detect_before[0] + 4

    detect_before = [0]
    with OpenAITestServer(faults=FAULTS, latency_s=0.05) as server:
        proc = run_python(_RUN, str(tmp_path), server.base_url, wait=False)
        kill_9_when(proc, time_to_kill, timeout_s=300, poll_s=0.05)
        time.sleep(0.5)  # the server finishes the requests the dead client had in flight (latency 0.05 s)
        stored = watch.keys()
        if kill_in == "classify":
            assert 4 <= watch.count("classify") < n  # killed while classifying
        else:
            assert dl.lake.exists("stats/descriptions", layer=LAYER)
        assert not dl.lake.exists("stats/detection_scores", layer=LAYER)  # no half-written table either
        assert sum(server.faults_injected.values()) > 0  # faults hit the killed run
        completed_before = _completed(server)
        faults_before = sum(server.faults_injected.values())

        result = _materialize(tmp_path, _resource(server, concurrency=2, sdk_max_retries=1, timeout_s=1.0),
                              max_attempts=6)
        completed = _completed(server)
        faults_in_rerun = sum(server.faults_injected.values()) - faults_before
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert faults_in_rerun > 0  # and the rerun

    desc = _rows(dl.lake, "descriptions")
    cls = _rows(dl.lake, "classifications")
    det = _rows(dl.lake, "detection_scores")
    # nothing lost: one row per feature in each table, every one ok; nothing duplicated
    assert sorted(r["feature_id"] for r in desc) == dl.feature_ids and all(r["status"] == "ok" for r in desc)
    assert sorted(r["feature_id"] for r in cls) == dl.feature_ids and all(r["status"] == "ok" for r in cls)
    scored = [r["feature_id"] for r in det]
    assert len(scored) == len(set(scored)) > n // 2 and set(scored) <= set(dl.feature_ids)
    assert all(r["status"] == "ok" and r["n_windows"] > 0 for r in det)
    rows = [*desc, *cls, *det]
    assert len({r["cache_key"] for r in rows}) == len(rows)
    after = watch.keys()
    assert {r["cache_key"] for r in rows} <= after
    # every call stored before the kill came from the cache; a row is fresh only if its call was not stored
    assert all(r["cached"] == (r["cache_key"] in stored) for r in rows)
    assert any(r["cached"] for r in rows) and not all(r["cached"] for r in rows)
    # the rerun asked only for what was missing: each call it completed added one new entry
    assert completed.total() - completed_before.total() == len(after - stored)
    # a prompt answered twice can only be one that was in flight at the kill (concurrency 2)
    assert sum(1 for c in completed.values() if c > 1) <= 2
    assert max(completed.values()) <= 2  # and each of those only once more
    assert all(r["backend"] == "openai" and r["cost_usd"] == 0.0 and r["input_tokens"] > 0 for r in rows)


# --------------------------------------------------------------------------------------- secrets

def test_api_key_from_env_reaches_the_server_and_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    dl = build_describe_lake(tmp_path)
    key = "sk-PLANTED-" + secrets.token_hex(16)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    plan = FaultPlan(schedule={1: "rate_limit", 2: "server_error", 3: "reset", 5: "malformed_body"})
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, [str(LAYER)])
    with OpenAITestServer(api_key=key, faults=plan) as server:  # 401 for any other key, or none
        # first a wrong key (a run with the right one would leave every call cached)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-WRONG-" + secrets.token_hex(8))
        bad = _materialize(tmp_path, describer_resource(DescriberSpec(
            backend="openai", model=MODEL, base_url=server.base_url)), instance=instance)
        assert server.chat_calls == 0  # refused before reaching the model

        monkeypatch.setenv("OPENAI_API_KEY", key)  # read by dg.EnvVar when the step starts
        res = describer_resource(DescriberSpec(backend="openai", model=MODEL, concurrency=4,
                                               base_url=server.base_url))
        assert key not in repr(res)
        result = _materialize(tmp_path, res, instance=instance, max_attempts=3)
        assert server.keys_seen == server.requests_total > 0  # every request carried a key
        assert server.stats()["completed"] > 0
    assert result.success
    assert all(r["status"] == "ok" for r in _rows(dl.lake, "descriptions"))
    assert not bad.success  # a refused key aborts the run, naming the variable
    failure = next(e for e in bad.all_events if e.is_step_failure)
    assert "refused the credentials" in failure.step_failure_data.error.message
    assert "OPENAI_API_KEY" in failure.step_failure_data.error.message

    out, err = capfd.readouterr()
    needle = key.encode()
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert key not in out and key not in err
    assert not [r for r in caplog.records if key in r.getMessage()]
    for run in (result, bad):
        record = instance.get_run_by_id(run.run_id)
        assert key not in serialize_value(record.run_config)
        assert key not in serialize_value(instance.get_job_snapshot(record.job_snapshot_id))
        assert not [e for e in instance.all_logs(run.run_id) if key in serialize_value(e)]
