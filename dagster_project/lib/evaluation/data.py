"""Reading one layer from the lake for the probe stages: :class:`LayerData` (samples, pooled sparse rows,
residuals and per-token designs, read once and cached), the training datasets, selectivity and
classification scores, the activations' provenance and the per-layer choice of the best probe."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import duckdb
import numpy as np
import polars as pl
from numpy.typing import NDArray

from dagster_project.lib.evaluation.settings import (
    CALIBRATION,
    CHECK,
    CONTROL_ROLE,
    PROVENANCE_KEYS,
    EvaluationError,
)
from dagster_project.lib.lake import (
    Lake,
    LakeError,
)
from dagster_project.lib.probes import (
    FittedProbe,
    Matrix,
    ProbeSpec,
    dense_design,
    sparse_design,
)
from dagster_project.lib.provenance_record import ProvenanceRecord
from dagster_project.lib.sql import relation
from dagster_project.lib.token_probes import TokenMatrix, token_matrix_from_rows


def view_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    """Names of the views and tables visible on ``con``."""
    return {r[0] for r in con.sql("select table_name from information_schema.tables").fetchall()}


def _require_views(con: duckdb.DuckDBPyConnection, names: Iterable[str], hint: str) -> None:
    missing = sorted(set(names) - view_names(con))
    if missing:
        raise EvaluationError(f"the lake has no {', '.join(missing)} view(s): {hint}")


def polars_of(rel: duckdb.DuckDBPyRelation) -> pl.DataFrame:
    out = pl.from_arrow(rel.to_arrow_table())
    assert isinstance(out, pl.DataFrame)
    return out


class LayerData:
    """The samples of the lake and, read on first use and cached, the designs of one layer.

    Rows of every design follow the ``samples`` order: dataset, then ``sample_id``.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, layer: int) -> None:
        _require_views(con, ("samples", "activations"), f"materialize samples and activations for layer {layer}")
        self.con = con
        self.layer = int(layer)
        self.samples = polars_of(relation(con, "probes/samples")).with_columns(
            pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64)
        )
        extracted = set(polars_of(relation(con, "probes/layer_datasets", {"layer": self.layer}))["dataset"].to_list())
        self.extracted = sorted(extracted & set(self.samples["dataset"].unique().to_list()))
        self.has_residual_view = "residuals" in view_names(con)
        self._rows: dict[str, pl.DataFrame] = {}
        self._resid: dict[str, pl.DataFrame] = {}
        self._tok_resid_sets: dict[str, bool] = {}

    # -- datasets --------------------------------------------------------------------------

    def all_datasets(self) -> list[str]:
        """Every dataset of ``samples``, extracted at this layer or not."""
        return sorted(self.samples["dataset"].unique().to_list())

    def role(self, dataset: str) -> str:
        roles = self.samples.filter(pl.col("dataset") == dataset)["role"].unique().to_list()
        return str(roles[0]) if roles else ""

    def samples_of(self, datasets: Sequence[str]) -> pl.DataFrame:
        return self.samples.filter(pl.col("dataset").is_in(list(datasets)))

    def balance(self, datasets: Sequence[str]) -> dict[str, dict[str, int]]:
        """``{dataset: {n, n_pos, n_neg}}`` plus a ``total`` entry."""
        out: dict[str, dict[str, int]] = {}
        for d in datasets:
            y = self.samples_of([d])["is_positive"]
            out[d] = {"n": y.len(), "n_pos": int(y.sum()), "n_neg": int(y.len() - y.sum())}
        out["total"] = {k: sum(v[k] for v in out.values()) for k in ("n", "n_pos", "n_neg")}
        return out

    def raw_labels(self, datasets: Sequence[str]) -> list[Any]:
        return self.samples_of(datasets)["label"].to_list()

    def controls(self, exclude: Sequence[str] = ()) -> list[str]:
        """The ``control``-role datasets extracted at this layer (negatives-only benign or honest text)."""
        return [d for d in self.extracted if self.role(d) == CONTROL_ROLE and d not in exclude]

    def control_half(self, datasets: Sequence[str], half: str) -> pl.DataFrame:
        """The ``calibration`` (even ``sample_id``: thresholds are set here) or ``check`` (odd: held-out
        false-positive rates) half of control sets."""
        parity = 0 if half == CALIBRATION else 1
        return self.samples_of(datasets).filter(pl.col("sample_id") % 2 == parity)

    def eval_samples(self, dataset: str) -> pl.DataFrame:
        """The samples a probe is evaluated on: a control set's check half, any other set whole."""
        if self.role(dataset) == CONTROL_ROLE:
            return self.control_half([dataset], CHECK)
        return self.samples_of([dataset])

    # -- designs ---------------------------------------------------------------------------

    def _read_once(self, cache: dict[str, pl.DataFrame], statement: str, datasets: Sequence[str]) -> None:
        """Read ``statement`` at this layer for the ``datasets`` not in ``cache`` yet, one frame per dataset."""
        todo = [d for d in datasets if d not in cache]
        if todo:
            df = polars_of(relation(self.con, statement, {"layer": self.layer, "datasets": todo}))
            df = df.with_columns(pl.col("dataset").cast(pl.String))
            for d in todo:
                cache[d] = df.filter(pl.col("dataset") == d)

    def rows(self, datasets: Sequence[str]) -> pl.DataFrame:
        """Pooled sparse rows of ``datasets`` at this layer (read once per dataset)."""
        self._read_once(self._rows, "probes/pooled_rows", datasets)
        return pl.concat([self._rows[d] for d in datasets]) if datasets else pl.DataFrame()

    def residual_rows(self, datasets: Sequence[str]) -> pl.DataFrame:
        if not self.has_residual_view:
            raise EvaluationError(f"the lake has no residuals view: extract layer {self.layer} with residuals")
        self._read_once(self._resid, "probes/residuals", datasets)
        return pl.concat([self._resid[d] for d in datasets])

    def has_residuals(self, dataset: str) -> bool:
        """Every sample of ``dataset`` has a residual row at this layer."""
        if not self.has_residual_view:
            return False
        return self.residual_rows([dataset]).height == self.samples_of([dataset]).height

    def sparse(
        self, datasets: Sequence[str], feature_ids: Sequence[int] | NDArray[np.int64], value: str
    ) -> tuple[Any, NDArray[np.int8], list[tuple[str, int]]]:
        return sparse_design(self.rows(datasets), self.samples_of(datasets), feature_ids, value)

    def dense(
        self, datasets: Sequence[str], pooling: str
    ) -> tuple[NDArray[np.float64], NDArray[np.int8], list[tuple[str, int]]]:
        return dense_design(self.residual_rows(datasets), self.samples_of(datasets), pooling)  # type: ignore[arg-type]

    def sparse_for(
        self, samples: pl.DataFrame, feature_ids: Sequence[int] | NDArray[np.int64], value: str
    ) -> tuple[Any, NDArray[np.int8], list[tuple[str, int]]]:
        """``sparse`` over any subset of samples (rows follow ``samples``)."""
        datasets = sorted(set(samples["dataset"].to_list()))
        return sparse_design(self.rows(datasets), samples, feature_ids, value)

    def dense_for(
        self, samples: pl.DataFrame, pooling: str
    ) -> tuple[NDArray[np.float64], NDArray[np.int8], list[tuple[str, int]]]:
        datasets = sorted(set(samples["dataset"].to_list()))
        return dense_design(self.residual_rows(datasets), samples, pooling)  # type: ignore[arg-type]

    def design_for(self, probe: FittedProbe, datasets: Sequence[str]) -> tuple[Matrix, NDArray[np.int8], list]:
        """The design ``probe`` scores: its own SAE features, or its residual pooling (per token for a
        token-level probe)."""
        if probe.spec.is_token:
            samples = self.samples_of(datasets)
            y = samples["is_positive"].cast(pl.Int8).to_numpy().astype(np.int8)
            keys = list(zip(samples["dataset"].to_list(), samples["sample_id"].to_list(), strict=True))
            return self.token_design_for(probe, samples), y, keys
        if probe.spec.is_dense:
            return self.dense(datasets, probe.spec.pooling)
        return self.sparse(datasets, probe.spec.feature_ids, probe.spec.value)

    def groups_of(self, samples: pl.DataFrame) -> list[str]:
        return samples["group"].to_list()

    # -- token-level designs -------------------------------------------------------------------

    @property
    def has_token_views(self) -> bool:
        """Per-token SAE activations and the tokens table exist (token-level SAE probes can run)."""
        return {"token_activations", "tokens"} <= view_names(self.con)

    def token_sparse_for(self, samples: pl.DataFrame, feature_ids: Sequence[int] | NDArray[np.int64]) -> TokenMatrix:
        """A :class:`TokenMatrix` of ``samples`` (in order) over ``feature_ids``: every real token of every
        text, a text with no token as one all-zero token."""
        datasets = sorted(set(samples["dataset"].to_list()))
        fids = np.asarray(feature_ids, dtype=np.int64)
        keys = samples.select(pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64)).with_row_index("_row")
        counts = polars_of(relation(self.con, "probes/token_counts", {"datasets": datasets})).with_columns(
            pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64))
        n = keys.join(counts, on=["dataset", "sample_id"], how="left").sort("_row")["n_tokens"].fill_null(1)
        rows = polars_of(relation(self.con, "probes/token_rows", {"layer": self.layer, "datasets": datasets,
                                                             "feature_ids": fids.tolist()}))
        rows = rows.with_columns(pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64)).join(
            keys, on=["dataset", "sample_id"], how="inner")
        col = pl.DataFrame({"feature_id": fids, "_col": np.arange(fids.size)})
        rows = rows.with_columns(pl.col("feature_id").cast(pl.Int64)).join(col, on="feature_id", how="inner")
        return token_matrix_from_rows(n.clip(lower_bound=1).to_numpy(), rows["_row"].to_numpy(), rows["token_pos"].to_numpy(),
                                      rows["_col"].to_numpy(), rows["act"].to_numpy(), fids.size)

    def token_design_for(self, probe: FittedProbe, samples: pl.DataFrame) -> TokenMatrix:
        if probe.spec.is_dense:
            return self.token_dense_for(samples)
        return self.token_sparse_for(samples, probe.spec.feature_ids)

    def has_token_residuals(self, dataset: str) -> bool:
        """Every sample of ``dataset`` has its per-token residuals at this layer (token-level dense probes)."""
        if "token_residuals" not in view_names(self.con):
            return False
        if dataset not in self._tok_resid_sets:
            n = self.con.sql("select count(distinct sample_id) from token_residuals where layer = $layer and "
                             "dataset = $dataset", params={"layer": self.layer, "dataset": dataset}).fetchall()[0][0]
            self._tok_resid_sets[dataset] = int(n) == self.samples_of([dataset]).height
        return self._tok_resid_sets[dataset]

    def can_score(self, spec: ProbeSpec, dataset: str) -> bool:
        """The lake holds what ``spec`` scores for ``dataset`` (residuals / per-token residuals / tokens)."""
        if spec.is_token:
            return self.has_token_residuals(dataset) if spec.is_dense else self.has_token_views
        return self.has_residuals(dataset) if spec.is_dense else True

    def token_dense_for(self, samples: pl.DataFrame) -> TokenMatrix:
        """A dense :class:`TokenMatrix` of ``samples`` (in order): every real token's residual vector."""
        datasets = sorted(set(samples["dataset"].to_list()))
        missing = [d for d in datasets if not self.has_token_residuals(d)]
        if missing:
            raise EvaluationError(f"no per-token residuals at layer {self.layer} for {missing}: extract them "
                                  "(the profile's token_residuals, or the activations asset's write_token_residuals)")
        keys = samples.select(pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64)).with_row_index("_row")
        rows = polars_of(relation(self.con, "probes/token_residuals", {"layer": self.layer, "datasets": datasets}))
        rows = rows.with_columns(pl.col("dataset").cast(pl.String), pl.col("sample_id").cast(pl.Int64)).join(
            keys, on=["dataset", "sample_id"], how="inner").sort(["_row", "token_pos"])
        lengths = rows.group_by("_row").len().sort("_row")
        if lengths.height != keys.height:
            raise EvaluationError(f"{keys.height - lengths.height} sample(s) have no per-token residuals at layer "
                                  f"{self.layer}: re-extract {datasets}")
        width = int(rows.select(pl.col("resid").list.len().max()).item() or 0)
        tokens = rows["resid"].cast(pl.Array(pl.Float32, width)).to_numpy()
        return TokenMatrix(tokens, np.concatenate([[0], np.cumsum(lengths["len"].to_numpy())]))


