"""The fault plan of the local LLM test servers: which calls fail, and how.

A :class:`FaultPlan` names faults by a deterministic schedule (the n-th model call), by rules matching
prompt text (:class:`FaultRule`: the first ``times`` matching calls, or always), or with a seeded
probability. The kinds (:data:`FAULT_KINDS`) are the same for every wire format; each server says how
it sends one (see ``anthropic_server`` and ``openai_server``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

FaultKind = Literal[
    "rate_limit",
    "overloaded",
    "server_error",
    "reset",
    "timeout",
    "malformed_body",
    "malformed_reply",
    "empty",
    "refusal",
]
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)
# Faults that never reach the model's reply: an HTTP error, a dropped connection or a broken body.
TRANSPORT_FAULTS = {"rate_limit", "overloaded", "server_error", "reset", "timeout", "malformed_body"}
# Faults answered with a ``retry-after`` header.
RETRY_AFTER_FAULTS = {"rate_limit", "overloaded"}


@dataclass(frozen=True)
class FaultRule:
    """Inject ``kind`` into requests whose prompt text contains ``match`` (any request if None),
    for the first ``times`` such requests, or every one if ``times`` is None."""

    kind: FaultKind
    match: str | None = None
    times: int | None = 1


@dataclass
class FaultPlan:
    """Which requests fail, and how.

    ``schedule`` maps the 1-based index of a model call (``POST /v1/messages``, ``POST
    /v1/chat/completions``) to a fault; ``rules`` are checked next, in order; then, with ``probability``,
    a fault drawn from ``kinds`` by a generator seeded with ``seed``. Batch items follow the rules and
    the probability (not the schedule).
    """

    schedule: Mapping[int, FaultKind] = field(default_factory=dict)
    rules: Sequence[FaultRule] = ()
    probability: float = 0.0
    kinds: Sequence[FaultKind] = FAULT_KINDS
    seed: int = 0
    retry_after_s: float = 0.01
    timeout_sleep_s: float = 2.0

    def __post_init__(self) -> None:
        for k in [*self.schedule.values(), *(r.kind for r in self.rules), *self.kinds]:
            if k not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {k!r}; expected one of {FAULT_KINDS}")
