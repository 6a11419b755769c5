"""Embedding lookup: emb[..., :] = table[ix[...], :].

Dimension letters: n batch, T positions, E n_embd, V rows of the table.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class EmbeddingCache(NamedTuple):
    ix: Tensor      # any shape (n x T here), int64: the looked-up rows
    num_rows: int   # V, rows of the table


def embedding_forward(table: Tensor, ix: Tensor) -> tuple[Tensor, EmbeddingCache]:
    return table[ix], EmbeddingCache(ix, table.shape[0])  # ix.shape x E


def embedding_backward(demb: Tensor, cache: EmbeddingCache) -> tuple[Tensor]:
    """A row looked up k times receives the sum of its k upstream gradients: a scatter-add."""
    width = demb.shape[-1]
    dtable = demb.new_zeros(cache.num_rows, width)
    dtable.index_add_(0, cache.ix.reshape(-1), demb.reshape(-1, width))
    return (dtable,)