def resolve_train_datasets(data: LayerData, requested: Sequence[str] = ()) -> list[str]:
    """The training datasets: ``requested`` if given, else every ``train``-role dataset.

    Every one must be extracted at the layer, and together they must hold at least two samples of
    each class (cross-validation). Positive-only datasets may be mixed in.
    """
    known = data.all_datasets()
    if requested:
        unknown = sorted(set(requested) - set(known))
        if unknown:
            raise EvaluationError(f"train_datasets {unknown} are not in the samples table; known: {known}")
        train = sorted(set(requested))
    else:
        train = [d for d in known if data.role(d) == "train"]  # control sets join only as configured
        if not train:
            raise EvaluationError(f"no dataset has role 'train' (datasets: {known}); name train_datasets in config")
    missing = [d for d in train if d not in data.extracted]
    if missing:
        raise EvaluationError(
            f"training dataset(s) {missing} have no activations at layer {data.layer}: materialize activations "
            f"for partitions {', '.join(f'{d}|{data.layer}' for d in missing)}"
        )
    bal = data.balance(train)["total"]
    if bal["n_pos"] < 2 or bal["n_neg"] < 2:
        raise EvaluationError(
            f"training datasets {train} hold {bal['n_pos']} positive and {bal['n_neg']} negative samples; "
            "probes need at least 2 of each class"
        )
    return train


