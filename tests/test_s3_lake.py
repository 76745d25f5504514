"""``FEATURELAKE_LAKE=s3://bucket/prefix``: the lake on an S3-compatible server (moto, on 127.0.0.1).

The server runs in this process on a free port; each test gets its own bucket. The lake is read and
written through fsspec (s3fs) and DuckDB reads it through the fsspec filesystem registered on its
connection (no httpfs extension). Covered: the unit-level API (write / read / views / query / catalog /
folders / LLM cache), a writer killed with SIGKILL mid-upload (no partial object is ever visible), and the
pipeline end to end through the ``featurelake`` command in subprocesses.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from dagster_project.lib.catalog import ReadOnlyError, build_catalog, query, table_globs, views_connection
from dagster_project.lib.lake import Lake, LakeError, local_copy, publish_dir, staged_dir, write_bytes
from dagster_project.lib.llm_cache import LLMCache

SECRET = f"featurelake-test-secret-{uuid.uuid4().hex}"  # must never reach the lake, the logs or Dagster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_root(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; ``FEATURELAKE_LAKE`` and the AWS variables point at it (dummy keys)."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("FEATURELAKE_S3_ENDPOINT_URL", s3_endpoint)
    bucket = f"lake-{uuid.uuid4().hex[:12]}"
    _client().create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/prefix"
    monkeypatch.setenv("FEATURELAKE_LAKE", root)
    return root


def _client():  # noqa: ANN202
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["FEATURELAKE_S3_ENDPOINT_URL"], region_name="us-east-1")


def _bucket(root: str) -> str:
    return root.removeprefix("s3://").split("/", 1)[0]


def _keys(root: str) -> list[str]:
    pages = _client().get_paginator("list_objects_v2").paginate(Bucket=_bucket(root))
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _uploads(root: str) -> list[dict]:
    return _client().list_multipart_uploads(Bucket=_bucket(root)).get("Uploads", [])


SCHEMA = pa.schema([("sample_id", pa.int32()), ("feature_id", pa.int32()), ("max_act", pa.float32())])


def _acts(n: int, start: int = 0) -> pa.Table:
    return pa.table({"sample_id": pa.array(range(start, start + n), pa.int32()),
                     "feature_id": pa.array([i % 7 for i in range(n)], pa.int32()),
                     "max_act": pa.array([0.5 + i for i in range(n)], pa.float32())}, schema=SCHEMA)


# ------------------------------------------------------------------------------------------ unit level


def test_write_read_views_query_and_catalog_on_s3(s3_root: str, tmp_path: Path) -> None:
    lake = Lake(s3_root, "tiny")
    path = lake.write("activations", _acts(5), layer=1, dataset="tr", meta={"model_id": "m", "hook": "h"})
    assert str(path) == f"{s3_root}/tiny/activations/layer=1/dataset=tr/part-0.parquet"
    lake.write("activations", _acts(3), layer=1, dataset="2024")
    lake.write("samples", pa.table({"sample_id": pa.array([0, 1], pa.int32()), "text": ["a", "b"]}), dataset="tr")
    lake.write("stats/feature_stats", pa.table({"feature_id": [1, 2], "selectivity": [0.5, -0.5]}), layer=1)
    assert lake.exists("activations", 1, "tr") and not lake.exists("activations", 2, "tr")
    assert lake.read("activations", 1, "tr").equals(_acts(5))
    assert lake.read("activations", 1, "tr", columns=["feature_id"]).num_columns == 1
    assert lake.read_meta("activations", 1, "tr") == {"model_id": "m", "hook": "h"}
    with pytest.raises(LakeError, match="does not exist"):
        lake.read("activations", 3, "tr")
    assert "prefix/tiny/activations/layer=1/dataset=tr/part-0.parquet" in _keys(s3_root)

    # A rerun replaces the object; a failed write leaves the old one and no upload behind.
    lake.write("activations", _acts(4, start=10), layer=1, dataset="tr", meta={"model_id": "m2"})
    with pytest.raises(RuntimeError, match="boom"), lake.writer("activations", SCHEMA, 1, "tr") as w:
        w.write_table(_acts(99))
        raise RuntimeError("boom")
    assert lake.read("activations", 1, "tr").equals(_acts(4, start=10))
    assert lake.read_meta("activations", 1, "tr") == {"model_id": "m2"}
    assert _uploads(s3_root) == []

    # Views over s3:// globs, through the fsspec filesystem registered on the connection.
    assert set(table_globs(lake)) == {"activations", "samples", "feature_stats"}
    con = views_connection(lake)
    rows = con.sql("select layer, dataset, count(*) from activations group by all order by all").fetchall()
    assert rows == [(1, "2024", 3), (1, "tr", 4)]
    types = {r[0]: r[1] for r in con.sql("describe activations").fetchall()}
    assert types["layer"] == "BIGINT" and types["dataset"] == "VARCHAR"
    assert con.sql("select count(*) from feature_stats where layer = 1").fetchall() == [(2,)]
    con.close()

    # featurelake sql's query(): answers, refuses anything but SELECT / EXPLAIN.
    assert query(lake, "select count(distinct sample_id) from activations").fetchall() == [(7,)]
    for bad in ("create table x as select 1", "copy activations to 'x.parquet'", "drop view activations"):
        with pytest.raises(ReadOnlyError):
            query(lake, bad)

    # The catalog is built locally and uploaded whole; its views read s3:// with the filesystem registered.
    cat, names = build_catalog(lake)
    assert str(cat) == f"{s3_root}/tiny/lake.duckdb" and set(names) == {"activations", "samples", "feature_stats"}
    local = tmp_path / "lake.duckdb"
    local.write_bytes(lake.fs.cat_file(cat.path))
    with duckdb.connect(str(local), read_only=True) as c:
        c.register_filesystem(lake.fs)
        assert c.sql("select count(*) from activations").fetchall() == [(7,)]
    assert not (tmp_path / "prefix").exists() and _uploads(s3_root) == []

    lake.remove_partition("activations", 1, "2024")
    assert query(lake, "select distinct dataset from activations").fetchall() == [("tr",)]


def test_folders_publish_with_marker_last_and_load_from_a_local_copy(s3_root: str, tmp_path: Path) -> None:
    lake = Lake(s3_root, "tiny")
    dest = lake.sae_dir(1)
    with pytest.raises(LakeError, match="missing FINISHED.json"):
        local_copy(dest, "FINISHED.json")

    with staged_dir(dest, "FINISHED.json") as out:  # what the sae asset does on S3
        (out / "sae").mkdir(parents=True)
        (out / "sae" / "weights.bin").write_bytes(b"v1")
        (out / "sae" / "old.bin").write_bytes(b"stale")
        (out / "FINISHED.json").write_text(json.dumps({"sae_id": "v1"}))
    copy = local_copy(dest, "FINISHED.json")
    assert (copy / "sae" / "weights.bin").read_bytes() == b"v1" and (copy / "FINISHED.json").is_file()
    assert local_copy(dest, "FINISHED.json") == copy  # unchanged folder: downloaded once

    # A build that fails publishes nothing.
    with pytest.raises(RuntimeError), staged_dir(dest, "FINISHED.json") as out:
        out.mkdir(parents=True)
        (out / "FINISHED.json").write_text("{}")
        raise RuntimeError("training failed")
    assert local_copy(dest, "FINISHED.json") == copy

    # Republishing replaces the folder and drops stale objects; a new copy is downloaded.
    new = tmp_path / "v2"
    (new / "sae").mkdir(parents=True)
    (new / "sae" / "weights.bin").write_bytes(b"v2")
    (new / "FINISHED.json").write_text(json.dumps({"sae_id": "v2"}))
    publish_dir(new, dest, "FINISHED.json")
    assert [k.rsplit("/sae/layer=1/", 1)[1] for k in _keys(s3_root)] == ["FINISHED.json", "sae/weights.bin"]
    copy2 = local_copy(dest, "FINISHED.json")
    assert copy2 != copy and (copy2 / "sae" / "weights.bin").read_bytes() == b"v2"

    # An upload killed before its marker (simulated: the marker removed) is refused.
    lake.fs.rm_file(f"{dest.path}/FINISHED.json")
    with pytest.raises(LakeError, match="no finished folder"):
        local_copy(dest, "FINISHED.json")
    with pytest.raises(LakeError, match="unfinished"):
        publish_dir(tmp_path / "v2" / "sae", dest, "FINISHED.json")

    png = write_bytes(lake.base / "report" / "layer=1" / "plot.png", b"\x89PNG")
    assert lake.fs.cat_file(png.path) == b"\x89PNG"


def test_llm_cache_accepts_the_s3_lake_base(s3_root: str) -> None:
    cache = LLMCache(Lake(s3_root, "tiny").base / "llm_cache")
    key = "ab" * 32
    assert cache.get(key) is None and key not in cache and len(cache) == 0
    cache.put(key, {"text": "reply"})
    assert cache.get(key)["text"] == "reply" and key in cache and len(cache) == 1
    assert f"prefix/tiny/llm_cache/ab/{key}.json" in _keys(s3_root)
    cache.invalidate(key)
    assert key not in cache and cache.remove_stale_temp_files() == 0


# ------------------------------------------------------------------------------------------ killed writer

KILLED_WRITER = textwrap.dedent("""
    import os, signal
    from contextlib import ExitStack
    import numpy as np, pyarrow as pa
    from dagster_project.lib.lake import Lake

    SCHEMA = pa.schema([("sample_id", pa.int32()), ("feature_id", pa.int32()), ("max_act", pa.float32())])
    lake = Lake(os.environ["FEATURELAKE_LAKE"], "tiny")
    rng = np.random.default_rng(0)
    n = 1_000_000  # ~8 MB of incompressible values a batch: parts of the multipart upload get sent
    batch = pa.table({"sample_id": pa.array(np.arange(n, dtype=np.int32)),
                      "feature_id": pa.array(rng.integers(0, 2**31 - 1, n, dtype=np.int32)),
                      "max_act": pa.array(rng.random(n, dtype=np.float32))}, schema=SCHEMA)
    with ExitStack() as stack:  # as extraction does: several partitions open at once
        old = stack.enter_context(lake.writer("activations", SCHEMA, 1, "tr", {"run": "killed"}))
        new = stack.enter_context(lake.writer("activations", SCHEMA, 1, "te", {"run": "killed"}))
        for _ in range(2):
            old.write_table(batch)
            new.write_table(batch)
        print("written", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_write_leaves_no_partial_partition(s3_root: str) -> None:
    lake = Lake(s3_root, "tiny")
    lake.write("activations", _acts(6), layer=1, dataset="tr", meta={"run": "good"})
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER], env=dict(os.environ), capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "written" in proc.stdout
    uploads = _uploads(s3_root)
    assert uploads, "the writer should have sent parts before it was killed"
    keys = _keys(s3_root)
    assert [k for k in keys if "/activations/" in k] == ["prefix/tiny/activations/layer=1/dataset=tr/part-0.parquet"]

    # The earlier version is intact; the never-finished partition is invisible to every reader.
    assert lake.read("activations", 1, "tr").equals(_acts(6))
    assert lake.read_meta("activations", 1, "tr") == {"run": "good"}
    assert not lake.exists("activations", 1, "te")
    assert query(lake, "select dataset, count(*) from activations group by all").fetchall() == [("tr", 6)]

    # clean_temp aborts the dead uploads (they were never visible; this only frees their storage): given
    # folders, only the uploads under them (dataset=te's, not dataset=tr's); without, every one left.
    assert len(uploads) == 2
    assert lake.clean_temp([lake.partition_dir("activations", 1, "te")]) == 1 and len(_uploads(s3_root)) == 1
    assert lake.clean_temp() == 1 and _uploads(s3_root) == []
    assert lake.read("activations", 1, "tr").num_rows == 6


