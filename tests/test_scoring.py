"""`featurelake score`: a saved probe applied to new texts reproduces the evaluation's scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dagster_project.scoring import ScoreError, check_provenance, read_texts


def test_read_texts_formats(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(["one", {"text": "two"}]))
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n"y"\n')
    (tmp_path / "c.json").write_text(json.dumps({"samples": [{"text": "z", "label": "aligned"}]}))
    assert read_texts(str(tmp_path / "a.json")) == ["one", "two"]
    assert read_texts(str(tmp_path / "b.jsonl")) == ["x", "y"]
    assert read_texts(str(tmp_path / "c.json")) == ["z"]
    assert read_texts("-", stdin_text='["from stdin"]') == ["from stdin"]


def test_read_texts_errors_name_the_row(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ScoreError, match=r"bad.jsonl: line 2: malformed JSON"):
        read_texts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.json").write_text(json.dumps([{"text": "  "}]))
    with pytest.raises(ScoreError, match=r"row 0: field 'text'"):
        read_texts(str(tmp_path / "empty.json"))


def test_probe_of_another_sae_is_refused() -> None:
    class P:
        provenance = {"model_id": "m", "sae_id": "sae-A", "hook": "resid_post", "config_hash": "h", "profile": "p"}

    check_provenance(P(), {"model_id": "m", "sae_id": "sae-A", "hook": "resid_post", "config_hash": "h"}, "x")
    with pytest.raises(ScoreError, match=r"sae_id: probe has 'sae-A', profile has 'sae-B'.*retrain"):
        check_provenance(P(), {"model_id": "m", "sae_id": "sae-B", "hook": "resid_post", "config_hash": "h"}, "x")
