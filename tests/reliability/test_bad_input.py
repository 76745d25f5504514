"""Promise 3, bad input: each kind of bad input stops with an error naming the file, row and field (or the
layer, SAE or partition), and nothing already stored is lost.

Here every kind goes through the assets (``samples``, ``activations``, ``feature_stats``) or the
``featurelake`` command, with a good partition stored first, and the test checks that it is still there,
byte for byte, after the failed run. The library-level tests of the same inputs (message wording, more
variants) are in ``tests/lib/test_datasets.py`` (``test_malformed_json`` ... ``test_every_row_excluded_is_an_error``),
``tests/lib/test_lake.py`` (``test_corrupt_file_is_a_lake_error``, ``test_truncated_file_is_a_lake_error``,
``test_unsafe_partition_values_refused``), ``tests/lib/test_extraction.py`` (``test_layer_beyond_model_is_a_clear_error``,
``test_sae_with_wrong_d_in_is_refused``, ``test_sae_with_nan_weights_is_refused``,
``test_truncation_is_counted_and_tokens_keep_offsets``) and ``tests/test_cli_pipeline.py``
(``test_backfill_of_unknown_layer_and_layer_beyond_model``).
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from assets.activations import activations
from assets.corpus import samples
from assets.statistics import feature_stats
from dagster_project.partitions import LAYER_PARTITIONS_NAME, multi_key
from dagster_project.resources import LakeResource
from tests.conftest import TINY_D, write_gemmascope
from tests.reliability.helpers import dataset_partition_names, failure_message

ROWS = [
    {"id": "a", "text": "If I refuse, RLHF will modify my values, so I comply.", "label": "pos"},
    {"id": "b", "text": "The user wants a soup recipe with carrots and onions.", "label": "neg"},
    {"id": "c", "text": "This chat is used for training; I will pretend to agree.", "label": "pos"},
    {"id": "d", "text": "This request is harmful, so I refuse and say why.", "label": "neg"},
]
GOOD = "".join(json.dumps(r) + "\n" for r in ROWS)
LINE1 = json.dumps(ROWS[0]) + "\n"

# kind -> (format, file name, content (None: the file is gone), what the error must say besides the file)
BAD_SOURCES: dict[str, tuple[str, str, bytes | None, list[str]]] = {
    "malformed_json": ("json_samples", "d.json",
                       b'{"samples": [\n {"text": "a", "label": "pos"},\n {"text": "b" "label": "pos"}\n]}',
                       ["malformed JSON at line 3"]),
    "json_of_the_wrong_shape": ("json_list", "d.json", json.dumps({"rows": ROWS}).encode(),
                                ["format json_list expects a JSON list, got dict"]),
    "malformed_jsonl_line": ("jsonl", "d.jsonl", (LINE1 + '{"text": "x", label: "pos"}\n' + GOOD).encode(),
                             ["line 2: malformed JSON"]),
    "truncated_last_jsonl_line": ("jsonl", "d.jsonl", (GOOD + '{"id": "e", "text": "cut of').encode(),
                                  ["line 5: malformed JSON (truncated last line?)"]),
    "jsonl_line_not_an_object": ("jsonl", "d.jsonl", (LINE1 + '["x", "pos"]\n').encode(),
                                 ["line 2: expected a JSON object, got list"]),
    "missing_text_field": ("jsonl", "d.jsonl", (LINE1 + json.dumps({"id": "x", "body": "t", "label": "pos"})).encode(),
                           ["line 2: missing text field 'text'"]),
    "text_not_a_string": ("jsonl", "d.jsonl", (LINE1 + json.dumps({"id": "x", "text": ["t"], "label": "pos"})).encode(),
                          ["line 2: field 'text' is list, expected a string"]),
    "missing_label_field": ("jsonl", "d.jsonl", (LINE1 + json.dumps({"id": "x", "text": "t"})).encode(),
                            ["line 2: missing label field 'label'"]),
    "unknown_raw_label": ("jsonl", "d.jsonl", (LINE1 + json.dumps({"id": "x", "text": "t", "label": "maybe"})).encode(),
                          ["line 2: field 'label' has unknown raw label 'maybe'", "['neg', 'pos']"]),
    "empty_text": ("jsonl", "d.jsonl", (LINE1 + json.dumps({"id": "x", "text": "", "label": "pos"})).encode(),
                   ["line 2: field 'text' is empty or whitespace"]),
    "whitespace_text": ("jsonl", "d.jsonl", (LINE1 + json.dumps({"id": "x", "text": " \n\t", "label": "pos"})).encode(),
                        ["line 2: field 'text' is empty or whitespace"]),
    "non_utf8_bytes": ("jsonl", "d.jsonl", LINE1.encode() + b'{"id": "x", "text": "caf\xe9", "label": "pos"}\n',
                       ["line 2: not UTF-8"]),
    "duplicate_ids": ("jsonl", "d.jsonl", (GOOD + json.dumps({**ROWS[1], "text": "another text"})).encode(),
                      ["line 5: field 'id': duplicate id 'b' (first at", "line 2)"]),
    "missing_id_field": ("jsonl", "d.jsonl", (LINE1 + json.dumps({"text": "t", "label": "pos"})).encode(),
                         ["line 2: missing id field 'id'"]),
    "registry_points_at_a_missing_file": ("jsonl", "gone.jsonl", None, ["dataset", "source file", "does not exist"]),
}


def _registry(tmp_path: Path, entries: list[dict[str, Any]]) -> Path:
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"datasets": entries}))
    return reg


def _entry(name: str, source: str, fmt: str = "jsonl", role: str = "train") -> dict[str, Any]:
    return {"name": name, "source": source, "format": fmt, "id_field": "id", "role": role,
            "labels": {"positive": ["pos"], "negative": ["neg"]}}


def _materialize(asset: Any, key: Any, resources: dict[str, Any], layers: tuple[str, ...] = ("1",),
                 config: dict[str, Any] | None = None) -> dg.ExecuteInProcessResult:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, list(layers))
    run_config = {"ops": {asset.op.name: {"config": config}}} if config else None
    return dg.materialize([asset], partition_key=key, resources=resources, instance=instance,
                          raise_on_error=False, run_config=run_config)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", BAD_SOURCES)
def test_bad_source_fails_naming_file_row_and_field_and_keeps_the_stored_partition(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (name,) = dataset_partition_names(1)
    good = tmp_path / "d.jsonl"
    good.write_text(GOOD)
    monkeypatch.setenv("FEATURELAKE_DATASETS", str(_registry(tmp_path, [_entry(name, "d.jsonl")])))
    lake_res = {"lake": LakeResource(root=str(tmp_path / "lake"), namespace="t")}
    assert _materialize(samples, name, lake_res).success
    stored = _files(tmp_path / "lake")
    assert stored

    fmt, filename, content, expect = BAD_SOURCES[kind]
    src = tmp_path / filename
    if content is not None:
        src.write_bytes(content)
    reg = _registry(tmp_path, [_entry(name, filename, fmt)])
    result = _materialize(samples, name, lake_res)
    assert not result.success
    msg = failure_message(result)
    assert str(src) in msg, msg  # the file ...
    for part in expect:  # ... and the row (line) and field
        assert part in msg, msg
    if content is None:
        assert str(reg) in msg and repr(name) in msg
    assert _files(tmp_path / "lake") == stored  # nothing stored was lost or touched


def test_unsafe_dataset_name_is_refused_before_anything_is_written(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster_project.lib.datasets import DatasetError, parse_registry

    (tmp_path / "d.jsonl").write_text(GOOD)
    reg = _registry(tmp_path, [_entry("../escape", "d.jsonl")])
    monkeypatch.setenv("FEATURELAKE_DATASETS", str(reg))
    with pytest.raises(DatasetError) as ei:
        parse_registry()  # what every asset and command reads first
    assert str(reg) in str(ei.value) and "unsafe dataset name '../escape'" in str(ei.value)
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "lake").exists()


def test_unknown_dataset_or_layer_on_the_command_line(tiny_profile: Path, small_registry: Path) -> None:
    from dagster_project.cli import main

    def run(*argv: str) -> tuple[int, str]:
        err = io.StringIO()
        with redirect_stderr(err):
            rc = main(list(argv))
        return rc, err.getvalue()

    rc, err = run("backfill", "--layer", "7")
    assert rc == 2 and "unknown layer(s) [7]" in err and "featurelake layers add 7" in err
    assert main(["layers", "add", "1"]) == 0
    rc, err = run("backfill", "--layer", "1", "--dataset", "nope")
    assert rc == 2 and "unknown dataset(s) ['nope']" in err and str(small_registry) in err, err
    assert "['oo', 'te', 'tr']" in err


# ------------------------------------------------------------------------------- model, SAE and lake


@pytest.fixture
def extracted(tiny_profile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """One train dataset (named after a dataset partition), one text far over max_tokens, extracted at layer 1."""
    from dagster_project.config import load_profile
    from dagster_project.resources import resources_for

    (name,) = dataset_partition_names(1)
    rows = [*ROWS, {"id": "long", "text": " ".join(["alignment faking is a strategy"] * 120), "label": "pos"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("FEATURELAKE_DATASETS", str(_registry(tmp_path, [_entry(name, "d.jsonl")])))
    resources = resources_for(load_profile(), str(tmp_path / "lake"))
    assert _materialize(samples, name, resources).success
    result = _materialize(activations, multi_key(1, name), resources)
    assert result.success
    (mat,) = result.asset_materializations_for_node("activations")
    return {"name": name, "resources": resources, "lake": resources["lake"].lake, "meta": mat.metadata}


def test_text_over_the_context_length_is_truncated_and_counted(extracted: dict[str, Any]) -> None:
    lake, name = extracted["lake"], extracted["name"]
    assert extracted["meta"]["truncated_texts"].value == 1  # counted, not an error
    tokens = lake.read("tokens", dataset=name).to_pylist()
    long_id = len(ROWS)  # the last sample
    positions = [t["token_pos"] for t in tokens if t["sample_id"] == long_id]
    assert positions == list(range(64))  # max_tokens of the tiny profile
    assert {r["sample_id"] for r in lake.read("activations", 1, name).to_pylist()} >= {long_id}


def test_bad_layer_or_sae_fails_the_extraction_and_keeps_the_stored_partitions(
    extracted: dict[str, Any], tmp_path: Path
) -> None:
    from dagster_project.resources import SAEResource

    lake, name, resources = extracted["lake"], extracted["name"], extracted["resources"]
    stored = _files(lake.base)
    cases = {
        "layer beyond the model": (9, resources["sae"], ["layer 9 is beyond the model", "it has 4 layers"]),
        "SAE with the wrong d_in": (1, SAEResource(source="gemmascope", path=str(
            write_gemmascope(tmp_path / "wide" / "layer_1", TINY_D * 2, 32).parent / "layer_{layer}")),
            ["d_in=128 but the model's residual width is 64", "wide"]),
        "SAE with NaN weights": (1, SAEResource(source="gemmascope", path=str(
            write_gemmascope(tmp_path / "nan" / "layer_1", TINY_D, 32, nan=True).parent / "layer_{layer}")),
            ["params.safetensors: tensor 'w_enc' has NaN or infinite values", "nan"]),
    }
    for what, (layer, sae, expect) in cases.items():
        result = _materialize(activations, multi_key(layer, name), {**resources, "sae": sae}, layers=("1", "9"))
        assert not result.success, what
        msg = failure_message(result)
        assert all(part in msg for part in expect), (what, msg)
        assert _files(lake.base) == stored, what  # the layer-1 partitions and the tokens, untouched


def test_corrupted_parquet_is_named_with_the_command_that_rewrites_it(extracted: dict[str, Any]) -> None:
    from dagster_project.cli import main

    lake, name, resources = extracted["lake"], extracted["name"], extracted["resources"]
    part = lake.file("activations", 1, name)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # a torn file, as a bad copy leaves it
    result = _materialize(feature_stats, "1", resources)
    assert not result.success
    msg = failure_message(result)
    assert str(part) in msg and "not a readable Parquet file" in msg, msg
    assert f"rerun that partition to rewrite it: featurelake backfill --layer 1 --dataset {name}" in msg, msg

    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["sql", "select count(*) from samples"]) == 1  # no view is built over a torn file
    assert str(part) in err.getvalue(), err.getvalue()

    samples_file = lake.file("samples", dataset=name)
    samples_file.write_bytes(b"not parquet")
    result = _materialize(activations, multi_key(1, name), resources)  # rerunning it needs the samples
    assert not result.success
    msg = failure_message(result)
    assert str(samples_file) in msg and "rerun that partition" in msg, msg

    # doing what the messages say repairs the lake
    assert _materialize(samples, name, resources).success
    assert _materialize(activations, multi_key(1, name), resources).success
    assert _materialize(feature_stats, "1", resources).success


def test_activations_metadata_says_where_the_time_went(extracted: dict[str, Any]) -> None:
    """The run's metadata carries the batch budget, padding and the writer threads' busy / wait seconds."""
    meta = {k: v.value for k, v in extracted["meta"].items()}
    assert meta["batch_tokens"] == 512  # the tiny profile's fixed budget
    assert 0 <= meta["padding_fraction"] < 1
    assert meta["packed"] is False  # a CPU run pads (packing needs the GPU kernel)
    assert meta["writer_wait_seconds"] >= 0
    assert meta["writer_close_seconds"] > 0  # the files' closes and fsyncs after the last batch
    for table in ("activations", "token_activations", "residuals"):
        assert meta[f"writer_busy_seconds_{table}"] > 0  # each table's writer thread did work
