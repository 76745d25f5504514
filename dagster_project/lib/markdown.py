"""Markdown for Dagster metadata: tables from Arrow, polars or row dicts, and PNG figures as data URIs.

Dagster renders ``MetadataValue.md`` in the UI; these are the only renderers the assets use.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
import pyarrow as pa


def png_md(png: bytes, alt: str = "") -> str:
    """A PNG as a markdown image with a base64 data URI."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def md_table(table: pa.Table, columns: Sequence[str] | None = None, limit: int | None = None) -> str:
    """A markdown table: floats to 3 decimals, integers as integers, NULL as empty."""
    if columns is not None:
        table = table.select(list(columns))
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        return "_(no rows)_"

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v).replace("|", "\\|")

    names = table.column_names
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
    lines += ["| " + " | ".join(cell(r[n]) for n in names) + " |" for r in table.to_pylist()]
    return "\n".join(lines)


def _md_cell(value: Any, limit: int = 160) -> str:
    text = " ".join(str(value if value is not None else "").split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.replace("|", "\\|")


def md_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], limit: int = 10) -> str:
    """A small markdown table of ``rows`` (cells flattened, pipes escaped)."""
    if not rows:
        return "_(no rows)_"
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows[:limit]:
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append(f"{v:.3f}" if isinstance(v, float) else _md_cell(v))
        out.append("| " + " | ".join(cells) + " |")
    if len(rows) > limit:
        out.append(f"\n_{len(rows) - limit} more rows_")
    return "\n".join(out)


def fmt_cell(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    if isinstance(v, list | tuple):
        return ", ".join(str(x) for x in v)
    return str(v)


def markdown_table(
    df: pl.DataFrame | pa.Table, columns: Sequence[str] | None = None, max_rows: int = 20, digits: int = 3
) -> str:
    """A markdown table of the first ``max_rows`` rows (``|`` escaped), with a note of the rest."""
    frame = df if isinstance(df, pl.DataFrame) else pl.from_arrow(df)
    assert isinstance(frame, pl.DataFrame)
    cols = list(columns) if columns is not None else frame.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in frame.head(max_rows).select(cols).iter_rows(named=True):
        lines.append("| " + " | ".join(fmt_cell(r[c], digits).replace("|", "\\|") for c in cols) + " |")
    if frame.height > max_rows:
        lines.append(f"\n_{frame.height - max_rows} more rows_")
    return "\n".join(lines)


def markdown_images(figs: Mapping[str, bytes]) -> str:
    """The figures as markdown images with base64 data URIs (Dagster renders them in the UI)."""
    return "\n\n".join(
        f"**{name}**\n\n{png_md(png, name)}" for name, png in figs.items()
    )
