"""Summaries of the describe stage's records for the assets' metadata: call counts, cache use, tokens and
cost (:func:`call_metadata`), the failures (:func:`failures_md`) and per-scorer means (:func:`scorer_means`).
Values are plain (numbers, strings, markdown text), so the functions need no Dagster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dagster_project.lib.llm_cache import LLMCache
from dagster_project.lib.markdown import md_rows

UNKNOWN_COST = "unknown (a model without a price)"


def call_metadata(records: Sequence[Any], cache: LLMCache) -> dict[str, Any]:
    """Counts, cache hits/misses, tokens and cost of a runner's records (cost of this run's calls only).
    ``cost_usd`` is :data:`UNKNOWN_COST` (text) when a call's model has no price."""
    ok = sum(1 for r in records if r.status == "ok")
    fresh = [r for r in records if not r.call.cached]
    costs: list[float | None] = [r.call.cost_usd for r in fresh]
    all_costs: list[float | None] = [r.call.cost_usd for r in records]
    meta: dict[str, Any] = {
        "ok": ok,
        "failed": len(records) - ok,
        "from_cache": len(records) - len(fresh),
        "cache_hits": cache.stats.hits,
        "cache_misses": cache.stats.misses,
        "attempts": sum(r.call.attempts for r in fresh),
        "input_tokens": sum(r.call.input_tokens for r in fresh),
        "output_tokens": sum(r.call.output_tokens for r in fresh),
    }
    priced = [c for c in costs if c is not None]
    meta["cost_usd"] = UNKNOWN_COST if len(priced) < len(costs) else float(sum(priced))
    all_priced = [c for c in all_costs if c is not None]
    if len(all_priced) == len(all_costs):
        meta["cost_usd_incl_cached"] = float(sum(all_priced))
    return meta


def mean(xs: Sequence[float]) -> float:
    """The mean of ``xs``; 0.0 when empty."""
    return float(sum(xs) / len(xs)) if xs else 0.0


def failures_md(records: Sequence[Any], limit: int = 50) -> str:
    """A markdown table of the records that failed (feature id and error), or ``_(none)_``."""
    failed = [{"feature_id": r.feature_id, "error": r.error} for r in records if r.status != "ok"]
    return md_rows(failed, ["feature_id", "error"], limit) if failed else "_(none)_"


def scorer_means(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scorer of ``explanation_scores`` rows (in order of appearance): its metric, how many features it
    scored (ok) or failed, and the mean and (population) standard deviation of its scores (0.0 for none)."""
    out = []
    for scorer in dict.fromkeys(r["scorer"] for r in rows):
        sub = [r for r in rows if r["scorer"] == scorer]
        vals = [r["score"] for r in sub if r["status"] == "ok" and r["score"] is not None]
        m = mean(vals)
        std = (sum((v - m) ** 2 for v in vals) / len(vals)) ** 0.5 if vals else 0.0
        out.append({"scorer": scorer, "metric": sub[0]["metric"], "ok": len(vals), "failed": len(sub) - len(vals),
                    "mean": m, "std": std})
    return out
