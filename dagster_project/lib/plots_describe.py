"""PNG plots of the describe stage (matplotlib's Agg backend, no pyplot global state)."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence


def score_histogram_png(scores: Sequence[int], title: str) -> bytes:
    """Bars of the 0-10 relevance scores."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = Counter(scores)
    fig = Figure(figsize=(6.0, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(11), [counts.get(s, 0) for s in range(11)], color="#4c72b0")
    ax.set_xticks(range(11))
    ax.set_xlabel("relevance score (0-10)")
    ax.set_ylabel("features")
    ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()
