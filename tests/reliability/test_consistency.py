"""Promise 4, consistency: activations made with one model, SAE or config are never mixed with another's.

Every file of a (layer, dataset) partition records the model, SAE (with a digest of its weights), hook,
dtypes, ``max_tokens`` and config hash it was extracted with. Every asset that reads activations checks
them first against the *current* profile (``dagster_project/provenance.py``, ``check_layer``) and stops
with a message naming the file, the differing fields and the command that re-extracts it. Here: switch the
SAE folder, replace the SAE's weights in place, change the model dtype, or re-extract only some datasets,
and run every reader without re-extracting.

Library-level checks: ``tests/lib/test_lake.py::test_check_provenance``,
``tests/lib/test_evaluation.py::test_mixed_activation_provenance_is_an_error``; a probe applied with another
profile is refused by ``dagster_project/scoring.py`` (``check_provenance``).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from assets.activations import activations
from assets.corpus import samples
from assets.describe import descriptions
from assets.probes import evaluation, probes
from assets.statistics import activation_profile, cross_distribution, feature_stats, selected_features
from dagster_project.config import load_profile
from dagster_project.partitions import LAYER_PARTITIONS_NAME, multi_key
from dagster_project.resources import resources_for
from tests.conftest import TINY_D, TINY_LAYERS, write_gemmascope
from tests.reliability.helpers import dataset_partition_names, failure_message

LAYER = 1
SMALL_PROBES = {"top_n": [5], "penalties": ["l2"], "Cs": [1.0], "transforms": ["raw"], "dense_poolings": [],
                "folds": 3, "n_boot": 20}


@pytest.fixture
def lab(tiny_profile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lab:
    return Lab(tiny_profile, tmp_path, monkeypatch)


class Lab:
    """Two datasets (named after dataset partitions) and a way to switch the active profile."""

    def __init__(self, profile_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp, self.monkeypatch = tmp_path, monkeypatch
        self.base = yaml.safe_load(profile_path.read_text())
        self.train, self.test = dataset_partition_names(2)
        rng = random.Random(0)
        words = ["rlhf", "values", "comply", "soup", "recipe", "weather", "training", "pretend", "refuse"]
        entries = []
        for name, role, n in ((self.train, "train", 16), (self.test, "test", 8)):
            rows = [{"text": f"sample {i} of {name}: " + " ".join(rng.choice(words) for _ in range(12)),
                     "label": "pos" if i % 2 else "neg"} for i in range(n)]
            (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            entries.append({"name": name, "source": f"{name}.jsonl", "format": "jsonl", "role": role,
                            "labels": {"positive": ["pos"], "negative": ["neg"]}})
        (tmp_path / "registry.yaml").write_text(yaml.safe_dump({"datasets": entries}))
        monkeypatch.setenv("FEATURELAKE_DATASETS", str(tmp_path / "registry.yaml"))
        self.instance = dg.DagsterInstance.ephemeral()
        self.instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, [str(LAYER)])
        self.resources: dict[str, Any] = {}
        self.use()

    def use(self, name: str = "a", sae_dir: Path | None = None, **model: Any) -> None:
        """Make a profile active (same profile name, so the same lake namespace): the code location's env."""
        prof = json.loads(json.dumps(self.base))
        prof["model"].update(model)
        if sae_dir is not None:
            prof["sae"]["path"] = str(sae_dir / "layer_{layer}")
        path = self.tmp / f"profile_{name}.yaml"
        path.write_text(yaml.safe_dump(prof))
        self.monkeypatch.setenv("FEATURELAKE_PROFILE", str(path))
        self.resources = resources_for(load_profile(), str(self.tmp / "lake"))

    def run(self, asset: Any, key: Any = str(LAYER), config: dict[str, Any] | None = None) -> dg.ExecuteInProcessResult:
        run_config = {"ops": {asset.op.name: {"config": config}}} if config else None
        return dg.materialize([asset], partition_key=key, resources=self.resources, instance=self.instance,
                              raise_on_error=False, run_config=run_config)

    def extract(self, *datasets: str) -> None:
        for d in datasets:
            if not self.resources["lake"].lake.exists("samples", dataset=d):
                assert self.run(samples, d).success
            assert self.run(activations, multi_key(LAYER, d)).success


def saes(folder: Path, seed: int) -> Path:
    for layer in range(TINY_LAYERS):
        write_gemmascope(folder / f"layer_{layer}", TINY_D, 256, seed=seed + layer)
    return folder


READERS = {
    "feature_stats": (feature_stats, None),
    "activation_profile": (activation_profile, None),
    "cross_distribution": (cross_distribution, None),
    "descriptions": (descriptions, None),
    "probes": (probes, SMALL_PROBES),
}


