"""Extract SAE activations: tokenize, batch by length, one forward pass for every layer, sparse output.

The forward pass stops right after the deepest layer asked for (a hook raises once it has that layer's
output), so the layers above it and the LM head never run: the outputs at the hooked layers are
bit-identical to a full run. Each hooked layer's output (``resid_post``) goes through its SAE on the
device, is pooled per sample there (max, mean over all tokens, argmax, active-token count), and only the
non-zero entries leave the device as sparse rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dagster_project.lib.model import LoadedModel, base_model, decoder_layers
from dagster_project.lib.sae import LoadedSAE, check_fits

log = logging.getLogger(__name__)

POOLED_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int32()),
        ("feature_id", pa.int32()),
        ("max_act", pa.float32()),
        ("mean_act", pa.float32()),
        ("argmax_token", pa.int32()),
        ("n_active_tokens", pa.int32()),
    ]
)
TOKEN_ACTS_SCHEMA = pa.schema(
    [("sample_id", pa.int32()), ("token_pos", pa.int32()), ("feature_id", pa.int32()), ("act", pa.float32())]
)
TOKENS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int32()),
        ("token_pos", pa.int32()),
        ("token_id", pa.int32()),
        ("token_text", pa.string()),
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
    ]
)


def residual_schema(d_model: int) -> pa.Schema:
    return pa.schema(
        [
            ("sample_id", pa.int32()),
            ("resid_mean", pa.list_(pa.float32(), d_model)),
            ("resid_max", pa.list_(pa.float32(), d_model)),
        ]
    )


@dataclass
class Tokenized:
    sample_id: int
    ids: list[int]  # BOS first
    offsets: list[tuple[int, int]]  # aligned with ids
    truncated: bool

    @property
    def n_real(self) -> int:
        return len(self.ids) - 1


def tokenize(tokenizer: Any, texts: Sequence[str], sample_ids: Sequence[int], max_tokens: int) -> list[Tokenized]:
    """Tokenize with BOS, keeping at most ``max_tokens`` real tokens; records which texts were truncated."""
    enc = tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True, truncation=False)
    bos = tokenizer.bos_token_id
    out = []
    for sid, ids, offs in zip(sample_ids, enc["input_ids"], enc["offset_mapping"], strict=True):
        if bos is not None and (not ids or ids[0] != bos):
            ids, offs = [bos, *ids], [(0, 0), *offs]
        truncated = len(ids) - 1 > max_tokens
        out.append(Tokenized(int(sid), list(ids[: max_tokens + 1]), [tuple(o) for o in offs[: max_tokens + 1]], truncated))
    return out


def tokens_table(items: Sequence[Tokenized], texts: dict[int, str], tokenizer: Any) -> pa.Table:
    """The ``tokens`` rows (BOS dropped) with the text slice each token covers."""
    sid, pos, tid, ttext, cs, ce = [], [], [], [], [], []
    for t in items:
        text = texts[t.sample_id]
        for p, (i, (a, b)) in enumerate(zip(t.ids[1:], t.offsets[1:], strict=True)):
            sid.append(t.sample_id)
            pos.append(p)
            tid.append(i)
            ttext.append(text[a:b] if b > a else tokenizer.convert_ids_to_tokens(i))
            cs.append(a)
            ce.append(b)
    return pa.table([sid, pos, tid, ttext, cs, ce], schema=TOKENS_SCHEMA)


def length_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int = 256) -> list[list[int]]:
    """Indices grouped so each batch's padded size (rows x longest) stays within ``batch_tokens``.

    Longest first: the first batch shows the peak memory at once, and similar lengths share a batch so
    little compute goes to padding.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * longest > batch_tokens or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def pad_batch(rows: Sequence[Tokenized], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for a batch (causal attention: padding at the end
    never changes the real positions' outputs)."""
    T = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r.ids)] = torch.tensor(r.ids)
        att[j, : len(r.ids)] = 1
    return ids.to(device), att.to(device)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


class _Stop(Exception):
    pass


