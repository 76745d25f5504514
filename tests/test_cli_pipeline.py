"""End to end through the `featurelake` command, as a user runs it: demo, sql, layers add, backfill.

Runs in subprocesses (as a user would) on the tiny random Gemma 3 with GemmaScope-format SAEs and a
small JSONL registry, with the lake and DAGSTER_HOME in tmp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

CLI = [sys.executable, "-m", "dagster_project.cli"]


def run_cli(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"featurelake {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def sql_json(query: str, env: dict[str, str]) -> list[dict]:
    return json.loads(run_cli(["sql", query, "--format", "json"], env).stdout)


@pytest.fixture
def cli_env(tiny_profile: Path, small_registry: Path) -> dict[str, str]:
    return dict(os.environ)


def check_quiet_demo_output(stdout: str, stderr: str, env: dict[str, str]) -> None:
    """``featurelake demo`` prints under 120 lines: a progress bar, one line per stage with its key figure,
    and a summary it ends with (best probes in- vs out-of-distribution, the report, three queries that
    run). Dagster's event lines stay off the console, and in the instance."""
    import dagster as dg

    n_lines = stdout.count("\n") + stderr.count("\n")  # a progress bar redraws with \r: no new lines
    assert n_lines < 120, f"{n_lines} lines:\n{stdout}\n{stderr}"
    assert " - DEBUG - " not in stdout + stderr and "STEP_START" not in stdout + stderr, stderr[-3000:]
    assert "Traceback" not in stderr and "featurelake: 100%" in stderr, stderr[-3000:]
    lines = stdout.rstrip("\n").split("\n")
    for stage in ("samples      tr: 24 samples (12 positive, 12 negative, role train)", "activations  tr: 24 samples",
                  "tokens/s", "selection    layer 1: ", "descriptions layer 1: ", "probes       layer 1: "):
        assert any(stage in line for line in lines), (stage, stdout)
    # the summary: the best-probe table, the report, and three queries to try, which answer
    start = next(i for i, line in enumerate(lines) if line.startswith("featurelake demo finished: 9 runs"))
    summary = lines[start:]
    header = next(i for i, line in enumerate(summary) if line.startswith("best probes: mean AUROC in-distribution"))
    assert summary[header + 1].split()[:5] == ["layer", "kind", "probe", "test", "ood"], summary
    rows = [line.split() for line in summary[header + 2 : header + 4]]
    assert [r[:2] for r in rows] == [["1", "sae"], ["1", "dense"]], summary
    assert all(0 <= float(r[3]) <= 1 for r in rows), summary  # the test set's AUROC
    report = next(line for line in summary if line.startswith("report, layer 1: "))
    assert Path(report.split(": ", 1)[1]).is_file() and report.endswith("report/layer=1/index.html"), report
    assert summary[-4] == "try:", summary
    for line in summary[-3:]:
        query = line.strip().removeprefix('featurelake sql "').removesuffix('"')
        assert sql_json(query, env), query
    # the event log is whole in the instance: Dagster's events, the assets' logs, the library's own loggers
    instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    runs = instance.get_runs()
    assert len(runs) == 9
    logs = [e for r in runs for e in instance.all_logs(r.run_id)]
    assert all(any(e.dagster_event and e.dagster_event.event_type_value == "STEP_START"
                   for e in instance.all_logs(r.run_id)) for r in runs)
    assert any("tr: 24 samples" in e.user_message for e in logs if not e.dagster_event)  # context.log
    assert any("loaded embedding model" in e.user_message for e in logs if not e.dagster_event)  # lib/themes.py


