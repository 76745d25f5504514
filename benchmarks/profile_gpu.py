"""Where the project's GPU extraction spends its time, stage by stage, on the lent GPU machine.

Companion to extract_gpu.py (same model, SAEs and texts; the decoder compiled as ``compile: true`` does).
Each stage adds one piece of ``extract_to_lake`` to the one before, so the differences locate the cost:

1. forward alone (project batching, packed where `extract` packs, stopped after the deepest layer);
2. + SAE encode and pooling on the device (``pool_device``), nothing compacted;
3. ``extract(on_device=True)``: + compaction on the side stream and the asynchronous copies to the host;
4. ``extract_to_lake`` into a lake whose writers drop the tables (Arrow built, threads run, no Parquet);
5. ``extract_to_lake`` into a real Parquet lake (what the ``activations`` asset does); before it, where the
   machine has ``/dev/shm``, the same into a lake in memory (5m): the disk's share.

Then a torch profiler pass over stage 5: GPU busy time (sum of kernel times on all streams) against wall time,
and the top kernels. Run: ``python benchmarks/profile_gpu.py --config 27b --batch-tokens 0``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.extract_gpu import (
    CONFIGS,
    StubTokenizer,
    build_model,
    build_saes,
    calibrate_thresholds,
    saes_in,
    synthetic_items,
    synthetic_texts,
)


class NullLake:
    """A lake that accepts every table and keeps none: the host-side cost without Parquet and disk."""

    class _Writer:
        def write_table(self, table: Any) -> None:
            pass

        def sync(self) -> None:
            pass

        def finish(self) -> None:
            pass

    def write(self, *args: Any, **kwargs: Any) -> None:
        pass

    @contextmanager
    def writer(self, *args: Any, **kwargs: Any) -> Iterator[_Writer]:
        yield NullLake._Writer()


class Gaps:
    """Wraps ``batch_hidden`` to time, with CUDA events, each batch's forward pass on the device and the time
    between one forward's end and the next one's start (the pooling of the batch, plus any wait for the
    host), and counts the batches whose launch found the previous forward already finished (the device
    had run dry: the host was late)."""

    def __init__(self, fn) -> None:  # noqa: ANN001
        self.fn = fn
        self.reset()

    def reset(self) -> None:
        self.events: list[tuple[Any, Any]] = []
        self.late = 0
        self.begin = torch.cuda.Event(enable_timing=True)
        self.begin.record()  # the device is idle here: its timestamp is the host's start
        self.end: Any = None

    def stop(self) -> None:
        """Call when the host is done (before waiting for the device)."""
        self.end = torch.cuda.Event(enable_timing=True)
        self.end.record()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.events and self.events[-1][1].query():
            self.late += 1
        before = torch.cuda.Event(enable_timing=True)
        before.record()
        out = self.fn(*args, **kwargs)
        after = torch.cuda.Event(enable_timing=True)
        after.record()
        self.events.append((before, after))
        return out

    def summary(self) -> str:
        torch.cuda.synchronize()
        ev = self.events
        fwd = sum(b.elapsed_time(a) for b, a in ev) / 1e3
        between = sum(ev[i][1].elapsed_time(ev[i + 1][0]) for i in range(len(ev) - 1)) / 1e3
        head = self.begin.elapsed_time(ev[0][0]) / 1e3
        tail = ev[-1][1].elapsed_time(self.end) / 1e3
        return (f"device: before the first forward {head:.3f} s, forwards {fwd:.3f} s, between forwards "
                f"{between:.3f} s, after the last forward {tail:.3f} s; {self.late} of {len(ev)} launches found "
                f"the device idle")


def main() -> None:
    from dagster_project.lib import lake as lake_mod
    from dagster_project.lib.extraction import (
        batching,
        extract,
        extract_to_lake,
        forward,
        initial_budget,
        plan_batches,
        pool_device,
    )
    from dagster_project.lib.lake import Lake
    from dagster_project.lib.model import LoadedModel, compile_decoder
    from dagster_project.lib.packing import can_pack

    p = argparse.ArgumentParser()
    p.add_argument("--config", default="27b", choices=sorted(CONFIGS))
    p.add_argument("--batch-tokens", type=int, default=4096, help="0 = auto (sized by free memory)")
    p.add_argument("--texts", type=int, default=48)
    p.add_argument("--no-trace", action="store_true")
    p.add_argument("--experiments", action="store_true",
                   help="also stage 5 with the per-token rows uncompressed, without the writers' syncs or with one "
                        "per write, and with the last batch not cut down")
    args = p.parse_args()
    spec = CONFIGS[args.config]
    model, cfg = build_model(args.config)
    lm = LoadedModel(model, StubTokenizer(), "x", cfg.num_hidden_layers, cfg.hidden_size, torch.device("cuda"),
                     torch.bfloat16)
    saes = build_saes(cfg.hidden_size, spec["width"], spec["layers"])
    items = synthetic_items(args.texts, cfg.vocab_size)
    calibrate_thresholds(lm, saes, items)
    saes = saes_in(saes, torch.bfloat16)
    compile_decoder(model)
    layers = sorted(saes)
    budget = initial_budget(args.batch_tokens, lm.device) if args.batch_tokens > 0 else 8192
    batches = [[items[i] for i in b] for b in plan_batches([len(t.ids) for t in items], budget, True)]
    tokens = sum(t.n_real for t in items)
    results: dict[str, float] = {}

    gaps = Gaps(forward.batch_hidden)
    forward.batch_hidden = gaps  # extract looks the name up at each batch
    batch_hidden = gaps

    def timed(label: str, fn) -> None:  # noqa: ANN001
        fn()  # warm-up: compile for every shape, cuBLAS tuning
        torch.cuda.synchronize()
        gaps.reset()
        t = time.perf_counter()
        fn()
        gaps.stop()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        results[label] = tokens / dt
        print(f"{label:70s} {dt:7.3f} s  {tokens / dt:10,.0f} tok/s", flush=True)
        print(f"{'':70s} {gaps.summary()}", flush=True)

    pack = can_pack(model, lm.device)  # as extract decides

    def forward() -> None:
        for rows in batches:
            batch_hidden(lm, rows, layers, pack)

    def forward_pool() -> None:
        for rows in batches:
            h = batch_hidden(lm, rows, layers, pack)
            for layer in layers:
                pool_device(h[layer], [r.n_real for r in rows], [r.sample_id for r in rows], saes[layer])

    def on_device() -> None:
        for _out, _stats in extract(lm, saes, items, args.batch_tokens, on_device=True):
            pass

    metrics: dict[str, Any] = {}

    def to_lake(lake: Any) -> None:
        metrics.update(extract_to_lake(lm, saes, items, synthetic_texts(items), lake, "bench",
                                       {layer: {} for layer in layers}, args.batch_tokens))

    def writers() -> None:
        print(f"{'':70s} writers: loop waited {metrics['writer_wait_seconds']:.3f} s, closing "
              f"{metrics['writer_close_seconds']:.3f} s", flush=True)

    print(f"{args.config}: {len(batches)} batches at budget {budget}, {tokens} tokens, packed {pack}", flush=True)
    timed("1 forward alone", forward)
    timed("2 + SAE encode and pooling (pool_device)", forward_pool)
    timed("3 extract(on_device): + compaction on the side stream, copies started", on_device)
    timed("4 extract_to_lake, writers drop the tables (Arrow + threads, no Parquet)", lambda: to_lake(NullLake()))
    shm = Path("/dev/shm")
    if shm.is_dir():  # the same writes into memory: the disk's share of stage 5
        with tempfile.TemporaryDirectory(dir=shm) as tmp:
            timed("5m extract_to_lake, Parquet lake in /dev/shm (no disk)", lambda: to_lake(Lake(tmp, "bench")))
            writers()
    with tempfile.TemporaryDirectory() as tmp:
        timed("5 extract_to_lake, Parquet lake", lambda: to_lake(Lake(tmp, "bench")))
        writers()
        if args.experiments:
            saved = dict(lake_mod.TABLE_PARQUET_OPTS["token_activations"])
            lake_mod.TABLE_PARQUET_OPTS["token_activations"].update(compression="none", compression_level=None)
            timed("5u ... per-token rows uncompressed", lambda: to_lake(Lake(tmp, "bench")))
            lake_mod.TABLE_PARQUET_OPTS["token_activations"] = saved
            sync_bytes = lake_mod.SYNC_BYTES
            for label, every in (("5s ... no syncs while writing (all at the close)", 2**62),
                                 ("5e ... a sync after every write", 0)):
                lake_mod.SYNC_BYTES = every
                timed(label, lambda: to_lake(Lake(tmp, "bench")))
                writers()
            lake_mod.SYNC_BYTES = sync_bytes
            fraction, batching.LAST_BATCH_FRACTION = batching.LAST_BATCH_FRACTION, 1.0
            timed("5l ... the last batch not cut down", lambda: to_lake(Lake(tmp, "bench")))
            writers()
            batching.LAST_BATCH_FRACTION = fraction
        if not args.no_trace:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t = time.perf_counter()
                to_lake(Lake(tmp, "bench"))
                torch.cuda.synchronize()
                wall = time.perf_counter() - t
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            busy = sum(e.self_device_time_total for e in events) / 1e6
            print(f"\nprofiled pass of stage 5: wall {wall:.3f} s, GPU kernels {busy:.3f} s summed over streams "
                  f"({busy / wall:.0%} of wall; under 100% means the device waited)", flush=True)
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15), flush=True)
    print("\n| stage | tokens/s | vs forward alone |\n|---|---:|---:|")
    base = results["1 forward alone"]
    for k, v in results.items():
        print(f"| {k} | {v:,.0f} | {v / base:.0%} |")


if __name__ == "__main__":
    main()
