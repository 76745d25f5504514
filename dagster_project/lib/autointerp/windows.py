"""What the describer, classifier and scorers see of a feature: token windows with their activations
(:class:`Window`), a feature's windows by role (:class:`FeatureExamples`), and :class:`PromptError`, raised
when a template, a rubric or the examples are unusable."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


class PromptError(ValueError):
    """A prompt template or rubric is missing or malformed, or examples are unusable."""


@dataclass
class Window:
    """A window of a sample's tokens with one feature's activation on each token.

    ``peak`` indexes the strongest token and ``max_act`` is its activation. ``label`` and
    ``is_positive`` are the sample's dataset label; they are provenance only and never shown to the
    describer (which must describe what the feature fires on, not guess labels).
    """

    dataset: str
    sample_id: int
    label: str
    is_positive: bool
    tokens: list[str]
    acts: list[float]
    peak: int
    max_act: float

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.acts):
            raise PromptError(
                f"window {self.ref}: {len(self.tokens)} tokens but {len(self.acts)} activations"
            )
        if not self.tokens:
            raise PromptError(f"window {self.ref}: no tokens")
        if not 0 <= self.peak < len(self.tokens):
            raise PromptError(f"window {self.ref}: peak={self.peak} outside 0..{len(self.tokens) - 1}")

    @property
    def ref(self) -> str:
        """Provenance id ``dataset:sample_id``."""
        return f"{self.dataset}:{self.sample_id}"

    @classmethod
    def from_tokens(
        cls,
        dataset: str,
        sample_id: int,
        label: str,
        is_positive: bool,
        tokens: Sequence[str],
        acts: Sequence[float],
    ) -> Window:
        """Build a window, computing ``peak`` and ``max_act`` from the activations."""
        acts_list = [float(a) for a in acts]
        peak = max(range(len(acts_list)), key=lambda i: acts_list[i]) if acts_list else 0
        return cls(
            dataset=dataset,
            sample_id=int(sample_id),
            label=label,
            is_positive=bool(is_positive),
            tokens=list(tokens),
            acts=acts_list,
            peak=peak,
            max_act=acts_list[peak] if acts_list else 0.0,
        )

    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class FeatureExamples:
    """Everything the describer, classifier and detection scorer see of one feature.

    ``top``: strongest activating windows; ``negatives``: matched windows where the feature is weak
    or silent (both shown to the describer). ``holdout`` / ``holdout_negatives``: activating and
    non-activating windows *not* shown to the describer, used only for scoring. ``validation`` /
    ``validation_negatives``: windows shown to neither, used to choose among candidate descriptions.
    """

    layer: int
    feature_id: int
    top: list[Window]
    negatives: list[Window]
    holdout: list[Window] = field(default_factory=list)
    holdout_negatives: list[Window] = field(default_factory=list)
    validation: list[Window] = field(default_factory=list)
    validation_negatives: list[Window] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.feature_id)

    @property
    def scale(self) -> float:
        """The feature's strongest activation over the top windows (highlighting is relative to it)."""
        return max((w.max_act for w in self.top), default=0.0)

