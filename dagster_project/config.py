"""Typed configuration: profiles (model + SAE family + describer) and per-stage run config.

A profile is chosen by ``FEATURELAKE_PROFILE``: a built-in name (``default``, ``gemma-3-27b``) or the path
of a YAML file holding a :class:`Profile`. Everything is validated on construction and errors name the
bad field (pydantic).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import dagster as dg
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from dagster_project.lib.evaluation.settings import EvalSettings

REPO_ROOT = Path(__file__).resolve().parent.parent


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="'gguf:gemma3-270m' (the PyPI GGUF), an HF model id, or a local folder")
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "bfloat16", description="'auto': bfloat16 on CUDA and on a CPU with a native bf16 matmul (AMX-BF16 / "
                                "AVX512-BF16), float32 on other CPUs; the lake records the resolved dtype")
    device: str = Field("auto", description="'auto' picks CUDA when present, else CPU")
    max_tokens: int = Field(1024, ge=8, description="texts are truncated to this many tokens (BOS excluded)")
    batch_tokens: int | Literal["auto"] = Field(
        4096, description="padded tokens per forward batch; 'auto' sizes batches by the GPU's free memory")
    compile: bool = Field(False, description="torch.compile the decoder layers (GPU; fuses the elementwise work)")
    pack: bool | Literal["auto"] = Field(
        "auto", description="run each batch's texts end to end with no padding; 'auto': on a GPU with torch's "
                            "varlen flash attention (lib/packing.py)")
    sae_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the SAE encode (bfloat16 on a GPU is ~20x faster than float32)")

    @field_validator("batch_tokens")
    @classmethod
    def _batch_tokens(cls, v: int | str) -> int | str:
        if v != "auto" and int(v) < 64:
            raise ValueError(f"batch_tokens must be 'auto' or at least 64, got {v}")
        return v

    def resolved_dtype(self) -> str:
        """``dtype`` with ``auto`` decided for this machine and ``device`` (``lib/model.py``, resolve_dtype)."""
        if self.dtype != "auto":
            return self.dtype
        from dagster_project.lib.model import resolve_dtype  # torch: only when there is something to decide

        return resolve_dtype(self.dtype, self.device)


class SAESpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["train", "release", "gemmascope", "saelens_dir"] = "train"
    release: str | None = Field(None, description="sae-lens release (source=release)")
    sae_id: str | None = Field(None, description="sae-lens id; '{layer}' is filled in (source=release)")
    path: str | None = Field(None, description="folder; '{layer}' is filled in (gemmascope / saelens_dir)")
    hook: str = "resid_post"
    # training (source=train)
    width: int = Field(4096, ge=16)
    k: int = Field(32, ge=1)
    train_tokens: int = Field(200_000, ge=1000, description="activation vectors used to train")
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(256, ge=16)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0


class DescriberSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["offline", "anthropic", "claude-cli", "openai"] = "offline"
    model: str = "term-contrast+minilm"
    concurrency: int = Field(8, ge=1)
    # openai: any OpenAI-compatible chat-completions server (vLLM, llama.cpp's llama-server, Ollama, OpenAI)
    base_url: str | None = Field(
        None, description="the server's API root, e.g. http://localhost:8000/v1 (vLLM), http://localhost:8080/v1 "
        "(llama.cpp), http://localhost:11434/v1 (Ollama); openai backend: else OPENAI_BASE_URL; anthropic: a proxy")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai backend: the environment variable holding the key, read through "
        "dg.EnvVar when it is set; when it is not, no key is sent (local servers need none)")
    price_usd_per_mtok: tuple[float, float] | None = Field(
        (0.0, 0.0), description="openai backend: USD per million (input, output) tokens; [0, 0] (the default) for "
        "a local model, null to record the cost as unknown")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: ModelSpec
    sae: SAESpec
    describer: DescriberSpec = DescriberSpec()
    layers: list[int] = Field(description="layers the profile extracts by default (a sensor adds them)")
    token_residuals: bool = Field(
        False, description="extractions write every token's residual vector (token_residuals; float16, ~2 x d_model "
        "bytes a token and layer) unless a run's write_token_residuals says otherwise")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if not v or any(x < 0 for x in v):
            raise ValueError(f"layers must be a non-empty list of non-negative integers, got {v}")
        return v

    def config_hash(self) -> str:
        """Hash of what decides activation values (not the describer): the model's dtype as resolved here
        (``auto`` -> bfloat16 or float32, whose activations differ), so it equals the hash of that dtype."""
        model = self.model.model_dump(exclude={"batch_tokens", "device", "pack"})
        d = {"model": {**model, "dtype": self.model.resolved_dtype()}, "sae": self.sae.model_dump()}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


PROFILES: dict[str, Profile] = {
    "default": Profile(
        name="default",
        # dtype auto: bfloat16 on CUDA and on a CPU with a native bf16 matmul (AMX-BF16 / AVX512-BF16 in
        # /proc/cpuinfo), float32 elsewhere. bf16 was 2.7x faster than fp32 on the machine of DESIGN.md §6 and
        # 5.8x slower on an AVX2-only CPU (measured, BENCHMARKS.md: torch emulates bf16 there)
        model=ModelSpec(id="gguf:gemma3-270m", dtype="auto", max_tokens=1024),
        sae=SAESpec(source="train", width=4096, k=32),
        describer=DescriberSpec(backend="offline"),
        # two layers: the probe stage chooses between them on held-out groups and fits their ensemble; the
        # forward still stops after layer 9
        layers=[6, 9],
        # ~0.9-1.2 KB a token at d_model 640 (lake/README.md): the demo's token-level dense probes read them
        token_residuals=True,
    ),
    "gemma-3-27b": Profile(
        name="gemma-3-27b",
        model=ModelSpec(id="google/gemma-3-27b-it", dtype="bfloat16", max_tokens=2048, batch_tokens="auto",
                        sae_dtype="bfloat16", compile=True),
        sae=SAESpec(
            source="release",
            release="gemma-scope-2-27b-it-res",
            sae_id="layer_{layer}_width_16k_l0_medium",
            hook="resid_post",
        ),
        describer=DescriberSpec(backend="anthropic", model="claude-sonnet-4-6", concurrency=32),
        layers=[16, 31, 40, 53],
    ),
}


def load_profile(name_or_path: str | None = None) -> Profile:
    """The active profile: ``FEATURELAKE_PROFILE`` (a name or a YAML path), else ``default``."""
    key = name_or_path or os.environ.get("FEATURELAKE_PROFILE") or "default"
    if key in PROFILES:
        return PROFILES[key]
    p = Path(key).expanduser()
    if p.suffix in (".yaml", ".yml") and p.is_file():
        try:
            return Profile.model_validate(yaml.safe_load(p.read_text()))
        except Exception as e:
            raise ValueError(f"profile file {p}: {e}") from e
    raise ValueError(f"unknown profile {key!r}: use one of {sorted(PROFILES)} or the path of a profile YAML file")


# --------------------------------------------------------------------------------------- run config


class ExtractionConfig(dg.Config):
    """Launchpad config of the activations asset."""

    write_token_activations: bool = Field(True, description="store per-token rows (needed for windows)")
    write_residuals: bool = Field(True, description="store pooled residual vectors (dense baseline)")
    write_token_residuals: bool | None = Field(
        None, description="store every token's residual vector (float16, ~2 x d_model bytes a token: token-level "
        "dense probes); unset: the profile's token_residuals")

    def token_residuals(self, profile: Profile) -> bool:
        """Whether this run writes ``token_residuals``: the run's setting, else the profile's."""
        return profile.token_residuals if self.write_token_residuals is None else self.write_token_residuals


class ProbeConfig(dg.Config):
    """Launchpad config of the ``probes``, ``evaluation`` and ``probe_report`` assets.

    ``probes`` uses the training sets and the grid; ``evaluation`` the bootstrap, seed and folds (the
    cross-distribution refits); ``probe_report`` the report sizes. Lists are tried in the order given.
    """

    train_datasets: list[str] = Field(
        default=[], description="the training mixture: datasets to train on; empty = every dataset whose role is "
        "'train' (positive-only and negative-only datasets may join; the class balance is reported). Their "
        "samples' groups (registry 'group' / 'group_field') are what leave-one-group-out holds out"
    )
    selection: str = Field(
        "auto", description="how the best probe is chosen: 'lodo' (leave one group out: the worst or mean "
        "held-out-group AUROC), 'cv' (training cross-validation), 'auto' (lodo where at least two groups "
        "can be held out, else cv)"
    )
    criterion: str = Field("worst", description="lodo: rank by the 'worst' or the 'mean' held-out-group AUROC")
    weighting: str = Field(
        "none", description="sample weights across groups within a class: 'none' (class balance only), "
        "'sqrt' (a group counts by the square root of its size), 'balanced' (every group alike)"
    )
    min_group: int = Field(10, ge=2, description="groups smaller than this are never held out (they always train)")
    control_as_negatives: bool = Field(
        False, description="the control sets' calibration half also trains as negatives (thresholds then come "
        "from its out-of-fold scores)"
    )
    control_fpr: float = Field(
        0.01, ge=0, lt=1, description="false-positive rate on the control sets at which thresholds are set"
    )
    top_n: list[int] = Field(default=[10, 20, 50, 100, 200, 500], description="top-N-by-|selectivity| feature sets")
    ksparse: list[int] = Field(
        default=[1, 2, 5, 10, 20, 50, 100], description="the k-sparse curve: an L2 probe on the k features most "
        "selective in every training group (transfer{k} sets), for each k; [] skips it"
    )
    token_top_n: list[int] = Field(
        default=[500], description="token-level probes (score every token, aggregate per text) on these top-N sets "
        "(the larger sets: the top 200 by selectivity are mostly rare features, 0.8% of tokens on the AF mixture); "
        "[] skips them"
    )
    token_Cs: list[float] = Field(default=[1.0], description="C values of the token-level probes")
    aggregations: list[str] = Field(
        default=["mean", "max", "topk_mean", "window_max"], description="per-text aggregations of token scores"
    )
    agg_k: int = Field(5, ge=1, description="topk_mean: the k largest token scores")
    agg_window: int = Field(16, ge=1, description="window_max: tokens per window")
    include_all: bool = Field(True, description="also probe every active feature")
    relevant_threshold: float = Field(
        6.0, ge=0, le=10, description="features with classification score >= this form the 'relevant' set "
        "(used only when the classifications view exists)"
    )
    penalties: list[str] = Field(default=["l1", "l2"], description="'l1' and/or 'l2'")
    Cs: list[float] = Field(default=[10.0, 1.0, 0.1, 0.01], description="inverse regularisation strengths")
    default_transform: str = Field("raw", description="transform of the first grid stage")
    transforms: list[str] = Field(
        default=["raw", "binary", "log1p", "zscore", "quantile"],
        description="transforms swept on the best (feature set, penalty, C)",
    )
    value: str = Field("max_act", description="pooled value probed: 'max_act' or 'mean_act'")
    full: bool = Field(False, description="cross every transform with the whole grid (about 5x the work)")
    dense_poolings: list[str] = Field(
        default=["mean", "max", "both"], description="residual poolings of the dense baseline; [] skips it"
    )
    dense_Cs: list[float] = Field(default=[1.0, 0.1, 0.01], description="C values of the dense baseline")
    folds: int = Field(5, ge=2, description="cross-validation folds (capped by the smaller class)")
    n_boot: int = Field(1000, ge=1, description="bootstrap resamples of each AUROC confidence interval")
    seed: int = Field(0, description="seeds folds, solvers and the bootstrap")
    report_max_features: int = Field(50, ge=1, description="feature pages: the best SAE probe's largest weights")
    report_top_windows: int = Field(5, ge=1, description="top windows per feature page")
    report_window_tokens: int = Field(12, ge=0, description="tokens each side of a window's peak")

    @model_validator(mode="after")
    def _valid_grid(self) -> ProbeConfig:
        self.settings()  # ProbeGridConfig / EvalSettings raise ValueError naming the bad field
        return self

    def settings(self) -> EvalSettings:
        """The library's settings (imported lazily: sklearn is not needed to read a profile)."""
        from dagster_project.lib.evaluation.settings import EvalSettings
        from dagster_project.lib.probes import ProbeGridConfig

        grid = ProbeGridConfig(
            top_n=tuple(self.top_n),
            include_all=self.include_all,
            relevant_threshold=self.relevant_threshold,
            penalties=tuple(self.penalties),
            Cs=tuple(self.Cs),
            default_transform=self.default_transform,
            transforms=tuple(self.transforms),
            value=self.value,
            full=self.full,
            dense_poolings=tuple(self.dense_poolings),
            dense_Cs=tuple(self.dense_Cs),
            folds=self.folds,
            seed=self.seed,
            selection=self.selection,
            criterion=self.criterion,
            weighting=self.weighting,
            min_group=self.min_group,
            control_as_negatives=self.control_as_negatives,
            control_fpr=self.control_fpr,
            ksparse=tuple(self.ksparse),
            token_top_n=tuple(self.token_top_n),
            token_Cs=tuple(self.token_Cs),
            aggregations=tuple(self.aggregations),
            agg_k=self.agg_k,
            agg_window=self.agg_window,
        )
        return EvalSettings(
            grid=grid,
            train_datasets=tuple(self.train_datasets),
            n_boot=self.n_boot,
            seed=self.seed,
            report_max_features=self.report_max_features,
            report_top_windows=self.report_top_windows,
            report_window_tokens=self.report_window_tokens,
        )


