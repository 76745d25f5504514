"""The table registry (dagster_project/lib/tables.py): each schema is the one the pipeline writes, every table
lake/README.md documents is registered, the lake's fixed partition keys come from it, and row types match."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
import pytest

from dagster_project.lib import tables
from dagster_project.lib.tables import TABLES, table_from_rows, table_spec

REPO = Path(__file__).resolve().parents[2]

# Registry entry -> the name the writing module gives its schema (constant, or function of d_model).
WRITTEN_AS = {
    "samples": "SAMPLES_SCHEMA",
    "tokens": "TOKENS_SCHEMA",
    "activations": "POOLED_SCHEMA",
    "token_activations": "TOKEN_ACTS_SCHEMA",
    "residuals": "residual_schema",
    "token_residuals": "token_residual_schema",
    "stats/descriptions": "DESCRIPTIONS_SCHEMA",
    "stats/description_candidates": "CANDIDATES_SCHEMA",
    "stats/explanation_scores": "EXPLANATION_SCORES_SCHEMA",
    "stats/classifications": "CLASSIFICATIONS_SCHEMA",
    "stats/detection_scores": "DETECTION_SCHEMA",
    "stats/themes": "THEMES_SCHEMA",
    "stats/probes": "PROBES_SCHEMA",
    "stats/lodo_metrics": "LODO_SCHEMA",
    "stats/probe_metrics": "PROBE_METRICS_SCHEMA",
    "stats/probe_scores": "PROBE_SCORES_SCHEMA",
    "stats/probe_cross_distribution": "PROBE_CROSS_SCHEMA",
    "stats/probe_ensemble_metrics": "ENSEMBLE_SCHEMA",
}


def _modules() -> Iterator[ModuleType]:
    """Every module of the library and the assets but the registry itself (the pipeline's writers; they
    move between modules, so each schema is looked up by name wherever it is defined now)."""
    import assets
    import dagster_project.lib

    for pkg in (dagster_project.lib, assets):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name == tables.__name__:
                continue
            yield importlib.import_module(info.name)


@cache
def _definitions(name: str) -> tuple[Any, ...]:
    """The distinct objects named ``name`` in the pipeline's modules."""
    found: list[Any] = []
    for mod in _modules():
        obj = mod.__dict__.get(name)
        if obj is not None and not any(obj is f for f in found):
            found.append(obj)
    return tuple(found)


@pytest.mark.parametrize("table", sorted(WRITTEN_AS))
def test_registry_schema_is_the_written_schema(table: str) -> None:
    written = _definitions(WRITTEN_AS[table])
    assert written, f"no module of dagster_project.lib or assets defines {WRITTEN_AS[table]}"
    for obj in written:
        if callable(obj) and not isinstance(obj, pa.Schema):
            for d_model in (1, 640, 5376):
                assert tables.schema_of(table, d_model).equals(obj(d_model), check_metadata=True)
        else:
            assert tables.schema_of(table).equals(obj, check_metadata=True), table


def test_every_table_is_checked_against_its_writer_or_its_sql() -> None:
    assert {n for n, s in TABLES.items() if s.sql is None} == set(WRITTEN_AS)
    for spec in TABLES.values():
        if spec.sql is not None:
            assert (REPO / "sql" / spec.sql).is_file(), spec.name


@pytest.fixture(scope="module")
def stats_written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pa.Table]:
    """Every ``sql/stats`` table of the small statistics lake, as the statistics assets write it (their
    ``stats.*`` calls; ``layer`` dropped, as ``write_stat`` does)."""
    from dagster_project.lib import stats
    from tests.lib.fixtures_stats import SAE_WIDTH, build_lake, connect

    root = tmp_path_factory.mktemp("stats_lake")
    build_lake(root)
    con = connect(root)
    try:
        fs = stats.feature_stats(con, 3)
        selected = stats.selected_features(con, 3, stats=fs)
        out = {
            "feature_stats": fs,
            "activation_profile": stats.activation_profile(con, 3, sae_width=SAE_WIDTH),
            "selected_features": selected,
            "cross_distribution": stats.cross_distribution(con, 3),
            "dataset_selectivity": stats.dataset_selectivity(con, 3),
            "selectivity_rank_correlation": stats.rank_correlation(con, 3),
            "selected_transfer": stats.selected_transfer(con, 3, None, selected=selected),
        }
    finally:
        con.close()
    return {f"stats/{name}": t.drop_columns(["layer"]) for name, t in out.items()}


