"""The windows each selected feature is described and scored on, chosen in SQL over the lake's views.

``sql/describe/features.sql`` lists the selected features of a layer; ``sql/describe/windows.sql`` picks,
per feature, the activating samples shown to the describer (``sampling``: the top-k by pooled ``max_act``,
a round-robin over the feature's activation deciles, or a random draw), then from the samples left the ones
held out for scoring (``holdout_sampling``: the next ranks, every decile, or random) and for choosing among
candidate descriptions (validation), and zero-activation samples matched to each part's windows (on class,
dataset and length, or, ``negatives="near_miss"``, on class and the nearest pooled residual: texts the
model represents like the anchor but where the feature is silent). No sample is in two parts of one
feature, so no window a description was written from is ever used to score it. ``sql/describe/window_tokens.sql`` cuts a window of
tokens around each one with the feature's activation on every token. This module runs the three
statements and builds :class:`~dagster_project.lib.autointerp.FeatureExamples` from their rows. It is pure:
it reads through the DuckDB connection it is given and writes nothing.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from dagster_project.lib import sql
from dagster_project.lib.autointerp import FeatureExamples, Window

PARTS = ("top", "negative", "holdout", "holdout_negative", "validation", "validation_negative")
NEEDED_VIEWS = ("selected_features", "samples", "tokens", "activations", "token_activations")
SAMPLINGS = ("top", "deciles", "random")
HOLDOUT_SAMPLINGS = ("next", "deciles", "random")
NEGATIVES = ("matched", "near_miss")
_RESIDUALS_SCHEMA = pa.schema([("dataset", pa.string()), ("sample_id", pa.int32()), ("resid", pa.list_(pa.float32()))])


class ExamplesError(RuntimeError):
    """The lake lacks a table the example selection reads, or the settings are unusable."""


@dataclass(frozen=True)
class ExampleSettings:
    """How many windows of each kind per feature, how they are drawn, and how wide.

    ``top_k`` activating windows (drawn by ``sampling``: ``top``, ``deciles`` or ``random``) and
    ``n_negatives`` zero-activation windows go to the describer. From the activating samples left,
    ``n_holdout`` (drawn by ``holdout_sampling``: ``next`` ranks by max_act, ``deciles`` round-robin over
    the feature's activation deciles, or ``random``) and ``n_holdout_negatives`` negatives are held out for
    scoring, then ``n_validation`` / ``n_validation_negatives`` for choosing among candidate descriptions.
    ``negatives`` is ``matched`` (class, dataset, length) or ``near_miss`` (class, then the nearest pooled
    residual; needs the lake's ``residuals``). ``seed`` seeds the random draws. A window spans ``window``
    tokens each side of its center. ``max_features`` keeps the first N selected features by rank (None: all).
    The defaults are the original top-k selection.
    """

    top_k: int = 5
    n_negatives: int = 5
    n_holdout: int = 5
    n_holdout_negatives: int = 5
    window: int = 12
    max_features: int | None = None
    sampling: str = "top"
    holdout_sampling: str = "next"
    negatives: str = "matched"
    n_validation: int = 0
    n_validation_negatives: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ExamplesError(f"top_k must be >= 1, got {self.top_k}")
        for name in ("n_negatives", "n_holdout", "n_holdout_negatives", "window", "n_validation",
                     "n_validation_negatives"):
            if getattr(self, name) < 0:
                raise ExamplesError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_features is not None and self.max_features < 1:
            raise ExamplesError(f"max_features must be >= 1 or None, got {self.max_features}")
        for name, allowed in (("sampling", SAMPLINGS), ("holdout_sampling", HOLDOUT_SAMPLINGS),
                              ("negatives", NEGATIVES)):
            if getattr(self, name) not in allowed:
                raise ExamplesError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def params(self, layer: int) -> dict[str, Any]:
        return {
            "layer": int(layer),
            "max_features": self.max_features,
            "top_k": self.top_k,
            "n_holdout": self.n_holdout,
            "n_validation": self.n_validation,
            "n_negatives": self.n_negatives,
            "n_holdout_negatives": self.n_holdout_negatives,
            "n_validation_negatives": self.n_validation_negatives,
            "sampling": self.sampling,
            "holdout_sampling": self.holdout_sampling,
            "negatives": self.negatives,
            "seed": int(self.seed),
        }

    def record(self) -> dict[str, Any]:
        """The settings as recorded in the descriptions' metadata (read back by the scorers)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


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


def _residuals(con: duckdb.DuckDBPyConnection, layer: int, settings: ExampleSettings) -> pa.Table:
    """Pooled residual means of the layer's samples for near-miss negatives (an empty table otherwise)."""
    if settings.negatives != "near_miss":
        return _RESIDUALS_SCHEMA.empty_table()
    have = {r[0] for r in con.sql("select view_name from duckdb_views() where not internal").fetchall()}
    if "residuals" not in have:
        raise ExamplesError("negatives='near_miss' needs the lake's residuals table (pooled residual vectors): "
                            "materialize activations, or use negatives='matched'")
    return sql.relation(con, "describe/residuals", {"layer": int(layer)}).to_arrow_table().cast(_RESIDUALS_SCHEMA)


def select_windows(con: duckdb.DuckDBPyConnection, layer: int, settings: ExampleSettings) -> pa.Table:
    """One row per chosen window (windows.sql)."""
    con.register("describe_residuals", _residuals(con, layer, settings))
    try:
        return sql.relation(con, "describe/windows", settings.params(layer)).to_arrow_table()
    finally:
        con.unregister("describe_residuals")


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
                validation=p["validation"],
                validation_negatives=p["validation_negative"],
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
