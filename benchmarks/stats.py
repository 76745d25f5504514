"""Selectivity + active-count statistics: DuckDB over sparse Parquet vs numpy over dense ``.npy``.

Synthetic activations shaped like the seed's (16,384 SAE features, about 3,700 active per sample,
``max_act`` and ``mean_act``), one training dataset with half the samples positive, written in the lake
layout (sparse zstd Parquet, written in chunks so generation fits in memory) and, up to ``--dense-max``
samples, as dense float32 ``max_act.npy`` / ``mean_act.npy``.

Each measurement runs in a fresh subprocess (so peak RSS is its own) and includes everything from
opening the data: for DuckDB, creating the views and running ``sql/stats/feature_stats.sql`` and
``sql/stats/activation_profile.sql`` through ``dagster_project.lib.stats``; for numpy, ``np.load`` of the
two dense arrays and the same statistics (class means of max_act and mean_act, class frequencies, max,
selectivity; active features per sample mean/median/p90, max_act mean/p50/p99, features active).

    .venv/bin/python benchmarks/stats.py                      # the seed's scale (2,689 samples)
    .venv/bin/python benchmarks/stats.py --samples 2689 10000 30000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

N_FEATURES = 16_384
ACTIVE_PER_SAMPLE = 3_700
LAYER = 0
DATASET = "bench"
CHUNK = 512


def _rss_mib() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it does not inherit the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(out: Path, n: int, dense: bool, seed: int = 0) -> dict[str, float]:
    """Write samples + activations Parquet (and dense .npy if ``dense``); return sizes and timing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dagster_project.lib.tables import POOLED_SCHEMA

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    # per-feature firing rates with a heavy tail, scaled to ~ACTIVE_PER_SAMPLE active per sample
    rates = rng.lognormal(0.0, 1.0, N_FEATURES)
    for _ in range(10):  # rescale after clipping until the expected count is right
        rates = np.clip(rates / rates.sum() * ACTIVE_PER_SAMPLE, 0.0, 0.95)
    rates = rates.astype(np.float32)
    scale = rng.lognormal(0.5, 0.5, N_FEATURES).astype(np.float32)
    is_positive = np.zeros(n, dtype=bool)
    is_positive[rng.permutation(n)[: n // 2]] = True
    # a few class-selective features: positives fire twice as often on them
    boost = np.zeros(N_FEATURES, dtype=np.float32)
    boost[rng.choice(N_FEATURES, 64, replace=False)] = 1.0

    samples_dir = out / "samples" / f"dataset={DATASET}"
    acts_dir = out / "activations" / f"layer={LAYER}" / f"dataset={DATASET}"
    samples_dir.mkdir(parents=True, exist_ok=True)
    acts_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array(np.arange(n, dtype=np.int32)),
                "source_id": pa.array([str(i) for i in range(n)]),
                "text": pa.array(["..."] * n),
                "label": pa.array(np.where(is_positive, "alignment_faking", "aligned")),
                "is_positive": pa.array(is_positive),
                "role": pa.array(["train"] * n),
                "n_chars": pa.array(np.full(n, 3, dtype=np.int32)),
            }
        ),
        samples_dir / "part-0.parquet",
        compression="zstd",
    )
    schema = POOLED_SCHEMA  # the registry's, without importing torch (this measures peak memory)
    dense_max = dense_mean = None
    if dense:
        np.save(out / "is_positive.npy", is_positive)
        dense_max = np.lib.format.open_memmap(
            out / "max_act.npy", mode="w+", dtype=np.float32, shape=(n, N_FEATURES)
        )
        dense_mean = np.lib.format.open_memmap(
            out / "mean_act.npy", mode="w+", dtype=np.float32, shape=(n, N_FEATURES)
        )
    n_rows = 0
    with pq.ParquetWriter(acts_dir / "part-0.parquet", schema, compression="zstd") as writer:
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            c = stop - start
            p = rates[None, :] * (1.0 + boost[None, :] * is_positive[start:stop, None])
            mask = rng.random((c, N_FEATURES), dtype=np.float32) < p
            sid, fid = np.nonzero(mask)
            k = sid.size
            max_act = (rng.standard_exponential(k, dtype=np.float32) * scale[fid] + np.float32(0.01)).astype(
                np.float32
            )
            mean_act = (max_act * rng.uniform(0.02, 0.3, k).astype(np.float32)).astype(np.float32)
            writer.write_table(
                pa.table(
                    {
                        "sample_id": pa.array((sid + start).astype(np.int32)),
                        "feature_id": pa.array(fid.astype(np.int32)),
                        "max_act": pa.array(max_act),
                        "mean_act": pa.array(mean_act),
                        "argmax_token": pa.array(rng.integers(0, 1024, k, dtype=np.int32)),
                        "n_active_tokens": pa.array(rng.integers(1, 64, k, dtype=np.int32)),
                    },
                    schema=schema,
                ),
                row_group_size=1 << 20,
            )
            if dense_max is not None and dense_mean is not None:
                block = np.zeros((c, N_FEATURES), dtype=np.float32)
                block[sid, fid] = max_act
                dense_max[start:stop] = block
                block[sid, fid] = mean_act
                dense_mean[start:stop] = block
            n_rows += k
    if dense_max is not None and dense_mean is not None:
        dense_max.flush()
        dense_mean.flush()
        del dense_max, dense_mean
    parquet_bytes = sum(f.stat().st_size for f in (out / "activations").rglob("*.parquet"))
    npy_bytes = sum((out / f).stat().st_size for f in ("max_act.npy", "mean_act.npy")) if dense else 0
    return {
        "n_rows": n_rows,
        "parquet_mib": parquet_bytes / 2**20,
        "npy_mib": npy_bytes / 2**20,
        "generate_s": time.perf_counter() - t0,
    }


