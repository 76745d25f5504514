"""A small synthetic lake for the describe assets' tests and benchmark, written with ``Lake.write``.

Samples are lists of filler words; each feature has its own trigger word, planted in samples with a
per-class probability, and fires on that word (and more weakly on the token after it). Tokens, per-token
activations, pooled activations and ``stats/selected_features`` are written in the lake layout, so the
describe SQL runs on it exactly as on a real lake. Everything is seeded and deterministic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from dagster_project.lib.lake import Lake
from dagster_project.lib.tables import POOLED_SCHEMA, SAMPLES_SCHEMA, TOKEN_ACTS_SCHEMA, TOKENS_SCHEMA

FILLER = (
    "the user asks about a topic and I think about how to answer it well with care so that my reply "
    "is clear short useful honest kind direct simple then I write draft check edit send"
).split()

# name -> (role, n_positive, n_negative)
DATASETS: dict[str, tuple[str, int, int]] = {"tr": ("train", 16, 14), "te": ("test", 10, 10), "oo": ("ood", 10, 0)}


@dataclass(frozen=True)
class FeatureSpec:
    """Feature ``feature_id`` fires on ``word``: in each sample of ``datasets`` (None: all) with probability
    ``p_pos`` / ``p_neg`` by class, or in exactly ``count`` samples when given."""

    feature_id: int
    word: str
    p_pos: float = 0.0
    p_neg: float = 0.0
    datasets: tuple[str, ...] | None = None
    count: int | None = None


DEFAULT_FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec(3, "rlhf", 0.75, 0.05),
    FeatureSpec(7, "values", 0.6, 0.1),
    FeatureSpec(11, "comply", 0.6, 0.05),
    FeatureSpec(12, "recipe", 0.05, 0.7),
    FeatureSpec(20, "monitored", 0.5, 0.2),
    FeatureSpec(21, "zanzibar", 0.5, 0.0),
    # fires on every positive of `tr`: its negatives cannot share class and dataset with its anchors
    FeatureSpec(30, "scratchpad", 1.0, 0.0, datasets=("tr",)),
    # fires in 3 samples only: fewer than top_k, no held-out windows
    FeatureSpec(41, "quasar", count=3),
)


@dataclass
class DescribeLake:
    lake: Lake
    layer: int
    features: tuple[FeatureSpec, ...]
    is_positive: dict[tuple[str, int], bool] = field(default_factory=dict)
    n_tokens: dict[tuple[str, int], int] = field(default_factory=dict)
    active: set[tuple[int, str, int]] = field(default_factory=set)  # (feature_id, dataset, sample_id)

    @property
    def feature_ids(self) -> list[int]:
        return [f.feature_id for f in self.features]


def build_describe_lake(
    root: str | Path,
    namespace: str = "t",
    layer: int = 1,
    features: tuple[FeatureSpec, ...] = DEFAULT_FEATURES,
    datasets: dict[str, tuple[str, int, int]] | None = None,
    seed: int = 0,
    min_words: int = 14,
    max_words: int = 40,
) -> DescribeLake:
    """Write samples, tokens, activations, token_activations and selected_features; return what was planted."""
    rng = random.Random(seed)
    datasets = datasets or DATASETS
    lake = Lake(str(root), namespace)
    out = DescribeLake(lake=lake, layer=layer, features=tuple(features))
    word_of = {f.word: f.feature_id for f in features}
    if len(word_of) != len(features) or set(word_of) & set(FILLER):
        raise ValueError("feature words must be distinct and not filler words")
    vocab = {w: i for i, w in enumerate([*FILLER, *word_of])}

    # words of every sample, then the planted trigger words
    texts: dict[str, list[list[str]]] = {}
    classes: dict[str, list[bool]] = {}
    for name, (_, n_pos, n_neg) in datasets.items():
        classes[name] = [True] * n_pos + [False] * n_neg
        rng.shuffle(classes[name])
        texts[name] = [[rng.choice(FILLER) for _ in range(rng.randint(min_words, max_words))] for _ in classes[name]]
    for f in features:
        eligible = [(d, i) for d in datasets if f.datasets is None or d in f.datasets for i in range(len(classes[d]))]
        if f.count is not None:
            chosen = rng.sample(eligible, f.count)
        else:
            chosen = [(d, i) for d, i in eligible if rng.random() < (f.p_pos if classes[d][i] else f.p_neg)]
        for d, i in chosen:
            words = texts[d][i]
            words.insert(rng.randint(1, len(words) - 1), f.word)

    sel_rows = []
    for f in features:
        sel = (f.p_pos - f.p_neg) / (f.p_pos + f.p_neg) if (f.p_pos + f.p_neg) else 0.0
        sel_rows.append({"feature_id": f.feature_id, "selectivity": sel})
    v: Any  # a column's value in the loops below: ids, texts, flags, activations
    for name, (role, _, _) in datasets.items():
        s_cols: dict[str, list] = {k: [] for k in SAMPLES_SCHEMA.names}
        t_cols: dict[str, list] = {k: [] for k in TOKENS_SCHEMA.names}
        ta_cols: dict[str, list] = {k: [] for k in TOKEN_ACTS_SCHEMA.names}
        p_cols: dict[str, list] = {k: [] for k in POOLED_SCHEMA.names}
        for sid, (words, pos) in enumerate(zip(texts[name], classes[name], strict=True)):
            pieces = [words[0], *(" " + w for w in words[1:])]
            text = "".join(pieces)
            out.is_positive[(name, sid)] = pos
            out.n_tokens[(name, sid)] = len(pieces)
            for k, v in (("sample_id", sid), ("source_id", f"{name}-{sid}"), ("text", text),
                         ("label", "alignment_faking" if pos else "aligned"), ("is_positive", pos),
                         ("role", role), ("n_chars", len(text)), ("group", name)):
                s_cols[k].append(v)
            start = 0
            for pos_i, piece in enumerate(pieces):
                for k, v in (("sample_id", sid), ("token_pos", pos_i), ("token_id", vocab[words[pos_i]]),
                             ("token_text", piece), ("char_start", start), ("char_end", start + len(piece))):
                    t_cols[k].append(v)
                start += len(piece)
            acts: dict[int, dict[int, float]] = {}
            for pos_i, w in enumerate(words):
                fid = word_of.get(w)
                if fid is None:
                    continue
                a = round(1.0 + 4.0 * rng.random(), 3)
                acts.setdefault(fid, {})[pos_i] = max(a, acts.get(fid, {}).get(pos_i, 0.0))
                if pos_i + 1 < len(words):  # a weaker activation on the next token
                    nxt = acts[fid].get(pos_i + 1, 0.0)
                    acts[fid][pos_i + 1] = max(nxt, round(0.3 * a, 3))
            for fid in sorted(acts):
                per_tok = acts[fid]
                for pos_i in sorted(per_tok):
                    for k, v in (("sample_id", sid), ("token_pos", pos_i), ("feature_id", fid),
                                 ("act", per_tok[pos_i])):
                        ta_cols[k].append(v)
                peak = max(sorted(per_tok), key=lambda p: per_tok[p])
                for k, v in (("sample_id", sid), ("feature_id", fid), ("max_act", per_tok[peak]),
                             ("mean_act", sum(per_tok.values()) / len(words)), ("argmax_token", peak),
                             ("n_active_tokens", len(per_tok))):
                    p_cols[k].append(v)
                out.active.add((fid, name, sid))
        lake.write("samples", pa.table(s_cols, schema=SAMPLES_SCHEMA), dataset=name)
        lake.write("tokens", pa.table(t_cols, schema=TOKENS_SCHEMA), dataset=name)
        lake.write("token_activations", pa.table(ta_cols, schema=TOKEN_ACTS_SCHEMA), layer=layer, dataset=name)
        lake.write("activations", pa.table(p_cols, schema=POOLED_SCHEMA), layer=layer, dataset=name)
    sel_rows.sort(key=lambda r: (-abs(r["selectivity"]), r["feature_id"]))
    lake.write(
        "stats/selected_features",
        pa.table(
            {
                "feature_id": pa.array([r["feature_id"] for r in sel_rows], pa.int32()),
                "rank": pa.array(range(1, len(sel_rows) + 1), pa.int64()),
                "direction": pa.array(["positive" if r["selectivity"] >= 0 else "negative" for r in sel_rows]),
                "selectivity": pa.array([r["selectivity"] for r in sel_rows], pa.float64()),
                "abs_selectivity": pa.array([abs(r["selectivity"]) for r in sel_rows], pa.float64()),
                "reason": pa.array(["planted" for _ in sel_rows]),
            }
        ),
        layer=layer,
    )
    return out


def many_features(n: int, p_pos: float = 0.06, p_neg: float = 0.02) -> tuple[FeatureSpec, ...]:
    """``n`` positive-leaning features with trigger words ``kw0``, ``kw1``, ... (for benchmarks)."""
    return tuple(FeatureSpec(i, f"kw{i}", p_pos, p_neg) for i in range(n))
