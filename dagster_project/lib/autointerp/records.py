"""The records the describe stage stores (one per feature and step, each with the :class:`CallInfo` of the
model calls behind it) and the detection confusion counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Status = Literal["ok", "failed"]
Category = Literal["known", "discovery", "unrelated"]


@dataclass
class CallInfo:
    """Provenance and accounting of the model call(s) behind a record (summed over attempts)."""

    backend: str = ""
    model: str = ""
    prompt_version: str = ""
    cache_key: str = ""
    cached: bool = False
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float | None = 0.0


class _RowRecord:
    """A record whose ``call`` (CallInfo) is inlined into one flat Parquet/DuckDB row."""

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)  # type: ignore[call-overload]
        row.update(row.pop("call"))
        return row


@dataclass
class DescriptionRecord(_RowRecord):
    """One feature's description. ``status='failed'`` rows carry ``error`` and no description."""

    layer: int
    feature_id: int
    status: Status
    description: str | None
    confidence: int | None
    error: str | None
    top_sample_ids: list[str]
    negative_sample_ids: list[str]
    call: CallInfo


@dataclass
class ClassificationRecord(_RowRecord):
    layer: int
    feature_id: int
    status: Status
    score: int | None
    category: Category | None
    themes: list[str]
    error: str | None
    rubric_version: str
    description: str
    description_cache_key: str
    batched: bool
    call: CallInfo


@dataclass
class DetectionRecord(_RowRecord):
    """Detection scoring of one description: which shuffled held-out windows the scorer picked."""

    layer: int
    feature_id: int
    status: Status
    error: str | None
    n_windows: int
    n_activating: int
    chosen: list[int]
    true_positives: int | None
    false_positives: int | None
    true_negatives: int | None
    false_negatives: int | None
    accuracy: float | None
    balanced_accuracy: float | None
    precision: float | None
    recall: float | None
    window_sample_ids: list[str]
    window_is_activating: list[bool]
    call: CallInfo


@dataclass
class ScoreRecord:
    """One scorer's verdict on one feature's description (a row of ``explanation_scores``).

    ``score`` is the scorer's headline figure (``metric``: balanced accuracy for detection and fuzzing,
    AUROC for embedding); ``balanced_accuracy`` is given for every scorer; ``n`` counts the windows scored.
    """

    layer: int
    feature_id: int
    scorer: str
    status: Status
    error: str | None
    score: float | None
    metric: str
    balanced_accuracy: float | None
    n: int
    n_activating: int
    window_sample_ids: list[str]
    window_is_activating: list[bool]
    chosen: list[int]
    call: CallInfo


@dataclass(frozen=True)
class DetectionScores:
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    balanced_accuracy: float
    precision: float | None
    recall: float | None


def detection_scores(chosen: Sequence[int], truth: Sequence[bool]) -> DetectionScores:
    """Confusion counts and accuracies for 1-based ``chosen`` window numbers against ``truth``."""
    picked = set(chosen)
    tp = sum(1 for i, t in enumerate(truth, 1) if t and i in picked)
    fp = sum(1 for i, t in enumerate(truth, 1) if not t and i in picked)
    fn = sum(1 for i, t in enumerate(truth, 1) if t and i not in picked)
    tn = sum(1 for i, t in enumerate(truth, 1) if not t and i not in picked)
    n = len(truth)
    acc = (tp + tn) / n if n else 0.0
    rates = []
    if tp + fn:
        rates.append(tp / (tp + fn))
    if tn + fp:
        rates.append(tn / (tn + fp))
    bal = sum(rates) / len(rates) if rates else 0.0
    return DetectionScores(
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        accuracy=acc,
        balanced_accuracy=bal,
        precision=tp / (tp + fp) if tp + fp else None,
        recall=tp / (tp + fn) if tp + fn else None,
    )