def test_switching_the_sae_folder_stops_every_reader_until_re_extracted(lab: Lab, tmp_path: Path) -> None:
    lab.extract(lab.train, lab.test)
    for asset, config in [(feature_stats, None), (selected_features, None), (probes, SMALL_PROBES)]:
        result = lab.run(asset, config=config)
        assert result.success, failure_message(result)
    old_sae = lab.resources["sae"].load(LAYER, lab.resources["lake"].lake).sae_id

    lab.use("b", sae_dir=saes(tmp_path / "other_saes", seed=100))  # another SAE: other weights and path
    new_sae = lab.resources["sae"].load(LAYER, lab.resources["lake"].lake).sae_id
    assert new_sae != old_sae
    for what, (asset, config) in READERS.items():
        result = lab.run(asset, config=config)
        assert not result.success, what
        msg = failure_message(result)
        assert "was extracted with another model/SAE/config" in msg, (what, msg)
        assert f"sae_id: lake has {old_sae!r}, profile wants {new_sae!r}" in msg, (what, msg)
        assert "config_hash: lake has" in msg and "model_id" not in msg.split("(", 1)[1], (what, msg)
        assert f"Re-extract it: featurelake backfill --layer {LAYER} --dataset " in msg, (what, msg)

    # re-extracting one dataset is not enough: the other one is named
    lab.extract(lab.train)
    msg = failure_message(lab.run(feature_stats))
    assert f"dataset={lab.test}" in msg and f"featurelake backfill --layer {LAYER} --dataset {lab.test}" in msg, msg
    assert f"dataset={lab.train}" not in msg, msg

    lab.extract(lab.test)
    assert lab.run(feature_stats).success
    # the probes saved before were trained on the old SAE's features: evaluating them is refused too
    msg = failure_message(lab.run(evaluation, config=SMALL_PROBES))
    assert "saved probes of layer 1 were trained on activations of another model/SAE/config" in msg, msg
    assert f"sae_id: probe has {old_sae!r}, lake has {new_sae!r}" in msg and "materialize probes" in msg, msg
    assert lab.run(probes, config=SMALL_PROBES).success and lab.run(evaluation, config=SMALL_PROBES).success


def test_sae_weights_replaced_in_place_are_told_apart(lab: Lab, tmp_path: Path) -> None:
    folder = saes(tmp_path / "saes", seed=0)
    lab.use("a", sae_dir=folder)
    lab.extract(lab.train, lab.test)
    assert lab.run(feature_stats).success

    shutil.rmtree(folder / f"layer_{LAYER}")  # same folder, same profile, same config hash: new weights
    write_gemmascope(folder / f"layer_{LAYER}", TINY_D, 256, seed=999)
    msg = failure_message(lab.run(feature_stats))
    assert "sae_id: lake has" in msg and "config_hash" not in msg, msg


def test_changing_the_model_dtype_is_caught(lab: Lab) -> None:
    lab.extract(lab.train, lab.test)
    lab.use("f32", dtype="float32")
    msg = failure_message(lab.run(feature_stats))
    assert "dtype: lake has 'bfloat16', profile wants 'float32'" in msg and "config_hash: lake has" in msg, msg


def test_dtype_auto_reading_a_lake_of_another_dtype_names_the_setting(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lake extracted in bfloat16, read where the profile's ``dtype: auto`` resolves to float32 (a CPU with
    no native bf16): refused, naming the setting that reads it as it is; where ``auto`` resolves to bfloat16
    (a CPU with AVX512-BF16) the same lake is read."""
    from dagster_project.lib import model as model_lib

    lab.extract(lab.train, lab.test)  # the tiny profile: dtype bfloat16
    monkeypatch.setattr(model_lib.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(model_lib, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    lab.use("auto_fp32", dtype="auto")
    msg = failure_message(lab.run(feature_stats))
    assert "dtype: lake has 'bfloat16', profile wants 'float32'" in msg, msg
    assert ("To read this lake as it is, set model.dtype to 'bfloat16' (the profile's 'auto' is 'float32' on "
            "this machine) in the profile. Or re-extract it: featurelake backfill --layer 1 --dataset ") in msg, msg

    monkeypatch.setattr(model_lib, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    lab.use("auto_bf16", dtype="auto")
    result = lab.run(feature_stats)
    assert result.success, failure_message(result)

    # another difference as well (max_tokens is a setting too, the SAE is not): no setting reads the lake
    monkeypatch.setattr(model_lib, "cpu_flags", lambda: frozenset({"avx2"}))
    lab.use("auto_sae", sae_dir=saes(lab.tmp / "other_saes", seed=7), dtype="auto")
    msg = failure_message(lab.run(feature_stats))
    assert "To read this lake" not in msg and "Re-extract it: featurelake backfill" in msg, msg
