"""A small lake on disk for the SQL statistics tests, with the dense arrays it was written from.

Layout as in ``lake/README.md`` (hive partitioning, partition columns only in the path). The dense
``max_act`` / ``mean_act`` arrays are the truth that numpy reference computations use.

Planted structure (per layer, with different random draws):

- features 0-4 fire mostly on positives (class-selective, positive direction);
- features 5-7 fire only on negatives, 8-9 only on positives (selectivity exactly -1 / +1: ties);
- features 10-12 never fire on the training datasets, only on the others;
- feature 13 fires everywhere but below ``min_act`` = 1.0 (not ``is_active``);
- features 45-49 never fire (dead, as are 50-63 of the SAE width 64);
- samples 0 and 1 of every dataset have no active feature at all.

``build_lake(..., quantum=q)`` rounds every active value up to a multiple of ``q`` (same draws otherwise), so
that active values tie within a feature: the rank test's tie handling is then exercised beyond the zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LAYERS = (3, 6)
N_FEATURES = 50
SAE_WIDTH = 64
MIN_ACT = 1.0
# name -> (role, n_positive, n_negative)
DATASETS: dict[str, tuple[str, int, int]] = {
    "train_a": ("train", 18, 22),
    "train_pos": ("train", 20, 0),
    "test_b": ("test", 15, 15),
    "ood_c": ("ood", 10, 14),
}


@dataclass
class LakeFixture:
    root: Path
    is_positive: dict[str, np.ndarray] = field(default_factory=dict)
    n_tokens: dict[str, np.ndarray] = field(default_factory=dict)
    max_act: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    mean_act: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    argmax: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    words: dict[str, list[list[str]]] = field(default_factory=dict)

    @property
    def datasets(self) -> list[str]:
        return sorted(DATASETS)

    def role(self, dataset: str) -> str:
        return DATASETS[dataset][0]

    def train_datasets(self) -> list[str]:
        return [d for d in self.datasets if self.role(d) == "train"]

    def stacked(
        self, layer: int, datasets: list[str], which: str = "max_act"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Dense (samples x features) float64 array and labels over ``datasets``."""
        arrays = self.max_act if which == "max_act" else self.mean_act
        x = np.vstack([arrays[(layer, d)] for d in datasets]).astype(np.float64)
        y = np.concatenate([self.is_positive[d] for d in datasets])
        return x, y