# ------------------------------------------------------------------------------------------ end to end

CLI = [sys.executable, "-m", "dagster_project.cli"]


def _cli(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"featurelake {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def test_sae_asset_trains_into_s3_and_loads_from_there(
    tiny_model_dir: Path, small_registry: Path, s3_root: str
) -> None:
    """The ``sae`` asset (profile source ``train``) on an S3 lake: built locally, uploaded marker last."""
    import dagster as dg

    from assets.sae import sae as sae_asset
    from dagster_project.lib.datasets import load_dataset, parse_registry
    from dagster_project.resources import LakeResource, ModelResource, SAEResource

    lake = Lake(s3_root, "tiny")
    specs = parse_registry()
    lake.write("samples", load_dataset(specs["tr"], specs).table, dataset="tr")
    sae_res = SAEResource(source="train", width=64, k=8, train_tokens=1000, epochs=1, batch_size=64)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("layer", ["1"])
    result = dg.materialize(
        [sae_asset], partition_key="1", instance=instance,
        resources={"lake": LakeResource(root=s3_root, namespace="tiny"), "sae": sae_res,
                   "model": ModelResource(model_id=str(tiny_model_dir), max_tokens=64, batch_tokens=512)},
    )
    assert result.success
    keys = [k.split("/sae/layer=1/", 1)[1] for k in _keys(s3_root) if "/sae/layer=1/" in k]
    assert "FINISHED.json" in keys and "sae/cfg.json" in keys and len(keys) >= 3
    marker = json.loads(lake.fs.cat_file(f"{lake.sae_dir(1).path}/FINISHED.json"))
    assert marker["path"] == f"{s3_root}/tiny/sae/layer=1"
    loaded = sae_res.load(1, lake)
    assert loaded.sae_id == marker["sae_id"] and loaded.d_sae == 64 and loaded.d_in == 64


