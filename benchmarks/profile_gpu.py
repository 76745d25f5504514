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
    args = p.parse_args()
    spec = CONFIGS[args.config]
    model, cfg = build_model(args.config)
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
    timed("forward only (mask)", fwd)
    timed("forward only (no mask)", fwd_nomask)
    timed("forward + encode/pool (pooled only)", lambda: fwd_encode(False, False))
    timed("forward + encode/pool (+tokens, +resid)", lambda: fwd_encode(True, True))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fwd_encode(True, True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
