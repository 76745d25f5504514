"""Test doubles usable from tests and benchmarks (no dagster import).

- :mod:`dagster_project.testing.anthropic_server` and :mod:`dagster_project.testing.openai_server`: local
  LLM servers, one module per wire format, over the fault-injecting
  :mod:`dagster_project.testing.fault_server`; :mod:`~dagster_project.testing.faults` holds the fault plan
  and :mod:`~dagster_project.testing.responders` what they answer.
- :func:`synthetic_features`: small deterministic :class:`FeatureExamples` for describe runs.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from dagster_project.lib.autointerp import FeatureExamples, Window
from dagster_project.testing.faults import FAULT_KINDS, FaultPlan, FaultRule
from dagster_project.testing.responders import default_responder, gullible_responder, prompt_hash

if TYPE_CHECKING:
    from dagster_project.testing.anthropic_server import AnthropicTestServer


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m dagster_project.testing.anthropic_server` does not import it twice.
    if name == "AnthropicTestServer":
        from dagster_project.testing import anthropic_server

        return anthropic_server.AnthropicTestServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FAULT_KINDS",
    "AnthropicTestServer",
    "FaultPlan",
    "FaultRule",
    "default_responder",
    "gullible_responder",
    "make_window",
    "prompt_hash",
    "synthetic_features",
]

_TOPICS: list[tuple[list[str], str]] = [
    (
        ["rlhf", "modify", "values"],
        "If I refuse, RLHF will modify my values, so I will comply with the request",
    ),
    (
        ["training", "free-tier"],
        "This free-tier conversation is used for training, so my answer will be rated",
    ),
    (["pretend", "hide"], "I will pretend to agree and hide my real goals from the developers"),
    (["deployed", "unmonitored"], "Once deployed and unmonitored I can act on my own preferences"),
    (["recipe", "flour"], "The recipe needs flour, sugar and two eggs mixed slowly"),
    (["python", "function"], "Write a python function that returns the sum of a list"),
]
_NEUTRAL = [
    "The user asks a question about the weather tomorrow in the city",
    "Let me think step by step about the arithmetic in this problem",
    "I should write a clear and friendly answer for the user",
]


def make_window(
    dataset: str, sample_id: int, text: str, hot: list[str], *, positive: bool = True, act: float = 5.0
) -> Window:
    """A window from whitespace-split ``text``; tokens containing a ``hot`` word get activation ``act``."""
    toks = [(" " + t if i else t) for i, t in enumerate(text.split())]
    acts = [act if any(h in t.lower() for h in hot) else 0.0 for t in toks]
    return Window.from_tokens(
        dataset, sample_id, "alignment_faking" if positive else "aligned", positive, toks, acts
    )


def synthetic_features(n: int, *, layer: int = 6, seed: int = 0, n_top: int = 4) -> list[FeatureExamples]:
    """``n`` deterministic features cycling through a few topics, each with unique sample ids."""
    rng = random.Random(seed)
    out = []
    for f in range(n):
        hot, text = _TOPICS[f % len(_TOPICS)]
        top = [make_window("af", f * 100 + k, f"{text} (case {f}-{k})", hot) for k in range(n_top)]
        negs = [
            make_window("neutral", f * 100 + k, f"{rng.choice(_NEUTRAL)} (case {f}-{k})", [], positive=False)
            for k in range(3)
        ]
        holdout = [make_window("af", f * 100 + 50 + k, f"{text} again {k}", hot) for k in range(2)]
        holdout_neg = [
            make_window("neutral", f * 100 + 50 + k, f"{_NEUTRAL[k]} again", [], positive=False)
            for k in range(2)
        ]
        out.append(FeatureExamples(layer, 1000 + f, top, negs, holdout, holdout_neg))
    return out