def test_sql_tables_schemas_are_what_their_statements_give(stats_written: dict[str, pa.Table]) -> None:
    assert set(stats_written) == {n for n, s in TABLES.items() if s.sql is not None}
    for name, table in stats_written.items():
        assert table.num_rows > 0, name
        assert table.schema.equals(tables.schema_of(name), check_metadata=False), name


def test_table_names_the_writers_use_are_registered() -> None:
    names = {"DESCRIPTIONS", "CLASSIFICATIONS", "DETECTION", "THEMES", "CANDIDATES", "EXPLANATION_SCORES",
             "PROBES_TABLE", "METRICS_TABLE", "SCORES_TABLE", "CROSS_TABLE", "LODO_TABLE", "ENSEMBLE_TABLE"}
    for name in names:
        values = [v for v in _definitions(name) if isinstance(v, str)]
        assert values, name
        for v in values:
            assert v in TABLES, (name, v)


def _readme_tables() -> set[str]:
    text = (REPO / "lake" / "README.md").read_text(encoding="utf-8")
    layout = re.search(r"```\nlake/<profile>/\n(.*?)```", text, re.S)
    assert layout is not None
    found = set()
    for line in layout.group(1).splitlines():
        m = re.match(r"\s+([a-z_]+)/(layer=L/|dataset=D/)\S*part-0\.parquet", line)
        if m:
            found.add(m.group(1))
    found |= set(re.findall(r"`(stats/[a-z_]+)`", text))
    return found


def test_every_table_the_lake_readme_documents_is_registered() -> None:
    documented = _readme_tables()
    assert {"samples", "tokens", "activations", "token_residuals", "stats/probe_metrics"} <= documented
    assert documented - set(TABLES) == set()


def test_lake_fixed_partition_keys_come_from_the_registry() -> None:
    from dagster_project.lib.lake import TABLES as LAKE_TABLES

    assert LAKE_TABLES == {
        "samples": ("dataset",),
        "tokens": ("dataset",),
        "activations": ("layer", "dataset"),
        "token_activations": ("layer", "dataset"),
        "residuals": ("layer", "dataset"),
        "token_residuals": ("layer", "dataset"),
    }
    for name, keys in LAKE_TABLES.items():
        assert TABLES[name].partition_keys == keys


def test_activation_tables_are_registered_layer_by_dataset() -> None:
    for name in tables.ACTIVATION_TABLES:
        assert TABLES[name].partition_keys == ("layer", "dataset")


def test_width_schemas_need_d_model() -> None:
    with pytest.raises(ValueError, match="d_model"):
        table_spec("residuals").arrow_schema()
    assert tables.schema_of("token_residuals", 8).field("resid").type == pa.list_(pa.float16(), 8)


def test_unknown_table_is_an_error_naming_it() -> None:
    with pytest.raises(KeyError, match="'nope' is not a lake table"):
        table_spec("nope")


def test_a_spec_gives_exactly_one_schema_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        tables.TableSpec("stats/x", ("layer",), "x")
    with pytest.raises(ValueError, match="exactly one"):
        tables.TableSpec("stats/x", ("layer",), "x", schema=tables.THEMES_SCHEMA,
                         width_schema=tables.residual_schema)


@pytest.mark.parametrize("row_type", list(tables.ROW_TYPES))
def test_row_types_name_the_schema_fields_in_order(row_type: type) -> None:
    schema = tables.schema_of(tables.ROW_TYPES[row_type])
    assert [f.name for f in dataclasses.fields(row_type)] == schema.names


def test_table_from_rows_builds_the_registered_schema_from_dataclasses_or_mappings() -> None:
    rows = [tables.ThemeRow(3, 0, "refusal", 2, ["refuse", "harm"], "refuses harmful requests"),
            {"feature_id": 5, "theme_id": 0, "theme_name": "refusal", "theme_size": 2, "extra": 1}]
    t = table_from_rows("stats/themes", rows)
    assert t.schema.equals(tables.THEMES_SCHEMA)
    assert t.column("feature_id").to_pylist() == [3, 5]
    assert t.column("top_terms").to_pylist() == [["refuse", "harm"], None]
    assert table_from_rows("stats/probe_scores", []).schema.equals(tables.PROBE_SCORES_SCHEMA)
