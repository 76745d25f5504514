"""Description scorers on a lake: mean and spread per scorer, and how they relate to probe weight.

Reads ``explanation_scores`` (the describe stage's scorers: detection, fuzzing, embedding) and the best SAE
probe of each layer (``stats/probes`` marks it ``is_best``; its weights are read from the saved probe at the
row's ``path``, on the probe's standardised scale). Writes nothing to the lake. Prints two markdown tables:

1. per layer and scorer: features scored (ok) and failed, mean, standard deviation, quartiles;
2. per layer and scorer, over the selected features in the best SAE probe's feature set: Spearman's rank
   correlation of the score with |weight| (features the probe set to 0 count as 0), and the mean score of
   features with a non-zero weight against those with weight 0.

    .venv/bin/python benchmarks/scorers.py                          # the active profile's lake
    .venv/bin/python benchmarks/scorers.py --root lake --namespace af_shared --layer 9
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from dagster_project.lib.lake import Lake, LakeError
from dagster_project.lib.scorers import SCORERS, scorer_summary

SCORES = "stats/explanation_scores"
PROBES = "stats/probes"


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (average ranks for ties); None when either side is constant or n < 3."""
    if len(x) < 3:
        return None

    def ranks(v: Sequence[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = np.argsort(a, kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for val in np.unique(a):  # ties share their mean rank
            tie = a == val
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def best_sae_weights(lake: Lake, layer: int) -> tuple[str, dict[int, float]] | None:
    """The best SAE probe of ``layer``: its id and ``{feature_id: weight}`` over its feature set."""
    from dagster_project.lib.evaluation import best_probes, load_saved_probes

    if not lake.exists(PROBES, layer=layer):
        return None
    table = lake.read(PROBES, layer=layer)
    best = [r for r in table.to_pylist() if r["is_best"] and r["kind"] == "sae"]
    if not best:
        return None
    import pyarrow as pa

    loaded = best_probes(load_saved_probes(pa.Table.from_pylist(best, schema=table.schema)))
    sae = loaded.get("sae")
    if sae is None:
        return None
    ids = list(sae.probe.spec.feature_ids)
    coef = np.asarray(sae.probe.coef, dtype=float).ravel()
    return sae.probe_id, {int(f): float(w) for f, w in zip(ids, coef, strict=True)}


def layer_rows(lake: Lake, layer: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(summary rows, probe-weight rows) of one layer."""
    rows = lake.read(SCORES, layer=layer).select(["feature_id", "scorer", "score", "status"]).to_pylist()
    summary = [{"layer": layer, **s} for s in scorer_summary(rows)]
    weights = best_sae_weights(lake, layer)
    relation: list[dict[str, Any]] = []
    for s in [s for s in SCORERS if any(r["scorer"] == s for r in rows)]:
        ok = {r["feature_id"]: r["score"] for r in rows
              if r["scorer"] == s and r["status"] == "ok" and r["score"] is not None}
        row: dict[str, Any] = {"layer": layer, "scorer": s, "probe": weights[0] if weights else None}
        if weights:
            both = [f for f in ok if f in weights[1]]
            w = [abs(weights[1][f]) for f in both]
            sc = [ok[f] for f in both]
            nz = [ok[f] for f in both if weights[1][f] != 0]
            z = [ok[f] for f in both if weights[1][f] == 0]
            row.update({
                "n_in_probe_set": len(both), "n_nonzero": len(nz),
                "spearman_abs_weight": _spearman(sc, w),
                "mean_nonzero": float(np.mean(nz)) if nz else None, "mean_zero": float(np.mean(z)) if z else None,
            })
        relation.append(row)
    return summary, relation


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def report(lake: Lake, layers: Sequence[int] | None = None) -> str:
    """Both tables as markdown, for ``layers`` (default: every layer with explanation scores)."""
    if layers is None:
        layers = sorted(int(p.name.split("=", 1)[1]) for p in (lake.base / SCORES).iterdir()
                        if p.name.startswith("layer=")) if (lake.base / SCORES).is_dir() else []
    summary: list[dict[str, Any]] = []
    relation: list[dict[str, Any]] = []
    for layer in layers:
        if not lake.exists(SCORES, layer=layer):
            raise LakeError(f"{SCORES} of layer {layer} is not in the lake {lake.base}: materialize detection_scores")
        s, r = layer_rows(lake, layer)
        summary += s
        relation += r
    if not summary:
        raise LakeError(f"no {SCORES} in the lake {lake.base}")
    return (
        "Scores per scorer (detection and fuzzing: balanced accuracy; embedding: AUROC; 0.5 = chance)\n\n"
        + markdown(summary, ["layer", "scorer", "metric", "ok", "failed", "mean", "std", "q25", "median", "q75"])
        + "\n\nScores against the best SAE probe's |weight| (its feature set; weight 0 kept)\n\n"
        + markdown(relation, ["layer", "scorer", "probe", "n_in_probe_set", "n_nonzero", "spearman_abs_weight",
                              "mean_nonzero", "mean_zero"])
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--root", help="lake root (default: FEATURELAKE_LAKE or lake/)")
    ap.add_argument("--namespace", help="lake namespace, the profile name (default: the active profile)")
    ap.add_argument("--layer", type=int, nargs="*", help="layers (default: every layer with explanation scores)")
    args = ap.parse_args(argv)
    if args.root is None or args.namespace is None:
        from dagster_project.config import load_profile
        from dagster_project.resources import default_lake_root

        args.root = args.root or default_lake_root()
        args.namespace = args.namespace or load_profile().name
    try:
        sys.stdout.write(report(Lake(args.root, args.namespace), args.layer or None))
    except LakeError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
