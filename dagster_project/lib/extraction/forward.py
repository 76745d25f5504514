"""The forward loop: the hooked forward pass that stops after the deepest layer asked for, the pipelined
batch loop (``extract``: forward, pool, compact, copy to the host, batch after batch), the batch budget
sized by the device's memory, and residual vectors for SAE training (``collect_layer_vectors``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dagster_project.lib.extraction.batching import Tokenized, length_batches, pad_batch, pad_id, plan_batches
from dagster_project.lib.extraction.pooling import PooledDevice, compact, pool_device
from dagster_project.lib.model import LoadedModel, base_model, decoder_layers
from dagster_project.lib.sae import LoadedSAE, check_fits

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


def forward_layers(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   layers: Sequence[int], **model_kwargs: Any) -> dict[int, torch.Tensor]:
    """Hidden states after each decoder layer in ``layers`` (resid_post), stopping after the deepest.

    ``attention_mask`` may be ``None`` for right-padded batches: under causal attention a real token never
    attends to the padding after it, so its outputs are those of the unpadded text, and without a padding
    mask the attention runs as plain causal attention (flash kernels on a GPU). Padded positions then hold
    values nobody reads. ``model_kwargs`` go to the model as they are (a packed batch's positions and text
    boundaries: see ``lib/packing.py``).
    """
    blocks = decoder_layers(lm.model)
    deepest = max(layers)
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(idx: int) -> Callable[..., None]:
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            captured[idx] = out[0] if isinstance(out, tuple) else out
            if idx == deepest:
                raise _Stop

        return hook

    for idx in sorted(set(layers)):
        handles.append(blocks[idx].register_forward_hook(make_hook(idx)))
    try:
        with torch.inference_mode():
            base_model(lm.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = set(layers) - captured.keys()
    if missing:
        raise RuntimeError(f"layers {sorted(missing)} produced no output")
    return captured


def batch_hidden(lm: LoadedModel, rows: Sequence[Tokenized], layers: Sequence[int],
                 pack: bool = False) -> dict[int, torch.Tensor]:
    """Hidden states [B, T, d] of a batch at every layer in ``layers``, BOS dropped, right-padded (T: the
    longest text). ``pack``: the model runs the texts end to end in one row (``lib/packing.py``), and the
    result is laid out padded afterwards; otherwise the model runs the padded batch itself."""
    if pack:
        from dagster_project.lib.packing import pack_batch, packed_attention

        pb = pack_batch([r.ids for r in rows], lm.device)
        with packed_attention(lm.model):
            hidden = forward_layers(lm, pb.ids, None, layers, **pb.model_kwargs())
        return {layer: pb.unpack(h) for layer, h in hidden.items()}
    ids, _att = pad_batch(rows, pad_id(lm.tokenizer), lm.device)
    # right padding + causal attention: no padding mask needed (see forward_layers)
    return {layer: h[:, 1:] for layer, h in forward_layers(lm, ids, None, layers).items()}


@dataclass
class ExtractStats:
    n_samples: int = 0
    n_tokens: int = 0
    n_truncated: int = 0
    n_batches: int = 0
    padded_tokens: int = 0
    batch_tokens: int = 0  # the padded-token budget per batch in use (after sizing, with ``auto``)
    packed: bool = False  # texts run end to end, no padding (``lib/packing.py``)


# ``batch_tokens`` <= 0 means "size by the device's memory": on a GPU the first (longest) batch runs with
# AUTO_PROBE_TOKENS, its peak memory per token is measured, and the rest are planned to fill AUTO_FRACTION of
# the free memory, up to AUTO_MAX_TOKENS (measured on an H200: past ~4-8k tokens a batch the matmuls gain
# nothing and larger batches only add padding); on a CPU, CPU_BATCH_TOKENS.
AUTO_PROBE_TOKENS = 2048
AUTO_FRACTION = 0.7
AUTO_MAX_TOKENS = 8192
CPU_BATCH_TOKENS = 4096


def auto_batch_tokens(peak_bytes: int, probe_tokens: int, free_bytes: int, fraction: float = AUTO_FRACTION,
                      cap: int = AUTO_MAX_TOKENS) -> int:
    """The padded tokens per batch that keep a batch's peak within ``fraction`` of ``free_bytes``, given
    that a batch of ``probe_tokens`` peaked ``peak_bytes`` above the memory in use before it (a multiple
    of 512, at least 512, at most ``cap``)."""
    per_token = max(peak_bytes, 1) / max(probe_tokens, 1)
    n = int(free_bytes * fraction / per_token) // 512 * 512
    return max(512, min(cap, n))


def initial_budget(batch_tokens: int, device: torch.device) -> int:
    if batch_tokens > 0:
        return batch_tokens
    return AUTO_PROBE_TOKENS if device.type == "cuda" else CPU_BATCH_TOKENS


def extract(
    lm: LoadedModel,
    saes: dict[int, LoadedSAE],
    items: Sequence[Tokenized],
    batch_tokens: int,
    with_tokens: bool = True,
    with_residuals: bool = True,
    progress: Callable[[int, int], None] | None = None,
    on_device: bool = False,
    pack: bool | None = None,
    with_token_residuals: bool = False,
) -> Iterator[tuple[dict[int, Any], ExtractStats]]:
    """Yield, batch by batch, ``{layer: LayerBatch}`` for every layer in ``saes`` from one forward pass.

    With ``on_device`` it yields ``{layer: DeviceBatch}`` whose copies to the host have been started but
    not waited for: the caller builds the Arrow tables (on another thread) while the next batch computes.
    ``batch_tokens`` <= 0 sizes the batches by the device's free memory (see ``auto_batch_tokens``).
    ``pack``: run each batch's texts end to end in one row, no padding (``lib/packing.py``); ``None``
    packs where the fast kernel runs (a GPU with ``varlen_attn`` and a known model type).
    ``with_token_residuals``: each layer's output at every real token too (``LayerBatch.token_residuals``),
    padded and packed batches alike (both are laid out padded before pooling).

    Software-pipelined: batch *i*'s forward pass and pooling are queued on the device before batch *i-1*
    is compacted (the step that waits for the device); on a GPU that compaction runs on a side stream, so
    the device always has the next forward pass queued while the host waits, copies and yields.
    """
    from contextlib import nullcontext

    layers = sorted(saes)
    for layer in layers:
        lm.check_layer(layer)
        check_fits(saes[layer], lm.d_model, f"layer {layer}")
    dev = torch.device(lm.device)
    cuda = dev.type == "cuda"
    side = torch.cuda.Stream(dev) if cuda else None
    probing = batch_tokens <= 0 and cuda
    budget = initial_budget(batch_tokens, dev)
    stats = ExtractStats(n_samples=len(items), n_truncated=sum(t.truncated for t in items), batch_tokens=budget)
    lengths = [len(t.ids) for t in items]

    def plan(idx: list[int]) -> list[list[int]]:
        """Batches of the texts ``idx`` at the current budget (on a GPU, the last one small)."""
        return [[idx[k] for k in b] for b in plan_batches([lengths[j] for j in idx], budget, cuda)]

    batches = plan(list(range(len(items))))
    done = 0

    if pack is None:
        from dagster_project.lib.packing import can_pack

        pack = can_pack(lm.model, dev)
    stats.packed = bool(pack)

    def start(rows: list[Tokenized]) -> tuple[dict[int, PooledDevice], Any]:
        """Queue the forward pass and pooling of one batch (nothing waits for the device)."""
        hidden = batch_hidden(lm, rows, layers, bool(pack))
        n_real = [r.n_real for r in rows]
        sids = [r.sample_id for r in rows]
        pooled = {layer: pool_device(hidden[layer], n_real, sids, saes[layer], with_residuals, with_token_residuals)
                  for layer in layers}
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()
        return pooled, ready

    def finish(pooled: dict[int, PooledDevice], ready: Any) -> dict[int, Any]:
        """Compact one batch (waits for its pooling only) and start its copies to the host."""
        with torch.cuda.stream(side) if side is not None else nullcontext():
            if side is not None:
                side.wait_event(ready)
            out: dict[int, Any] = {}
            for layer, p in pooled.items():
                if side is not None:
                    p.record_stream(side)
                db = compact(p, with_tokens)
                out[layer] = db.to_host() if on_device else db.to_arrow()
        return out

    def replan(first: int) -> None:
        """Cut the batches from ``first`` on again at the current ``budget``."""
        batches[first:] = plan([j for b in batches[first:] for j in b])

    def account(rows: list[Tokenized]) -> None:
        nonlocal done
        T = max(len(r.ids) for r in rows)
        stats.n_batches += 1
        stats.n_tokens += sum(r.n_real for r in rows)
        # tokens the model ran over (BOS excluded): packed batches have no padding
        stats.padded_tokens += sum(r.n_real for r in rows) if pack else len(rows) * (T - 1)
        done += len(rows)
        if progress:
            progress(done, len(items))

    i = 0
    if probing and batches:  # the first (longest) batch alone, measured, then the rest planned by memory
        rows = [items[j] for j in batches[0]]
        T = max(len(r.ids) for r in rows)
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = finish(*start(rows))
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        free, _total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        # pipelined, one batch's pooled results wait while the next runs: plan for about twice the SAE part
        budget = auto_batch_tokens(int(peak * 1.5), len(rows) * T, free + cached)
        replan(1)
        stats.batch_tokens = budget
        log.info("batch size by memory: %d tokens peaked %.2f GiB; %.1f GiB free -> batch_tokens %d",
                 len(rows) * T, peak / 2**30, (free + cached) / 2**30, budget)
        account(rows)
        yield out, stats
        i = 1
    pending: tuple[list[Tokenized], dict[int, PooledDevice], Any] | None = None
    while i < len(batches):
        rows = [items[j] for j in batches[i]]
        try:
            pooled, ready = start(rows)
        except torch.OutOfMemoryError as e:
            # the device ran out of memory (a fixed budget too large for this card, or a batch the
            # estimate missed): halve the budget and re-plan the batches not done yet; nothing of this
            # batch was kept, so nothing is lost or written twice
            longest = max(len(r.ids) for r in rows)
            if len(rows) == 1:  # halving goes down to one text a batch; past that nothing helps
                raise MemoryError(
                    f"the device ran out of memory on a batch of {len(rows)} text(s), the longest "
                    f"{longest - 1} tokens (sample_id {max(rows, key=lambda r: len(r.ids)).sample_id}), at "
                    f"batch_tokens {budget}; lower max_tokens or the number of layers per run") from e
            if cuda:
                torch.cuda.empty_cache()
            budget = max(budget // 2, 1)  # down to one text a batch (length_batches never splits a text)
            replan(i)
            stats.batch_tokens = budget
            log.warning("out of device memory at %d padded tokens; batch_tokens lowered to %d",
                        len(rows) * longest, budget)
            continue
        i += 1
        if pending is not None:
            out = finish(*pending[1:])
            account(pending[0])
            yield out, stats
        pending = (rows, pooled, ready)
    if pending is not None:
        out = finish(*pending[1:])
        account(pending[0])
        yield out, stats


def collect_vectors(lm: LoadedModel, layer: int, items: Sequence[Tokenized], batch_tokens: int,
                    max_vectors: int, seed: int = 0) -> torch.Tensor:
    """Residual vectors (BOS dropped) at ``layer`` for SAE training, up to ``max_vectors`` sampled evenly."""
    return collect_layer_vectors(lm, [layer], items, batch_tokens, max_vectors, seed)[layer]


def collect_layer_vectors(lm: LoadedModel, layers: Sequence[int], items: Sequence[Tokenized],
                          batch_tokens: int, max_vectors: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """:func:`collect_vectors` for several layers in one forward pass (run up to the deepest): each
    layer's vectors are exactly those a pass for that layer alone gives, sampled with the same seed."""
    layers = sorted({int(x) for x in layers})
    for layer in layers:
        lm.check_layer(layer)
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    budget = batch_tokens if batch_tokens > 0 else CPU_BATCH_TOKENS
    for idx in length_batches([len(t.ids) for t in items], budget):
        rows = [items[i] for i in idx]
        ids, att = pad_batch(rows, pad_id(lm.tokenizer), lm.device)
        hs = forward_layers(lm, ids, None, layers)
        keep = att[:, 1:].bool()
        for layer in layers:
            chunks[layer].append(hs[layer][:, 1:][keep].float().cpu())
    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        allv = torch.cat(chunks.pop(layer))
        if allv.shape[0] > max_vectors:
            g = torch.Generator().manual_seed(seed)
            allv = allv[torch.randperm(allv.shape[0], generator=g)[:max_vectors]]
        out[layer] = allv
    return out
