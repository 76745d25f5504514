"""Tokenizing and batch planning: texts to token ids (BOS first), the ``tokens`` rows, batches cut by length
within a padded-token budget, and a batch's right-padded input tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dagster_project.lib.model import to_device
from dagster_project.lib.tables import TOKENS_SCHEMA


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


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
