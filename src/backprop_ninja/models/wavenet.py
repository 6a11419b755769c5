"""The hierarchical model of makemore part 5 ("building a WaveNet"), built from the layer pairs.

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size; L = log2(T) levels.

    x0      = C[X]                                   n x T x E
    level k = 1..L:
      xk    = FlattenConsecutive(2)(x{k-1})          n x T/2^k x 2*width   (width E, then H)
      prek  = xk @ Wk                                n x T/2^k x H        (no bias: batchnorm follows)
      xk    = tanh(batchnorm(prek))                  statistics over dims (0, 1), shaped 1 x 1 x H
    h       = xL.view(n, H)                          where the levels end, T/2^L = 1
    logits  = h @ Wout + bout                        n x V
    loss    = cross_entropy(logits, Y)

Each level merges pairs of neighbouring positions, so the context is read as a tree rather than
crushed into one layer at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import UserError
from ..nn.activations import TanhCache, tanh_backward, tanh_forward
from ..nn.embedding import EmbeddingCache, embedding_backward, embedding_forward
from ..nn.linear import LinearCache, linear_backward, linear_forward
from ..nn.losses import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from ..nn.normalisation import BatchNormCache, batchnorm_backward, batchnorm_forward
from ..nn.reshape import FlattenCache, flatten_consecutive_backward, flatten_consecutive_forward
from .base import Dropout, Forward, ModelSpec, Params, Stats, as_index, require_positive

MERGE = 2  # positions merged per level
MAX_LEVELS = 6


@dataclass(frozen=True)
class Config:
    vocab_size: int
    block_size: int = 8
    n_embd: int = 24
    n_hidden: int = 128

    @property
    def n_levels(self) -> int:
        return self.block_size.bit_length() - 1


def check_config(cfg: Config) -> None:
    valid = [MERGE ** k for k in range(1, MAX_LEVELS + 1)]
    if cfg.block_size not in valid:
        raise UserError(f"--block-size {cfg.block_size} cannot be halved level by level down to 1 "
                        f"position; the WaveNet's valid sizes are {', '.join(map(str, valid))}")
    require_positive(cfg, "n_embd", "n_hidden")


def level_names(k: int) -> tuple[str, str, str]:
    return f"W{k}", f"bngain{k}", f"bnbias{k}"


def init(cfg: Config, generator: torch.Generator) -> Params:
    """The lecture's init: weights N(0, 1)/sqrt(fan_in), batchnorm gain 1 and bias 0, the head's
    weights scaled by 0.1 (a less confident first guess) and its bias 0."""
    g, H = generator, cfg.n_hidden
    params = {"C": torch.randn((cfg.vocab_size, cfg.n_embd), generator=g)}
    width = cfg.n_embd
    for k in range(1, cfg.n_levels + 1):
        W, gain, bias = level_names(k)
        fan_in = MERGE * width
        params[W] = torch.randn((fan_in, H), generator=g) / fan_in ** 0.5
        params[gain], params[bias] = torch.ones(1, 1, H), torch.zeros(1, 1, H)
        width = H
    params["Wout"] = torch.randn((H, cfg.vocab_size), generator=g) / H ** 0.5 * 0.1
    params["bout"] = torch.zeros(cfg.vocab_size)
    return params


class Level(NamedTuple):
    flatten: FlattenCache
    linear: LinearCache
    bn: BatchNormCache | None
    tanh: TanhCache


class Cache(NamedTuple):
    emb: EmbeddingCache
    levels: tuple[Level, ...]
    head: LinearCache
    ce: CrossEntropyCache | None
    top_shape: torch.Size  # n x 1 x H, the last level's output before the view


def forward(params: Params, X: Tensor, Y: Tensor | None = None, stats: Stats | None = None,
            dropout: Dropout | None = None, keep_cache: bool = True) -> Forward:
    X, Y = as_index(X), as_index(Y)  # the data may be stored in a smaller integer type
    stats = stats or {}
    x, emb_c = embedding_forward(params["C"], X)               # n x T x E
    levels, norm_inputs, acts = [], {}, {}
    for k in range(1, X.shape[1].bit_length()):
        W, gain, bias = level_names(k)
        x, flat_c = flatten_consecutive_forward(x, MERGE)       # n x T/2^k x 2*width
        pre, lin_c = linear_forward(x, params[W])              # n x T/2^k x H
        norm_inputs[f"bn{k}"] = pre
        x, bn_c = batchnorm_forward(pre, params[gain], params[bias], stats.get(f"bn{k}"))
        x, tanh_c = tanh_forward(x)
        acts[f"h{k}"] = x
        if keep_cache:  # without it, each level's cache is freed as the next one runs
            levels.append(Level(flat_c, lin_c, bn_c, tanh_c))
    h = x.view(x.shape[0], -1)                                 # n x H: the levels end here
    logits, head_c = linear_forward(h, params["Wout"], params["bout"])
    loss, ce_c = cross_entropy_forward(logits, Y) if Y is not None else (None, None)
    cache = Cache(emb_c, tuple(levels), head_c, ce_c, x.shape) if keep_cache else None
    return Forward(logits, loss, cache,
                   norm_inputs, acts)


def backward(cache: Cache, act_grads: dict[str, Tensor] | None = None) -> Params:
    """The forward read bottom-up: head, then each level in reverse, then the embedding."""
    (dlogits,) = cross_entropy_backward(1.0, cache.ce)
    dh, dWout, dbout = linear_backward(dlogits, cache.head)
    dx = dh.view(cache.top_shape)
    grads = {"Wout": dWout, "bout": dbout}
    for k in range(len(cache.levels), 0, -1):
        level, (W, gain, bias) = cache.levels[k - 1], level_names(k)
        if act_grads is not None:
            act_grads[f"h{k}"] = dx
        (dx,) = tanh_backward(dx, level.tanh)
        dx, grads[gain], grads[bias] = batchnorm_backward(dx, level.bn)
        dx, grads[W] = linear_backward(dx, level.linear)
        (dx,) = flatten_consecutive_backward(dx, level.flatten)
    (grads["C"],) = embedding_backward(dx, cache.emb)
    if act_grads is not None:
        act_grads["logits"] = dlogits
    return grads


SPEC = ModelSpec(
    name="wavenet",
    summary="makemore part 5: a tree of FlattenConsecutive(2) -> linear -> batchnorm -> tanh levels",
    config=Config,
    recipe={"steps": 200_000, "batch_size": 32, "lr": 0.1, "lr_decay_step": 150_000,
            "lr_decay_to": 0.01, "seed": 2147483647},
    init=init, forward=forward, backward=backward, check_config=check_config)
