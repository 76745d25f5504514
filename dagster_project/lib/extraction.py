"""Extract SAE activations: tokenize, batch by length, one forward pass for every layer, sparse output.

The forward pass stops right after the deepest layer asked for (a hook raises once it has that layer's
output), so the layers above it and the LM head never run: the outputs at the hooked layers are
bit-identical to a full run. Each hooked layer's output (``resid_post``) goes through its SAE on the
device, is pooled per sample there (max, mean over all tokens, argmax, active-token count), and only the
non-zero entries leave the device as sparse rows. Optionally the hooked layer's output itself leaves too, one
float16 vector per real token (``token_residuals``, for token-level dense probes; see
:func:`float16_scaled`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


def token_residual_schema(d_model: int) -> pa.Schema:
    """One row per real token (``token_pos`` as in ``tokens`` and ``token_activations``): the layer's output
    as ``resid_scale * resid``. float16 halves float32's bytes, and DuckDB (2.0) reads a Parquet Float16
    column as FLOAT (tested in tests/lib/test_catalog.py); but Gemma's residual stream has a few "massive"
    values beyond float16's range (65,504: 70,656 at layer 9 of Gemma 3 270M, 93,184 at layer 12), so each
    row carries a power-of-two scale, 1.0 unless the row's largest |value| would overflow. The catalog's
    view applies the scale (``lib/catalog.py``); :func:`dagster_project.lib.lake.read_token_residuals`
    returns the float32 vectors."""
    return pa.schema(
        [
            ("sample_id", pa.int32()),
            ("token_pos", pa.int32()),
            ("resid", pa.list_(pa.float16(), d_model)),
            ("resid_scale", pa.float32()),
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
    """The ``tokens`` rows (BOS dropped) with the text slice each token covers (a token that covers no
    characters, e.g. a special token, gets its vocabulary string). Built column-wise: the only per-token
    Python work is slicing the text (a 2,048-token text takes about a millisecond)."""
    from itertools import chain

    n = np.asarray([len(t.ids) - 1 for t in items], dtype=np.int64)
    total = int(n.sum())
    sid = np.repeat(np.asarray([t.sample_id for t in items], dtype=np.int32), n)
    starts = np.repeat(np.cumsum(n) - n, n)
    pos = (np.arange(total) - starts).astype(np.int32)
    tid = np.fromiter(chain.from_iterable(t.ids[1:] for t in items), dtype=np.int64, count=total)
    offs = np.fromiter(chain.from_iterable(o for t in items for o in t.offsets[1:]), dtype=np.int64,
                       count=2 * total).reshape(total, 2)
    ttext: list[str] = []
    for t in items:
        text = texts[t.sample_id]
        ttext.extend(text[a:b] for a, b in t.offsets[1:])
    empty = np.flatnonzero(offs[:, 1] <= offs[:, 0])
    if len(empty):
        names = {i: tokenizer.convert_ids_to_tokens(i) for i in np.unique(tid[empty]).tolist()}
        for k, i in zip(empty.tolist(), tid[empty].tolist(), strict=True):
            ttext[k] = names[i]
    cols = [sid, pos, tid.astype(np.int32), ttext, offs[:, 0].astype(np.int32), offs[:, 1].astype(np.int32)]
    return pa.table(cols, schema=TOKENS_SCHEMA)


def length_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int = 256,
                   batch_cost: float | None = None) -> list[list[int]]:
    """Indices grouped so each batch's padded size (rows x longest) stays within ``batch_tokens``.

    Texts are sorted longest first (the first batch shows the peak memory at once) and cut into runs of
    that order so that padded tokens plus ``batch_cost`` per batch are as few as possible (an exact
    dynamic programme over the cut points): a batch is split where its padding would cost more than a
    batch's fixed overhead (by default 256 tokens, or an eighth of a smaller budget). A text longer than the budget gets a
    batch of its own.
    """
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    L = np.asarray([lengths[i] for i in order], dtype=np.float64)
    c = min(batch_tokens / 8, 256) if batch_cost is None else float(batch_cost)
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):  # the last batch is order[s:end]; its longest text is L[s]
        s = np.arange(max(0, end - max_batch), end)
        size = end - s
        padded = size * L[s]
        cost = best[s] + padded + c
        cost[(padded > batch_tokens) & (size > 1)] = np.inf
        k = int(np.argmin(cost))
        best[end], start[end] = cost[k], s[k]
    batches: list[list[int]] = []
    end = n
    while end > 0:
        s0 = int(start[end])
        batches.append(order[s0:end])
        end = s0
    return batches[::-1]


# On a GPU the last batch is cut down to about this fraction of the budget: what follows the last forward pass
# (its compaction, Parquet encoding and the files' final fsync) cannot overlap the device, and is
# proportional to that batch's size.
LAST_BATCH_FRACTION = 1 / 8


def small_last_batch(batches: list[list[int]], lengths: Sequence[int], tokens: float) -> list[list[int]]:
    """``batches`` with the texts at the end of the last batch (the shortest) split off into a batch of
    their own of at most ``tokens`` tokens, when the last batch is larger than that and has two texts or
    more. Nothing is reordered otherwise."""
    if not batches or len(batches[-1]) < 2:
        return batches
    last = batches[-1]
    if sum(lengths[j] for j in last) <= tokens:
        return batches
    k, total = len(last), 0
    while k > 1 and total + lengths[last[k - 1]] <= tokens:
        k -= 1
        total += lengths[last[k]]
    if k == len(last):  # even its shortest text is larger than that
        return batches
    return [*batches[:-1], last[:k], last[k:]]


def plan_batches(lengths: Sequence[int], batch_tokens: int, small_last: bool) -> list[list[int]]:
    """:func:`length_batches`, and with ``small_last`` (what ``extract`` does on a GPU) the last batch cut
    down by :func:`small_last_batch` to ``LAST_BATCH_FRACTION`` of the budget."""
    out = length_batches(lengths, batch_tokens)
    return small_last_batch(out, lengths, batch_tokens * LAST_BATCH_FRACTION) if small_last else out


def pad_batch(rows: Sequence[Tokenized], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for a batch (causal attention: padding at the end
    never changes the real positions' outputs)."""
    T = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r.ids)] = torch.tensor(r.ids)
        att[j, : len(r.ids)] = 1
    return to_device(ids, device), to_device(att, device)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait for the device's queued work (a plain
    ``.to("cuda")`` synchronises the stream: the next batch could not be queued while one runs)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


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
class LayerBatch:
    """Sparse results of one batch at one layer, as Arrow tables."""

    pooled: pa.Table
    token_acts: pa.Table | None
    residuals: pa.Table | None
    n_tokens: int
    token_residuals: pa.Table | None = None


