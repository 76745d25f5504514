"""Device pooling: each layer's output through its SAE on the device, pooled per sample (max, argmax, mean,
active-token count), compacted to its non-zero entries, and copied to the host as Arrow tables without
making the device wait."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import pyarrow as pa
import torch

from dagster_project.lib.model import to_device
from dagster_project.lib.sae import LoadedSAE
from dagster_project.lib.tables import (
    POOLED_SCHEMA,
    TOKEN_ACTS_SCHEMA,
    residual_schema,
    token_residual_schema,
)


@dataclass
class LayerBatch:
    """Sparse results of one batch at one layer, as Arrow tables."""

    pooled: pa.Table
    token_acts: pa.Table | None
    residuals: pa.Table | None
    n_tokens: int
    token_residuals: pa.Table | None = None


@overload
def _pinned_copy(t: torch.Tensor) -> torch.Tensor: ...
@overload
def _pinned_copy(t: None) -> None: ...
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

    def to_host(self) -> DeviceBatch:
        """Start the device-to-host copies (CUDA: pinned memory, asynchronous); a no-op on the CPU."""
        if self.pooled_i.device.type != "cuda":
            return self
        from dataclasses import replace

        host = replace(  # every tensor on the device, copied in this order
            self, pooled_i=_pinned_copy(self.pooled_i), pooled_f=_pinned_copy(self.pooled_f),
            token_i=_pinned_copy(self.token_i), token_f=_pinned_copy(self.token_f), resid=_pinned_copy(self.resid),
            token_resid=_pinned_copy(self.token_resid), token_scale=_pinned_copy(self.token_scale),
        )
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


def real_token_index(n_real: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
