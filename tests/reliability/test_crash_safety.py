"""Promise 1, crash safety: a ``kill -9`` at any moment leaves nothing half-written visible, and a rerun
completes the work with no duplicate and no lost row.

Each test kills a real process (``SIGKILL``, no cleanup code runs) at a chosen point:

- extraction: ``featurelake``'s own step runner (``cli.materialize_steps``) in a subprocess, killed after
  the second batch of a partition; the partitions are then read back with ``featurelake sql``, the
  views-only catalog and the ``feature_stats`` asset, and the run is repeated;
- describe: the ``descriptions`` asset in a subprocess against the local Anthropic-protocol server,
  killed after a few calls completed; then rerun;
- SAE training: ``train_topk`` in a subprocess, killed while training, before the marker, mid-swap;
- probes: ``save_probes`` in a subprocess, killed while writing the set and mid-swap.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
import torch

from tests.reliability.helpers import KILLED, featurelake_sql, kill_9_when, materialize_layer, run_python

LAYER = 1

# --------------------------------------------------------------------------------------- extraction

_EXTRACT = r"""
import os, signal
import assets.activations as activations_asset
from dagster_project import cli

kill_dataset = os.environ.get("KILL_DATASET")
real = activations_asset.extract_to_lake

def extract_then_die(lm, saes, items, texts, lake, dataset, *args, **kwargs):
    *rest, progress = args  # extract_dataset passes the progress callback last of its positional arguments
    assert len(rest) == 4, "extract_to_lake's call changed: update this test's kill point"
    batches = [0]

    def on_batch(done, total):
        progress(done, total)
        batches[0] += 1
        if dataset == kill_dataset and batches[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 with two batches in the partition's files

    return real(lm, saes, items, texts, lake, dataset, *rest, on_batch, **kwargs)

activations_asset.extract_to_lake = extract_then_die
layers = [int(x) for x in os.environ["LAYERS"].split(",")]
datasets = os.environ["DATASETS"].split(",") if os.environ.get("DATASETS") else None
cli.materialize_steps(layers=layers, datasets=datasets, stages=os.environ["STAGES"].split(","))
"""

SNAPSHOT = ("select layer, dataset, count(*) as n, count(distinct (sample_id, feature_id)) as u, "
            "count(distinct sample_id) as samples, round(sum(max_act), 2) as total from activations "
            "group by all order by all")


def _extract(**env: str) -> Any:
    proc = run_python(_EXTRACT, env=env, timeout=600)
    return proc


def _feature_stats(lake_root: Path, layer: int) -> dg.ExecuteInProcessResult:
    from assets.statistics import feature_stats
    from dagster_project.partitions import LAYER_PARTITIONS_NAME
    from dagster_project.resources import LakeResource

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, [str(layer)])
    return dg.materialize([feature_stats], partition_key=str(layer), instance=instance, raise_on_error=False,
                          resources={"lake": LakeResource(root=str(lake_root), namespace="tiny")})


def _catalog_counts(lake: Any) -> list[tuple[Any, ...]]:
    from dagster_project.lib.catalog import build_catalog

    path, _ = build_catalog(lake)
    with duckdb.connect(str(path), read_only=True) as con:
        return con.sql("select layer, dataset, count(*) from activations group by all order by all").fetchall()


def _assert_same_table(a: Any, b: Any) -> None:
    assert a.schema == b.schema and a.num_rows == b.num_rows
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        assert x == pytest.approx(y, rel=1e-9, abs=1e-12) if isinstance(x[0], float) else x == y, name


def test_kill_9_during_extraction_leaves_no_partial_partition_and_rerun_completes(
    tiny_profile: Path, small_registry: Path, tmp_path: Path
) -> None:
    import yaml

    from dagster_project.lib.lake import Lake

    # every table of a partition, the optional per-token residuals included
    tiny_profile.write_text(yaml.safe_dump({**yaml.safe_load(tiny_profile.read_text()), "token_residuals": True}))
    lake = Lake(str(tmp_path / "lake"), "tiny")
    done = _extract(LAYERS="1", STAGES="corpus,sae,activations")
    assert done.returncode == 0, done.stderr[-3000:]
    before = featurelake_sql(SNAPSHOT)
    assert [(r["layer"], r["dataset"]) for r in before] == [(1, "oo"), (1, "te"), (1, "tr")]
    stats_before = _feature_stats(tmp_path / "lake", LAYER)
    assert stats_before.success
    fs_before = lake.read("stats/feature_stats", layer=LAYER).sort_by("feature_id")

    # kill -9 while `tr` is being re-extracted at layer 1 (a partition exists) and extracted at layer 2 (none)
    killed = _extract(LAYERS="1,2", DATASETS="tr", STAGES="activations", KILL_DATASET="tr")
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    leftovers = sorted(p.relative_to(lake.base).as_posix() for p in lake.base.rglob(".tmp-*"))
    for table in ("activations", "token_activations", "residuals", "token_residuals"):
        for layer in (1, 2):
            assert any(p.startswith(f"{table}/layer={layer}/dataset=tr/.tmp-") for p in leftovers), leftovers

    # readers see the old layer-1 partition whole and no layer-2 partition at all
    assert featurelake_sql(SNAPSHOT) == before
    for table in ("activations", "token_activations", "residuals", "token_residuals"):
        assert featurelake_sql(f"select count(*) as n from {table} where layer = 2") == [{"n": 0}]
    assert _catalog_counts(lake) == [(r["layer"], r["dataset"], r["n"]) for r in before]
    assert not lake.exists("activations", 2, "tr")
    again = _feature_stats(tmp_path / "lake", LAYER)
    assert again.success
    _assert_same_table(lake.read("stats/feature_stats", layer=LAYER).sort_by("feature_id"), fs_before)
    missing = _feature_stats(tmp_path / "lake", 2)
    assert not missing.success
    failure = next(e for e in missing.all_events if e.is_step_failure)
    assert "no activations for layer 2" in failure.step_failure_data.error.message

    instance = dg.DagsterInstance.get()
    stuck = [r for r in instance.get_runs() if r.status == dg.DagsterRunStatus.STARTED]
    assert len(stuck) == 1  # the killed run; it holds the `model` pool slot

    # the rerun is not blocked by the dead run's slot, completes both partitions, duplicates nothing
    rerun = _extract(LAYERS="1,2", DATASETS="tr", STAGES="activations")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = featurelake_sql(SNAPSHOT)
    assert [r for r in after if r["layer"] == 1] == before
    (new,) = [r for r in after if r["layer"] == 2]
    tr_before = next(r for r in before if r["dataset"] == "tr")
    assert new["dataset"] == "tr" and new["n"] == new["u"] > 0 and new["samples"] == tr_before["samples"]
    tokens = featurelake_sql("select count(*) as n from tokens where dataset = 'tr'")[0]["n"]
    assert featurelake_sql("select layer, count(*) as n, count(distinct (sample_id, token_pos)) as u from "
                           "token_residuals where dataset = 'tr' group by all order by all") == [
        {"layer": 1, "n": tokens, "u": tokens}, {"layer": 2, "n": tokens, "u": tokens}]
    assert not list(lake.base.rglob(".tmp-*"))
    assert _feature_stats(tmp_path / "lake", 2).success
    runs = {r.run_id: r.status for r in instance.get_runs()}
    assert runs[stuck[0].run_id] == dg.DagsterRunStatus.FAILURE
    assert dg.DagsterRunStatus.STARTED not in runs.values()


# --------------------------------------------------------------------------------------- describe

_DESCRIBE = r"""
import sys
import dagster as dg
from assets.describe import descriptions
from dagster_project.describer_resource import DescriberResource
from dagster_project.partitions import LAYER_PARTITIONS_NAME
from dagster_project.resources import LakeResource

root, url = sys.argv[1], sys.argv[2]
instance = dg.DagsterInstance.ephemeral()
instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, ["1"])
dg.materialize(
    [descriptions], partition_key="1", instance=instance,
    resources={"lake": LakeResource(root=root, namespace="t"),
               "describer": DescriberResource(backend="anthropic", model="claude-haiku-4-5", base_url=url,
                                              api_key="test-key", concurrency=2, sdk_max_retries=0)},
    run_config={"ops": {"descriptions": {"config": {"retry_base_delay_s": 0.01, "n_candidates": int(sys.argv[3])}}}},
)
"""


_CACHE_ENTRIES = "??/[0-9a-f]*.json"  # the LLM call cache's entries (each renamed into place whole)


def _stored(cache_dir: Path) -> set[str]:
    """The keys of the calls in the LLM call cache."""
    return {json.loads(p.read_text())["key"] for p in cache_dir.glob(_CACHE_ENTRIES)}


def _rerun_descriptions(root: Path, server: Any, *, n_candidates: int) -> dg.ExecuteInProcessResult:
    """The ``descriptions`` asset in process, as the killed subprocess ran it (concurrency 2, no SDK retries)."""
    from assets.describe import descriptions
    from dagster_project.describer_resource import DescriberResource

    describer = DescriberResource(backend="anthropic", model="claude-haiku-4-5", base_url=server.base_url,
                                  api_key="test-key", concurrency=2, sdk_max_retries=0)
    return materialize_layer([descriptions], root, describer, layer=LAYER, config={"n_candidates": n_candidates})


def test_kill_9_during_describe_loses_no_completed_call_and_repeats_none(tmp_path: Path) -> None:
    from dagster_project.testing.anthropic_server import AnthropicTestServer
    from dagster_project.testing.describe_lake import build_describe_lake, many_features

    n = 30
    dl = build_describe_lake(tmp_path, features=many_features(n, p_pos=0.4, p_neg=0.1))
    cache_dir = dl.lake.base / "llm_cache"
    with AnthropicTestServer(latency_s=0.1) as server:
        proc = run_python(_DESCRIBE, str(tmp_path), server.base_url, "1", wait=False)
        kill_9_when(proc, lambda: len(list(cache_dir.glob(_CACHE_ENTRIES))) >= 5, timeout_s=120, poll_s=0.02)
        time.sleep(0.5)  # the server finishes the requests the dead client had in flight (latency 0.1 s)
        stored = _stored(cache_dir)
        assert 5 <= len(stored) < n
        assert not dl.lake.exists("stats/descriptions", layer=LAYER)  # no half-written table either
        calls_before = server.messages_calls

        result = _rerun_descriptions(tmp_path, server, n_candidates=1)
        rerun_calls = server.messages_calls - calls_before
    assert result.success
    rows = dl.lake.read("stats/descriptions", layer=LAYER).to_pylist()
    assert sorted(r["feature_id"] for r in rows) == dl.feature_ids and all(r["status"] == "ok" for r in rows)
    # every call completed before the kill came from the cache; only the others were made again
    assert {r["cache_key"] for r in rows if r["cached"]} == stored
    assert rerun_calls == n - len(stored)
    # a prompt answered twice can only be one that was in flight at the kill (concurrency 2)
    assert sum(1 for c in server.completed_by_prompt_hash.values() if c > 1) <= 2


def test_kill_9_during_best_of_n_loses_no_candidate_and_repeats_no_call(tmp_path: Path) -> None:
    """Two candidates per feature, each scored on validation windows: describe and detect calls interleave;
    a kill loses none that completed, and the rerun's candidates table has each (feature, candidate) once."""
    from dagster_project.testing.anthropic_server import AnthropicTestServer
    from dagster_project.testing.describe_lake import build_describe_lake, many_features

    n = 12
    dl = build_describe_lake(tmp_path, features=many_features(n, p_pos=0.4, p_neg=0.1))
    cache_dir = dl.lake.base / "llm_cache"
    with AnthropicTestServer(latency_s=0.1) as server:
        proc = run_python(_DESCRIBE, str(tmp_path), server.base_url, "2", wait=False)
        # past the first round (n describe calls): the kill lands among the validation / second-round calls
        kill_9_when(proc, lambda: len(list(cache_dir.glob(_CACHE_ENTRIES))) >= n + 3, timeout_s=120, poll_s=0.02)
        time.sleep(0.5)
        stored = _stored(cache_dir)
        assert not dl.lake.exists("stats/descriptions", layer=LAYER)
        assert not dl.lake.exists("stats/description_candidates", layer=LAYER)
        calls_before = server.messages_calls

        result = _rerun_descriptions(tmp_path, server, n_candidates=2)
        rerun_calls = server.messages_calls - calls_before
        final = _stored(cache_dir)
    assert result.success
    cands = dl.lake.read("stats/description_candidates", layer=LAYER).to_pylist()
    keys = [(c["feature_id"], c["candidate"]) for c in cands]
    assert len(keys) == len(set(keys)) and sorted({f for f, _ in keys}) == dl.feature_ids
    assert all(c["status"] == "ok" for c in cands)
    # scored on validation windows where the feature had samples left for them (the rarer ones have none)
    assert all(c["validation_status"] == ("ok" if c["validation_n"] else None) for c in cands)
    assert sum(c["validation_status"] == "ok" for c in cands) >= n
    assert all(sum(c["is_best"] for c in cands if c["feature_id"] == f) == 1 for f in dl.feature_ids)
    used = {c["cache_key"] for c in cands} | {c["validation_cache_key"] for c in cands if c["validation_n"]}
    assert stored < final and used <= final
    assert rerun_calls == len(final - stored)  # every call completed before the kill came from the cache
    assert sum(1 for c in server.completed_by_prompt_hash.values() if c > 1) <= 2


