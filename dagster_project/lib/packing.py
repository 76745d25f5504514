"""Packed batches: the texts of a batch laid end to end in one row, no padding, each text attending only to
itself (causal, and within the sliding window on a sliding-window layer).

A padded batch of similar lengths still spends 2-5% of its matmuls on padding (BENCHMARKS.md); packed, the
matmuls see exactly the real tokens. The model is the unmodified transformers one: positions restart at 0
for each text (``position_ids``, so rotary embeddings are those of the text alone) and the attention runs
through a registered transformers attention function that takes the texts' boundaries
(``cu_seq_lens_q``, the same keyword transformers' own flash-attention path uses):

- on a GPU, ``torch.nn.attention.varlen.varlen_attn`` (flash attention over variable-length sequences);
- elsewhere, a reference: plain scaled-dot-product attention text by text (tests run it on the CPU; the
  GPU benchmark checks the kernel's results against one-text-at-a-time extraction).

The function is registered under :data:`PACKED` and switched on only for the duration of a packed forward
(:func:`packed_attention`), so every other forward of the model runs as it was loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from dagster_project.lib.model import to_device

PACKED = "featurelake_packed"
# model types checked to run packed (positions from ``position_ids``, attention through transformers'
# attention interface with q/k/v as [batch, heads, tokens, head_dim]): Gemma 3, text-only or multimodal.
# Llama-likes are built the same way but untested here, so they run padded until a test covers them.
PACKABLE_MODEL_TYPES = {"gemma3_text", "gemma3"}


def _find_varlen() -> tuple[Any, bool]:
    """torch's ``varlen_attn`` if it takes sliding windows (Gemma needs them), and whether it takes
    grouped-query attention (fewer key/value heads) itself."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch without the varlen op
        return None, False
    params = inspect.signature(varlen_attn).parameters
    return (varlen_attn if "window_size" in params else None), "enable_gqa" in params


# resolved once: the attention function runs inside compiled decoder layers, where only plain globals
# should be read
VARLEN, VARLEN_GQA = _find_varlen()


def text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def can_pack(model: Any, device: torch.device) -> bool:
    """Whether packed batches run on this model and device with the fast kernel (a GPU with
    ``varlen_attn``, a model type known to take ``position_ids`` and the attention interface)."""
    cfg = text_config(model)
    return (device.type == "cuda" and VARLEN is not None
            and getattr(cfg, "model_type", None) in PACKABLE_MODEL_TYPES
            and getattr(cfg, "attn_logit_softcapping", None) is None)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None,
               window: int | None) -> torch.Tensor:
    """Text-by-text causal attention (``window``: attend to at most that many tokens, itself included).
    q [N, H, D], k/v [N, Hkv, D] -> [N, H, D]."""
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        n = b - a
        i = torch.arange(n, device=q.device)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= i[None, :] > i[:, None] - window
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
        out[a:b] = o.transpose(0, 1)
    return out


def packed_attention_forward(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
    scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as :data:`PACKED` (transformers' attention-interface signature):
    ``query`` [1, H, N, D], ``key``/``value`` [1, Hkv, N, D] of one packed row; returns [1, N, H, D]."""
    cu = kwargs["cu_seq_lens_q"]
    max_len = kwargs["max_length_q"]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, heads, D]
    if q.is_cuda and VARLEN is not None:
        window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
        if k.shape[1] != q.shape[1] and not VARLEN_GQA:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        extra = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        out = VARLEN(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len,
                     scale=scaling, window_size=window, **extra)
    else:
        out = _reference(q, k, v, cu, scaling, sliding_window)
    return out.unsqueeze(0), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED, packed_attention_forward)


@contextmanager
def packed_attention(model: Any) -> Iterator[None]:
    """Run the model's attention as :data:`PACKED` inside the block (and no mask is built: transformers
    builds none for an attention function without a registered mask function)."""
    register()
    cfg = model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = PACKED  # the setter also sets the sub-configs (multimodal Gemma 3)
    try:
        yield
    finally:
        cfg._attn_implementation = old


@dataclass
class PackedBatch:
    """One packed row: ``ids`` and ``positions`` [1, N]; ``cu`` [B+1] int32 start offsets; ``max_len``."""

    ids: torch.Tensor
    positions: torch.Tensor
    cu: torch.Tensor
    max_len: int

    def model_kwargs(self) -> dict[str, Any]:
        return {"position_ids": self.positions, "cu_seq_lens_q": self.cu, "cu_seq_lens_k": self.cu,
                "max_length_q": self.max_len, "max_length_k": self.max_len}

    @cached_property
    def padded_index(self) -> torch.Tensor:
        """[B, T] packed position of row ``j``'s token ``t`` with the first token (BOS) dropped:
        ``start_j + min(1 + t, L_j - 1)``, so padded positions repeat the text's last token (a text of BOS
        alone repeats its BOS), never another text's. Derived from ``cu`` on its device, once a batch."""
        starts, lengths = self.cu[:-1].long(), self.cu.diff().long()
        t = torch.arange(1, max(self.max_len, 2), device=self.cu.device)
        return starts[:, None] + torch.minimum(t[None, :], (lengths - 1)[:, None])

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """[1, N, d] packed hidden states -> [B, T, d] right-padded, BOS dropped (T: the longest text less
        one); readers mask the padded positions."""
        return hidden[0][self.padded_index]


def pack_batch(seqs: Sequence[Sequence[int]], device: torch.device) -> PackedBatch:
    """Lay the token id sequences end to end (host tensors copied through pinned memory)."""
    lengths = [len(s) for s in seqs]
    ids = torch.tensor([i for s in seqs for i in s], dtype=torch.long)[None, :]
    positions = torch.cat([torch.arange(n) for n in lengths])[None, :]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return PackedBatch(to_device(ids, device), to_device(positions, device), to_device(cu, device),
                       max(lengths))
