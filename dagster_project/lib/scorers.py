"""Scorers of feature descriptions beyond the LLM-judged ones, and the ``explanation_scores`` rows.

The scorers, each on the held-out windows of a feature (never a window the description was written from;
``lib/describe_examples.py``):

- ``detection`` (:func:`~dagster_project.lib.describers.run_detection`): from the description alone, which
  of the shuffled held-out windows (activating ones from every activation decile, and negatives) fire.
  Balanced accuracy.
- ``fuzzing`` (:func:`~dagster_project.lib.describers.run_fuzzing`): held-out activating windows with their
  firing tokens marked, or as many decoy tokens marked; which marks fit the description. Balanced accuracy.
- ``embedding`` (:func:`embedding_scores`, here): no model call. The description and every held-out window
  are embedded with the bundled MiniLM (all-MiniLM-L6-v2); the score is the AUROC of the cosine similarity
  for activating against non-activating windows (0.5 = chance), and the balanced accuracy of calling a
  window activating when its similarity is above the median of the feature's windows (a threshold that
  uses no labels).

This module is pure: it reads nothing and writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dagster_project.lib.autointerp import (
    CallInfo,
    DescriptionRecord,
    FeatureExamples,
    ScoreRecord,
    detection_scores,
)
from dagster_project.lib.themes import MiniLMEmbedder, default_embedder, strip_tag

SCORERS = ("detection", "fuzzing", "embedding")
METRICS = {"detection": "balanced_accuracy", "fuzzing": "balanced_accuracy", "embedding": "auroc"}


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Mann-Whitney AUROC: the chance a random positive scores above a random negative (ties count half)."""
    p = np.asarray(pos, dtype=float)[:, None]
    n = np.asarray(neg, dtype=float)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def _spread(items: Sequence[Any], k: int) -> list[Any]:
    """``k`` of ``items`` at evenly spaced positions (all of them when ``k >= len``), first and last kept."""
    if k >= len(items):
        return list(items)
    idx = sorted({int(round(i)) for i in np.linspace(0, len(items) - 1, k)})
    return [items[i] for i in idx]


