"""Dagster resources: the lake, the model, the SAE, and :func:`resources_for`, which composes a profile's.

The SAE is an interface, :class:`SAEResource`, with a class per source (trained here, a sae-lens release, a
GemmaScope-2 folder, a sae-lens folder); the describer likewise has a class per backend
(``dagster_project/describer_resource.py``). ``resources_for`` picks each from the profile, so no asset
branches on a source or backend name.

The heavy objects (model, SAEs) are loaded lazily and cached per process, so a run that touches several
partitions loads the model once.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Literal, TypedDict

import dagster as dg

from dagster_project.config import REPO_ROOT, Profile, SAESpec
from dagster_project.describer_resource import DescriberResource, describer_resource
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
from dagster_project.resource_kinds import KindedResource


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


class SAEResource(KindedResource):
    """An SAE per layer, behind one interface: trained here (:class:`TrainedSAE`), a sae-lens release
    (:class:`ReleaseSAE`), a GemmaScope-2 folder (:class:`GemmaScopeSAE`) or a sae-lens folder
    (:class:`SAELensDirSAE`). :func:`resources_for` picks the class from the profile's ``sae.source``;
    ``SAEResource(source=..., ...)`` builds the same class (see :data:`SAE_SOURCES`)."""

    KIND_FIELD, KIND_DEFAULT, KIND_NAME, KIND_ERROR = "source", "train", "SAE source", SAEError

    source: str = "train"
    hook: str = "resid_post"

    @classmethod
    def kinds(cls) -> Mapping[str, type[SAEResource]]:
        return SAE_SOURCES

    @abstractmethod
    def fetch(self, layer: int, lake: Lake, device: str) -> tuple[LoadedSAE, str]:
        """The layer's SAE and where it came from (a folder or a release), named in errors."""

    def load(self, layer: int, lake: Lake, device: str = "cpu", d_model: int | None = None) -> LoadedSAE:
        """The layer's SAE; with ``d_model``, checked to read the model's residual stream."""
        sae, where = self.fetch(layer, lake, device)
        if d_model is not None:
            check_fits(sae, d_model, f"layer {layer} ({where})")
        return sae

    def n_features(self, layer: int, lake: Lake) -> int:
        """Number of features of the layer's SAE (the loaded SAE's ``d_sae``)."""
        return int(self.load(layer, lake).d_sae)


class TrainedSAE(SAEResource):
    """A TopK SAE the ``sae`` asset trains here (sae-lens) and saves in the lake (``sae/layer=L``)."""

    source: Literal["train"] = "train"
    width: int = 4096
    k: int = 32
    train_tokens: int = 200_000
    epochs: int = 8
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0

    def fetch(self, layer: int, lake: Lake, device: str) -> tuple[LoadedSAE, str]:
        try:  # an S3 lake: the finished folder is downloaded to a local cache first
            folder = local_copy(lake.sae_dir(layer), FINISHED_MARKER)
        except LakeError as e:
            raise SAEError(str(e)) from e
        return load_trained(folder, device=device), str(folder)

    def n_features(self, layer: int, lake: Lake) -> int:
        """The configured width (no need to load the SAE)."""
        return int(self.width)


class ReleaseSAE(SAEResource):
    """A sae-lens release; ``sae_id`` has ``{layer}`` filled in."""

    source: Literal["release"] = "release"
    release: str | None = None
    sae_id: str | None = None

    def fetch(self, layer: int, lake: Lake, device: str) -> tuple[LoadedSAE, str]:
        if not self.release or not self.sae_id:
            raise SAEError("SAE source 'release' needs 'release' and 'sae_id'")
        return load_release(self.release, self.sae_id.format(layer=layer), device=device), self.release


class _FolderSAE(SAEResource):
    """An SAE saved in a folder per layer; ``path`` has ``{layer}`` filled in."""

    path: str | None = None

    @abstractmethod
    def read(self, folder: Path, device: str) -> LoadedSAE:
        """The SAE saved in ``folder``."""

    def fetch(self, layer: int, lake: Lake, device: str) -> tuple[LoadedSAE, str]:
        if not self.path:
            raise SAEError(f"SAE source {self.source!r} needs 'path' (with {{layer}})")
        folder = Path(self.path.format(layer=layer))
        if not folder.is_dir():
            raise SAEError(f"SAE folder {folder} for layer {layer} does not exist")
        return self.read(folder, device), str(folder)


class GemmaScopeSAE(_FolderSAE):
    """A GemmaScope-2 folder per layer (``params.safetensors`` and its config)."""

    source: Literal["gemmascope"] = "gemmascope"

    def read(self, folder: Path, device: str) -> LoadedSAE:
        return load_gemmascope_dir(folder, device=device)


class SAELensDirSAE(_FolderSAE):
    """A folder per layer saved by sae-lens (``cfg.json`` and weights)."""

    source: Literal["saelens_dir"] = "saelens_dir"

    def read(self, folder: Path, device: str) -> LoadedSAE:
        return load_saelens_dir(folder, device=device)


#: The SAE resource of each ``SAESpec.source``.
SAE_SOURCES: dict[str, type[SAEResource]] = {
    "train": TrainedSAE, "release": ReleaseSAE, "gemmascope": GemmaScopeSAE, "saelens_dir": SAELensDirSAE,
}


def sae_resource(spec: SAESpec) -> SAEResource:
    """The SAE resource of a profile's ``sae`` (the fields its source uses)."""
    cls = SAE_SOURCES[spec.source]
    return cls(**spec.model_dump(include=set(cls.model_fields)))


class Resources(TypedDict):
    """The resources of a profile, by the key the assets name them with."""

    lake: LakeResource
    model: ModelResource
    sae: SAEResource
    describer: DescriberResource


def resources_for(profile: Profile, lake_root: str | None = None) -> Resources:
    """The composition of a profile: each resource the class its settings name (SAE source, describer backend)."""
    m, s = profile.model, profile.sae
    return {
        "lake": LakeResource(root=lake_root or default_lake_root(), namespace=profile.name),
        "model": ModelResource(
            model_id=m.id, dtype=m.resolved_dtype(), device=m.device, max_tokens=m.max_tokens,
            batch_tokens=0 if m.batch_tokens == "auto" else m.batch_tokens,
            sae_dtype=m.sae_dtype, compile=m.compile, pack=None if m.pack == "auto" else m.pack,
        ),
        "sae": sae_resource(s),
        "describer": describer_resource(profile.describer),
    }
