"""Every SQL file is one statement with a header; every example query runs on the fixture lake."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import duckdb
import numpy as np
import pytest

from dagster_project.lib import sql, stats
from dagster_project.lib.sql import _PLACEHOLDER, SQL_DIR, relation
from tests.lib.fixtures_stats import LakeFixture, build_lake, connect

SQL_FILES = sorted(SQL_DIR.rglob("*.sql"))


@pytest.mark.parametrize("path", SQL_FILES, ids=lambda p: str(p.relative_to(SQL_DIR)))
def test_sql_file_is_one_statement_with_header(path: Any) -> None:
    text = path.read_text()
    assert text.lstrip().startswith("--"), f"{path} must start with a header comment"
    # placeholders ({{ident}}) are filled by dagster_project.lib.sql.render; any stand-in parses
    parsed = _PLACEHOLDER.sub(lambda m: "'x'" if m.group(1).endswith(("_path", "_glob")) else "x", text)
    assert len(duckdb.extract_statements(parsed)) == 1, f"{path} must hold exactly one statement"


def test_there_are_sql_files() -> None:
    names = {str(p.relative_to(SQL_DIR)) for p in SQL_FILES}
    assert {
        "stats/feature_stats.sql",
        "checks/train_classes.sql",
        "examples/feature_top_samples.sql",
    } <= names


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> LakeFixture:
    return build_lake(tmp_path_factory.mktemp("lake"), seed=3)


@pytest.fixture(scope="module")
def con(lake: LakeFixture) -> Iterator[duckdb.DuckDBPyConnection]:
    c = connect(lake.root)
    c.register("feature_stats", stats.feature_stats(c, 6))
    yield c
    c.close()


EXAMPLES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "top_selective_features": (
        {"layer": 6, "limit": 5},
        [
            "rank",
            "feature_id",
            "selectivity",
            "pos_mean",
            "neg_mean",
            "dataset",
            "role",
            "firing_rate",
            "firing_rate_pos",
            "firing_rate_neg",
        ],
    ),
    "feature_top_samples": (
        {"layer": 6, "feature_id": 0, "limit": 7},
        [
            "dataset",
            "sample_id",
            "role",
            "label",
            "is_positive",
            "max_act",
            "mean_act",
            "n_active_tokens",
            "argmax_token",
            "peak_token",
            "context",
        ],
    ),
    "features_only_in_a": (
        {"layer": 6, "dataset_a": "test_b", "dataset_b": "train_a"},
        ["feature_id", "n_firing", "firing_rate", "mean_act", "peak_act"],
    ),
    "active_features_per_sample": (
        {"layer": 6},
        [
            "dataset",
            "sample_id",
            "role",
            "label",
            "is_positive",
            "n_active",
            "sum_max_act",
            "peak_act",
            "peak_feature_id",
        ],
    ),
}


def test_every_example_is_covered() -> None:
    assert {p.stem for p in (SQL_DIR / "examples").glob("*.sql")} == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_with_expected_columns(con: duckdb.DuckDBPyConnection, name: str) -> None:
    params, columns = EXAMPLES[name]
    table = relation(con, f"examples/{name}", params).to_arrow_table()
    assert table.column_names == columns
    assert table.num_rows > 0


def test_top_selective_features_rates(lake: LakeFixture, con: duckdb.DuckDBPyConnection) -> None:
    rows = (
        relation(con, "examples/top_selective_features", {"layer": 6, "limit": 5})
        .to_arrow_table()
        .to_pylist()
    )
    assert len(rows) == 5 * len(lake.datasets)
    for r in rows:
        x = lake.max_act[(6, r["dataset"])]
        y = lake.is_positive[r["dataset"]]
        fires = x[:, r["feature_id"]] > 0
        assert r["firing_rate"] == pytest.approx(fires.mean())
        assert r["firing_rate_pos"] == pytest.approx(fires[y].mean())
        assert r["firing_rate_neg"] == (pytest.approx(fires[~y].mean()) if (~y).any() else None)


def test_feature_top_samples_peak_token(lake: LakeFixture, con: duckdb.DuckDBPyConnection) -> None:
    rows = (
        relation(con, "examples/feature_top_samples", {"layer": 6, "feature_id": 0, "limit": 7})
        .to_arrow_table()
        .to_pylist()
    )
    every = sorted(
        (
            (float(lake.max_act[(6, d)][s, 0]), d, s)
            for d in lake.datasets
            for s in np.flatnonzero(lake.max_act[(6, d)][:, 0] > 0)
        ),
        key=lambda t: -t[0],
    )
    assert [r["max_act"] for r in rows] == pytest.approx([t[0] for t in every[:7]])
    for r in rows:
        pos = lake.argmax[(6, r["dataset"])][r["sample_id"], 0]
        word = lake.words[r["dataset"]][r["sample_id"]][pos]
        assert r["argmax_token"] == pos and r["peak_token"] == word
        assert f"[[{word}]]" in r["context"]
        assert r["context"].replace("[[", "").replace("]]", "") in " ".join(
            lake.words[r["dataset"]][r["sample_id"]]
        )


def test_features_only_in_a(lake: LakeFixture, con: duckdb.DuckDBPyConnection) -> None:
    rows = (
        relation(
            con, "examples/features_only_in_a", {"layer": 6, "dataset_a": "test_b", "dataset_b": "train_a"}
        )
        .to_arrow_table()
        .to_pylist()
    )
    a, b = lake.max_act[(6, "test_b")], lake.max_act[(6, "train_a")]
    expected = set(np.flatnonzero((a > 0).any(0) & ~(b > 0).any(0)).tolist())
    assert {r["feature_id"] for r in rows} == expected >= {10, 11, 12}
    for r in rows:
        assert r["n_firing"] == int((a[:, r["feature_id"]] > 0).sum())


def test_active_features_per_sample(lake: LakeFixture, con: duckdb.DuckDBPyConnection) -> None:
    table = relation(con, "examples/active_features_per_sample", {"layer": 6}).to_arrow_table()
    assert table.num_rows == sum(len(v) for v in lake.is_positive.values())
    for r in table.to_pylist():
        x = lake.max_act[(6, r["dataset"])][r["sample_id"]]
        assert r["n_active"] == int((x > 0).sum())
        if r["n_active"] == 0:
            assert r["peak_feature_id"] is None and r["sum_max_act"] == 0
        else:
            assert r["peak_feature_id"] == int(np.argmax(x))


VIEW_FILES = sorted((SQL_DIR / "views").glob("*.sql"))


def test_every_view_is_used_and_every_use_exists() -> None:
    used = {v for p in SQL_FILES for v in sql.uses(str(p.relative_to(SQL_DIR).with_suffix("")))}
    assert used == {f"views/{p.stem}" for p in VIEW_FILES}


@pytest.mark.parametrize("path", VIEW_FILES, ids=lambda p: p.stem)
def test_view_installs_on_the_fixture_lake(con: duckdb.DuckDBPyConnection, path: Any) -> None:
    name = f"views/{path.stem}"
    cur = con.cursor()
    try:
        # the fixture lake has no per-token activations: an empty stand-in with their columns
        cur.execute("create temp table token_activations (layer integer, dataset varchar, sample_id integer, "
                    "token_pos integer, feature_id integer, act float)")
        order = sql.install_views(cur, name) + [name]
        for view in order:
            cur.execute(sql.render(view))
    finally:
        cur.close()
