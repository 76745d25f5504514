"""The describe stage's lake tables: their names and rows built from the runners' records (the Arrow
schemas are the table registry's, :mod:`dagster_project.lib.tables`).

Every table is partitioned by layer (``stats/<name>/layer=L/part-0.parquet``; the ``layer`` column lives
only in the path). A row's columns are its schema's, in its order: each comes from a value given, else from
the record's :class:`~dagster_project.lib.autointerp.CallInfo` (the :data:`CALL_FIELDS`, inlined), else
from the record's attribute of that name (:func:`record_row`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pyarrow as pa

from dagster_project.lib.autointerp import CallInfo, DescriptionRecord, ScoreRecord
from dagster_project.lib.describe_examples import LayerExamples
from dagster_project.lib.describers import CandidateRecord
from dagster_project.lib.lake import Lake
from dagster_project.lib.tables import (
    CALL_FIELDS,
    CANDIDATES_SCHEMA,
    DESCRIPTIONS_SCHEMA,
    EXPLANATION_SCORES_SCHEMA,
)
from dagster_project.lib.themes import ThemeClustering

DESCRIPTIONS = "stats/descriptions"
CLASSIFICATIONS = "stats/classifications"
DETECTION = "stats/detection_scores"
THEMES = "stats/themes"
CANDIDATES = "stats/description_candidates"
EXPLANATION_SCORES = "stats/explanation_scores"


def call_row(info: CallInfo) -> dict[str, Any]:
    """The :data:`CALL_FIELDS` columns of a record's call."""
    return {name: getattr(info, name) for name, _ in CALL_FIELDS}


def record_row(schema: pa.Schema, record: Any, **values: Any) -> dict[str, Any]:
    """One row of ``schema`` from ``record``: each column is ``values[name]`` when given, else the field of
    ``record.call`` of that name, else ``record``'s attribute (a column it lacks raises AttributeError)."""
    call = call_row(record.call)
    return {
        name: values[name] if name in values else call[name] if name in call else getattr(record, name)
        for name in schema.names
    }


def description_rows(
    records: Sequence[DescriptionRecord], candidates: Sequence[Sequence[CandidateRecord]], ex: LayerExamples
) -> list[dict[str, Any]]:
    """``descriptions`` rows: each record with its selection figures, held-out windows and kept candidate."""
    features = {r["feature_id"]: r for r in ex.features.to_pylist()}
    by_id = ex.by_id
    best = {cs[0].description.feature_id: next(c for c in cs if c.is_best) for cs in candidates if cs}
    n_cands = {cs[0].description.feature_id: len(cs) for cs in candidates if cs}
    rows = []
    for rec in records:
        fx = by_id[rec.feature_id]
        sel = features[rec.feature_id]
        kept = best[rec.feature_id]
        rows.append(
            record_row(
                DESCRIPTIONS_SCHEMA,
                rec,
                feature_rank=sel["feature_rank"],
                direction=sel["direction"],
                selectivity=sel["selectivity"],
                holdout_sample_ids=[w.ref for w in fx.holdout],
                holdout_negative_sample_ids=[w.ref for w in fx.holdout_negatives],
                top_max_act=fx.scale,
                candidate=kept.candidate,
                n_candidates=n_cands[rec.feature_id],
                validation_balanced_accuracy=kept.validation_score,
            )
        )
    return rows


def candidate_row(c: CandidateRecord) -> dict[str, Any]:
    """A ``description_candidates`` row: the candidate's description and its validation detection."""
    val = c.validation
    return record_row(
        CANDIDATES_SCHEMA,
        c.description,
        candidate=c.candidate,
        is_best=c.is_best,
        validation_status=val.status if val is not None else None,
        validation_error=val.error if val is not None else None,
        validation_balanced_accuracy=c.validation_score,
        validation_accuracy=val.accuracy if val is not None else None,
        validation_n=val.n_windows if val is not None else 0,
        validation_sample_ids=val.window_sample_ids if val is not None else [],
        validation_cache_key=val.call.cache_key if val is not None else None,
    )


def score_rows(records: Sequence[ScoreRecord], descs: Sequence[DescriptionRecord]) -> list[dict[str, Any]]:
    """``explanation_scores`` rows: each score with the description it judged."""
    by_id = {d.feature_id: d for d in descs}
    rows = []
    for r in records:
        d = by_id.get(r.feature_id)
        rows.append(
            record_row(
                EXPLANATION_SCORES_SCHEMA,
                r,
                description=d.description if d is not None else None,
                description_cache_key=d.call.cache_key if d is not None else None,
            )
        )
    return rows


def theme_rows(clustering: ThemeClustering, text: dict[Any, str]) -> list[dict[str, Any]]:
    """``themes`` rows: one per clustered feature, with its theme and description (``text`` by feature)."""
    return [
        {
            "feature_id": int(cast(int, fid)),  # the members are the feature ids clustered
            "theme_id": c.cluster_id,
            "theme_name": c.name,
            "theme_size": c.size,
            "top_terms": c.top_terms,
            "description": text[fid],
        }
        for c in clustering.clusters
        for fid in c.members
    ]


def description_records(table: pa.Table, layer: int) -> list[DescriptionRecord]:
    """The description records (as the runners take them) of a ``descriptions`` table of ``layer``."""
    return [
        DescriptionRecord(
            layer=layer,
            feature_id=int(r["feature_id"]),
            status=r["status"],
            description=r["description"],
            confidence=r["confidence"],
            error=r["error"],
            top_sample_ids=list(r["top_sample_ids"] or []),
            negative_sample_ids=list(r["negative_sample_ids"] or []),
            call=CallInfo(
                backend=r["backend"] or "",
                model=r["model"] or "",
                prompt_version=r["prompt_version"] or "",
                cache_key=r["cache_key"] or "",
            ),
        )
        for r in table.to_pylist()
    ]


def write_rows(lake: Lake, table: str, rows: list[dict[str, Any]], schema: pa.Schema, layer: int,
               meta: dict[str, Any]) -> str:
    """Write ``rows`` as ``table``'s partition of ``layer`` with ``meta``; the path written."""
    data = pa.Table.from_pylist(rows, schema=schema)
    return str(lake.write(table, data, layer=layer, meta=meta))
