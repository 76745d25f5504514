"""The describe stage's launchpad config (:class:`DescribeConfig`, a ``dg.Config``): which windows the
describer and the scorers see, the candidates, scorers, prompts, rubric, retries and theme threshold."""

import dagster as dg
from pydantic import Field

from dagster_project.lib.autointerp import DEFAULT_PROMPT_VERSION, DEFAULT_RUBRIC
from dagster_project.lib.describe_examples import ExamplesError, ExampleSettings
from dagster_project.lib.describers import RetryPolicy
from dagster_project.lib.scorers import SCORERS


class DescribeConfig(dg.Config):
    """Launchpad config of the describe assets (group ``describe``).

    ``descriptions`` uses the example fields (how many windows of each kind, how wide) and records them in
    its Parquet metadata; ``detection_scores`` reads them back from there, so its held-out windows are
    exactly those the describer never saw. ``classifications`` uses the rubric; ``themes`` the threshold.
    """

    top_k: int = Field(5, ge=1, description="activating windows shown to the describer (drawn by `sampling`)")
    n_negatives: int = Field(5, ge=0, description="matched zero-activation windows shown to the describer")
    n_holdout: int = Field(10, ge=0, description="activating windows held out for scoring (drawn by holdout_sampling)")
    n_holdout_negatives: int = Field(10, ge=0, description="zero-activation windows held out for scoring")
    sampling: str = Field("top", description="describer's activating windows: top | deciles | random")
    holdout_sampling: str = Field("deciles", description="held-out windows: next (ranks after top_k) | deciles "
                                  "(round-robin over activation deciles: n_holdout >= 10 covers each) | random")
    negatives: str = Field("matched", description="negatives: matched (class, dataset, length) | near_miss "
                           "(class, then nearest pooled residual)")
    sampling_seed: int = Field(0, description="seeds the deciles / random draws and the candidate subsets")
    n_candidates: int = Field(2, ge=1, description="candidate descriptions per feature (best-of-n on validation)")
    n_validation: int = Field(5, ge=0, description="activating validation windows for best-of-n (n_candidates > 1)")
    n_validation_negatives: int = Field(5, ge=0, description="zero-activation validation windows for best-of-n")
    scorers: list[str] = Field(["detection", "fuzzing", "embedding"],
                               description="explanation_scores scorers (detection always runs)")
    embedding_max_windows: int | None = Field(8, ge=2, description="held-out windows the embedding scorer "
                                              "embeds per feature, half of each kind (None: all)")
    window_tokens: int = Field(12, ge=0, description="tokens each side of a window's peak")
    max_features: int | None = Field(None, ge=1, description="describe the first N selected features; None: all")
    prompt_version: str = Field(DEFAULT_PROMPT_VERSION, description="prompt templates (dagster_project/prompts)")
    rubric: str = Field(DEFAULT_RUBRIC, description="rubric name (dagster_project/rubrics) or a YAML path")
    threshold_frac: float = Field(0.2, gt=0, lt=1, description="tokens above this fraction of the peak are marked")
    max_attempts: int = Field(4, ge=1, description="attempts per call (transport errors and invalid replies)")
    retry_base_delay_s: float = Field(2.0, ge=0, description="first backoff (doubles; the server's retry-after wins)")
    retry_max_delay_s: float = Field(60.0, ge=0, description="longest backoff between attempts")
    classify_batch_size: int = Field(1, ge=1, description="descriptions per classify call (1: one call each)")
    detection_seed: int = Field(0, description="seeds the order of the held-out windows")
    theme_distance_threshold: float = Field(0.45, gt=0, lt=2, description="cosine distance merging themes")

    def examples(self) -> ExampleSettings:
        many = self.n_candidates > 1
        try:
            return ExampleSettings(
                top_k=self.top_k,
                n_negatives=self.n_negatives,
                n_holdout=self.n_holdout,
                n_holdout_negatives=self.n_holdout_negatives,
                window=self.window_tokens,
                max_features=self.max_features,
                sampling=self.sampling,
                holdout_sampling=self.holdout_sampling,
                negatives=self.negatives,
                n_validation=self.n_validation if many else 0,
                n_validation_negatives=self.n_validation_negatives if many else 0,
                seed=self.sampling_seed,
            )
        except ExamplesError as e:
            raise dg.Failure(f"describe config: {e}") from e

    def scorer_list(self) -> list[str]:
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad:
            raise dg.Failure(f"describe config: unknown scorers {bad}; expected some of {list(SCORERS)}")
        return ["detection", *[s for s in SCORERS if s in self.scorers and s != "detection"]]

    def retry(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            base_delay_s=self.retry_base_delay_s,
            max_delay_s=max(self.retry_max_delay_s, self.retry_base_delay_s),
        )
