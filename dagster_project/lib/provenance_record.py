"""The provenance record: which model, SAE and config made an activation partition, as one frozen type.

Every activation file carries it in its Parquet key-value metadata under ``featurelake`` (``lib/lake.py``),
beside other keys of its own (``layer``, ``dataset``, ``role``); a saved probe keeps :data:`PROBE_KEYS` of
it, and applying a probe to new texts compares :data:`SCORE_KEYS`. :meth:`ProvenanceRecord.to_dict` gives
the keys in this order, so JSON written from it is what was written before the type existed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ProvenanceRecord:
    """A partition's record. Read from a file, a key that file lacks is ``None`` (and differs from any
    value a profile writes)."""

    model_id: str | None = None
    sae_id: str | None = None
    hook: str | None = None
    dtype: str | None = None  # the dtype the model ran in (``auto`` resolved)
    sae_dtype: str | None = None
    max_tokens: int | None = None
    config_hash: str | None = None

    def to_dict(self, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """``{key: value}`` over ``keys`` (default :data:`RECORD_KEYS`), in that order."""
        return {k: getattr(self, k) for k in (RECORD_KEYS if keys is None else keys)}

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> ProvenanceRecord:
        """The record in ``meta`` (a file's metadata, a probe's provenance); other keys are ignored."""
        return cls(**{k: meta.get(k) for k in RECORD_KEYS})

    def differences(
        self, other: ProvenanceRecord, keys: Sequence[str] | None = None
    ) -> dict[str, tuple[Any, Any]]:
        """``{key: (self's value, other's value)}`` for the ``keys`` (default all) on which the two differ."""
        return {k: (getattr(self, k), getattr(other, k)) for k in (RECORD_KEYS if keys is None else keys)
                if getattr(self, k) != getattr(other, k)}


# Every key of the record, in the order files have always listed them.
RECORD_KEYS: tuple[str, ...] = tuple(f.name for f in fields(ProvenanceRecord))
# What a saved probe records of the activations it was trained on (``probes_saved/.../probe.json``).
PROBE_KEYS: tuple[str, ...] = ("model_id", "sae_id", "hook", "dtype", "config_hash")
# What applying a saved probe to new texts compares with the active profile (``featurelake score``).
SCORE_KEYS: tuple[str, ...] = ("model_id", "sae_id", "hook", "config_hash")
