"""makemore's bag-of-words model: each position sees the average of the embeddings up to it.

Dimension letters: n batch, T block_size (the longest item + 1), C n_embd, H n_embd2, V vocab.

    x      = wte[X] + wpe[0..T-1]                 n x T x C
    x      = x + causal_average(x)                y_t = mean(x_0 .. x_t)
    x      = x + tanh(x @ Wfc + bfc) @ Wproj + bproj    (an MLP through H, with a residual)
    logits = x @ Wout + bout                      n x T x V
    loss   = cross_entropy(logits, Y), padded targets ignored

Each residual's gradient adds to its branch's: x feeds both the branch and the sum.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..nn.activations import TanhCache, tanh_backward, tanh_forward
from ..nn.bow import CausalAverageCache, causal_average_backward, causal_average_forward
from ..nn.embedding import TokenPositionCache, token_position_backward, token_position_forward
from ..nn.linear import LinearCache, linear_backward, linear_forward
from ..nn.losses import (IGNORE_INDEX, CrossEntropyCache, SoftTargets, cross_entropy_backward,
                         cross_entropy_forward)
from .base import Dropout, Forward, ModelSpec, Params, Stats, as_index
from .rnn import ADAMW_RECIPE, Config, check_config, uniform


def init(cfg: Config, g: torch.Generator) -> Params:
    V, T, C, H = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_embd2
    return {"wte": torch.randn((V, C), generator=g), "wpe": torch.randn((T, C), generator=g),
            "Wfc": uniform(g, C, C, H), "bfc": uniform(g, C, H),
            "Wproj": uniform(g, H, H, C), "bproj": uniform(g, H, C),
            "Wout": uniform(g, C, C, V), "bout": uniform(g, C, V)}


class Cache(NamedTuple):
    emb: TokenPositionCache
    avg: CausalAverageCache
    fc: LinearCache
    tanh: TanhCache
    proj: LinearCache
    head: LinearCache
    ce: CrossEntropyCache | None


def forward(params: Params, X: Tensor, Y: Tensor | None = None, stats: Stats | None = None,
            dropout: Dropout | None = None, soft: SoftTargets | None = None,
            keep_cache: bool = True) -> Forward:
    X, Y = as_index(X), as_index(Y)  # the data may be stored in a smaller integer type
    x, emb_c = token_position_forward(params["wte"], params["wpe"], X)   # n x T x C
    avg, avg_c = causal_average_forward(x)
    x = x + avg
    pre, fc_c = linear_forward(x, params["Wfc"], params["bfc"])          # n x T x H
    h, tanh_c = tanh_forward(pre)
    mlp, proj_c = linear_forward(h, params["Wproj"], params["bproj"])    # n x T x C
    x = x + mlp
    logits, head_c = linear_forward(x, params["Wout"], params["bout"])
    loss, ce_c = cross_entropy_forward(logits, Y, IGNORE_INDEX, soft) if Y is not None else (None, None)
    cache = Cache(emb_c, avg_c, fc_c, tanh_c, proj_c, head_c, ce_c) if keep_cache else None
    return Forward(logits, loss, cache, {}, {"h": h})


def backward(cache: Cache, act_grads: dict[str, Tensor] | None = None) -> Params:
    (dlogits,) = cross_entropy_backward(1.0, cache.ce)
    dx, dWout, dbout = linear_backward(dlogits, cache.head)
    dh, dWproj, dbproj = linear_backward(dx, cache.proj)      # x = x + mlp: dx flows to both
    (dpre,) = tanh_backward(dh, cache.tanh)
    dx_fc, dWfc, dbfc = linear_backward(dpre, cache.fc)
    dx = dx + dx_fc
    (dx_avg,) = causal_average_backward(dx, cache.avg)        # x = x + avg: again both
    dx = dx + dx_avg
    dwte, dwpe = token_position_backward(dx, cache.emb)
    if act_grads is not None:
        act_grads.update(logits=dlogits, h=dh)
    return {"wte": dwte, "wpe": dwpe, "Wfc": dWfc, "bfc": dbfc, "Wproj": dWproj,
            "bproj": dbproj, "Wout": dWout, "bout": dbout}


SPEC = ModelSpec(
    name="bow", summary="makemore's bag of words: a causal running average of the embeddings "
                        "and an MLP with a residual",
    config=Config, recipe=ADAMW_RECIPE, layout="sequence", soft_targets=True, init=init,
    forward=forward, backward=backward, check_config=check_config)
