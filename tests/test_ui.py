"""`featurelake ui` and the instance it runs on: loopback by default, the `model` pool, the executor.

Fast checks without a server; tests/test_ui_browser.py drives the running UI in Chromium.
"""

from pathlib import Path

import dagster as dg
import pytest

from dagster_project.cli import (
    DAGSTER_YAML,
    DAGSTER_YAML_MARKER,
    build_parser,
    ensure_dagster_home,
    ui_command,
)
from dagster_project.config import REPO_ROOT
from dagster_project.definitions import build_defs


def test_ui_binds_to_loopback_by_default() -> None:
    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port) == ("127.0.0.1", 3000)
    cmd = ui_command(args.host, args.port)
    assert cmd[1:4] == ["-m", "dagster", "dev"]
    assert cmd[cmd.index("-h") + 1] == "127.0.0.1" and cmd[cmd.index("-p") + 1] == "3000"
    assert cmd[cmd.index("-w") + 1] == str(REPO_ROOT / "workspace.yaml")
    args = build_parser().parse_args(["ui", "--port", "3456"])
    assert ui_command(args.host, args.port)[-1] == "3456"


def test_only_model_and_llm_steps_are_pooled() -> None:
    graph = build_defs().resolve_asset_graph()
    pools = {k.to_user_string(): graph.get(k).pools for k in graph.materializable_asset_keys}
    # dagster.yaml's default_limit (1) applies to every pool without its own limit: one model-running step
    # at a time (`model`), one LLM-calling step at a time (`describer`, each step is concurrent inside), and
    # SQL steps unpooled so they run beside them. A new pool would silently be limited to one step too.
    assert {k for k, v in pools.items() if v} == {"sae", "activations", "descriptions", "classifications",
                                                  "detection_scores"}
    assert pools["sae"] == pools["activations"] == {"model"}
    assert pools["descriptions"] == pools["classifications"] == pools["detection_scores"] == {"describer"}


def test_dagster_yaml_limits_the_model_pool_to_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    home = ensure_dagster_home()
    assert (home / "dagster.yaml").read_text() == DAGSTER_YAML
    with dg.DagsterInstance.get() as instance:
        pool_config = instance.get_concurrency_config().pool_config
        assert pool_config.default_pool_limit == 1
        assert pool_config.pool_granularity.value == "op"  # steps wait for a slot, not whole runs
        instance.event_log_storage.initialize_concurrency_limit_to_default("model")
        assert instance.event_log_storage.get_concurrency_info("model").slot_count == 1
        assert not instance.telemetry_enabled
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 60


def test_ensure_dagster_home_refreshes_only_its_own_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    (home / "dagster.yaml").write_text(DAGSTER_YAML_MARKER + "\nconcurrency:\n  pools:\n    default_limit: 3\n")
    ensure_dagster_home()
    assert (home / "dagster.yaml").read_text() == DAGSTER_YAML
    mine = "concurrency:\n  pools:\n    default_limit: 4\n"  # a user's own edit, marker removed
    (home / "dagster.yaml").write_text(mine)
    ensure_dagster_home()
    assert (home / "dagster.yaml").read_text() == mine


def test_runs_launched_from_the_ui_use_the_multiprocess_executor() -> None:
    executor = build_defs().resolve_implicit_global_asset_job_def().executor_def
    assert executor.name == "multiprocess"
    assert executor.config_schema.resolve_config({}).value["config"]["max_concurrent"] == 2
