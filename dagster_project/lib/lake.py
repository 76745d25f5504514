"""The Parquet lake: where each table lives, atomic writes, and the provenance record of every file.

Layout (see ``lake/README.md``)::

    <root>/<namespace>/<table>/[layer=L/][dataset=D/]part-0.parquet

Every file is written aside under a hidden ``.tmp-*`` name and renamed into place when complete, so a
reader never sees half a file and a rerun replaces a partition instead of appending to it. Partition
columns live only in the path (hive partitioning). Activation files carry a provenance record (model,
SAE, hook, dtype, config hash) in their Parquet key-value metadata under ``featurelake``.
"""

from __future__ import annotations

import json
import operator
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dagster_project.lib.datasets import check_slug

META_KEY = b"featurelake"
PART = "part-0.parquet"
PARQUET_OPTS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}

# Tables and which partition keys they carry, in path order.
TABLES: dict[str, tuple[str, ...]] = {
    "samples": ("dataset",),
    "tokens": ("dataset",),
    "activations": ("layer", "dataset"),
    "token_activations": ("layer", "dataset"),
    "residuals": ("layer", "dataset"),
}


PROFILE_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class LakeError(RuntimeError):
    """A lake file is missing, corrupt, or was made with another model / SAE / config."""


TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]*(/[a-z][a-z0-9_]*)*$")


def _check_table(table: str) -> str:
    if not isinstance(table, str) or not TABLE_NAME.match(table):
        raise LakeError(f"unsafe table name {table!r}: use lowercase words like 'activations' or 'stats/feature_stats'")
    return table


def _layer_value(v: Any) -> int:
    if isinstance(v, str) and v.isdecimal():
        return int(v)
    try:
        if isinstance(v, bool):
            raise TypeError
        layer = operator.index(v)  # ints and numpy ints; not floats, not bools
    except TypeError:
        raise LakeError(f"layer must be an integer >= 0, got {v!r}") from None
    if layer < 0:
        raise LakeError(f"layer must be >= 0, got {v}")
    return layer


def _part_dirs(table: str, layer: int | None, dataset: str | None) -> list[str]:
    # Known tables have fixed keys; others (stats/...) are partitioned by whichever keys are given, so a
    # per-(layer, dataset) statistic never silently drops its dataset and overwrites another's file.
    keys = TABLES.get(table) or tuple(k for k, v in (("layer", layer), ("dataset", dataset)) if v is not None)
    out = []
    for k in keys:
        v = layer if k == "layer" else dataset
        if v is None:
            raise LakeError(f"table {table!r} is partitioned by {keys}; {k} not given")
        if k == "layer":
            out.append(f"layer={_layer_value(v)}")
        else:
            try:
                out.append(f"dataset={check_slug(str(v))}")
            except ValueError as e:
                raise LakeError(str(e)) from e
    return out


