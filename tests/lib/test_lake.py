"""The Parquet lake (dagster_project/lib/lake.py): layout, atomic writes, provenance, corrupt files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dagster_project.lib.lake import META_KEY, Lake, LakeError

SCHEMA = pa.schema([("sample_id", pa.int32()), ("feature_id", pa.int32()), ("max_act", pa.float32())])
META = {"model": "google/gemma-3-270m", "sae": "topk-4096", "hook": "blocks.6.hook_resid_post",
        "dtype": "bfloat16", "config_hash": "abc123"}


def _acts(n: int, start: int = 0) -> pa.Table:
    return pa.table({"sample_id": pa.array(range(start, start + n), pa.int32()),
                     "feature_id": pa.array([i % 7 for i in range(n)], pa.int32()),
                     "max_act": pa.array([0.5 + i for i in range(n)], pa.float32())})


def _glob_count(lake: Lake, table: str) -> int:
    return duckdb.sql(f"select count(*) from read_parquet('{lake.glob(table)}')").fetchall()[0][0]


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(str(tmp_path / "lake"), "default")


def test_write_read_round_trip_with_provenance(lake: Lake, tmp_path: Path) -> None:
    path = lake.write("activations", _acts(5), layer=6, dataset="gold_alt", meta=META)
    assert path == tmp_path / "lake" / "default" / "activations" / "layer=6" / "dataset=gold_alt" / "part-0.parquet"
    assert lake.exists("activations", 6, "gold_alt") and not lake.exists("activations", 7, "gold_alt")
    back = lake.read("activations", 6, "gold_alt")
    assert back.schema.names == SCHEMA.names, "partition columns must live in the path only"
    assert back.cast(SCHEMA).to_pylist() == _acts(5).to_pylist()
    assert lake.read_meta("activations", 6, "gold_alt") == META
    assert json.loads(pq.read_schema(path).metadata[META_KEY]) == META
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    # no provenance record: an empty dict, not an error
    lake.write("samples", pa.table({"sample_id": [0]}), dataset="gold_alt")
    assert lake.read_meta("samples", dataset="gold_alt") == {}


def test_rerun_replaces_the_partition(lake: Lake) -> None:
    lake.write("activations", _acts(5), layer=1, dataset="a", meta=META)
    lake.write("activations", _acts(2, start=100), layer=1, dataset="a", meta={**META, "config_hash": "new"})
    lake.write("activations", _acts(3), layer=1, dataset="b", meta=META)
    part = lake.partition_dir("activations", 1, "a")
    assert sorted(p.name for p in part.iterdir()) == ["part-0.parquet"]
    assert lake.read("activations", 1, "a").column("sample_id").to_pylist() == [100, 101]
    assert lake.read_meta("activations", 1, "a")["config_hash"] == "new"
    assert _glob_count(lake, "activations") == 2 + 3


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_write_keeps_previous_file(lake: Lake, exc: type[BaseException]) -> None:
    lake.write("activations", _acts(4), layer=2, dataset="a", meta=META)
    part = lake.partition_dir("activations", 2, "a")
    with pytest.raises(exc), lake.writer("activations", SCHEMA, 2, "a", {**META, "sae": "other"}) as w:
        w.write_table(_acts(50, start=1000))
        # mid-write: the new rows sit in a hidden temp file that neither the glob nor the old file shows
        assert [p.name for p in part.iterdir() if p.name.startswith(".tmp-")], "writer should write aside"
        assert _glob_count(lake, "activations") == 4
        assert lake.read("activations", 2, "a").num_rows == 4
        raise exc("killed mid-way")
    assert sorted(p.name for p in part.iterdir()) == ["part-0.parquet"], "temp file left behind"
    assert lake.read("activations", 2, "a").column("sample_id").to_pylist() == [0, 1, 2, 3]
    assert lake.read_meta("activations", 2, "a")["sae"] == META["sae"]


def test_writer_in_batches(lake: Lake) -> None:
    with lake.writer("token_activations", SCHEMA, 3, "a", META) as w:
        for k in range(3):
            w.write_table(_acts(10, start=10 * k))
    t = lake.read("token_activations", 3, "a")
    assert t.column("sample_id").to_pylist() == list(range(30))
    assert lake.read_meta("token_activations", 3, "a") == META


def test_streaming_writer_syncs_as_it_goes_and_finishes_apart(lake: Lake, monkeypatch: pytest.MonkeyPatch) -> None:
    """A streaming writer (the extraction's) flushes its file to disk every SYNC_BYTES and may close and
    fsync it from its own thread (``finish``) before the context renames it; nothing shows until then."""
    from dagster_project.lib import lake as lake_mod

    synced: list[int] = []
    monkeypatch.setattr(lake_mod, "SYNC_BYTES", 1)
    monkeypatch.setattr(lake_mod, "_fdatasync", lambda fd: synced.append(fd))
    lake.write("activations", _acts(4), layer=5, dataset="a", meta=META)
    with lake.writer("activations", SCHEMA, 5, "a", META) as w:
        w.write_table(_acts(10))
        w.sync()
        w.sync()  # nothing new since the last sync: no second flush
        assert len(synced) == 1
        w.write_table(_acts(10, start=10))
        w.sync()
        assert len(synced) == 2
        w.finish()
        w.finish()  # idempotent: the context's exit calls it again
        assert not w.is_open
        assert pq.read_table(w.path).num_rows == 20, "finish should leave a complete file"
        assert lake.read("activations", 5, "a").num_rows == 4, "the old file stays until the rename"
    assert lake.read("activations", 5, "a").column("sample_id").to_pylist() == list(range(20))
    assert not [p for p in lake.partition_dir("activations", 5, "a").iterdir() if p.name.startswith(".tmp-")]


def test_temp_leftover_invisible_and_cleaned(lake: Lake) -> None:
    lake.write("activations", _acts(3), layer=1, dataset="a")
    part = lake.partition_dir("activations", 1, "a")
    # what a killed process leaves behind: a complete-looking Parquet file under a temp name, and a folder
    pq.write_table(_acts(99), part / ".tmp-0123abcd.parquet.inprogress")
    (lake.base / "stats" / ".tmp-dir").mkdir(parents=True)
    (lake.base / "stats" / ".tmp-dir" / "x.parquet").write_bytes(b"junk")
    (lake.base / ".tmp-1.duckdb").write_bytes(b"junk")
    assert _glob_count(lake, "activations") == 3
    assert lake.clean_temp() == 3
    assert not list(lake.base.rglob(".tmp-*"))
    assert lake.read("activations", 1, "a").num_rows == 3
    assert lake.clean_temp() == 0
    assert Lake(str(lake.base.parent / "nowhere")).clean_temp() == 0


def test_check_provenance(lake: Lake) -> None:
    lake.write("activations", _acts(3), layer=6, dataset="gold_alt", meta=META)
    keys = ("model", "sae", "hook", "config_hash")
    assert lake.check_provenance("activations", 6, "gold_alt", {**META, "dtype": "float32"}, keys) == META
    with pytest.raises(LakeError) as ei:
        lake.check_provenance("activations", 6, "gold_alt", {**META, "sae": "gemmascope-16k"}, keys)
    msg = str(ei.value)
    assert str(lake.file("activations", 6, "gold_alt")) in msg
    assert "sae: lake has 'topk-4096', profile wants 'gemmascope-16k'" in msg, msg
    assert "model" not in msg.split("(", 1)[1].split(")")[0], "only differing fields are named"
    assert "featurelake backfill --layer 6 --dataset gold_alt" in msg, msg
    # a file written without a record differs on every key
    lake.write("activations", _acts(3), layer=6, dataset="b")
    with pytest.raises(LakeError, match="model: lake has None, profile wants 'google/gemma-3-270m'"):
        lake.check_provenance("activations", 6, "b", META, keys)


@pytest.mark.parametrize("content", [b"this is not parquet at all", b"", b"PAR1" + b"\0" * 20])
def test_corrupt_file_is_a_lake_error(lake: Lake, content: bytes) -> None:
    path = lake.file("activations", 1, "a")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    for call in (lambda: lake.read("activations", 1, "a"), lambda: lake.read_meta("activations", 1, "a")):
        with pytest.raises(LakeError) as ei:
            call()
        assert str(path) in str(ei.value) and "not a readable Parquet file" in str(ei.value)
        assert "rerun that partition" in str(ei.value)


def test_truncated_file_is_a_lake_error(lake: Lake) -> None:
    path = lake.write("activations", _acts(1000), layer=1, dataset="a")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LakeError, match="not a readable Parquet file"):
        lake.read("activations", 1, "a")


def test_bad_provenance_json_is_a_lake_error(lake: Lake) -> None:
    path = lake.file("activations", 1, "a")
    path.parent.mkdir(parents=True)
    pq.write_table(_acts(2).replace_schema_metadata({META_KEY: b"{not json"}), path)
    with pytest.raises(LakeError, match="provenance record is not valid JSON"):
        lake.read_meta("activations", 1, "a")


def test_missing_partition(lake: Lake) -> None:
    with pytest.raises(LakeError) as ei:
        lake.read("activations", 4, "a")
    assert str(lake.file("activations", 4, "a")) in str(ei.value)
    assert "materialize activations for layer=4 dataset=a" in str(ei.value)


@pytest.mark.parametrize(("kw", "expect"), [
    ({"layer": 1, "dataset": "../x"}, "unsafe dataset name '../x'"),
    ({"layer": 1, "dataset": "A B"}, "unsafe dataset name 'A B'"),
    ({"layer": 1, "dataset": ""}, "unsafe dataset name ''"),
    ({"layer": 1, "dataset": "/abs"}, "unsafe dataset name '/abs'"),
    ({"layer": -1, "dataset": "a"}, "layer must be >= 0, got -1"),
    ({"layer": "-1", "dataset": "a"}, "layer must be an integer >= 0"),
    ({"layer": 1.5, "dataset": "a"}, "layer must be an integer >= 0, got 1.5"),
    ({"layer": "../1", "dataset": "a"}, "layer must be an integer >= 0"),
    ({"layer": True, "dataset": "a"}, "layer must be an integer >= 0, got True"),
    ({"layer": 1}, r"partitioned by \('layer', 'dataset'\); dataset not given"),
    ({"dataset": "a"}, r"partitioned by \('layer', 'dataset'\); layer not given"),
])
def test_unsafe_partition_values_refused(lake: Lake, tmp_path: Path, kw: dict[str, Any], expect: str) -> None:
    with pytest.raises(LakeError, match=expect):
        lake.write("activations", _acts(1), **kw)
    assert not (tmp_path / "lake").exists() or not list((tmp_path / "lake").rglob("*.parquet"))
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["lake"])


@pytest.mark.parametrize("table", ["../x", "/tmp/x", "stats/../../x", "Activations", "a b", "stats/", "stats//x"])
def test_unsafe_table_names_refused(lake: Lake, table: str) -> None:
    with pytest.raises(LakeError, match="unsafe table name"):
        lake.write(table, _acts(1), layer=1)


@pytest.mark.parametrize("namespace", ["../up", "A", "", "a/b"])
def test_unsafe_namespace_refused(tmp_path: Path, namespace: str) -> None:
    with pytest.raises(LakeError, match="unsafe profile name"):
        Lake(str(tmp_path), namespace).write("samples", _acts(1), dataset="a")


def test_layer_given_as_partition_key_string(lake: Lake) -> None:
    """Dagster partition keys are strings; numpy ints come from arrays."""
    assert lake.write("activations", _acts(1), layer="6", dataset="a").parent.parent.name == "layer=6"
    assert lake.file("activations", np.int64(6), "a") == lake.file("activations", 6, "a")


def test_stats_tables_keep_every_given_key(lake: Lake) -> None:
    p1 = lake.write("stats/feature_stats", _acts(2), layer=1)
    assert p1 == lake.base / "stats" / "feature_stats" / "layer=1" / "part-0.parquet"
    pa_ = lake.write("stats/activation_profile", _acts(2), layer=1, dataset="a")
    pb = lake.write("stats/activation_profile", _acts(3), layer=1, dataset="b")
    assert pa_ != pb, "a per-(layer, dataset) statistic must not overwrite another dataset's file"
    assert pb == lake.base / "stats" / "activation_profile" / "layer=1" / "dataset=b" / "part-0.parquet"
    assert lake.read("stats/activation_profile", 1, "a").num_rows == 2


def test_namespaces_do_not_share_tables(tmp_path: Path) -> None:
    a, b = Lake(str(tmp_path), "default"), Lake(str(tmp_path), "gemma-3-27b")
    a.write("activations", _acts(2), layer=1, dataset="x")
    assert not b.exists("activations", 1, "x")
    assert b.catalog_path == tmp_path / "gemma-3-27b" / "lake.duckdb"
    assert a.sae_dir(3) == tmp_path / "default" / "sae" / "layer=3"


def test_remove_partition(lake: Lake) -> None:
    lake.write("activations", _acts(2), layer=1, dataset="a")
    lake.write("activations", _acts(2), layer=1, dataset="b")
    lake.remove_partition("activations", 1, "a")
    lake.remove_partition("activations", 1, "never")
    assert not lake.exists("activations", 1, "a") and lake.exists("activations", 1, "b")


def test_sparse_tables_dictionary_encode_only_their_key_columns(lake: Lake) -> None:
    """token_activations / activations: dictionary pages on the repeating keys, plain zstd on feature ids and
    values (faster to write, no larger); other tables keep the defaults; every value reads back."""
    from dagster_project.lib.tables import TOKEN_ACTS_SCHEMA

    n = 5000
    rng = np.random.default_rng(0)
    tokens = pa.table({"sample_id": pa.array(np.repeat(np.arange(50), 100), pa.int32()),
                       "token_pos": pa.array(np.tile(np.arange(100), 50), pa.int32()),
                       "feature_id": pa.array(rng.integers(0, 16384, n), pa.int32()),
                       "act": pa.array(rng.random(n), pa.float32())}, schema=TOKEN_ACTS_SCHEMA)
    lake.write("token_activations", tokens, layer=1, dataset="d", meta=META)
    lake.write("activations", _acts(n), layer=1, dataset="d", meta=META)

    def dict_columns(table: str) -> set[str]:
        md = pq.ParquetFile(lake.file(table, 1, "d")).metadata.row_group(0)
        return {md.column(i).path_in_schema for i in range(md.num_columns)
                if any("DICTIONARY" in e for e in md.column(i).encodings)}

    assert dict_columns("token_activations") == {"sample_id", "token_pos"}
    assert dict_columns("activations") == {"sample_id"}
    assert pq.ParquetFile(lake.file("token_activations", 1, "d")).metadata.row_group(0).column(2).compression == "ZSTD"
    assert lake.read("token_activations", layer=1, dataset="d").equals(tokens)


def test_clean_temp_in_given_folders_spares_other_writes_in_flight(lake: Lake) -> None:
    """Two extractions side by side (one per GPU): the one starting cleans only its own partitions, so the
    other's temp file, still being written, survives and its rename into place succeeds."""
    mine = lake.partition_dir("activations", 1, "a")
    with lake.writer("activations", SCHEMA, 2, "b", META) as other:  # in flight in "another process"
        other.write_table(_acts(4))
        mine.mkdir(parents=True, exist_ok=True)
        (mine / ".tmp-dead.parquet.inprogress").write_bytes(b"left by a killed run")
        assert lake.clean_temp([mine, lake.partition_dir("tokens", None, "a")]) == 1
        assert not list(mine.glob(".tmp-*"))
        assert len(list(lake.partition_dir("activations", 2, "b").glob(".tmp-*"))) == 1
    assert lake.read("activations", 2, "b").num_rows == 4


def test_replace_dir_swaps_whole_folders_and_clears_a_killed_swaps_leftover(tmp_path: Path) -> None:
    from dagster_project.lib.lake import replace_dir

    final = tmp_path / "layer=1"
    # what a kill between the two renames of an earlier replace left: the old folder moved aside
    (tmp_path / ".old-layer=1-deadbeef").mkdir()
    (tmp_path / ".old-layer=1-deadbeef" / "probe.json").write_text("v0")
    for version in ("v1", "v2"):
        tmp = tmp_path / f".tmp-{version}"
        tmp.mkdir()
        (tmp / "probe.json").write_text(version)
        replace_dir(tmp, final)
        assert (final / "probe.json").read_text() == version
        assert sorted(p.name for p in tmp_path.iterdir()) == ["layer=1"]  # nothing hidden left behind


def _token_residuals(x: np.ndarray, sample_id: list[int], token_pos: list[int]) -> pa.Table:
    """token_residuals rows as the extraction writes them (float16 and a power-of-two scale per row)."""
    import torch

    from dagster_project.lib.extraction import float16_scaled
    from dagster_project.lib.tables import token_residual_schema

    q, scale = float16_scaled(torch.from_numpy(x))
    d = x.shape[1]
    return pa.table([pa.array(np.asarray(sample_id, np.int32)), pa.array(np.asarray(token_pos, np.int32)),
                     pa.FixedSizeListArray.from_arrays(pa.array(q.numpy().reshape(-1)), d),
                     pa.array(scale.numpy())], schema=token_residual_schema(d))


def test_read_token_residuals_round_trips_within_float16_precision(lake: Lake) -> None:
    """float32 vectors back, scale applied (a value beyond float16's range included), ordered by the datasets
    asked for, then sample and position, whatever order the batches wrote them in."""
    from dagster_project.lib.lake import read_token_residuals

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 16)) * 30).astype(np.float32)
    x[2, 4] = 70656.0  # Gemma 3 270M's layer 9 has such values
    x[5, 0] = -1e-6
    keys = [(1, 0), (1, 1), (1, 2), (0, 0), (0, 1), (2, 0), (2, 1)]  # longest text first, as batches go
    lake.write("token_residuals", _token_residuals(x[:5], *map(list, zip(*keys[:5], strict=True))), 3, "a", META)
    lake.write("token_residuals", _token_residuals(x[5:], *map(list, zip(*keys[5:], strict=True))), 3, "b", META)
    assert pq.read_schema(lake.file("token_residuals", 3, "a")).field("resid").type == pa.list_(pa.float16(), 16)
    md = pq.ParquetFile(lake.file("token_residuals", 3, "a")).metadata.row_group(0)
    cols = [md.column(i) for i in range(md.num_columns)]  # dictionary pages on the keys only, zstd everywhere
    assert {c.path_in_schema for c in cols if any("DICTIONARY" in e for e in c.encodings)} == {"sample_id", "token_pos"}
    assert {c.compression for c in cols} == {"ZSTD"}

    got = read_token_residuals(lake, 3, ["b", "a"])
    order = [5, 6, 3, 4, 0, 1, 2]  # b's rows, then a's sorted by (sample_id, token_pos)
    assert got.dataset.tolist() == ["b"] * 2 + ["a"] * 5
    assert list(zip(got.sample_id.tolist(), got.token_pos.tolist(), strict=True)) == [keys[i] for i in order]
    assert got.resid.dtype == np.float32 and got.sample_id.dtype == np.int32 and got.resid.shape == (7, 16)
    np.testing.assert_allclose(got.resid, x[order], rtol=2.0**-11, atol=6e-8)
    assert got.resid[-1, 4] == 70656.0
    one = read_token_residuals(lake, 3, "a")  # one dataset by name
    np.testing.assert_array_equal(one.resid, got.resid[2:])
    empty = read_token_residuals(lake, 3, [])
    assert empty.resid.shape == (0, 0) and empty.sample_id.size == 0


def test_read_token_residuals_refuses_what_it_cannot_read(lake: Lake) -> None:
    from dagster_project.lib.lake import read_token_residuals

    with pytest.raises(LakeError, match=r"without token residuals.*write_token_residuals.*backfill --layer 1"):
        read_token_residuals(lake, 1, ["a"])
    lake.write("token_residuals", pa.table({"sample_id": pa.array([0], pa.int32()), "token_pos": [0],
                                            "resid": pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2))}), 1, "a")
    with pytest.raises(LakeError, match="not a token_residuals file"):
        read_token_residuals(lake, 1, ["a"])
