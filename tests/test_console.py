"""What the CLI prints (dagster_project/console.py): the console filter's modes and the stage lines. The quiet
demo end to end, with its line budget and summary: tests/test_cli_pipeline.py."""

from __future__ import annotations

import logging

import pytest

from dagster_project.cli import DAGSTER_YAML
from dagster_project.console import MANAGED_LOGGERS, ConsoleFilter, in_run, stage_line


def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "msg", None, None)


@pytest.mark.parametrize(("mode", "name", "level", "shown"), [
    ("quiet", "featurelake", logging.INFO, True),  # the CLI's own logger always
    ("quiet", "transformers.modeling_utils", logging.WARNING, False),
    ("quiet", "alembic.runtime.migration", logging.INFO, False),
    ("quiet", "py.warnings", logging.WARNING, False),
    ("quiet", "dagster_project.lib.sae", logging.ERROR, True),
    ("normal", "alembic.runtime.migration", logging.INFO, False),
    ("normal", "py.warnings", logging.WARNING, True),
    ("verbose", "alembic.runtime.migration", logging.INFO, True),
    ("verbose", "dagster_project.lib.probes", logging.INFO, True),
])
def test_console_filter_modes(mode: str, name: str, level: int, shown: bool) -> None:
    assert ConsoleFilter(mode).filter(_record(name, level)) is shown


def test_quiet_shows_the_project_warnings_between_runs_only() -> None:
    f = ConsoleFilter("quiet")
    assert f.filter(_record("dagster_project.runs", logging.WARNING))  # e.g. an orphaned run marked ended
    assert not f.filter(_record("py.warnings", logging.WARNING))  # Dagster's beta notes at import
    f.in_run = True  # during a run: in the run's event log instead
    assert not f.filter(_record("dagster_project.lib.describers", logging.WARNING))


def test_verbose_runs_print_the_managed_loggers_once() -> None:
    """During a verbose run the run's console logger prints what the managed loggers say; the CLI's handler
    does not print it a second time (outside runs it does)."""
    from dagster_project import console

    f = console.FILTER
    old = f.mode
    try:
        f.mode = "verbose"
        with in_run():
            assert not f.filter(_record("dagster_project.lib.probes", logging.INFO))
            assert f.filter(_record("transformers.modeling_utils", logging.INFO))
        assert f.filter(_record("dagster_project.lib.probes", logging.INFO))
    finally:
        f.mode = old


def test_dagster_yaml_manages_the_project_loggers() -> None:
    assert f"managed_python_loggers: [{', '.join(MANAGED_LOGGERS)}]" in DAGSTER_YAML
    assert "python_log_level" not in DAGSTER_YAML.replace("No python_log_level", "")


def test_stage_lines_from_metadata() -> None:
    class V:  # a MetadataValue: the figure is its .value
        def __init__(self, value: object) -> None:
            self.value = value

    assert stage_line("samples", "tr", {"rows": V(24), "positives": V(12), "negatives": V(12), "role": V("train")}) \
        == "samples      tr: 24 samples (12 positive, 12 negative, role train)"
    assert stage_line("activations", "tr|9", {"samples": V(24), "tokens": V(10130), "tokens_per_s": V(4306.2),
                                              "partitions": V({"tr": [9]})}) \
        == "activations  tr: 24 samples, 10,130 tokens at 4,306 tokens/s"
    assert stage_line("sae", "9", {"variance_explained_heldout": V(0.9461), "l0": V(31.6), "train_seconds": V(159.2)}) \
        == "sae          layer 9: trained, variance explained 94.6% on held-out vectors, L0 32, 159 s"
    several = {"sae_id_layer6": V("a"), "variance_explained_heldout_layer6": V(0.91), "l0_layer6": V(32.0),
               "train_seconds_layer6": V(80.0), "sae_id_layer9": V("b"), "variance_explained_heldout_layer9": V(0.95),
               "l0_layer9": V(31.0), "train_seconds_layer9": V(90.0)}  # one run over two layers
    assert stage_line("sae", "6", several) \
        == "sae          layer 6: trained, variance explained 91.0% on held-out vectors, L0 32, 80 s"
    assert stage_line("sae", "9", several) \
        == "sae          layer 9: trained, variance explained 95.0% on held-out vectors, L0 31, 90 s"
    assert stage_line("descriptions", "9", {"ok": V(50), "failed": V(0)}) == "descriptions layer 9: 50 ok, 0 failed"
    assert stage_line("descriptions", "9", {}) == "descriptions layer 9: ? ok, ? failed"  # keys missing: '?'
    assert stage_line("feature_stats", "9", {"rows": V(1)}) is None  # no line of its own