class StatsConfig(dg.Config):
    """Launchpad config of the statistics assets (group ``statistics``).

    ``feature_stats`` uses ``train_datasets`` and ``min_act`` and records the values it used (the training
    datasets resolved to names) in its Parquet file; ``selected_features`` and ``cross_distribution`` read
    them back from there, so every statistic of a layer agrees with its ``feature_stats``.
    ``selected_features`` uses the selection fields.
    """

    train_datasets: list[str] = Field(
        default=[], description="datasets pooled for class statistics; empty = every dataset whose role is 'train'"
    )
    min_act: float = Field(1.0, ge=0, description="a feature is active when its max_act reaches this")
    min_selectivity: float = Field(0.3, ge=0, le=1, description="keep features with |selectivity| >= this")
    keep_negative: bool = Field(True, description="also keep features that prefer the negative class")
    min_freq: float = Field(
        0.05, ge=0, le=1,
        description="keep features firing on at least this fraction of their preferred class (the seed used 0: "
        "then features seen on one or two samples of one class, selectivity exactly +/-1, fill the top of the list)",
    )
    max_features: int | None = Field(200, ge=1, description="keep the N highest-ranked features; None keeps all")
    fdr_alpha: float | None = Field(
        None, gt=0, le=1,
        description="also require q_value < this: the Benjamini-Hochberg q of the Mann-Whitney test of positives "
        "vs negatives in feature_stats (a false discovery rate over the layer's features); None: no such filter",
    )
