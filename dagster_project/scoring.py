"""Apply a saved probe to new texts: extraction with the active profile, then the probe's own transform.

A probe is saved with everything needed to apply it (feature ids, weights, transform, scaler, thresholds)
and the provenance of the activations it was trained on (model, SAE, hook, config hash, layer, profile).
A probe whose model or SAE differs from the active profile's is refused: its features would mean nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dagster_project.config import Profile
from dagster_project.lib.lake import Lake, local_copy
from dagster_project.lib.probes import FittedProbe, dense_design, load_probe
from dagster_project.lib.provenance_record import SCORE_KEYS, ProvenanceRecord


class ScoreError(ValueError):
    """The probe cannot be applied (not found, or made with another model / SAE / config), or bad input."""


@dataclass
class Scored:
    probe_id: str
    layer: int
    scores: list[float]
    flagged: list[bool]
    threshold: float
    n_truncated: int


def find_probe(lake: Lake, probe_id: str, layer: int | None = None) -> tuple[Path, int]:
    """The local folder of a saved probe (in an S3 lake, of a downloaded copy of its layer's folder)."""
    from dagster_project.lib.evaluation import SAVED_DIR, SAVED_MARKER

    root = lake.base / SAVED_DIR
    layers = [layer] if layer is not None else sorted(
        int(p.name.split("=", 1)[1]) for p in root.glob("layer=*") if p.is_dir())
    for lay in layers:
        d = root / f"layer={lay}" / probe_id
        if (d / "probe.json").is_file():
            return local_copy(d.parent, SAVED_MARKER) / probe_id, lay
    known = sorted({p.parent.name for p in root.glob("layer=*/*/probe.json")})
    raise ScoreError(f"no saved probe {probe_id!r} in {root} (materialize `probes` first); saved: {known[:20]}")


def read_texts(path: str, stdin_text: str | None = None) -> list[str]:
    """Texts from a JSON list (strings or objects with ``text``), a ``{"samples": [...]}`` object, or JSONL."""
    where = "stdin" if path == "-" else path
    raw = stdin_text if path == "-" else Path(path).read_text(encoding="utf-8")
    if raw is None:
        raise ScoreError("no input")
    records: list[Any]
    jsonl = where.endswith(".jsonl")
    if not jsonl:
        try:
            doc = json.loads(raw)
            records = doc.get("samples", [doc]) if isinstance(doc, dict) else doc
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # several JSON values, one a line: JSONL
                raise ScoreError(f"{where}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
            jsonl = True
    if jsonl:
        records = []
        for n, line in enumerate(raw.split("\n"), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ScoreError(f"{where}: line {n}: malformed JSON: {e.msg}") from e
    texts = []
    for i, r in enumerate(records):
        text = r.get("text") if isinstance(r, dict) else r
        if not isinstance(text, str) or not text.strip():
            raise ScoreError(f"{where}: row {i}: field 'text' is missing, empty or not a string")
        texts.append(text)
    if not texts:
        raise ScoreError(f"{where}: no texts")
    return texts


def check_provenance(probe: FittedProbe, current: dict[str, Any], probe_id: str) -> None:
    prov = probe.provenance
    differs = ProvenanceRecord.from_dict(prov).differences(ProvenanceRecord.from_dict(current), SCORE_KEYS)
    diffs = [f"{k}: probe has {a!r}, profile has {b!r}" for k, (a, b) in differs.items()]
    if diffs:
        raise ScoreError(
            f"probe {probe_id!r} was trained on activations of another model/SAE/config ({'; '.join(diffs)}). "
            f"Use the profile it was made with (profile {prov.get('profile')!r}) or retrain it."
        )


def score_texts(profile: Profile, lake: Lake, model: Any, sae: Any, probe_id: str, texts: Sequence[str],
                layer: int | None = None) -> Scored:
    """Score ``texts`` with a saved probe. ``model`` / ``sae`` are the profile's resources."""
    from dagster_project.lib.extraction import extract, tokenize

    path, layer = find_probe(lake, probe_id, layer)
    probe = load_probe(path)
    lm = model.load()
    loaded = sae.load(layer, lake, device=str(lm.device), d_model=lm.d_model)
    import torch

    loaded.to(lm.device, getattr(torch, model.sae_dtype))
    current = {"model_id": model.model_id, "sae_id": loaded.sae_id, "hook": sae.hook,
               "config_hash": profile.config_hash()}
    check_provenance(probe, current, probe_id)
    items = tokenize(lm.tokenizer, list(texts), list(range(len(texts))), model.max_tokens)
    dense = probe.spec.is_dense
    token = probe.spec.is_token
    if token and dense:
        raise ScoreError(f"probe {probe_id!r} is a token-level residual probe: `featurelake score` scores pooled "
                         "probes and token-level SAE probes; pick one of those")
    pooled, resid, token_acts = [], [], []
    for out, _stats in extract(lm, {layer: loaded}, items, model.batch_tokens, with_tokens=token,
                               with_residuals=dense):
        lb = out[layer]
        pooled.append(lb.pooled)
        if lb.residuals is not None:
            resid.append(lb.residuals)
        if token and lb.token_acts is not None:
            token_acts.append(lb.token_acts)
    n = len(texts)
    samples = pa.table({"dataset": ["score"] * n, "sample_id": list(range(n)), "is_positive": [False] * n,
                        "label": ["?"] * n})
    if token:
        from dagster_project.lib.token_probes import token_matrix_from_rows

        ta = pa.concat_tables(token_acts) if token_acts else None
        col = {int(f): i for i, f in enumerate(probe.spec.feature_ids)}
        keep = [] if ta is None else [i for i, f in enumerate(ta.column("feature_id").to_pylist()) if f in col]
        ta = ta.take(keep) if ta is not None else None
        lengths = [max(t.n_real, 1) for t in sorted(items, key=lambda t: t.sample_id)]
        X = token_matrix_from_rows(
            lengths, [] if ta is None else ta.column("sample_id").to_pylist(),
            [] if ta is None else ta.column("token_pos").to_pylist(),
            [] if ta is None else [col[int(f)] for f in ta.column("feature_id").to_pylist()],
            [] if ta is None else ta.column("act").to_pylist(), len(col))
        scores = probe.decision_function(X)
    elif dense:
        res = pa.concat_tables(resid)
        res = res.append_column("dataset", pa.array(["score"] * res.num_rows))
        Xd, _, _keys = dense_design(res, samples, probe.spec.pooling)
        scores = probe.decision_function(Xd)
    else:
        rows = pa.concat_tables(pooled)
        rows = rows.append_column("dataset", pa.array(["score"] * rows.num_rows))
        scores, _keys = probe.score_rows(rows, samples)
    threshold = float(getattr(probe, "train_threshold", 0.0) or 0.0)
    s = [float(x) for x in np.asarray(scores)]
    return Scored(probe_id, layer, s, [x > threshold for x in s], threshold, sum(t.truncated for t in items))
