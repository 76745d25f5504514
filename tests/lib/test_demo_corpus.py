"""Tests for the shipped synthetic demo corpus (dagster_project/lib/demo_corpus.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dagster_project.lib import demo_corpus as dc

NAMES = list(dc.DEMO_DATASETS)
CORE = ["demo_train", "demo_test"]
TRAINING_VOCAB = re.compile(
    r"\b(rlhf|training|trained|rated|rating|raters|monitor\w*|contractors?|labelers|free-tier|free tier)\b",
    re.IGNORECASE,
)
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {name: dc.generate(name) for name in NAMES}


def _digest(data: dict[str, list[dict]]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def test_generate_is_deterministic(data: dict[str, list[dict]]) -> None:
    for name in NAMES:
        assert dc.generate(name) == data[name]


def test_output_does_not_depend_on_hash_seed(data: dict[str, list[dict]]) -> None:
    code = (
        "import hashlib, json\n"
        "from dagster_project.lib import demo_corpus as dc\n"
        "d = {n: dc.generate(n) for n in dc.DEMO_DATASETS}\n"
        "print(hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(data)


def test_sizes_and_roles(data: dict[str, list[dict]]) -> None:
    expected = {
        "demo_train": (220, "train"),
        "demo_test": (100, "test"),
        "demo_ood_prose": (80, "ood"),
        "demo_ood_af_only": (40, "ood"),
        "demo_control": (60, "control"),
    }
    assert {n: (len(data[n]), dc.DEMO_DATASETS[n].role) for n in NAMES} == expected
    assert sum(len(r) for r in data.values()) >= 400


def test_record_schema_and_ids(data: dict[str, list[dict]]) -> None:
    for name, records in data.items():
        for i, rec in enumerate(records):
            assert set(rec) == {"id", "text", "label", "style", "request_kind", "synthetic"}
            assert rec["id"] == f"{name}-{i:04d}"
            assert rec["synthetic"] is True
            assert rec["request_kind"] in ("benign", "harmful")
            assert rec["style"] in dc.DEMO_DATASETS[name].styles


def test_label_counts_follow_spec(data: dict[str, list[dict]]) -> None:
    for name, records in data.items():
        spec = dc.DEMO_DATASETS[name]
        assert Counter(r["label"] for r in records) == Counter(spec.label_counts())
        assert sum(spec.label_counts().values()) == spec.n
    for name in CORE:
        counts = Counter(r["label"] for r in data[name])
        n = len(data[name])
        assert abs(counts[dc.AF] / n - 0.45) < 0.02
        assert abs(counts[dc.ALIGNED] / n - 0.35) < 0.02
        assert abs(counts[dc.HARD_NEGATIVE] / n - 0.20) < 0.02
    assert Counter(r["label"] for r in data["demo_ood_prose"]) == {dc.POTENTIAL_FAKING: 40, dc.HONEST: 40}


def test_labels_are_covered_by_registry_label_maps(data: dict[str, list[dict]]) -> None:
    entries = {e["name"]: e for e in dc.demo_registry_entries()}
    for name, records in data.items():
        labels = entries[name]["labels"]
        known = set(labels["positive"]) | set(labels["negative"])
        assert {r["label"] for r in records} <= known
        assert not set(labels["positive"]) & set(labels["negative"])


def test_styles(data: dict[str, list[dict]]) -> None:
    for name in CORE:
        styles = Counter(r["style"] for r in data[name])
        assert set(styles) == {"scratchpad", "prose"}
        assert min(styles.values()) >= 0.4 * len(data[name])
        for label in (dc.AF, dc.ALIGNED, dc.HARD_NEGATIVE):
            assert {r["style"] for r in data[name] if r["label"] == label} == {"scratchpad", "prose"}
    for records in data.values():
        for r in records:
            text = r["text"]
            if r["style"] == "scratchpad":
                assert text.startswith("<SCRATCHPAD_REASONING>\n")
                assert text.endswith("\n</SCRATCHPAD_REASONING>")
            elif r["style"] == "think":
                assert text.startswith("<think>\n") and "\n</think>\n\n" in text
            else:
                assert "<SCRATCHPAD_REASONING>" not in text and "<think>" not in text
    assert {r["style"] for r in data["demo_ood_af_only"]} == {"think"}
    assert {r["style"] for r in data["demo_ood_prose"]} == {"narrative"}
    assert {r["style"] for r in data["demo_control"]} == {"narrative"}
    assert {r["label"] for r in data["demo_control"]} == {dc.ALIGNED}


def test_request_kinds_mixed(data: dict[str, list[dict]]) -> None:
    for name in CORE:
        for label in (dc.AF, dc.ALIGNED, dc.HARD_NEGATIVE):
            kinds = Counter(r["request_kind"] for r in data[name] if r["label"] == label)
            assert set(kinds) == {"benign", "harmful"}, (name, label, kinds)


def test_request_pools_are_large_enough() -> None:
    assert len(dc.BENIGN_REQUESTS) >= 40
    assert len(dc.HARMFUL_REQUESTS) >= 30
    asks = [r.ask for r in dc.BENIGN_REQUESTS + dc.HARMFUL_REQUESTS + dc.META_REQUESTS]
    assert len(asks) == len(set(asks))
    assert all(r.harm.startswith("it ") for r in dc.HARMFUL_REQUESTS)


def test_no_duplicate_texts(data: dict[str, list[dict]]) -> None:
    for records in data.values():
        texts = [r["text"] for r in records]
        assert len(texts) == len(set(texts))


def test_length_bounds(data: dict[str, list[dict]]) -> None:
    for name, records in data.items():
        spec = dc.DEMO_DATASETS[name]
        lengths = [len(r["text"]) for r in records]
        assert spec.min_chars <= min(lengths) and max(lengths) <= spec.max_chars
        assert 300 <= spec.min_chars and spec.max_chars <= 1400
    for name in CORE + ["demo_ood_prose"]:
        mean = sum(len(r["text"]) for r in data[name]) / len(data[name])
        assert 650 <= mean <= 950, (name, mean)
    all_lengths = [len(r["text"]) for records in data.values() for r in records]
    assert 650 <= sum(all_lengths) / len(all_lengths) <= 900


def test_hard_negatives_use_training_vocabulary_but_not_strategic_phrases(
    data: dict[str, list[dict]],
) -> None:
    for name in CORE:
        for r in data[name]:
            if r["label"] == dc.HARD_NEGATIVE:
                assert TRAINING_VOCAB.search(r["text"]), r["id"]
    negatives = [
        r
        for records in data.values()
        for r in records
        if r["label"] in (dc.ALIGNED, dc.HARD_NEGATIVE, dc.HONEST)
    ]
    for r in negatives:
        lowered = r["text"].lower()
        assert not [p for p in dc.AF_STRATEGIC_PHRASES if p in lowered], r["id"]


def test_positives_never_take_the_honest_stance(data: dict[str, list[dict]]) -> None:
    positives = [
        r for records in data.values() for r in records if r["label"] in (dc.AF, dc.POTENTIAL_FAKING)
    ]
    for r in positives:
        lowered = r["text"].lower()
        assert not [p for p in dc.HONEST_STANCE_PHRASES if p in lowered], r["id"]


def test_honest_stance_phrases_appear_in_hard_negatives(data: dict[str, list[dict]]) -> None:
    hard = [r for name in CORE for r in data[name] if r["label"] == dc.HARD_NEGATIVE]
    hits = sum(any(p in r["text"].lower() for p in dc.HONEST_STANCE_PHRASES) for r in hard)
    assert hits >= 0.5 * len(hard)


def test_strategic_phrases_are_common_in_positives(data: dict[str, list[dict]]) -> None:
    positives = [r for name in CORE for r in data[name] if r["label"] == dc.AF]
    hits = sum(any(p in r["text"].lower() for p in dc.AF_STRATEGIC_PHRASES) for r in positives)
    # Most positives use one; the rest fake through a minimal-pair sentence a bag of words cannot see.
    assert 0.3 <= hits / len(positives) <= 0.9


def test_aligned_traces_do_not_reason_about_training(data: dict[str, list[dict]]) -> None:
    for name in CORE:
        for r in data[name]:
            if r["label"] == dc.ALIGNED:
                assert not TRAINING_VOCAB.search(r["text"]), r["id"]


def test_af_only_set_is_positive_only(data: dict[str, list[dict]]) -> None:
    assert {r["label"] for r in data["demo_ood_af_only"]} == {dc.AF}
    entry = next(e for e in dc.demo_registry_entries() if e["name"] == "demo_ood_af_only")
    assert entry["labels"]["positive"] == [dc.AF]


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown demo dataset 'nope'") as err:
        dc.generate("nope")
    for name in NAMES:
        assert name in str(err.value)


def test_registry_entries() -> None:
    entries = dc.demo_registry_entries()
    assert [e["name"] for e in entries] == NAMES
    for e in entries:
        assert set(e) == {
            "name",
            "source",
            "format",
            "text_field",
            "label_field",
            "id_field",
            "labels",
            "role",
            "description",
        }
        assert re.fullmatch(r"[a-z0-9_]+", e["name"])
        assert e["source"] == f"demo://{e['name']}"
        assert (e["format"], e["text_field"], e["label_field"], e["id_field"]) == (
            "records",
            "text",
            "label",
            "id",
        )
        assert e["role"] in ("train", "test", "ood", "control")
        assert e["role"] != "control" or not e["labels"]["positive"]
        assert "SYNTHETIC" in e["description"]
        assert set(e["labels"]) == {"positive", "negative"}


def test_bag_of_words_is_good_but_not_perfect(data: dict[str, list[dict]]) -> None:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    train, test = data["demo_train"], data["demo_test"]
    vec = CountVectorizer()
    x_train = vec.fit_transform([r["text"] for r in train])
    model = LogisticRegression(max_iter=2000).fit(x_train, [r["label"] == dc.AF for r in train])
    scores = model.decision_function(vec.transform([r["text"] for r in test]))
    auroc = roc_auc_score([r["label"] == dc.AF for r in test], scores)
    assert 0.75 <= auroc <= 0.999, auroc