# --------------------------------------------------------------------------------------- SAE training

# One process imports sae-lens (seconds) and forks a child per kill point; the child trains and is killed,
# the parent looks at what a loader finds, then forks the next.
_TRAIN = r"""
import json, os, signal, sys
from pathlib import Path
import torch
from dagster_project.lib import sae as S
import sae_lens  # noqa: F401 - imported before forking: the children start warm

out = Path(sys.argv[1])
vectors = torch.randn(1000, 16, generator=torch.Generator().manual_seed(0))
first = S.load_trained(out)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def train_and_die_at(point):
    progress = None
    if point == "training":
        progress = lambda step, total: die()  # the first progress report: step 50 of 58
    elif point == "marker":
        real_write = Path.write_text
        def write_text(self, *a, **k):
            if self.name == S.FINISHED_MARKER:
                die()  # the weights are on disk, the marker is not
            return real_write(self, *a, **k)
        Path.write_text = write_text
    elif point == "swap":
        real_replace = os.replace
        def replace(src, dst):
            real_replace(src, dst)
            if Path(src) == out:
                die()  # the finished SAE was moved aside, the new one is not in place yet
        os.replace = replace
    S.train_topk(vectors, out, width=32, k=4, epochs=1, batch_size=16, lr=1e-3, seed=1, progress=progress)

report = {}
for point in ("training", "marker", "swap"):
    pid = os.fork()
    if pid == 0:
        try:
            train_and_die_at(point)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    try:
        loaded = S.load_trained(out)
        found = {"sae_id": loaded.sae_id, "same_weights": bool(torch.equal(loaded.sae.W_enc, first.sae.W_enc))}
    except S.SAEError as e:
        found = {"error": str(e)}
    temp = [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    report[point] = {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, **found,
                     "temp_with_marker": sum((p / S.FINISHED_MARKER).exists() for p in temp), "temp": len(temp)}
print(json.dumps(report))
"""