def embedding_windows(fx: FeatureExamples, max_windows: int | None) -> tuple[list[Any], list[Any]]:
    """The held-out (activating, non-activating) windows the embedding scorer embeds: all of them, or at
    most ``max_windows``, half of each kind; activating ones at evenly spaced positions of the held-out
    order (with decile sampling: spread over the deciles)."""
    if max_windows is None:
        return list(fx.holdout), list(fx.holdout_negatives)
    k_pos = min(len(fx.holdout), max(1, max_windows // 2))
    k_neg = min(len(fx.holdout_negatives), max(1, max_windows - k_pos))
    return _spread(fx.holdout, k_pos), _spread(fx.holdout_negatives, k_neg)


def embedding_scores(
    features: Sequence[FeatureExamples],
    descriptions: Sequence[DescriptionRecord],
    embedder: MiniLMEmbedder | None = None,
    model: str = "all-minilm-l6-v2",
    max_windows: int | None = None,
) -> list[ScoreRecord]:
    """The ``embedding`` scorer for every feature with an ``ok`` description and held-out windows of both
    kinds (activating and not), on at most ``max_windows`` of them (:func:`embedding_windows`; None: all);
    texts are embedded in one batch. MiniLM runs at tens of short texts a second on a 2-core CPU, so the
    cap is what keeps this scorer affordable there."""
    by_key = {(d.layer, d.feature_id): d for d in descriptions if d.status == "ok" and d.description}
    jobs = [(fx, by_key[fx.key], *embedding_windows(fx, max_windows)) for fx in features
            if fx.key in by_key and fx.holdout and fx.holdout_negatives]
    if not jobs:
        return []
    emb = embedder or default_embedder()
    texts: list[str] = []
    for _fx, d, act, non in jobs:
        texts.append(strip_tag(d.description or ""))
        texts.extend(w.text().replace("▁", " ") for w in [*act, *non])
    vecs = emb.embed(texts)
    out: list[ScoreRecord] = []
    pos = 0
    for fx, _d, act, non in jobs:
        windows = [*act, *non]
        truth = [True] * len(act) + [False] * len(non)
        desc_vec = vecs[pos]
        sims = vecs[pos + 1 : pos + 1 + len(windows)] @ desc_vec
        pos += 1 + len(windows)
        score = auroc(sims[: len(act)], sims[len(act) :])
        median = float(np.median(sims))
        chosen = [i for i, s in enumerate(sims, 1) if s > median]
        bal = detection_scores(chosen, truth).balanced_accuracy
        out.append(
            ScoreRecord(
                layer=fx.layer, feature_id=fx.feature_id, scorer="embedding", status="ok", error=None,
                score=score, metric="auroc", balanced_accuracy=bal, n=len(windows), n_activating=len(act),
                window_sample_ids=[w.ref for w in windows], window_is_activating=truth, chosen=chosen,
                call=CallInfo(backend="offline", model=model, cost_usd=0.0),
            )
        )
    return out


def missing_score(layer: int, feature_id: int, scorer: str, error: str) -> ScoreRecord:
    """A recorded failure: a selected feature the scorer could not score, and why."""
    return ScoreRecord(
        layer=layer, feature_id=feature_id, scorer=scorer, status="failed", error=error, score=None,
        metric=METRICS[scorer], balanced_accuracy=None, n=0, n_activating=0, window_sample_ids=[],
        window_is_activating=[], chosen=[], call=CallInfo(),
    )


def complete_scores(
    features: Sequence[FeatureExamples],
    descriptions: Sequence[DescriptionRecord],
    scored: dict[str, Sequence[ScoreRecord]],
) -> list[ScoreRecord]:
    """One row per (selected feature, scorer) in feature order: the scorer's record, or a failure that says
    why there is none (the description failed, no held-out windows of the kind the scorer needs)."""
    desc = {(d.layer, d.feature_id): d for d in descriptions}
    by_scorer = {scorer: {(r.layer, r.feature_id): r for r in records} for scorer, records in scored.items()}
    out: list[ScoreRecord] = []
    for fx in features:
        d = desc.get(fx.key)
        for scorer, got in by_scorer.items():
            if fx.key in got:
                out.append(got[fx.key])
                continue
            if d is None or d.status != "ok" or not d.description:
                why = "no description: " + ((d.error or "failed") if d is not None else "not described")
            elif scorer == "fuzzing" and not fx.holdout:
                why = "no held-out activating windows"
            elif scorer == "embedding" and not (fx.holdout and fx.holdout_negatives):
                why = "needs held-out activating and non-activating windows"
            elif scorer == "detection" and not (fx.holdout or fx.holdout_negatives):
                why = "no held-out windows"
            else:
                why = "not scored"
            out.append(missing_score(fx.layer, fx.feature_id, scorer, why[:2000]))
    return out


def scorer_summary(rows: Sequence[dict]) -> list[dict]:
    """Per scorer: its metric, how many features it scored (ok) or failed, and the mean, standard deviation
    and quartiles of the scores."""
    out = []
    for scorer in [s for s in SCORERS if any(r["scorer"] == s for r in rows)]:
        sub = [r for r in rows if r["scorer"] == scorer]
        vals = np.asarray([r["score"] for r in sub if r["status"] == "ok" and r["score"] is not None], dtype=float)
        q = np.quantile(vals, [0.25, 0.5, 0.75]) if vals.size else [None] * 3
        out.append({
            "scorer": scorer, "metric": METRICS[scorer], "ok": int(vals.size), "failed": len(sub) - int(vals.size),
            "mean": float(vals.mean()) if vals.size else None, "std": float(vals.std()) if vals.size else None,
            "q25": None if q[0] is None else float(q[0]), "median": None if q[1] is None else float(q[1]),
            "q75": None if q[2] is None else float(q[2]),
        })
    return out


def scorer_figure(rows: Sequence[dict], title: str) -> bytes:
    """Box plots of every scorer's scores (one box per scorer, the points over it; 0.5 marks chance for
    both balanced accuracy and AUROC), as a PNG (matplotlib Agg, no pyplot state)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [s for s in SCORERS if any(r["scorer"] == s for r in rows)]
    data = [[r["score"] for r in rows if r["scorer"] == s and r["status"] == "ok" and r["score"] is not None]
            for s in names]
    fig = Figure(figsize=(6.0, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    keep = [i for i, d in enumerate(data) if d]
    if keep:
        ax.boxplot([data[i] for i in keep], positions=[i + 1 for i in keep], widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data):
        ax.scatter(i + 1 + rng.uniform(-0.12, 0.12, len(d)), d, s=8, alpha=0.5, color="#4c72b0")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels([f"{s}\n({METRICS[s].replace('_', ' ')}, n={len(d)})" for s, d in zip(names, data, strict=True)])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("score")
    ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()