def read_selectivity(con: duckdb.DuckDBPyConnection, layer: int) -> pl.DataFrame:
    """``feature_id, selectivity`` of the active features of ``layer`` from the ``feature_stats`` view."""
    _require_views(con, ("feature_stats",), f"materialize feature_stats for layer {layer}")
    df = polars_of(relation(con, "probes/selectivity", {"layer": int(layer)}))
    if df.height == 0:
        raise EvaluationError(f"feature_stats has no active feature for layer {layer}: materialize feature_stats")
    return df


def read_classification_scores(con: duckdb.DuckDBPyConnection, layer: int) -> pl.DataFrame | None:
    """``feature_id, score`` (0-10) of the classified features of ``layer``; ``None`` when there are none."""
    if "classifications" not in view_names(con):
        return None
    df = polars_of(relation(con, "probes/classification_scores", {"layer": int(layer)}))
    return df if df.height else None


def activation_provenance(lake: Lake, layer: int, datasets: Sequence[str]) -> dict[str, Any]:
    """The model, SAE, hook, dtype and config hash recorded in the activation files of ``datasets``.

    They must agree: a probe trained on activations of two different SAEs would be meaningless.
    """
    seen: dict[str, dict[str, Any]] = {}
    for d in datasets:
        meta = lake.read_meta("activations", layer, d)
        seen[d] = ProvenanceRecord.from_dict(meta).to_dict(PROVENANCE_KEYS)
    distinct = {json.dumps(v, sort_keys=True) for v in seen.values()}
    if len(distinct) > 1:
        detail = "; ".join(f"{d}: {v}" for d, v in seen.items())
        raise LakeError(
            f"activations of layer {layer} were extracted with different models/SAEs/configs ({detail}); "
            "re-extract them with one profile"
        )
    return next(iter(seen.values())) if seen else {}


def layer_choice(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """The best probe of every layer in the lake by kind, ranked by selection score (``probes/layer_choice``):
    the layer is chosen like the probe, on held-out groups where the layers were selected that way."""
    if "probes" not in view_names(con):
        return pl.DataFrame()
    return polars_of(relation(con, "probes/layer_choice"))
