"""Dagster resources: the lake, the model, the SAE. Each is an interface chosen by the profile.

The heavy objects (model, SAEs) are loaded lazily and cached per process, so a run that touches several
partitions loads the model once.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import dagster as dg

from dagster_project.config import REPO_ROOT, Profile
from dagster_project.describer_resource import describer_resource
from dagster_project.lib.lake import Lake, LakeError, local_copy
from dagster_project.lib.model import LoadedModel, compile_decoder, load_model, resolve_dtype
from dagster_project.lib.sae import (
    FINISHED_MARKER,
    LoadedSAE,
    SAEError,
    check_fits,
    load_gemmascope_dir,
    load_release,
    load_saelens_dir,
    load_trained,
)


def default_lake_root() -> str:
    """``FEATURELAKE_LAKE`` (a folder, or a URL such as ``s3://bucket/prefix``), else ``lake/``."""
    return os.environ.get("FEATURELAKE_LAKE") or str(REPO_ROOT / "lake")


class LakeResource(dg.ConfigurableResource):
    """Where the lake lives (``FEATURELAKE_LAKE``, default ``lake/``; ``s3://bucket/prefix`` reads and writes
    S3 through fsspec, credentials from the environment) and the profile's namespace in it."""

    root: str
    namespace: str = "default"

    @property
    def lake(self) -> Lake:
        return Lake(self.root, self.namespace)


@cache
def _cached_model(model_id: str, dtype: str, device: str, compile_: bool) -> LoadedModel:
    lm = load_model(model_id, dtype=dtype, device=device)
    if compile_ and lm.device.type == "cuda":
        compile_decoder(lm.model)
    return lm


class ModelResource(dg.ConfigurableResource):
    """A causal LM: ``gguf:gemma3-270m`` (PyPI), an HF id, or a local folder."""

    model_id: str
    dtype: str = "bfloat16"  # or "auto" (lib/model.py, resolve_dtype)
    device: str = "auto"
    max_tokens: int = 1024
    batch_tokens: int = 4096  # <= 0: sized by the GPU's free memory (the profile's "auto")
    sae_dtype: str = "float32"
    compile: bool = False
    pack: bool | None = None  # packed batches; None: where the GPU kernel runs (lib/packing.py)

    def resolved_dtype(self) -> str:
        """``dtype``, with ``auto`` decided for this machine (``resources_for`` passes it resolved already)."""
        return resolve_dtype(self.dtype, self.device)

    def load(self) -> LoadedModel:
        return _cached_model(self.model_id, self.resolved_dtype(), self.device, self.compile)


class SAEResource(dg.ConfigurableResource):
    """An SAE per layer: trained here (``train``), a sae-lens release, a GemmaScope-2 folder, or a sae-lens folder."""

    source: str = "train"
    release: str | None = None
    sae_id: str | None = None
    path: str | None = None
    hook: str = "resid_post"
    width: int = 4096
    k: int = 32
    train_tokens: int = 200_000
    epochs: int = 8
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0

    def load(self, layer: int, lake: Lake, device: str = "cpu", d_model: int | None = None) -> LoadedSAE:
        if self.source == "train":
            try:  # an S3 lake: the finished folder is downloaded to a local cache first
                folder = local_copy(lake.sae_dir(layer), FINISHED_MARKER)
            except LakeError as e:
                raise SAEError(str(e)) from e
            sae = load_trained(folder, device=device)
        elif self.source == "release":
            if not self.release or not self.sae_id:
                raise SAEError("SAE source 'release' needs 'release' and 'sae_id'")
            sae = load_release(self.release, self.sae_id.format(layer=layer), device=device)
        elif self.source in ("gemmascope", "saelens_dir"):
            if not self.path:
                raise SAEError(f"SAE source {self.source!r} needs 'path' (with {{layer}})")
            folder = Path(self.path.format(layer=layer))
            if not folder.is_dir():
                raise SAEError(f"SAE folder {folder} for layer {layer} does not exist")
            loader = load_gemmascope_dir if self.source == "gemmascope" else load_saelens_dir
            sae = loader(folder, device=device)
        else:
            raise SAEError(f"unknown SAE source {self.source!r}")
        if d_model is not None:
            where = self.release if self.source == "release" else folder  # where the SAE came from
            check_fits(sae, d_model, f"layer {layer} ({where})")
        return sae


def resources_for(profile: Profile, lake_root: str | None = None) -> dict[str, dg.ConfigurableResource]:
    m, s = profile.model, profile.sae
    return {
        "lake": LakeResource(root=lake_root or default_lake_root(), namespace=profile.name),
        "model": ModelResource(
            model_id=m.id, dtype=m.resolved_dtype(), device=m.device, max_tokens=m.max_tokens,
            batch_tokens=0 if m.batch_tokens == "auto" else m.batch_tokens,
            sae_dtype=m.sae_dtype, compile=m.compile, pack=None if m.pack == "auto" else m.pack,
        ),
        "sae": SAEResource(**s.model_dump()),
        "describer": describer_resource(profile.describer),
    }
