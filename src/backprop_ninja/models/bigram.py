"""The bigram model of makemore part 1: a V x V table of logits, row = the previous character.

Dimension letters: n batch, V vocab size.

    logits = W[X[:, 0]]            n x V     (an embedding lookup whose width is V)
    loss   = cross_entropy(logits, Y)

Its backward is the embedding's: each row of dlogits is added into the row of W it was read from.
Trained by gradient descent it learns what the count table of part 1 holds: at its optimum
softmax(W[a]) is the frequency of each character after a.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..nn.embedding import EmbeddingCache, embedding_backward, embedding_forward
from ..nn.losses import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from .base import Dropout, Forward, ModelSpec, Params, Stats, as_index


@dataclass(frozen=True)
class Config:
    vocab_size: int


def init(cfg: Config, generator: torch.Generator) -> Params:
    # small random logits rather than zeros, so that a wrong backward cannot hide
    return {"W": torch.randn((cfg.vocab_size, cfg.vocab_size), generator=generator) * 0.1}


class Cache(NamedTuple):
    lookup: EmbeddingCache
    ce: CrossEntropyCache | None


def forward(params: Params, X: Tensor, Y: Tensor | None = None, stats: Stats | None = None,
            dropout: Dropout | None = None, keep_cache: bool = True) -> Forward:
    X, Y = as_index(X), as_index(Y)  # the data may be stored in a smaller integer type
    logits, lookup_c = embedding_forward(params["W"], X[:, -1])  # n x V
    loss, ce_c = cross_entropy_forward(logits, Y) if Y is not None else (None, None)
    return Forward(logits, loss, Cache(lookup_c, ce_c) if keep_cache else None, {}, {})


def backward(cache: Cache, act_grads: dict[str, Tensor] | None = None) -> Params:
    (dlogits,) = cross_entropy_backward(1.0, cache.ce)
    (dW,) = embedding_backward(dlogits, cache.lookup)
    if act_grads is not None:
        act_grads.update(logits=dlogits)
    return {"W": dW}


SPEC = ModelSpec(
    name="bigram",
    summary="a V x V table of logits: the next character from the previous one (makemore part 1)",
    config=Config,
    recipe={"steps": 20_000, "batch_size": 256, "lr": 30.0, "lr_decay_step": 15_000,
            "lr_decay_to": 3.0, "seed": 2147483647},
    init=init, forward=forward, backward=backward)
