"""Token-level probes: score every token of a text, then aggregate the scores per text.

Pooling first (max or mean over the text, then a linear probe) dilutes a signal that sits in a few tokens
of a long trace; Apollo's deception probes score every token and average, GDM's MultiMax takes a max over
windows. Here a probe is fitted on token rows (each token carries its text's label; every text weighs the
same however long it is) and a text's score is one of :data:`AGGREGATIONS` of its token scores:

- ``mean``: the mean over the text's tokens;
- ``max``: the largest token score;
- ``topk_mean``: the mean of the ``k`` largest (all of them when the text is shorter);
- ``window_max``: the mean over each window of ``w`` consecutive tokens, then the largest of those (one
  window of the whole text when it is shorter than ``w``).

:class:`TokenMatrix` holds a design of texts x columns as its token rows plus each text's offsets, and
behaves like a matrix of text rows where the probe code needs one (``shape``, row indexing, column
selection). Pure functions, no dagster import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray

AGGREGATIONS = ("mean", "max", "topk_mean", "window_max")


def aggregate(scores: ArrayLike, offsets: ArrayLike, how: str, k: int = 5, window: int = 16) -> NDArray[np.float64]:
    """Per-text aggregate of token ``scores``; text ``i`` owns ``scores[offsets[i]:offsets[i + 1]]``.

    A text with no token gets NaN (a caller must not score it). See the module docstring for ``how``.
    """
    s = np.asarray(scores, dtype=np.float64)
    off = np.asarray(offsets, dtype=np.int64)
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
    if k < 1 or window < 1:
        raise ValueError(f"k and window must be >= 1, got k={k}, window={window}")
    n = off.size - 1
    out = np.full(n, np.nan, dtype=np.float64)
    lengths = np.diff(off)
    has = lengths > 0
    if how == "mean":
        sums = np.add.reduceat(s, off[:-1][has]) if has.any() else np.array([])
        out[has] = sums / lengths[has]
        return out
    if how == "max":
        if has.any():
            out[has] = np.maximum.reduceat(s, off[:-1][has])
        return out
    for i in np.flatnonzero(has):
        t = s[off[i] : off[i + 1]]
        if how == "topk_mean":
            kk = min(k, t.size)
            out[i] = float(np.partition(t, t.size - kk)[t.size - kk :].mean())
        else:  # window_max
            w = min(window, t.size)
            c = np.concatenate([[0.0], np.cumsum(t)])
            out[i] = float(((c[w:] - c[:-w]) / w).max())
    return out


@dataclass
class TokenMatrix:
    """A text x column design stored as token rows: text ``i``'s tokens are rows ``offsets[i]:offsets[i+1]``
    of ``tokens`` (CSR for SAE features, a dense float array for residuals)."""

    tokens: sp.csr_matrix | NDArray[np.float32] | NDArray[np.float64]
    offsets: NDArray[np.int64]

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or self.offsets.size < 1 or self.offsets[0] != 0:
            raise ValueError("TokenMatrix.offsets must be a 1-d array starting at 0")
        if int(self.offsets[-1]) != self.tokens.shape[0]:
            raise ValueError(f"TokenMatrix.offsets end at {self.offsets[-1]} but tokens has {self.tokens.shape[0]} rows")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.offsets.size - 1, int(self.tokens.shape[1]))

    @property
    def lengths(self) -> NDArray[np.int64]:
        return np.diff(self.offsets)

    def token_index(self, rows: ArrayLike) -> NDArray[np.int64]:
        """Token row numbers of the texts ``rows``, in that order."""
        r = np.asarray(rows, dtype=np.int64)
        starts, lens = self.offsets[r], self.lengths[r]
        if not lens.sum():
            return np.zeros(0, dtype=np.int64)
        return np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())

    def __getitem__(self, rows: Any) -> TokenMatrix:
        r = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows)
        if r.dtype == bool:
            r = np.flatnonzero(r)
        idx = self.token_index(r)
        return TokenMatrix(self.tokens[idx], np.concatenate([[0], np.cumsum(self.lengths[r])]))

    def take_columns(self, cols: Sequence[int] | NDArray[np.int64]) -> TokenMatrix:
        c = np.asarray(cols, dtype=np.int64)
        t = sp.csr_matrix(self.tokens[:, c]) if sp.issparse(self.tokens) else np.asarray(self.tokens)[:, c]
        return TokenMatrix(t, self.offsets)

    def sample(self, max_per_text: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """At most ``max_per_text`` evenly spaced tokens of every text: ``(token rows, their text)``."""
        rows, texts = [], []
        for i, (a, n) in enumerate(zip(self.offsets[:-1], self.lengths, strict=True)):
            if n <= max_per_text:
                pick = np.arange(a, a + n)
            else:
                pick = a + np.unique(np.linspace(0, n - 1, max_per_text).round().astype(np.int64))
            rows.append(pick)
            texts.append(np.full(pick.size, i, dtype=np.int64))
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(rows), np.concatenate(texts)


def token_matrix_from_rows(
    lengths: ArrayLike, text_rows: ArrayLike, token_pos: ArrayLike, cols: ArrayLike, values: ArrayLike, n_cols: int
) -> TokenMatrix:
    """A sparse :class:`TokenMatrix` from (text row, token position, column, value) entries; texts have
    ``lengths`` tokens (entries past a text's length are an error, not dropped)."""
    ln = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(ln)])
    tr, tp = np.asarray(text_rows, dtype=np.int64), np.asarray(token_pos, dtype=np.int64)
    if tr.size and (np.any(tp < 0) or np.any(tp >= ln[tr])):
        bad = int(np.flatnonzero((tp < 0) | (tp >= ln[tr]))[0])
        raise ValueError(f"token_pos {tp[bad]} of text row {tr[bad]} is outside its {ln[tr[bad]]} tokens")
    m = sp.csr_matrix((np.asarray(values, dtype=np.float64), (offsets[tr] + tp, np.asarray(cols, dtype=np.int64))),
                      shape=(int(offsets[-1]), int(n_cols)))
    m.sum_duplicates()
    return TokenMatrix(m, offsets)
