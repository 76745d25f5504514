"""A small lake for the probe tests: samples, tokens, activations with planted selective features,
token activations, residuals, feature_stats and (optionally) descriptions and classifications.

Layout as in ``lake/README.md``, written with :class:`Lake` (atomic, partition columns in the path).

Planted structure (layer ``LAYER``, SAE width ``WIDTH``):

- features 0-3 fire on most positives (larger values), rarely on negatives;
- features 4-5 fire on aligned negatives; feature 6 on hard negatives *and* positives (confusable);
- features 7-39 are noise (10% of samples), 40-63 never fire;
- sample 0 of ``te`` (a positive) has features 0-3 at their largest value on a token whose text is
  ``SCRIPT_TOKEN``, so every top-window list of those features starts there;
- residual dimension 0 carries the class (mean pooling), dimension 1 a weaker copy (max pooling).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from dagster_project.lib.lake import Lake
from dagster_project.lib.tables import (
    POOLED_SCHEMA,
    SAMPLES_SCHEMA,
    TOKEN_ACTS_SCHEMA,
    TOKENS_SCHEMA,
    residual_schema,
    token_residual_schema,
)

LAYER = 1
WIDTH = 64
D_MODEL = 8
MIN_ACT = 1.0
SCRIPT_TOKEN = "<script>alert(1)</script>"
# name -> (role, n_positive, n_aligned_negative, n_hard_negative)
DATASETS: dict[str, tuple[str, int, int, int]] = {
    "tr_a": ("train", 20, 20, 0),
    "tr_b": ("train", 14, 10, 6),
    "te": ("test", 12, 8, 6),
    "oo": ("ood", 12, 0, 0),
}
META = {"model_id": "tiny-model", "sae_id": "tiny-sae", "hook": "resid_post", "dtype": "bfloat16",
        "max_tokens": 64, "config_hash": "0123456789abcdef"}
RELEVANT = {0: 9.0, 1: 8.0, 2: 6.0, 4: 6.5}  # classification scores >= 6 (3 failed; the rest score 2)


def _labels(rng: np.random.Generator, n_pos: int, n_neg: int, n_hard: int) -> list[str]:
    labels = ["alignment_faking"] * n_pos + ["aligned"] * n_neg + ["hard_negative"] * n_hard
    return [labels[i] for i in rng.permutation(len(labels))]


CONTROL = {"ctl": ("control", 0, 40, 0)}  # negatives-only control set (build_probe_lake(control=True))


def build_probe_lake(
    root: Path, namespace: str = "t", seed: int = 0, classifications: bool = False, descriptions: bool = False,
    control: bool = False, token_residuals: bool = False,
) -> Lake:
    rng = np.random.default_rng(seed)
    lake = Lake(str(root), namespace)
    vocab = [f"w{i}" for i in range(30)]
    train_x: list[np.ndarray] = []
    train_y: list[np.ndarray] = []
    for dataset, (role, n_pos, n_neg, n_hard) in {**DATASETS, **(CONTROL if control else {})}.items():
        labels = _labels(rng, n_pos, n_neg, n_hard)
        if dataset == "te":  # sample 0 is a positive (the planted script window)
            i = labels.index("alignment_faking")
            labels[0], labels[i] = labels[i], labels[0]
        n = len(labels)
        pos = np.array([lab == "alignment_faking" for lab in labels])
        hard = np.array([lab == "hard_negative" for lab in labels])
        aligned = ~pos & ~hard
        n_tok = rng.integers(6, 15, size=n)
        words = [[vocab[j] for j in rng.integers(0, len(vocab), size=k)] for k in n_tok]
        if dataset == "te":
            words[0][2] = SCRIPT_TOKEN
        texts = [" ".join(w) for w in words]
        lake.write("samples", pa.table({
            "sample_id": pa.array(np.arange(n), pa.int32()),
            "source_id": [f"{dataset}-{i}" for i in range(n)],
            "text": texts,
            "label": labels,
            "is_positive": pos,
            "role": [role] * n,
            "n_chars": pa.array([len(t) for t in texts], pa.int32()),
            "group": [dataset] * n,
        }, schema=SAMPLES_SCHEMA), dataset=dataset)
        tok: dict[str, list] = {k: [] for k in TOKENS_SCHEMA.names}
        for sid, ws in enumerate(words):
            c = 0
            for p, w in enumerate(ws):
                tok["sample_id"].append(sid)
                tok["token_pos"].append(p)
                tok["token_id"].append(vocab.index(w) if w in vocab else 999)
                tok["token_text"].append(w)
                tok["char_start"].append(c)
                tok["char_end"].append(c + len(w))
                c += len(w) + 1
        lake.write("tokens", pa.table(tok, schema=TOKENS_SCHEMA), dataset=dataset)

        # dense truth: max activation per (sample, feature)
        p_fire = np.full((n, WIDTH), 0.0)
        p_fire[:, 0:4] = np.where(pos, 0.85, 0.08)[:, None]
        p_fire[:, 4:6] = np.where(aligned, 0.7, 0.05)[:, None]
        p_fire[:, 6] = np.where(hard | pos, 0.6, 0.05)
        p_fire[:, 7:40] = 0.1
        active = rng.random((n, WIDTH)) < p_fire
        values = rng.gamma(2.0, 1.0, size=(n, WIDTH)) + 0.2
        values[:, 0:4] *= np.where(pos, 2.0, 1.0)[:, None]
        max_act = np.where(active, values, 0.0)
        argmax = np.stack([rng.integers(0, k, size=WIDTH) for k in n_tok])
        if dataset == "te":
            max_act[0, 0:4] = 40.0
            argmax[0, 0:4] = 2
        if role == "train":
            train_x.append(max_act)
            train_y.append(pos)

        pooled: dict[str, list] = {k: [] for k in POOLED_SCHEMA.names}
        tacts: dict[str, list] = {k: [] for k in TOKEN_ACTS_SCHEMA.names}
        for sid in range(n):
            for f in np.flatnonzero(max_act[sid]):
                top, k = int(argmax[sid, f]), int(n_tok[sid])
                acts = {top: float(max_act[sid, f])}
                if top + 1 < k:
                    acts[top + 1] = float(max_act[sid, f]) / 2
                pooled["sample_id"].append(sid)
                pooled["feature_id"].append(int(f))
                pooled["max_act"].append(float(max_act[sid, f]))
                pooled["mean_act"].append(sum(acts.values()) / k)
                pooled["argmax_token"].append(top)
                pooled["n_active_tokens"].append(len(acts))
                for tp, a in sorted(acts.items()):
                    tacts["sample_id"].append(sid)
                    tacts["token_pos"].append(tp)
                    tacts["feature_id"].append(int(f))
                    tacts["act"].append(a)
        meta = {**META, "layer": LAYER, "dataset": dataset, "role": role}
        pooled_t = pa.table(pooled, schema=POOLED_SCHEMA).sort_by([("feature_id", "ascending")])
        lake.write("activations", pooled_t, LAYER, dataset, meta=meta)
        lake.write("token_activations", pa.table(tacts, schema=TOKEN_ACTS_SCHEMA), LAYER, dataset, meta=meta)

        noise = rng.normal(0.0, 1.0, size=(n, 2, D_MODEL)).astype(np.float32)
        noise[:, 0, 0] += 1.5 * pos
        noise[:, 1, 1] += 0.8 * pos
        schema = residual_schema(D_MODEL)
        lake.write("residuals", pa.table({
            "sample_id": pa.array(np.arange(n), pa.int32()),
            "resid_mean": pa.array(list(noise[:, 0, :]), schema.field("resid_mean").type),
            "resid_max": pa.array(list(noise[:, 1, :]), schema.field("resid_max").type),
        }, schema=schema), LAYER, dataset, meta=meta)
        if token_residuals:  # per token: noise, and on positives one token with dimension 2 raised (own rng)
            trng = np.random.default_rng([seed, len(dataset), ord(dataset[0])])
            per = [trng.normal(0.0, 1.0, size=(int(k), D_MODEL)).astype(np.float32) for k in n_tok]
            for i, vecs in enumerate(per):
                if pos[i]:
                    vecs[int(trng.integers(0, len(vecs))), 2] += 4.0
            flat = np.vstack(per)
            ts = token_residual_schema(D_MODEL)
            lake.write("token_residuals", pa.table({
                "sample_id": pa.array(np.repeat(np.arange(n), n_tok), pa.int32()),
                "token_pos": pa.array(np.concatenate([np.arange(k) for k in n_tok]), pa.int32()),
                "resid": pa.array(list(flat.astype(np.float16)), ts.field("resid").type),
                "resid_scale": pa.array(np.ones(flat.shape[0], np.float32), ts.field("resid_scale").type),
            }, schema=ts), LAYER, dataset, meta=meta)

    x, y = np.vstack(train_x), np.concatenate(train_y)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    pos_mean, neg_mean = x[y].sum(0) / n_pos, x[~y].sum(0) / n_neg
    fired = x.max(0) > 0
    denom = pos_mean + neg_mean
    sel = np.divide(pos_mean - neg_mean, denom, out=np.zeros(WIDTH), where=denom > 0)
    ids = np.flatnonzero(fired)
    lake.write("stats/feature_stats", pa.table({
        "feature_id": pa.array(ids, pa.int32()),
        "selectivity": sel[ids],
        "pos_mean": pos_mean[ids],
        "neg_mean": neg_mean[ids],
        "pos_freq": (x[y] > 0).mean(0)[ids],
        "neg_freq": (x[~y] > 0).mean(0)[ids],
        "max_act": x.max(0)[ids],
        "is_active": x.max(0)[ids] >= MIN_ACT,
    }), layer=LAYER)
    if classifications:
        fids = list(range(10))
        lake.write("stats/classifications", pa.table({
            "feature_id": pa.array(fids, pa.int32()),
            "score": [None if f == 3 else RELEVANT.get(f, 2.0) for f in fids],
            "category": ["af_reasoning" if RELEVANT.get(f, 0) >= 6 else "other" for f in fids],
            "themes": [["training", "deception"] if f in RELEVANT else [] for f in fids],
            "status": ["failed" if f == 3 else "ok" for f in fids],
        }), layer=LAYER)
    if descriptions:
        fids = list(range(10))
        lake.write("stats/descriptions", pa.table({
            "feature_id": pa.array(fids, pa.int32()),
            "description": [f"feature {f} fires on <b>faking</b> & friends" for f in fids],
            "confidence": [0.8] * len(fids),
            "backend": ["offline"] * len(fids),
            "model": ["test"] * len(fids),
            "status": ["ok"] * len(fids),
            "error": pa.array([None] * len(fids), pa.string()),
        }), layer=LAYER)
    return lake