def test_kill_9_during_sae_training_never_leaves_a_half_trained_sae_loadable(tmp_path: Path) -> None:
    from dagster_project.lib.sae import load_trained, train_topk

    out = tmp_path / "sae" / "layer=1"
    vectors = torch.randn(1000, 16, generator=torch.Generator().manual_seed(0))
    first = train_topk(vectors, out, width=32, k=4, epochs=1, batch_size=16, lr=1e-3, seed=2)

    proc = run_python(_TRAIN, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {p: r["signal"] for p, r in report.items()} == dict.fromkeys(report, signal.SIGKILL)
    for point in ("training", "marker"):  # the previous SAE, whole
        assert report[point]["sae_id"] == first.sae_id and report[point]["same_weights"], report[point]
    assert report["training"]["temp"] == 0  # killed before anything was written
    assert report["marker"]["temp"] == 1 and report["marker"]["temp_with_marker"] == 0  # hidden, unfinished
    assert "no finished SAE here" in report["swap"]["error"]  # mid-swap: none visible, never a mix of two

    again = train_topk(vectors, out, width=32, k=4, epochs=1, batch_size=16, lr=1e-3, seed=1)
    assert load_trained(out).sae_id == again.sae_id != first.sae_id


# --------------------------------------------------------------------------------------- probes

_PROBES = r"""
import json, os, signal, sys
from pathlib import Path
from dagster_project.lib import evaluation as ev
from dagster_project.lib.catalog import views_connection
from dagster_project.lib.lake import Lake
from dagster_project.lib.probes import FittedProbe, ProbeGridConfig

lake = Lake(sys.argv[1], "t")
saved = ev.saved_dir(lake, 1)

def trained(C):
    grid = ProbeGridConfig(top_n=(5, 10), include_all=False, penalties=("l2",), Cs=(C,), transforms=("raw",),
                           dense_poolings=(), folds=3, ksparse=())
    return ev.train_probes(views_connection(lake), 1, ev.EvalSettings(grid=grid))

def state(table):
    try:
        probes = ev.load_saved_probes(table)
    except ev.EvaluationError as e:
        return {"exists": saved.exists(), "error": str(e)}
    return {"exists": saved.exists(), "files": sorted(p.name for p in saved.iterdir()),
            "coef": {p.probe_id: p.probe.coef.tolist() for p in probes}}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save_and_die_at(point, new):
    if point == "write":
        real_save, n = FittedProbe.save, [0]
        def save(self, d):
            n[0] += 1
            if n[0] == 2:
                die()  # one probe of the new set written aside, the rest not
            return real_save(self, d)
        FittedProbe.save = save
    elif point == "swap":
        real_rename = Path.rename
        def rename(self, target):
            moved = real_rename(self, target)
            if self.name == saved.name:
                die()  # the saved set moved aside, the new one not in place yet
            return moved
        Path.rename = rename
    ev.save_probes(lake, new, {"model_id": "m"})

table = ev.save_probes(lake, trained(1.0), {"model_id": "m"})
report = {"before": state(table)}
new = trained(0.01)  # another grid: its probes have other ids and weights
for point in ("write", "swap"):
    pid = os.fork()
    if pid == 0:
        try:
            save_and_die_at(point, new)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    report[point] = {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, **state(table)}
print(json.dumps(report))
"""


def test_kill_9_while_saving_probes_keeps_the_previous_set_or_shows_none(tmp_path: Path) -> None:
    from dagster_project.lib import evaluation as ev
    from dagster_project.lib.catalog import views_connection
    from dagster_project.lib.probes import ProbeGridConfig
    from tests.lib.fixtures_probes import build_probe_lake

    lake = build_probe_lake(tmp_path)
    proc = run_python(_PROBES, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    before = report["before"]
    assert len(before["coef"]) == 2 and all("__C1__" in pid for pid in before["coef"])

    write = report["write"]
    assert write.pop("signal") == signal.SIGKILL
    assert write == before  # the previous set, whole: no probe of the new grid (C=0.01) mixed in
    swap = report["swap"]
    assert swap["signal"] == signal.SIGKILL and swap["exists"] is False  # none visible, never half of each
    assert "materialize probes again" in swap["error"]

    grid = ProbeGridConfig(top_n=(5, 10), include_all=False, penalties=("l2",), Cs=(1.0,), transforms=("raw",),
                           dense_poolings=(), folds=3, ksparse=())
    trained = ev.train_probes(views_connection(lake), LAYER, ev.EvalSettings(grid=grid))
    table = ev.save_probes(lake, trained, {"model_id": "m"})  # the rerun puts a whole set back
    assert {p.probe_id: p.probe.coef.tolist() for p in ev.load_saved_probes(table)} == before["coef"]


def test_a_dead_featurelake_process_is_told_apart_from_a_live_or_recycled_one() -> None:
    import socket
    import subprocess
    import sys

    from dagster_project.runs import _alive, process_identity

    me = process_identity()
    assert _alive(me) is True
    host, pid, start = me.split(":")
    assert _alive(f"{host}:{pid}:{int(start) + 1}") is False  # same pid, another process: pid recycled
    assert _alive(f"elsewhere-{socket.gethostname()}:{pid}:{start}") is None  # another host: cannot tell
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert _alive(f"{host}:{child.pid}:1") is False  # gone