def test_demo_then_sql_then_backfill_a_new_layer(cli_env: dict[str, str], tmp_path: Path) -> None:
    # bytes, not text: text mode would turn the progress bar's carriage returns into line ends
    demo = subprocess.run([*CLI, "demo"], env=cli_env, capture_output=True, timeout=600)
    assert demo.returncode == 0, demo.stderr.decode()[-4000:]
    check_quiet_demo_output(demo.stdout.decode(), demo.stderr.decode(), cli_env)
    rows = sql_json("select layer, dataset, count(*) as n, count(distinct sample_id) as s "
                    "from activations group by all order by all", cli_env)
    assert [(r["layer"], r["dataset"]) for r in rows] == [(1, "oo"), (1, "te"), (1, "tr")]
    assert [r["s"] for r in rows] == [6, 12, 24]
    n_samples = sql_json("select count(*) as n from samples", cli_env)[0]["n"]
    assert n_samples == 42
    tok = sql_json("select count(*) as n from token_activations where layer = 1", cli_env)[0]["n"]
    assert tok > 0

    # Every stage answers through SQL.
    for view in ("feature_stats", "activation_profile", "cross_distribution", "selected_features",
                 "descriptions", "classifications", "probe_metrics"):
        assert sql_json(f"select count(*) as n from {view} where layer = 1", cli_env)[0]["n"] > 0, view

    # `featurelake score` on the test set's texts reproduces what the evaluation computed for them.
    best = sql_json("select probe, dataset, sample_id, score from probe_scores where layer = 1 and kind = 'sae' "
                    "and dataset = 'te' order by sample_id", cli_env)
    assert len(best) == 12
    texts = sql_json("select text from samples where dataset = 'te' order by sample_id", cli_env)
    (tmp_path / "te.json").write_text(json.dumps([t["text"] for t in texts]))
    out = json.loads(run_cli(["score", "--probe", best[0]["probe"], str(tmp_path / "te.json"), "--format", "json"],
                             cli_env).stdout)
    assert out["layer"] == 1
    assert [r["score"] for r in out["scores"]] == pytest.approx([r["score"] for r in best], rel=1e-4, abs=1e-6)

    # Every activation file records what made it.
    f = tmp_path / "lake" / "tiny" / "activations" / "layer=1" / "dataset=tr" / "part-0.parquet"
    meta = json.loads(pq.read_schema(f).metadata[b"featurelake"])
    assert meta["hook"] == "resid_post" and meta["sae_id"].startswith("gemmascope:layer_1@")

    # A new layer: register, backfill, and it is there beside the first.
    assert "registered" in run_cli(["layers", "add", "3"], cli_env).stdout
    run_cli(["backfill", "--layer", "3"], cli_env)
    layers = sql_json("select distinct layer from activations order by layer", cli_env)
    assert [r["layer"] for r in layers] == [1, 3]

    # Rerunning a partition replaces it: same row count, no duplicates.
    before = sql_json("select count(*) as n from activations where layer = 3 and dataset = 'tr'", cli_env)[0]["n"]
    run_cli(["backfill", "--layer", "3", "--dataset", "tr"], cli_env)
    after = sql_json("select count(*) as n, count(distinct (sample_id, feature_id)) as u from activations "
                     "where layer = 3 and dataset = 'tr'", cli_env)[0]
    assert after["n"] == before and after["u"] == before


def test_backfill_of_unknown_layer_and_layer_beyond_model(cli_env: dict[str, str]) -> None:
    proc = run_cli(["backfill", "--layer", "2"], cli_env, check=False)
    assert proc.returncode == 2 and "featurelake layers add 2" in proc.stderr
    run_cli(["layers", "add", "9"], cli_env)
    proc = run_cli(["demo", "--layer", "9"], cli_env, check=False)
    proc = run_cli(["demo", "--layer", "9"], cli_env, check=False)
    assert proc.returncode != 0
    assert "layer 9 is beyond the model" in proc.stderr
    # the failed step is named with its run, without Dagster's event lines or a traceback
    assert "featurelake demo: sae layer 9 failed (run " in proc.stderr and "step sae: ModelError: layer 9" in proc.stderr
    assert "Traceback" not in proc.stderr and " - DEBUG - " not in proc.stderr, proc.stderr[-3000:]


def test_sql_refuses_writes(cli_env: dict[str, str]) -> None:
    proc = run_cli(["sql", "create table x as select 1"], cli_env, check=False)
    assert proc.returncode == 2 and "read-only" in proc.stderr
