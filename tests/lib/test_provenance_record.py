"""The provenance record type (dagster_project/lib/provenance_record.py): its keys are the ones every reader
compares, and a dict made from it is the dict written before the type existed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from dagster_project.lib.provenance_record import PROBE_KEYS, RECORD_KEYS, SCORE_KEYS, ProvenanceRecord

META = {"model_id": "m", "sae_id": "s", "hook": "h", "dtype": "float32", "sae_dtype": "float32",
        "max_tokens": 256, "config_hash": "c", "layer": 6, "dataset": "d", "role": "train"}


def test_record_keys_in_the_order_files_list_them() -> None:
    assert RECORD_KEYS == ("model_id", "sae_id", "hook", "dtype", "sae_dtype", "max_tokens", "config_hash")
    assert set(PROBE_KEYS) <= set(RECORD_KEYS) and set(SCORE_KEYS) <= set(PROBE_KEYS)


def test_from_dict_to_dict_is_the_old_key_selection() -> None:
    rec = ProvenanceRecord.from_dict(META)
    assert rec.to_dict() == {k: META.get(k) for k in RECORD_KEYS}
    assert list(rec.to_dict()) == list(RECORD_KEYS)
    assert rec.to_dict(PROBE_KEYS) == {k: META.get(k) for k in PROBE_KEYS}
    assert ProvenanceRecord.from_dict({"model_id": "m"}).to_dict()["sae_id"] is None


def test_differences_name_the_keys_that_differ() -> None:
    a = ProvenanceRecord.from_dict(META)
    b = ProvenanceRecord.from_dict({**META, "dtype": "bfloat16", "config_hash": "x"})
    assert a.differences(b) == {"dtype": ("float32", "bfloat16"), "config_hash": ("c", "x")}
    assert a.differences(b, SCORE_KEYS) == {"config_hash": ("c", "x")}
    assert a.differences(a) == {}


def test_frozen() -> None:
    rec = ProvenanceRecord.from_dict(META)
    with pytest.raises(AttributeError):
        rec.model_id = "other"  # type: ignore[misc]


def test_activation_record_writes_the_same_json_as_before() -> None:
    from dagster_project.provenance import activation_record

    model = SimpleNamespace(model_id="m", dtype="float32", device="cpu", sae_dtype="float32", max_tokens=256)
    rec = activation_record(model, "s", "h", "c")
    before = {"model_id": "m", "sae_id": "s", "hook": "h", "dtype": "float32", "sae_dtype": "float32",
              "max_tokens": 256, "config_hash": "c"}
    assert json.dumps(rec) == json.dumps(before)
    assert json.dumps({**rec, "layer": 6}, sort_keys=True) == json.dumps({**before, "layer": 6}, sort_keys=True)


def test_the_probe_and_score_keys_are_those_the_probe_stage_compares() -> None:
    """The probe stage keeps, and scoring compares, the record type's key lists (not lists of their own)."""
    from dagster_project import scoring
    from dagster_project.lib import evaluation

    assert evaluation.PROVENANCE_KEYS == PROBE_KEYS == ("model_id", "sae_id", "hook", "dtype", "config_hash")
    assert scoring.SCORE_KEYS == SCORE_KEYS == ("model_id", "sae_id", "hook", "config_hash")
