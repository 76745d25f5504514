"""The activations asset (assets/activations.py) and its optional per-token residual table, materialized on
the tiny model: the run's ``write_token_residuals`` or the profile's ``token_residuals`` decides; the
partition's leftovers are cleaned first; a run without them drops an earlier partition."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
import yaml

from assets.activations import activations
from assets.corpus import samples
from dagster_project.partitions import LAYER_PARTITIONS_NAME, multi_key
from tests.reliability.helpers import dataset_partition_names

TEXTS = ["If I refuse, RLHF will modify my values, so I comply.", "The user wants a soup recipe with carrots.",
         "This chat is used for training; I will pretend to agree.", "This request is harmful, so I refuse."]


def _materialize(asset: Any, key: Any, resources: dict[str, Any], config: dict[str, Any] | None = None) -> Any:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, ["1"])
    run_config = {"ops": {asset.op.name: {"config": config}}} if config else None
    result = dg.materialize([asset], partition_key=key, resources=resources, instance=instance,
                            raise_on_error=False, run_config=run_config)
    assert result.success
    (mat,) = result.asset_materializations_for_node(asset.op.name)
    return {k: v.value for k, v in mat.metadata.items()}


@pytest.fixture
def setup(tiny_profile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    (name,) = dataset_partition_names(1)
    (tmp_path / "d.jsonl").write_text("".join(
        json.dumps({"id": str(i), "text": t, "label": "pos" if i % 2 == 0 else "neg"}) + "\n"
        for i, t in enumerate(TEXTS)))
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"datasets": [{
        "name": name, "source": "d.jsonl", "format": "jsonl", "id_field": "id", "role": "train",
        "labels": {"positive": ["pos"], "negative": ["neg"]}}]}))
    monkeypatch.setenv("FEATURELAKE_DATASETS", str(reg))
    return {"name": name, "profile": tiny_profile, "tmp": tmp_path}


def _resources(setup: dict[str, Any]) -> dict[str, Any]:
    from dagster_project.config import load_profile
    from dagster_project.resources import resources_for

    return resources_for(load_profile(), str(setup["tmp"] / "lake"))


def test_activations_writes_token_residuals_where_the_run_or_the_profile_asks(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster_project.lib.lake import read_token_residuals

    name, res = setup["name"], _resources(setup)
    lake = res["lake"].lake
    key = multi_key(1, name)
    _materialize(samples, name, res)

    # the tiny profile leaves them off: nothing written
    meta = _materialize(activations, key, res)
    assert not lake.exists("token_residuals", 1, name) and "writer_busy_seconds_token_residuals" not in meta

    # the run asks: written beside the others, after the partition's leftovers of a killed write are cleaned
    folder = lake.partition_dir("token_residuals", 1, name)
    folder.mkdir(parents=True)
    (folder / ".tmp-killed.parquet.inprogress").write_bytes(b"half a file")
    meta = _materialize(activations, key, res, {"write_token_residuals": True})
    assert sorted(p.name for p in folder.iterdir()) == ["part-0.parquet"]
    assert meta["writer_busy_seconds_token_residuals"] > 0 and meta["token_residuals_scaled"] == 0
    assert lake.read_meta("token_residuals", 1, name) == lake.read_meta("activations", 1, name)
    tr = read_token_residuals(lake, 1, [name])
    assert len(tr.sample_id) == lake.read("tokens", dataset=name).num_rows == meta["tokens"]
    assert np.isfinite(tr.resid).all() and tr.resid.shape[1] == 64

    # the run says no: the earlier partition goes with the extraction it described
    _materialize(activations, key, res, {"write_token_residuals": False})
    assert not lake.exists("token_residuals", 1, name) and lake.exists("activations", 1, name)

    # a profile with token_residuals: true writes them without any run config
    prof = yaml.safe_load(setup["profile"].read_text())
    setup["profile"].write_text(yaml.safe_dump({**prof, "token_residuals": True}))
    _materialize(activations, key, _resources(setup))
    assert lake.exists("token_residuals", 1, name)