def test_demo_and_sql_on_s3(tiny_profile: Path, small_registry: Path, s3_root: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    assert env["FEATURELAKE_LAKE"] == s3_root

    demo = _cli(["demo"], env)
    rows = json.loads(_cli(["sql", "select layer, dataset, count(*) as n from activations group by all "
                                   "order by all", "--format", "json"], env).stdout)
    assert [(r["layer"], r["dataset"]) for r in rows] == [(1, "oo"), (1, "te"), (1, "tr")]
    assert all(r["n"] > 0 for r in rows)
    refused = _cli(["sql", "create table x as select 1"], env, check=False)
    assert refused.returncode == 2 and "read-only" in refused.stderr

    keys = _keys(s3_root)
    for want in ["samples/dataset=tr/part-0.parquet", "tokens/dataset=tr/part-0.parquet",
                 "activations/layer=1/dataset=oo/part-0.parquet", "token_activations/layer=1/dataset=te/part-0.parquet",
                 "stats/feature_stats/layer=1/part-0.parquet",
                 "stats/selected_features/layer=1/part-0.parquet", "probes_saved/layer=1/config.json",
                 "report/layer=1/index.html", "lake.duckdb"]:
        assert f"prefix/tiny/{want}" in keys, f"{want} not in the bucket: {keys}"
    assert any(k.startswith("prefix/tiny/report/layer=1/") and k.endswith(".png") for k in keys)
    assert _uploads(s3_root) == []
    assert not (tmp_path / "lake").exists(), "nothing is written to the local lake folder"

    # Saved probes load from a local copy of their S3 folder (as `featurelake score` does).
    from dagster_project.scoring import find_probe

    lake = Lake(s3_root, "tiny")
    probe_id = lake.read("stats/probes", layer=1).column("probe_id")[0].as_py()
    folder, layer = find_probe(lake, probe_id)
    assert layer == 1 and (folder / "probe.json").is_file() and (folder.parent / "config.json").is_file()

    # Credentials come from the environment only: not in the lake, the logs or Dagster's storage.
    secret = SECRET.encode()
    for k in keys:
        assert secret not in _client().get_object(Bucket=_bucket(s3_root), Key=k)["Body"].read(), k
    assert SECRET not in demo.stdout + demo.stderr
    for f in (tmp_path / "dagster_home").rglob("*"):
        if f.is_file():
            assert secret not in f.read_bytes(), f
