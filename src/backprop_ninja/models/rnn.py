"""makemore's recurrent models: an RNN (and, in ``gru``, the same model with a GRU cell).

Dimension letters: n batch, T block_size (the longest item + 1), C n_embd, H n_embd2, V vocab.

    emb    = wte[X]                          n x T x C
    hs     = recurrence(emb, start, cell)    n x T x H   (start: a learned first state)
    logits = hs @ Wout + bout                n x T x V
    loss   = cross_entropy(logits, Y), padded targets (-1) ignored

The sequence layout (``data``): X = [0, item, 0 ...], Y = [item, 0, -1 ...].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ..errors import UserError
from ..nn.embedding import EmbeddingCache, embedding_backward, embedding_forward
from ..nn.linear import LinearCache, linear_backward, linear_forward
from ..nn.losses import (IGNORE_INDEX, CrossEntropyCache, SoftTargets, cross_entropy_backward,
                         cross_entropy_forward)
from ..nn.recurrent import gru_backward, gru_forward, rnn_backward, rnn_forward
from .base import Dropout, Forward, ModelSpec, Params, Stats, as_index, require_positive

ADAMW_RECIPE = {"steps": 20_000, "batch_size": 32, "lr": 5e-4, "lr_decay_step": 20_000,
                "lr_decay_to": 5e-5, "seed": 3407, "optimizer": "adamw", "weight_decay": 0.01,
                "warmup_steps": 0, "lr_schedule": "cosine"}


@dataclass(frozen=True)
class Config:
    vocab_size: int
    block_size: int = 0   # 0: the longest item + 1, from the data
    n_embd: int = 64
    n_embd2: int = 64


def check_config(cfg) -> None:
    require_positive(cfg, "n_embd", "n_embd2")
    if cfg.block_size < 0:
        raise UserError(f"--block-size must be at least 1, got {cfg.block_size}")


def uniform(g: torch.Generator, fan_in: int, *shape: int) -> Tensor:
    """torch.nn.Linear's initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases included."""
    return (torch.rand(shape, generator=g) * 2 - 1) / fan_in ** 0.5


@dataclass(frozen=True)
class Cell:
    """A recurrence of ``nn.recurrent``: its weights' names (each (C+H) x H, with a bias of H)
    and its forward/backward pair."""

    weights: tuple[str, ...]
    forward: Callable
    backward: Callable


CELLS = {
    "rnn": Cell(("w",), rnn_forward, rnn_backward),
    "gru": Cell(("w_r", "w_z", "w_hbar"), gru_forward, gru_backward),
}


def init_cell(cell: Cell, cfg: Config, g: torch.Generator) -> Params:
    V, C, H = cfg.vocab_size, cfg.n_embd, cfg.n_embd2
    params = {"wte": torch.randn((V, C), generator=g), "start": torch.zeros(H)}
    for w in cell.weights:
        params[w] = uniform(g, C + H, C + H, H)
        params["b" + w[1:]] = uniform(g, C + H, H)
    params["Wout"], params["bout"] = uniform(g, H, H, V), uniform(g, H, V)
    return params


class Cache(NamedTuple):
    emb: EmbeddingCache
    cell: object
    head: LinearCache
    ce: CrossEntropyCache | None


def make_forward(cell: Cell):
    def forward(params: Params, X: Tensor, Y: Tensor | None = None, stats: Stats | None = None,
                dropout: Dropout | None = None, soft: SoftTargets | None = None,
                keep_cache: bool = True) -> Forward:
        X, Y = as_index(X), as_index(Y)  # the data may be stored in a smaller integer type
        emb, emb_c = embedding_forward(params["wte"], X)                 # n x T x C
        weights = [t for w in cell.weights for t in (params[w], params["b" + w[1:]])]
        hs, cell_c = cell.forward(emb, params["start"], *weights)       # n x T x H
        logits, head_c = linear_forward(hs, params["Wout"], params["bout"])
        loss, ce_c = (cross_entropy_forward(logits, Y, IGNORE_INDEX, soft) if Y is not None
                      else (None, None))
        cache = Cache(emb_c, cell_c, head_c, ce_c) if keep_cache else None
        return Forward(logits, loss, cache, {}, {"hs": hs})
    return forward


def make_backward(cell: Cell):
    def backward(cache: Cache, act_grads: dict[str, Tensor] | None = None) -> Params:
        (dlogits,) = cross_entropy_backward(1.0, cache.ce)
        dhs, dWout, dbout = linear_backward(dlogits, cache.head)
        demb, dstart, *dweights = cell.backward(dhs, cache.cell)
        (dwte,) = embedding_backward(demb, cache.emb)
        if act_grads is not None:
            act_grads.update(logits=dlogits, hs=dhs)
        grads = {"wte": dwte, "start": dstart}
        for w, dw, db in zip(cell.weights, dweights[0::2], dweights[1::2]):
            grads[w], grads["b" + w[1:]] = dw, db
        return {**grads, "Wout": dWout, "bout": dbout}
    return backward


def make_spec(name: str, summary: str) -> ModelSpec:
    cell = CELLS[name]
    return ModelSpec(
        name=name, summary=summary, config=Config, recipe=ADAMW_RECIPE, layout="sequence",
        soft_targets=True, init=lambda cfg, g: init_cell(cell, cfg, g), forward=make_forward(cell),
        backward=make_backward(cell), check_config=check_config)


SPEC = make_spec("rnn", "makemore's RNN: h_t = tanh([x_t, h_{t-1}] W + b) from a learned start state")
