"""Which model, SAE and config made each activation partition, and the one check every reader runs.

The ``activations`` asset writes :func:`activation_record` into every file of a (layer, dataset) partition
(``activations``, ``token_activations``, ``residuals`` and, where written, ``token_residuals``; Parquet
key-value metadata, see ``lib/lake.py``).
Every asset that reads activations (the statistics, the describe windows, the probes) first calls
:func:`check_layer`: each partition of the layer must carry the record the *current profile* would write
(same model, SAE weights, hook, dtypes, ``max_tokens`` and config hash), otherwise the step stops with a
message naming the file and the command that re-extracts it. A file that cannot be read is reported the
same way (``Lake.read_meta``), and a folder that holds only the temp file of a killed write is no partition.

The current profile is the one whose namespace the lake is (``lake.namespace == profile.name``, which
:func:`dagster_project.resources.resources_for` guarantees for every run of the code location). A lake of
another namespace (a test fixture, another profile's tables read by hand) has no profile to compare with:
its partitions are then only required to agree with each other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dagster_project.config import PROFILES, Profile, load_profile
from dagster_project.lib.lake import Lake, LakeError
from dagster_project.lib.provenance_record import RECORD_KEYS, ProvenanceRecord
from dagster_project.lib.tables import ACTIVATION_TABLES

if TYPE_CHECKING:
    from dagster_project.resources import ModelResource, SAEResource

# ACTIVATION_TABLES: every table of a (layer, dataset) partition. An optional one (``token_residuals``, written
# only where the run or profile asks) that is absent is simply not checked: only the files present must carry
# the record.


def activation_record(model: Any, sae_id: str, hook: str, config_hash: str) -> dict[str, Any]:
    """The record (:class:`ProvenanceRecord`, as a dict) of a partition extracted with ``model`` (a
    ``ModelResource``) and the SAE ``sae_id``; its dtype is the one the model runs in (a profile's ``auto``
    resolved, never the word)."""
    from dagster_project.lib.model import resolve_dtype

    return ProvenanceRecord(
        model_id=model.model_id,
        sae_id=sae_id,
        hook=hook,
        dtype=resolve_dtype(model.dtype, getattr(model, "device", "auto")),
        sae_dtype=model.sae_dtype,
        max_tokens=model.max_tokens,
        config_hash=config_hash,
    ).to_dict()


def current_record(
    lake: Lake, layer: int, model: ModelResource, sae: SAEResource, profile: Profile | None = None
) -> dict[str, Any] | None:
    """The record the current profile writes at ``layer`` with the run's ``model`` and ``sae`` resources;
    ``None`` when the lake is not the profile's namespace.

    Loads the layer's SAE (its id holds a digest of the weights), so an SAE retrained or replaced in place
    is told apart from the one the activations were made with.
    """
    from dagster_project.lib.sae import SAEError

    profile = profile or load_profile()
    if profile.name != lake.namespace:
        return None
    try:
        sae_id = sae.load(int(layer), lake).sae_id
    except SAEError as e:
        raise LakeError(
            f"cannot check the activations of layer {layer} against profile {profile.name!r}: its SAE does not "
            f"load ({e})"
        ) from e
    return activation_record(model, sae_id, sae.hook, profile.config_hash())


# Record fields that are profile settings of the same name: a lake that differs from the profile only in
# them (and in the config hash they enter) is read by setting them to the lake's values.
SETTINGS = {"dtype": "model.dtype", "sae_dtype": "model.sae_dtype", "max_tokens": "model.max_tokens"}


def settings_hint(record: dict[str, Any], expected: dict[str, Any], profile: Profile) -> str:
    """The sentence that says which profile settings read a partition of ``record`` as it is; ``""`` when
    no setting does (another model or SAE, or a config hash that other fields decide too)."""
    differ = set(ProvenanceRecord.from_dict(record).differences(ProvenanceRecord.from_dict(expected)))
    settable = differ & SETTINGS.keys()
    if not settable or differ - settable - {"config_hash"}:
        return ""
    model = profile.model.model_copy(update={k: record[k] for k in settable})
    if profile.model_copy(update={"model": model}).config_hash() != record.get("config_hash"):
        return ""
    parts = []
    for k in sorted(settable):
        auto = k == "dtype" and profile.model.dtype == "auto"
        parts.append(f"{SETTINGS[k]} to {record[k]!r}"
                     + (f" (the profile's 'auto' is {expected[k]!r} on this machine)" if auto else ""))
    where = "the profile"
    if PROFILES.get(profile.name) == profile:
        where = (f"a profile YAML named {profile.name!r} (a copy of the built-in one, its path in "
                 "FEATURELAKE_PROFILE)")
    return f"To read this lake as it is, set {' and '.join(parts)} in {where}"


def partitions(lake: Lake, layer: int, tables: Sequence[str] = ACTIVATION_TABLES) -> list[tuple[str, str]]:
    """``(table, dataset)`` of every activation file at ``layer`` (folders without a finished file skipped)."""
    out = []
    for table in tables:
        folder = lake.table_dir(table) / f"layer={int(layer)}"
        if not folder.is_dir():
            continue
        for name in sorted(str(d.name) for d in folder.iterdir()):
            if name.startswith("dataset=") and lake.exists(table, layer, name.split("=", 1)[1]):
                out.append((table, name.split("=", 1)[1]))
    return out


def check_layer(
    lake: Lake, layer: int, expected: dict[str, Any] | None | str = "current", datasets: Sequence[str] | None = None
) -> dict[str, Any]:
    """Check every activation file of ``layer`` (of ``datasets``, default all) and return their record.

    ``expected``: ``"current"`` (the default) compares with :func:`current_record`; a dict compares with it;
    ``None`` only requires the files to agree with each other. The current record is made with the profile's
    model and SAE resources (``resources_for``: the assets that call this take no model or SAE resource).
    Raises :class:`LakeError` naming the file and how to re-extract it. Returns ``{}`` when the layer has no
    activations (callers say what is missing).
    """
    profile = None
    if expected == "current":
        profile = load_profile()
        expected = None
        if profile.name == lake.namespace:
            from dagster_project.resources import resources_for

            res = resources_for(profile, lake.root)
            expected = current_record(lake, layer, res["model"], res["sae"], profile)
    assert not isinstance(expected, str)
    found = [(t, d) for t, d in partitions(lake, layer) if datasets is None or d in datasets]
    seen: dict[str, tuple[str, str]] = {}
    record: dict[str, Any] = {}
    for table, dataset in found:
        try:
            meta = lake.read_meta(table, layer, dataset)
        except LakeError as e:  # unreadable: say which command rewrites it
            raise LakeError(f"{e}: featurelake backfill --layer {layer} --dataset {dataset}") from e
        rec = ProvenanceRecord.from_dict(meta).to_dict()
        if expected is not None and ProvenanceRecord.from_dict(rec).differences(ProvenanceRecord.from_dict(expected)):
            hint = settings_hint(rec, expected, profile) if profile is not None else ""
            lake.check_provenance(table, layer, dataset, expected, RECORD_KEYS, hint)  # raises, naming the fields
        seen.setdefault(json.dumps(rec, sort_keys=True, default=str), (table, dataset))
        record = rec
    if len(seen) > 1:
        detail = "; ".join(f"{t} of {d}: {r}" for r, (t, d) in seen.items())
        raise LakeError(
            f"activations of layer {layer} were extracted with different models/SAEs/configs ({detail}). "
            f"Re-extract them with one profile: featurelake backfill --layer {layer}"
        )
    return record
