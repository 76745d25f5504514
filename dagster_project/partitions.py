"""Partitions, named once and imported by every asset.

- ``dataset``: static, one key per dataset of the registry (``FEATURELAKE_DATASETS`` or the demo's).
- ``layer``: dynamic; add one with ``featurelake layers add N`` (or the UI / the profile sensor) and
  backfill it: the same assets run for it.
- ``layer x dataset``: the activations grid. Dagster spells its keys ``dataset|layer`` (alphabetical).
"""

from __future__ import annotations

import dagster as dg

from dagster_project.lib.datasets import parse_registry

LAYER_PARTITIONS_NAME = "layer"

dataset_partitions = dg.StaticPartitionsDefinition(sorted(parse_registry()))
layer_partitions = dg.DynamicPartitionsDefinition(name=LAYER_PARTITIONS_NAME)
layer_dataset_partitions = dg.MultiPartitionsDefinition({"layer": layer_partitions, "dataset": dataset_partitions})


def multi_key(layer: int | str, dataset: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"layer": str(layer), "dataset": dataset})


def split_keys(keys: list[str] | list[dg.MultiPartitionKey]) -> dict[str, list[int]]:
    """``{dataset: [layers]}`` for the multi-partition keys of a run."""
    out: dict[str, list[int]] = {}
    for k in keys:
        dims = k.keys_by_dimension if isinstance(k, dg.MultiPartitionKey) else _parse(str(k))
        out.setdefault(dims["dataset"], []).append(int(dims["layer"]))
    return {d: sorted(set(v)) for d, v in sorted(out.items())}


def _parse(key: str) -> dict[str, str]:
    dataset, layer = key.split("|")
    return {"dataset": dataset, "layer": layer}
