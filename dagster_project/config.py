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
from typing import Literal

import dagster as dg
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

REPO_ROOT = Path(__file__).resolve().parent.parent


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="'gguf:gemma3-270m' (the PyPI GGUF), an HF model id, or a local folder")
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    device: str = Field("auto", description="'auto' picks CUDA when present, else CPU")
    max_tokens: int = Field(1024, ge=8, description="texts are truncated to this many tokens (BOS excluded)")
    batch_tokens: int = Field(4096, ge=64, description="padded tokens per forward batch")


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
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(1024, ge=16)
    lr: float = Field(4e-4, gt=0)
    seed: int = 0


class DescriberSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["offline", "anthropic", "claude-cli"] = "offline"
    model: str = "term-contrast+minilm"
    concurrency: int = Field(8, ge=1)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: ModelSpec
    sae: SAESpec
    describer: DescriberSpec = DescriberSpec()
    layers: list[int] = Field(description="layers the profile extracts by default (a sensor adds them)")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if not v or any(x < 0 for x in v):
            raise ValueError(f"layers must be a non-empty list of non-negative integers, got {v}")
        return v

    def config_hash(self) -> str:
        """Hash of what decides activation values (not the describer)."""
        d = {"model": self.model.model_dump(exclude={"batch_tokens", "device"}), "sae": self.sae.model_dump()}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


PROFILES: dict[str, Profile] = {
    "default": Profile(
        name="default",
        model=ModelSpec(id="gguf:gemma3-270m", dtype="bfloat16", max_tokens=1024),
        sae=SAESpec(source="train", width=4096, k=32),
        describer=DescriberSpec(backend="offline"),
        layers=[9],
    ),
    "gemma-3-27b": Profile(
        name="gemma-3-27b",
        model=ModelSpec(id="google/gemma-3-27b-it", dtype="bfloat16", max_tokens=2048, batch_tokens=16384),
        sae=SAESpec(
            source="release",
            release="gemma-scope-2-27b-it-res",
            sae_id="layer_{layer}_width_16k_l0_medium",
            hook="resid_post",
        ),
        describer=DescriberSpec(backend="anthropic", model="claude-sonnet-4-5", concurrency=32),
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
