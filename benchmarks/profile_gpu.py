"""Where the project's GPU extraction spends its time: forward alone, + SAE encode/pool, + host writes.

Companion to extract_gpu.py (same model, SAEs and texts). Prints a breakdown and the top CUDA kernels.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.extract_gpu import (
    CONFIGS,
    StubTokenizer,
    build_model,
    build_saes,
    calibrate_thresholds,
    synthetic_items,
)


def main() -> None:
    from dagster_project.lib.extraction import encode_pool, forward_layers, length_batches, pad_batch
    from dagster_project.lib.model import LoadedModel

    p = argparse.ArgumentParser()
    p.add_argument("--config", default="27b")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--texts", type=int, default=48)
    p.add_argument("--full", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the RMSNorm and MLP forwards")
    args = p.parse_args()
    spec = CONFIGS[args.config]
    model, cfg = build_model(args.config)
    if args.compile:
        from transformers.models.gemma3 import modeling_gemma3 as mg

        mg.Gemma3RMSNorm.forward = torch.compile(mg.Gemma3RMSNorm.forward, dynamic=True)
        mg.Gemma3MLP.forward = torch.compile(mg.Gemma3MLP.forward, dynamic=True)
    lm = LoadedModel(model, StubTokenizer(), "x", cfg.num_hidden_layers, cfg.hidden_size, torch.device("cuda"),
                     torch.bfloat16)
    saes = build_saes(cfg.hidden_size, spec["width"], spec["layers"])
    items = synthetic_items(args.texts, cfg.vocab_size)
    calibrate_thresholds(lm, saes, items)
    layers = sorted(saes)
    batches = [[items[i] for i in b] for b in length_batches([len(t.ids) for t in items], args.batch_tokens)]
    tokens = sum(t.n_real for t in items)

    def timed(label: str, fn) -> None:  # noqa: ANN001
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        print(f"{label:45s} {dt:7.3f} s  {tokens / dt:10,.0f} tok/s", flush=True)

    def fwd() -> None:
        for rows in batches:
            ids, att = pad_batch(rows, 0, lm.device)
            forward_layers(lm, ids, att, layers)

    def fwd_nomask() -> None:
        for rows in batches:
            ids, att = pad_batch(rows, 0, lm.device)
            forward_layers(lm, ids, None, layers)

    def fwd_encode(tok: bool, res: bool) -> None:
        for rows in batches:
            ids, att = pad_batch(rows, 0, lm.device)
            h = forward_layers(lm, ids, att, layers)
            sids = torch.arange(len(rows), device="cuda")
            for L in layers:
                encode_pool(h[L][:, 1:], att[:, 1:].bool(), sids, saes[L], tok, res)

    print(f"{len(batches)} batches, {tokens} tokens")
    from benchmarks.extract_gpu import saes_in
    from dagster_project.lib.extraction import extract

    saes16 = saes_in(saes, torch.bfloat16)

    def gpu_only() -> None:
        for _out, _st in extract(lm, saes16, items, args.batch_tokens, on_device=True):
            pass

    timed("extract(), bf16 SAE, on device, no host copy", gpu_only)
    outs = [o for o, _ in extract(lm, saes16, items, args.batch_tokens, on_device=True)]
    torch.cuda.synchronize()
    import tempfile

    import pyarrow.parquet as pq

    t = time.perf_counter()
    lbs = [{L: db.to_arrow() for L, db in o.items()} for o in outs]
    t_arrow = time.perf_counter() - t
    n_rows = sum(lb.token_acts.num_rows for o in lbs for lb in o.values())
    print(f"host: device->Arrow for all batches {t_arrow:.3f} s ({n_rows:,} token rows)", flush=True)
    for codec, level in (("zstd", 3), ("zstd", 1), ("lz4", None), ("none", None)):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            for i, o in enumerate(lbs):
                for L, lb in o.items():
                    kw = {"compression": codec} if level is None else {"compression": codec, "compression_level": level}
                    pq.write_table(lb.token_acts, f"{tmp}/t{i}_{L}.parquet", **kw)
                    pq.write_table(lb.pooled, f"{tmp}/p{i}_{L}.parquet", **kw)
            dt = time.perf_counter() - t
            import pathlib

            size = sum(f.stat().st_size for f in pathlib.Path(tmp).iterdir())
            print(f"host: Parquet write {codec}:{level} {dt:.3f} s, {size / 2**20:.1f} MiB", flush=True)
    timed("forward only (mask)", fwd)
    if args.full:
        timed("forward only (no mask)", fwd_nomask)
        timed("forward + encode/pool (pooled only)", lambda: fwd_encode(False, False))
        timed("forward + encode/pool (+tokens, +resid)", lambda: fwd_encode(True, True))


if __name__ == "__main__":
    main()
