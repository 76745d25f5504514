"""The writer threads: ``extract_to_lake`` streams each batch of ``extract`` into the lake's Parquet writers,
one thread per file, and puts every partition in place once all batches succeeded."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dagster_project.lib.extraction.batching import Tokenized, tokens_table
from dagster_project.lib.extraction.forward import ExtractStats, extract
from dagster_project.lib.extraction.pooling import DeviceBatch
from dagster_project.lib.model import LoadedModel
from dagster_project.lib.sae import LoadedSAE
from dagster_project.lib.tables import (
    ACTIVATION_TABLES,
    POOLED_SCHEMA,
    TOKEN_ACTS_SCHEMA,
    residual_schema,
    token_residual_schema,
)

log = logging.getLogger(__name__)

# Batches whose tables may wait for the writer threads while the next batch computes (bounds host memory).
WRITE_DEPTH = 2


def extract_to_lake(
    lm: LoadedModel,
    saes: dict[int, LoadedSAE],
    items: Sequence[Tokenized],
    texts: dict[int, str],
    lake: Any,
    dataset: str,
    metas: dict[int, dict[str, Any]],
    batch_tokens: int,
    with_tokens: bool = True,
    with_residuals: bool = True,
    progress: Callable[[int, int], None] | None = None,
    pack: bool | None = None,
    with_token_residuals: bool = False,
) -> dict[str, float]:
    """Extract ``items`` at every layer of ``saes`` in one pass and write each (layer, dataset) partition.

    Rows stream batch by batch into Parquet writers on hidden temp files, or uploads in an S3 lake (memory
    does not grow with the number of samples); all partitions are renamed into place (uploads completed)
    only when every batch succeeded. Each file has its own writer thread (Arrow building and Parquet
    encoding release the GIL), so the files of one batch are written side by side while the device runs
    the next batches; at most ``WRITE_DEPTH`` batches wait.

    ``with_token_residuals`` writes ``token_residuals`` too; without it, a ``token_residuals`` partition
    an earlier extraction left is removed once the new partitions are in place (it would describe another
    extraction than the ``tokens`` and activations beside it).
    """
    import time
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor
    from contextlib import ExitStack

    t0 = time.time()
    layers = sorted(saes)

    def write_tokens() -> None:
        lake.write("tokens", tokens_table(items, texts, lm.tokenizer), dataset=dataset,
                   meta={"model_id": lm.model_id, "longest_text_tokens": max((t.n_real for t in items), default=0)})

    active_total = {layer: 0 for layer in layers}
    stats: ExtractStats | None = None
    schemas = {"activations": POOLED_SCHEMA, "token_activations": TOKEN_ACTS_SCHEMA,
               "residuals": residual_schema(lm.d_model), "token_residuals": token_residual_schema(lm.d_model)}
    wanted = {"activations": True, "token_activations": with_tokens, "residuals": with_residuals,
              "token_residuals": with_token_residuals}
    scaled = {layer: 0 for layer in layers}  # token residuals stored with a scale > 1 (beyond float16's range)
    tables = [t for t in ACTIVATION_TABLES if wanted[t]]

    busy: dict[tuple[str, int], float] = {}  # seconds each file's thread spent (only that thread writes it)
    waited = [0.0]  # seconds the device loop stood still waiting for the writers

    def write(key: tuple[str, int], db: DeviceBatch) -> None:
        t_start = time.perf_counter()
        name, layer = key
        if name == "activations":
            t = db.pooled_table().sort_by([("feature_id", "ascending")])
            active_total[layer] += t.num_rows  # only this file's thread touches this layer's count
        elif name == "token_activations":
            t = db.token_table()
        elif name == "token_residuals":
            t = db.token_residual_table()
            assert t is not None  # pooled with token residuals: this table is written only then
            scaled[layer] += int(np.count_nonzero(t.column("resid_scale").to_numpy() > 1))
        else:
            t = db.residual_table()
        writers[key].write_table(t)
        writers[key].sync()  # durable as it goes: the closing fsync at the end finds little left to write
        busy[key] = busy.get(key, 0.0) + time.perf_counter() - t_start

    with ExitStack() as stack:
        writers: dict[tuple[str, int], Any] = {
            (name, layer): stack.enter_context(lake.writer(name, schemas[name], layer, dataset, metas[layer]))
            for layer in layers for name in tables
        }
        # entered after the writers, so shut down (their queued work finished) before any writer closes
        threads = {key: stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix=f"lake-{key[0]}-L{key[1]}"))
                   for key in writers}
        waiting: deque[list[Future[None]]] = deque()
        # the tokens partition is built and written beside the first batches (the device does not wait)
        tokens_done = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="lake-tokens")).submit(write_tokens)

        def drain(keep: int) -> None:
            """Wait until at most ``keep`` batches are still being written (raising a writer's error)."""
            t_wait = time.perf_counter()
            while len(waiting) > keep:
                for f in waiting.popleft():
                    f.result()
            waited[0] += time.perf_counter() - t_wait

        for out, stats in extract(lm, saes, items, batch_tokens, with_tokens, with_residuals, progress,  # noqa: B007
                                  on_device=True, pack=pack, with_token_residuals=with_token_residuals):
            waiting.append([threads[key].submit(write, key, out[key[1]]) for key in writers])
            drain(WRITE_DEPTH)
        drain(0)
        t_close = time.perf_counter()
        # every file closed and fsynced by its own thread, side by side; the renames follow when all succeeded
        for f in [threads[key].submit(writers[key].finish) for key in writers]:
            f.result()
        tokens_done.result()
    closing = time.perf_counter() - t_close  # the renames (at the stack's exit) included
    if stats is None:
        raise ValueError(f"dataset {dataset!r} has no samples to extract")
    for layer in layers:
        if with_token_residuals and scaled[layer]:
            log.info("layer %d, %s: %d of %d token residuals exceed float16's range and are stored scaled",
                     layer, dataset, scaled[layer], stats.n_tokens)
        if not with_token_residuals and lake.exists("token_residuals", layer, dataset):
            lake.remove_partition("token_residuals", layer, dataset)
            log.info("layer %d, %s: removed the token_residuals of an earlier extraction (not written this time)",
                     layer, dataset)
    seconds = time.time() - t0
    return {
        "samples": stats.n_samples,
        "tokens": stats.n_tokens,
        "truncated_texts": stats.n_truncated,
        "seconds": seconds,
        "tokens_per_s": stats.n_tokens / max(seconds, 1e-9),
        "padding_fraction": 1 - stats.n_tokens / max(stats.padded_tokens, 1),
        "batch_tokens": stats.batch_tokens,
        "packed": stats.packed,
        # where host time went: a large wait means the Parquet writes, not the device, set the pace
        "writer_wait_seconds": waited[0],
        # after the last batch: closing and fsyncing the files (the device idles meanwhile)
        "writer_close_seconds": closing,
        **{f"writer_busy_seconds_{name}": sum(v for k, v in busy.items() if k[0] == name) for name in tables},
        **{f"active_features_per_sample_L{layer}": active_total[layer] / max(stats.n_samples, 1) for layer in layers},
        **{f"pooled_rows_L{layer}": active_total[layer] for layer in layers},
        **({"token_residuals_scaled": sum(scaled.values())} if with_token_residuals else {}),
    }
