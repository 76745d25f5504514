"""The Arrow schemas of the lake tables an extraction writes (``activations``, ``token_activations``,
``tokens``, ``residuals``, ``token_residuals``) and the names of those written per (layer, dataset) partition."""

from __future__ import annotations

import pyarrow as pa

POOLED_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int32()),
        ("feature_id", pa.int32()),
        ("max_act", pa.float32()),
        ("mean_act", pa.float32()),
        ("argmax_token", pa.int32()),
        ("n_active_tokens", pa.int32()),
    ]
)
TOKEN_ACTS_SCHEMA = pa.schema(
    [("sample_id", pa.int32()), ("token_pos", pa.int32()), ("feature_id", pa.int32()), ("act", pa.float32())]
)
TOKENS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int32()),
        ("token_pos", pa.int32()),
        ("token_id", pa.int32()),
        ("token_text", pa.string()),
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
    ]
)


def token_residual_schema(d_model: int) -> pa.Schema:
    """One row per real token (``token_pos`` as in ``tokens`` and ``token_activations``): the layer's output
    as ``resid_scale * resid``. float16 halves float32's bytes, and DuckDB (2.0) reads a Parquet Float16
    column as FLOAT (tested in tests/lib/test_catalog.py); but Gemma's residual stream has a few "massive"
    values beyond float16's range (65,504: 70,656 at layer 9 of Gemma 3 270M, 93,184 at layer 12), so each
    row carries a power-of-two scale, 1.0 unless the row's largest |value| would overflow. The catalog's
    view applies the scale (``lib/catalog.py``); :func:`dagster_project.lib.lake.read_token_residuals`
    returns the float32 vectors."""
    return pa.schema(
        [
            ("sample_id", pa.int32()),
            ("token_pos", pa.int32()),
            ("resid", pa.list_(pa.float16(), d_model)),
            ("resid_scale", pa.float32()),
        ]
    )


def residual_schema(d_model: int) -> pa.Schema:
    return pa.schema(
        [
            ("sample_id", pa.int32()),
            ("resid_mean", pa.list_(pa.float32(), d_model)),
            ("resid_max", pa.list_(pa.float32(), d_model)),
        ]
    )


# What an extraction writes per (layer, dataset) partition; ``tokens`` is written per dataset.
LAYER_TABLES = ("activations", "token_activations", "residuals", "token_residuals")
