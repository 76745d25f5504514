"""Estimated prices of Anthropic models: :data:`PRICES_USD_PER_MTOK` and :func:`estimate_cost_usd`."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


# USD per million tokens (input, output) by model-name prefix (longest prefix wins), from Anthropic's
# public price list when this was written. A model not listed gets cost None (unknown) and a warning. An ESTIMATE for budgeting, not a bill: check current prices. Cache writes
# (5-minute TTL) cost 1.25x input, cache reads 0.1x input; the Batches API halves everything.
PRICES_USD_PER_MTOK: dict[str, tuple[float, float]] = {
    # 4.6 models: assumed equal to the previous model of their tier. Verify before budgeting.
    "claude-opus-4-6": (5.0, 25.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "claude-3-haiku": (0.25, 1.25),
}
CACHE_WRITE_MULTIPLIER = 1.25
CACHE_READ_MULTIPLIER = 0.10
BATCH_DISCOUNT = 0.5
_warned_models: set[str] = set()


def estimate_cost_usd(
    model: str,
    *,
    input_tokens: int,
    output_tokens: int,
    cache_creation_input_tokens: int = 0,
    cache_read_input_tokens: int = 0,
    batch: bool = False,
) -> float | None:
    """Estimated USD cost of one call from :data:`PRICES_USD_PER_MTOK`; None for an unknown model."""
    match = max((p for p in PRICES_USD_PER_MTOK if model.startswith(p)), key=len, default=None)
    if match is None:
        if model not in _warned_models:
            _warned_models.add(model)
            log.warning("no price for model %r: cost recorded as unknown", model)
        return None
    price_in, price_out = PRICES_USD_PER_MTOK[match]
    cost = (
        input_tokens * price_in
        + cache_creation_input_tokens * price_in * CACHE_WRITE_MULTIPLIER
        + cache_read_input_tokens * price_in * CACHE_READ_MULTIPLIER
        + output_tokens * price_out
    ) / 1e6
    return cost * (BATCH_DISCOUNT if batch else 1.0)