def forward_layers(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Hidden states after each decoder layer in ``layers`` (resid_post), stopping after the deepest."""
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
            base_model(lm.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = set(layers) - captured.keys()
    if missing:
        raise RuntimeError(f"layers {sorted(missing)} produced no output")
    return captured


@dataclass
class LayerBatch:
    """Sparse results of one batch at one layer, as NumPy columns ready for Arrow."""

    pooled: pa.Table
    token_acts: pa.Table | None
    residuals: pa.Table | None
    n_tokens: int


@dataclass
class DeviceBatch:
    """Sparse results of one batch at one layer, still on the device (small: only non-zeros)."""

    sample_ids: torch.Tensor
    pooled: tuple[torch.Tensor, ...]  # sample index, feature, max, mean, argmax, n_active
    token_acts: tuple[torch.Tensor, ...] | None  # sample index, position, feature, act
    resid_mean: torch.Tensor | None
    resid_max: torch.Tensor | None
    n_tokens: int

    def to_arrow(self) -> LayerBatch:
        """Copy to the host and build Arrow tables (runs on the writer thread, off the GPU's path)."""
        sids = self.sample_ids.cpu().numpy().astype(np.int32)

        def col(t: torch.Tensor, dtype: type) -> pa.Array:
            return pa.array(t.cpu().numpy().astype(dtype, copy=False))

        b, f, mx, mean, arg, nact = self.pooled
        pooled = pa.table(
            [pa.array(sids[b.cpu().numpy()]), col(f, np.int32), col(mx.float(), np.float32),
             col(mean, np.float32), col(arg, np.int32), col(nact, np.int32)],
            schema=POOLED_SCHEMA,
        )
        token_acts = None
        if self.token_acts is not None:
            tb, tt, tf, ta = self.token_acts
            token_acts = pa.table(
                [pa.array(sids[tb.cpu().numpy()]), col(tt, np.int32), col(tf, np.int32), col(ta.float(), np.float32)],
                schema=TOKEN_ACTS_SCHEMA,
            )
        residuals = None
        if self.resid_mean is not None and self.resid_max is not None:
            d = self.resid_mean.shape[-1]
            residuals = pa.table(
                [pa.array(sids),
                 pa.FixedSizeListArray.from_arrays(col(self.resid_mean.ravel(), np.float32), d),
                 pa.FixedSizeListArray.from_arrays(col(self.resid_max.ravel(), np.float32), d)],
                schema=residual_schema(d),
            )
        return LayerBatch(pooled, token_acts, residuals, self.n_tokens)


@torch.inference_mode()
def encode_pool_device(
    hidden: torch.Tensor, mask: torch.Tensor, sample_ids: torch.Tensor, sae: LoadedSAE,
    with_tokens: bool = True, with_residuals: bool = True,
) -> DeviceBatch:
    """SAE-encode ``hidden`` [B, T, d] (BOS already dropped; ``mask`` [B, T] marks real tokens) and pool,
    all on the device; returns only the non-zero entries (still on the device)."""
    acts = sae.encode(hidden)  # [B, T, W], in the encoder's dtype
    acts = acts.clamp_min_(0).masked_fill_(~mask[..., None], 0)
    n_real = mask.sum(1)  # [B]
    mx, arg = acts.max(1)  # [B, W]
    mean = acts.sum(1, dtype=torch.float32) / n_real.clamp_min(1)[:, None].float()
    nact = (acts > 0).sum(1)
    b, f = (mx > 0).nonzero(as_tuple=True)
    pooled = (b, f, mx[b, f], mean[b, f], arg[b, f], nact[b, f])
    token_acts = None
    if with_tokens:
        tb, tt, tf = (acts > 0).nonzero(as_tuple=True)
        token_acts = (tb, tt, tf, acts[tb, tt, tf])
    rmean = rmax = None
    if with_residuals:
        h = hidden.float()
        m = mask[..., None]
        rmean = (h * m).sum(1) / n_real.clamp_min(1)[:, None]
        rmax = h.masked_fill(~m, float("-inf")).max(1).values
    return DeviceBatch(sample_ids, pooled, token_acts, rmean, rmax, int(n_real.sum()))


def encode_pool(
    hidden: torch.Tensor, mask: torch.Tensor, sample_ids: torch.Tensor, sae: LoadedSAE,
    with_tokens: bool = True, with_residuals: bool = True,
) -> LayerBatch:
    """:func:`encode_pool_device` then the host copy: Arrow tables of the non-zero entries."""
    return encode_pool_device(hidden, mask, sample_ids, sae, with_tokens, with_residuals).to_arrow()


@dataclass
class ExtractStats:
    n_samples: int = 0
    n_tokens: int = 0
    n_truncated: int = 0
    n_batches: int = 0
    padded_tokens: int = 0
    active_per_sample: dict[int, list[int]] = field(default_factory=dict)


def extract(
    lm: LoadedModel,
    saes: dict[int, LoadedSAE],
    items: Sequence[Tokenized],
    batch_tokens: int,
    with_tokens: bool = True,
    with_residuals: bool = True,
    progress: Callable[[int, int], None] | None = None,
    on_device: bool = False,
) -> Iterator[tuple[dict[int, Any], ExtractStats]]:
    """Yield, batch by batch, ``{layer: LayerBatch}`` for every layer in ``saes`` from one forward pass
    (``{layer: DeviceBatch}`` with ``on_device``: the caller copies to the host when it suits it)."""
    layers = sorted(saes)
    for layer in layers:
        lm.check_layer(layer)
        check_fits(saes[layer], lm.d_model, f"layer {layer}")
    stats = ExtractStats(n_samples=len(items), n_truncated=sum(t.truncated for t in items))
    batches = length_batches([len(t.ids) for t in items], batch_tokens)
    done = 0
    for idx in batches:
        rows = [items[i] for i in idx]
        T = max(len(r.ids) for r in rows)
        ids, att = pad_batch(rows, pad_id(lm.tokenizer), lm.device)
        hidden = forward_layers(lm, ids, att, layers)
        sids = torch.tensor([r.sample_id for r in rows], device=lm.device)
        mask = att[:, 1:].bool()  # drop BOS
        out = {}
        for layer in layers:
            db = encode_pool_device(hidden[layer][:, 1:], mask, sids, saes[layer], with_tokens, with_residuals)
            out[layer] = db if on_device else db.to_arrow()
        stats.n_batches += 1
        stats.n_tokens += out[layers[0]].n_tokens
        stats.padded_tokens += len(rows) * (T - 1)
        done += len(rows)
        if progress:
            progress(done, len(items))
        yield out, stats


def collect_vectors(lm: LoadedModel, layer: int, items: Sequence[Tokenized], batch_tokens: int,
                    max_vectors: int, seed: int = 0) -> torch.Tensor:
    """Residual vectors (BOS dropped) at ``layer`` for SAE training, up to ``max_vectors`` sampled evenly."""
    lm.check_layer(layer)
    chunks = []
    total = 0
    for idx in length_batches([len(t.ids) for t in items], batch_tokens):
        rows = [items[i] for i in idx]
        ids, att = pad_batch(rows, pad_id(lm.tokenizer), lm.device)
        h = forward_layers(lm, ids, att, [layer])[layer][:, 1:]
        v = h[att[:, 1:].bool()].float().cpu()
        chunks.append(v)
        total += v.shape[0]
    allv = torch.cat(chunks)
    if allv.shape[0] > max_vectors:
        g = torch.Generator().manual_seed(seed)
        allv = allv[torch.randperm(allv.shape[0], generator=g)[:max_vectors]]
    return allv


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
) -> dict[str, float]:
    """Extract ``items`` at every layer of ``saes`` in one pass and write each (layer, dataset) partition.

    Rows stream batch by batch into Parquet writers on hidden temp files, or uploads in an S3 lake (memory
    does not grow with the number of samples); all partitions are renamed into place (uploads completed)
    only when every batch succeeded.
    """
    import time
    from concurrent.futures import Future, ThreadPoolExecutor
    from contextlib import ExitStack

    t0 = time.time()
    layers = sorted(saes)
    lake.write("tokens", tokens_table(items, texts, lm.tokenizer), dataset=dataset,
               meta={"model_id": lm.model_id, "longest_text_tokens": max((t.n_real for t in items), default=0)})
    active_total = {layer: 0 for layer in layers}
    stats: ExtractStats | None = None
    with ExitStack() as stack:
        writers: dict[tuple[str, int], Any] = {}
        for layer in layers:
            writers[("activations", layer)] = stack.enter_context(
                lake.writer("activations", POOLED_SCHEMA, layer, dataset, metas[layer]))
            if with_tokens:
                writers[("token_activations", layer)] = stack.enter_context(
                    lake.writer("token_activations", TOKEN_ACTS_SCHEMA, layer, dataset, metas[layer]))
            if with_residuals:
                writers[("residuals", layer)] = stack.enter_context(
                    lake.writer("residuals", residual_schema(lm.d_model), layer, dataset, metas[layer]))
        def write(out: dict[int, DeviceBatch]) -> None:
            for layer, db in out.items():
                lb = db.to_arrow()
                writers[("activations", layer)].write_table(lb.pooled.sort_by([("feature_id", "ascending")]))
                active_total[layer] += lb.pooled.num_rows
                if lb.token_acts is not None:
                    writers[("token_activations", layer)].write_table(lb.token_acts)
                if lb.residuals is not None:
                    writers[("residuals", layer)].write_table(lb.residuals)

        # Host copies, Arrow conversion and Parquet writes of batch i run on one writer thread while the
        # device computes batch i+1 (at most one batch waits, so memory stays bounded).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lake-writer") as pool:
            pending: Future[None] | None = None
            for out, stats in extract(lm, saes, items, batch_tokens, with_tokens, with_residuals, progress,  # noqa: B007
                                      on_device=True):
                if pending is not None:
                    pending.result()
                pending = pool.submit(write, out)
            if pending is not None:
                pending.result()
    if stats is None:
        raise ValueError(f"dataset {dataset!r} has no samples to extract")
    seconds = time.time() - t0
    return {
        "samples": stats.n_samples,
        "tokens": stats.n_tokens,
        "truncated_texts": stats.n_truncated,
        "seconds": seconds,
        "tokens_per_s": stats.n_tokens / max(seconds, 1e-9),
        "padding_fraction": 1 - stats.n_tokens / max(stats.padded_tokens, 1),
        **{f"active_features_per_sample_L{layer}": active_total[layer] / max(stats.n_samples, 1) for layer in layers},
        **{f"pooled_rows_L{layer}": active_total[layer] for layer in layers},
    }