def _activations(
    rng: np.random.Generator, dataset: str, is_positive: np.ndarray, quantum: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    role = DATASETS[dataset][0]
    n = len(is_positive)
    pos = is_positive[:, None]
    active = rng.random((n, N_FEATURES)) < 0.15
    values = rng.gamma(2.0, 1.0, size=(n, N_FEATURES)) + 0.05
    # positive-selective 0-4: frequent and strong on positives, rare on negatives
    sel = slice(0, 5)
    active[:, sel] = rng.random((n, 5)) < np.where(pos, 0.8, 0.1)
    values[:, sel] *= np.where(pos, 2.5, 1.0)
    # 5-7 only on negatives, 8-9 only on positives
    active[:, 5:8] = (rng.random((n, 3)) < 0.6) & ~pos
    active[:, 8:10] = (rng.random((n, 2)) < 0.5) & pos
    # 10-12 never on training datasets
    active[:, 10:13] = (rng.random((n, 3)) < 0.5) & (role != "train")
    # 13 weak everywhere
    active[:, 13] = rng.random(n) < 0.3
    values[:, 13] = rng.uniform(0.1, 0.9, size=n)
    # dead features and empty samples
    active[:, 45:50] = False
    active[:2, :] = False
    if quantum is not None:
        values = np.ceil(values / quantum) * quantum
    max_act = np.where(active, values, 0.0).astype(np.float32)
    mean_act = (max_act * rng.uniform(0.05, 0.5, size=max_act.shape)).astype(np.float32)
    return max_act, mean_act


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")


def build_lake(root: Path, seed: int = 0, quantum: float | None = None) -> LakeFixture:
    """Write samples, tokens and activations Parquet under ``root``; return the dense truth (``quantum``: round
    active values up to its multiples, for ties)."""
    rng = np.random.default_rng(seed)
    fx = LakeFixture(root=root)
    vocab = [f"w{i}" for i in range(40)]
    for dataset, (role, n_pos, n_neg) in DATASETS.items():
        n = n_pos + n_neg
        is_positive = np.zeros(n, dtype=bool)
        is_positive[rng.permutation(n)[:n_pos]] = True
        n_tok = rng.integers(3, 12, size=n)
        words = [[vocab[j] for j in rng.integers(0, len(vocab), size=k)] for k in n_tok]
        fx.is_positive[dataset] = is_positive
        fx.n_tokens[dataset] = n_tok
        fx.words[dataset] = words
        texts = [" ".join(w) for w in words]
        _write(
            pa.table(
                {
                    "sample_id": pa.array(np.arange(n), pa.int32()),
                    "source_id": [f"{dataset}-{i}" for i in range(n)],
                    "text": texts,
                    "label": ["alignment_faking" if p else "aligned" for p in is_positive],
                    "is_positive": is_positive,
                    "role": [role] * n,
                    "n_chars": pa.array([len(t) for t in texts], pa.int32()),
                }
            ),
            root / "samples" / f"dataset={dataset}" / "part-0.parquet",
        )
        tok_rows: dict[str, list] = {k: [] for k in ("sample_id", "token_pos", "token_id", "token_text")}
        starts: list[int] = []
        ends: list[int] = []
        for sid, ws in enumerate(words):
            pos = 0
            for tp, w in enumerate(ws):
                tok_rows["sample_id"].append(sid)
                tok_rows["token_pos"].append(tp)
                tok_rows["token_id"].append(vocab.index(w))
                tok_rows["token_text"].append(w)
                starts.append(pos)
                ends.append(pos + len(w))
                pos += len(w) + 1
        _write(
            pa.table(
                {
                    "sample_id": pa.array(tok_rows["sample_id"], pa.int32()),
                    "token_pos": pa.array(tok_rows["token_pos"], pa.int32()),
                    "token_id": pa.array(tok_rows["token_id"], pa.int32()),
                    "token_text": tok_rows["token_text"],
                    "char_start": pa.array(starts, pa.int32()),
                    "char_end": pa.array(ends, pa.int32()),
                }
            ),
            root / "tokens" / f"dataset={dataset}" / "part-0.parquet",
        )
        for layer in LAYERS:
            max_act, mean_act = _activations(rng, dataset, is_positive, quantum)
            argmax = rng.integers(0, n_tok[:, None], size=max_act.shape).astype(np.int32)
            fx.max_act[(layer, dataset)] = max_act
            fx.mean_act[(layer, dataset)] = mean_act
            fx.argmax[(layer, dataset)] = argmax
            sid, fid = np.nonzero(max_act > 0)
            _write(
                pa.table(
                    {
                        "sample_id": pa.array(sid.astype(np.int32)),
                        "feature_id": pa.array(fid.astype(np.int32)),
                        "max_act": pa.array(max_act[sid, fid]),
                        "mean_act": pa.array(mean_act[sid, fid]),
                        "argmax_token": pa.array(argmax[sid, fid]),
                        "n_active_tokens": pa.array(rng.integers(1, n_tok[sid] + 1).astype(np.int32)),
                    }
                ),
                root / "activations" / f"layer={layer}" / f"dataset={dataset}" / "part-0.parquet",
            )
    return fx


VIEW_GLOBS = {
    "samples": "samples/*/*.parquet",
    "tokens": "tokens/*/*.parquet",
    "activations": "activations/*/*/*.parquet",
}


def connect(root: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the lake's base views over ``root``."""
    con = duckdb.connect()
    for view, glob in VIEW_GLOBS.items():
        con.execute(
            f"create view {view} as select * from read_parquet('{root / glob}', hive_partitioning = true)"
        )
    return con
