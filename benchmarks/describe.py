"""Describe throughput: features per minute against a local Anthropic- or OpenAI-protocol server at 3 s a call.

``--backend anthropic`` (the default) or ``--backend openai`` (the OpenAI-compatible backend, as for vLLM,
llama.cpp's server or Ollama, against ``dagster_project/testing/openai_server.py``; no batches way). Three
ways, in one run, each with a fresh server (in its own process) and a fresh call cache:

- ``sequential``: one call at a time (concurrency 1, the seed's way) on a few features;
- ``concurrent``: ``--concurrency`` calls in flight (default 32) on many features;
- ``batches``: the Message Batches path (one batch, polled every second; the local server answers at once,
  so this measures the plumbing, not Anthropic's real batch turnaround of minutes to hours).

The features come from a synthetic lake (``dagster_project.testing.describe_lake``) through the real
example-selection SQL; the calls go through ``run_describe`` and the official SDK exactly as the
``descriptions`` asset makes them. Each way checks that no feature was lost or duplicated (records and
server-side completions per prompt). Prints a markdown table.

    .venv/bin/python benchmarks/describe.py
    .venv/bin/python benchmarks/describe.py --latency 3 --sequential 10 --features 256 --concurrency 32
    .venv/bin/python benchmarks/describe.py --backend openai

``--offline ROOT NAMESPACE LAYER`` instead times the four describe assets with the offline backend on an
existing lake (its ``stats/selected_features`` must exist), through Dagster.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dagster_project.lib.autointerp import FeatureExamples
from dagster_project.lib.catalog import views_connection
from dagster_project.lib.describe_examples import load_examples
from dagster_project.lib.describers import AnthropicDescriber, RetryPolicy, run_describe
from dagster_project.lib.describers.openai_backend import OpenAICompatDescriber
from dagster_project.lib.llm_cache import LLMCache
from dagster_project.testing.anthropic_server import AnthropicTestServer
from dagster_project.testing.describe_lake import DATASETS, build_describe_lake, many_features
from dagster_project.testing.openai_server import OpenAITestServer

KEY = "bench-key"
MODEL = "claude-sonnet-4-6"
OPENAI_MODEL = "Qwen/Qwen2.5-7B-Instruct"


def _serve(conn: Any, latency: float, backend: str = "anthropic") -> None:
    server: AnthropicTestServer
    if backend == "openai":
        server = OpenAITestServer(latency_s=latency, api_key=KEY, served_models=[OPENAI_MODEL])
    else:
        server = AnthropicTestServer(latency_s=latency, api_key=KEY, batch_polls_until_end=1)
    with server:
        conn.send(server.base_url)
        conn.recv()
        conn.send(server.stats())


class ServerProcess:
    """The local server in its own process, so its work does not share the client's GIL (the real API is
    remote). ``stats()`` stops it and returns its counters."""

    def __init__(self, latency: float, backend: str = "anthropic") -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, latency, backend), daemon=True)
        self._proc.start()
        self.base_url: str = self._conn.recv()

    def stats(self) -> dict[str, Any]:
        self._conn.send("stop")
        out: dict[str, Any] = self._conn.recv()
        self._proc.join(timeout=10)
        return out

    def close(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=10)


def warm_up() -> None:
    """Import the SDKs before any clock starts (a first import takes about a second)."""
    import anthropic  # noqa: F401
    import openai  # noqa: F401


def make_features(root: Path, n: int) -> tuple[list[FeatureExamples], float]:
    datasets = {name: (role, 5 * p, 5 * q) for name, (role, p, q) in DATASETS.items()}
    dl = build_describe_lake(root, features=many_features(n), datasets=datasets, seed=1)
    t0 = time.perf_counter()
    ex = load_examples(views_connection(dl.lake), dl.layer)
    return ex.examples, time.perf_counter() - t0


def run_way(
    name: str, features: list[FeatureExamples], concurrency: int, latency: float, batches: bool, tmp: Path,
    backend: str = "anthropic",
) -> dict[str, Any]:
    server = ServerProcess(latency, backend)
    try:
        describer: AnthropicDescriber | OpenAICompatDescriber
        if backend == "openai":
            describer = OpenAICompatDescriber(
                api_key=KEY, model=OPENAI_MODEL, base_url=server.base_url, max_concurrency=concurrency,
                sdk_max_retries=0, timeout_s=latency + 60,
            )
        else:
            describer = AnthropicDescriber(
                api_key=KEY, model=MODEL, base_url=server.base_url, max_concurrency=concurrency,
                sdk_max_retries=0, timeout_s=latency + 60, batch_poll_interval_s=1.0,
            )
        cache = LLMCache(tmp / f"cache-{name}")

        async def go() -> list[Any]:
            try:
                return await run_describe(
                    features, describer, cache, concurrency=concurrency, use_message_batches=batches,
                    retry=RetryPolicy(max_attempts=3, base_delay_s=0.1),
                )
            finally:
                await describer.aclose()

        t0 = time.perf_counter()
        records = asyncio.run(go())
        seconds = time.perf_counter() - t0
        stats = server.stats()
    finally:
        server.close()
    asked = [fx.feature_id for fx in features]
    got = Counter(r.feature_id for r in records)
    lost = len(set(asked) - set(got))
    duplicated = sum(c - 1 for c in got.values() if c > 1)
    ok = sum(1 for r in records if r.status == "ok")
    return {
        "way": name,
        "features": len(features),
        "concurrency": concurrency if not batches else "batch",
        "seconds": seconds,
        "per_minute": 60 * len(features) / seconds,
        "ok": ok,
        "lost": lost,
        "duplicated": duplicated,
        "calls": stats["messages_calls"],
        "max_completions_per_prompt": stats["max_completions_per_prompt"],
        "max_in_flight": stats["max_in_flight"],
        "in_order": [r.feature_id for r in records] == asked,
        "cost_usd": sum(r.call.cost_usd or 0.0 for r in records),
        "tokens": sum(r.call.input_tokens + r.call.cache_read_input_tokens + r.call.output_tokens for r in records),
    }


def offline(root: str, namespace: str, layer: str) -> None:
    import dagster as dg

    from assets.describe import classifications, descriptions, detection_scores, themes
    from dagster_project.describer_resource import DescriberResource
    from dagster_project.resources import LakeResource

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("layer", [layer])
    t0 = time.perf_counter()
    result = dg.materialize(
        [descriptions, classifications, detection_scores, themes], partition_key=layer, instance=instance,
        resources={"lake": LakeResource(root=root, namespace=namespace), "describer": DescriberResource()},
    )
    total = time.perf_counter() - t0
    print("| asset | rows | seconds |\n|---|---:|---:|")
    for e in instance.all_logs(result.run_id):
        ev = e.dagster_event
        if ev is not None and ev.event_type_value == "STEP_SUCCESS":
            (mat,) = result.asset_materializations_for_node(e.step_key)
            rows = mat.metadata["dagster/row_count"].value
            print(f"| {e.step_key} | {rows} | {ev.event_specific_data.duration_ms / 1000:.1f} |")
    print(f"| total (with Dagster start-up) | | {total:.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--latency", type=float, default=3.0, help="seconds the server takes per request")
    ap.add_argument("--sequential", type=int, default=10, help="features of the sequential way")
    ap.add_argument("--features", type=int, default=256, help="features of the concurrent and batch ways")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--no-batches", action="store_true")
    ap.add_argument("--backend", choices=["anthropic", "openai"], default="anthropic",
                    help="which backend and protocol (openai: the OpenAI-compatible backend; no batches way)")
    ap.add_argument("--offline", nargs=3, metavar=("ROOT", "NAMESPACE", "LAYER"))
    args = ap.parse_args(argv)
    if args.offline:
        offline(*args.offline)
        return 0
    warm_up()
    with tempfile.TemporaryDirectory(prefix="featurelake-bench-describe-") as d:
        tmp = Path(d)
        features, sql_s = make_features(tmp / "lake", max(args.features, args.sequential))
        print(f"{len(features)} features; example SQL {sql_s:.2f}s; server latency {args.latency:g}s per request; "
              f"backend {args.backend}\n")
        b = args.backend
        rows = [run_way("sequential", features[: args.sequential], 1, args.latency, False, tmp, b)]
        rows.append(run_way("concurrent", features[: args.features], args.concurrency, args.latency, False, tmp, b))
        if not args.no_batches and b == "anthropic":
            rows.append(run_way("batches", features[: args.features], args.concurrency, args.latency, True, tmp, b))
    base = rows[0]["per_minute"]
    print("| way | features | concurrency | seconds | features/min | vs sequential | ok | lost | duplicated "
          "| calls | max in flight | tokens | est. cost $ |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['way']} | {r['features']} | {r['concurrency']} | {r['seconds']:.1f} | {r['per_minute']:.0f} "
              f"| {r['per_minute'] / base:.1f}x | {r['ok']} | {r['lost']} | {r['duplicated']} | {r['calls']} "
              f"| {r['max_in_flight']} | {r['tokens']} | {r['cost_usd']:.3f} |")
    bad = [r["way"] for r in rows if r["lost"] or r["duplicated"] or r["ok"] != r["features"] or not r["in_order"]
           or r["max_completions_per_prompt"] != 1]
    if bad:
        print(f"\nFAILED: features lost, duplicated, failed or out of order in {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
