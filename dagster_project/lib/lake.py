"""The Parquet lake: where each table lives, atomic writes, and the provenance record of every file.

Layout (see ``lake/README.md``)::

    <root>/<namespace>/<table>/[layer=L/][dataset=D/]part-0.parquet

The root is a local folder or a remote URL (``s3://bucket/prefix``), reached through fsspec. Either way a
reader never sees half a file and a rerun replaces a partition instead of appending to it:

- local: every file is written aside under a hidden ``.tmp-*`` name and renamed into place when complete;
- remote (S3): every object is streamed as one multipart upload that only its completion
  (``CompleteMultipartUpload``, after the Parquet footer) makes visible, replacing the old object whole; a
  killed writer leaves no object, only an incomplete upload, invisible to readers, that
  :meth:`Lake.clean_temp` aborts. Folder-shaped artifacts
  (a trained SAE, saved probes) are built locally and uploaded with their completion marker last
  (:func:`staged_dir`, :func:`publish_dir`); loaders download them to a local cache (:func:`local_copy`)
  and refuse a folder without its marker. Small files (plots, an HTML page) are one ``PUT`` each
  (:func:`write_bytes`).

Credentials and the endpoint of a remote lake come only from the environment (``AWS_*`` variables, the
usual AWS config files, ``FEATURELAKE_S3_ENDPOINT_URL``); nothing of them is written to the lake or logged.

Partition columns live only in the path (hive partitioning). Activation files carry a provenance record
(model, SAE, hook, dtype, config hash) in their Parquet key-value metadata under ``featurelake``.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from upath import UPath

from dagster_project.lib.datasets import check_slug
from dagster_project.lib.tables import TABLES as REGISTRY

META_KEY = b"featurelake"
PART = "part-0.parquet"
PARQUET_OPTS: dict[str, Any] = {"compression": "zstd", "compression_level": 3}
# The two big sparse tables: dictionary encoding only where values repeat (sample and position keys), not on
# feature ids and activations, where it costs time and saves nothing. Measured on realistic rows (BENCHMARKS.md):
# 1.5-1.8x faster writes, files no larger.
# Per-token residuals likewise: a dictionary of float16 values saved 7% on a bfloat16 model's vectors, lost 2% on
# a float32 model's, and took 1.6-2x the encode time (27-34 vs 17 us a token at d_model 640, measured).
TABLE_PARQUET_OPTS: dict[str, dict[str, Any]] = {
    "token_activations": {"compression_level": 1, "use_dictionary": ["sample_id", "token_pos"]},
    "activations": {"use_dictionary": ["sample_id"]},
    "token_residuals": {"use_dictionary": ["sample_id", "token_pos"]},
}


def parquet_opts(table_name: str) -> dict[str, Any]:
    return {**PARQUET_OPTS, **TABLE_PARQUET_OPTS.get(table_name, {})}


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` over ``final``: the old folder is moved aside, the new one renamed
    in, the old one deleted. A kill between the two renames leaves a hidden ``.old-<name>-*`` folder (and, for
    that moment, no ``final``); the next replace of the same folder deletes such leftovers."""
    old: Path | None = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    for stale in final.parent.glob(f".old-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


# Buffered bytes before a remote writer sends a part of its multipart upload (S3's minimum is 5 MiB).
REMOTE_BLOCK_SIZE = 8 << 20

# Tables whose partition keys are fixed (in path order, from the registry, ``lib/tables.py``): the corpus and
# activation tables. A ``stats/...`` table is partitioned by whichever keys a write gives (``_part_dirs``).
TABLES: dict[str, tuple[str, ...]] = {
    name: spec.partition_keys for name, spec in REGISTRY.items() if not name.startswith("stats/")
}


PROFILE_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

# A lake path: a local Path, or a UPath (``s3://...``) whose ``.fs`` is the lake's filesystem.
LakePath = Path | UPath


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


# ------------------------------------------------------------------------------------------ filesystems


def protocol_of(root: str) -> str:
    """``"s3"`` for ``s3://bucket/prefix``, ``""`` for a local folder (also ``file://...``)."""
    proto = root.split("://", 1)[0].lower() if "://" in root else ""
    return "" if proto in ("file", "local") else proto


def storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options for a remote lake, read from the environment only (never stored in the lake).

    S3: ``FEATURELAKE_S3_ENDPOINT_URL`` names an S3-compatible server (MinIO, a test server); keys, region
    and profile come from botocore's usual sources (``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, ``~/.aws``, ...).
    Listings are never cached: another process may have written since.
    """
    if protocol in ("s3", "s3a"):
        opts: dict[str, Any] = {"use_listings_cache": False}
        endpoint = os.environ.get("FEATURELAKE_S3_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts
    return {}


def download_root() -> Path:
    """Local cache of folders downloaded from a remote lake: ``$FEATURELAKE_CACHE/lake``, else a folder in the
    system temp dir. Entries are keyed by content and never change; delete the folder to reclaim space."""
    env = os.environ.get("FEATURELAKE_CACHE")
    if env:
        return Path(env).expanduser() / "lake"
    return Path(tempfile.gettempdir()) / f"featurelake-lake-cache-{os.getuid()}"


def _key(path: LakePath) -> str:
    """The filesystem-level path of a lake path (``bucket/key`` for S3, the absolute path locally)."""
    return path.path if isinstance(path, UPath) else str(path)


# A streaming local writer makes its file durable as it goes, a sync per this many new bytes (``sync``), so
# that closing it (the final fsync) has little left to write: the tail of an extraction stays short.
SYNC_BYTES = 2**20
_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class LocalPartWriter(pq.ParquetWriter):
    """The ParquetWriter behind :meth:`Lake.writer` on a local lake: a hidden temp file that the context
    renames into place. Beyond ``write_table``, a streaming caller may call, from its own thread:

    - :meth:`sync` after a write: flush what reached the file so far to disk (every ``SYNC_BYTES``);
    - :meth:`finish` when done: close and fsync the file (idempotent; the context's exit calls it anyway,
      and then only renames), so the closes of many files run side by side instead of one after another.
    """

    def __init__(self, path: Path, schema: pa.Schema, **opts: Any) -> None:
        super().__init__(str(path), schema, **opts)
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY)
        self._synced = 0
        self._done = False

    def sync(self) -> None:
        if self._fd is None:
            return
        size = os.fstat(self._fd).st_size
        if size - self._synced >= SYNC_BYTES:
            _fdatasync(self._fd)
            self._synced = size

    def finish(self) -> None:
        if self._done:
            return
        self.close()
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        self._done = True

    def abort(self) -> None:
        try:
            self.close()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class RemotePartWriter(pq.ParquetWriter):
    """The ParquetWriter behind :meth:`Lake.writer` on a remote lake, over one multipart upload (``f``,
    opened with ``autocommit=False``): :meth:`finish` writes the footer and uploads the last part (publishing
    nothing; the context's exit completes the upload); :meth:`sync` does nothing (parts upload as they fill)."""

    def __init__(self, f: Any, schema: pa.Schema, **opts: Any) -> None:
        super().__init__(f, schema, **opts)  # a file object: closing the writer leaves f open
        self.f = f
        self._done = False

    def sync(self) -> None:
        pass

    def finish(self) -> None:
        if self._done:
            return
        self.close()
        self.f.close()
        self._done = True


def lake_path(location: str | os.PathLike[str]) -> LakePath:
    """A lake path from its string form (as stored in tables and metadata): ``Path`` or ``UPath``."""
    text = os.fspath(location)
    proto = protocol_of(text)
    return UPath(text, **storage_options(proto)) if proto else Path(text)


def write_bytes(path: LakePath, data: bytes) -> LakePath:
    """Write one small file of the lake whole: aside and renamed locally, one ``PUT`` remotely."""
    if isinstance(path, UPath):
        path.fs.pipe_file(_key(path), data)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}{path.suffix}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def staged_dir(dest: LakePath, marker: str | None = None) -> Iterator[Path]:
    """A local folder in which to build the lake folder ``dest``.

    Local lake: ``dest`` itself (the builder writes aside and renames, as it always does). Remote lake: a
    folder in a local temp dir, published to ``dest`` by :func:`publish_dir` (``marker`` last) when the
    block ends without an error, and deleted either way.
    """
    if not isinstance(dest, UPath):
        yield dest
        return
    with tempfile.TemporaryDirectory(prefix="featurelake-stage-") as tmp:
        local = Path(tmp) / (dest.name or "out")
        yield local
        publish_dir(local, dest, marker)


def publish_dir(local: Path, dest: UPath, marker: str | None = None) -> UPath:
    """Upload the local folder ``local`` to the remote folder ``dest``, replacing what was there.

    The marker file (``FINISHED.json``, ``config.json``) is deleted first, so readers refuse the folder
    while it changes; then every other file is uploaded (each object whole), objects of the old folder that
    are not in the new one are deleted, and the marker is uploaded last. A killed upload leaves a folder
    without its marker, which loaders refuse until a rerun publishes it again. Without a marker, each
    object is still replaced whole.
    """
    fs, root = dest.fs, _key(dest)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    rels = {p.relative_to(local).as_posix() for p in files}
    if marker is not None:
        if marker not in rels:
            raise LakeError(f"{local} has no {marker}: refusing to publish an unfinished folder")
        if fs.exists(f"{root}/{marker}"):
            fs.rm_file(f"{root}/{marker}")
    for p in files:
        rel = p.relative_to(local).as_posix()
        if rel != marker:
            fs.put_file(str(p), f"{root}/{rel}")
    stale = [k for k in _listing(fs, root) if k not in rels]
    if stale:
        fs.rm([f"{root}/{k}" for k in stale])
    if marker is not None:
        fs.put_file(str(local / marker), f"{root}/{marker}")
    return dest


def local_copy(src: LakePath, marker: str) -> Path:
    """A local folder holding the lake folder ``src``.

    Local lake: ``src`` itself (its loader checks the marker). Remote lake: a download into
    :func:`download_root`, keyed by the folder's listing (names, sizes, ETags) so an unchanged folder is
    fetched once; refused (``LakeError``) when ``marker`` is missing or the folder changes meanwhile.
    """
    if not isinstance(src, UPath):
        return src
    fs, root = src.fs, _key(src)
    listing = _listing(fs, root)
    if marker not in listing:
        raise LakeError(f"{src}: no finished folder here (missing {marker}); materialize the asset that writes it")
    digest = hashlib.sha256(json.dumps([str(src), listing], sort_keys=True).encode()).hexdigest()[:24]
    dest = download_root() / digest
    if (dest / marker).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{uuid.uuid4().hex}"
    try:
        for rel in sorted(listing, key=lambda r: r == marker):  # the marker last
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{rel}", str(target))
        if _listing(fs, root) != listing:
            raise LakeError(f"{src} changed while it was downloaded (being republished?): try again")
        try:
            os.replace(tmp, dest)
        except OSError:  # another process put the same download there first
            if not (dest / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _listing(fs: AbstractFileSystem, root: str) -> dict[str, list[Any]]:
    """``{relative name: [size, etag]}`` of every object under ``root``."""
    out = {}
    for k, info in fs.find(root, detail=True).items():
        if k != root:
            tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
            out[k[len(root) + 1 :]] = [info.get("size"), str(tag)]
    return out


@dataclass(frozen=True)
class Lake:
    """A lake root (a local folder or a remote URL such as ``s3://bucket/prefix``) plus a namespace."""

    root: str
    namespace: str = "default"

    @property
    def remote(self) -> bool:
        return protocol_of(self.root) != ""

    @property
    def base(self) -> LakePath:
        """The namespace's folder: a ``Path`` for a local lake, a ``UPath`` (``s3://...``) for a remote one."""
        if not PROFILE_SLUG.match(self.namespace):
            raise LakeError(f"unsafe profile name {self.namespace!r} for a lake namespace")
        if self.remote:
            proto = protocol_of(self.root)
            return UPath(self.root.rstrip("/"), **storage_options(proto)) / self.namespace
        return Path(self.root).expanduser().resolve() / self.namespace

    @cached_property
    def fs(self) -> AbstractFileSystem:
        """The fsspec filesystem of the lake (register it on a DuckDB connection to read ``s3://`` paths)."""
        base = self.base
        return base.fs if isinstance(base, UPath) else fsspec.filesystem("file")

    def table_dir(self, table: str) -> LakePath:
        return self.base / _check_table(table)

    def partition_dir(self, table: str, layer: int | None = None, dataset: str | None = None) -> LakePath:
        return self.table_dir(table).joinpath(*_part_dirs(table, layer, dataset))

    def file(self, table: str, layer: int | None = None, dataset: str | None = None) -> LakePath:
        return self.partition_dir(table, layer, dataset) / PART

    def glob(self, table: str) -> str:
        depth = len(TABLES.get(table, ("layer",)))
        return str(self.table_dir(table) / "/".join(["*"] * depth) / "*.parquet")

    def exists(self, table: str, layer: int | None = None, dataset: str | None = None) -> bool:
        return self.file(table, layer, dataset).is_file()

    @property
    def catalog_path(self) -> LakePath:
        return self.base / "lake.duckdb"

    def sae_dir(self, layer: int) -> LakePath:
        return self.base / "sae" / f"layer={int(layer)}"

    # ------------------------------------------------------------------------------------------ writing

    def write(
        self,
        table_name: str,
        table: pa.Table,
        layer: int | None = None,
        dataset: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> LakePath:
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
    ) -> Iterator[LocalPartWriter | RemotePartWriter]:
        """A ParquetWriter whose file replaces the partition's file only on success.

        Local: a hidden temp file, fsynced and renamed over the partition's file. Remote: one multipart
        upload streamed as it is written; only its completion at the end makes the object visible
        (replacing the old one whole), and a failure aborts it. A streaming writer may call the writer's
        ``sync`` after writes and ``finish`` from its own thread (see :class:`LocalPartWriter`).
        """
        final = self.file(table_name, layer, dataset)
        if meta is not None:
            schema = schema.with_metadata({**(schema.metadata or {}), META_KEY: json.dumps(meta, sort_keys=True)})
        if isinstance(final, UPath):
            with self._remote_writer(final, schema, table_name) as w:
                yield w
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}.parquet.inprogress"
        w = LocalPartWriter(tmp, schema, **parquet_opts(table_name))
        try:
            yield w
            w.finish()
            os.replace(tmp, final)
        except BaseException:
            try:
                w.abort()
            finally:
                tmp.unlink(missing_ok=True)
            raise

    @contextmanager
    def _remote_writer(self, final: UPath, schema: pa.Schema, table_name: str) -> Iterator[RemotePartWriter]:
        # autocommit=False: close() uploads the last part but publishes nothing; commit() completes the
        # upload (the object appears whole, replacing any old one) and discard() aborts it. Opened through
        # _open, not open, which would also enlist the file in the filesystem's transaction bookkeeping.
        f = self.fs._open(_key(final), mode="wb", autocommit=False, block_size=REMOTE_BLOCK_SIZE)
        w = RemotePartWriter(f, schema, **parquet_opts(table_name))
        try:
            yield w
            w.finish()
            f.commit()
        except BaseException:
            try:
                w.close()
            finally:
                f.discard()
                f.closed = True  # discarded: nothing left to flush, even when garbage-collected
            raise

    def remove_partition(self, table: str, layer: int | None = None, dataset: str | None = None) -> None:
        d = self.partition_dir(table, layer, dataset)
        if isinstance(d, UPath):
            if self.fs.exists(_key(d)):
                self.fs.rm(_key(d), recursive=True)
        elif d.exists():
            shutil.rmtree(d)

    def clean_temp(self, folders: Iterable[LakePath] | None = None) -> int:
        """Delete leftovers of writes that were killed mid-way (never visible to readers).

        Local: ``.tmp-*`` files and folders. S3: incomplete multipart uploads. With ``folders`` (the
        partition folders a step is about to write), only what lies directly in those: steps running side
        by side (one extraction per GPU) then never delete each other's writes in flight. Without, the
        whole namespace: only for when nothing else is writing to it.
        """
        if self.remote:
            return sum(self._abort_uploads(f) for f in folders) if folders is not None else self._abort_uploads()
        n = 0
        local = [Path(str(f)) for f in folders] if folders is not None else None  # a local lake: Paths
        base = Path(str(self.base))
        found = ([p for f in local if f.is_dir() for p in f.glob(".tmp-*")] if local is not None
                 else list(base.rglob(".tmp-*")) if base.exists() else [])
        for p in found:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
        return n

    def _abort_uploads(self, folder: LakePath | None = None) -> int:
        fs = self.fs
        if not all(hasattr(fs, a) for a in ("split_path", "call_s3", "abort_mpu")):
            return 0  # a remote filesystem without multipart uploads leaves nothing behind
        bucket, prefix, _ = fs.split_path(_key(self.base if folder is None else folder))
        n = 0
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix.rstrip("/") + "/"}
        while True:
            page = fs.call_s3("list_multipart_uploads", **kw)
            for up in page.get("Uploads", []) or []:
                fs.abort_mpu(bucket, up["Key"], up["UploadId"])
                n += 1
            if not page.get("IsTruncated"):
                return n
            kw.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))

    # ------------------------------------------------------------------------------------------ reading

    def _parquet_source(self, path: LakePath) -> tuple[str, AbstractFileSystem | None]:
        return (_key(path), self.fs) if isinstance(path, UPath) else (str(path), None)

    def read_meta(self, table: str, layer: int | None = None, dataset: str | None = None) -> dict[str, Any]:
        path = self.file(table, layer, dataset)
        if not path.is_file():
            raise LakeError(f"{path} does not exist: materialize {table} for layer={layer} dataset={dataset}")
        where, fs = self._parquet_source(path)
        try:
            md = pq.read_schema(where, filesystem=fs).metadata or {}
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
        where, fs = self._parquet_source(path)
        try:
            return pq.read_table(where, filesystem=fs, **kw)
        except (pa.ArrowInvalid, OSError) as e:
            raise LakeError(f"{path} is not a readable Parquet file ({e}); rerun that partition to rewrite it") from e

    def check_provenance(
        self, table: str, layer: int, dataset: str, expected: dict[str, Any], keys: tuple[str, ...],
        hint: str = "",
    ) -> dict[str, Any]:
        """Raise if the file's recorded provenance differs from ``expected`` on any of ``keys``; ``hint`` (a
        sentence: the setting that reads the file as it is) goes before the command that re-extracts it."""
        meta = self.read_meta(table, layer, dataset)
        diffs = {k: (meta.get(k), expected.get(k)) for k in keys if meta.get(k) != expected.get(k)}
        if diffs:
            detail = "; ".join(f"{k}: lake has {a!r}, profile wants {b!r}" for k, (a, b) in diffs.items())
            raise LakeError(
                f"{self.file(table, layer, dataset)} was extracted with another model/SAE/config ({detail}). "
                + (f"{hint}. Or re-extract it" if hint else "Re-extract it")
                + f": featurelake backfill --layer {layer} --dataset {dataset} "
                f"(or materialize activations for partition {dataset}|{layer})"
            )
        return meta