def _pinned_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


@dataclass
class DeviceBatch:
    """Sparse results of one batch at one layer: only the non-zero entries, packed into a few tensors.

    Made on the model's device; :meth:`to_host` starts their copy into pinned host memory without waiting,
    and the Arrow builders wait for that copy alone (a CUDA event), not for whatever the device was given
    to do after it, so host-side work on batch *i* overlaps the forward pass of batch *i + 1*.
    """

    sample_ids: np.ndarray  # int32 [B], host
    pooled_i: torch.Tensor  # int32 [4, m]: sample index, feature, argmax token, active-token count
    pooled_f: torch.Tensor  # float32 [2, m]: max, mean
    token_i: torch.Tensor | None  # int32 [3, n]: sample index, token position, feature
    token_f: torch.Tensor | None  # float32 [n]: activation
    resid: torch.Tensor | None  # float32 [2, B, d]: mean, max of the residual over real tokens
    n_tokens: int
    n_real: np.ndarray | None = None  # int32 [B], host: real tokens of each sample
    token_resid: torch.Tensor | None = None  # float16 [n_tokens, d]: every real token's residual / its scale
    token_scale: torch.Tensor | None = None  # float32 [n_tokens]: a power of two (see float16_scaled)
    ready: Any = None  # CUDA event recorded after the copies to the host

    _ON_DEVICE = ("pooled_i", "pooled_f", "token_i", "token_f", "resid", "token_resid", "token_scale")

    def to_host(self) -> DeviceBatch:
        """Start the device-to-host copies (CUDA: pinned memory, asynchronous); a no-op on the CPU."""
        if self.pooled_i.device.type != "cuda":
            return self
        from dataclasses import replace

        host = replace(self, **{k: _pinned_copy(getattr(self, k)) for k in self._ON_DEVICE})
        host.ready = torch.cuda.Event()
        host.ready.record()
        return host

    def _wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def pooled_table(self) -> pa.Table:
        self._wait()
        b, f, arg, nact = self.pooled_i.cpu().numpy()
        mx, mean = self.pooled_f.cpu().numpy()
        # pa.array per column: zero-copy (pa.table on raw NumPy arrays takes a slow per-element path)
        return pa.table([pa.array(c) for c in (self.sample_ids[b], f, mx, mean, arg, nact)], schema=POOLED_SCHEMA)

    def token_table(self) -> pa.Table | None:
        if self.token_i is None or self.token_f is None:
            return None
        self._wait()
        tb, tt, tf = self.token_i.cpu().numpy()
        cols = (self.sample_ids[tb], tt, tf, self.token_f.cpu().numpy())
        return pa.table([pa.array(c) for c in cols], schema=TOKEN_ACTS_SCHEMA)

    def residual_table(self) -> pa.Table | None:
        if self.resid is None:
            return None
        self._wait()
        rmean, rmax = self.resid.cpu().numpy()
        d = rmean.shape[-1]
        return pa.table(
            [pa.array(self.sample_ids),
             pa.FixedSizeListArray.from_arrays(pa.array(rmean.ravel()), d),
             pa.FixedSizeListArray.from_arrays(pa.array(rmax.ravel()), d)],
            schema=residual_schema(d),
        )

    def token_residual_table(self) -> pa.Table | None:
        """The ``token_residuals`` rows: one per real token, in batch order, ``token_pos`` from 0 (BOS dropped)."""
        if self.token_resid is None or self.token_scale is None or self.n_real is None:
            return None
        self._wait()
        rows, pos = real_token_index(self.n_real)
        q = self.token_resid.cpu().numpy()
        d = q.shape[-1]
        return pa.table(
            [pa.array(self.sample_ids[rows]), pa.array(pos.astype(np.int32)),
             pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1)), d),
             pa.array(self.token_scale.cpu().numpy())],
            schema=token_residual_schema(d),
        )

    def to_arrow(self) -> LayerBatch:
        """Arrow tables of the non-zero entries (copying to the host first if needed)."""
        return LayerBatch(self.pooled_table(), self.token_table(), self.residual_table(), self.n_tokens,
                          self.token_residual_table())


