"""The pipeline's run sequence: one Dagster asset job per stage, and the plan of runs that covers a profile.

The jobs (in :func:`stage_jobs`, registered by ``definitions.py``, so the UI and the daemon can launch them
too) are the stages in order: ``samples_job`` (one dataset a run), ``sae_job`` (a layer, or a range of
layers: one forward pass collects every layer's training vectors), ``activations_job`` (a dataset at a
layer, or at a range of layers), ``per_layer_job`` (every other layer-partitioned asset: statistics, describe,
probes) and ``catalog_job`` (the unpartitioned assets: the catalog, the report).

:func:`plan_steps` says which runs of which job materialize some layers and datasets, as :class:`Step`
values; ``featurelake demo`` and ``featurelake backfill`` (``dagster_project/cli.py``) launch them one after
another in the persistent instance.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import dagster as dg

from dagster_project.partitions import LAYER_PARTITIONS_NAME, multi_key

SAMPLES_JOB = "samples_job"
SAE_JOB = "sae_job"
ACTIVATIONS_JOB = "activations_job"
PER_LAYER_JOB = "per_layer_job"
CATALOG_JOB = "catalog_job"
#: The stage jobs in the order a full run launches them.
STAGE_JOBS = (SAMPLES_JOB, SAE_JOB, ACTIVATIONS_JOB, PER_LAYER_JOB, CATALOG_JOB)

#: The stages of a full run, in order (``featurelake backfill`` runs all but ``corpus``).
STAGES = ("corpus", "sae", "activations", "downstream")

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
PARTITION = "dagster/partition"


class Step(NamedTuple):
    """One run: its name on the console, the job it launches and the run's partition tags."""

    name: str
    job: str
    tags: dict[str, str]


def _is_layer(pdef: dg.PartitionsDefinition | None) -> bool:
    return pdef is not None and getattr(pdef, "name", None) == LAYER_PARTITIONS_NAME


def stage_jobs(assets: Iterable[object]) -> list[dg.UnresolvedAssetJobDefinition]:
    """The asset job of each stage, over ``assets`` (what ``load_assets_from_modules`` found)."""
    defs = [a for a in assets if isinstance(a, dg.AssetsDefinition) and a.is_materializable]
    sae = dg.AssetKey("sae")
    per_layer = sorted((k for a in defs if _is_layer(a.partitions_def) for k in a.keys if k != sae),
                       key=lambda k: k.to_user_string())
    unpartitioned = [k for a in defs if a.partitions_def is None for k in a.keys]
    selections = {
        SAMPLES_JOB: ("The samples of one dataset.", [dg.AssetKey("samples")]),
        SAE_JOB: ("The SAE of a layer, or of a range of layers in one forward pass.", [sae]),
        ACTIVATIONS_JOB: ("The activations of a dataset at a layer or a range of layers.", [dg.AssetKey("activations")]),
        PER_LAYER_JOB: ("Every other asset of a layer: statistics, describe, probes.", per_layer),
        CATALOG_JOB: ("The unpartitioned assets: the lake's catalog and the report.", unpartitioned),
    }
    return [dg.define_asset_job(name, selection=dg.AssetSelection.assets(*keys), description=doc)
            for name, (doc, keys) in selections.items()]


def partition_range(wanted: Sequence[str], registered: Sequence[str]) -> tuple[str, str] | None:
    """``(first, last)`` of ``wanted`` in the order of ``registered`` (a dynamic partition's keys, in the
    order they were added: not sorted, so layer 12 added after 9 comes after it), when they sit side by
    side there, so that a partition range names exactly them; else ``None``."""
    if not wanted or not all(k in registered for k in wanted):
        return None
    pos = sorted({registered.index(k) for k in wanted})
    if pos != list(range(pos[0], pos[0] + len(pos))):
        return None
    return registered[pos[0]], registered[pos[-1]]


def sae_steps(layers: Sequence[int], registered: Sequence[str]) -> list[Step]:
    """The SAE step(s) for ``layers``: one run over all of them (one forward pass collects every layer's
    training vectors) when they form a partition range of the ``registered`` layers; else one run a layer."""
    keys = [str(x) for x in layers]
    span = partition_range(keys, registered)
    if len(keys) > 1 and span is not None:
        return [Step(f"sae layers {', '.join(keys)}", SAE_JOB, {RANGE_START: span[0], RANGE_END: span[1]})]
    return [Step(f"sae layer {k}", SAE_JOB, {PARTITION: k}) for k in keys]


def activation_steps(layers: Sequence[int], datasets: Sequence[str], registered: Sequence[str]) -> list[Step]:
    """The activations steps: per dataset one run over all ``layers`` (one forward pass) when they form a
    partition range of the ``registered`` layers (the multi-partition orders a dataset's keys by the
    layer partition's order), else one run per (dataset, layer)."""
    keys = [str(x) for x in layers]
    span = partition_range(keys, registered)
    steps = []
    for d in datasets:
        if len(keys) == 1 or span is None:
            steps += [Step(f"activations {d} layers [{k}]", ACTIVATIONS_JOB, {PARTITION: str(multi_key(k, d))})
                      for k in keys]
            continue
        tags = {RANGE_START: str(multi_key(span[0], d)), RANGE_END: str(multi_key(span[1], d))}
        steps.append(Step(f"activations {d} layers {[int(k) for k in keys]}", ACTIVATIONS_JOB, tags))
    return steps


def plan_steps(layers: Sequence[int], datasets: Sequence[str], registered: Sequence[str],
               stages: Sequence[str] = STAGES) -> list[Step]:
    """The runs that materialize ``stages`` for ``layers`` (registered, in the layer partition's order, as
    ``registered``) and ``datasets``: samples a dataset, the SAEs, the activations, then each layer's other
    assets and last the catalog and report."""
    steps: list[Step] = []
    if "corpus" in stages:
        steps += [Step(f"samples {d}", SAMPLES_JOB, {PARTITION: d}) for d in datasets]
    if "sae" in stages:
        steps += sae_steps(layers, registered)
    if "activations" in stages:
        steps += activation_steps(layers, datasets, registered)
    if "downstream" in stages:
        steps += [Step(f"per-layer assets layer {x}", PER_LAYER_JOB, {PARTITION: str(x)}) for x in layers]
        steps.append(Step("catalog and report", CATALOG_JOB, {}))
    return steps
