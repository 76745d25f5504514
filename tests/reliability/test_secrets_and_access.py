"""Promise 6, secrets and access: the API key never appears in logs, the lake, run config or Dagster's event
log; ``featurelake sql`` cannot create, modify or delete anything; the UI binds to 127.0.0.1 unless told.

The key check runs the describe assets in a persistent Dagster instance (``DAGSTER_HOME`` in tmp), with a
planted key read through ``dg.EnvVar``, every logger at DEBUG (the Anthropic SDK's and httpx's included),
faults that make the SDK retry, and a second run with a wrong key that fails; then it greps every file
under ``DAGSTER_HOME`` and the lake, the captured stdout/stderr, every log record, the run configs, the
job snapshots and the event logs.

Elsewhere: ``tests/assets/test_describe_assets.py::test_api_key_from_env_var_reaches_the_server_and_no_record``
(ephemeral instance), ``tests/lib/test_describers.py::test_bad_credentials_abort_instead_of_recording_failures``
(the key is not in the describer's repr); read-only SQL statement by statement in
``tests/lib/test_catalog.py::test_query_refuses_writes``, ``::test_query_refuses_copy_and_writes_nothing``,
``::test_cli_sql_refused_and_failing`` and ``tests/test_cli_pipeline.py::test_sql_refuses_writes``; the UI's
address in ``tests/test_ui.py::test_ui_binds_to_loopback_by_default``.
"""

from __future__ import annotations

import io
import logging
import secrets
from contextlib import redirect_stderr
from pathlib import Path

import dagster as dg
import pytest
from dagster._serdes import serialize_value

from assets.describe import classifications, descriptions, detection_scores
from dagster_project.config import DescriberSpec
from dagster_project.describer_resource import describer_resource
from dagster_project.partitions import LAYER_PARTITIONS_NAME
from dagster_project.resources import LakeResource
from dagster_project.testing.anthropic_server import AnthropicTestServer, FaultPlan
from dagster_project.testing.describe_lake import build_describe_lake

LAYER = 1


def test_api_key_is_in_no_file_log_config_or_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from dagster_project.cli import ensure_dagster_home

    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("ANTHROPIC_LOG", "debug")  # the SDK logs its requests
    caplog.set_level(logging.DEBUG)
    ensure_dagster_home()
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, [str(LAYER)])
    lake_root = tmp_path / "lake"
    dl = build_describe_lake(lake_root)
    key = "sk-ant-api03-PLANTED-" + secrets.token_hex(16)
    wrong = "sk-ant-api03-WRONG-" + secrets.token_hex(16)
    assets = [descriptions, classifications, detection_scores]
    config = {"max_attempts": 3, "retry_base_delay_s": 0.01}

    def run(with_key: str) -> dg.ExecuteInProcessResult:
        monkeypatch.setenv("ANTHROPIC_API_KEY", with_key)  # read by dg.EnvVar when the step starts
        res = describer_resource(DescriberSpec(backend="anthropic", model="claude-haiku-4-5", concurrency=4),
                                 base_url=server.base_url)
        assert with_key not in repr(res) and with_key not in str(res)
        return dg.materialize(assets, partition_key=str(LAYER), instance=instance, raise_on_error=False,
                              resources={"lake": LakeResource(root=str(lake_root), namespace="t"), "describer": res},
                              run_config={"ops": {a.op.name: {"config": config} for a in assets}})

    plan = FaultPlan(schedule={1: "rate_limit", 2: "server_error", 3: "reset", 5: "malformed_body"})
    with AnthropicTestServer(api_key=key, faults=plan) as server:  # 401 for any other key
        bad = run(wrong)  # first: a run with the right key would leave every call cached
        good = run(key)
        completed = server.stats()["completed"]
    assert good.success and completed > 0
    assert all(r["status"] == "ok" for r in dl.lake.read("stats/descriptions", layer=LAYER).to_pylist())
    assert not bad.success  # refused credentials abort the run (no failed rows recorded)
    (failure,) = [e for e in bad.all_events if e.is_step_failure]
    assert "refused the credentials" in failure.step_failure_data.error.message

    out, err = capfd.readouterr()
    for secret in (key, wrong):
        needle = secret.encode()
        leaks = [p for root in (home, lake_root) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]
        assert not leaks, leaks
        assert secret not in out and secret not in err
        assert not [r for r in caplog.records if secret in r.getMessage()]
        for result in (good, bad):
            run_record = instance.get_run_by_id(result.run_id)
            assert secret not in serialize_value(run_record.run_config) and secret not in str(run_record.tags)
            assert secret not in serialize_value(instance.get_job_snapshot(run_record.job_snapshot_id))
            events = instance.all_logs(result.run_id)
            assert events and not [e for e in events if secret in serialize_value(e)]
    assert any(p.is_file() for p in home.rglob("*.db"))  # the instance did write its databases there
    assert any(r.name.startswith(("anthropic", "httpx")) for r in caplog.records)  # the SDK did log


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


ATTEMPTS = [
    "create table t as select 1",
    "create or replace view samples as select 1 as x",
    "drop view activations",
    "insert into samples select * from samples",
    "update samples set text = ''",
    "delete from samples",
    "copy (select * from samples) to '{out}'",
    "copy samples to '{out}' (format parquet)",
    "explain analyze copy (select 1) to '{out}'",
    "export database '{dir}'",
    "attach '{catalog}' as c",
    "attach '{catalog}' as c; drop view c.samples",
    "install httpfs",
    "set enable_external_access = true",
    "pragma enable_checkpoint_on_shutdown",
    "call dbgen(sf = 0.01)",
    "checkpoint",
    "select 1; drop view samples",
    "select * from query('create table t as select 1')",
    "select * from query('copy (select 1) to ''{out}''')",
]


def test_featurelake_sql_cannot_create_modify_or_delete_anything(tiny_profile: Path, tmp_path: Path) -> None:
    from dagster_project.cli import main
    from dagster_project.lib.catalog import build_catalog
    from tests.lib.fixtures_probes import build_probe_lake

    lake = build_probe_lake(tmp_path / "lake", namespace="tiny")  # the active profile's namespace
    catalog, _ = build_catalog(lake)
    before = _tree(tmp_path)
    out, dump = tmp_path / "out.csv", tmp_path / "dump"
    for template in ATTEMPTS:
        query = template.format(out=out, dir=dump, catalog=catalog)
        err = io.StringIO()
        with redirect_stderr(err):
            rc = main(["sql", query])
        assert rc != 0, query
        assert "featurelake sql:" in err.getvalue(), query
    assert _tree(tmp_path) == before  # not one file created, changed or deleted
    with redirect_stderr(io.StringIO()):
        assert main(["sql", "select count(*) from samples", "--format", "json"]) == 0  # reads still work