@dataclass
class PooledDevice:
    """Dense per-batch results of one layer, on the device, made without waiting for the device: the SAE
    activations (kept for the per-token rows) and their pooled statistics. :func:`compact` turns them into
    the sparse :class:`DeviceBatch` (that step has to wait: ``nonzero`` needs the count on the host)."""

    sample_ids: np.ndarray
    n_tokens: int
    acts: torch.Tensor  # [B, T, W], zero on padding
    mx: torch.Tensor  # [B, W]
    arg: torch.Tensor  # [B, W]
    mean: torch.Tensor  # [B, W] float32
    nact: torch.Tensor  # [B, W] int32
    resid: torch.Tensor | None  # [2, B, d] float32
    n_real: np.ndarray | None = None  # int32 [B]
    token_resid: torch.Tensor | None = None  # [n_tokens, d] float16 (see float16_scaled)
    token_scale: torch.Tensor | None = None  # [n_tokens] float32

    def record_stream(self, stream: Any) -> None:
        """Mark every tensor as used on ``stream`` (the caching allocator then keeps its memory until
        that stream's work is done, though the tensors were made on another)."""
        for t in (self.acts, self.mx, self.arg, self.mean, self.nact, self.resid, self.token_resid, self.token_scale):
            if t is not None:
                t.record_stream(stream)


def jumprelu_pool(
    hidden: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor,
    b_dec_in: torch.Tensor | None, lengths: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """A JumpReLU SAE's encode of ``hidden`` [B, T, d] and its pooling over the real tokens (the first
    ``lengths[j]`` of row ``j``): ``acts`` [B, T, W] (zero on padding), max, argmax, mean (fp32) and
    active-token count [B, W]. Written as one function so ``torch.compile`` fuses the threshold, the
    padding mask and the reductions into the GEMM's epilogue and a few passes (:data:`COMPILE_POOL`)."""
    B, T, d = hidden.shape
    x = hidden.reshape(-1, d).to(W_enc.dtype)
    if b_dec_in is not None:
        x = x - b_dec_in
    pre = torch.addmm(b_enc, x, W_enc).reshape(B, T, -1)
    real = (torch.arange(T, device=hidden.device)[None, :] < lengths[:, None])[..., None]
    acts = torch.where(real & (pre > threshold) & (pre > 0), pre, 0)
    mx, arg = acts.max(1)
    mean = acts.sum(1, dtype=torch.float32) / lengths.clamp_min(1)[:, None].float()
    nact = (acts > 0).sum(1, dtype=torch.int32)
    return acts, mx, arg, mean, nact


# on a GPU, a JumpReLU SAE's encode and pooling run as one compiled graph (BENCHMARKS.md has the gain)
COMPILE_POOL = True


@functools.cache
def _compiled_jumprelu_pool() -> Callable[..., tuple[torch.Tensor, ...]]:
    return torch.compile(jumprelu_pool, dynamic=True)


FLOAT16_MAX = 65504.0


def float16_scaled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [N, d] as float16 ``q`` [N, d] and a float32 power of two ``scale`` [N] with ``q * scale`` ~= ``x``.

    ``scale`` is 1 unless a row's largest |value| is beyond float16's range (65,504), and then the smallest
    power of two that brings it within: dividing by a power of two is exact, so every value keeps float16's
    relative precision (2**-11; bfloat16 values within range are kept exactly), bar values that fall below
    float16's normal range (6.1e-5 x scale), which keep an absolute precision of 6e-8 x scale. NaN and
    infinite values are kept as they are (scale 1). No host synchronisation."""
    x = x.float()
    m = x.abs().amax(-1)
    e = torch.ceil(torch.log2(m / FLOAT16_MAX)).nan_to_num(0.0, 0.0, 0.0).clamp(0, 126)
    e = e + ((m / torch.exp2(e) > FLOAT16_MAX) & m.isfinite())  # log2's rounding: one more where it fell short
    scale = torch.exp2(e)
    return (x / scale[:, None]).half(), scale


def real_token_index(n_real: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(row, position) of every real token of a padded batch whose row ``j`` has ``n_real[j]`` real
    tokens: row by row, position by position (the order of the ``token_residuals`` rows)."""
    n = np.asarray(list(n_real), dtype=np.int64)
    return np.repeat(np.arange(len(n)), n), np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)


