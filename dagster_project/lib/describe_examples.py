"""The windows each selected feature is described and scored on, chosen in SQL over the lake's views.

``sql/describe/features.sql`` lists the selected features of a layer; ``sql/describe/windows.sql`` picks,
per feature, the top-k samples by pooled ``max_act`` (shown to the describer), the next ranks (held out
for detection scoring) and zero-activation samples matched to them on class, dataset and length (the
describer's contrast set and the held-out negatives); ``sql/describe/window_tokens.sql`` cuts a window of
tokens around each one with the feature's activation on every token. This module runs the three
statements and builds :class:`~dagster_project.lib.autointerp.FeatureExamples` from their rows. It is pure:
it reads through the DuckDB connection it is given and writes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from dagster_project import sql
from dagster_project.lib.autointerp import FeatureExamples, Window

PARTS = ("top", "negative", "holdout", "holdout_negative")
NEEDED_VIEWS = ("selected_features", "samples", "tokens", "activations", "token_activations")


class ExamplesError(RuntimeError):
    """The lake lacks a table the example selection reads, or the settings are unusable."""


@dataclass(frozen=True)
class ExampleSettings:
    """How many windows of each kind per feature, and how wide.

    ``top_k`` activating windows and ``n_negatives`` matched zero-activation windows go to the describer;
    ``n_holdout`` activating windows (the ranks after ``top_k``) and ``n_holdout_negatives`` matched
    zero-activation windows are held out for detection scoring. A window spans ``window`` tokens each
    side of its center. ``max_features`` keeps the first N selected features by rank (None: all).
    """

    top_k: int = 5
    n_negatives: int = 5
    n_holdout: int = 5
    n_holdout_negatives: int = 5
    window: int = 12
    max_features: int | None = None

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ExamplesError(f"top_k must be >= 1, got {self.top_k}")
        for name in ("n_negatives", "n_holdout", "n_holdout_negatives", "window"):
            if getattr(self, name) < 0:
                raise ExamplesError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_features is not None and self.max_features < 1:
            raise ExamplesError(f"max_features must be >= 1 or None, got {self.max_features}")

    def params(self, layer: int) -> dict[str, Any]:
        return {
            "layer": int(layer),
            "max_features": self.max_features,
            "top_k": self.top_k,
            "n_holdout": self.n_holdout,
            "n_negatives": self.n_negatives,
            "n_holdout_negatives": self.n_holdout_negatives,
        }


@dataclass
class LayerExamples:
    """The selected features of a layer (``features``: the features.sql rows), the chosen windows (one row
    per window, windows.sql's output, the provenance of every example) and the built examples, one per
    selected feature in selection order (a feature with no activating window has empty ``top``)."""

    layer: int
    features: pa.Table
    windows: pa.Table
    examples: list[FeatureExamples]

    @property
    def by_id(self) -> dict[int, FeatureExamples]:
        return {fx.feature_id: fx for fx in self.examples}


def missing_views(con: duckdb.DuckDBPyConnection) -> list[str]:
    have = {r[0] for r in con.sql("select view_name from duckdb_views() where not internal").fetchall()}
    have |= {r[0] for r in con.sql("select table_name from duckdb_tables()").fetchall()}
    return [v for v in NEEDED_VIEWS if v not in have]


def selected(con: duckdb.DuckDBPyConnection, layer: int, settings: ExampleSettings) -> pa.Table:
    """The selected features of ``layer`` (features.sql): feature_id, feature_rank, direction, selectivity."""
    return sql.relation(
        con, "describe/features", {"layer": int(layer), "max_features": settings.max_features}
    ).to_arrow_table()


def select_windows(con: duckdb.DuckDBPyConnection, layer: int, settings: ExampleSettings) -> pa.Table:
    """One row per chosen window (windows.sql)."""
    return sql.relation(con, "describe/windows", settings.params(layer)).to_arrow_table()


def window_tokens(
    con: duckdb.DuckDBPyConnection, layer: int, windows: pa.Table, window: int
) -> pa.Table:
    """One row per token of each window with the feature's activation (window_tokens.sql)."""
    con.register("describe_windows", windows)
    try:
        return sql.relation(
            con, "describe/window_tokens", {"layer": int(layer), "window": int(window)}
        ).to_arrow_table()
    finally:
        con.unregister("describe_windows")


def build_examples(layer: int, features: pa.Table, windows: pa.Table, tokens: pa.Table) -> list[FeatureExamples]:
    """:class:`FeatureExamples` per selected feature (in ``features`` order) from the SQL rows."""
    toks: dict[tuple[int, str, int], tuple[list[str], list[float]]] = defaultdict(lambda: ([], []))
    t = tokens.to_pydict()
    for fid, part, rank, text, act in zip(
        t["feature_id"], t["part"], t["part_rank"], t["token_text"], t["act"], strict=True
    ):
        texts, acts = toks[(fid, part, rank)]
        texts.append(text if text is not None else "")
        acts.append(float(act))
    parts: dict[int, dict[str, list[Window]]] = defaultdict(lambda: {p: [] for p in PARTS})
    w = windows.to_pydict()
    for i in range(windows.num_rows):
        key = (w["feature_id"][i], w["part"][i], w["part_rank"][i])
        texts, acts = toks.get(key, ([], []))
        if not texts:  # a sample without tokens in range (cannot happen with a consistent lake)
            continue
        parts[w["feature_id"][i]][w["part"][i]].append(
            Window.from_tokens(
                dataset=w["dataset"][i],
                sample_id=int(w["sample_id"][i]),
                label=w["label"][i] or "",
                is_positive=bool(w["is_positive"][i]),
                tokens=texts,
                acts=acts,
            )
        )
    out = []
    for fid in features.column("feature_id").to_pylist():
        p = parts.get(fid) or {q: [] for q in PARTS}
        out.append(
            FeatureExamples(
                layer=int(layer),
                feature_id=int(fid),
                top=p["top"],
                negatives=p["negative"],
                holdout=p["holdout"],
                holdout_negatives=p["holdout_negative"],
            )
        )
    return out


def load_examples(
    con: duckdb.DuckDBPyConnection, layer: int, settings: ExampleSettings | None = None
) -> LayerExamples:
    """Run the example-selection SQL for ``layer`` and build every selected feature's examples."""
    settings = settings or ExampleSettings()
    missing = missing_views(con)
    if missing:
        raise ExamplesError(
            f"the lake has no {', '.join(missing)} table: materialize activations (with token activations) "
            "and selected_features first"
        )
    features = selected(con, layer, settings)
    windows = select_windows(con, layer, settings)
    tokens = window_tokens(con, layer, windows, settings.window)
    return LayerExamples(
        layer=int(layer),
        features=features,
        windows=windows,
        examples=build_examples(layer, features, windows, tokens),
    )