@dataclass(frozen=True)
class Lake:
    """A lake root plus a namespace (the profile), local folder."""

    root: str
    namespace: str = "default"

    @property
    def base(self) -> Path:
        if not PROFILE_SLUG.match(self.namespace):
            raise LakeError(f"unsafe profile name {self.namespace!r} for a lake namespace")
        return Path(self.root).expanduser().resolve() / self.namespace

    def table_dir(self, table: str) -> Path:
        return self.base / _check_table(table)

    def partition_dir(self, table: str, layer: int | None = None, dataset: str | None = None) -> Path:
        return self.table_dir(table).joinpath(*_part_dirs(table, layer, dataset))

    def file(self, table: str, layer: int | None = None, dataset: str | None = None) -> Path:
        return self.partition_dir(table, layer, dataset) / PART

    def glob(self, table: str) -> str:
        depth = len(TABLES.get(table, ("layer",)))
        return str(self.table_dir(table) / "/".join(["*"] * depth) / "*.parquet")

    def exists(self, table: str, layer: int | None = None, dataset: str | None = None) -> bool:
        return self.file(table, layer, dataset).is_file()

    @property
    def catalog_path(self) -> Path:
        return self.base / "lake.duckdb"

    def sae_dir(self, layer: int) -> Path:
        return self.base / "sae" / f"layer={int(layer)}"

    # ------------------------------------------------------------------------------------------ writing

    def write(
        self,
        table_name: str,
        table: pa.Table,
        layer: int | None = None,
        dataset: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Path:
        with self.writer(table_name, table.schema, layer, dataset, meta) as w:
            w.write_table(table)
        return self.file(table_name, layer, dataset)

    @contextmanager
    def writer(
        self,
        table_name: str,
        schema: pa.Schema,
        layer: int | None = None,
        dataset: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Iterator[pq.ParquetWriter]:
        """A ParquetWriter on a hidden temp file, renamed over the partition's file only on success."""
        final = self.file(table_name, layer, dataset)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}.parquet.inprogress"
        if meta is not None:
            schema = schema.with_metadata({**(schema.metadata or {}), META_KEY: json.dumps(meta, sort_keys=True)})
        w = pq.ParquetWriter(str(tmp), schema, **PARQUET_OPTS)
        try:
            yield w
            w.close()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                w.close()
            finally:
                tmp.unlink(missing_ok=True)
            raise

    def remove_partition(self, table: str, layer: int | None = None, dataset: str | None = None) -> None:
        d = self.partition_dir(table, layer, dataset)
        if d.exists():
            shutil.rmtree(d)

    def clean_temp(self) -> int:
        """Delete leftovers of writes that were killed mid-way (never visible to readers)."""
        n = 0
        if self.base.exists():
            for p in self.base.rglob(".tmp-*"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                n += 1
        return n

    # ------------------------------------------------------------------------------------------ reading

    def read_meta(self, table: str, layer: int | None = None, dataset: str | None = None) -> dict[str, Any]:
        path = self.file(table, layer, dataset)
        if not path.is_file():
            raise LakeError(f"{path} does not exist: materialize {table} for layer={layer} dataset={dataset}")
        try:
            md = pq.read_schema(str(path)).metadata or {}
        except (pa.ArrowInvalid, OSError) as e:
            raise LakeError(f"{path} is not a readable Parquet file ({e}); rerun that partition to rewrite it") from e
        raw = md.get(META_KEY)
        try:
            return json.loads(raw) if raw else {}
        except ValueError as e:
            raise LakeError(f"{path}: its provenance record is not valid JSON ({e}); rerun that partition") from e

    def read(self, table: str, layer: int | None = None, dataset: str | None = None, **kw: Any) -> pa.Table:
        path = self.file(table, layer, dataset)
        if not path.is_file():
            raise LakeError(f"{path} does not exist: materialize {table} for layer={layer} dataset={dataset}")
        try:
            return pq.read_table(str(path), **kw)
        except (pa.ArrowInvalid, OSError) as e:
            raise LakeError(f"{path} is not a readable Parquet file ({e}); rerun that partition to rewrite it") from e

    def check_provenance(
        self, table: str, layer: int, dataset: str, expected: dict[str, Any], keys: tuple[str, ...]
    ) -> dict[str, Any]:
        """Raise if the file's recorded provenance differs from ``expected`` on any of ``keys``."""
        meta = self.read_meta(table, layer, dataset)
        diffs = {k: (meta.get(k), expected.get(k)) for k in keys if meta.get(k) != expected.get(k)}
        if diffs:
            detail = "; ".join(f"{k}: lake has {a!r}, profile wants {b!r}" for k, (a, b) in diffs.items())
            raise LakeError(
                f"{self.file(table, layer, dataset)} was extracted with another model/SAE/config ({detail}). "
                f"Re-extract it: featurelake backfill --layer {layer} --dataset {dataset} "
                f"(or materialize activations for partition {dataset}|{layer})"
            )
        return meta