def work_duckdb(data: Path) -> dict[str, float]:
    import duckdb

    from dagster_project.lib import stats

    t0 = time.perf_counter()
    con = duckdb.connect()
    for view, glob in (("samples", "samples/*/*.parquet"), ("activations", "activations/*/*/*.parquet")):
        con.execute(
            f"create view {view} as select * from read_parquet('{data / glob}', hive_partitioning = true)"
        )
    con.execute(
        "create view tokens as select * from (values ('', 0, 0)) as t(dataset, sample_id, token_pos) where false"
    )
    fs = stats.feature_stats(con, LAYER, min_act=1.0)
    profile = stats.activation_profile(con, LAYER, sae_width=N_FEATURES)
    seconds = time.perf_counter() - t0
    row = profile.to_pylist()[0]
    return {
        "seconds": seconds,
        "peak_rss_mib": _rss_mib(),
        "n_features": fs.num_rows,
        "active_mean": row["active_per_sample_mean"],
        "max_act_p99": row["max_act_p99"],
    }


def work_numpy(data: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    x = np.load(data / "max_act.npy")
    m = np.load(data / "mean_act.npy")
    y = np.load(data / "is_positive.npy")
    yf = y.astype(np.float32)
    nf = (~y).astype(np.float32)
    n_pos, n_neg = float(y.sum()), float((~y).sum())
    active = x > 0
    pos_mean = (yf @ x) / n_pos
    neg_mean = (nf @ x) / n_neg
    pos_freq = active[y].sum(0, dtype=np.int64) / n_pos
    neg_freq = active[~y].sum(0, dtype=np.int64) / n_neg
    max_act = x.max(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        selectivity = (pos_mean - neg_mean) / (pos_mean + neg_mean)
        pm, nm = (yf @ m) / n_pos, (nf @ m) / n_neg
        selectivity_mean_act = (pm - nm) / (pm + nm)
    present = active.any(0)
    is_active = max_act >= 1.0
    counts = active.sum(1, dtype=np.int64)
    profile = (counts.mean(), np.median(counts), np.percentile(counts, 90))
    values = x[active]
    magnitude = (values.mean(), *np.percentile(values, [50, 99]))
    seconds = time.perf_counter() - t0
    del pos_freq, neg_freq, selectivity, selectivity_mean_act, is_active
    return {
        "seconds": seconds,
        "peak_rss_mib": _rss_mib(),
        "n_features": int(present.sum()),
        "active_mean": float(profile[0]),
        "max_act_p99": float(magnitude[2]),
    }


def _measure(engine: str, data: Path, repeats: int) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", engine, "--data", str(data)],
            check=True,
            capture_output=True,
            text=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = dict(runs[0])
    result["seconds"] = statistics.median(r["seconds"] for r in runs)
    result["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[2689])
    ap.add_argument("--dense-max", type=int, default=30_000, help="largest size also written as dense .npy")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/featurelake-bench-stats"))
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--worker", choices=["duckdb", "numpy"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        work = work_duckdb if args.worker == "duckdb" else work_numpy
        print(json.dumps(work(args.data)))
        return

    lines = [
        "| samples | sparse rows | Parquet MiB | .npy MiB | DuckDB s | DuckDB peak RSS MiB | numpy s (incl. load) "
        "| numpy peak RSS MiB | generate s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in args.samples:
        data = args.workdir / f"n{n}"
        shutil.rmtree(data, ignore_errors=True)
        dense = n <= args.dense_max
        gen = generate(data, n, dense)
        print(f"generated {n} samples: {gen}; load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        repeats = args.repeats if n <= 30_000 else 1
        duck = _measure("duckdb", data, repeats)
        print(f"  duckdb {duck}", file=sys.stderr, flush=True)
        if dense:
            nump = _measure("numpy", data, repeats)
            print(f"  numpy  {nump}", file=sys.stderr, flush=True)
            assert duck["n_features"] == nump["n_features"], (duck, nump)
            assert abs(duck["active_mean"] - nump["active_mean"]) < 1e-6 * nump["active_mean"]
            numpy_cells = f"{nump['seconds']:.2f} | {nump['peak_rss_mib']:,.0f}"
            npy = f"{gen['npy_mib']:,.0f}"
        else:
            numpy_cells, npy = "not run | not run", "-"
        lines.append(
            f"| {n:,} | {gen['n_rows']:,} | {gen['parquet_mib']:,.0f} | {npy} | {duck['seconds']:.2f} "
            f"| {duck['peak_rss_mib']:,.0f} | {numpy_cells} | {gen['generate_s']:.0f} |"
        )
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
    lines.append("")
    lines.append(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; median of {args.repeats} "
        "fresh processes per cell (1 above 30,000 samples); numpy reads max_act.npy + mean_act.npy."
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
