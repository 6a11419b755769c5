"""The MLP of the lecture ("becoming a backprop ninja"), built from the layer pairs.

Dimension letters: n batch, T block_size, E n_embd, H n_hidden, V vocab size.

    emb     = C[X]                 n x T x E
    embcat  = emb.view(n, T*E)     n x T*E
    hprebn  = embcat @ W1 + b1     n x H
    hpreact = batchnorm(hprebn)    n x H     (batch statistics in training, calibrated ones after)
    h       = tanh(hpreact)        n x H
    logits  = h @ W2 + b2          n x V
    loss    = cross_entropy(logits, Y)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..nn.activations import TanhCache, tanh_backward, tanh_forward
from ..nn.embedding import EmbeddingCache, embedding_backward, embedding_forward
from ..nn.linear import LinearCache, linear_backward, linear_forward
from ..nn.losses import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from ..nn.normalisation import BatchNormCache, batchnorm_backward, batchnorm_forward
from .base import Dropout, Forward, ModelSpec, Params, Stats, as_index, require_positive

PARAM_NAMES = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")
LECTURE_SEED = 2147483647


@dataclass(frozen=True)
class Config:
    vocab_size: int
    block_size: int = 3
    n_embd: int = 10
    n_hidden: int = 200


def check_config(cfg: Config) -> None:
    require_positive(cfg, "block_size", "n_embd", "n_hidden")


def init(cfg: Config, generator: torch.Generator) -> Params:
    """The lecture's initialisation, every tensor from one seeded generator, in PARAM_NAMES order.

    Biases are small random numbers rather than zeros, so that a wrong backward cannot hide.
    """
    return {**init_mlp_params(cfg, generator), **init_batchnorm_params(cfg, generator)}


def init_mlp_params(cfg: Config, g: torch.Generator) -> Params:
    """C, W1, b1, W2, b2: the lecture draws these first, then its check batch, from the same g."""
    V, T, E, H = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_hidden
    fan_in = T * E
    return {
        "C": torch.randn((V, E), generator=g),
        "W1": torch.randn((fan_in, H), generator=g) * (5 / 3) / fan_in ** 0.5,  # tanh gain / sqrt(fan_in)
        "b1": torch.randn(H, generator=g) * 0.1,
        "W2": torch.randn((H, V), generator=g) * 0.1,
        "b2": torch.randn(V, generator=g) * 0.1,
    }


def init_batchnorm_params(cfg: Config, g: torch.Generator) -> Params:
    H = cfg.n_hidden
    return {
        "bngain": torch.randn((1, H), generator=g) * 0.1 + 1.0,
        "bnbias": torch.randn((1, H), generator=g) * 0.1,
    }


class Cache(NamedTuple):
    emb: EmbeddingCache
    lin1: LinearCache
    bn: BatchNormCache | None  # None when normalised with given statistics (nothing to train)
    tanh: TanhCache
    lin2: LinearCache
    ce: CrossEntropyCache | None
    emb_shape: torch.Size


def forward(params: Params, X: Tensor, Y: Tensor | None = None, stats: Stats | None = None,
            dropout: Dropout | None = None, keep_cache: bool = True) -> Forward:
    """Logits (and the loss if Y is given); ``stats`` as in ``models.base``."""
    X, Y = as_index(X), as_index(Y)  # the data may be stored in a smaller integer type
    emb, emb_c = embedding_forward(params["C"], X)
    embcat = emb.view(emb.shape[0], -1)
    hprebn, lin1_c = linear_forward(embcat, params["W1"], params["b1"])
    hpreact, bn_c = batchnorm_forward(hprebn, params["bngain"], params["bnbias"],
                                      (stats or {}).get("bn"))
    h, tanh_c = tanh_forward(hpreact)
    logits, lin2_c = linear_forward(h, params["W2"], params["b2"])
    loss, ce_c = cross_entropy_forward(logits, Y) if Y is not None else (None, None)
    cache = Cache(emb_c, lin1_c, bn_c, tanh_c, lin2_c, ce_c, emb.shape) if keep_cache else None
    return Forward(logits, loss, cache, {"bn": hprebn}, {"hprebn": hprebn, "hpreact": hpreact, "h": h})


def backward(cache: Cache, act_grads: dict[str, Tensor] | None = None) -> Params:
    """Gradients of the loss for every parameter: the forward read bottom-up, a layer a line.
    ``act_grads``, if given, receives the activations' gradients too (for the diagnostics)."""
    if cache.ce is None or cache.bn is None:
        raise ValueError("backward needs a training forward pass: targets given and no statistics")
    (dlogits,) = cross_entropy_backward(1.0, cache.ce)
    dh, dW2, db2 = linear_backward(dlogits, cache.lin2)
    (dhpreact,) = tanh_backward(dh, cache.tanh)
    dhprebn, dbngain, dbnbias = batchnorm_backward(dhpreact, cache.bn)
    dembcat, dW1, db1 = linear_backward(dhprebn, cache.lin1)
    (dC,) = embedding_backward(dembcat.view(cache.emb_shape), cache.emb)
    if act_grads is not None:
        act_grads.update(logits=dlogits, h=dh, hpreact=dhpreact, hprebn=dhprebn)
    return {"C": dC, "W1": dW1, "b1": db1, "W2": dW2, "b2": db2, "bngain": dbngain, "bnbias": dbnbias}


SPEC = ModelSpec(
    name="mlp",
    summary="the lecture's MLP: embedding, linear, batchnorm, tanh, linear (Bengio et al. 2003)",
    config=Config,
    recipe={"steps": 200_000, "batch_size": 32, "lr": 0.1, "lr_decay_step": 100_000,
            "lr_decay_to": 0.01, "seed": LECTURE_SEED},
    init=init, forward=forward, backward=backward, check_config=check_config)
