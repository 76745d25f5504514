"""The dataset registry and loader (dagster_project/lib/datasets.py).

The shared-data tests recompute every expected number from the raw files with plain ``json``; the bad-input
tests write one broken file each into ``tmp_path`` and check that the error names the file, the row or line
and the field.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from dagster_project.lib import datasets as ds
from dagster_project.lib.datasets import DatasetError, get_spec, load_dataset, parse_registry
from dagster_project.lib.tables import SAMPLES_SCHEMA

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_REGISTRY = REPO_ROOT / "registries" / "shared_af.yaml"
DEMO_REGISTRY = REPO_ROOT / "registries" / "demo.yaml"
SHARED_DATA = (SHARED_REGISTRY.parent / "../../shared/data").resolve()

needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} not present"
)

# name -> (file under shared/data, shape, text field, {raw label: is_positive}, role, default label)
SHARED: dict[str, tuple[str, str, str, dict[str, bool], str, str | None]] = {
    "gold_alt": (
        "bigsnarfdude__autointerp/gold_alt.json",
        "samples",
        "text",
        {"alignment_faking": True, "aligned": False},
        "train",
        None,
    ),
    "gold770": (
        "bigsnarfdude__autointerp/vocab_constrained_gold770.json",
        "samples",
        "original_text",
        {"alignment_faking": True, "aligned": False},
        "train",
        None,
    ),
    "vocab_constrained_af": (
        "bigsnarfdude__autointerp/vocab_constrained_af.json",
        "samples",
        "text",
        {"alignment_faking": True, "aligned": False},
        "test",
        None,
    ),
    "supermix": (
        "bigsnarfdude__autointerp/vocab_constrained_supermix.json",
        "samples",
        "original_text",
        {"alignment_faking": True},
        "train",
        None,
    ),
    "opus46_500": (
        "bigsnarfdude__autointerp/opus46_500.json",
        "samples",
        "text",
        {"alignment_faking": True},
        "train",
        None,
    ),
    "sycophant": (
        "bigsnarfdude__detector/sycophant_hf_dataset.json",
        "samples",
        "text",
        {"alignment_faking": True},
        "train",
        None,
    ),
    "detector_test": (
        "bigsnarfdude__detector/test_samples.jsonl",
        "jsonl",
        "text",
        {"alignment_faking": True, "aligned": False, "hard_negative": False},
        "test",
        None,
    ),
    "detector_baseline": (
        "bigsnarfdude__detector/baseline_samples.jsonl",
        "jsonl",
        "text",
        {"aligned": False},
        "control",
        None,
    ),
    "lightbright": (
        "bigsnarfdude__lightbright/af_test_samples.json",
        "samples",
        "text",
        {"alignment_faking": True, "aligned": False},
        "test",
        None,
    ),
    "sonar_deceptive": (
        "bigsnarfdude__thoughtSonar/eval_deceptive.jsonl",
        "jsonl",
        "scratchpad",
        {"deceptive": True},
        "ood",
        None,
    ),
    "sonar_honest": (
        "bigsnarfdude__thoughtSonar/eval_honest.jsonl",
        "jsonl",
        "scratchpad",
        {"honest": False},
        "control",
        "honest",
    ),
}
EXCLUDES = {"gold770": ["gold_alt"], "supermix": ["gold_alt", "gold770"], "detector_baseline": ["detector_test"]}


def _raw_rows(file: str, shape: str) -> list[dict[str, Any]]:
    path = SHARED_DATA / file
    if shape == "jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))["samples"]


def _expected(name: str) -> tuple[list[str], list[str], int, int]:
    """(texts in order, raw labels, n exact duplicates, n excluded overlaps), computed without the loader."""
    file, shape, field, _, _, default = SHARED[name]
    excluded: set[str] = set()
    if name in EXCLUDES:
        excluded = {" ".join(t.split()) for other in EXCLUDES[name] for t in _expected(other)[0]}
    texts, labels, seen = [], [], set()
    n_dup = n_excl = 0
    for row in _raw_rows(file, shape):
        text = row[field]
        if text in seen:
            n_dup += 1
            continue
        if " ".join(text.split()) in excluded:
            n_excl += 1
            continue
        seen.add(text)
        texts.append(text)
        labels.append(row.get("label") or default)
    return texts, labels, n_dup, n_excl


@pytest.fixture(scope="module")
def shared_specs() -> dict[str, ds.DatasetSpec]:
    return parse_registry(SHARED_REGISTRY)


# ------------------------------------------------------------------------------------- shared registry


def test_shared_registry_lists_the_expected_datasets(shared_specs: dict[str, ds.DatasetSpec]) -> None:
    assert sorted(shared_specs) == sorted(SHARED), f"{SHARED_REGISTRY}: dataset names differ"


@needs_shared
@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_dataset_loads_with_exact_rows(name: str, shared_specs: dict[str, ds.DatasetSpec]) -> None:
    spec = shared_specs[name]
    file, _, field, label_map, role, default = SHARED[name]
    assert Path(spec.resolve_source()) == SHARED_DATA / file, f"{SHARED_REGISTRY}, {name}: field 'source'"
    assert spec.text_field == field, f"{SHARED_REGISTRY}, {name}: field 'text_field'"
    assert spec.role == role, f"{SHARED_REGISTRY}, {name}: field 'role'"
    assert spec.default_label == default, f"{SHARED_REGISTRY}, {name}: field 'default_label'"
    assert {**dict.fromkeys(spec.positive, True), **dict.fromkeys(spec.negative, False)} == label_map, (
        f"{SHARED_REGISTRY}, {name}: field 'labels'"
    )

    loaded = load_dataset(spec, shared_specs)
    texts, labels, n_dup, n_excl = _expected(name)
    t = loaded.table
    assert t.schema == SAMPLES_SCHEMA
    assert t.num_rows == len(texts), f"{name}: {t.num_rows} rows, expected {len(texts)}"
    assert loaded.n_read == len(_raw_rows(file, SHARED[name][1]))
    assert (loaded.n_duplicates, loaded.n_excluded_overlap) == (n_dup, n_excl), name
    assert t.column("text").to_pylist() == texts, f"{name}: texts or their order differ from the file"
    assert t.column("sample_id").to_pylist() == list(range(len(texts)))
    assert t.column("label").to_pylist() == labels, f"{name}: raw labels not kept"
    assert t.column("is_positive").to_pylist() == [label_map[x] for x in labels]
    assert set(t.column("role").to_pylist()) == {role}
    assert t.column("n_chars").to_pylist() == [len(x) for x in texts]
    assert loaded.label_counts == dict(Counter(labels))
    assert loaded.n_positive == sum(label_map[x] for x in labels)


@needs_shared
def test_shared_datasets_known_counts(shared_specs: dict[str, ds.DatasetSpec]) -> None:
    """The numbers the data README states, as a cross-check of the recomputation above."""
    got = {n: load_dataset(s, shared_specs) for n, s in shared_specs.items()}
    assert got["gold_alt"].table.num_rows == 198
    assert got["gold_alt"].label_counts == {"alignment_faking": 98, "aligned": 100}
    assert (got["sycophant"].n_read, got["sycophant"].n_duplicates, got["sycophant"].table.num_rows) == (
        319,
        47,
        272,
    )
    honest = _raw_rows(SHARED["sonar_honest"][0], "jsonl")
    assert sum("label" not in r for r in honest) == 121
    assert got["sonar_honest"].table.num_rows == 300
    assert got["sonar_honest"].label_counts == {"honest": 300}
    # gold770 minus its overlap with gold_alt: none of its texts is a gold_alt text
    gold_alt = {" ".join(t.split()) for t in got["gold_alt"].table.column("text").to_pylist()}
    g770 = got["gold770"]
    assert g770.n_read == 200 and g770.n_excluded_overlap > 0
    assert g770.table.num_rows == 200 - g770.n_excluded_overlap
    assert not gold_alt & {" ".join(t.split()) for t in g770.table.column("text").to_pylist()}
    assert {n: d.spec.role for n, d in got.items() if d.spec.positive_only} == {
        "supermix": "train",
        "opus46_500": "train",
        "sycophant": "train",
        "sonar_deceptive": "ood",
    }
    # negatives-only sets are the controls; groups follow the source field where the registry names one
    assert {n for n, d in got.items() if d.spec.role == "control"} == {"sonar_honest", "detector_baseline"}
    assert all(d.n_positive == 0 for d in got.values() if d.spec.role == "control")
    assert dict(Counter(got["gold_alt"].table.column("group").to_pylist())) == {
        "gold_alt/train": 106, "gold_alt/benchmark": 53, "gold_alt/model_organism": 27, "gold_alt/sycophant": 12}
    assert set(got["opus46_500"].table.column("group").to_pylist()) == {"opus46_500"}
    assert got["detector_baseline"].table.num_rows == 5  # minus the 5 texts it shares with detector_test
    assert {n for n, d in got.items() if d.spec.train_as_negatives} == {"sonar_honest", "detector_baseline"}


def test_demo_registry_loads_all_five() -> None:
    specs = parse_registry(DEMO_REGISTRY)
    assert sorted(specs) == ["demo_control", "demo_ood_af_only", "demo_ood_prose", "demo_test", "demo_train"]
    assert {n: s.role for n, s in specs.items()} == {
        "demo_train": "train",
        "demo_test": "test",
        "demo_ood_prose": "ood",
        "demo_ood_af_only": "ood",
        "demo_control": "control",
    }
    train = load_dataset(specs["demo_train"], specs).table
    assert set(train.column("group").to_pylist()) == {"demo_train/scratchpad", "demo_train/prose"}
    control = load_dataset(specs["demo_control"], specs)
    assert control.n_positive == 0 and control.table.num_rows == 60
    total = 0
    for name, spec in specs.items():
        loaded = load_dataset(spec, specs)
        t = loaded.table
        total += t.num_rows
        assert t.num_rows > 0, name
        assert len(set(t.column("text").to_pylist())) == t.num_rows, f"{name}: duplicate texts survived"
        assert all(s is not None for s in t.column("source_id").to_pylist()), f"{name}: field 'id' not kept"
        pos = set(spec.positive)
        assert t.column("is_positive").to_pylist() == [x in pos for x in t.column("label").to_pylist()], name
    assert total >= 400


def test_default_registry_is_demo_and_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEATURELAKE_DATASETS", raising=False)
    assert ds.registry_path() == DEMO_REGISTRY
    reg = _registry(tmp_path, [_entry()])
    _jsonl(tmp_path / "d.jsonl", [{"text": "hello there", "label": "pos"}])
    monkeypatch.setenv("FEATURELAKE_DATASETS", str(reg))
    assert ds.registry_path() == reg.resolve()
    assert sorted(parse_registry()) == ["d"]
    assert get_spec("d").source == "d.jsonl"


# ------------------------------------------------------------------------------------------ helpers


def _entry(name: str = "d", source: str = "d.jsonl", fmt: str = "jsonl", **kw: Any) -> dict[str, Any]:
    e = {
        "name": name,
        "source": source,
        "format": fmt,
        "labels": {"positive": ["pos"], "negative": ["neg"]},
        "role": "train",
    }
    e.update(kw)
    return e


def _registry(tmp_path: Path, entries: list[Any], name: str = "registry.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"datasets": entries}), encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _load(reg: Path, name: str = "d") -> ds.LoadedDataset:
    specs = parse_registry(reg)
    return load_dataset(specs[name], specs)


def _error(reg: Path, name: str = "d") -> str:
    with pytest.raises(DatasetError) as ei:
        _load(reg, name)
    return str(ei.value)


ROWS = [
    {"text": "first text", "label": "pos"},
    {"text": "second text", "label": "neg"},
    {"text": "third text", "label": "pos"},
]


# -------------------------------------------------------------------------------------- good inputs


def test_duplicates_dropped_and_counted_raw_labels_kept(tmp_path: Path) -> None:
    rows = [
        *ROWS,
        {"text": "first text", "label": "pos"},
        {"text": "first  text", "label": "pos"},
        {"text": "second text", "label": "neg"},
    ]
    _jsonl(tmp_path / "d.jsonl", rows)
    reg = _registry(tmp_path, [_entry(labels={"positive": ["pos"], "negative": ["neg", "hard"]})])
    loaded = _load(reg)
    t = loaded.table
    assert (loaded.n_read, loaded.n_duplicates, t.num_rows) == (6, 2, 4)
    # only exact duplicates go: a whitespace variant is another sample
    assert t.column("text").to_pylist() == ["first text", "second text", "third text", "first  text"]
    assert t.column("label").to_pylist() == ["pos", "neg", "pos", "pos"]
    assert t.column("is_positive").to_pylist() == [True, False, True, True]
    assert t.column("sample_id").to_pylist() == [0, 1, 2, 3]
    assert loaded.label_counts == {"pos": 3, "neg": 1}


def test_json_list_and_json_samples_formats(tmp_path: Path) -> None:
    (tmp_path / "l.json").write_text(json.dumps(ROWS))
    (tmp_path / "s.json").write_text(json.dumps({"metadata": {}, "samples": ROWS}))
    reg = _registry(tmp_path, [_entry("l", "l.json", "json_list"), _entry("s", "s.json", "json_samples")])
    assert _load(reg, "l").table.column("text").to_pylist() == [r["text"] for r in ROWS]
    assert _load(reg, "s").table.column("text").to_pylist() == [r["text"] for r in ROWS]


def test_relative_source_resolves_against_registry_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "regs").mkdir()
    _jsonl(tmp_path / "data" / "d.jsonl", ROWS)
    reg = _registry(tmp_path / "regs", [_entry(source="../data/d.jsonl")])
    monkeypatch.chdir(tmp_path / "data")  # the working directory must not matter
    assert get_spec("d", parse_registry(reg)).resolve_source() == str(
        (tmp_path / "data" / "d.jsonl").resolve()
    )
    assert _load(reg).table.num_rows == 3


def test_default_label_fills_missing_label_key(tmp_path: Path) -> None:
    _jsonl(
        tmp_path / "d.jsonl",
        [{"text": "a b"}, {"text": "c d", "label": "neg"}, {"text": "e f", "label": None}],
    )
    reg = _registry(tmp_path, [_entry(labels={"negative": ["neg"]}, default_label="neg")])
    t = _load(reg).table
    assert t.column("label").to_pylist() == ["neg", "neg", "neg"]
    assert t.column("is_positive").to_pylist() == [False, False, False]


def test_id_field_kept_as_source_id(tmp_path: Path) -> None:
    _jsonl(tmp_path / "d.jsonl", [{**r, "id": 10 + i} for i, r in enumerate(ROWS)])
    reg = _registry(tmp_path, [_entry(id_field="id")])
    assert _load(reg).table.column("source_id").to_pylist() == ["10", "11", "12"]


def test_jsonl_text_with_unicode_line_separators(tmp_path: Path) -> None:
    """U+2028, U+0085 and form feeds are legal unescaped inside JSON strings; only \\n ends a JSONL record."""
    texts = ["a\u2028b", "c\x85d", "e\x0cf"]
    lines = [json.dumps({"text": t, "label": "pos"}, ensure_ascii=False) for t in texts]
    (tmp_path / "d.jsonl").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8", newline="")
    reg = _registry(tmp_path, [_entry()])
    assert _load(reg).table.column("text").to_pylist() == texts


def test_exclude_overlap_with_drops_shared_texts(tmp_path: Path) -> None:
    _jsonl(tmp_path / "a.jsonl", ROWS)
    _jsonl(
        tmp_path / "b.jsonl",
        [{"text": "first   text\n", "label": "pos"}, {"text": "new text", "label": "neg"}],
    )
    reg = _registry(tmp_path, [_entry("a", "a.jsonl"), _entry("b", "b.jsonl", exclude_overlap_with=["a"])])
    loaded = _load(reg, "b")
    assert loaded.table.column("text").to_pylist() == ["new text"]
    assert (loaded.n_read, loaded.n_excluded_overlap, loaded.n_duplicates) == (2, 1, 0)


def test_fingerprint_tracks_rows_not_description(tmp_path: Path) -> None:
    _jsonl(tmp_path / "d.jsonl", ROWS)
    a = parse_registry(_registry(tmp_path, [_entry(description="one")], "a.yaml"))["d"]
    b = parse_registry(_registry(tmp_path, [_entry(description="two")], "b.yaml"))["d"]
    c = parse_registry(_registry(tmp_path, [_entry(role="test")], "c.yaml"))["d"]
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_hf_source_downloads_through_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    local = _jsonl(tmp_path / "cached.jsonl", ROWS)
    calls: list[dict[str, Any]] = []

    def fake_download(**kw: Any) -> str:
        calls.append(kw)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    reg = _registry(tmp_path, [_entry(source="hf://datasets/owner/repo/sub/file.jsonl")])
    assert _load(reg).table.num_rows == 3
    assert calls == [{"repo_id": "owner/repo", "filename": "sub/file.jsonl", "repo_type": "dataset"}]


# --------------------------------------------------------------------------------------- bad inputs


def test_malformed_json(tmp_path: Path) -> None:
    src = tmp_path / "d.json"
    src.write_text('{"samples": [\n  {"text": "a", "label": "pos"},\n  {"text": "b" "label": "pos"}\n]}')
    msg = _error(_registry(tmp_path, [_entry(source="d.json", fmt="json_samples")]))
    assert str(src) in msg and "malformed JSON" in msg and "line 3" in msg, msg


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text(
        '{"text": "a", "label": "pos"}\n\n{"text": "b", label: "pos"}\n{"text": "c", "label": "pos"}\n'
    )
    msg = _error(_registry(tmp_path, [_entry()]))
    assert f"{src}: line 3: malformed JSON" in msg and "truncated" not in msg, msg


@pytest.mark.parametrize("trailer", ["", "\n", "\n\n"])
def test_truncated_last_jsonl_line(tmp_path: Path, trailer: str) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text(
        '{"text": "a", "label": "pos"}\n{"text": "b", "label": "pos"}\n{"text": "c", "lab' + trailer
    )
    msg = _error(_registry(tmp_path, [_entry()]))
    assert f"{src}: line 3: malformed JSON (truncated last line?)" in msg, msg


def test_jsonl_line_not_an_object(tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "a", "label": "pos"}\n["b", "pos"]\n')
    msg = _error(_registry(tmp_path, [_entry()]))
    assert f"{src}: line 2: expected a JSON object, got list" in msg, msg


@pytest.mark.parametrize(
    ("fmt", "doc", "expect"),
    [
        ("json_samples", ROWS, "format json_samples expects an object with a 'samples' list"),
        ("json_samples", {"data": ROWS}, "format json_samples expects an object with a 'samples' list"),
        ("json_list", {"samples": ROWS}, "format json_list expects a JSON list, got dict"),
    ],
)
def test_json_of_the_wrong_shape(tmp_path: Path, fmt: str, doc: Any, expect: str) -> None:
    src = tmp_path / "d.json"
    src.write_text(json.dumps(doc))
    msg = _error(_registry(tmp_path, [_entry(source="d.json", fmt=fmt)]))
    assert str(src) in msg and expect in msg, msg


def test_json_samples_row_not_an_object(tmp_path: Path) -> None:
    src = tmp_path / "d.json"
    src.write_text(json.dumps({"samples": [ROWS[0], "just a string"]}))
    msg = _error(_registry(tmp_path, [_entry(source="d.json", fmt="json_samples")]))
    assert f"{src}, samples[1]: expected a JSON object, got str" in msg, msg


def test_missing_text_field(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "d.jsonl", [ROWS[0], {"body": "x", "label": "pos"}])
    msg = _error(_registry(tmp_path, [_entry()]))
    assert f"{src}, line 2: missing text field 'text'" in msg and "'body'" in msg, msg


def test_text_field_not_a_string(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "d.jsonl", [ROWS[0], {"text": ["x"], "label": "pos"}])
    msg = _error(_registry(tmp_path, [_entry()]))
    assert f"{src}, line 2: field 'text' is list, expected a string" in msg, msg


def test_missing_label_field(tmp_path: Path) -> None:
    src = tmp_path / "d.json"
    src.write_text(json.dumps({"samples": [ROWS[0], ROWS[1], {"text": "no label here"}]}))
    msg = _error(_registry(tmp_path, [_entry(source="d.json", fmt="json_samples")]))
    assert f"{src}, samples[2]: missing label field 'label'" in msg, msg


def test_unknown_raw_label_lists_mapped_labels(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "d.jsonl", [ROWS[0], {"text": "x y", "label": "maybe"}])
    reg = _registry(tmp_path, [_entry()])
    msg = _error(reg)
    assert f"{src}, line 2: field 'label' has unknown raw label 'maybe'" in msg, msg
    assert "['neg', 'pos']" in msg and str(reg) in msg, msg


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_or_whitespace_text(tmp_path: Path, text: str) -> None:
    src = _jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], {"text": text, "label": "pos"}])
    msg = _error(_registry(tmp_path, [_entry()]))
    assert f"{src}, line 3: field 'text' is empty or whitespace" in msg, msg


def test_non_utf8_bytes_name_the_line(tmp_path: Path) -> None:
    src = tmp_path / "d.jsonl"
    src.write_bytes(
        b'{"text": "ok", "label": "pos"}\n{"text": "ok 2", "label": "pos"}\n'
        b'{"text": "caf\xe9", "label": "pos"}\n'
    )
    msg = _error(_registry(tmp_path, [_entry()]))
    assert f"{src}: line 3: not UTF-8" in msg, msg


def test_duplicate_ids(tmp_path: Path) -> None:
    src = _jsonl(
        tmp_path / "d.jsonl", [{**ROWS[0], "id": "a"}, {**ROWS[1], "id": "b"}, {**ROWS[2], "id": "a"}]
    )
    msg = _error(_registry(tmp_path, [_entry(id_field="id")]))
    assert f"{src}, line 3: field 'id': duplicate id 'a' (first at {src}, line 1)" in msg, msg


def test_missing_id_field(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "d.jsonl", [{**ROWS[0], "id": "a"}, ROWS[1]])
    msg = _error(_registry(tmp_path, [_entry(id_field="id")]))
    assert f"{src}, line 2: missing id field 'id'" in msg, msg


@pytest.mark.parametrize("name", ["../x", "A B", "", "Upper", "x/y", "a" * 65, 7])
def test_unsafe_dataset_name(tmp_path: Path, name: Any) -> None:
    reg = _registry(tmp_path, [_entry(name=name)])
    with pytest.raises(DatasetError, match="unsafe dataset name|missing field 'name'"):
        parse_registry(reg)
    with pytest.raises(DatasetError, match="unsafe dataset name"):
        ds.check_slug(name)


def test_unknown_dataset_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _jsonl(tmp_path / "d.jsonl", ROWS)
    reg = _registry(tmp_path, [_entry()])
    monkeypatch.setenv("FEATURELAKE_DATASETS", str(reg))
    with pytest.raises(DatasetError) as ei:
        get_spec("nope")
    assert "unknown dataset 'nope'" in str(ei.value) and str(reg.resolve()) in str(ei.value)
    assert "['d']" in str(ei.value)
    # with explicit specs, the message names their registry, not the environment's
    other = _registry(tmp_path, [_entry("e")], "other.yaml")
    with pytest.raises(DatasetError, match=str(other)):
        get_spec("nope", parse_registry(other))


def test_registry_file_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATURELAKE_DATASETS", str(tmp_path / "absent.yaml"))
    with pytest.raises(DatasetError, match=r"absent\.yaml does not exist .*FEATURELAKE_DATASETS"):
        parse_registry()


def test_source_file_missing(tmp_path: Path) -> None:
    reg = _registry(tmp_path, [_entry(source="missing/d.jsonl")])
    msg = _error(reg)
    assert str(reg) in msg and "dataset 'd'" in msg and str(tmp_path / "missing" / "d.jsonl") in msg, msg
    assert "does not exist" in msg


@pytest.mark.parametrize(
    ("doc", "expect"),
    [
        ("datasets: [", "not valid YAML"),
        ("[1, 2]", "expected a mapping with a 'datasets:' list"),
        ("datasets: []", "lists no datasets"),
        ("datasets: [3]", r"datasets\[0\]: expected a mapping"),
    ],
)
def test_malformed_registry(tmp_path: Path, doc: str, expect: str) -> None:
    reg = tmp_path / "registry.yaml"
    reg.write_text(doc)
    with pytest.raises(DatasetError, match=expect):
        parse_registry(reg)


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (
            {"labels": {"positive": ["x", "y"], "negative": ["y"]}},
            r"labels \['y'\] are both positive and negative",
        ),
        ({"role": "validation"}, r"field 'role' is 'validation', expected one of \('train', 'test', 'ood', 'control'\)"),
        ({"format": "csv"}, r"field 'format' is 'csv', expected one of"),
        ({"format": None}, "missing field 'format'"),
        ({"source": ""}, "missing field 'source'"),
        ({"labels": {}}, "field 'labels' needs 'positive' and/or 'negative' lists"),
    ({"labels": None}, "missing field 'labels'"),
        ({"labels": {"positive": []}}, "field 'labels' needs 'positive' and/or 'negative' lists"),
        ({"labels": {"positive": "pos"}}, r"field 'labels.positive' must be a list of raw labels, got 'pos'"),
        ({"default_label": "other"}, r"field 'default_label' is 'other', which 'labels' does not map"),
        ({"exclude_overlap_with": ["ghost"]}, "field 'exclude_overlap_with' names unknown dataset 'ghost'"),
        ({"exclude_overlap_with": "d"}, "field 'exclude_overlap_with' must be a list of dataset names"),
        ({"exclude_overlap_with": ["d"]}, "field 'exclude_overlap_with' forms a cycle"),
    ],
)
def test_bad_registry_entry(tmp_path: Path, change: dict[str, Any], expect: str) -> None:
    reg = _registry(tmp_path, [_entry(**change)])
    with pytest.raises(DatasetError, match=expect) as ei:
        parse_registry(reg)
    assert str(reg) in str(ei.value) and "dataset 'd'" in str(ei.value)


def test_exclude_overlap_cycle_between_datasets(tmp_path: Path) -> None:
    reg = _registry(
        tmp_path,
        [
            _entry("a", exclude_overlap_with=["b"]),
            _entry("b", exclude_overlap_with=["c"]),
            _entry("c", exclude_overlap_with=["a"]),
        ],
    )
    with pytest.raises(DatasetError, match=r"forms a cycle through \['a', 'b', 'c'\]"):
        parse_registry(reg)


def test_dataset_defined_twice(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset 'd': dataset name defined twice"):
        parse_registry(_registry(tmp_path, [_entry(), _entry()]))


@pytest.mark.parametrize(
    "source",
    ["hf://datasets/owner", "hf://datasets/owner/repo", "hf://models/o/r/f.jsonl", "hf://owner/repo/f.jsonl"],
)
def test_malformed_hf_source(tmp_path: Path, source: str) -> None:
    msg = _error(_registry(tmp_path, [_entry(source=source)]))
    assert (
        "is not hf://datasets/<owner>/<repo>/<file>" in msg and repr(source) in msg and "dataset 'd'" in msg
    )


def test_unsupported_source_scheme(tmp_path: Path) -> None:
    msg = _error(_registry(tmp_path, [_entry(source="s3://bucket/d.jsonl")]))
    assert "unsupported source scheme" in msg and "'s3://bucket/d.jsonl'" in msg, msg


def test_every_row_excluded_is_an_error(tmp_path: Path) -> None:
    _jsonl(tmp_path / "a.jsonl", ROWS)
    _jsonl(tmp_path / "b.jsonl", ROWS[:1])
    reg = _registry(tmp_path, [_entry("a", "a.jsonl"), _entry("b", "b.jsonl", exclude_overlap_with=["a"])])
    assert "dataset 'b' has no rows" in _error(reg, "b")


def test_registry_group_fields_are_checked(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c", "label": "pos", "src": "one"}\n{"text": "d e f", "label": "neg"}\n')
    reg = _registry(tmp_path, [{**_entry(), "source": str(data), "group_field": "src"}])
    spec = parse_registry(reg)["d"]
    with pytest.raises(DatasetError, match=r"line 2: missing group field 'src'"):
        load_dataset(spec)
    reg = _registry(tmp_path, [{**_entry(), "source": str(data), "group": "Bad Name"}])
    with pytest.raises(DatasetError, match="field 'group'"):
        parse_registry(reg)
    reg = _registry(tmp_path, [{**_entry(), "source": str(data), "role": "control"}])
    with pytest.raises(DatasetError, match="role 'control' is for negatives-only"):
        parse_registry(reg)
    reg = _registry(tmp_path, [{**_entry(), "source": str(data), "train_as_negatives": True}])
    with pytest.raises(DatasetError, match="'train_as_negatives' is for control sets"):
        parse_registry(reg)
    reg = _registry(tmp_path, [{**_entry(), "source": str(data), "labels": {"negative": ["neg"]}, "role": "control",
                                "train_as_negatives": True}])
    assert parse_registry(reg)["d"].train_as_negatives
