"""Probe report figures, each returned as PNG bytes (for ``MaterializeResult`` metadata or a report).

Built on ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, no global backend state, so it
is safe in Dagster worker processes without a display.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from numpy.typing import ArrayLike
from sklearn.metrics import roc_curve

from dagster_project.lib.metrics import auroc

logger = logging.getLogger(__name__)

_DPI = 110
_GROUP_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


@dataclass(frozen=True)
class LadderRow:
    """One bar of the AUROC ladder: a probe (or baseline) on one eval set."""

    name: str
    auroc: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    group: str = "probe"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    return buf.getvalue()


def _as_ladder_row(r: LadderRow | Mapping[str, Any]) -> LadderRow:
    if isinstance(r, LadderRow):
        return r
    return LadderRow(
        name=str(r["name"]),
        auroc=r.get("auroc"),
        ci_low=r.get("ci_low", r.get("auroc_ci_low")),
        ci_high=r.get("ci_high", r.get("auroc_ci_high")),
        group=str(r.get("group", "probe")),
    )


def plot_auroc_ladder(
    rows: Iterable[LadderRow | Mapping[str, Any]], title: str = "AUROC by probe", max_rows: int = 150
) -> bytes:
    """Horizontal bars of every probe and baseline ranked by AUROC, with CI whiskers.

    ``rows`` are ``LadderRow`` or mappings with ``name, auroc`` and optionally ``ci_low/ci_high``
    (or ``auroc_ci_low/auroc_ci_high``) and ``group`` (colour: e.g. ``l1``, ``l2``, ``baseline``).
    Rows without an AUROC (one-class eval sets) are listed in the title, not drawn as a number;
    beyond ``max_rows`` only the best are drawn.
    """
    all_rows = [_as_ladder_row(r) for r in rows]
    drawn = sorted((r for r in all_rows if r.auroc is not None), key=lambda r: -float(r.auroc or 0.0))
    n_missing = len(all_rows) - len(drawn)
    if len(drawn) > max_rows:
        logger.info("AUROC ladder: drawing the best %d of %d rows", max_rows, len(drawn))
        drawn = drawn[:max_rows]
    drawn = drawn[::-1]  # best at the top
    groups = list(dict.fromkeys(r.group for r in sorted(drawn, key=lambda r: r.group)))
    colour = {g: _GROUP_COLOURS[i % len(_GROUP_COLOURS)] for i, g in enumerate(groups)}

    fig = Figure(figsize=(8.0, max(2.0, 0.6 + 0.22 * len(drawn))))
    ax = fig.add_subplot()
    if drawn:
        ypos = np.arange(len(drawn))
        vals = np.array([float(r.auroc or 0.0) for r in drawn])
        ax.barh(ypos, vals, color=[colour[r.group] for r in drawn], height=0.7)
        lo = np.array([vals[i] if r.ci_low is None else float(r.ci_low) for i, r in enumerate(drawn)])
        hi = np.array([vals[i] if r.ci_high is None else float(r.ci_high) for i, r in enumerate(drawn)])
        has_ci = np.array([r.ci_low is not None and r.ci_high is not None for r in drawn])
        if has_ci.any():
            err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
            ax.errorbar(
                vals[has_ci], ypos[has_ci], xerr=err[:, has_ci], fmt="none", ecolor="black", capsize=2, lw=0.8
            )
        ax.set_yticks(ypos, [r.name for r in drawn], fontsize=7)
        ax.axvline(0.5, color="grey", ls=":", lw=0.8)
        ax.set_xlim(min(0.4, float(np.min(lo)) - 0.02), 1.0)
        handles = [Patch(color=colour[g], label=g) for g in groups]
        if len(groups) > 1:
            ax.legend(handles=handles, loc="lower right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no AUROC to show", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("AUROC")
    suffix = f" ({n_missing} without AUROC: one class)" if n_missing else ""
    ax.set_title(title + suffix, fontsize=9)
    return _png(fig)


def plot_roc_curves(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]], title: str = "ROC curves", max_curves: int = 12
) -> bytes:
    """ROC curves of several scorers; ``curves`` maps a label to ``(y, scores)``.

    One-class entries are skipped (logged); the legend gives each curve's AUROC.
    """
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.add_subplot()
    drawn = 0
    for label, (y, s) in curves.items():
        yy, ss = np.asarray(y), np.asarray(s, dtype=np.float64)
        if np.unique(yy).size < 2:
            logger.info("ROC curve %s skipped: one class", label)
            continue
        if drawn >= max_curves:
            logger.info("ROC curves: only the first %d drawn", max_curves)
            break
        fpr, tpr, _ = roc_curve(yy, ss)
        ax.plot(fpr, tpr, lw=1.2, label=f"{label} ({auroc(yy, ss):.3f})")
        drawn += 1
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    if drawn:
        ax.legend(loc="lower right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no two-class set to draw", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def plot_cross_distribution_heatmap(
    cells: Iterable[tuple[str, str, float | None]],
    title: str = "AUROC: train set x eval set",
    train_order: Sequence[str] | None = None,
    eval_order: Sequence[str] | None = None,
) -> bytes:
    """Heatmap of AUROC with train sets as rows and eval sets as columns.

    ``cells`` are ``(train_set, eval_set, auroc)``; ``None`` (one-class set) and missing pairs are
    drawn grey and marked ``n/a``. Orders default to first appearance.
    """
    triples = [
        (str(t), str(e), None if a is None or not math.isfinite(float(a)) else float(a)) for t, e, a in cells
    ]
    rows = list(train_order) if train_order is not None else list(dict.fromkeys(t for t, _, _ in triples))
    cols = list(eval_order) if eval_order is not None else list(dict.fromkeys(e for _, e, _ in triples))
    grid = np.full((len(rows), len(cols)), np.nan)
    ri, ci = {r: i for i, r in enumerate(rows)}, {c: j for j, c in enumerate(cols)}
    for t, e, a in triples:
        if t in ri and e in ci and a is not None:
            grid[ri[t], ci[e]] = a

    fig = Figure(figsize=(1.4 + 0.9 * max(1, len(cols)), 1.2 + 0.55 * max(1, len(rows))))
    ax = fig.add_subplot()
    ax.set_facecolor("#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = grid[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("eval set")
    ax.set_ylabel("train set")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="AUROC")
    return _png(fig)


def plot_l1_path(
    points: Iterable[tuple[str, float, int, float]], title: str = "L1 path: features kept vs AUROC"
) -> bytes:
    """Non-zero weights (log x) against AUROC for L1 probes over C, one line per series.

    ``points`` are ``(series, C, n_nonzero, auroc)``, e.g. one series per feature set; each point is
    annotated with its C.
    """
    series: dict[str, list[tuple[float, int, float]]] = {}
    for name, C, nz, a in points:
        series.setdefault(str(name), []).append((float(C), int(nz), float(a)))
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for i, (name, pts) in enumerate(series.items()):
        pts.sort(key=lambda p: p[0])
        x = [max(p[1], 1) for p in pts]
        ax.plot(
            x,
            [p[2] for p in pts],
            marker="o",
            ms=3,
            lw=1.2,
            label=name,
            color=_GROUP_COLOURS[i % len(_GROUP_COLOURS)],
        )
        for (C, _, a), xi in zip(pts, x, strict=True):
            ax.annotate(f"C={C:g}", (xi, a), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("non-zero weights (0 drawn at 1)")
    ax.set_ylabel("AUROC")
    ax.set_title(title, fontsize=9)
    if series:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no L1 probes", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def plot_ksparse_curve(
    series: Mapping[str, Sequence[tuple[int, float | None]]], title: str = "k-sparse curve"
) -> bytes:
    """AUROC against the number of features ``k`` (log x), one line per series (e.g. training CV, worst and
    mean held-out group); points without a value are left out."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for i, (name, pts) in enumerate(series.items()):
        xy = sorted((int(k), float(a)) for k, a in pts if a is not None and not math.isnan(float(a)))
        if not xy:
            continue
        ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", ms=4, lw=1.3, label=name,
                color=_GROUP_COLOURS[i % len(_GROUP_COLOURS)])
    ax.set_xscale("log")
    ax.set_xlabel("k (features, chosen by selectivity in every training group)")
    ax.set_ylabel("AUROC")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)
