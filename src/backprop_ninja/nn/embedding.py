"""Embedding lookup: emb[..., :] = table[ix[...], :], and the token + position embeddings of
makemore's Transformer and BoW models built from two such lookups.

Dimension letters: n batch, T positions, E (or C) n_embd, V rows of the table (the vocabulary).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
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


class TokenPositionCache(NamedTuple):
    tok: EmbeddingCache  # idx (n x T) into wte
    pos: EmbeddingCache  # arange(T) into wpe: one lookup shared by every batch row


def token_position_forward(wte: Tensor, wpe: Tensor, idx: Tensor
                           ) -> tuple[Tensor, TokenPositionCache]:
    """x = wte[idx] + wpe[arange(T)], idx n x T, wte V x C, wpe block_size x C: x is n x T x C.

    The position rows are looked up once (T x C) and broadcast over the batch."""
    T, block_size = idx.shape[1], wpe.shape[0]
    if T > block_size:
        raise ValueError(f"{T} positions, but the position table has only {block_size} rows")
    tok, tok_cache = embedding_forward(wte, idx)
    pos, pos_cache = embedding_forward(wpe, torch.arange(T, device=idx.device))
    return tok + pos, TokenPositionCache(tok_cache, pos_cache)


def token_position_backward(dx: Tensor, cache: TokenPositionCache) -> tuple[Tensor, Tensor]:
    """Returns (dwte, dwpe). A sum passes dx to both lookups unchanged; each then scatter-adds.

    Position row t is used by all n batch rows, so dwpe[t] = sum over the batch of dx[:, t]
    (summed before the scatter, which then sees T rows rather than n*T); rows of wpe at or past
    T were not used and get zero. A constant dx would hide gradients sent to the wrong position
    row (each of the first T rows would receive n * const, whichever position it came from); the
    check's dx is random."""
    (dwte,) = embedding_backward(dx, cache.tok)
    (dwpe,) = embedding_backward(dx.sum(0), cache.pos)
    return dwte, dwpe
