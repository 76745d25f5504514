"""The probe stages' settings (:class:`EvalSettings`), their error type and the names they share:
the provenance keys a probe records and the control sets' calibration / check halves."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from dagster_project.lib.probes import ProbeGridConfig
from dagster_project.lib.provenance_record import PROBE_KEYS

PROVENANCE_KEYS = PROBE_KEYS  # the part of the activations' provenance record a saved probe keeps
CONTROL_ROLE = "control"
CALIBRATION, CHECK = "calibration", "check"  # the two halves of a control set: even / odd sample_id


class EvaluationError(RuntimeError):
    """Inputs a probe stage needs are missing or inconsistent; the message says what to materialize."""


@dataclass(frozen=True)
class EvalSettings:
    """Everything the three probe stages take: the grid plus training sets, bootstrap and report sizes.

    ``train_datasets`` empty means every ``train``-role dataset. ``seed`` seeds the bootstrap; the
    grid's own ``seed`` seeds folds and solvers.
    """

    grid: ProbeGridConfig = field(default_factory=ProbeGridConfig)
    train_datasets: tuple[str, ...] = ()
    control_negatives: tuple[str, ...] = ()  # control sets whose calibration half also trains (registry)
    n_boot: int = 1000
    seed: int = 0
    report_max_features: int = 50
    report_top_windows: int = 5
    report_window_tokens: int = 12

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_datasets", tuple(str(d) for d in self.train_datasets))
        if len(set(self.train_datasets)) != len(self.train_datasets):
            raise ValueError(f"EvalSettings.train_datasets has duplicates: {list(self.train_datasets)}")
        for name in ("n_boot", "report_max_features", "report_top_windows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EvalSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.report_window_tokens < 0:
            raise ValueError(f"EvalSettings.report_window_tokens must be >= 0, got {self.report_window_tokens}")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def probe_config_hash(self) -> str:
        """Hash of what decides the fitted probes (grid and training sets)."""
        d = {"grid": asdict(self.grid), "train_datasets": list(self.train_datasets)}
        if self.control_negatives:
            d["control_negatives"] = list(self.control_negatives)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]
