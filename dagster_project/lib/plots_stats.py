"""PNG plots of the SQL statistics (matplotlib's Agg backend, no pyplot global state)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def selectivity_histogram(
    stats: pa.Table,
    min_selectivity: float | None = 0.3,
    bins: int = 50,
    title: str | None = None,
) -> bytes:
    """Histogram of ``selectivity`` over active features (``feature_stats`` rows), log count axis.

    Dashed lines mark ``+/- min_selectivity``, the selection threshold.
    """
    rows = stats.filter(pc.equal(stats["is_active"], True)) if "is_active" in stats.column_names else stats
    sel = np.asarray(rows["selectivity"].drop_null().to_numpy(zero_copy_only=False), dtype=np.float64)
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    ax.hist(sel, bins=np.linspace(-1.0, 1.0, bins + 1).tolist(), color="#4c72b0")
    if sel.size:
        ax.set_yscale("log")
    if min_selectivity is not None:
        for x in (-min_selectivity, min_selectivity):
            ax.axvline(x, color="#c44e52", linestyle="--", linewidth=1)
    ax.set_xlim(-1.0, 1.0)
    ax.set_xlabel("selectivity (pos_mean - neg_mean) / (pos_mean + neg_mean)")
    ax.set_ylabel("active features")
    ax.set_title(title or f"Selectivity of {sel.size} active features")
    return _png(fig)


def active_features_bar(profile: pa.Table, title: str | None = None) -> bytes:
    """Bars of mean active features per sample for each dataset (``activation_profile`` rows).

    Black ticks mark the median and the 90th percentile.
    """
    rows = sorted(profile.to_pylist(), key=lambda r: r["dataset"])
    names = [r["dataset"] for r in rows]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(4.0, 0.9 * len(rows) + 2.0), 3.6))
    ax = fig.add_subplot()
    ax.bar(x, [r["active_per_sample_mean"] for r in rows], color="#55a868", label="mean")
    ax.scatter(
        x, [r["active_per_sample_median"] for r in rows], marker="_", s=300, color="black", label="median"
    )
    ax.scatter(x, [r["active_per_sample_p90"] for r in rows], marker="^", s=30, color="black", label="p90")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("active features per sample")
    ax.legend(loc="best", fontsize="small")
    layer = rows[0]["layer"] if rows else None
    ax.set_title(title or f"Active features per sample (layer {layer})")
    return _png(fig)


def jaccard_heatmap(cross: pa.Table, title: str | None = None) -> bytes:
    """Dataset x dataset heatmap of the Jaccard overlap of active feature sets (``cross_distribution``)."""
    rows = cross.to_pylist()
    names = sorted({r["dataset_a"] for r in rows} | {r["dataset_b"] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    m = np.full((len(names), len(names)), np.nan)
    for r in rows:
        if r["jaccard"] is not None:
            m[index[r["dataset_a"]], index[r["dataset_b"]]] = r["jaccard"]
    side = max(3.5, 0.8 * len(names) + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(m[i, j]):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if m[i, j] < 0.6 else "black",
                )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    fig.colorbar(im, ax=ax, label="Jaccard of active feature sets")
    layer = rows[0]["layer"] if rows else None
    ax.set_title(title or f"Active-feature overlap (layer {layer})")
    return _png(fig)
