"""Promise 7, load: describing and classifying 1,000 features against the local Anthropic-protocol server
at concurrency 64, with 10% of the calls faulted (every kind), ends with every feature ``ok`` or
``failed`` (none missing, none twice), no completed call repeated, and memory flat.

Memory is the process's resident set (``VmRSS`` in ``/proc/self/status``) before and after the 1,000-feature
run, measured after a 100-feature warm-up run has created the clients, pools and caches a run keeps.
The figures are printed (``pytest -s``) and recorded in ``docs/RELIABILITY.md``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dagster_project.lib.autointerp import load_rubric
from dagster_project.lib.describers import AnthropicDescriber, RetryPolicy, run_classify, run_describe
from dagster_project.lib.llm_cache import LLMCache
from dagster_project.testing import synthetic_features
from dagster_project.testing.anthropic_server import AnthropicTestServer, FaultPlan, FaultRule

N = 1000
CONCURRENCY = 64
DOOMED = (10, 250, 500, 750, 999)  # features whose describe call always fails (the rest: random faults)
MAX_RSS_GROWTH_MIB = 100


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def _pipeline(server: AnthropicTestServer, n: int, cache_dir: Path, seed: int) -> tuple[list[Any], list[Any]]:
    describer = AnthropicDescriber(api_key="test-key", model="claude-haiku-4-5", base_url=server.base_url,
                                   max_concurrency=CONCURRENCY, timeout_s=3.0, sdk_max_retries=0)
    retry = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.05)
    cache = LLMCache(cache_dir)
    try:
        features = synthetic_features(n, seed=seed)
        desc = await run_describe(features, describer, cache, retry=retry, concurrency=CONCURRENCY)
        cls = await run_classify(desc, describer, cache, rubric=load_rubric(), retry=retry, concurrency=CONCURRENCY)
    finally:
        await describer.aclose()
    return desc, cls


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for VmRSS")
def test_1000_features_at_concurrency_64_with_10_percent_faults(tmp_path: Path) -> None:
    rules = [FaultRule("server_error", match=f"(case {f}-0)", times=None) for f in DOOMED]
    plan = FaultPlan(rules=rules, probability=0.10, seed=7, timeout_sleep_s=3.5)
    with AnthropicTestServer(faults=plan, latency_s=0.005) as server:
        asyncio.run(_pipeline(server, 100, tmp_path / "warmup", seed=1))  # clients, pools, caches
        warm_faults = dict(server.faults_injected)
        warm_calls = server.messages_calls
        gc.collect()
        rss_before = rss_mib()
        t0 = time.monotonic()
        desc, cls = asyncio.run(_pipeline(server, N, tmp_path / "cache", seed=0))
        seconds = time.monotonic() - t0
        gc.collect()
        rss_after = rss_mib()
        stats = server.stats()
    faults = {k: v - warm_faults.get(k, 0) for k, v in server.faults_injected.items()}
    calls = stats["messages_calls"] - warm_calls

    ok = [r for r in desc if r.status == "ok"]
    failed = {r.feature_id - 1000 for r in desc if r.status == "failed"}
    random_faults = sum(faults.values()) - 4 * len(DOOMED)
    growth = rss_after - rss_before
    figures = {
        "features": N, "concurrency": CONCURRENCY, "calls": calls, "seconds": round(seconds, 1),
        "calls_per_s": round(calls / seconds, 1), "max_in_flight": stats["max_in_flight"],
        "described_ok": len(ok), "described_failed": len(failed),
        "classified_ok": sum(r.status == "ok" for r in cls), "classified_failed": sum(r.status == "failed" for r in cls),
        "faults_injected": dict(sorted(faults.items())), "fault_rate": round(random_faults / calls, 3),
        "rss_before_mib": round(rss_before, 1), "rss_after_mib": round(rss_after, 1), "rss_growth_mib": round(growth, 1),
        "unexpected_failures": {r.feature_id: (r.error or "")[-200:] for r in desc
                                if r.status == "failed" and r.feature_id - 1000 not in DOOMED},
    }
    print("\nload test:", json.dumps(figures))
    # every feature has exactly one record, ok or failed with its error; nothing silently dropped
    expected = [f.key for f in synthetic_features(N)]
    assert [(r.layer, r.feature_id) for r in desc] == expected
    assert {r.status for r in desc} <= {"ok", "failed"}
    assert set(DOOMED) <= failed and all(r.error for r in desc if r.status == "failed")
    assert sorted((r.layer, r.feature_id) for r in cls) == sorted((r.layer, r.feature_id) for r in ok)
    assert {r.status for r in cls} <= {"ok", "failed"}
    # faults of every kind were injected at about the rate asked, and retried
    assert set(faults) == set(plan.kinds) | {"server_error"}
    assert 0.07 < random_faults / calls < 0.13, (random_faults, calls)
    # no completed describe call was made twice (classify prompts repeat: equal descriptions, one cache entry)
    done = Counter(e["prompt_hash"] for e in server.log[warm_calls:]
                   if e["task"] == "describe-feature" and e["status"] == 200 and e["fault"] is None)
    assert len(done) == len(ok) and max(done.values()) == 1
    assert stats["max_in_flight"] >= CONCURRENCY // 2  # the concurrency was really used
    assert growth < MAX_RSS_GROWTH_MIB, figures