# ------------------------------------------------------------------------------------------ token residuals


class TokenResiduals(NamedTuple):
    """The ``token_residuals`` of one layer, one row per real token, ordered by dataset (as asked), then
    ``sample_id``, then ``token_pos`` (BOS dropped: 0 is the first real token, as in ``tokens``)."""

    dataset: np.ndarray  # str (object) [N]
    sample_id: np.ndarray  # int32 [N]
    token_pos: np.ndarray  # int32 [N]
    resid: np.ndarray  # float32 [N, d_model]: the layer's output, within float16 precision


def read_token_residuals(lake: Lake, layer: int, datasets: Sequence[str] | str) -> TokenResiduals:
    """Every token's residual vector at ``layer`` in ``datasets`` as float32 (``resid * resid_scale``).

    The files hold float16 and a power-of-two scale per row (``lib/extraction/pooling.py``, ``float16_scaled``), so
    each value is the layer's output to float16's relative precision (2**-11). Like every activation reader,
    check the partitions' provenance first (``dagster_project.provenance.check_layer``); a dataset extracted
    without token residuals is a :class:`LakeError` that says how to extract them.
    """
    names = [datasets] if isinstance(datasets, str) else list(datasets)
    parts = []
    for name in names:
        if not lake.exists("token_residuals", layer, name):
            raise LakeError(
                f"{lake.file('token_residuals', layer, name)} does not exist: dataset {name!r} was extracted at "
                f"layer {layer} without token residuals; extract it with them (the activations asset's "
                f"write_token_residuals, or a profile with token_residuals: true): "
                f"featurelake backfill --layer {layer} --dataset {name}"
            )
        t = lake.read("token_residuals", layer, name)
        typ = t.schema.field("resid").type if "resid" in t.column_names else None
        if (typ is None or not pa.types.is_fixed_size_list(typ) or typ.value_type != pa.float16()
                or "resid_scale" not in t.column_names or t.column("resid").null_count):
            raise LakeError(f"{lake.file('token_residuals', layer, name)}: not a token_residuals file (resid "
                            f"fixed_size_list<float16>, resid_scale); rerun that partition to rewrite it")
        parts.append((name, t, typ.list_size))
    d_models = {d for _, _, d in parts}
    if len(d_models) > 1:
        raise LakeError(f"token_residuals of layer {layer} have different widths {sorted(d_models)} across {names}")
    d_model = d_models.pop() if d_models else 0
    n = sum(t.num_rows for _, t, _ in parts)
    out = TokenResiduals(np.empty(n, dtype=object), np.empty(n, np.int32), np.empty(n, np.int32),
                         np.empty((n, d_model), np.float32))
    at = 0
    for name, t, _ in parts:
        k = t.num_rows
        order = pc.sort_indices(t.select(["sample_id", "token_pos"]),
                                        [("sample_id", "ascending"), ("token_pos", "ascending")]).to_numpy()
        q = t.column("resid").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(k, d_model)
        scale = t.column("resid_scale").to_numpy()
        rows = slice(at, at + k)
        out.dataset[rows] = name
        out.sample_id[rows] = t.column("sample_id").to_numpy()[order]
        out.token_pos[rows] = t.column("token_pos").to_numpy()[order]
        np.multiply(q[order], scale[order, None], out=out.resid[rows], dtype=np.float32)
        at += k
    return out