@torch.inference_mode()
def pool_device(
    hidden: torch.Tensor, n_real: Sequence[int], sample_ids: Sequence[int], sae: LoadedSAE,
    with_residuals: bool = True, with_token_residuals: bool = False,
) -> PooledDevice:
    """SAE-encode ``hidden`` [B, T, d] (BOS already dropped; row ``j`` has ``n_real[j]`` real tokens, then
    padding) and pool over tokens (max, argmax, mean over real tokens, active-token count), on the device,
    with no host synchronisation. ``with_token_residuals``: also every real token's row of ``hidden`` itself,
    as float16 and a scale (:func:`float16_scaled`)."""
    T = hidden.shape[1]
    dev = hidden.device
    lengths = to_device(torch.tensor(list(n_real)), dev)
    mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]  # [B, T] real tokens
    enc = sae.encoder
    if COMPILE_POOL and dev.type == "cuda" and enc is not None and enc.threshold is not None:
        acts, mx, arg, mean, nact = _compiled_jumprelu_pool()(hidden, enc.W_enc, enc.b_enc, enc.threshold,
                                                              enc.b_dec_in, lengths)
    else:
        acts = sae.encode(hidden)  # [B, T, W], in the encoder's dtype
        acts = acts.clamp_min_(0).masked_fill_(~mask[..., None], 0)
        mx, arg = acts.max(1)
        mean = acts.sum(1, dtype=torch.float32) / lengths.clamp_min(1)[:, None].float()
        nact = (acts > 0).sum(1, dtype=torch.int32)
    resid = None
    if with_residuals:
        h = hidden.float()
        m = mask[..., None]
        rmean = h.masked_fill(~m, 0).sum(1) / lengths.clamp_min(1)[:, None]
        rmax = h.masked_fill(~m, float("-inf")).max(1).values
        resid = torch.stack([rmean, rmax])
    token_resid = token_scale = None
    if with_token_residuals:
        # indices made on the host, where the lengths are: the gather needs no synchronisation
        rows, pos = (to_device(torch.from_numpy(a), dev) for a in real_token_index(n_real))
        token_resid, token_scale = float16_scaled(hidden[rows, pos])
    return PooledDevice(np.asarray(sample_ids, dtype=np.int32), int(sum(n_real)), acts, mx, arg, mean, nact, resid,
                        np.asarray(list(n_real), dtype=np.int32), token_resid, token_scale)


@torch.inference_mode()
def compact(p: PooledDevice, with_tokens: bool = True) -> DeviceBatch:
    """The non-zero entries of ``p``, packed into a few tensors (still on the device)."""
    b, f = (p.mx > 0).nonzero(as_tuple=True)
    pooled_i = torch.stack([b.int(), f.int(), p.arg[b, f].int(), p.nact[b, f]])
    pooled_f = torch.stack([p.mx[b, f].float(), p.mean[b, f]])
    token_i = token_f = None
    if with_tokens:
        tb, tt, tf = (p.acts > 0).nonzero(as_tuple=True)
        token_i = torch.stack([tb.int(), tt.int(), tf.int()])
        token_f = p.acts[tb, tt, tf].float()
    return DeviceBatch(p.sample_ids, pooled_i, pooled_f, token_i, token_f, p.resid, p.n_tokens, p.n_real,
                       p.token_resid, p.token_scale)


def encode_pool_device(
    hidden: torch.Tensor, n_real: Sequence[int], sample_ids: Sequence[int], sae: LoadedSAE,
    with_tokens: bool = True, with_residuals: bool = True,
) -> DeviceBatch:
    """:func:`pool_device` then :func:`compact`: only the non-zero entries, still on the device."""
    return compact(pool_device(hidden, n_real, sample_ids, sae, with_residuals), with_tokens)


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


# Batches whose tables may wait for the writer threads while the next batch computes (bounds host memory).
WRITE_DEPTH = 2
# What an extraction writes per (layer, dataset) partition; ``tokens`` is written per dataset.
LAYER_TABLES = ("activations", "token_activations", "residuals", "token_residuals")


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
    tables = [t for t in LAYER_TABLES if wanted[t]]

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
